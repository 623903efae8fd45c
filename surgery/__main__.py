"""`python -m surgery` (and `torchrun -m surgery apply S.surg` for distributed calibration)."""

import sys

from surgery.cli import main

sys.exit(main())

"""DSnoT without the sign condition (the reference's unstructured default, ``--without_same_sign``).

ops.md §7.2 (and our pass) accept a swap only while sign(e_i) is unchanged; the DSnoT reference's
unstructured path skips that check by default (``--without_same_sign`` is ``type=bool`` with
default True). This runs benchmarks/prune.py with ``dsnot(..., same_sign=False)`` patched in and
" (no sign check)" appended to the config names, same arguments:

    python benchmarks/prune_dsnot_nosign.py --configs "wanda 60% + dsnot (all layers)" \
        --samples 128 --seqlen 512 --threads 1 --out /tmp/prune.jsonl
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prune  # noqa: E402  (benchmarks/prune.py)

import surgery.passes.prune.base as base  # noqa: E402
from surgery.passes.prune.dsnot_core import dsnot  # noqa: E402

SUFFIX = " (no sign check)"
base.dsnot = functools.partial(dsnot, same_sign=False)
for name in [n for n, spec in prune.CONFIGS.items() if spec and "refine" in spec[2]]:
    prune.CONFIGS[name + SUFFIX] = prune.CONFIGS[name]
if "--configs" in sys.argv:
    i = sys.argv.index("--configs") + 1
    sys.argv[i] = ",".join(c + SUFFIX for c in sys.argv[i].split(","))

if __name__ == "__main__":
    prune.main()

"""Built-in passes, one package per family. Importing a family registers its passes."""

# Plain imports: every family ships in the package, so a missing or misspelled one is an error.
from surgery.passes import quantize  # noqa: F401  (order: families that others build on first)
from surgery.passes import prune  # noqa: F401
from surgery.passes import adapters  # noqa: F401
from surgery.passes import merge  # noqa: F401
from surgery.passes import attention  # noqa: F401
from surgery.passes import lower  # noqa: F401
from surgery.passes import compensate  # noqa: F401
from surgery.passes import export  # noqa: F401
from surgery.passes import evo  # noqa: F401  (after prune and quantize: it extends both)
from surgery.passes import train  # noqa: F401

FAMILIES = ["quantize", "prune", "adapters", "merge", "attention", "lower", "compensate", "export",
            "evo", "train"]

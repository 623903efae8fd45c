"""`compensate`: low-rank paths that cancel the error of compressed layers (EoRA, SVD)."""

from surgery.passes.compensate import passes  # noqa: F401  (registers eora and svd)

"""`lower OPS to triton [in SEL]`: replace ops by Triton kernels behind an equivalence gate."""

from surgery.passes.lower import triton  # noqa: F401 - registers ("lower", "triton")

"""Per-Linear input statistics accumulated over calibration batches."""

from __future__ import annotations

import torch

# A batch's float32 XᵀX is formed in row blocks of at most this many bytes once it would be
# larger: a 14336-wide down projection's is 0.82 GB whole, next to a 1.6 GB float64 sum. Each row
# block is the same dot products over the same tokens, so the sums do not change (checked bit for
# bit against the whole product with MKL; another BLAS could round a block differently).
GRAM_BLOCK_BYTES = 64 << 20
_RELEASE_MIN_BYTES = 64 << 20  # float32_in_place hands pages back only for buffers this large


def gram_row_blocks(n: int) -> int:
    """Rows per block of an n x n float32 XᵀX (n itself when the whole product is small)."""
    return max(1, min(n, GRAM_BLOCK_BYTES // (4 * n)))


class LinearStats:
    """Running statistics of the inputs X (tokens x in_features) seen by one Linear layer.

    ``tokens``: rows seen; ``samples``: sequences seen (leading dimension of each batch, as the
    GPTQ/SparseGPT reference counts them); ``sum``: per-column sum (float64); ``sq_sum``: per-
    column sum of squares (float64); ``seq_var_sum``: per-column sum over sequences of
    (tokens in the sequence x the variance within it) (float64); ``gram``: XᵀX (float64, only
    when collected); ``cross``: X_refᵀX (float64, only with ``cross=True``), X_ref the inputs of
    the same layer in a reference model fed the same tokens (passes/calib/engine.py).
    """

    def __init__(self, in_features: int, gram: bool = True, device=None, cross: bool = False):
        self.in_features = in_features
        self.tokens = 0
        self.samples = 0
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.seq_var_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram = (torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                     if gram else None)
        self.cross = (torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                      if cross else None)
        self.pending: list[dict] | None = None  # per-batch contributions, while deferred
        self.users = 1  # layers sharing these statistics (same input); see take_hessian

    @torch.no_grad()
    def add(self, x: torch.Tensor, gram: torch.Tensor | None = None,
            paired: torch.Tensor | None = None) -> None:
        """Add one batch of inputs (..., in_features); ``gram`` = its XᵀX if already computed;
        ``paired`` = the reference model's inputs for the same tokens (needed with ``cross``).

        With ``defer()`` on, the batch's contribution is kept apart (for a distributed fold,
        surgery.distributed) and added later by ``apply_pending`` in the same order."""
        d = self._delta(x, gram)
        if self.cross is not None:
            d["cross"] = self._cross_delta(x, paired)
        if self.pending is not None:
            self.pending.append(d)
        else:
            self._apply(d)

    def _delta(self, x: torch.Tensor, gram: torch.Tensor | None) -> dict:
        samples = x.shape[0] if x.dim() > 1 else 1
        seqs = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        seqs = seqs.to(torch.float32)
        seq_var = (seqs.var(dim=1, unbiased=False) * seqs.shape[1]).sum(0, dtype=torch.float64)
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        d = {"samples": samples, "tokens": x.shape[0], "seq_var": seq_var,
             "sum": x.sum(0, dtype=torch.float64)}
        if self.gram is not None:
            # float32 per batch, summed in float64; None: added in row blocks by _apply
            d["gram"] = gram if gram is not None else (
                x.T @ x if gram_row_blocks(x.shape[1]) == x.shape[1] or self.pending is not None
                else None)
            d["x"] = x if d["gram"] is None else None
        else:
            d["sq"] = (x * x).sum(0, dtype=torch.float64)
        return d

    def _cross_delta(self, x: torch.Tensor, paired: torch.Tensor | None):
        """This batch's X_refᵀX (float32, summed in float64 by _apply), or the two inputs when
        it is added in row blocks."""
        if paired is None or paired.shape != x.shape:
            raise ValueError(f"the reference inputs have shape "
                             f"{None if paired is None else tuple(paired.shape)}, "
                             f"the layer's {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        ref = paired.reshape(-1, paired.shape[-1]).to(torch.float32)
        if gram_row_blocks(x.shape[1]) == x.shape[1] or self.pending is not None:
            return ref.T @ x
        return (ref, x)

    def _apply(self, d: dict) -> None:
        cross = d.get("cross")
        if isinstance(cross, tuple):
            ref, x = cross
            rows = gram_row_blocks(x.shape[1])
            for i in range(0, x.shape[1], rows):
                self.cross[i:i + rows] += ref[:, i:i + rows].T @ x
        elif cross is not None:
            self.cross += cross
        self.samples += d["samples"]
        self.seq_var_sum += d["seq_var"]
        self.tokens += d["tokens"]
        self.sum += d["sum"]
        if self.gram is not None and d.get("gram") is None:
            x, rows = d["x"], gram_row_blocks(d["x"].shape[1])
            for i in range(0, x.shape[1], rows):
                block = x[:, i:i + rows].T @ x
                self.gram[i:i + rows] += block
                self.sq_sum[i:i + rows] += block[:, i:i + rows].diagonal()
                del block
        elif self.gram is not None:
            self.gram += d["gram"]
            self.sq_sum += d["gram"].diagonal()
        else:
            self.sq_sum += d["sq"]

    # --- deferred accumulation (distributed calibration) -----------------------------------

    def defer(self) -> None:
        """Keep each batch's contribution apart until ``apply_pending``."""
        self.pending = []

    def apply_pending(self) -> None:
        """Add the kept contributions in batch order (the counts are summed separately)."""
        for d in self.pending or []:
            self._apply({**d, "samples": 0, "tokens": 0})
        self.pending = None

    def local_counts(self) -> list[int]:
        return [sum(d["samples"] for d in self.pending or []),
                sum(d["tokens"] for d in self.pending or [])]

    def float_state(self) -> list[torch.Tensor]:
        """The float tensors a fold carries from rank to rank."""
        return [self.sum, self.sq_sum, self.seq_var_sum] + [
            t for t in (self.gram, self.cross) if t is not None]

    # --- derived quantities -------------------------------------------------------------------

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    def var(self) -> torch.Tensor:
        """Per-column population variance E[x²] - E[x]²."""
        n = max(self.tokens, 1)
        return (self.sq_sum / n - self.mean() ** 2).clamp(min=0)

    def sequence_var(self) -> torch.Tensor:
        """Token-weighted mean of the per-sequence variances: the DSnoT reference's Var(x_j),
        which feeds one calibration sequence per batch and averages each batch's variance over
        its tokens (it leaves out the spread between sequences' means that ``var`` includes)."""
        return self.seq_var_sum / max(self.tokens, 1)

    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = (2 / samples) · XᵀX as float32 (GPTQ / SparseGPT layer Hessian)."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        return (self.gram * (2.0 / max(self.samples, 1))).to(torch.float32)

    def take_hessian(self) -> torch.Tensor:
        """``hessian()``, bit for bit, scaling the float64 Gram matrix in place and releasing it:
        for a 14336-wide down projection that saves a 1.6 GB float64 temporary and the 1.6 GB
        accumulator itself. The statistics have no Gram matrix afterwards."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        if self.users > 1:  # another layer sharing them still needs the Gram matrix
            self.users -= 1
            return self.hessian()
        gram, self.gram = self.gram, None
        return float32_in_place(gram.mul_(2.0 / max(self.samples, 1)))


def float32_in_place(t: torch.Tensor) -> torch.Tensor:
    """``t.to(torch.float32)`` for a contiguous float64 CPU tensor, written over the first half
    of its own buffer, whose second half is then handed back to the OS: 8 bytes an element at the
    peak instead of 12 (1.6 + 0.8 GB for a 14336-wide Hessian). ``t`` is garbage afterwards.

    Rows are converted in blocks in order; block [a, b) lands on bytes that held rows below b,
    all read already. Small or non-CPU tensors are simply converted."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * 8 < _RELEASE_MIN_BYTES:
        return t.to(torch.float32)
    flat = t.view(-1)
    out = flat.view(torch.float32)[:flat.numel()]
    step = max(1, GRAM_BLOCK_BYTES // 8)
    for a in range(0, flat.numel(), step):
        out[a:a + step] = flat[a:a + step].to(torch.float32)  # reads the block before writing
    _madvise_free(t.data_ptr() + 4 * flat.numel(), 4 * flat.numel())
    return out.view(t.shape)


def _madvise_free(address: int, size: int) -> None:
    """Return the whole pages inside [address, address + size) to the OS (Linux madvise
    MADV_DONTNEED: they read back as zeros if touched; nothing reads them before the buffer is
    freed). The last page is kept: an allocator may keep bookkeeping right after a buffer."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    page = 4096
    start = -(-address // page) * page
    end = (address + size) // page * page - page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):  # no libc madvise: the pages just stay resident
        pass

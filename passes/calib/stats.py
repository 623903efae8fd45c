"""Per-Linear input statistics accumulated over calibration batches."""

from __future__ import annotations

import torch


class LinearStats:
    """Running statistics of the inputs X (tokens x in_features) seen by one Linear layer.

    ``tokens``: rows seen; ``samples``: sequences seen (leading dimension of each batch, as the
    GPTQ/SparseGPT reference counts them); ``sum``: per-column sum (float64); ``sq_sum``: per-
    column sum of squares (float64); ``seq_var_sum``: per-column sum over sequences of
    (tokens in the sequence x the variance within it) (float64); ``gram``: XᵀX (float64, only
    when collected).
    """

    def __init__(self, in_features: int, gram: bool = True, device=None):
        self.in_features = in_features
        self.tokens = 0
        self.samples = 0
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.seq_var_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram = (torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                     if gram else None)
        self.pending: list[dict] | None = None  # per-batch contributions, while deferred
        self.users = 1  # layers sharing these statistics (same input); see take_hessian

    @torch.no_grad()
    def add(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        """Add one batch of inputs (..., in_features); ``gram`` = its XᵀX if already computed.

        With ``defer()`` on, the batch's contribution is kept apart (for a distributed fold,
        surgery.distributed) and added later by ``apply_pending`` in the same order."""
        d = self._delta(x, gram)
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
            d["gram"] = x.T @ x if gram is None else gram  # float32 per batch; summed in float64
        else:
            d["sq"] = (x * x).sum(0, dtype=torch.float64)
        return d

    def _apply(self, d: dict) -> None:
        self.samples += d["samples"]
        self.seq_var_sum += d["seq_var"]
        self.tokens += d["tokens"]
        self.sum += d["sum"]
        if self.gram is not None:
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
        return [self.sum, self.sq_sum, self.seq_var_sum] + (
            [self.gram] if self.gram is not None else [])

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
        return gram.mul_(2.0 / max(self.samples, 1)).to(torch.float32)

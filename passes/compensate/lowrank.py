"""The low-rank factors of a compression error: EoRA (eigenspace) and plain truncated SVD.

Notation (docs/passes/eora.md): ``W`` (out, in) the float weight, ``W_c`` the compressed one,
``dW = W - W_c``, ``X`` (in, n) the layer's calibration inputs, ``G = X Xᵀ`` (in, in).

- ``svd`` (ZeroQuant-V2's LoRC): ``dW ≈ U_r Σ_r V_rᵀ``, the best rank-r approximation in the
  Frobenius norm of the weight error.
- ``eora`` (Liu et al. 2024): eigendecompose ``G = Q Λ Qᵀ``, set ``Q' = Q Λ^{1/2}``, take the
  rank-r SVD ``dW Q' ≈ U_r Σ_r V_rᵀ`` and map it back: ``B A = U_r Σ_r V_rᵀ Q'^{-1}`` with
  ``Q'^{-1} = Λ^{-1/2} Qᵀ``. Since ``||(dW - BA) X||_F = ||(dW - BA) Q'||_F``, this is the best
  rank-r approximation in the *output* error on the calibration inputs.

- ``eora`` with ``upstream = a > 0``: the target moves towards the *original model's* output of
  the layer, ``W X_a`` with ``X_a = a X_o + (1 - a) X_c`` (``X_o`` the layer's inputs in the
  uncompressed model, ``X_c`` in the compressed one), so the path also cancels a share ``a`` of the
  error that reaches the layer from earlier compressed layers: ``min ||W X_a - (W_c + BA) X_c||_F²
  + μ||BA||_F²``. With ``G = X_c X_cᵀ``, ``C_a = X_a X_cᵀ = a X_o X_cᵀ + (1 - a) G`` and
  ``G + μI = Q Λ Qᵀ``, the minimiser is the rank-r SVD of ``M = (W C_a - W_c G) Q Λ^{-1/2}``
  mapped back by ``Λ^{-1/2} Qᵀ``. ``μ = damping · mean(diag G)``: unlike ``dW Q'``, ``M`` does not
  shrink along directions the inputs barely vary in, and mapping them back by ``Λ^{-1/2}`` blows
  them up without the ridge. With ``a = 0`` and ``μ = 0`` it is ``dW Q'``, plain EoRA.

All split ``Σ_r`` evenly (``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ [Q'^{-1}]``) as the public
EoRA code does, so both factors are non-zero and can start a LoRA fine-tune. Everything runs in
float64; eigenvalues below ``EIG_FLOOR · max(Λ)`` (zero or slightly negative for rank-deficient
inputs) are raised to that floor. ``Q' Q'^{-1} = I`` holds for any positive floor, so at full rank
``B A = dW`` exactly (up to float64 rounding) whatever the inputs.
"""

from __future__ import annotations

import torch

EIG_FLOOR = 1e-12  # relative to the largest eigenvalue of G


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int):
    root = S[:rank].clamp(min=0).sqrt()
    B = U[:, :rank] * root  # (out, r)
    A = root.unsqueeze(1) * Vh[:rank]  # (r, in)
    return B, A


@torch.no_grad()
def svd_factors(dW: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) float64 with B A the rank-r truncated SVD of ``dW``."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    return _split(U, S, Vh, rank)


@torch.no_grad()
def eigen_scaling(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q', Q'^{-1}) float64 for the input Gram/covariance matrix ``G`` (in, in)."""
    G = G.to(torch.float64)
    G = (G + G.T) / 2  # summed in float64 from float32 batches: symmetric up to rounding
    L, Q = torch.linalg.eigh(G)
    top = float(L.max()) if L.numel() else 0.0
    floor = EIG_FLOOR * top if top > 0 else 1.0  # an all-zero G: every direction unseen
    root = L.clamp(min=floor).sqrt()
    return Q * root, (Q / root).T


@torch.no_grad()
def eora_factors(dW: torch.Tensor, G: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) float64: EoRA's projection of ``dW`` for inputs with Gram ``G``."""
    scale, inv = eigen_scaling(G)
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64) @ scale, full_matrices=False)
    B, A = _split(U, S, Vh, rank)
    return B, A @ inv


def output_error(dW: torch.Tensor, G: torch.Tensor) -> float:
    """||dW X||_F² = tr(dW G dWᵀ) (float64), the layer's squared output error on the inputs."""
    dW = dW.to(torch.float64)
    return float(((dW @ G.to(torch.float64)) * dW).sum())


@torch.no_grad()
def eora_accumulated_factors(W: torch.Tensor, Wc: torch.Tensor, G: torch.Tensor,
                             C: torch.Tensor, rank: int, upstream: float, damping: float
                             ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """((B, A), share) float64 minimising ``||W X_a - (W_c + BA) X_c||² + μ||BA||²`` with
    ``C = X_o X_cᵀ`` and ``a = upstream`` (module docstring); ``share`` = the part of ``||M||²``
    the rank-r path removes (the reducible output error it cancels, on the calibration inputs)."""
    G = G.to(torch.float64)
    G = (G + G.T) / 2
    mu = damping * float(G.diagonal().mean())
    scale, inv = eigen_scaling(G + mu * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
    Ca = upstream * C.to(torch.float64) + (1 - upstream) * G
    M = (W.to(torch.float64) @ Ca - Wc.to(torch.float64) @ G) @ inv.T
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    total = float((S * S).sum())
    share = float((S[:rank] ** 2).sum()) / total if total > 0 else 0.0
    B, A = _split(U, S, Vh, rank)
    return (B, A @ inv), share

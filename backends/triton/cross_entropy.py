"""Triton kernels of Cut Cross-Entropy (backends/ops/cross_entropy.py has the math).

Forward: one program per block of tokens walks the vocabulary in tiles; each logits tile is a
``tl.dot`` over the hidden dimension that lives in registers only, folded into an online
log-sum-exp and the label's logit. Backward: one program per (token block, vocabulary block)
recomputes its logits tile from the saved lse, forms G = g (softmax - onehot), skips the tile
when every |G| is below ``filter_eps`` (gradient filtering), and adds G W into dh and G^T h into
dW with fp32 atomics. Accumulation is in fp32; dh and dW are cast to the input dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.backends.triton.common import fp32_dots

BLOCK_N, BLOCK_V, BLOCK_D = 32, 64, 32


@triton.jit
def _logits_tile(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr):
    z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        h = tl.load(H + rows[:, None] * stride_h + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        if IEEE:
            z += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            z += tl.dot(h, tl.trans(w))
    return z


@triton.jit
def _forward_kernel(H, W, Y, LOSS, LSE, N, V, D, stride_h, stride_w, ignore_index,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(Y + rows, mask=rmask, other=ignore_index)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    picked = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logits_tile(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE)
        z = tl.where(cmask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        run_max = new_max
        picked += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    lse = run_max + tl.log(run_sum)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(LOSS + rows, tl.where(y != ignore_index, lse - picked, 0.0), mask=rmask)


@triton.jit
def _backward_kernel(H, W, Y, LSE, G, DH, DW, N, V, D, stride_h, stride_w, ignore_index,
                     filter_eps, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask, cmask = rows < N, cols < V
    y = tl.load(Y + rows, mask=rmask, other=ignore_index)
    g = tl.load(G + rows, mask=rmask, other=0.0).to(tl.float32)
    g = tl.where(y != ignore_index, g, 0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    z = _logits_tile(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_D, IEEE)
    grad = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    grad = tl.where(rmask[:, None] & cmask[None, :], grad * g[:, None], 0.0)
    if tl.max(tl.abs(grad)) >= filter_eps:  # gradient filtering (eps 0: keep every tile)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            h = tl.load(H + rows[:, None] * stride_h + ds[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            w = tl.load(W + cols[:, None] * stride_w + ds[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            if IEEE:
                dh = tl.dot(grad, w, input_precision="ieee")
                dw = tl.dot(tl.trans(grad), h, input_precision="ieee")
            else:
                dh = tl.dot(grad, w)
                dw = tl.dot(tl.trans(grad), h)
            tl.atomic_add(DH + rows[:, None] * D + ds[None, :], dh,
                          mask=rmask[:, None] & dmask[None, :])
            tl.atomic_add(DW + cols[:, None] * D + ds[None, :], dw,
                          mask=cmask[:, None] & dmask[None, :])


def forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
            filter_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = hidden.contiguous(), weight.contiguous()
    n, d = h.shape
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    _forward_kernel[(triton.cdiv(n, BLOCK_N),)](
        h, w, labels.contiguous(), loss, lse, n, w.shape[0], d, h.stride(0), w.stride(0),
        ignore_index, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        IEEE=fp32_dots(h.dtype))
    return loss, lse


def backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             grad_loss: torch.Tensor, ignore_index: int,
             filter_eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = hidden.contiguous(), weight.contiguous()
    n, d = h.shape
    v = w.shape[0]
    dh = torch.zeros(n, d, dtype=torch.float32, device=h.device)
    dw = torch.zeros(v, d, dtype=torch.float32, device=h.device)
    _backward_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V))](
        h, w, labels.contiguous(), lse.contiguous(), grad_loss.contiguous(), dh, dw, n, v, d,
        h.stride(0), w.stride(0), ignore_index, float(filter_eps or 0.0),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, IEEE=fp32_dots(h.dtype))
    return dh.to(hidden.dtype), dw.to(weight.dtype)

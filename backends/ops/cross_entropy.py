"""Cut Cross-Entropy: the LM loss ``CE(h @ W^T, y)`` without materialising the logits.

Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024). For SmolLM2's head
(vocabulary 49,152) a batch of 8 x 2,048 tokens has 3.2 GB of fp32 logits, and their gradient
as much again. Here the logits exist one (token block x vocabulary block) tile at a time:

    forward   lse_n = logsumexp_v (h_n . w_v)      online over vocabulary blocks
              loss_n = lse_n - h_n . w_{y_n}        (0 where y_n == ignore_index)
    backward  G_nv = g_n (softmax_nv - [v == y_n])  recomputed per tile from lse
              dh = G W,  dW = G^T h                 accumulated tile by tile

Gradient filtering (the paper's §4.3): a tile whose every |G| is below ``filter_eps`` adds
nothing a 16-bit result could show, and is skipped. Off (None) by default in fp32, so the
gradient is exact; ``2**-12`` (bf16's precision, the paper's choice) for 16-bit inputs.

``surgery::linear_cross_entropy`` and its backward are ``torch.library`` custom ops whose default
implementation is the chunked plain-PyTorch code below (the CPU path and the test oracle);
``surgery.backends.triton.cross_entropy`` registers the Triton kernels for CUDA tensors.
"""

from __future__ import annotations

import torch

from surgery.backends.ops.registry import Lazy, Op, register_op

TOKEN_BLOCK = 1024  # rows of h per tile on the CPU path
VOCAB_BLOCK = 4096  # columns of the logits per tile on the CPU path


def default_filter_eps(dtype: torch.dtype) -> float | None:
    """The paper's filter threshold for 16-bit inputs; exact gradients in fp32/fp64."""
    return 2.0 ** -12 if dtype in (torch.float16, torch.bfloat16) else None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per token, lse per token), both in the compute dtype; one tile of logits at a time."""
    cd = _compute_dtype(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    loss = torch.zeros(n, dtype=cd, device=hidden.device)
    lse = torch.zeros(n, dtype=cd, device=hidden.device)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    for a in range(0, n, TOKEN_BLOCK):
        h = hidden[a:a + TOKEN_BLOCK]
        rows = torch.arange(h.shape[0], device=h.device)
        y = safe[a:a + TOKEN_BLOCK]
        run_max = torch.full((h.shape[0],), float("-inf"), dtype=cd, device=h.device)
        run_sum = torch.zeros(h.shape[0], dtype=cd, device=h.device)
        picked = torch.zeros(h.shape[0], dtype=cd, device=h.device)
        for b in range(0, v, VOCAB_BLOCK):
            z = h.to(cd) @ weight[b:b + VOCAB_BLOCK].to(cd).T  # the only logits ever held
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + \
                torch.exp(z - new_max[:, None]).sum(dim=1)
            run_max = new_max
            inside = (y >= b) & (y < b + z.shape[1])
            picked += torch.where(inside, z[rows, (y - b).clamp(0, z.shape[1] - 1)], 0)
        lse[a:a + TOKEN_BLOCK] = run_max + torch.log(run_sum)
        loss[a:a + TOKEN_BLOCK] = torch.where(valid[a:a + TOKEN_BLOCK],
                                              lse[a:a + TOKEN_BLOCK] - picked, 0)
    return loss, lse


def backward_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int,
                       filter_eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dh, dL/dW) for dL/dloss_n = grad_loss_n, recomputing logits tile by tile."""
    cd = _compute_dtype(hidden)
    valid = labels != ignore_index
    g = torch.where(valid, grad_loss.to(cd), 0)
    safe = torch.where(valid, labels, 0)
    dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=cd, device=weight.device)
    n, v = hidden.shape[0], weight.shape[0]
    for a in range(0, n, TOKEN_BLOCK):
        h = hidden[a:a + TOKEN_BLOCK].to(cd)
        rows = torch.arange(h.shape[0], device=h.device)
        y, ga, la = safe[a:a + TOKEN_BLOCK], g[a:a + TOKEN_BLOCK], lse[a:a + TOKEN_BLOCK]
        for b in range(0, v, VOCAB_BLOCK):
            w = weight[b:b + VOCAB_BLOCK].to(cd)
            grad = torch.exp(h @ w.T - la[:, None])  # softmax of this tile
            inside = (y >= b) & (y < b + w.shape[0]) & (ga != 0)
            cols = (y - b).clamp(0, w.shape[0] - 1)
            grad[rows[inside], cols[inside]] -= 1.0
            grad *= ga[:, None]
            if filter_eps is not None and not bool((grad.abs() >= filter_eps).any()):
                continue  # nothing here a 16-bit gradient could show
            dh[a:a + TOKEN_BLOCK] += grad @ w
            dw[b:b + VOCAB_BLOCK] += grad.T @ h
    return dh.to(hidden.dtype), dw.to(weight.dtype)


@torch.library.custom_op("surgery::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int, filter_eps: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per token; ``filter_eps`` is only read by the backward."""
    return forward_reference(hidden, weight, labels, ignore_index)


@torch.library.custom_op("surgery::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(hidden: torch.Tensor, weight: torch.Tensor,
                                  labels: torch.Tensor, lse: torch.Tensor,
                                  grad_loss: torch.Tensor, ignore_index: int,
                                  filter_eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return backward_reference(hidden, weight, labels, lse, grad_loss, ignore_index, filter_eps)


@linear_cross_entropy.register_fake
def _(hidden, weight, labels, ignore_index, filter_eps):
    cd = _compute_dtype(hidden)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd)


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, labels, lse, grad_loss, ignore_index, filter_eps):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, filter_eps = inputs
    ctx.ignore_index, ctx.filter_eps = ignore_index, filter_eps
    ctx.save_for_backward(hidden, weight, labels, output[1])


def _backward(ctx, grad_loss, _grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    dh, dw = torch.ops.surgery.linear_cross_entropy_backward(
        hidden, weight, labels, lse, grad_loss, ctx.ignore_index, ctx.filter_eps)
    return dh, dw, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


def cut_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      ignore_index: int = -100, reduction: str = "mean",
                      filter_eps: float | None | str = "auto") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels)`` without the logits.

    ``hidden`` is (..., D), ``weight`` (V, D) (the LM head), ``labels`` (...) with
    ``ignore_index`` for positions without a target (already shifted for next-token
    prediction). ``reduction`` is "mean" (over non-ignored tokens, like F.cross_entropy), "sum"
    or "none". ``filter_eps="auto"`` picks :func:`default_filter_eps` for the input dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    eps = default_filter_eps(hidden.dtype) if filter_eps == "auto" else filter_eps
    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    loss, _ = torch.ops.surgery.linear_cross_entropy(h, weight, y, ignore_index, eps)
    if reduction == "none":
        return loss.reshape(shape).to(hidden.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(hidden.dtype)
    return (total / (y != ignore_index).sum()).to(hidden.dtype)


register_op(Op("linear_cross_entropy",
               reference=lambda h, w, y, ignore_index, filter_eps: forward_reference(h, w, y,
                                                                                 ignore_index),
               kernel=Lazy("surgery.backends.triton.cross_entropy:forward"),
               covers=lambda h, w, *rest: h.dtype in (torch.float32, torch.float16, torch.bfloat16)
               and w.dtype == h.dtype and h.shape[1] <= 4096))
register_op(Op("linear_cross_entropy_backward", reference=backward_reference,
               kernel=Lazy("surgery.backends.triton.cross_entropy:backward"),
               covers=lambda h, w, *rest: h.dtype in (torch.float32, torch.float16, torch.bfloat16)
               and w.dtype == h.dtype and h.shape[1] <= 4096))

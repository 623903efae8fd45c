"""Training losses of a causal LM: next-token cross-entropy (Cut Cross-Entropy or full logits)
and distillation (KL on temperature-softened logits, optional hidden-state MSE).

The model is split at its LM head: the decoder gives the last hidden states, and the head's
weight either meets them inside Cut Cross-Entropy (no (tokens x vocabulary) logits are held, the
loss of choice for a 49k vocabulary) or in a plain ``head(hidden)``. A head that is not a plain
bias-free Linear (an adapter on the head, a soft-capped model) always takes the full-logits path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.backends.ops.cross_entropy import cut_cross_entropy
from surgery.passapi import PassError


def cce_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=...)`` without the logits: the
    mean over positions whose label is not ``ignore_index``. ``labels`` are the targets of each
    position (already shifted for next-token prediction)."""
    return cut_cross_entropy(hidden, weight, labels, ignore_index=ignore_index)


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, head) of an HF causal LM."""
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder = get_dec() if callable(get_dec) else None
    head = get_head() if callable(get_head) else None
    if decoder is None or head is None:
        raise PassError(f"`train` trains causal language models; {type(model).__name__} has no "
                        "decoder and LM head", hint="train a Hugging Face *ForCausalLM model")
    return decoder, head


def plain_head_weight(model: nn.Module, head: nn.Module) -> torch.Tensor | None:
    """The head's weight when logits are exactly ``hidden @ W.T`` (what CCE computes)."""
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return None
    return head.weight


def hidden_states(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return decoder(input_ids=ids, use_cache=False).last_hidden_state


def lm_loss(model: nn.Module, ids: torch.Tensor, *, use_cce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss, last hidden states) of ``model`` on ``ids``."""
    decoder, head = split_model(model)
    h = hidden_states(decoder, ids)
    labels = ids[:, 1:]
    w = plain_head_weight(model, head) if use_cce else None
    if w is not None:
        return cce_loss(h[:, :-1], w, labels), h
    logits = head(h[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)), h


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden states) of the teacher, without gradients."""
    decoder, head = split_model(teacher)
    h = hidden_states(decoder, ids)
    return head(h), h


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, per token, times T^2
    (Hinton et al.: keeps gradient magnitudes comparable across temperatures)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def distill_loss(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, temperature: float,
                 kl: float, hidden_mse: float, ce: float, use_cce: bool) -> torch.Tensor:
    t_logits, t_hidden = teacher_outputs(teacher, ids)
    decoder, head = split_model(model)
    h = hidden_states(decoder, ids)
    total = h.new_zeros((), dtype=torch.float32)
    if kl:
        total = total + kl * kl_loss(head(h), t_logits, temperature)
    if hidden_mse:
        if t_hidden.shape != h.shape:
            raise PassError(f"hidden_mse needs hidden states of the same size; the teacher's are "
                            f"{tuple(t_hidden.shape)}, the student's {tuple(h.shape)}",
                            hint="use hidden_mse=0 with a teacher of another width")
        total = total + hidden_mse * F.mse_loss(h.float(), t_hidden.float())
    if ce:
        w = plain_head_weight(model, head) if use_cce else None
        labels = ids[:, 1:]
        if w is not None:
            part = cce_loss(h[:, :-1], w, labels)
        else:
            logits = head(h[:, :-1])
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        total = total + ce * part
    return total

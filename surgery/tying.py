"""One rule for "these tensors are the same weight" (tied embeddings, shared modules).

Two names are tied when they hold the same object, or views of the same memory with the same
layout (storage, offset, shape, stride, dtype): a ``state_dict`` detaches every entry into a new
tensor object, so object identity alone misses ``lm_head.weight is embed_tokens.weight`` there.
Tensors on the meta device (plan-time skeletons) and empty tensors have no memory to compare and
are tied only when they are the same object.

Used by saving (each storage written once), merging (tied tensors merged once and copied),
skeletons (aliases recorded) and pruning (refusing to prune half of a tied pair).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch


def _key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return ("memory", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def tied_groups(named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]
                ) -> list[list[str]]:
    """Groups of two or more names holding the same tensor, each in first-seen order.

    ``named`` is ``model.named_parameters(remove_duplicate=False)``, a state dict, or any
    (name, tensor) pairs. The tensors must stay alive while this runs (ids are compared).
    """
    items = named.items() if isinstance(named, Mapping) else named
    groups: dict[tuple, list[str]] = {}
    keep = []  # holds the tensors so no id is reused by a new object during the scan
    for name, t in items:
        keep.append(t)
        groups.setdefault(_key(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tied_names(named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]
               ) -> dict[str, str]:
    """alias -> the first name of its group (the canonical copy), for every tied name."""
    return {alias: group[0] for group in tied_groups(named) for alias in group[1:]}

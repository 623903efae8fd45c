"""The training loop behind `train`: deterministic data order, AdamW with warm-up and cosine
decay, gradient accumulation and clipping, progress, checkpoints and resume.

Everything that decides a step's update is a function of (seed, step): the batch (a per-epoch
permutation of the calibration windows, the evaluation split never touched), the learning rate
and the sparse-training phase. With the optimizer state and RNG in the checkpoint, a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from surgery.passapi import PassError
from surgery.passes.prune.sparse_linear import set_training_step
from surgery.seeding import name_seed

from . import checkpoint as ckpt
from .trainable import Trainable, mask_gradients, reapply_masks


def lr_at(step: int, total: int, lr: float, warmup: float, min_lr: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to
    ``min_lr * lr`` at the last step."""
    w = int(round(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    span = max(total - w - 1, 1)
    progress = min((step - w) / span, 1.0)
    return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


class DataOrder:
    """Sample indices of the calibration split: a fresh seeded permutation each epoch."""

    def __init__(self, samples: int, seed: int, key: str):
        self.samples, self.seed, self.key = samples, seed, key
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(name_seed(self.seed, self.key, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.samples, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Indices of the samples at global positions start .. start+count-1."""
        return [int(self._perm(j // self.samples)[j % self.samples])
                for j in range(start, start + count)]


@dataclass
class Settings:
    steps: int
    lr: float
    batch: int
    accumulate: int
    warmup: float
    min_lr: float
    weight_decay: float
    clip: float
    log_every: int
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    fingerprint: str = ""


@dataclass
class Outcome:
    log: list[dict[str, Any]] = field(default_factory=list)  # every log_every steps
    resumed_from: int = 0
    seconds: float = 0.0
    tokens: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")


# Test hook: called after each optimizer step (and its checkpoint) with the step count reached.
# Tests raise from it to simulate a run killed mid-training.
after_step: Callable[[int], None] | None = None


def run(model: nn.Module, train: Trainable, tokens: torch.Tensor, loss_fn, cfg: Settings, *,
        seed: int, key: str, progress) -> Outcome:
    """Train ``train.params`` of ``model`` for ``cfg.steps`` optimizer steps on ``tokens``
    (samples x seqlen); ``loss_fn(model, ids)`` gives the scalar loss of a micro-batch."""
    opt = torch.optim.AdamW(train.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.999), eps=1e-8)
    order = DataOrder(tokens.shape[0], seed, key)
    out = Outcome()
    start = _resume(cfg, train, opt, out, progress)
    per_step = cfg.batch * cfg.accumulate
    seq_tokens = cfg.batch * tokens.shape[1]
    model.train()
    t0 = time.perf_counter()
    with progress.task("training", total=cfg.steps) as task:
        if start:
            task.advance(start)
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.accumulate):
                set_training_step(model, step)  # one schedule step per optimizer step
                idx = order.indices(step * per_step + micro * cfg.batch, cfg.batch)
                loss = loss_fn(model, tokens[idx])
                if not torch.isfinite(loss):
                    raise PassError(f"the loss is {float(loss)} at step {step + 1}",
                                    hint="lower lr= or raise clip=; check the data")
                (loss / cfg.accumulate).backward()
                total += float(loss.detach()) / cfg.accumulate
            mask_gradients(train)
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(train.params, cfg.clip)
            opt.step()
            reapply_masks(train)
            done = step + 1
            out.tokens += seq_tokens * cfg.accumulate
            if step == start:
                out.first_loss = total
            out.last_loss = total
            if done % cfg.log_every == 0 or done == cfg.steps or step == 0:
                out.log.append({"step": done, "loss": round(total, 6), "lr": lr})
            elapsed = time.perf_counter() - t0
            task.describe(f"training: loss {total:.4f}, "
                          f"{out.tokens / max(elapsed, 1e-9):,.0f} tokens/s")
            task.advance()
            if cfg.checkpoint_every and cfg.checkpoint_dir is not None and \
                    (done % cfg.checkpoint_every == 0) and done < cfg.steps:
                ckpt.save(cfg.checkpoint_dir, fp=cfg.fingerprint, step=done,
                          params=dict(zip(train.names, train.params)),
                          optimizer=opt.state_dict(), log=out.log)
            if after_step is not None:
                after_step(done)
    model.eval()
    out.seconds = time.perf_counter() - t0
    return out


def _resume(cfg: Settings, train: Trainable, opt, out: Outcome, progress) -> int:
    """Restore the newest checkpoint of this run, if any; the step to start at."""
    d = cfg.checkpoint_dir
    if not cfg.checkpoint_every or d is None or not d.exists():
        return 0
    meta = ckpt.read_meta(d)
    if meta is None:
        return 0
    if meta.get("fingerprint") != cfg.fingerprint:
        raise PassError(f"`{d}` holds a checkpoint of another training run",
                        hint="delete the directory, or give this run its own with "
                             "checkpoint=\"DIR\"", code="E0343")
    state = ckpt.load(d)
    with torch.no_grad():
        for name, p in zip(train.names, train.params):
            p.copy_(state["params"][name])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    out.log = list(state["log"])
    out.resumed_from = int(state["step"])
    progress.log(f"resuming training from the checkpoint at step {out.resumed_from} in {d}")
    return out.resumed_from

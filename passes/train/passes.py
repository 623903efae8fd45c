"""`train SEL|adapters on DATA for N steps using lm(...)|distill(...)`: healing in the script.

The state rules are declared on the pass, not coded in it: a quantized layer is accepted only
together with an adapter (QLoRA: the adapter trains, the packed base stays frozen), a lowered
one not at all (backend kernels have no backward). What a target trains is decided by its state
(surgery.passes.train.trainable). Masks stay exact: a scheduled sparse layer is finalised to its
N:M mask after the last step and every masked target is checked afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch.nn as nn

from surgery.passes.adapters.layers import AdapterLayer
from surgery.passapi import (ORIGINAL, ORIGINAL_MODEL, OUTPUT, SCRIPT, Granularity, ModulePass, PassError, PassResult,
                             RunContext, State, StepReport)
from surgery.passes.prune.masks import is_nm
from surgery.passes.prune.sparse_linear import SparseLinear, check_masks, finalize_layer
from surgery.registry import register

from . import checkpoint as ckpt
from . import loop
from .losses import distill_loss, lm_loss
from .params import DistillParams, LmParams, TrainParams, declaration_problems
from .trainable import collect, freeze_except, is_train_leaf, restore_flags


TRAIN_REFUSALS = {
    State.QUANTIZED: "a quantized layer trains only through an adapter (QLoRA): `adapt` it "
                     "first, then `train adapters`",
    State.LOWERED: "lowered kernels have no backward pass; train before `lower`",
}


class TrainPass(ModulePass):
    verb = "train"
    Params: ClassVar[type[TrainParams]] = TrainParams
    granularity = Granularity.MODEL  # every step runs the whole model forward and backward
    accepts = frozenset({State.MASKED, State.ADAPTED, State.SWAPPED, State.MERGED,
                         State.QUANTIZED})
    accepts_only_with = {State.QUANTIZED: frozenset({State.ADAPTED})}
    refusals = TRAIN_REFUSALS
    statement_fields = frozenset({"data", "steps"})

    @classmethod
    def check_declarations(cls, params, program):
        return declaration_problems(params, program)

    leaf_types = (nn.Linear, nn.Embedding, AdapterLayer)  # named in messages; is_leaf decides

    def is_leaf(self, module: nn.Module) -> bool:
        return is_train_leaf(module)

    def estimate_memory(self, modules):  # AdamW: gradient + two moments per trained parameter
        return 3 * 4 * self.affected_parameters(modules)

    # -- the loss -----------------------------------------------------------------------------
    def loss_fn(self, ctx: RunContext):
        raise NotImplementedError

    # -- running --------------------------------------------------------------------------------
    def apply(self, ctx: RunContext, targets: dict[str, nn.Module]) -> PassResult:
        p: TrainParams = self.params
        model = ctx.model
        train = collect(model, targets)
        if not train.params:
            raise PassError("nothing to train: the selected modules have no trainable parameters",
                            code="E0340")
        data = ctx.dataset(p.data)
        if data.calibration.shape[0] < p.batch:
            raise PassError(f"data `{p.data}` has {data.calibration.shape[0]} samples, fewer "
                            f"than one batch of {p.batch}", code="E0341")
        loss_fn = self.loss_fn(ctx)
        settings = self._settings(ctx, train)
        before = self._perplexity(ctx, model, data) if p.evaluate else None
        flags = freeze_except(model, train)
        try:
            outcome = loop.run(model, train, data.calibration, loss_fn, settings, seed=ctx.seed,
                               key=f"train:{ctx.line}", progress=ctx.progress)
        finally:
            restore_flags(model, flags)
            model.eval()
        finalised = 0
        for path in train.scheduled:
            mod = model.get_submodule(path)
            if isinstance(mod, SparseLinear):
                finalize_layer(mod)
                finalised += 1
        if settings.checkpoint_dir is not None:
            ckpt.remove(settings.checkpoint_dir)  # done: a rerun starts over
        report = self._report(targets, train, outcome, finalised, data)
        if before is not None:
            report.metrics["perplexity_before"] = round(before, 4)
            report.metrics["perplexity_after"] = round(self._perplexity(ctx, model, data), 4)
        return self.result(ctx, report)

    @staticmethod
    def _perplexity(ctx: RunContext, model: nn.Module, data) -> float:
        from surgery.evaluate import perplexity

        with ctx.progress.task(f"perplexity on `{data.name}`'s evaluation split"):
            return perplexity(model, data.evaluation)

    def _settings(self, ctx: RunContext, train) -> loop.Settings:
        p: TrainParams = self.params
        directory = None
        if p.checkpoint_every:
            if p.checkpoint:
                directory = Path(p.checkpoint)
            else:
                out = ctx.extras.get(OUTPUT)
                if out is None:
                    raise PassError("checkpoint_every needs a place for the checkpoints",
                                    hint='give checkpoint="DIR", or `save` the result (the '
                                         'checkpoints go beside it)')
                directory = Path(f"{str(out).rstrip('/')}.train-line{ctx.line}.ckpt")
            directory.parent.mkdir(parents=True, exist_ok=True)
        script = ctx.extras.get(SCRIPT, "")
        fp = ckpt.fingerprint(script, ctx.line, ctx.seed, train.names,
                              [tuple(t.shape) for t in train.params])
        return loop.Settings(steps=p.steps, lr=p.lr, batch=p.batch, accumulate=p.accumulate,
                             warmup=p.warmup, min_lr=p.min_lr, weight_decay=p.weight_decay,
                             clip=p.clip, log_every=p.log_every,
                             checkpoint_every=p.checkpoint_every, checkpoint_dir=directory,
                             fingerprint=fp)

    def _report(self, targets, train, outcome: loop.Outcome, finalised: int, data) -> StepReport:
        p: TrainParams = self.params
        report = StepReport(modules=len(targets), parameters=train.count)
        report.metrics.update({
            "steps": p.steps, "trained_parameters": train.count,
            "loss_first": round(outcome.first_loss, 6), "loss_last": round(outcome.last_loss, 6),
            "tokens": outcome.tokens, "seconds": round(outcome.seconds, 1),
            "tokens_per_second": round(outcome.tokens / max(outcome.seconds, 1e-9), 1),
            "loss_log": outcome.log, "resumed_from": outcome.resumed_from,
            "sparse_layers_finalised": finalised})
        kinds: dict[str, int] = {}
        for k in train.kinds.values():
            kinds[k] = kinds.get(k, 0) + 1
        report.notes.append(f"trained {train.count:,} parameters in {len(targets)} module(s) "
                            "(" + ", ".join(f"{n} x {k}" for k, n in kinds.items()) + ")")
        report.notes.append(f"{p.steps} steps x {p.batch * p.accumulate} sequences of "
                            f"{data.seqlen} tokens from `{p.data}` (its evaluation split held out)")
        if outcome.resumed_from:
            report.notes.append(f"resumed from the checkpoint at step {outcome.resumed_from}")
        if finalised:
            report.notes.append(f"{finalised} sparse-training layer(s) finalised to their exact "
                                "N:M masks")
        return report

    def ensures(self, model, targets, result):
        bad = check_masks(model)
        for path in targets:
            mod = model.get_submodule(path)
            if isinstance(mod, SparseLinear) and mod.n and not is_nm(mod.weight_mask, mod.n, mod.m):
                bad.append(path)
        if bad:
            raise PassError(f"internal: training left inexact masks in {bad[0]}", module=bad[0])


@register
class TrainLm(TrainPass):
    method = "lm"
    summary = "next-token cross-entropy (Cut Cross-Entropy by default), AdamW + warm-up + cosine"
    Params = LmParams
    is_default = True

    def loss_fn(self, ctx: RunContext):
        use_cce = self.params.loss == "cce"
        return lambda model, ids: lm_loss(model, ids, use_cce=use_cce)[0]


@register
class TrainDistill(TrainPass):
    method = "distill"
    summary = "distil from the original model or a declared one: KL on logits (+ hidden MSE)"
    Params = DistillParams

    def loss_fn(self, ctx: RunContext):
        p: DistillParams = self.params
        teacher = self._teacher(ctx)
        teacher.eval()
        use_cce = p.loss == "cce"
        return lambda model, ids: distill_loss(model, teacher, ids, temperature=p.temperature,
                                               kl=p.kl, hidden_mse=p.hidden_mse, ce=p.ce,
                                               use_cce=use_cce)

    def _teacher(self, ctx: RunContext) -> nn.Module:
        name = self.params.teacher
        if name in ctx.models and name != ORIGINAL:
            return ctx.models[name]
        if name == ORIGINAL and ORIGINAL_MODEL in ctx.extras:
            return ctx.extras[ORIGINAL_MODEL]
        raise PassError(f"teacher `{name}` is not available to this run",
                        hint="use teacher=original or a model declared with `model NAME = ...`")

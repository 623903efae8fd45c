"""`lower OPS to triton [in SEL]`: run ops on the Triton kernels, behind an equivalence gate.

The pass finds the sites of the requested ops in the selected modules (sites.py), installs the
lowered forwards, then runs every site on captured inputs with the reference path and with the
kernels and compares the outputs with a tolerance for the output dtype. A mismatch undoes the whole
step and fails with the numbers; it never passes silently.

Without a CUDA GPU the statement is refused at plan time (``check_module``). ``cuda_available``
is a module attribute so tests can replace it and run the kernels in Triton's CPU interpreter
(``TRITON_INTERPRET=1`` and :func:`surgery.passes.lower.runtime.interpret_on_cpu`).
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from torch.utils._pytree import tree_leaves

from surgery.backends.ops.registry import lowerable_ops
from surgery.modelcall import ModelKind
from surgery.passapi import (MachineProblem, ModulePass, PassError, PassParams, RunContext, State,
                             StepReport)
from surgery.passes.lower import runtime, sites
from surgery.registry import register

KNOWN_OPS = lowerable_ops()  # from the op records (backends/ops/*: Op.sites)

# Allowed max |lowered - reference| relative to max |reference|, by output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-3,
             torch.bfloat16: 3e-2}

NO_GPU = MachineProblem("lowering to triton needs a CUDA GPU; none is available")
NO_TRITON = MachineProblem("lowering to triton needs the triton package",
                           hint="pip install 'surgery[triton]'")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class LowerParams(PassParams):
    ops: list[str]
    softmax_algorithm: Literal["fused", "online", "two_pass"] = "fused"
    data: str | None = None  # a `data` name: the gate runs on its inputs (random ids without)
    samples: int = Field(2, ge=1, le=64)  # calibration sequences the gate runs
    check: bool = True  # run the equivalence gate

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("name at least one op to lower")
        for op in ops:
            if op not in KNOWN_OPS:
                close = difflib.get_close_matches(op, KNOWN_OPS, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise ValueError(f"unknown op `{op}`{hint} (known: {', '.join(KNOWN_OPS)})")
        return list(dict.fromkeys(ops))


@register
class LowerTriton(ModulePass):
    statement_fields = frozenset({"ops"})
    verb = "lower"
    method = "triton"
    summary = "run StableMax, softplus attention, softmax and int4/int8 matmul on Triton kernels"
    Params = LowerParams
    accepts = frozenset(State)  # lowering changes how ops run, never the weights
    produces = frozenset({State.LOWERED})

    def check_module(self, path: str, module: nn.Module) -> str | None:
        if not triton_installed():
            return NO_TRITON
        if not cuda_available():
            return NO_GPU
        return None

    def affected_parameters(self, modules: dict[str, nn.Module]) -> int:
        return 0

    # -- running ------------------------------------------------------------------------------
    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> StepReport:
        if not triton_installed():
            raise PassError(NO_TRITON)
        if not (cuda_available() or runtime.interpreting_on_cpu()):
            raise PassError(NO_GPU, hint="run on a machine with a CUDA GPU")
        import surgery.backends.triton  # noqa: F401 - registers the CUDA kernels
        from surgery.backends.triton import registry

        found = self._sites(modules)
        if not found:
            raise PassError(f"no {', '.join(self.params.ops)} found in the selected modules",
                            hint=self._where_hint())
        inputs = self._inputs(ctx, found) if self.params.check else {}
        report = StepReport()
        installed: list[tuple[str, nn.Module, Any]] = []
        kept: dict[str, list[str]] = {}
        with ctx.progress.task("lower to triton", total=len(found)) as task:
            for path, (module, kind, ops) in found.items():
                saved = module.__dict__.get("forward")
                ref = None
                if self.params.check:
                    with registry.reference_only():  # the oracle never runs a kernel
                        ref = self._run(module, inputs.get(path))
                marker = sites.install(module, kind, ops, self.params.softmax_algorithm)
                installed.append((path, module, saved))
                if self.params.check:
                    out = self._run(module, inputs[path])
                    try:
                        stats = self._compare(path, ops, ref, out, marker)
                    except PassError:
                        for _, m, s in reversed(installed):
                            sites.uninstall(m, s)
                        raise
                    if marker.counts.kernel == 0:  # nothing of these ops runs here
                        sites.uninstall(module, saved)
                        installed.pop()
                        task.advance()
                        continue
                    report.per_module[path] = stats
                kept[path] = ops
                task.advance()
        if not kept:
            raise PassError(f"no {', '.join(self.params.ops)} call runs in the selected modules",
                            hint=self._where_hint())
        report.modules = len(kept)
        by_op: dict[str, int] = {}
        for ops in kept.values():
            for op in ops:
                by_op[op] = by_op.get(op, 0) + 1
        report.metrics["lowered"] = by_op
        if report.per_module:
            report.metrics["max_rel_diff"] = max(s["rel_diff"] for s in report.per_module.values())
            fallbacks = sum(s["fallback_calls"] for s in report.per_module.values())
            if fallbacks:
                report.notes.append(f"{fallbacks} call(s) used the reference path (mask or "
                                    "options the kernel does not cover)")
        if not self.params.check:
            report.notes.append("equivalence gate skipped (check=false)")
        return report

    def _where_hint(self) -> str:
        return ("int4_linear/int8_linear need quantized modules, stablemax/softplus_attention "
                "need swapped attention (or calls of those ops), softmax needs softmax calls")

    def _sites(self, modules: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, str, list]]:
        ops = set(self.params.ops)
        out: dict[str, tuple[nn.Module, str, list]] = {}
        for path, mod in modules.items():
            for sub, m in mod.named_modules(prefix=path):
                hit = sites.site_kind(m, ops)
                if hit and hit[0] != "generic" and sub not in out:
                    out[sub] = (m, hit[0], hit[1])
        generic_ops = ops & {"softmax", "log_stablemax"}
        if "stablemax" in ops and not any("stablemax" in v[2] for v in out.values()):
            generic_ops.add("stablemax")
        if generic_ops:
            paths = sorted(modules, key=lambda p: p.count("."))
            for path in paths:
                top = not any(path.startswith(o + ".") or o == "" for o in paths if o != path)
                if top and path not in out:
                    out[path] = (modules[path], "generic", sorted(generic_ops))
        return out

    # -- the gate -----------------------------------------------------------------------------
    def _inputs(self, ctx: RunContext, found: dict) -> dict[str, tuple[list, dict]]:
        """Each site's inputs from one model run: on calibration data when given, else on
        random token ids (language models); other models get synthetic per-site inputs."""
        targets = {p: v[0] for p, v in found.items()}
        gen = torch.Generator().manual_seed(ctx.seed)
        if self.params.data is not None:
            ids = ctx.dataset(self.params.data).calibration[: self.params.samples]
            return _capture(ctx.model, targets, ids)
        if ModelKind.of(ctx.model).takes_ids:
            ids = torch.randint(0, ctx.model.config.vocab_size, (self.params.samples, 16),
                                generator=gen)
            return _capture(ctx.model, targets, ids)
        return {path: _synthesise(module, kind, gen, self.params.samples, path)
                for path, (module, kind, _) in found.items()}

    @staticmethod
    def _run(module: nn.Module, inp: tuple[list, dict] | None):
        args, kwargs = inp
        with torch.no_grad():
            return module(*args, **kwargs)

    def _compare(self, path: str, ops: list[str], ref, out, marker) -> dict[str, Any]:
        worst_abs, worst_rel, worst_tol, dtype = 0.0, 0.0, 0.0, None
        for r, o in zip(tree_leaves(ref), tree_leaves(out)):
            if not (isinstance(r, torch.Tensor) and isinstance(o, torch.Tensor)):
                continue
            if not r.is_floating_point():
                continue
            tol = TOLERANCE.get(r.dtype, 1e-4)
            rf, of = r.detach().double(), o.detach().double()
            nan_bad = bool((rf.isnan() != of.isnan()).any())
            finite = ~(rf.isnan() | of.isnan())
            diff = (rf - of).abs()[finite].max().item() if finite.any() else 0.0
            peak = rf.abs()[finite].max().item() if finite.any() else 0.0
            rel = diff / max(peak, 1e-12) if diff else 0.0
            if nan_bad:
                rel = float("inf")
            if rel >= worst_rel:
                worst_abs, worst_rel, worst_tol, dtype = diff, rel, tol, r.dtype
        if worst_rel > worst_tol:
            name = str(dtype).removeprefix("torch.")
            raise PassError(
                f"lowered {', '.join(ops)} in `{path}` does not match the reference: "
                f"max |diff| {worst_abs:.3g} (relative {worst_rel:.3g}) exceeds the {name} "
                f"tolerance {worst_tol:g}", module=path,
                hint="the Triton kernel is wrong for these inputs; this step was undone")
        return {"ops": ops, "max_abs_diff": worst_abs, "rel_diff": worst_rel,
                "kernel_calls": marker.counts.kernel, "fallback_calls": marker.counts.fallback}


def _capture(model: nn.Module, targets: dict[str, nn.Module], ids: torch.Tensor) -> dict:
    from surgery.passes.attention.swap import capture_inputs

    seen = capture_inputs(model, targets, ids)
    missing = [p for p in targets if p not in seen]
    if missing:
        raise PassError(f"`{missing[0]}` did not run on the calibration data, so the lowering "
                        "cannot be checked", module=missing[0],
                        hint="select modules the model's forward calls")
    return seen


def _synthesise(module: nn.Module, kind: str, gen: torch.Generator, batch: int,
                path: str) -> tuple[list, dict]:
    if kind == "quant":
        x = torch.randn(batch, 7, module.in_features, generator=gen)
        return [x.to(device=module.scales.device, dtype=module.dtype)], {}
    from surgery.passes.attention.swap import CannotSynthesise, example_inputs

    try:
        return example_inputs(module, length=13)
    except CannotSynthesise as e:
        raise PassError(f"cannot build example inputs for `{path}` to check the lowering: {e}",
                        module=path, hint="pass data=NAME so the gate runs on captured inputs")

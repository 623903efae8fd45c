"""Executing a plan out of core: one pass over the checkpoint, unit by unit (schedule.py), the
output written shard by shard into an atomic directory (writer.py), in the checkpoint's dtype.

Every step runs the same pass code as in memory, on a model whose units not in use are on the
meta device; so a streamed run gives the weights an in-memory run gives, bit for bit, as long as
the compute dtype is the same (fp32 by default: tensors are upcast when onloaded and written back
in their stored dtype).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery import distributed, expectations, registry
from surgery.atomic import atomic_dir
from surgery.binder import Plan, PlanRow
from surgery.diagnostics import Diagnostic, SurgeryError, error
from surgery.executor.checkpoint import Checkpoint
from surgery.executor.multistep import Sweep
from surgery.executor.residency import Resident, Unit, empty_model, plan_units
from surgery.executor.schedule import Stages, stages
from surgery.executor.writer import DEFAULT_SHARD, ShardWriter
from surgery.passapi import PassError, RunContext, StepReport
from surgery.progress import Progress


class _NoWriter:
    """The shard writer of a rank that does not write (distributed runs: rank 0 writes)."""

    parts: list = []

    def add(self, name, t) -> None:
        pass

    def finish(self) -> list[str]:
        return []

    def abort(self) -> None:
        pass


@dataclass
class StreamOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # float dtype of the output (default: the stored one)
    max_shard_bytes: int = DEFAULT_SHARD
    max_memory: int | None = None  # host budget in bytes
    max_device_memory: int | None = None


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MERGE_BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows merged at a time


def _merge_rows(shape: tuple) -> int | None:
    """Rows per block for merging a tensor of ``shape`` in slices; None when it is small enough
    to merge whole (or has no rows to split)."""
    numel = 1
    for d in shape:
        numel *= d
    if len(shape) < 2 or 4 * numel <= MERGE_BLOCK_BYTES:
        return None
    return max(1, MERGE_BLOCK_BYTES // (4 * (numel // shape[0])))


def _inside(path: str, unit: Unit) -> bool:
    return any(path == p or path.startswith(p + ".") or not p for p in unit.paths)


class _Reports:
    """One StepReport per plan row, added up over the units it ran on."""

    def __init__(self):
        self.reports: dict[int, StepReport] = {}
        self.seconds: dict[int, float] = {}
        self.weights: dict[int, dict[str, float]] = {}

    def add(self, row: PlanRow, rep: StepReport, seconds: float) -> None:
        agg = self.reports.setdefault(row.line, StepReport())
        self.seconds[row.line] = self.seconds.get(row.line, 0.0) + seconds
        agg.modules += rep.modules
        agg.parameters += rep.parameters
        agg.per_module.update(rep.per_module)
        agg.notes += [n for n in rep.notes if n not in agg.notes]
        w = self.weights.setdefault(row.line, {})
        for k, v in rep.metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                agg.metrics[k] = v
            elif isinstance(v, int):  # counts (bytes, modules) add up
                agg.metrics[k] = agg.metrics.get(k, 0) + v
            else:  # ratios and means: weighted by the parameters of each unit
                n = max(rep.parameters, 1)
                seen = w.get(k, 0.0)
                w[k] = seen + n
                # one report (a calibrated step's) keeps its value exactly: v * n / n may not
                agg.metrics[k] = v if not seen else (agg.metrics[k] * seen + v * n) / w[k]


class StreamRunner:
    """Runs a bound plan on the subject's checkpoint without materialising the model."""

    def __init__(self, program, plan: Plan, subject_dir: Path, *, seed: int = 0,
                 progress: Progress | None = None, options: StreamOptions | None = None,
                 model_dirs: dict[str, Path] | None = None):
        self.program = program
        self.plan = plan
        self.dir = Path(subject_dir)
        self.seed = seed
        self.progress = progress or Progress()
        self.opt = options or StreamOptions()
        self.model_dirs = model_dirs or {}
        self.reports = _Reports()
        self.stats: dict[str, Any] = {}
        self.evaluator = None  # executor/evaluate.py, when the script has `expect` statements

    # -- setup ----------------------------------------------------------------------------------
    def _setup(self, rows: list[PlanRow]) -> None:
        from surgery.models import read_config
        from surgery.passes.calib.engine import find_blocks

        self.config = read_config(self.dir)
        self.ck = Checkpoint(self.dir)
        self.model = empty_model(self.config)
        self.model.config._name_or_path = str(self.dir)  # as from_pretrained records it
        leaf_paths = [p for p, m in self.model.named_modules() if not m._modules]
        _, self.blocks = find_blocks(self.model, leaf_paths)
        self.units = plan_units(self.model, self.blocks)
        self.res = Resident(self.model, self.ck, self.opt.device, torch.float32)
        steps = [r for r in rows if r.step is not None]
        self.stages: Stages = stages(steps, self.blocks, self.program,
                                     bool(self.program.expectations))
        stored = {k: self.ck.torch_dtype(k) for k in self.ck.names()}
        for alias, key in self.res.aliases.items():
            stored[alias] = stored[key]
        if self.opt.dtype is not None:
            stored = {k: (self.opt.dtype if d.is_floating_point else d) for k, d in stored.items()}
        self.stored = stored
        self.merge_cks = {n: Checkpoint(d) for n, d in self.model_dirs.items()}

    # -- running ---------------------------------------------------------------------------------
    def run(self, output: str | None):
        from surgery import emit
        from surgery.models import LoadedModel, load_tokenizer
        from surgery.runner import (RunReport, StepRecord, _with_output, load_data)

        t_start = time.perf_counter()
        rows = _with_output(self.plan.steps, output)
        self._setup(rows)
        save = self.stages.save
        if save is None:
            raise error("E0802", "a streamed run writes its result as it goes and needs an "
                                 "output: add `save \"DIR\"` or pass -o DIR")
        tokenizer = load_tokenizer(self.dir)
        data = load_data(self.program, tokenizer) if self.program.data else {}
        subject = LoadedModel(self.model, self.plan.subject_source, tokenizer, self.config,
                              list(self.ck.files))
        report = RunReport(self.plan)
        loaded = {"subject": subject}
        prov = emit.Provenance(self.plan, self.seed, emit.input_hashes(loaded), data,
                               report.steps, report.expectations, tokenizer)
        self.ctx = RunContext(model=self.model, models={}, data=data, progress=self.progress,
                              seed=self.seed, extras={emit.PROVENANCE: prov})
        if self.program.expectations:
            self._start_evaluator(data)
        path = Path(str(save.step.params.path))
        from surgery.outputs import check_output

        check_output(self.program, str(path), self.model, claim=distributed.is_writer(),
                     dtypes=self.stored)
        # distributed calibration (surgery.distributed): only rank 0 writes
        with atomic_dir(path) if distributed.is_writer() else contextlib.nullcontext() as tmp:
            self._open_writers(tmp)
            try:
                self._execute()
                if self.evaluator is not None:  # E0800 here: the directory is not published
                    report.expectations += expectations.judge(self.program,
                                                              self.evaluator.measured())
                distributed.agree()  # every rank succeeded before rank 0 publishes
            except BaseException:  # the atomic directory is discarded; close the open shard
                self.main.abort()
                self.extra.abort()
                raise
            files = self._finish_writers(tmp)
            for row in self.stages.tensor_rows + self.stages.calibrated:
                report.steps.append(StepRecord(
                    row.line, row.text, row.step.verb, row.step.method,
                    self.reports.seconds.get(row.line, 0.0),
                    self.reports.reports.get(row.line, StepReport())))
            report.steps.sort(key=lambda s: s.line)
            if tmp is not None:
                self._write_meta(tmp, prov, tokenizer, files)
        report.outputs.append(str(path))
        report.steps.append(StepRecord(save.line, save.text, "save", save.step.method, 0.0,
                                       StepReport(metrics={"path": str(path)})))
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats.update(seconds=time.perf_counter() - t_start, peak_rss_bytes=peak_rss(),
                          cpu_seconds=ru.ru_utime + ru.ru_stime,
                          units=len(self.units), blocks=len(self.blocks))
        if self.opt.device.type == "cuda":
            self.stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.opt.device)
        from surgery.runner import Result

        return Result(self.model, report)

    def _execute(self) -> None:
        outside = [u for u in self.units if not u.is_block]
        by_path = {u.name: u for u in self.units}
        ev = self.evaluator
        with self.progress.task("streaming", total=len(self.units)) as task:
            self._task = task
            if ev is not None:
                ev.start_original()
            if not self.stages.calibrated:
                if ev is not None:
                    ev.start_result()
                for unit in self.units if ev is None else [u for u in self.units if u.is_block]:
                    if self._untouched(unit) and ev is None:  # the evaluator runs every block
                        self._passthrough(unit)
                        continue
                    self._process(unit)
                    self._finish(unit)
                if ev is None:
                    return
            else:
                hooks = self._lazy_onload(outside)
                try:
                    Sweep(self, self.stages.calibrated, by_path, hooks).run()
                finally:
                    for h in hooks:
                        h.remove()
            if ev is not None:
                with self.progress.task("checking expectations"):
                    ev.end()
            for unit in outside:  # what the calibration forward never needed
                if not getattr(unit, "_loaded", False) and self._untouched(unit):
                    self._passthrough(unit)
                elif not getattr(unit, "_done", False):
                    self._process(unit, upto=len(self.stages.calibrated) - 1)
                    self._finish(unit)

    def _lazy_onload(self, units: list[Unit]):
        """Modules outside the blocks (embeddings ...) are onloaded when a forward first calls
        them, so the calibration capture reads only what it runs."""
        hooks = []
        for unit in units:
            for p in unit.paths:
                mod = self.model.get_submodule(p) if p else self.model

                def pre(module, args, unit=unit):
                    if getattr(unit, "_loaded", False):
                        return
                    if self._untouched(unit):
                        self._onload_stored(unit)
                    else:  # with the TENSOR steps up to the calibrated step capturing now
                        self._process(unit, upto=self._capturing)
                hooks.append(mod.register_forward_pre_hook(pre))
        return hooks

    def _start_evaluator(self, data) -> None:
        from surgery.executor.evaluate import StreamEvaluator

        def prepare(unit: Unit) -> None:  # a touched unit in its final form
            if not getattr(unit, "_loaded", False):
                self._process(unit)
            self._complete(unit)
        self.evaluator = StreamEvaluator(self.program, self.model, self.res, self.units,
                                         self.blocks, data, untouched=self._untouched,
                                         prepare=prepare, finish=self._finish)

    def _onload_stored(self, unit: Unit) -> None:
        """Onload a unit no step transforms in its stored dtype, its float outputs cast to the
        compute dtype: the same values as an upcast copy (an embedding lookup of bf16 rows, then
        the cast, equals the lookup of the upcast table), at half the memory for a bf16
        checkpoint. A tied 128256 x 2048 embedding is 0.53 GB in bf16 against 1.05 GB in fp32."""
        self.res.onload(unit, stored=True)
        unit._loaded = True
        dtype = self.res.dtype

        def cast(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                return output.to(dtype)
            return output
        unit._cast_hooks = [(self.model.get_submodule(p) if p else self.model)
                            .register_forward_hook(cast) for p in unit.paths]

    # -- one unit ------------------------------------------------------------------------------
    def _untouched(self, unit: Unit) -> bool:
        """No step acts on ``unit`` (and it is not a block of the calibrated step)."""
        from surgery.executor.schedule import is_streamable_merge

        for row in self.stages.tensor_rows:
            if is_streamable_merge(row.step.pass_cls, row.step.params):
                return False
            if any(_inside(p, unit) for p in row.modules):
                return False
        return not (unit.is_block and bool(self.stages.calibrated))

    def _passthrough(self, unit: Unit) -> None:
        """Copy an untouched unit from the checkpoint to the output tensor by tensor, in its
        stored dtype (no upcast: its values are what the in-memory run writes back)."""
        from surgery.deploy import hf_dir

        names: list[str] = []
        for path in unit.paths:
            mod = self.model.get_submodule(path) if path else self.model
            prefix = f"{path}." if path else ""
            names += [prefix + k for k in mod.state_dict(keep_vars=True)]
        for name in names:
            if name not in self.ck:  # a tied alias of a stored tensor
                self.aliases[name] = self.res.key(name)
                continue
            t = hf_dir.stored({name: self.ck.read(name)}, self.stored)[name]
            self.main.add(name, t)
            del t
        unit._loaded = unit._done = True
        self._task.advance()

    def _process(self, unit: Unit, upto: int = 0) -> None:
        """Onload ``unit`` and run the TENSOR steps before the first calibrated step on it (with
        ``upto`` = j, also those between the calibrated steps up to step j)."""
        self.res.onload(unit)
        unit._loaded = True
        if self.evaluator is not None and unit.is_block:  # as in the checkpoint
            self.evaluator.feed("original", unit.name)
        for j in range(upto + 1):
            self._tensor_group(j, unit)

    def _tensor_group(self, j: int, unit: Unit) -> None:
        """The TENSOR steps after calibrated step j - 1 and before step j, on ``unit``."""
        for row in self.stages.groups[j]:
            self._tensor_step(row, unit)

    def _complete(self, unit: Unit) -> None:
        """Run the TENSOR steps after the last calibrated one on ``unit`` (once)."""
        if not getattr(unit, "_completed", False):
            unit._completed = True
            self._tensor_group(len(self.stages.groups) - 1, unit)

    def _finish(self, unit: Unit) -> None:
        """Run the TENSOR steps after the last calibrated one, write the unit, offload it."""
        if getattr(unit, "_keep", False):  # the evaluator needs it again at the end
            return
        t0 = time.perf_counter()
        self._complete(unit)
        if self.evaluator is not None and unit.is_block:  # after every step
            self.evaluator.feed("result", unit.name)
        self._write_unit(unit)
        self.res.offload(unit)
        for h in getattr(unit, "_cast_hooks", []):
            h.remove()
        unit._done = True
        from surgery.passes.merge.stream import _release_freed_memory

        _release_freed_memory()
        if unit.is_block:
            self.stats.setdefault("block_seconds", []).append(time.perf_counter() - t0)
        self._task.advance()

    def _tensor_step(self, row: PlanRow, unit: Unit) -> None:
        from surgery.executor.schedule import is_streamable_merge

        step = row.step
        t0 = time.perf_counter()
        if is_streamable_merge(step.pass_cls, step.params):
            rep = self._merge_unit(row, unit)
        else:
            targets = {p: self.model.get_submodule(p) for p in row.modules if _inside(p, unit)}
            if not targets:
                return
            pass_obj = step.pass_cls(step.params)
            ctx = dataclasses.replace(self.ctx, line=step.line)
            rep = self._guard(row, lambda: pass_obj.run(ctx, targets)).report
        self.reports.add(row, rep, time.perf_counter() - t0)

    def _merge_unit(self, row: PlanRow, unit: Unit) -> StepReport:
        """A parameter-space merge on one unit: each tensor merged from the models'
        checkpoints, as the in-memory merge does on their state dicts."""
        from surgery.passes.merge.common import tensor_kinds

        p = row.step.params
        merger = row.step.pass_cls.merger_cls(p, seed=self.seed)
        base = self.merge_cks.get(p.base) if p.base else None
        cks = [self.merge_cks[n] for n in p.models]
        if not hasattr(self, "_kinds"):
            self._kinds = tensor_kinds(self.model)
        n_merged = 0
        seen: dict[int, torch.Tensor] = {}
        for path in unit.paths:
            root = self.model.get_submodule(path) if path else self.model
            for mpath, mod in root.named_modules(prefix=path):
                for name, cur in list(mod._parameters.items()) + list(mod._buffers.items()):
                    if cur is None or (name in mod._buffers
                                       and name in mod._non_persistent_buffers_set):
                        continue
                    if id(cur) in seen:
                        new = seen[id(cur)]
                    else:
                        full = f"{mpath}.{name}" if mpath else name
                        t, merged = self._merged(merger, full, self.res.key(full), base, cks,
                                                 p.exclude)
                        n_merged += merged
                        new = nn.Parameter(t, requires_grad=False) \
                            if name in mod._parameters else t
                        seen[id(cur)] = new
                    if name in mod._parameters:
                        mod._parameters[name] = new
                    else:
                        mod._buffers[name] = new
        return StepReport(modules=len(cks), parameters=n_merged,
                          metrics={"models": list(p.models), "base": p.base,
                                   "method": row.step.method})

    def _merged(self, merger, full: str, key: str, base, cks, exclude) -> tuple[torch.Tensor, int]:
        """One tensor of a merge, in the compute dtype, and how many elements were merged. A
        large tensor of an elementwise method is merged a block of rows at a time, read in
        slices: the models' full-size copies never exist together (an 8B embedding is 2.1 GB
        in fp32 per model)."""
        from surgery.passes.merge.taskvec import is_mergeable

        ref = base or cks[0]
        kind = self._kinds.get(full, "other")
        dtype = ref.torch_dtype(key)
        shape = ref.entries[key].shape
        rows = _merge_rows(shape)
        if merger.elementwise and rows and is_mergeable(full, torch.empty(0, dtype=dtype),
                                                          exclude):
            out = None
            for a in range(0, shape[0], rows):
                read = lambda ck: self.res._convert(  # noqa: E731
                    ck.read_rows(key, a, a + rows))  # noqa: B023 - used in this iteration
                b = read(base) if base is not None else None
                part = merger.merge(full, b, [read(c) for c in cks], kind)
                if out is None:
                    out = torch.empty(shape, dtype=part.dtype, device=part.device)
                out[a:a + rows] = part
                del part, b
            return out, out.numel()
        read = lambda ck: self.res._convert(ck.read(key))  # noqa: E731
        b = read(ref)
        if not is_mergeable(full, b, exclude):
            return b, 0
        # without a base the reference is the first model: read it once
        ts = [b if c is ref else read(c) for c in cks]
        t = merger.merge(full, b if base is not None else None, ts, kind)
        return t, t.numel()

    def _guard(self, row: PlanRow, fn):
        try:
            return fn()
        except PassError as e:
            step = row.step
            where = f" (module `{e.module}`)" if e.module else ""
            code = e.code or "E0801"  # a pass may name a more specific code (E0912 ...)
            raise SurgeryError(Diagnostic(code, f"{step.verb} using {step.method} failed"
                                          f"{where}: {e.message}", step.stmt.span, help=e.hint,
                                          source=self.program.source))

    # -- output --------------------------------------------------------------------------------
    def _open_writers(self, tmp: Path) -> None:
        from surgery.deploy import hf_dir

        final = self.plan.result if self.plan.result is not None else self.model
        self.layout, self.converted, self.refusals = hf_dir.classify(
            final, registry.surgery_modules(final), hf=hf_dir._is_hf(self.model))
        if self.refusals:  # a surgery-only layout converts nothing (as hf_dir.view writes it)
            self.converted = {}
        stem = "surgery" if self.layout == "surgery-only" else "model"
        if tmp is None:  # a rank other than 0: computes the same blocks, writes nothing
            self.main = self.extra = _NoWriter()
            self.aliases = {}
            return
        self.main = ShardWriter(tmp, stem, self.opt.max_shard_bytes)
        self.extra = ShardWriter(tmp, "surgery", self.opt.max_shard_bytes)
        self.aliases: dict[str, str] = {}

    def _write_unit(self, unit: Unit) -> None:
        from surgery.deploy import hf_dir
        from surgery.tying import tied_names

        state = self.res.state(unit)
        aliases = tied_names(state)
        self.aliases.update(aliases)
        tensors = {k: v.detach() for k, v in state.items() if k not in aliases}
        extras: dict[str, torch.Tensor] = {}
        if self.layout != "surgery-only":
            mods = {p: i for p, i in registry.surgery_modules(self.model).items()
                    if _inside(p, unit)}
            v = hf_dir.view(self.model, tensors, mods)
            tensors, extras = v.tensors, v.extras
        for k in sorted(tensors):  # cast one tensor at a time: no second copy of the unit
            t = hf_dir.stored({k: tensors.pop(k)}, self.stored)[k]
            self.main.add(k, t.cpu())
            del t
        for k in sorted(extras):
            self.extra.add(k, extras[k].cpu())

    def _finish_writers(self, tmp: Path) -> list[str]:
        files = self.main.finish()
        if self.extra.parts:
            files += self.extra.finish()
        return files

    def _write_meta(self, tmp: Path, prov, tokenizer, files: list[str]) -> None:
        from surgery import emit
        from surgery.deploy import hf_dir

        hf_dir.write_config(tmp, hf_dir.output_config(self.model, self.layout, self.stored))
        if self.layout == "compressed-tensors":
            hf_dir.write_quantization(tmp, self.model, self.converted)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        record: dict[str, Any] = {"layout": self.layout, "files": files,
                                  "converted": dict(sorted(self.converted.items()))}
        if self.refusals:  # why the layout is surgery-only, as an in-memory save records it
            record["no_standard_form"] = dict(sorted(self.refusals.items()))
        full = {**emit.manifest(prov), "format_version": emit.FORMAT_VERSION,
                "versions": emit.versions(), "modules": registry.surgery_modules(self.model),
                "aliases": self.aliases, "base": emit._base_info(self.model), "weights": record}
        (tmp / emit.MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))

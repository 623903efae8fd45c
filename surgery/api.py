"""The Python API: compile a script, check it, plan it against a model, apply it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch.nn as nn

from surgery import ast
from surgery.binder import Plan, bind
from surgery.check import CheckedProgram, check
from surgery.diagnostics import SurgeryError, attach_source
from surgery.models import LoadedModel, load_skeleton, remote_code
from surgery.outputs import check_output
from surgery.outputs import release as release_output
from surgery.parser import gc_paused, parse
from surgery.progress import Progress
from surgery.runner import Result, Runner, given_models, load_models, plan_for, subject_for
from surgery.source import SourceFile


class Program:
    """A parsed script. ``check`` / ``plan`` / ``apply`` run the compiler stages."""

    def __init__(self, text: str, name: str = "<script>"):
        self.text = text
        self.name = name
        self.source = SourceFile(text, name)
        self.ast: ast.ScriptNode = parse(text, name)
        self._checked: CheckedProgram | None = None

    def check(self) -> CheckedProgram:
        """Static checks: names, methods, parameters. Raises SurgeryError."""
        if self._checked is None:
            with gc_paused():  # the AST is long-lived: no cyclic-GC rescans while checking it
                self._checked = check(self.ast, self.source)
        return self._checked

    def plan(self, model: str | nn.Module | LoadedModel | None = None, *,
             models: dict | None = None, trust_remote_code: bool = False) -> Plan:
        """Bind to a model (default: the script's model, as a weightless skeleton). ``models``
        gives other declared models by name (see ``apply``)."""
        with remote_code(trust_remote_code):
            return self._plan(model, models)

    def _plan(self, model, given: dict | None = None) -> Plan:
        checked = self.check()
        # A structural skeleton (no model code imported) serves unless a pass's plan-time checks
        # run the model's forward.
        structural = not any(step.pass_cls.plan_needs_code for step in checked.steps)
        subject = subject_for(checked, model, skeleton=not isinstance(model, (nn.Module,
                                                                             LoadedModel)),
                              structural=structural)
        models = {checked.subject.name: subject.model} if checked.subject else {}
        models.update({n: lm.model for n, lm in given_models(checked, given).items()})
        for name, decl in checked.models.items():
            if name not in models:
                try:
                    models[name] = load_skeleton(decl.source, structural=structural).model
                except SurgeryError as e:  # locate it at its own declaration
                    raise attach_source(e, checked.source, decl.span) from None
        plan = bind(checked, subject.model, subject_source=subject.source,
                    skeleton=subject.is_skeleton, models=models)
        # Output path, parent writability and free space against the model's size: known now.
        check_output(checked, checked.save_path, subject.model, dtypes=subject.stored_dtypes)
        return plan

    def apply(self, model: str | nn.Module | LoadedModel | None = None, *, seed: int = 0,
              output: str | Path | None = None, progress: Progress | None = None,
              trust_pickle: bool = False, inplace: bool = False,
              trust_remote_code: bool = False, models: dict | None = None,
              device: str | None = None, dtype: str | None = None, stream: str = "off",
              max_memory: int | str | None = None, max_device_memory: int | str | None = None,
              max_shard_size: int | str | None = None,
              spill_activations: str | Path | None = None) -> Result:
        """Run the script on ``model`` (default: load the script's model) and return the new
        model in ``Result.model``. A module you pass in is copied first and never modified,
        unless ``inplace=True`` (no copy: less memory, and your module is edited). ``models``
        gives other declared models by name, e.g. the models a merge reads:
        ``models={"b": module_b}`` instead of loading ``model b = "..."`` (never modified).
        Outputs are written only if every expectation holds.

        Big models (docs/scale.md): ``stream="on"`` runs out of core, block by block, on
        ``device`` ("cpu", "cuda", "cuda:N"), writing the output as it goes (``Result.model`` is
        then the model's meta-device skeleton); ``"auto"`` streams when the in-memory estimate
        exceeds ``max_memory`` (or the available RAM). ``dtype`` ("bf16", "fp16", "fp32")
        overrides the output's float dtype (default: the checkpoint's).
        ``spill_activations`` (a directory) keeps the calibration activations on disk there
        instead of in memory; a streamed run does so by itself (next to the output) when only
        that makes ``max_memory`` fit. Models given as modules
        (``model`` or ``models``) are in memory already, so they never stream."""
        from surgery.executor import options as xopt
        from surgery.passes.calib.spill import spilling

        opts = xopt.resolve(self, device=device, dtype=dtype, stream=stream,
                            max_memory=max_memory, max_device_memory=max_device_memory,
                            max_shard_size=max_shard_size, spill_activations=spill_activations)
        if (opts.wants_stream_check and not models
                and not isinstance(model, (nn.Module, LoadedModel))):
            with remote_code(trust_remote_code):
                done = xopt.try_stream(self, model, opts, seed=seed, output=output,
                                       progress=progress)
            if done is not None:
                return done
        checked = self.check()
        if not inplace and models:
            models = {n: copy.deepcopy(m) if isinstance(m, nn.Module) else m
                      for n, m in models.items()}
        if not inplace and isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        elif not inplace and isinstance(model, LoadedModel):
            model = dataclasses.replace(model, model=copy.deepcopy(model.model))
        with remote_code(trust_remote_code):
            subject = subject_for(checked, model, skeleton=False, trust_pickle=trust_pickle)
        runner = Runner(checked, seed=seed, progress=progress, trust_pickle=trust_pickle,
                        dtype=opts.dtype, max_shard_bytes=opts.max_shard_bytes)
        out = str(output) if output is not None else None
        try:
            with remote_code(trust_remote_code):
                loaded = load_models(checked, subject, progress=runner.progress,
                                     trust_pickle=trust_pickle,
                                     given=given_models(checked, models))
                with spilling(opts.spill_activations):  # explicit only: in memory it fits
                    return runner.run(plan_for(checked, loaded), loaded, output=out)
        finally:
            release_output(out or checked.save_path)  # the runner's claim on the output

    def to_text(self) -> str:
        from surgery.printer import to_text

        return to_text(self.ast)


def compile(text_or_path: str | Path) -> Program:
    """Parse a script given as text or as a path to a .surg file."""
    p = Path(text_or_path) if not isinstance(text_or_path, Path) else text_or_path
    if isinstance(text_or_path, Path) or (
            "\n" not in str(text_or_path) and str(text_or_path).endswith(".surg")):
        from surgery.scriptfile import read_script

        return Program(read_script(p), str(p))
    return Program(str(text_or_path))


def apply(model: str | nn.Module | LoadedModel | None, text: str, **kwargs) -> Result:
    """Compile ``text`` and apply it to ``model``."""
    return compile(text).apply(model, **kwargs)

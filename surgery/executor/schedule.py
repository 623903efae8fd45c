"""Which plan steps stream, and in what order: steps are grouped by their declared
``Granularity`` (surgery/passapi.py).

A streamed run makes one pass over the checkpoint, unit by unit (a unit is a block, or a
weight-holding module outside the blocks):

- TENSOR steps before the calibrated step run on each unit as it is onloaded;
- at most one BLOCK step (GPTQ, SparseGPT, Wanda ...) drives the order of the blocks through the
  layer-sequential calibration engine; its targets must lie inside the repeated blocks;
- TENSOR steps after it run on each unit before it is written;
- `save` writes each unit as it is finished.

This is the same order of operations as the in-memory run (every step over the whole model, one
after another): a TENSOR step on one unit never reads another unit, and the calibrated step sees
block i's input computed from blocks < i after every earlier step, exactly as in memory.
What does not stream is refused at plan time with E0902, naming the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.binder import PlanRow
from surgery.diagnostics import Diagnostic, SurgeryError
from surgery.passapi import Granularity

# the `expect` metrics the streamed evaluator computes block by block (executor/evaluate.py)
STREAMED_METRICS = ("perplexity", "max_abs_diff", "cosine")


@dataclass
class Stages:
    before: list[PlanRow] = field(default_factory=list)
    block: PlanRow | None = None
    after: list[PlanRow] = field(default_factory=list)
    save: PlanRow | None = None

    @property
    def tensor_rows(self) -> list[PlanRow]:
        return self.before + self.after


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def is_streamable_merge(pass_cls, params) -> bool:
    from surgery.passes.merge.common import MergePass, TensorMerger

    if not issubclass(pass_cls, MergePass):
        return False
    merger = getattr(pass_cls, "merger_cls", TensorMerger)
    return merger is not TensorMerger and getattr(params, "scope", "per_tensor") == "per_tensor"


def stages(rows: list[PlanRow], blocks: list[str], program, has_expectations: bool) -> Stages:
    """Group ``rows`` (the plan's steps, output rows included) or raise E0902/E0903."""
    from surgery.passapi import ModelPass

    out = Stages()
    diags: list[Diagnostic] = []
    for row in rows:
        step = row.step
        cls = step.pass_cls
        name = f"`{step.verb} using {step.method}`"
        if cls.is_output:
            if step.verb == "save":
                out.save = row
            else:
                diags.append(Diagnostic("E0902", f"{name} needs the whole model in memory and "
                                                 "cannot run in a streamed run", step.stmt.span,
                                        help="run with --stream off on a machine with enough "
                                             "memory, or export from the saved output"))
            continue
        if cls.granularity is Granularity.MODEL or (
                issubclass(cls, ModelPass) and not is_streamable_merge(cls, step.params)):
            diags.append(Diagnostic("E0902", f"{name} needs the whole model at once and cannot "
                                             "be streamed", step.stmt.span,
                                    help="run with --stream off (it then needs the whole model "
                                         "in memory; `surgery plan` shows the estimate)"))
            continue
        if cls.granularity is Granularity.BLOCK:
            if out.block is not None:
                diags.append(Diagnostic(
                    "E0902", "a streamed run takes one calibrated (per-block) step; this is the "
                             f"second, after line {out.block.line}", step.stmt.span,
                    help="split the script in two runs (save, then load the output), or use "
                         "--stream off"))
                continue
            outside = [p for p in row.modules if not any(_inside(p, b) for b in blocks)]
            if outside:
                diags.append(Diagnostic(
                    "E0902", f"{name} calibrates `{outside[0]}`, which is outside the repeated "
                             "blocks; a streamed run calibrates block by block", step.stmt.span,
                    help="exclude it from the selector (e.g. `- modules(\"lm_head\")`), or use "
                         "--stream off"))
                continue
            out.block = row
            continue
        (out.after if out.block is not None else out.before).append(row)
    for exp in program.expectations if has_expectations else []:
        if exp.metric not in STREAMED_METRICS:  # executor/evaluate.py advances these by block
            diags.append(Diagnostic(
                "E0903", f"`expect {exp.metric}(...)` is not evaluated in a streamed run; "
                         f"{', '.join(STREAMED_METRICS)} are", exp.stmt.span,
                help="check the saved output in a separate run, or use --stream off"))
    if has_expectations and not blocks:
        diags.append(Diagnostic(
            "E0903", "`expect` in a streamed run advances its metrics block by block, and this "
                     "model has no repeated blocks", program.expectations[0].stmt.span,
            help="check the saved output in a separate run, or use --stream off"))
    if diags:
        raise SurgeryError(diags).with_source(program.source)
    return out

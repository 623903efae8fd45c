"""Which plan steps stream, and in what order: steps are grouped by their declared
``Granularity`` (surgery/passapi.py).

A streamed run makes one pass over the checkpoint, unit by unit (a unit is a block, or a
weight-holding module outside the blocks):

- TENSOR steps before the first calibrated step run on each unit as it is onloaded;
- the BLOCK steps (GPTQ, SparseGPT, Wanda ...) drive the order of the blocks through the
  layer-sequential calibration engine, each with its own stream of block inputs, block by block
  in script order (executor/multistep.py); their targets must lie inside the repeated blocks;
- the TENSOR steps between two calibrated steps run on each unit between them;
- TENSOR steps after the last calibrated step run on each unit before it is written;
- `save` writes each unit as it is finished.

This is the same order of operations as the in-memory run (every step over the whole model, one
after another): a TENSOR step on one unit never reads another unit, and each calibrated step sees
block i's input computed from blocks < i after every earlier step and its own transform, exactly
as in memory. What does not stream is refused at plan time with E0902, naming the step.
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
    calibrated: list[PlanRow] = field(default_factory=list)  # the BLOCK steps, in script order
    # between[j]: the TENSOR steps after calibrated[j] and before calibrated[j + 1]
    between: list[list[PlanRow]] = field(default_factory=list)
    after: list[PlanRow] = field(default_factory=list)
    save: PlanRow | None = None

    @property
    def block(self) -> PlanRow | None:
        """The first calibrated step (None: the run has none)."""
        return self.calibrated[0] if self.calibrated else None

    @property
    def groups(self) -> list[list[PlanRow]]:
        """The TENSOR steps cut by the calibrated ones: group j runs after calibrated step j - 1
        (group 0 before the first, the last group after the last)."""
        return [self.before, *self.between, self.after]

    @property
    def tensor_rows(self) -> list[PlanRow]:
        return [r for g in self.groups for r in g]


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
        why = cls.stream_refusal(step.params)
        if why:
            diags.append(Diagnostic("E0902", f"{name} cannot be streamed: {why}", step.stmt.span,
                                    help="run with --stream off"))
            continue
        if cls.granularity is Granularity.BLOCK:
            outside = [p for p in row.modules if not any(_inside(p, b) for b in blocks)]
            if outside:
                diags.append(Diagnostic(
                    "E0902", f"{name} calibrates `{outside[0]}`, which is outside the repeated "
                             "blocks; a streamed run calibrates block by block", step.stmt.span,
                    help="exclude it from the selector (e.g. `- modules(\"lm_head\")`), or use "
                         "--stream off"))
                continue
            if out.calibrated:
                out.between.append(out.after)
                out.after = []
            out.calibrated.append(row)
            continue
        (out.after if out.calibrated else out.before).append(row)
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

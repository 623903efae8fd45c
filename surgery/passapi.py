"""The contract between the compiler and a transformation pass.

A pass is a small typed unit: a verb (``quantize``, ``prune`` ...), a method name (``rtn``,
``wanda`` ...), a pydantic ``Params`` model, the module states it accepts and produces, and an
``apply`` that returns a :class:`PassResult` (the model after the step and a :class:`StepReport`).
``Pass.run`` owns the lifecycle: preconditions, ``apply``, postconditions. Passes never print and
never touch the CLI; they report progress through ``ctx.progress``.

Registering::

    @register
    class Int8Rtn(ModulePass):
        verb = "quantize"; method = "rtn"
        class Params(PassParams): ...

Third-party packages expose passes through the ``surgery.passes`` entry-point group; each entry
point names a module (or a Pass class) that is imported, which registers its passes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterable, final,
                    get_args, get_origin)

from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from surgery.data import Dataset
    from surgery.progress import Progress


class State(str, enum.Enum):
    """Tags a module carries after surgery. A dense module has none."""

    MASKED = "masked"  # pruned; its sparsity mask is kept and must be preserved
    QUANTIZED = "quantized"  # weights stored as packed integers
    ADAPTED = "adapted"  # adapter attached
    SWAPPED = "attention-swapped"  # attention normaliser replaced
    LOWERED = "lowered"  # ops replaced by backend kernels
    MERGED = "merged"  # weights produced by a model merge
    COMPENSATED = "compensated"  # a low-rank path cancels the compression error (EoRA)


def _non_empty_path(value: str) -> str:
    if not value.strip():
        raise ValueError("path must not be empty")
    return value


# An output path of a `save` or `export` statement.
OutputPath = Annotated[str, AfterValidator(_non_empty_path)]


class PassParams(BaseModel):
    """Base for every pass's parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class NM(BaseModel):
    """An N:M sparsity pattern: N weights kept in every M consecutive input weights."""

    model_config = ConfigDict(frozen=True)
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


class Percent(BaseModel):
    """A percentage written `50%` (value 50.0)."""

    model_config = ConfigDict(frozen=True)
    value: float

    @property
    def fraction(self) -> float:
        return self.value / 100.0

    def __str__(self) -> str:
        return f"{self.value:g}%"


class CallValue(BaseModel):
    """A nested call used as a value, e.g. `init=eva(data=calib, rho=2)`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    kwargs: dict[str, Any] = {}


# A parameter that names a `data` declaration is annotated `DataRef` (or `DataRef | None`): the
# checker verifies the name and `RunContext.dataset` looks it up. Detection is by annotation only.
DATA_REF = "surgery:data-ref"
DataRef = Annotated[str, DATA_REF]

# A parameter that names a declared model, or the word `original` (the subject as loaded, before
# any step), is annotated `ModelRef`: the checker verifies the name (E0342).
MODEL_REF = "surgery:model-ref"
ORIGINAL = "original"
ModelRef = Annotated[str, MODEL_REF]

# RunContext.extras keys the runner fills: the subject before any step (when a parameter names
# `original`), the output path of the run, and the script text.
ORIGINAL_MODEL = "surgery:original-model"
OUTPUT = "surgery:output"
SCRIPT = "surgery:script"


def _names_data(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return DATA_REF in annotation.__metadata__
    return any(_names_data(a) for a in get_args(annotation))


@dataclass
class StepReport:
    """What one statement did, for the CLI, the manifest and the Python API."""

    modules: int = 0
    parameters: int = 0  # parameters affected
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers worth showing
    notes: list[str] = field(default_factory=list)
    per_module: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Files a step wants written beside the saved artifact (name -> bytes, e.g. a PNG chart);
    # `save` writes them into its directory. Not part of the JSON report.
    files: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "parameters": self.parameters,
            "metrics": self.metrics,
            "notes": self.notes,
            "per_module": self.per_module,
        }


@dataclass
class DeclarationProblem:
    """A `Pass.check_declarations` finding: ``field`` names the parameter to point at."""

    code: str
    message: str
    field: str | None = None
    hint: str | None = None


class Problem(str):
    """A `check_module` reason with a help line for the `PassError` that `Pass.run` raises."""

    hint: str | None = None

    def __new__(cls, text: str, hint: str | None = None):
        obj = super().__new__(cls, text)
        obj.hint = hint
        return obj


class ShapeProblem(Problem):
    """A `check_module` reason about sizes (a group or block that does not divide a dimension).
    Reported as E0402; a plain string reason is E0401 (the module cannot take this pass)."""


class MachineProblem(Problem):
    """A `check_module` reason about this machine (no GPU, a missing package), not the modules:
    reported once per statement as E0803, with ``hint`` as the help line."""

    def __new__(cls, text: str, hint: str = "run this step on a machine with a CUDA GPU"):
        return super().__new__(cls, text, hint)


class PassError(Exception):
    """Raised by a pass for a problem the user caused (bad shapes, missing data ...).

    ``module`` names the offending module path (if any) and ``hint`` becomes the help line. The
    compiler attaches the statement's location. ``code`` is the diagnostic code (default E0801,
    "pass failed") for a failure with its own explanation in docs/errors.
    """

    def __init__(self, message: str, *, module: str | None = None, hint: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.module = module
        self.hint = hint
        self.code = code  # a more precise diagnostic code than E0801 (pass failed), if any


class Granularity(str, enum.Enum):
    """How a pass touches the model, for an executor that cannot hold it all in memory."""

    TENSOR = "tensor"  # each target's tensors on their own (RTN, magnitude, merges, saving)
    BLOCK = "block"  # block by block with calibration activations (GPTQ, Wanda, EVA ...)
    MODEL = "model"  # the whole model at once (ONNX export, lowering, PLeaS)


@dataclass
class PassResult:
    """What a pass returns: the model after the step (often the same object) and its report."""

    model: "nn.Module"
    report: StepReport


# -- which states a module carries, detected on the module itself ---------------------------------
# One table, filled by the family that produces each state (quantize registers QuantLinear ...).
# MERGED has no structural trace, so it has no detector and is tracked by the plan only.
_DETECTORS: dict[State, Callable[["nn.Module"], bool]] = {}


def register_state(state: State, detect: Callable[["nn.Module"], bool]) -> None:
    """Declare how to recognise a module that carries ``state`` (called by its producer)."""
    _DETECTORS[state] = detect


def carried_states(module: "nn.Module") -> set[State]:
    """The states ``module`` carries, detected at run time from its type and marker children."""
    from surgery import registry

    registry.ensure_loaded()  # the producers register their detectors when imported
    return {st for st, detect in _DETECTORS.items() if detect(module)}


def detectable(state: State) -> bool:
    from surgery import registry

    registry.ensure_loaded()
    return state in _DETECTORS


@dataclass
class RunContext:
    """Everything a pass may use while it runs. The runner builds one per step; a pass returns
    its model in :class:`PassResult` instead of assigning ``ctx.model``."""

    model: "nn.Module"  # the subject model as the previous step left it
    models: dict[str, "nn.Module"]  # every declared model by name (merges read these)
    data: dict[str, "Dataset"]  # loaded data declarations by name
    progress: "Progress"
    seed: int = 0
    line: int = 0  # the statement's line, for messages
    model_sources: dict[str, str] = field(default_factory=dict)  # name -> "zoo:..."/"hf:..."
    extras: dict[str, Any] = field(default_factory=dict)

    def dataset(self, ref: str | None) -> "Dataset":
        if ref is None:
            raise PassError("this method needs calibration data", hint="pass data=NAME")
        return self.data[str(ref)]


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement ``apply``.

    The lifecycle is owned here (torch.fx ``PassBase`` style): :meth:`run` checks every target
    with ``check_module`` (the same check the plan ran), calls ``apply``, then checks the
    postconditions: the pass's own :meth:`ensures` and the generic one, that every target now
    carries each produced state and none of the consumed ones.
    """

    verb: ClassVar[str]
    method: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[PassParams]] = PassParams
    # How the pass touches the model (every registered pass declares it).
    granularity: ClassVar[Granularity]
    # Module states this pass may be applied on top of (a dense module has no state).
    accepts: ClassVar[frozenset[State]] = frozenset()
    # States a module must already have (e.g. `merge adapters` requires ADAPTED).
    requires: ClassVar[frozenset[State]] = frozenset()
    # States added to / removed from every target module.
    produces: ClassVar[frozenset[State]] = frozenset()
    consumes: ClassVar[frozenset[State]] = frozenset()
    # Accepted states that are accepted only together with others: {QUANTIZED: {ADAPTED}} lets
    # `train` reach a quantized layer through its adapter (QLoRA) but never directly. Refused
    # otherwise, with the reason from ``refusals``.
    accepts_only_with: ClassVar[dict[State, frozenset[State]]] = {}
    # Why a given state is refused, for the diagnostic (state -> reason).
    refusals: ClassVar[dict[State, str]] = {}
    # Params fields the statement itself fills (`to int4` -> format); must equal what the verb
    # table (surgery/verbs.py) says the verb fills.
    statement_fields: ClassVar[frozenset[str]] = frozenset()
    is_default: ClassVar[bool] = False  # used when the statement names no method
    is_output: ClassVar[bool] = False  # writes a file (export, save): runs after expectations
    # Plan-time checks run the model's own code (tracing its forward), so planning must build
    # the real architecture rather than a structural skeleton (surgery/skeleton.py).
    plan_needs_code: ClassVar[bool] = False
    # A BLOCK pass that collects per-layer statistics (Hessians, activation norms) from its
    # calibration data; False for one that only runs the blocks (the attention swap's trace):
    # the memory estimate (surgery/executor/memory.py) counts neither Hessians nor data for it.
    collects_statistics: ClassVar[bool] = True

    @classmethod
    def stream_refusal(cls, params: PassParams) -> str | None:
        """Why this step, with these parameters, cannot run in a streamed run (one block
        resident at a time, surgery/executor); None when its granularity says it all."""
        return None

    def __init__(self, params: PassParams):
        self.params = params

    @classmethod
    def model_fields_named(cls) -> list[str]:
        """Names of parameters annotated `ModelRef` (a declared model or `original`)."""
        return [name for name, f in cls.Params.model_fields.items() if MODEL_REF in f.metadata]

    @classmethod
    def data_fields(cls) -> list[str]:
        """Names of parameters annotated `DataRef` (they name `data` declarations)."""
        return [name for name, f in cls.Params.model_fields.items()
                if DATA_REF in f.metadata or _names_data(f.annotation)]

    # -- the lifecycle ------------------------------------------------------------------------
    @final
    def run(self, ctx: RunContext, targets: dict[str, "nn.Module"], *,
            planned: bool = False) -> PassResult:
        """requires -> apply -> ensures. ``targets`` are the plan's modules in ``ctx.model``.

        ``planned=True``: the plan already ran ``check_module`` on the targets as they will be
        when this step reaches them, and ``targets`` are not that yet (a step of a streamed
        sweep: its targets are meta modules the earlier steps have not transformed yet; they do
        so block by block), so the requires check is the plan's."""
        for path, module in ({} if planned else targets).items():
            reason = self.check_module(path, module)
            if reason:
                raise PassError(str(reason), module=path, hint=getattr(reason, "hint", None))
        result = self.apply(ctx, targets)
        if not isinstance(result, PassResult):
            raise TypeError(f"{type(self).__name__}.apply must return a PassResult, "
                            f"not {type(result).__name__}")
        self._ensure_states(result.model, targets, result)
        self.ensures(result.model, targets, result)
        return result

    @classmethod
    def check_declarations(cls, params: PassParams, program: Any) -> list[DeclarationProblem]:
        """Check-time problems of ``params`` against the script's declarations (``program`` is
        the CheckedProgram so far: its ``data`` and ``models``). Default: none."""
        return []

    def check_module(self, path: str, module: "nn.Module") -> str | None:
        """Precondition on one target (works on meta tensors): the reason it cannot be applied,
        or None. Shape and divisibility checks belong here. Plan and run both call it."""
        return None

    def check_targets(self, targets: dict[str, "nn.Module"]) -> "Problem | None":
        """Precondition on the targets taken together (a budget over all of them, a count of
        blocks), run at plan time after every `check_module` passed. A returned Problem may
        carry a `code` (default E0401)."""
        return None

    def apply(self, ctx: RunContext, targets: dict[str, "nn.Module"]) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: "nn.Module", targets: dict[str, "nn.Module"],
                result: PassResult) -> None:
        """The pass's own postcondition on ``model`` after ``apply``; raise PassError if broken."""

    def produced_on(self, targets: dict[str, "nn.Module"], result: PassResult) -> list[str]:
        """Paths that must carry the produced states after ``apply`` (default: every target)."""
        return list(targets)

    def _ensure_states(self, model: "nn.Module", targets: dict[str, "nn.Module"],
                       result: PassResult) -> None:
        for path in self.produced_on(targets, result):
            have = carried_states(model.get_submodule(path))
            for st in self.produces:
                if detectable(st) and st not in have:
                    raise PassError(f"internal: `{self.verb} using {self.method}` left "
                                    f"`{path}` without the {st.value} state it promises",
                                    module=path)
            for st in self.consumes & have:
                raise PassError(f"internal: `{self.verb} using {self.method}` left "
                                f"`{path}` {st.value}", module=path)

    # -- the plan ---------------------------------------------------------------------------
    def rewrite_skeleton(self, model: "nn.Module", targets: dict[str, "nn.Module"],
                         models: dict[str, "nn.Module"]) -> "nn.Module":
        """Apply this step's structural effect to the plan's meta-device copy of the model
        (``models`` holds every declared model's skeleton) and return it. Default: no change.
        Later selectors resolve against the result, exactly as they will at run time."""
        return model

    def estimate_memory(self, modules: dict[str, "nn.Module"]) -> int:
        """Extra bytes this pass needs at peak (rough, for `plan`)."""
        return 0

    def affected_parameters(self, modules: dict[str, "nn.Module"]) -> int:
        return sum(p.numel() for m in modules.values() for p in m.parameters(recurse=True))

    def result(self, ctx: RunContext, report: StepReport) -> PassResult:
        """The usual result of an in-place pass: ``ctx.model`` (edited) and the report."""
        return PassResult(ctx.model, report)


class ModulePass(Pass):
    """A pass that edits selected modules (quantize, prune, adapt, swap, lower).

    ``leaf_types`` are the module classes the pass works on; a selected module of another type is
    expanded to its outermost descendants of these types (so ``quantize modules("model.layers.0")``
    means every Linear inside layer 0).
    """

    leaf_types: ClassVar[tuple[type, ...]] = ()

    def is_leaf(self, module: "nn.Module") -> bool:
        return isinstance(module, self.leaf_types) if self.leaf_types else True


class ModelPass(Pass):
    """A pass over whole models (merge) or the whole program output (export, save). Its targets
    are every leaf module of the subject, so it takes part in the state checks like a module
    pass: `merge` after `quantize` is refused at plan time."""

    def check_models(self, models: dict[str, "nn.Module"]) -> list[str]:
        """Bind-time checks on the declared models (skeletons). Return problems as strings."""
        return []

    def affected_parameters(self, modules: dict[str, "nn.Module"]) -> int:
        unique = {id(p): p for m in modules.values() for p in m.parameters(recurse=False)}
        return sum(p.numel() for p in unique.values())  # tied weights count once


def leaves(root: "nn.Module") -> dict[str, "nn.Module"]:
    """Every module of ``root`` without children: what a model pass targets."""
    return {p: m for p, m in root.named_modules() if p and not m._modules}


def replace_module(root: "nn.Module", path: str, new: "nn.Module") -> None:
    """Put ``new`` at dotted ``path`` inside ``root``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def module_device(module: "nn.Module"):
    """The device of ``module``'s first parameter or buffer (CPU for a module without state):
    where inputs built for it (token ids, example tensors) must live."""
    tensors = list(module.parameters()) + list(module.buffers())
    # A streamed model keeps the blocks not in memory on meta: the others say where it runs.
    for t in sorted(tensors, key=lambda t: t.device.type == "meta"):
        return t.device
    import torch

    return torch.device("cpu")


def iter_leaves(root: "nn.Module", types: Iterable[type]) -> Iterable[tuple[str, "nn.Module"]]:
    types = tuple(types)
    for name, mod in root.named_modules():
        if isinstance(mod, types):
            yield name, mod

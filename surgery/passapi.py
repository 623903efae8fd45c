"""The contract between the compiler and a transformation pass.

A pass is a small typed unit: a verb (``quantize``, ``prune`` ...), a method name (``rtn``,
``wanda`` ...), a pydantic ``Params`` model, the module states it accepts and produces, and an
``apply`` that edits the model in place and returns a :class:`StepReport`. Passes never print and
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
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict

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


class DataRef(str):
    """A parameter that names a `data` declaration (e.g. ``data=calib``). The checker verifies the
    name and the runner substitutes the loaded :class:`surgery.data.Dataset`."""


class ModelRef(str):
    """A parameter that names a `model` declaration."""


@dataclass
class StepReport:
    """What one statement did, for the CLI, the manifest and the Python API."""

    modules: int = 0
    parameters: int = 0  # parameters affected
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers worth showing
    notes: list[str] = field(default_factory=list)
    per_module: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "parameters": self.parameters,
            "metrics": self.metrics,
            "notes": self.notes,
            "per_module": self.per_module,
        }


class ShapeProblem(str):
    """A `check_module` reason about sizes (a group or block that does not divide a dimension).
    Reported as E0402; a plain string reason is E0401 (the module cannot take this pass)."""


class MachineProblem(str):
    """A `check_module` reason about this machine (no GPU, a missing package), not the modules:
    reported once per statement as E0803, with ``hint`` as the help line."""

    hint: str

    def __new__(cls, text: str, hint: str = "run this step on a machine with a CUDA GPU"):
        obj = super().__new__(cls, text)
        obj.hint = hint
        return obj


class PassError(Exception):
    """Raised by a pass for a problem the user caused (bad shapes, missing data ...).

    ``module`` names the offending module path (if any) and ``hint`` becomes the help line. The
    compiler attaches the statement's location.
    """

    def __init__(self, message: str, *, module: str | None = None, hint: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.module = module
        self.hint = hint
        self.param = param


@dataclass
class RunContext:
    """Everything a pass may use while it runs."""

    model: "nn.Module"  # the subject model, edited in place
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
    """Base class of every pass. Subclasses set the class attributes and implement ``apply``."""

    verb: ClassVar[str]
    method: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[PassParams]] = PassParams
    # Module states this pass may be applied on top of (a dense module has no state).
    accepts: ClassVar[frozenset[State]] = frozenset()
    # States a module must already have (e.g. `merge adapters` requires ADAPTED).
    requires: ClassVar[frozenset[State]] = frozenset()
    # States added to / removed from every target module.
    produces: ClassVar[frozenset[State]] = frozenset()
    consumes: ClassVar[frozenset[State]] = frozenset()
    # Why a given state is refused, for the diagnostic (state -> reason).
    refusals: ClassVar[dict[State, str]] = {}
    # Params fields the statement itself fills (`to int4` -> format); must equal what the verb
    # table (surgery/verbs.py) says the verb fills.
    statement_fields: ClassVar[frozenset[str]] = frozenset()
    is_default: ClassVar[bool] = False  # used when the statement names no method
    # Plan-time checks run the model's own code (tracing its forward), so planning must build
    # the real architecture rather than a structural skeleton (surgery/skeleton.py).
    plan_needs_code: ClassVar[bool] = False

    def __init__(self, params: PassParams):
        self.params = params

    @classmethod
    def data_fields(cls) -> list[str]:
        """Names of parameters that reference `data` declarations."""
        out = []
        for name, f in cls.Params.model_fields.items():
            if f.annotation in (DataRef, DataRef | None) or name == "data":
                out.append(name)
        return out

    def estimate_memory(self, modules: dict[str, "nn.Module"]) -> int:
        """Extra bytes this pass needs at peak (rough, for `plan`)."""
        return 0


class ModulePass(Pass):
    """A pass that edits selected modules (quantize, prune, adapt, swap, lower).

    ``leaf_types`` are the module classes the pass works on; a selected module of another type is
    expanded to its descendants of these types (so ``quantize modules("model.layers.0")`` means
    every Linear inside layer 0).
    """

    leaf_types: ClassVar[tuple[type, ...]] = ()

    def is_leaf(self, module: "nn.Module") -> bool:
        return isinstance(module, self.leaf_types) if self.leaf_types else True

    def check_module(self, path: str, module: "nn.Module") -> str | None:
        """Bind-time check on one target (works on meta tensors). Return the reason it cannot be
        applied, or None. Shape and divisibility checks belong here."""
        return None

    def affected_parameters(self, modules: dict[str, "nn.Module"]) -> int:
        return sum(p.numel() for m in modules.values() for p in m.parameters(recurse=True))

    def apply(self, ctx: RunContext, modules: dict[str, "nn.Module"]) -> StepReport:
        raise NotImplementedError


class ModelPass(Pass):
    """A pass over whole models (merge) or the whole program output (export)."""

    def check_models(self, models: dict[str, "nn.Module"]) -> list[str]:
        """Bind-time checks on the declared models (skeletons). Return problems as strings."""
        return []

    def apply(self, ctx: RunContext, modules: dict[str, "nn.Module"]) -> StepReport:
        raise NotImplementedError


def replace_module(root: "nn.Module", path: str, new: "nn.Module") -> None:
    """Put ``new`` at dotted ``path`` inside ``root``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def module_device(module: "nn.Module"):
    """The device of ``module``'s first parameter or buffer (CPU for a module without state):
    where inputs built for it (token ids, example tensors) must live."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    import torch

    return torch.device("cpu")


def iter_leaves(root: "nn.Module", types: Iterable[type]) -> Iterable[tuple[str, "nn.Module"]]:
    types = tuple(types)
    for name, mod in root.named_modules():
        if isinstance(mod, types):
            yield name, mod

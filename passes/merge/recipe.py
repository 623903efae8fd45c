"""Parameters of the task-vector merges, resolved into one `Recipe` of three stages.

Every task-vector merge (mergekit's "generalized task arithmetic") works on the task vectors
`tau_i = theta_i - theta_base` in three stages, then `theta = theta_base + scale * tau_m`:

    sparsify   none | magnitude (top-k per model) | dare (random drop, rescale) | pcb (balancing)
    consensus  none | ties (elect a sign per entry, keep the deltas that agree)
    combine    sum | mean (divide by the summed weights) | max (consensus=ties) | widen

The named methods (ties, dare, pcb, ...) are rows of defaults over these axes (taskvector.py);
any row accepts the other axes, e.g. `dare(density=0.5, consensus=ties, rescale=true)`.
Older spellings stay valid and mean one point of the same space: TIES' `disjoint=`, task
arithmetic's `normalize=`, DARE's `p=` (drop probability) and `combine=task_arithmetic|linear|ties`,
PCB's `ratio=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator

from .common import WeightedParams, lambda_field

# Fraction kept when `density` is not given: TIES' 20%, DARE's p = 0.5, PCB's reference 0.1.
DEFAULT_DENSITY = {"magnitude": 0.2, "dare": 0.5, "pcb": 0.1}
# DARE's `combine=` spellings before the axes existed: (consensus, combine).
LEGACY_COMBINE = {"task_arithmetic": ("none", "sum"), "linear": ("none", "mean"),
                  "ties": ("ties", "mean")}


@dataclass(frozen=True)
class Recipe:
    """The resolved composition: what the mergers execute."""

    sparsify: str
    consensus: str
    combine: str
    keep: float  # fraction kept: magnitude top-k, PCB ratio (DARE uses `drop`)
    drop: float  # DARE's drop probability
    rescale: str  # DARE's survivor rescaling: inverse_keep_prob | l1_match | none
    compat: str
    clip: float
    inter: str
    t: float
    s: float
    scale: float
    scope: str

    @property
    def lean(self) -> bool:
        """TIES without random or cross-model sparsification runs column chunk by column chunk
        (ties.ties_lean): the same numbers with a working set that does not grow with N."""
        return (self.sparsify in ("none", "magnitude") and self.consensus == "ties"
                and self.scope == "per_tensor")


class TaskVectorParams(WeightedParams):
    """Every knob of the family; a row (taskvector.ROWS) only changes the defaults."""

    needs_base: ClassVar[bool] = True  # the one place: task vectors are deltas from a base
    sparsify: Literal["none", "magnitude", "dare", "pcb"] = "none"
    consensus: Literal["none", "ties"] = "none"
    combine: Literal["sum", "mean", "max", "widen", "task_arithmetic", "linear", "ties"] = "sum"
    density: float | None = Field(None, ge=0.0, le=1.0, description=(
        "fraction of each task vector kept (magnitude: 0.2, dare: 0.5, pcb: 0.1)"))
    p: float | None = Field(None, ge=0.0, le=1.0, description="DARE drop probability (1 - density)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="PCB's name for density")
    rescale: bool | Literal["inverse_keep_prob", "l1_match", "none"] = "inverse_keep_prob"
    compat: Literal["exact", "ties_ref"] = "exact"
    disjoint: Literal["mean", "sum", "max"] | None = None  # TIES' name for combine
    normalize: bool | None = None  # true = combine=mean, false = combine=sum (mergekit's name)
    clip: float = Field(1e-4, ge=0.0, lt=0.5, description="PCB outlier clip ratio at both ends")
    inter: Literal["sum_tanh", "pairwise_normalized", "paper_softmax"] = "sum_tanh"
    t: float = Field(1.0, gt=0.0, description="WIDEN above-average ratio (combine=widen)")
    s: float = Field(1.0, ge=0.0, description="WIDEN score calibration (combine=widen)")
    scale: float = lambda_field(1.0)
    scope: Literal["per_tensor", "global"] = "per_tensor"

    _recipe: Recipe | None = PrivateAttr(None)

    @property
    def recipe(self) -> Recipe:
        if self._recipe is None:  # resolved once, by whichever validator asks first
            self._recipe = resolve(self)
        return self._recipe

    @property
    def divides_by_weight_sum(self) -> bool:
        r = self.recipe
        return r.combine == "mean" and r.consensus == "none" and r.sparsify != "pcb"

    @model_validator(mode="after")
    def _resolve(self):
        self.recipe  # noqa: B018 - a contradiction between fields is a validation error
        return self


def _axes(p: TaskVectorParams, given: set[str]) -> tuple[str, str]:
    """(consensus, combine) after the older spellings."""
    consensus, combine = p.consensus, p.combine
    if combine in LEGACY_COMBINE:
        old, (consensus, combine) = combine, LEGACY_COMBINE[combine]
        if "consensus" in given and p.consensus != consensus:
            raise ValueError(f"combine={old} means consensus={consensus}, combine={combine}; "
                             f"it contradicts consensus={p.consensus}")
    for alias, value in (("disjoint", p.disjoint),
                         ("normalize", None if p.normalize is None else
                          ("mean" if p.normalize else "sum"))):
        if value is None:
            continue
        if "combine" in given:
            raise ValueError(f"`{alias}` and `combine` both choose how deltas are combined; "
                             "write only `combine`")
        combine = value
    if p.disjoint is not None and p.normalize is not None:
        raise ValueError("`disjoint` and `normalize` both choose the combine; write `combine`")
    return consensus, combine


def _only_with(given: set[str], fields: tuple[str, ...], ok: bool, where: str) -> None:
    bad = [f for f in fields if f in given]
    if bad and not ok:
        raise ValueError(f"`{bad[0]}` applies only with {where}")


def resolve(p: TaskVectorParams) -> Recipe:
    given = set(p.model_fields_set)
    consensus, combine = _axes(p, given)
    sp = p.sparsify
    _only_with(given, ("density",), sp != "none", "sparsify=magnitude|dare|pcb")
    _only_with(given, ("p",), sp == "dare", "sparsify=dare (it is DARE's drop probability)")
    _only_with(given, ("ratio", "clip", "inter"), sp == "pcb", "sparsify=pcb")
    _only_with(given, ("rescale",), sp == "dare", "sparsify=dare")
    _only_with(given, ("compat",), sp == "magnitude", "sparsify=magnitude")
    _only_with(given, ("t", "s"), combine == "widen", "combine=widen")
    for alias in ("p", "ratio"):
        if alias in given and "density" in given:
            raise ValueError(f"`{alias}` and `density` set the same fraction; write one")
    keep = p.density if p.density is not None else (
        p.ratio if p.ratio is not None else DEFAULT_DENSITY.get(sp, 1.0))
    drop = p.p if p.p is not None else 1.0 - keep
    if sp in ("magnitude", "pcb") and keep <= 0.0:
        raise ValueError(f"density must be > 0 for sparsify={sp} (it is the fraction kept)")
    rescale = p.rescale
    if isinstance(rescale, bool):  # true: the row's own rule (its default), false: none
        rescale = type(p).model_fields["rescale"].default if rescale else "none"
    if combine == "max" and consensus != "ties":
        raise ValueError("combine=max takes the largest agreeing delta; it needs consensus=ties")
    if combine == "widen":
        if consensus != "none" or sp == "pcb":
            raise ValueError("combine=widen weights task vectors by its own column ranking; it "
                             "does not compose with consensus=ties or sparsify=pcb")
        if p.weights is not None:
            raise ValueError("combine=widen computes its own per-column weights; drop `weights`")
    if p.scope == "global" and (sp == "dare" or combine == "widen"):
        why = "DARE draws per-tensor masks" if sp == "dare" else "WIDEN ranks matrix columns"
        raise ValueError(f"scope=global works on one flattened task vector and {why}; "
                         "use scope=per_tensor")
    return Recipe(sparsify=sp, consensus=consensus, combine=combine, keep=keep, drop=drop,
                  rescale=rescale, compat=p.compat, clip=p.clip, inter=p.inter, t=p.t, s=p.s,
                  scale=p.scale, scope=p.scope)

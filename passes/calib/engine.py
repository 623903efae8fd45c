"""Layer-sequential calibration: block by block, each block fed the outputs of the already
transformed blocks before it, holding one block's activations at a time."""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from surgery import distributed
from surgery.modelcall import first_output, forward_ids
from surgery.passapi import PassError, replace_module
from surgery.passes.calib import spill
from surgery.passes.calib.stats import LinearStats, gram_row_blocks

# Set by the streamed executor (surgery/executor/multistep.py): an object with ``begin()`` (a
# sweep starts), ``enter(block)`` (onload the block), ``leave(block)`` (the block is done: later
# steps, or write it and return it to meta) and ``captured()`` (the first block's inputs are
# recorded: what ran before it may go). None: the whole model is in memory.
RESIDENCY: contextvars.ContextVar[Any] = contextvars.ContextVar("calibration_residency",
                                                                default=None)

Transform = Callable[[dict[str, nn.Module], dict[str, LinearStats]], "dict[str, nn.Module] | None"]


class _Stop(Exception):
    """Raised by a hook to end a forward early (the rest of the model is not needed)."""


# ---------------------------------------------------------------------------------------------
# Finding the repeated blocks


def find_blocks(model: nn.Module, targets: list[str]) -> tuple[str, list[str]]:
    """The container whose children are run one after another, and those children's paths.

    Candidates: an ``nn.ModuleList`` of >= 2 children of one class (HF ``model.layers``,
    BERT ``encoder.layer``), or an ``nn.Sequential`` of >= 2 children. The candidate holding the
    most targets wins (the shallower one on a tie). Returns ("", []) when none holds a target:
    the caller then treats the whole model as one block.
    """
    best = None
    for path, mod in model.named_modules():
        kids = list(mod.named_children())
        if len(kids) < 2:
            continue
        if isinstance(mod, nn.ModuleList):
            if len({type(k) for _, k in kids}) != 1:
                continue
        elif not isinstance(mod, nn.Sequential):
            continue
        prefix = f"{path}." if path else ""
        held = sum(1 for t in targets if t.startswith(prefix))
        if held == 0:
            continue
        key = (held, -path.count(".") - (1 if path else 0))
        if best is None or key > best[0]:
            best = (key, path, [prefix + name for name, _ in kids])
    if best is None:
        return "", []
    return best[1], best[2]


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


# ---------------------------------------------------------------------------------------------
# Calling the model and the blocks


def _model_call(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """How to feed a calibration batch (surgery.modelcall: input_ids, no KV cache, for HF)."""
    return lambda x: forward_ids(model, x)


@dataclass
class _BlockInput:
    args: tuple
    kwargs: dict
    hidden_in_kwargs: str | None = None  # the kwarg name when the hidden state came as keyword

    def hidden(self) -> torch.Tensor:
        return self.kwargs[self.hidden_in_kwargs] if self.hidden_in_kwargs else self.args[0]

    def with_hidden(self, h: torch.Tensor) -> "_BlockInput":
        if self.hidden_in_kwargs:
            return _BlockInput(self.args, {**self.kwargs, self.hidden_in_kwargs: h},
                               self.hidden_in_kwargs)
        return _BlockInput((h, *self.args[1:]), self.kwargs)




# ---------------------------------------------------------------------------------------------
# Hooks


@dataclass
class _Recorder:
    """Call order and input identity of target modules during one forward."""

    paths: dict[nn.Module, str]
    order: list[tuple[str, int]] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)  # keeps ids unique while recording

    def hook(self, module, inputs):
        x = inputs[0]
        self.keep.append(x)
        self.order.append((self.paths[module], id(x)))


def sequential_groups(order: list[tuple[str, int]]) -> list[list[str]]:
    """Targets grouped by shared input, in first-call order: q/k/v, then o, then gate/up, down."""
    groups: list[list[str]] = []
    by_input: dict[int, list[str]] = {}
    seen: set[str] = set()
    for path, ident in order:
        if path in seen:
            continue
        seen.add(path)
        if ident in by_input:
            by_input[ident].append(path)
        else:
            by_input[ident] = [path]
            groups.append(by_input[ident])
    return groups


class _StatsHooks:
    """Accumulate LinearStats for some modules; optionally stop the forward after the last one.

    Layers fed the same tensor (q/k/v, gate/up) share one XᵀX per batch, and with ``share`` one
    LinearStats object: their sums are identical, so one float64 XᵀX instead of three saves
    0.4 GB a block at 8B. Sharing is found on the first batch (the layer's own statistics are
    still empty then) and holds for the rest, since every batch takes the same path.
    """

    def __init__(self, mods: dict[str, nn.Module], gram: bool, stop_after: str | None,
                 share: bool = False, paired: dict[str, list[torch.Tensor]] | None = None):
        # paired: this batch's inputs of the same layers in the reference model, a list per layer
        # in call order (for the cross sums); _calls: this batch's calls of each layer so far
        self.paired = paired
        self._calls: dict[str, int] = {}
        self.stats = {p: LinearStats(m.in_features if hasattr(m, "in_features")
                                     else m.weight.shape[1], gram, cross=paired is not None)
                      for p, m in mods.items()}
        self.stop_after = stop_after
        self.share = share
        self.first_batch = True
        self.handles = []
        # this batch: id(input) -> [weakref to the input, its XᵀX (latest input only), stats
        # that added it, sequence number]; weak, so no input outlives its use in the forward
        self._batch: dict[int, list] = {}
        self.order: list[tuple[str, int]] = []  # (path, input number), on the first batch
        self._inputs = 0
        for p, m in mods.items():
            self.handles.append(m.register_forward_hook(self._make(p)))

    def _entry(self, inp: torch.Tensor) -> list:
        entry = self._batch.get(id(inp))
        if entry is None or entry[0]() is not inp:
            for other in self._batch.values():  # keep one batch XᵀX alive, not one per input
                other[1] = None
            self._inputs += 1
            entry = self._batch[id(inp)] = [weakref.ref(inp), None, [], self._inputs]
        return entry

    def _make(self, path: str):
        def hook(module, inputs, output):
            inp = inputs[0]
            x = inp.detach()
            call = self._calls[path] = self._calls.get(path, -1) + 1
            entry = self._entry(inp)
            if self.first_batch:
                self.order.append((path, entry[3]))
            stats = self.stats[path]
            if self.share and self.first_batch and entry[2] and stats.tokens == 0 \
                    and not any(s is stats for s in entry[2]):
                owner = entry[2][0]
                owner.users += 1
                self.stats[path] = stats = owner
            if not any(s is stats for s in entry[2]):
                paired = self._paired(path, call, x)
                if stats.gram is not None and gram_row_blocks(x.shape[-1]) == x.shape[-1]:
                    if entry[1] is None:
                        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
                        entry[1] = flat.T @ flat
                    stats.add(x, gram=entry[1], paired=paired)
                else:
                    stats.add(x, paired=paired)
                entry[2].append(stats)
            if path == self.stop_after:
                raise _Stop
        return hook

    def _paired(self, path: str, call: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.paired is None:
            return None
        calls = self.paired.get(path, [])
        ref = calls[call] if call < len(calls) else None
        if ref is None or ref.shape != x.shape:
            raise PassError(
                "the reference model's layer " + ("was called fewer times" if ref is None
                                                  else f"saw inputs of shape {tuple(ref.shape)}, "
                                                  f"this one {tuple(x.shape)}"),
                module=path, hint="the reference must be the same architecture as the model")
        return ref.to(x.device)

    def new_batch(self) -> None:
        self._calls.clear()
        if self._batch:
            self.first_batch = False
        self._batch.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The engine


@torch.no_grad()
def calibrate_sequential(model: nn.Module, calibration: torch.Tensor,
                         targets: dict[str, nn.Module], transform: Transform, *, progress,
                         batch_size: int = 8, true_sequential: bool = False, gram: bool = True,
                         label: str = "calibrate", inputs: bool = False,
                         reference: nn.Module | None = None) -> None:
    """Run ``transform`` on every target, block by block (see the package docstring).

    ``inputs=True`` collects no statistics: ``transform(modules, captured)`` gets, for each
    target the first batch's forward called, the ``(args, kwargs)`` of that first call (a target
    never called is missing; the transform decides). For passes that trace a module on the
    inputs the model gives it (the attention swap). The model keeps its train/eval mode (the
    forward is the one the model would run), and in a distributed run every rank runs every
    batch (nothing is reduced, so nothing is split).

    ``reference``: a model of the same architecture (the uncompressed original) run beside
    ``model`` on the same batches, block by block with its own block inputs. Each target's
    statistics then also hold ``cross`` = X_refᵀX, X_ref the inputs of the layer at the same path
    in the reference: how the original model's activations relate to the transformed one's
    (EoRA's ``upstream``). The reference is only read."""
    if not targets:
        return
    was_training = model.training
    ref_training = reference is not None and reference.training
    if not inputs:
        model.eval()
    if reference is not None:
        reference.eval()
    try:
        _Engine(model, calibration, dict(targets), transform, progress, batch_size,
                true_sequential, gram, label, inputs, reference).run()
    finally:
        model.train(was_training)
        if reference is not None:
            reference.train(ref_training)


class _Engine:
    def __init__(self, model, calibration, targets, transform, progress, batch_size,
                 true_sequential, gram, label, inputs=False, reference=None):
        self.model = model
        self.reference = None if reference is None else _Reference(reference)
        self.batches = [calibration[i:i + batch_size]
                        for i in range(0, calibration.shape[0], batch_size)]
        self.inputs = inputs
        self.group = None if inputs else distributed.current()
        if self.group is not None:  # this rank's contiguous share of the batches
            share = distributed.batch_slice(len(self.batches), self.group)
            if not share:
                raise PassError(
                    f"{len(self.batches)} calibration batch(es) cannot be shared by "
                    f"{self.group.world} processes", hint="use a smaller batch (e.g. batch=1) or "
                    "more calibration samples, or fewer processes")
            self.batches = self.batches[share.start:share.stop]
        self.targets = targets
        self.transform = transform
        self.progress = progress
        self.true_sequential = true_sequential
        self.gram = gram
        self.label = label
        self.call = _model_call(model)
        root = spill.SPILL_ROOT.get()  # block inputs on disk (passes/calib/spill.py)
        self.spill = spill.SpillStore(root) if root is not None else None

    def _new_inputs(self):
        return self.spill.inputs() if self.spill is not None else []

    # -- stages --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:  # the spilled files go on success, error and Ctrl-C alike
            if self.spill is not None:
                self.spill.close()

    def _run(self) -> None:
        container, blocks = find_blocks(self.model, list(self.targets))
        in_block = {b: [t for t in self.targets if _inside(t, b)] for b in blocks}
        outside = [t for t in self.targets if not any(_inside(t, b) for b in blocks)]
        n_stages = len(blocks) + (1 if outside else 0)
        with self.progress.task(self.label, total=n_stages) as task:
            residency = RESIDENCY.get()
            if residency is not None and (outside or not blocks):
                raise PassError("a streamed run calibrates block by block; this target is "
                                "outside the repeated blocks",
                                module=(outside or list(self.targets))[0],
                                hint="exclude it from the selector, or use --stream off")
            if residency is not None:  # before any forward: a second sweep is refused here
                residency.begin()
            ref = self.reference
            if blocks:
                inputs, early = self._capture(blocks[0], outside)
                if ref is not None:
                    ref.inputs, _ = self._capture(blocks[0], [], ref.model, ref.call)
                if residency is not None:
                    residency.captured()
                if early:  # targets before the first block (e.g. an input projection)
                    task.describe(f"{self.label}: before {blocks[0]}")
                    self._stage(lambda i: self.call(self.batches[i]), early,
                                stop_at=self.model.get_submodule(blocks[0]),
                                ref_forward=ref and ref.whole(self.batches, until=blocks[0]))
                    outside = [t for t in outside if t not in early]
                    spill.release(inputs)
                    inputs, _ = self._capture(blocks[0], [])
                # with targets only in the first blocks (a selector such as layers 0-3), the
                # rest of the stack needs no forwards, unless targets after it (lm_head) do
                last_needed = len(blocks) - 1 if outside else max(
                    i for i, b in enumerate(blocks) if in_block[b])
                for bi, bpath in enumerate(blocks):
                    task.describe(f"{self.label}: {bpath} ({bi + 1}/{len(blocks)})")
                    if residency is not None:
                        residency.enter(bpath)
                    block = self.model.get_submodule(bpath)
                    fwd = (lambda blk: lambda i: _call(blk, inputs[i]))(block)
                    if in_block[bpath]:
                        self._stage(fwd, in_block[bpath], ref_forward=ref and ref.block(bpath))
                    if bi < last_needed:  # the next block's inputs, from transformed weights
                        block = self.model.get_submodule(bpath)
                        nxt = self._new_inputs()
                        for inp in inputs:  # spilled: one batch read back at a time
                            nxt.append(inp.with_hidden(first_output(_call(block, inp))))
                        spill.release(inputs)
                        inputs = nxt
                        if ref is not None:
                            ref.advance(bpath)
                    if residency is not None:
                        residency.leave(bpath)
                    task.advance()
                spill.release(inputs)
                del inputs
            if outside:  # the rest (lm_head, or a model without repeated blocks): full forwards
                task.describe(f"{self.label}: remaining layers")
                self._stage(lambda i: self.call(self.batches[i]), outside,
                            ref_forward=ref and ref.whole(self.batches))
                task.advance()

    def _capture(self, block_path: str, outside: list[str], model: nn.Module | None = None,
                 call: Callable[[torch.Tensor], Any] | None = None):
        """Inputs of the first block for every batch, and the outside targets that ran before it
        (of ``model``, the subject by default)."""
        model, call = model or self.model, call or self.call
        block = model.get_submodule(block_path)
        captured = self._new_inputs()  # spilled as captured, when spilling
        fired: list[str] = []

        def pre(module, args, kwargs):
            if args:
                captured.append(_BlockInput(args, kwargs))
            else:
                name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                captured.append(_BlockInput((), kwargs, name))
            raise _Stop

        handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
        for t in outside:
            m = model.get_submodule(t)
            handles.append(m.register_forward_pre_hook(
                (lambda p: lambda mod, a: fired.append(p) if p not in fired else None)(t)))
        try:
            for b in self.batches:
                try:
                    call(b)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self.batches):
            raise PassError(f"calibration never reached {block_path}", module=block_path,
                            hint="the model's forward does not call its blocks in order")
        return captured, fired

    def _stage(self, forward: Callable[[int], Any], paths: list[str],
               stop_at: nn.Module | None = None,
               ref_forward: Callable[[int], Any] | None = None) -> None:
        """Collect statistics for ``paths`` through ``forward`` and transform them (by groups).
        ``ref_forward(i)`` runs the reference on batch ``i`` first, recording the inputs of the
        same layers there (the cross statistics)."""
        if self.inputs:
            self._stage_inputs(forward, paths, stop_at)
            return
        order = None
        groups = [paths]
        if self.true_sequential:  # the groups come from the call order: one forward to see it
            order = self._record(forward, paths)
            groups = [[p for p in g if p in paths] for g in sequential_groups(order)]
            groups = [g for g in groups if g]
            missing = [p for p in paths if not any(p in g for g in groups)]
            if missing:
                groups.append(missing)
        for group in groups:
            mods = {p: self.model.get_submodule(p) for p in group}
            # (no shared statistics in distributed runs: their per-layer reduction would add a
            # shared sum twice)
            paired = None if ref_forward is None else {}
            hooks = _StatsHooks(mods, self.gram, _stop_after(order, mods) if order else None,
                                share=self.group is None, paired=paired)
            recording = [] if ref_forward is None else self.reference.record(group, paired)
            if self.group is not None:
                for st in hooks.stats.values():
                    st.defer()
            stop_handle = None
            if stop_at is not None:
                stop_handle = stop_at.register_forward_pre_hook(_raise_stop)
            try:
                for i in range(len(self.batches)):
                    hooks.new_batch()
                    if ref_forward is not None:
                        paired.clear()
                        ref_forward(i)
                    try:
                        forward(i)
                    except _Stop:
                        pass
                    if order is None and i == 0:  # the first batch recorded the call order
                        hooks.stop_after = _stop_after(hooks.order, mods)
            finally:
                hooks.new_batch()
                hooks.remove()
                for h in recording:
                    h.remove()
                if paired:
                    paired.clear()
                if stop_handle is not None:
                    stop_handle.remove()
            owners = None
            if self.group is not None:
                owners = self._owners(mods)
                self._reduce(hooks.stats, owners)
            never = [p for p, s in hooks.stats.items() if s.tokens == 0]
            if never:
                raise PassError("the calibration forward never reached this layer",
                                module=never[0], hint="select layers the model's forward uses")
            if owners is not None:
                self._solve_distributed(mods, hooks.stats, owners)
                continue
            replaced = self.transform(mods, hooks.stats) or {}
            for p, new in replaced.items():
                self._replace(p, new)

    def _stage_inputs(self, forward: Callable[[int], Any], paths: list[str],
                      stop_at: nn.Module | None) -> None:
        """``inputs=True``: the (args, kwargs) of each target's first call on the first batch
        (the forward stops once every target was called), then ``transform``."""
        mods = {p: self.model.get_submodule(p) for p in paths}
        captured: dict[str, tuple[list, dict]] = {}

        def make(path):
            def pre(module, args, kwargs):
                captured.setdefault(path, (list(args), dict(kwargs)))
                if len(captured) == len(mods):
                    raise _Stop
            return pre

        handles = [m.register_forward_pre_hook(make(p), with_kwargs=True)
                   for p, m in mods.items()]
        if stop_at is not None:
            handles.append(stop_at.register_forward_pre_hook(_raise_stop))
        _first_batch(forward, handles)
        replaced = self.transform(mods, captured) or {}
        for p, new in replaced.items():
            self._replace(p, new)

    def _replace(self, path: str, new: nn.Module) -> None:
        """Put ``new`` in the model at ``path``. In a streamed run the old module's onloaded
        tensors go back to meta: the pass's target dict still holds the old module, and
        offloading the block only reaches the modules in the model, so each calibrated block
        would otherwise keep its fp32 weights to the end (0.87 GB a block at 8B)."""
        from surgery.executor.residency import release

        old = self.model.get_submodule(path)
        replace_module(self.model, path, new)
        if RESIDENCY.get() is not None and old is not new:
            release(old, keep=new)

    # -- distributed (surgery.distributed) ------------------------------------------------------

    def _owners(self, mods: dict[str, nn.Module]) -> dict[str, int]:
        """Which rank solves which layer: cost ~ in·(in + out) (Cholesky plus column sweep)."""
        def cost(m):
            w = m.weight
            return int(w.shape[1]) * (int(w.shape[1]) + int(w.shape[0]))
        paths = list(mods)
        ranks = distributed.assign([cost(mods[p]) for p in paths], self.group.world)
        return dict(zip(paths, ranks))

    def _reduce(self, stats: dict[str, LinearStats], owners: dict[str, int]) -> None:
        """Every layer's statistics, summed over ranks in batch order, on the layer's owner."""
        g = self.group
        last = g.world - 1
        for path, st in stats.items():
            st.samples, st.tokens = distributed.all_sum_ints(st.local_counts(), g)
            state = st.float_state()
            distributed.fold(state, st.apply_pending, g)
            distributed.move(state, last, owners[path], g)
            if g.rank != owners[path]:
                st.gram = st.cross = None  # partial sums, not needed here: free them early

    def _solve_distributed(self, mods, stats, owners) -> None:
        """Each rank transforms its own layers; each finished module (or the error that stopped
        it) is broadcast from its owner, so every rank ends with the same block."""
        g = self.group
        mine = {p: m for p, m in mods.items() if owners[p] == g.rank}
        failure = None
        if mine:
            try:
                distributed.injected_failure(g)
                replaced = self.transform(mine, {p: stats[p] for p in mine}) or {}
                for p, new in replaced.items():
                    self._replace(p, new)
            except PassError as e:
                failure = ("pass", e.message, e.module, e.hint)
            except Exception as e:  # a crash: this rank re-raises it, the others report it
                failure = ("crash", f"{type(e).__name__}: {e}", None, None)
                crash = e
        first = None
        for p in mods:
            owner = owners[p]
            payload = None
            if g.rank == owner:
                payload = ("error", failure) if failure else ("ok", self.model.get_submodule(p))
            kind, value = distributed.broadcast(payload, owner, g)
            if kind == "ok":
                if g.rank != owner:
                    replace_module(self.model, p, value)
            elif first is None:
                first = (owner, value)
        if first is None:
            return
        owner, (kind, message, module, hint) = first
        if kind == "pass":
            raise PassError(message, module=module, hint=hint)
        if g.rank == owner:
            raise crash
        raise distributed.rank_failed(f"rank {owner} failed while solving its layers: {message}")

    def _record(self, forward: Callable[[int], Any], paths: list[str]):
        """Call order of ``paths`` on the first batch (for grouping and early stopping)."""
        mods = {self.model.get_submodule(p): p for p in paths}
        rec = _Recorder(mods)
        _first_batch(forward, [m.register_forward_pre_hook(rec.hook) for m in mods])
        return rec.order


class _Reference:
    """The reference model run beside the subject (``calibrate_sequential(reference=...)``):
    its own block inputs, propagated through its own (unchanged) blocks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.call = _model_call(model)
        self.inputs: list[_BlockInput] = []

    def block(self, path: str) -> Callable[[int], Any]:
        block = self.model.get_submodule(path)
        return lambda i: _call(block, self.inputs[i])

    def whole(self, batches: list[torch.Tensor], until: str | None = None
              ) -> Callable[[int], Any]:
        """Full forwards, stopped before block ``until`` when given."""
        def forward(i):
            handles = [] if until is None else [
                self.model.get_submodule(until).register_forward_pre_hook(_raise_stop)]
            try:
                self.call(batches[i])
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
        return forward

    def advance(self, path: str) -> None:
        """The next block's inputs: this block's outputs in the reference."""
        block = self.model.get_submodule(path)
        self.inputs = [inp.with_hidden(first_output(_call(block, inp))) for inp in self.inputs]

    def record(self, paths: list[str], into: dict[str, list[torch.Tensor]]) -> list:
        """Hooks appending each layer's input, call by call, to ``into[path]``."""
        def make(path):
            return lambda module, args: into.setdefault(path, []).append(args[0].detach())
        return [self.model.get_submodule(p).register_forward_pre_hook(make(p)) for p in paths]


def _call(block: nn.Module, inp: _BlockInput):
    return block(*inp.args, **inp.kwargs)


def _raise_stop(module, args):
    raise _Stop


def _first_batch(forward: Callable[[int], Any], handles: list) -> None:
    """Run batch 0 through ``forward`` (a hook may end it early), then remove ``handles``."""
    try:
        try:
            forward(0)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()


def _stop_after(order: list[tuple[str, int]], mods: dict[str, nn.Module]) -> str | None:
    """The target called last, when every target is called exactly once per forward (the
    forward may then stop there); None otherwise."""
    if len(order) != len({p for p, _ in order}):
        return None
    called = [p for p, _ in order if p in mods]
    return called[-1] if len(called) == len(mods) else None

"""`expect` in a streamed run, block by block: the metrics of surgery/evaluate.py on two streams
of hidden states that advance as the executor passes over the model.

The evaluator holds, for every evaluation window the expectations need, two hidden states on
the host in fp32: the *original* model's and the *result*'s. They advance unit by unit:

- start: the forward of each batch of windows runs up to the first block, whose inputs (the
  hidden state, and the keyword arguments the model gives every block: masks, positions, rotary
  tables) are captured by a forward pre-hook, as the calibration engine captures its inputs;
- block i: the original stream runs block i as onloaded from the checkpoint (before any step
  changes it), the result stream runs it after every step (right before it is written);
- end: the model's own forward runs once per window and stream with the modules before the
  blocks and the blocks themselves stubbed (the stub of a block returns the stream's final
  hidden state), so the final norm, the head and whatever the architecture does around them are
  the model's code; each window's logits are reduced right away to what its metric needs.

Modules outside the blocks (embeddings, final norm, lm_head) that no step touches are the same in
both streams and are read from the checkpoint when needed. A touched one has a *twin* for the
original stream: a copy of its meta module, made before any step runs, onloaded from the
checkpoint while the original stream needs it.

Windows are grouped in batches of ``EVAL_BATCH`` for the forwards, the grouping the in-memory
metrics use, and the reductions are the same functions on the same floats, so a streamed
`expect` reports what the in-memory one reports (see docs/scale.md for what was measured).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from surgery import evaluate
from surgery.executor.residency import Resident, Unit
from surgery.expectations import AGREEMENT_WINDOWS
from surgery.modelcall import first_output, forward_ids
from surgery.passapi import replace_module
from surgery.passes.calib.engine import _BlockInput, _Stop

# positions of a window reduced at a time: the reductions are row by row, so chunks give the
# same values, and a window's full-vocabulary logits are never copied whole (128256 x 512 x 4
# bytes is 263 MB)
ROWS = 128

# the agreement windows are the first batches of the perplexity windows: one set of forwards
assert AGREEMENT_WINDOWS % evaluate.EVAL_BATCH == 0


@dataclass
class _Batch:
    ids: torch.Tensor  # (windows, seqlen) token ids, on the host
    inputs: _BlockInput | None = None  # the first block's arguments (the same in both streams)
    original: torch.Tensor | None = None  # hidden states, host fp32
    result: torch.Tensor | None = None


@dataclass
class _Windows:
    """One data set's evaluation windows and what the metrics accumulate over them."""

    data: str
    batches: list[_Batch]
    agreement: int  # the first windows max_abs_diff / cosine compare
    nll: dict[str, float] = field(default_factory=lambda: {"original": 0.0, "result": 0.0})
    count: int = 0
    max_diff: float = 0.0
    cos_rows: list[torch.Tensor] = field(default_factory=list)


class StreamEvaluator:
    """The expectations of ``program``, measured on two hidden-state streams.

    ``untouched(unit)``: no step acts on the unit; ``prepare(unit)``: bring a touched unit to
    its final form (onloaded, every step run); ``finish(unit)``: write it and offload it."""

    def __init__(self, program, model: nn.Module, res: Resident, units: list[Unit],
                 blocks: list[str], data, *, untouched: Callable[[Unit], bool],
                 prepare: Callable[[Unit], None], finish: Callable[[Unit], None]):
        self.program = program
        self.model = model
        self.res = res
        self.blocks = blocks
        self.outside = [u for u in units if not u.is_block]
        self.untouched, self.prepare, self.finish = untouched, prepare, finish
        self.device = res.device
        self.windows: dict[str, _Windows] = {}
        for exp in program.expectations:
            ev = data[exp.data].evaluation
            w = self.windows.get(exp.data)
            n = ev.shape[0] if exp.metric == "perplexity" else min(AGREEMENT_WINDOWS, ev.shape[0])
            if w is None or n > sum(b.ids.shape[0] for b in w.batches):
                self.windows[exp.data] = _Windows(exp.data, [
                    _Batch(ev[i:min(i + evaluate.EVAL_BATCH, n)])
                    for i in range(0, n, evaluate.EVAL_BATCH)], min(AGREEMENT_WINDOWS, n))
        # the original stream's copies of the touched modules outside the blocks, made while
        # they are still the checkpoint's (meta: free); one deepcopy per unit keeps ties
        self.twins: dict[str, dict[str, nn.Module]] = {}
        for u in self.outside:
            if not untouched(u):
                mods = [model.get_submodule(p) for p in u.paths if p]
                self.twins[u.name] = dict(zip([p for p in u.paths if p], copy.deepcopy(mods)))
        self.pre_paths: list[str] = []  # modules the forward calls before the first block
        self._block_output: Callable[[torch.Tensor], object] = lambda h: h
        self._results: dict[int, tuple[float, float | None]] | None = None

    def _batches(self) -> Iterator[_Batch]:
        for w in self.windows.values():
            yield from w.batches

    # -- onloading outside the blocks ---------------------------------------------------------
    def _read(self, unit: Unit, stored: bool) -> Callable[[], None]:
        """Onload ``unit`` from the checkpoint (in its stored dtype with ``stored``: a unit the
        capture only looks up, outputs cast to fp32 as the executor's `_onload_stored` does);
        returns its release."""
        self.res.onload(unit, stored=stored)
        hooks = []
        if stored:
            dtype = self.res.dtype

            def cast(module, args, output):
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    return output.to(dtype)
                return output
            hooks = [self.model.get_submodule(p).register_forward_hook(cast)
                     for p in unit.paths if p]

        def release():
            for h in hooks:
                h.remove()
            self.res.offload(unit)
        return release

    @contextlib.contextmanager
    def _original_modules(self, units: list[Unit]):
        """The twins in place of the touched ``units``' modules (the original stream's view)."""
        swapped = []
        for u in units:
            for p, twin in self.twins.get(u.name, {}).items():
                swapped.append((p, self.model.get_submodule(p)))
                replace_module(self.model, p, twin)
        try:
            yield
        finally:
            for p, mod in reversed(swapped):
                replace_module(self.model, p, mod)

    # -- start: the first block's inputs ------------------------------------------------------
    def _capture(self, load: Callable[[Unit], Callable[[], None] | None]) -> list[Callable]:
        """Run every batch up to the first block; modules outside the blocks are onloaded by
        ``load`` when first called. Returns the releases of what was loaded."""
        releases: list[Callable] = []
        called: list[str] = []
        by_path = {p: u for u in self.outside for p in u.paths if p}
        first = self.model.get_submodule(self.blocks[0])
        state = {"batch": None}

        def pre_block(module, args, kwargs):
            b = state["batch"]
            if args:
                inp = _BlockInput(args, kwargs)
            else:
                name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                inp = _BlockInput((), kwargs, name)
            state["hidden"] = inp.hidden()
            if b.inputs is None:  # without the hidden state: the streams hold their own
                b.inputs = inp.with_hidden(None)
            raise _Stop

        def pre_outside(path):
            def hook(module, args):
                if path not in called:
                    called.append(path)
                unit = by_path[path]
                if not self.res.resident(unit):
                    rel = load(unit)
                    if rel is not None:
                        releases.append(rel)
            return hook

        handles = [first.register_forward_pre_hook(pre_block, with_kwargs=True)]
        handles += [self.model.get_submodule(p).register_forward_pre_hook(pre_outside(p))
                    for p in by_path]
        hidden = []
        try:
            for b in self._batches():
                state["batch"] = b
                try:
                    forward_ids(self.model, b.ids.to(self.device))
                except _Stop:
                    pass
                hidden.append(state.pop("hidden").detach().to("cpu", torch.float32))
        finally:
            for h in handles:
                h.remove()
        self._captured = hidden
        self.pre_paths = self.pre_paths or called
        return releases

    @torch.no_grad()
    def start_original(self) -> None:
        """The original stream's first-block inputs (before any step runs)."""
        with self._original_modules(self.outside):
            releases = self._capture(lambda u: self._read(u, stored=True))
            for b, h in zip(self._batches(), self._captured):
                b.original = h
            for rel in releases:
                rel()

    @torch.no_grad()
    def start_result(self) -> None:
        """The result stream's first-block inputs, once the modules before the first block are
        final: the original's when no step touches them, else captured again with them."""
        pre = [u for u in self.outside if any(p in self.pre_paths for p in u.paths)]
        touched = [u for u in pre if not self.untouched(u)]
        if not touched:
            for b in self._batches():
                b.result = b.original
            return
        for u in touched:  # before the capture: a step may replace the modules it calls
            self.prepare(u)
        releases = self._capture(lambda u: self._read(u, stored=True))
        for b, h in zip(self._batches(), self._captured):
            b.result = h
        for rel in releases:
            rel()
        for u in touched:
            if any(p not in self.pre_paths for p in u.paths if p):
                u._keep = True  # a tied head: the end needs it again
            else:
                self.finish(u)

    # -- blocks --------------------------------------------------------------------------------
    @torch.no_grad()
    def feed(self, stream: str, block_path: str) -> None:
        """Advance ``stream`` ("original" or "result") through the resident block."""
        block = self.model.get_submodule(block_path)
        for b in self._batches():
            inp = b.inputs.with_hidden(getattr(b, stream).to(self.device))
            out = block(*inp.args, **inp.kwargs)
            if isinstance(out, tuple):  # the stubs at the end answer in the same form
                n = len(out)
                self._block_output = lambda x, n=n: (x,) + (None,) * (n - 1)
            setattr(b, stream, first_output(out).detach().to("cpu", torch.float32))

    # -- end: final norm, head, metrics -------------------------------------------------------
    @contextlib.contextmanager
    def _stubs(self, hidden: torch.Tensor):
        """The modules before the blocks and the blocks answer without computing: the blocks
        with ``hidden`` (the stream's last hidden state), the embeddings with zeros (their
        output is replaced by the blocks' anyway)."""
        stubbed = []
        for p in self.pre_paths:
            mod = self.model.get_submodule(p)
            mod.forward = lambda *a, **k: torch.zeros_like(hidden)
            stubbed.append(mod)
        for p in self.blocks:
            mod = self.model.get_submodule(p)
            mod.forward = lambda *a, **k: self._block_output(hidden)
            stubbed.append(mod)
        try:
            yield
        finally:
            for mod in stubbed:
                del mod.forward

    def _logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device)
        with self._stubs(hidden):
            return first_output(forward_ids(self.model, ids.to(self.device))).float()

    @torch.no_grad()
    def end(self) -> None:
        """Run the modules after the blocks on both streams, window by window, and reduce."""
        tail = [u for u in self.outside if any(p not in self.pre_paths for p in u.paths if p)]
        releases, finals = [], []
        for u in tail:  # the result's form
            if self.untouched(u):
                if not self.res.resident(u):
                    releases.append(self._read(u, stored=False))
            else:
                self.prepare(u)
                finals.append(u)
        twinned = [u for u in tail if u.name in self.twins]
        with self._original_modules(twinned):  # the original's form of the touched ones
            for u in twinned:
                releases.append(self._read(u, stored=False))
        for w in self.windows.values():
            start = 0
            for b in w.batches:
                self._end_batch(w, b, start, twinned)
                start += b.ids.shape[0]
        with self._original_modules(twinned):
            for rel in reversed(releases):
                rel()
        for u in finals:
            u._keep = False
            self.finish(u)
        self._results = self._measure()

    def _end_batch(self, w: _Windows, b: _Batch, start: int, twinned: list[Unit]) -> None:
        nll: dict[str, list[torch.Tensor]] = {"original": [], "result": []}
        for j in range(b.ids.shape[0]):
            ids = b.ids[j:j + 1]
            logits = {}
            with self._original_modules(twinned):
                logits["original"] = self._logits(ids, b.original[j:j + 1])
            logits["result"] = self._logits(ids, b.result[j:j + 1])
            n = ids.shape[1]
            for s in nll:  # position r predicts token r + 1
                nll[s].append(torch.cat([
                    evaluate.token_nll(logits[s][:, r:r + ROWS + 1], ids[:, r:r + ROWS + 1]).cpu()
                    for r in range(0, n - 1, ROWS)]))
            if start + j < w.agreement:
                for r in range(0, n, ROWS):
                    a, o = logits["result"][:, r:r + ROWS], logits["original"][:, r:r + ROWS]
                    d = evaluate.max_abs_diff(a, o)
                    if d > w.max_diff or math.isnan(d):  # a NaN stays, as in torch's max
                        w.max_diff = d
                    w.cos_rows.append(evaluate.cosine_rows(a, o).cpu())
            del logits
        for s in nll:  # a batch's sum, as evaluate.perplexity takes it
            w.nll[s] += float(torch.cat(nll[s]).sum())
        w.count += sum(t.numel() for t in nll["result"])
        b.original = b.result = b.inputs = None  # done with this batch

    def _measure(self) -> dict[int, tuple[float, float | None]]:
        out: dict[int, tuple[float, float | None]] = {}
        for exp in self.program.expectations:
            w = self.windows[exp.data]
            if exp.metric == "perplexity":
                out[exp.line] = (math.exp(w.nll["result"] / w.count),
                                 math.exp(w.nll["original"] / w.count))
            elif exp.metric == "max_abs_diff":
                out[exp.line] = (w.max_diff, None)
            else:
                out[exp.line] = (float(torch.cat(w.cos_rows).mean()), None)
        return out

    def measured(self) -> dict[int, tuple[float, float | None]]:
        """(value, original) of every expectation, by line, for expectations.judge."""
        assert self._results is not None, "end() has not run"
        return self._results

    def hidden_bytes(self) -> int:
        """Host bytes of the two streams' hidden states now."""
        seen, n = set(), 0
        for b in self._batches():
            for t in (b.original, b.result):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel() * t.element_size()
        return n

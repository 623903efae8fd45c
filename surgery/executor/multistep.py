"""Several calibrated steps in one streamed pass over the checkpoint.

In memory, calibrated step A runs over every block (block i calibrated on inputs computed
through blocks < i as A left them), then step B does the same on the model A left. One sweep
reproduces this exactly when every step keeps its own stream of block inputs: for block i,
onload it and run the TENSOR steps before A; A collects statistics from its stream, transforms
and advances its stream through the block as A left it; the TENSOR steps between A and B run;
B does the same on the A-transformed block; the TENSOR steps after B run; the block is written
and offloaded. Block i is then final for every step, so block i + 1 can start.

Each step's pass runs unchanged (`Pass.run`, the layer-sequential engine of
passes/calib/engine.py) in a thread of its own, and the threads hand a baton around: only the
holder runs, so results, reductions and distributed collectives happen in one fixed order. The
engine's residency hooks (`engine.RESIDENCY`, per thread through contextvars) are where a step
gives the baton up:

    round 0      every step captures its first block's inputs (the embeddings are resident);
                 after step j, the TENSOR steps between j and j + 1 run on the resident units
                 outside the blocks; after the last, those units are written and offloaded
    round r      block r - 1: step 0's `enter` onloads it, each step's `leave` runs the TENSOR
                 steps after it (the last step's writes and offloads the block)
    last round   every step's pass returns, in script order; what its code reads of the
                 model after the engine (reports, post-conditions) is the model as the step
                 left it, as in memory: meta copies of its targets, kept when it left each
                 block, stand in for the modules later steps replaced or changed

A step whose pass ends before the last round (it had nothing to calibrate) has its remaining
positions' work done by whoever hands the baton on, so the other steps see the same model.
With one calibrated step no thread is started: the pass runs in the calling thread, as before.

Failures: an exception in any step (or in a hook's work) is recorded, every other step is
woken and unwinds with `_Abort` at its next hook, all threads are joined, and the original
exception is raised in the calling thread, so the diagnostic, the cleanup of the atomic output
directory and the interrupt handling (surgery/interrupts.py: a KeyboardInterrupt in the main
thread while it waits) are those of a single step.
"""

from __future__ import annotations

import contextvars
import copy
import ctypes
import dataclasses
import threading
import time
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from surgery.diagnostics import Diagnostic, SurgeryError

if TYPE_CHECKING:
    from surgery.binder import PlanRow
    from surgery.executor.residency import Unit
    from surgery.executor.run import StreamRunner


class _Abort(BaseException):
    """Unwinds a step's thread after another step failed (never seen outside this module)."""


class _StepResidency:
    """The engine's residency hooks for calibrated step ``j`` (engine.RESIDENCY)."""

    def __init__(self, sweep: "Sweep", j: int):
        self.sweep, self.j = sweep, j

    def begin(self) -> None:
        self.sweep.hook(self.j, "begin", None)

    def captured(self) -> None:
        self.sweep.hook(self.j, "captured", None)

    def enter(self, bpath: str) -> None:
        self.sweep.hook(self.j, "enter", bpath)

    def leave(self, bpath: str) -> None:
        self.sweep.hook(self.j, "leave", bpath)


class Sweep:
    """The calibrated steps ``rows`` of ``runner`` over its blocks, in one pass."""

    def __init__(self, runner: "StreamRunner", rows: list["PlanRow"], by_path: dict[str, "Unit"],
                 lazy_hooks: list):
        self.runner = runner
        self.rows = rows
        self.k = len(rows)
        self.blocks = [by_path[b] for b in runner.blocks]
        self.index = {u.name: i for i, u in enumerate(self.blocks)}
        self.lazy_hooks = lazy_hooks
        self.last_round = len(self.blocks) + 1
        self.pos = (0, 0)  # (round, step) whose turn it is; None once every round is over
        self.done = [False] * self.k
        self.entered: list[str | None] = [None] * self.k
        self.begun = [False] * self.k
        self.cond = threading.Condition()
        self.failure: BaseException | None = None
        self.busy = [0.0] * self.k  # seconds each step held the baton
        # step j's targets as j left them (meta copies), and the live modules they stand in for
        self.snap: list[dict[str, nn.Module]] = [{} for _ in rows]
        self.live: list[dict[str, nn.Module]] = [{} for _ in rows]
        self.targets_in = [{u.name: [p for p in row.modules if _inside(p, u.name)]
                            for u in self.blocks} for row in rows]
        self._since = [0.0] * self.k
        runner._capturing = 0  # lazily onloaded units get the TENSOR steps up to this step

    # -- driving -------------------------------------------------------------------------------
    def run(self) -> None:
        # per-thread state the steps' threads take from this one
        state = (torch.is_grad_enabled(), torch.get_num_threads(),
                 torch.cuda.current_device() if torch.cuda.is_initialized() else None)
        _one_heap()
        if self.k == 1:
            self._step(0, state)
        else:
            threads = [threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._step, j, state),
                                        name=f"surgery-calibrate-{j}", daemon=True)
                       for j in range(self.k)]
            for t in threads:
                t.start()
            try:
                with self.cond:
                    while self.pos is not None and self.failure is None:
                        self.cond.wait()
            except BaseException as e:  # Ctrl-C / SIGTERM while waiting: stop every step
                self._fail(e)
            finally:
                for t in threads:
                    t.join()
        if self.failure is not None:
            raise self.failure
        # a pass that ended early left no position unworked; every block was written
        assert self.pos is None, self.pos

    def _step(self, j: int, state: tuple) -> None:
        """Step ``j``'s pass, in its own thread (or the caller's when it is the only one)."""
        from surgery.passes.calib import engine

        grad, threads_n, cuda_device = state
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads_n)  # OpenMP's thread count is per thread: same BLAS splits
        if cuda_device is not None:  # the current CUDA device is per thread too (NCCL ranks)
            torch.cuda.set_device(cuda_device)
        token = engine.RESIDENCY.set(_StepResidency(self, j))
        row = self.rows[j]
        try:
            self._wait(j)
            pass_obj = row.step.pass_cls(row.step.params)
            # the targets are meta modules until their block is onloaded: the engine looks
            # each module up again once its block is resident
            targets = {p: self.runner.model.get_submodule(p) for p in row.modules}
            ctx = dataclasses.replace(self.runner.ctx, line=row.step.line)
            try:
                # (meta, and untransformed by the steps before it: the plan checked them)
                result = self.runner._guard(row, lambda: pass_obj.run(ctx, targets,
                                                                      planned=True))
            finally:
                self._restore(j)
            self.busy[j] += time.perf_counter() - self._since[j]
            self.runner.reports.add(row, result.report, self.busy[j])
            self._since[j] = time.perf_counter()
            with self.cond:
                self.done[j] = True
            self._hand_on(j, work_current=True)
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            self._fail(e)
            if self.k == 1:
                raise
        finally:
            engine.RESIDENCY.reset(token)

    # -- what a step's code reads after the engine ------------------------------------------------
    def _keep(self, j: int, block: str) -> None:
        """Meta copies of step ``j``'s targets in ``block``, as ``j`` leaves it."""
        for p in self.targets_in[j][block]:
            self.snap[j][p] = _meta_copy(self.runner.model.get_submodule(p))

    def _show(self, j: int) -> None:
        """Step ``j`` resumes after its last block: its targets as it left them."""
        from surgery.passapi import replace_module

        for p, mod in self.snap[j].items():
            self.live[j][p] = self.runner.model.get_submodule(p)
            replace_module(self.runner.model, p, mod)

    def _restore(self, j: int) -> None:
        from surgery.passapi import replace_module

        for p, mod in self.live[j].items():
            replace_module(self.runner.model, p, mod)
        self.live[j] = {}
        self.snap[j] = {}

    # -- the baton -----------------------------------------------------------------------------
    def _wait(self, j: int) -> None:
        with self.cond:
            while self.failure is None and (self.pos is None or self.pos[1] != j):
                self.cond.wait()
            if self.failure is not None:
                raise _Abort
        self._since[j] = time.perf_counter()

    def _next(self, pos):
        r, j = pos
        if j + 1 < self.k:
            return (r, j + 1)
        return (r + 1, 0) if r < self.last_round else None

    def _hand_on(self, j: int, work_current: bool) -> None:
        """Step ``j`` is done with its turn: move the baton to the next step still running,
        doing the positions of finished steps on the way; then wait for ``j``'s next turn."""
        self.busy[j] += time.perf_counter() - self._since[j]
        pos = self.pos
        if work_current:
            self._work(pos)
        while True:
            pos = self._next(pos)
            if pos is None or not self.done[pos[1]]:
                break
            self._work(pos)
        with self.cond:
            self.pos = pos
            self.cond.notify_all()
        if not self.done[j]:
            self._wait(j)
            if self.pos == (self.last_round, j):
                self._show(j)

    def _fail(self, e: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = e
            self.cond.notify_all()

    # -- the hooks -----------------------------------------------------------------------------
    def hook(self, j: int, kind: str, bpath: str | None) -> None:
        if self.failure is not None:
            raise _Abort
        r = 0 if kind in ("begin", "captured") else self.index.get(bpath, -2) + 1
        if self.pos != (r, j) or (kind == "begin" and self.begun[j]) \
                or (kind == "enter") == (self.entered[j] == bpath):
            row = self.rows[j]
            raise SurgeryError(Diagnostic(
                "E0902", f"`{row.step.verb} using {row.step.method}` does not calibrate block "
                         "by block in one sweep (its calibration reached "
                         f"{bpath or 'the first block'} out of order), so it cannot run in "
                         "a streamed pass", row.step.stmt.span,
                help="use --stream off (the pass runs the model more than once)",
                source=self.runner.program.source))
        if kind == "begin":
            self.begun[j] = True
            return
        if kind == "enter":
            self._enter(j, self.blocks[r - 1])
            self.entered[j] = bpath
            return
        self._leave(j, r)
        self._hand_on(j, work_current=False)

    def _enter(self, j: int, unit: "Unit") -> None:
        if j == 0:  # the first calibrated step onloads the block (and runs the steps before)
            self.runner._process(unit)

    def _leave(self, j: int, r: int) -> None:
        """What follows step ``j`` at round ``r``: the TENSOR steps up to the next calibrated
        step; after the last calibrated step, writing and offloading."""
        run = self.runner
        last = j == self.k - 1
        if r == 0:
            units = [u for u in run.units if not u.is_block and getattr(u, "_loaded", False)
                     and not getattr(u, "_done", False)]
            if last:  # every step has its first block's inputs: what ran before may go
                for h in self.lazy_hooks:
                    h.remove()
                if run.evaluator is not None:  # the result stream starts from the embeddings
                    run.evaluator.start_result()
                for u in units:
                    run._finish(u)
            else:
                run._capturing = j + 1
                for u in units:
                    run._tensor_group(j + 1, u)
            return
        unit = self.blocks[r - 1]
        if not self.done[j]:
            self._keep(j, unit.name)
        if last:
            run._finish(unit)
        else:
            run._tensor_group(j + 1, unit)

    def _work(self, pos) -> None:
        """Position ``pos`` of a step whose pass has returned: what its hooks would have done."""
        if self.failure is not None:  # another step failed: write nothing more
            raise _Abort
        r, j = pos
        if r == self.last_round:
            return
        if r > 0 and self.entered[j] != self.blocks[r - 1].name:
            self._enter(j, self.blocks[r - 1])
            self.entered[j] = self.blocks[r - 1].name
        self._leave(j, r)


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _meta_copy(module: nn.Module) -> nn.Module:
    """``module`` with its parameters and buffers on meta (types and attributes kept)."""
    memo: dict[int, object] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"),
                                   requires_grad=t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(module, memo)


def _one_heap() -> None:
    """Keep the step threads from holding freed memory apart. glibc gives each new thread a
    malloc arena of its own, and pages freed into one arena are not reused by another thread's
    allocations: with blocks onloaded in one step's thread and freed or re-made in another's,
    peak RSS of SparseGPT + GPTQ on llama-0.25b (2 blocks, 16 x 512) was 1.42 GB. Capping the
    arenas at run time (others may exist already) gave 1.38 GB; also mapping every allocation
    of 4 MiB or more on its own (returned to the OS when freed) gave 1.21 GB, the peak of
    SparseGPT alone (docs/bench/scale.md). With one step the mapping threshold matters too:
    blocks of different shapes leave the heap fragmented between tensors below glibc's dynamic
    threshold (up to 32 MiB). (A 4-block 8B-shaped GPTQ run without it was sampled at 5.75 GB
    resident in block 0 and 6.6 GB later; the cause of the growth was not separated.)
    Process-wide, set when a streamed sweep starts. Not glibc: nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: big tensors mapped and unmapped
    except (OSError, AttributeError):
        pass

"""Data-parallel calibration on torch.distributed (issue 19, part 6).

A run is distributed when it was started by ``torchrun`` (or ``surgery apply --nproc N``, which
launches it) with ``WORLD_SIZE`` > 1: every rank loads the model and the data, the calibration
engine gives each rank a contiguous slice of the calibration batches, and the per-layer
statistics are reduced in a fixed order. Everything else is unchanged and runs on every rank.

Exactness: one process adds the per-batch contributions (float64 sums of float32 XᵀX) in batch
order. Here every rank keeps its batches' contributions apart, and the running sum travels along
the ranks (``fold``): rank 0 adds its batches to zeros and sends the sum to rank 1, which adds its
own batches in order, and so on. The additions are the same, in the same order, as in one process,
so the Hessians are bit-identical; so are the GPTQ codes and SparseGPT masks, given the same
number of intra-op threads per process (a BLAS may split a reduction differently with more).
The price: a rank holds its batches' float32 Gram matrices until the fold reaches it.

The layers of a block (or of a true-sequential group) are then assigned to ranks by cost
(``assign``); each rank solves its own, and the owner broadcasts the finished module. A failure
inside a solve travels the same way, so every rank raises the same error; a rank that dies makes
its peers' next collective fail (torchrun also stops them). Only rank 0 writes outputs, and only
after every rank has agreed that the run succeeded.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from surgery.diagnostics import Code, SurgeryError, error

#: Test hook: ``RANK`` makes that rank raise inside its first solve; ``RANK:exit`` makes it die
#: (os._exit) there instead. Unset in normal runs.
FAIL_ENV = "SURGERY_TEST_FAIL_RANK"


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    backend: str

    def comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend can send it (NCCL: the current GPU; gloo: the host)."""
        return t.cuda() if self.backend == "nccl" else t.cpu()


_GROUP: Group | None = None


def current() -> Group | None:
    """The distributed group of this run, or None in a single process."""
    return _GROUP


def world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str | None = None) -> Group | None:
    """Join the group torchrun described in the environment (nothing when WORLD_SIZE <= 1)."""
    global _GROUP
    if _GROUP is not None or world_from_env() <= 1:
        return _GROUP
    import datetime

    import torch.distributed as dist

    cuda = (device or "").startswith("cuda") and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    except Exception as e:  # no rendezvous, port taken, backend missing
        raise error(Code.E0911, f"cannot join the distributed run: {e}",
                    help="launch with `torchrun --nproc-per-node N -m surgery apply ...` or "
                         "`surgery apply --nproc N ...`") from None
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), backend)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    if _GROUP is None:
        return
    import torch.distributed as dist

    _GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return _GROUP is None or _GROUP.rank == 0


def batch_slice(n_batches: int, g: Group) -> range:
    """This rank's contiguous share of ``n_batches`` (the first ranks take one more)."""
    base, extra = divmod(n_batches, g.world)
    lo = g.rank * base + min(g.rank, extra)
    return range(lo, lo + base + (1 if g.rank < extra else 0))


def assign(costs: list[int], world: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least-loaded rank (ties: lowest rank,
    then input order), so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


# ---------------------------------------------------------------------------------------------
# Collectives (each wrapped so that a dead peer becomes a diagnostic, not a traceback)


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SurgeryError:
        raise
    except Exception as e:  # gloo/NCCL report a dead peer as a RuntimeError (or DistBackendError)
        raise rank_failed(f"{what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def rank_failed(message: str) -> SurgeryError:
    g = _GROUP
    who = f"rank {g.rank} of {g.world}: " if g else ""
    return error(Code.E0910, f"{who}{message}",
                 help="another process of the distributed run failed or died; its own error is "
                      "printed above (torchrun names the failed rank); no output was written")


def fold(states: list[torch.Tensor], apply_local: Callable[[], None], g: Group) -> None:
    """Add every rank's contributions to ``states`` in rank order: receive the running sums from
    the previous rank, ``apply_local`` (adds this rank's batches in order), send them on. The
    last rank holds the totals."""
    import torch.distributed as dist

    if g.rank > 0:
        for t in states:
            buf = g.comm(torch.empty_like(t))
            _collective("receiving statistics", lambda: dist.recv(buf, src=g.rank - 1))
            t.copy_(buf)
    apply_local()
    if g.rank + 1 < g.world:
        for t in states:
            _collective("sending statistics", lambda: dist.send(g.comm(t), dst=g.rank + 1))


def move(states: list[torch.Tensor], src: int, dst: int, g: Group) -> None:
    """Copy ``states`` from rank ``src`` to rank ``dst`` (point to point)."""
    import torch.distributed as dist

    if src == dst:
        return
    for t in states:
        if g.rank == src:
            _collective("sending statistics", lambda: dist.send(g.comm(t), dst=dst))
        elif g.rank == dst:
            buf = g.comm(torch.empty_like(t))
            _collective("receiving statistics", lambda: dist.recv(buf, src=src))
            t.copy_(buf)


def all_sum_ints(values: list[int], g: Group) -> list[int]:
    """Exact integer sums over ranks (counts: tokens, samples)."""
    import torch.distributed as dist

    t = g.comm(torch.tensor(values, dtype=torch.int64))
    _collective("summing counts", lambda: dist.all_reduce(t))
    return [int(v) for v in t.cpu()]


def broadcast(obj: Any, src: int, g: Group) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; modules included)."""
    import torch.distributed as dist

    box = [_pack(obj) if g.rank == src else None]
    _collective("broadcasting results", lambda: dist.broadcast_object_list(
        box, src=src, device=torch.device("cuda") if g.backend == "nccl" else None))
    return obj if g.rank == src else _unpack(box[0])


def gather(obj: Any, g: Group) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * g.world
    _collective("gathering reports", lambda: dist.all_gather_object(out, obj))
    return out


def agree(ok: bool = True) -> None:
    """All ranks reach this point before rank 0 writes; raises when any rank did not succeed."""
    g = _GROUP
    if g is None:
        return
    import torch.distributed as dist

    t = g.comm(torch.tensor([1 if ok else 0], dtype=torch.int64))
    _collective("agreeing on success", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    if int(t.item()) == 0:
        raise rank_failed("another rank did not complete the run")


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    # Our own peer's pickle (the same program on the same machine set), never a file from disk.
    return torch.load(io.BytesIO(data), weights_only=False)


def merged_report(part: dict, order: list[str] | None = None) -> dict:
    """The union of every rank's ``part`` (disjoint keys), in ``order`` when given: a pass's
    per-layer report after its layers were solved on different ranks."""
    g = _GROUP
    if g is None:
        return part
    merged: dict = {}
    for p in gather(part, g):
        merged.update(p)
    if order is not None:
        merged = {k: merged[k] for k in order if k in merged} | {
            k: v for k, v in merged.items() if k not in order}
    return merged


def summed(values: list) -> list:
    """Element-wise sums of ``values`` over ranks, added in rank order (ints stay exact)."""
    g = _GROUP
    if g is None:
        return values
    parts = gather(list(values), g)
    return [sum(p[i] for p in parts) for i in range(len(values))]


def injected_failure(g: Group) -> None:
    """The test hook of ``FAIL_ENV`` (see there)."""
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return
    rank, _, how = spec.partition(":")
    if rank.strip() != str(g.rank):
        return
    if how == "exit":
        os._exit(3)
    raise RuntimeError(f"injected failure on rank {g.rank} ({FAIL_ENV})")

"""Choosing between the in-memory and the streamed run, and the plan-time resource checks:
device available (E0901), budget not below one unit (E0900)."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.diagnostics import Diagnostic, SurgeryError, error
from surgery.executor.memory import Estimate, available_ram, estimate, fmt


def parse_device(spec: str | torch.device | None, source=None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`; CUDA on a machine without it is E0901."""
    if spec is None:
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise error("E0901", f"unknown device `{spec}`", help="use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error("E0901", f"`--device {spec}` asks for CUDA, and this machine has no "
                                 "usable CUDA device (torch.cuda.is_available() is false)",
                        help="run on a machine with a GPU, or use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise error("E0901", f"`--device {spec}`: this machine has {n} CUDA device(s)",
                        help=f"use cuda:0 .. cuda:{n - 1}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise error("E0901", f"device `{spec}` is not supported", help="use cpu, cuda or cuda:N")
    return dev


def plan_estimate(plan, source_dir: Path, device: torch.device, spill: bool = False) -> Estimate:
    """The peak-memory estimate of ``plan`` on the checkpoint in ``source_dir`` (config only)."""
    from surgery.executor.residency import empty_model, plan_units
    from surgery.models import read_config
    from surgery.passes.calib.engine import find_blocks

    from surgery.executor.checkpoint import Checkpoint

    model = empty_model(read_config(source_dir))
    stored = Checkpoint(source_dir).float_dtype().itemsize
    leaf_paths = [p for p, m in model.named_modules() if not m._modules]
    _, blocks = find_blocks(model, leaf_paths)
    units = plan_units(model, blocks)
    return estimate(model, units, plan.steps, plan.program.data, device=device.type,
                    stored_bytes=stored, expectations=plan.program.expectations, spill=spill)


def check_budget(est: Estimate, max_memory: int | None, max_device_memory: int | None,
                 device: torch.device, program) -> None:
    """E0900 when a budget cannot hold even one unit's working set."""
    diags = []
    if max_memory is not None and max_memory < est.host_streamed:
        diags.append(Diagnostic(
            "E0900", f"--max-memory {fmt(max_memory)} is below what one block needs: a streamed "
                     f"run of this script needs about {fmt(est.host_streamed)} of host memory "
                     f"(largest block {fmt(est.min_unit)} in fp32, plus working memory)", None,
            help=f"raise --max-memory to at least {fmt(est.host_streamed)}"))
    if max_device_memory is not None and device.type == "cuda" and \
            max_device_memory < est.device:
        diags.append(Diagnostic(
            "E0900", f"--max-device-memory {fmt(max_device_memory)} is below what one block "
                     f"needs on the device: about {fmt(est.device)}", None,
            help=f"raise --max-device-memory to at least {fmt(est.device)}"))
    if diags:
        raise SurgeryError(diags).with_source(program.source)


def should_stream(mode: str, est: Estimate | None, max_memory: int | None,
                  device: torch.device) -> bool:
    if mode == "on":
        return True
    if mode == "off" or est is None:
        return False
    budget = max_memory if max_memory is not None else available_ram()
    return est.host_in_memory > budget or device.type == "cuda"

"""The resource options of `apply` (CLI flags and API keywords) and the streamed entry point."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.diagnostics import error
from surgery.executor.memory import parse_size

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype | None
    stream: str  # on | off | auto
    max_memory: int | None
    max_device_memory: int | None
    max_shard_bytes: int | None
    spill_activations: str | None = None  # spill calibration activations under this directory

    @property
    def wants_stream_check(self) -> bool:
        return self.stream != "off" or self.device.type != "cpu" or \
            self.max_memory is not None or self.max_device_memory is not None


def _size(name: str, value) -> int | None:
    if value is None:
        return None
    try:
        n = parse_size(value) if isinstance(value, str) else int(value)
    except ValueError:
        raise error("E0301", f"{name} `{value}` is not a size", help="write e.g. 6GB or 512MiB")
    if n <= 0:
        raise error("E0301", f"{name} must be positive")
    return n


def resolve(program, *, device=None, dtype=None, stream="off", max_memory=None,
            max_device_memory=None, max_shard_size=None, spill_activations=None) -> Options:
    from surgery.executor.entry import parse_device

    if stream not in ("on", "off", "auto"):
        raise error("E0301", f"stream=`{stream}` is not one of on, off, auto")
    dt = None
    if dtype is not None:
        dt = DTYPES.get(str(dtype).lower().removeprefix("torch."))
        if dt is None:
            raise error("E0301", f"unknown dtype `{dtype}`", help="use bf16, fp16 or fp32")
    return Options(parse_device(device), dt, stream, _size("--max-memory", max_memory),
                   _size("--max-device-memory", max_device_memory),
                   _size("--max-shard-size", max_shard_size),
                   None if spill_activations is None else str(spill_activations))


def try_stream(program, model, opts: Options, *, seed: int, output, progress):
    """Run ``program`` streamed and return its Result, or None when the in-memory path is the
    one to take (auto mode, the model fits). Plan-time checks come first: nothing is read or
    written before the budget, the device and the schedule are known to work."""
    from surgery.diagnostics import attach_source
    from surgery.executor.entry import check_budget, plan_estimate, should_stream
    from surgery.executor.run import StreamOptions, StreamRunner
    from surgery.models import local_dir
    from surgery.outputs import release as release_output
    from surgery.passes.calib.spill import spilling

    checked = program.check()
    source = model if model is not None else (checked.subject.source if checked.subject
                                              else None)
    plan = program.plan(model)  # on the skeleton: locates every script problem first
    d = local_dir(source) if isinstance(source, str) else None
    if d is None or not list(d.glob("*.safetensors")):
        if opts.stream == "on" or opts.device.type != "cpu":
            raise attach_source(error(
                "E0902", f"`{source}` is not a safetensors checkpoint directory, which a "
                         "streamed run (or --device) reads block by block",
                help="use an hf: directory or zoo: model, or --stream off"),
                checked.source, checked.subject.span if checked.subject else None)
        return None
    est = held = plan_estimate(plan, d, opts.device)
    spill_root = opts.spill_activations
    if spill_root is None and opts.max_memory is not None and opts.max_memory < est.host_streamed:
        # the block inputs on disk may be what makes the budget fit (passes/calib/spill.py):
        # next to the output, on the disk that must hold the output anyway
        spilled = plan_estimate(plan, d, opts.device, spill=True)
        if spilled.host_streamed < est.host_streamed:
            save = output if output is not None else checked.save_path
            spill_root = str(Path(save).resolve().parent) if save else tempfile.gettempdir()
    if spill_root is not None:
        est = plan_estimate(plan, d, opts.device, spill=True)
    check_budget(est, opts.max_memory, opts.max_device_memory, opts.device, checked)
    # the in-memory path keeps its activations in memory (unless --spill-activations): judge
    # it by the estimate that holds them
    if not should_stream(opts.stream, held, opts.max_memory, opts.device):
        return None
    dirs = {}
    for name, decl in checked.models.items():
        md = local_dir(decl.source)
        if md is not None:
            dirs[name] = md
    runner = StreamRunner(checked, plan, d, seed=seed, progress=progress,
                          options=StreamOptions(
                              device=opts.device, dtype=opts.dtype,
                              max_shard_bytes=opts.max_shard_bytes or StreamOptions().max_shard_bytes,
                              max_memory=opts.max_memory,
                              max_device_memory=opts.max_device_memory),
                          model_dirs=dirs)
    out = str(output) if output is not None else None
    try:
        with spilling(spill_root):
            result = runner.run(out)
    finally:
        release_output(out or checked.save_path)
    result.report.streamed = {**runner.stats, "estimate": est.to_json(),
                              "spilled_activations_to": spill_root}
    return result

"""Peak memory of a streamed or in-memory run, estimated from config.json alone (the skeleton
built from it on the meta device: parameter counts per unit, layer widths).

The model (docs/scale.md "memory model"), in bytes, fp32 compute (4 bytes a parameter):

    streamed host peak = BASE + 4 * largest unit (a block, or embeddings / head)
                         + TRANSIENT * largest Linear of a quantized unit (codes, copies)
                         + calibration: 2 * samples * seqlen * hidden * 4 (block inputs and
                           outputs) + the Hessians of one block's layers in fp32
                           + one batch's activations inside a block
    in-memory host peak = BASE + 4 * all parameters + the same transients

BASE is the interpreter with torch and transformers imported (measured, see docs/scale.md).
The constants below were fitted on this machine's measurements (docs/bench/scale.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.nn as nn

BASE = 420 * 2**20  # python + torch + transformers + surgery, resident after import
TRANSIENT = 12  # bytes per weight of the largest Linear while it is quantized (int32 codes,
# an fp32 copy, the dequantized check): measured, see docs/scale.md


@dataclass
class Estimate:
    host_streamed: int
    host_in_memory: int
    device: int  # on the device when one is given (0 on CPU)
    min_unit: int  # the largest unit in the compute dtype: no budget below it can work
    parts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"host_streamed_bytes": self.host_streamed,
                "host_in_memory_bytes": self.host_in_memory, "device_bytes": self.device,
                "largest_unit_bytes": self.min_unit, "parts": self.parts}


def _numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def estimate(model: nn.Module, units, rows, data: dict, *, device: str = "cpu") -> Estimate:
    """``model``: a meta skeleton; ``units``: residency.plan_units; ``rows``: plan steps;
    ``data``: the program's data declarations (samples, seqlen)."""
    from surgery.passapi import Granularity

    unit_params = []
    for u in units:
        seen, n = set(), 0
        for p in u.paths:
            for t in (model.get_submodule(p) if p else model).parameters():
                if id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel()
        unit_params.append(n)
    largest_unit = 4 * max(unit_params, default=0)
    total = 4 * sum(unit_params)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    largest_linear = max((m.weight.numel() for m in linears), default=0)
    quantizes = any(r.step.verb == "quantize" or r.step.verb == "prune" for r in rows)
    transient = TRANSIENT * largest_linear if quantizes else 4 * largest_linear
    calib = 0
    calib_rows = [r for r in rows if r.step.pass_cls.granularity is Granularity.BLOCK]
    if calib_rows:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
        acts = 0
        for r in calib_rows:
            names = r.step.pass_cls.data_fields()
            for n in names:
                d = data.get(getattr(r.step.params, n, None))
                if d is not None:
                    samples = getattr(r.step.params, "samples", None) or d.samples
                    acts = max(acts, 2 * samples * d.seqlen * hidden * 4)
                    batch = getattr(r.step.params, "batch", 8)
                    inter = getattr(model.config, "intermediate_size", 4 * hidden)
                    acts += 3 * min(batch, samples) * d.seqlen * inter * 4
        block = next((u for u in units if u.is_block), None)
        hess = 0
        if block is not None:
            mods = [m for m in model.get_submodule(block.paths[0]).modules()
                    if isinstance(m, nn.Linear)]
            hess = sum(4 * m.in_features ** 2 for m in mods)
        calib = acts + hess
    parts = {"base": BASE, "largest_unit": largest_unit, "transient": transient,
             "calibration": calib, "all_parameters": total}
    on_device = device != "cpu"
    streamed = BASE + (0 if on_device else largest_unit + transient + calib) + \
        (largest_unit if on_device else 0)
    in_memory = BASE + total + transient + calib
    dev = (largest_unit + transient + calib) if on_device else 0
    return Estimate(streamed, in_memory, dev, largest_unit, parts)


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what a new allocation can get without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_size(text: str) -> int:
    """'6GB', '512MiB', '5e9' -> bytes (GB = 10^9, GiB = 2^30, as transformers does)."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[:-len(u)]) * mult)
    return int(float(t))


def fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

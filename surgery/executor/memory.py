"""Peak memory of a streamed or in-memory run, estimated from config.json alone (the skeleton
built from it on the meta device: parameter counts per unit, layer widths).

The model (docs/scale.md "memory model"), in bytes, fp32 compute (4 bytes a parameter):

    streamed host peak = BASE + 4 * largest unit (a block, or embeddings / head)
                         + TRANSIENT * largest Linear of a quantized unit (codes, copies)
                         + calibration: samples * seqlen * hidden * 4 (block inputs) for
                           each calibrated step, + the same again (the next block's inputs)
                           and one batch's activations inside a block for the step computing,
                           + the Hessians of one block's layers (hessian_bytes)
                         (spilled to disk, passes/calib/spill.py: the block inputs become two
                         batches' worth, one read back and the next one being computed)
                         (an untouched embedding the calibration forward reads is onloaded in
                         its stored dtype)
    in-memory host peak = BASE + 4 * all parameters + the same transients

BASE is the interpreter with torch and transformers imported (measured, see docs/scale.md).
The constants below were fitted on this machine's measurements (docs/bench/scale.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.nn as nn

from surgery.passes.calib.stats import gram_row_blocks

BASE = 560 * 2**20  # python + torch + transformers + surgery + a tokenizer, resident
# after import (measured: 548 MiB on this machine, docs/scale.md)
# evaluation tokens of a data set declared without eval_windows: what the built-in corpus gives
# (44 windows of 256 tokens with the SmolLM2 tokenizer); a text file may give more or fewer
EVAL_TOKENS_GUESS = 11264
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


def _inside(path: str, unit) -> bool:
    return any(not p or path == p or path.startswith(p + ".") for p in unit.paths)


def _evaluation(model: nn.Module, expectations, data: dict) -> tuple[int, int, int]:
    """The streamed evaluator (executor/evaluate.py): the two streams' hidden states of every
    window (held for the whole run), one batch's activations inside a block, and one window's
    logits of both streams with the reductions' copies of one chunk (at the end)."""
    from surgery.evaluate import EVAL_BATCH
    from surgery.executor.evaluate import ROWS
    from surgery.expectations import AGREEMENT_WINDOWS

    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    vocab = getattr(cfg, "vocab_size", hidden) or hidden
    windows: dict[str, tuple[int, int]] = {}
    for exp in expectations or ():
        d = data.get(exp.data)
        if d is None:
            continue
        n = d.eval_windows or max(1, EVAL_TOKENS_GUESS // d.seqlen)
        if exp.metric != "perplexity":
            n = min(n, AGREEMENT_WINDOWS)
        windows[exp.data] = (max(n, windows.get(exp.data, (0, 0))[0]), d.seqlen)
    states = sum(2 * n * seqlen * hidden * 4 for n, seqlen in windows.values())
    seqlen = max((s for _, s in windows.values()), default=0)
    block = 3 * min(EVAL_BATCH, max((n for n, _ in windows.values()), default=0)) \
        * seqlen * inter * 4
    # the two streams' logits of a window, and the reductions' copies of a chunk of positions
    return states, block, 2 * seqlen * vocab * 4 + 4 * min(seqlen, ROWS) * vocab * 4


def estimate(model: nn.Module, units, rows, data: dict, *, device: str = "cpu",
             stored_bytes: int = 2, expectations=(), spill: bool = False) -> Estimate:
    """``model``: a meta skeleton; ``units``: residency.plan_units; ``rows``: plan steps;
    ``data``: the program's data declarations (samples, seqlen); ``stored_bytes``: bytes per
    weight in the checkpoint (2 for bf16); ``expectations``: the program's `expect`s;
    ``spill``: calibration activations spilled to disk (passes/calib/spill.py)."""
    from surgery.executor.schedule import is_streamable_merge
    from surgery.passapi import Granularity

    rows = [r for r in rows if not r.step.pass_cls.is_output]
    calib_rows = [r for r in rows if r.step.pass_cls.granularity is Granularity.BLOCK]
    merges = [r for r in rows if is_streamable_merge(r.step.pass_cls, r.step.params)]
    heavy = [r for r in rows if r.step.verb in ("quantize", "prune")]
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    # Each calibrated step keeps its own block inputs for every sample, all the way through a
    # streamed run (executor/multistep.py); the one computing also holds the next block's
    # inputs and one batch inside the MLP.
    held, working = 0, 0
    stats_rows = [r for r in calib_rows if r.step.pass_cls.collects_statistics]
    for r in stats_rows:
        for n in r.step.pass_cls.data_fields():
            d = data.get(getattr(r.step.params, n, None))
            if d is None:
                continue
            p = r.step.params
            samples = getattr(p, "samples", None) or d.samples
            batch = min(getattr(p, "batch", None) or getattr(p, "batch_size", None) or 8,
                        samples)
            inter = getattr(model.config, "intermediate_size", 4 * hidden)
            inputs = samples * d.seqlen * hidden * 4
            if spill:  # on disk; resident: the batch read back and the next one computed
                working = max(working, 2 * batch * d.seqlen * hidden * 4
                              + 3 * batch * d.seqlen * inter * 4)
                break
            held += inputs
            working = max(working, inputs + 3 * batch * d.seqlen * inter * 4)
            break
    calib = held + working
    captured = held  # every step's first-block inputs, while the embeddings are resident
    ev_states, ev_block, ev_logits = _evaluation(model, expectations, data)
    kept = 0
    tail = 0  # the evaluator's end: the units after the blocks, twice when a step touches them
    costs, total, largest_unit = [], 0, 0
    for u in units:
        seen, params, biggest = set(), 0, 0
        for p in u.paths:
            for t in (model.get_submodule(p) if p else model).parameters():
                if id(t) not in seen:
                    seen.add(id(t))
                    params += t.numel()
                    biggest = max(biggest, t.numel())
        total += 4 * params
        largest_unit = max(largest_unit, 4 * params)
        touched = [p for r in rows for p in r.modules if _inside(p, u)]
        in_calib = u.is_block and bool(calib_rows)
        owners = [m for p in u.paths for m in (model.get_submodule(p) if p else model).modules()
                  if any(True for _ in m.parameters(recurse=False))]
        if ev_states and not u.is_block and any(not isinstance(m, nn.Embedding) for m in owners):
            tail += 4 * params * (2 if touched or merges else 1)
            if (touched or merges) and any(isinstance(m, nn.Embedding) for m in owners):
                kept += 4 * params  # a touched tied embedding/head stays resident all run
        # the calibration forward runs the embeddings (onloaded in fp32 for the capture)
        embeds = bool(calib_rows) and any(isinstance(m, nn.Embedding) for p in u.paths
                                          for m in (model.get_submodule(p) if p else
                                                    model).modules())
        if not touched and not merges and not in_calib and not embeds \
                and not (ev_states and u.is_block):  # the evaluator runs every block
            costs.append(stored_bytes * biggest)  # copied through, one tensor at a time
            continue
        if embeds and not touched and not merges:
            # only read by the capture forward: onloaded in its stored dtype (run.py
            # _onload_stored), plus the read of its largest tensor and the captured inputs
            costs.append(stored_bytes * (params + biggest) + captured)
            continue
        # reading a tensor maps its pages and copies them (2x), before the fp32 upcast
        cost = 4 * params + 2 * stored_bytes * biggest
        heavy_targets = [model.get_submodule(p) for r in heavy for p in r.modules
                         if _inside(p, u)]
        widest = max((sum(t.numel() for t in m.parameters()) for m in heavy_targets), default=0)
        cost += TRANSIENT * widest
        # the merged models' tensors, upcast; an elementwise method (linear) merges large
        # tensors a block of rows at a time (executor/run.py), so only the output is whole
        whole = [r for r in merges if not r.step.pass_cls.merger_cls.elementwise]
        cost += 2 * 4 * biggest if whole else 0
        if in_calib:
            mods = [m for m in model.get_submodule(u.paths[0]).modules()
                    if isinstance(m, nn.Linear)]
            cost += (hessian_bytes([m.in_features for m in mods]) if stats_rows else 0) + calib
        if embeds:
            cost += captured  # the captured block inputs, while the embeddings are resident
        if ev_states and u.is_block:
            cost += ev_block
        costs.append(cost)
    if ev_states:
        costs = [c + ev_states + kept for c in costs + [tail - kept + ev_logits]]
    peak_unit = max(costs, default=0)
    parts = {"base": BASE, "peak_unit": peak_unit, "largest_unit_fp32": largest_unit,
             "calibration_activations": calib, "all_parameters_fp32": total,
             "evaluation_hidden_states": ev_states}
    on_device = device != "cpu"
    streamed = BASE + (largest_unit + ev_states if on_device else peak_unit)
    in_memory = BASE + total + max(0, peak_unit - largest_unit)
    dev = peak_unit if on_device else 0
    return Estimate(streamed, in_memory, dev, largest_unit, parts)


def hessian_bytes(widths: list[int]) -> int:
    """Peak bytes of one block's layer Hessians (passes/calib): while collecting, a float64 XᵀX
    per layer plus one row block of a batch's float32 XᵀX (stats.gram_row_blocks); while solving
    the widest layer, its float64 sum converted in place to float32 (take_hessian), then two
    float32 copies (permutation, Cholesky factors): 8 bytes an element either way. The layers
    solved before it have freed theirs."""
    if not widths:
        return 0
    w = max(widths)
    batch_gram = 4 * w * gram_row_blocks(w)
    return max(sum(8 * v * v for v in widths), 8 * w * w) + batch_gram


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

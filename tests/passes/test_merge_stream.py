"""Streamed merging over safetensors shards: identical to the in-memory merge, bounded memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.models import load_model
from surgery.passapi import PassError
from surgery.passes.merge.common import merge_state_dicts, tensor_kinds
from surgery.passes.merge.stream import stream_merge
from surgery.registry import get_pass


def tiny(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    ms = []
    for i in range(3):
        m = tiny(i)
        m.save_pretrained(d / f"m{i}", max_shard_size="20KB")
        ms.append(m)
    return d, ms


@pytest.mark.parametrize("method,kw", [("linear", {}), ("task_arithmetic", {"scale": 0.7}),
                                       ("ties", {"density": 0.3}), ("dare", {"p": 0.4}),
                                       ("pcb", {}), ("widen", {})])
def test_stream_equals_in_memory(ckpts, tmp_path, method, kw):
    d, ms = ckpts
    base = None if method == "linear" else d / "m0"
    rep = stream_merge(method, [d / "m1", d / "m2"], tmp_path / "out", base=base,
                       shard_bytes=30_000, seed=3, **kw)
    assert rep["shards"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    P = get_pass("merge", method)
    merger = P.merger_cls(P.Params(models=["a", "b"], base=None if base is None else "c", **kw),
                          seed=3)
    want, _ = merge_state_dicts(merger, None if base is None else ms[0].state_dict(),
                                [ms[1].state_dict(), ms[2].state_dict()], tensor_kinds(ms[0]))
    got = load_model(f"hf:{tmp_path / 'out'}").model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_stream_keeps_tokenizer_and_chat_template(ckpts, tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import tiny_tokenizer

    d, _ = ckpts
    src = tmp_path / "m1"
    for f in (d / "m1").iterdir():
        (src / f.name).parent.mkdir(exist_ok=True)
        (src / f.name).write_bytes(f.read_bytes())
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(src)
    assert (src / "chat_template.jinja").exists()
    stream_merge("linear", [src, d / "m2"], tmp_path / "out")
    got = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert got.chat_template == tok.chat_template
    assert got("a merged model") == tok("a merged model")


def test_stream_bad_input(ckpts, tmp_path):
    d, _ = ckpts
    tiny(5, intermediate_size=48).save_pretrained(tmp_path / "odd")
    with pytest.raises(PassError, match="mlp.down_proj.weight"):
        stream_merge("linear", [d / "m1", tmp_path / "odd"], tmp_path / "out")
    with pytest.raises(PassError, match="needs a base"):
        stream_merge("ties", [d / "m1", d / "m2"], tmp_path / "out")
    with pytest.raises(PassError, match="scope=global"):
        stream_merge("ties", [d / "m1", d / "m2"], tmp_path / "out", base=d / "m0", scope="global")
    with pytest.raises(PassError, match="cannot be streamed"):
        stream_merge("pleas", [d / "m1", d / "m2"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


MEASURE = textwrap.dedent("""
    import json, sys, threading, time, torch
    from surgery.passes.merge.stream import stream_merge

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    d = sys.argv[1]
    stream_merge("ties", [d + "/w0", d + "/w1"], d + "/warm", base=d + "/wb", shard_bytes=1 << 20)
    peak, stop = [0], [False]
    start = rss()
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    t = threading.Thread(target=sample); t.start()
    rep = stream_merge(sys.argv[3], [d + "/m1", d + "/m2"], d + "/out", base=d + "/m0",
                       shard_bytes=int(sys.argv[2]))
    stop[0] = True; t.join()
    print(json.dumps({"growth": peak[0] - start, "report": rep}))
""")


@pytest.mark.parametrize("method", [pytest.param("task_arithmetic", marks=pytest.mark.slow), "ties"])
def test_streamed_merge_stays_under_a_memory_cap_smaller_than_one_model(tmp_path, method):
    """Three 64 MiB checkpoints (32 tensors of 2 MiB, two shards each) merge with resident
    memory growing by less than 48 MiB: three quarters of ONE model, a quarter of the inputs.
    (Measured on a 2-core CPU: task_arithmetic 20 MiB, ties 30 MiB.)"""
    g = torch.Generator().manual_seed(0)
    mib = 1 << 20
    for name, n, numel in (("m0", 32, mib // 2), ("m1", 32, mib // 2), ("m2", 32, mib // 2),
                           ("wb", 2, 1024), ("w0", 2, 1024), ("w1", 2, 1024)):
        (tmp_path / name).mkdir()
        for shard in range(2):
            tensors = {f"layer{shard * n // 2 + i}.weight": torch.randn(numel // 512, 512,
                                                                         generator=g)
                       for i in range(n // 2)}
            save_file(tensors, str(tmp_path / name / f"part{shard}.safetensors"))
    cap = 48 * mib
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), str(4 * mib), method],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["report"]["tensors"] == 32 and res["report"]["shards"] == 16
    assert res["growth"] < cap, f"RSS grew by {res['growth'] / mib:.1f} MiB (cap {cap / mib} MiB)"

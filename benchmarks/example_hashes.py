"""sha256 of every example's outputs, to show a refactoring leaves the bytes unchanged.

    python benchmarks/example_hashes.py --workdir /tmp/ex [NAME ...] [--out tests/data/example_hashes.json]

Each example (examples/NAME.surg) runs in its own subprocess, single-threaded, with ``--workdir``
as the working directory (the scripts write to relative ``out/...`` paths). The merge examples
read ``out/merge-bench/ft_*`` there: make them first with
``python benchmarks/merge.py --part lora --save out/merge-bench`` (run from the workdir).

What is hashed: ``model.safetensors`` of a ``save`` directory (not ``surgery.json``, which holds
the plan and versions), every file of an ``export`` output (the ONNX file without its doc strings
and metadata, see ``onnx_sha256``; a PEFT adapter's weights). Examples that need a CUDA GPU (``lower ... to triton``) are recorded
as skipped on machines without one. With ``--out`` the results are merged into that JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MERGE_BENCH = Path("out/merge-bench")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_sha256(path: Path) -> str:
    """sha256 of an ONNX model without doc strings and metadata: torch.onnx records stack traces
    (with the installed package's file paths) there, so the raw bytes depend on where surgery is
    installed, while the graph and the initializers do not."""
    import onnx

    m = onnx.load(str(path))
    for n in m.graph.node:
        n.doc_string = ""
        del n.metadata_props[:]
    for i in m.graph.initializer:
        del i.metadata_props[:]
    for v in m.graph.value_info:
        del v.metadata_props[:]
    del m.metadata_props[:]
    m.graph.doc_string = ""
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def hash_output(path: Path) -> dict[str, str]:
    """Hashes of one output: a save directory's weights, or every file an export wrote."""
    if path.is_file():
        return {path.name: onnx_sha256(path) if path.suffix == ".onnx" else sha256(path)}
    if (path / "surgery.json").exists():  # a save: its weight files (the layout says which)
        return {f.name: sha256(f) for f in sorted(path.glob("*.safetensors"))}
    return {str(f.relative_to(path)): sha256(f) for f in sorted(path.rglob("*"))
            if f.is_file() and f.suffix in (".safetensors", ".onnx", ".data", ".bin")}


def why_skipped(name: str, workdir: Path) -> str | None:
    text = (EXAMPLES / f"{name}.surg").read_text()
    if "to triton" in text:
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (lower ... to triton)"
    if str(MERGE_BENCH) in text and not (workdir / MERGE_BENCH).exists():
        return f"needs {MERGE_BENCH}/ (benchmarks/merge.py --part lora --save {MERGE_BENCH})"
    return None


def run_one(name: str) -> dict:
    """Run examples/NAME.surg in the current directory and hash what it wrote."""
    import torch

    import surgery

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = surgery.compile(EXAMPLES / f"{name}.surg").apply(seed=0)
    seconds = time.perf_counter() - t0
    outputs = {}
    for out in result.report.outputs:
        for k, v in hash_output(Path(out)).items():
            outputs[f"{out}/{k}" if Path(out).is_dir() else out] = v
    return {"outputs": outputs, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", help="example names (default: all)")
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", type=Path, help="merge results into this JSON file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: run one example
    args = ap.parse_args()
    if args.one:
        os.chdir(args.workdir)
        print(json.dumps(run_one(args.one)))
        return
    names = args.names or sorted(p.stem for p in EXAMPLES.glob("*.surg"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in names:
        skip = why_skipped(name, args.workdir)
        if skip:
            entry = {"skipped": skip}
        else:
            proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir),
                                   "--one", name], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                entry = {"failed": proc.stderr.strip().splitlines()[-20:]}
            else:
                entry = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

"""Calibration and evaluation data, tokenized with the model's tokenizer, deterministic.

``corpus("pydoc", samples=64, seqlen=256, seed=0)`` uses CPython's ``pydoc_data.topics`` (about
465 KB of English documentation, no download). ``text("notes.txt", ...)`` reads a UTF-8 file.

The token stream is split once: the last ``eval_fraction`` of it (default 10 %) is the evaluation
split, cut into non-overlapping windows of ``seqlen`` tokens; calibration samples are random windows
drawn (with ``seed``) from the first part only. The two never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.diagnostics import Code, error

CORPORA = ("pydoc",)


@dataclass
class Dataset:
    name: str
    calibration: torch.Tensor  # (samples, seqlen) int64 token ids
    evaluation: torch.Tensor  # (windows, seqlen) int64 token ids, disjoint from calibration
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def seqlen(self) -> int:
        return int(self.calibration.shape[1])

    def batches(self, batch_size: int = 8, split: str = "calibration"):
        t = self.calibration if split == "calibration" else self.evaluation
        for i in range(0, t.shape[0], batch_size):
            yield t[i:i + batch_size]


def pydoc_text() -> str:
    """All pydoc topics, in sorted key order, joined by blank lines."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def pydoc_topics() -> dict[str, str]:
    from pydoc_data import topics

    return dict(sorted(topics.topics.items()))


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise error(Code.E0700, "this data needs a tokenizer, and the model has none",
                    help="data declarations work with `zoo:` and `hf:` models that ship a tokenizer")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_stream(ids: torch.Tensor, *, name: str, samples: int, seqlen: int, seed: int,
                 eval_fraction: float = 0.1, eval_windows: int | None = None,
                 description: str = "") -> Dataset:
    if samples < 1 or seqlen < 2:
        raise error("E0301", f"data `{name}`: samples must be >= 1 and seqlen >= 2")
    n = ids.numel()
    n_eval = int(n * eval_fraction)
    calib_part, eval_part = ids[: n - n_eval], ids[n - n_eval:]
    if calib_part.numel() < seqlen + 1 or eval_part.numel() < seqlen:
        raise error(Code.E0700, f"data `{name}` has {n} tokens, too few for seqlen={seqlen}",
                    help="use a shorter seqlen or a longer text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, calib_part.numel() - seqlen, (samples,), generator=g)
    calibration = torch.stack([calib_part[s:s + seqlen] for s in starts.tolist()])
    windows = eval_part.numel() // seqlen
    if eval_windows is not None:
        windows = min(windows, eval_windows)
    evaluation = eval_part[: windows * seqlen].view(windows, seqlen)
    return Dataset(name, calibration, evaluation, description,
                   {"tokens": n, "eval_tokens": int(evaluation.numel()), "seed": seed})


def corpus(tokenizer, source: str = "pydoc", *, samples: int = 64, seqlen: int = 256, seed: int = 0,
           name: str = "corpus", eval_windows: int | None = None) -> Dataset:
    if source not in CORPORA:
        from surgery.diagnostics import did_you_mean

        raise error("E0206", f"no built-in corpus named `{source}`",
                    help=did_you_mean(source, CORPORA, listing="built-in corpora"))
    ids = tokenize_stream(tokenizer, pydoc_text())
    return split_stream(ids, name=name, samples=samples, seqlen=seqlen, seed=seed,
                        eval_windows=eval_windows, description=f"corpus(\"{source}\")")


def text_file(tokenizer, path: str | Path, *, samples: int = 64, seqlen: int = 256, seed: int = 0,
              name: str = "text", eval_windows: int | None = None) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise error("E0602", f"text file `{path}` does not exist")
    if not p.is_file():
        raise error(Code.E0700, f"`{path}` is {'a directory' if p.is_dir() else 'not a regular file'}, "
                             "not a text file", help="text(...) reads one UTF-8 file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(Code.E0700, f"`{path}` is not UTF-8 text (byte {e.start} cannot be decoded)",
                    help="convert the file to UTF-8") from None
    except OSError as e:
        raise error(Code.E0700, f"cannot read `{path}`: {e.strerror}") from None
    ids = tokenize_stream(tokenizer, text)
    return split_stream(ids, name=name, samples=samples, seqlen=seqlen, seed=seed,
                        eval_windows=eval_windows, description=f"text(\"{path}\")")

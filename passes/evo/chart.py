"""The per-layer allocation chart (PNG): each unit's chosen level and its error at that level."""

from __future__ import annotations

import io
from typing import Sequence


def allocation_png(names: Sequence[str], levels: Sequence[float], errors: Sequence[float | None],
                   *, level_label: str, title: str,
                   error_label: str = "relative output error") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, n * 0.06 + 4), 6), sharex=True)
    xs = list(range(n))
    ax1.bar(xs, levels, color="#3b6ea5", width=0.9)
    ax1.set_ylabel(level_label)
    ax1.set_title(title)
    errs = [e if e is not None else 0.0 for e in errors]
    if any(e > 0 for e in errs):
        ax2.bar(xs, errs, color="#c0504d", width=0.9)
        ax2.set_yscale("log")
    ax2.set_ylabel(error_label)
    step = max(1, n // 30)
    ax2.set_xticks(xs[::step])
    ax2.set_xticklabels([names[i] for i in xs[::step]], rotation=90, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def short(path: str) -> str:
    """`model.layers.12.self_attn.q_proj` -> `12.q_proj` (chart labels)."""
    parts = path.split(".")
    if parts[-1].isdigit():  # a block: `model.layers.12` -> `12`
        return parts[-1]
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[-1]}.{parts[-1]}" if nums else parts[-1]

"""Export a (possibly transformed) model to ONNX and verify it in ONNX Runtime.

``export_onnx(model, path, ...)``:

1. swaps registered module types for export-time equivalents (translations.EXPORT_MODULES;
   QuantLinear -> MatMulNBits or DequantizeLinear + MatMul layouts), restoring them afterwards;
2. traces ``input_ids -> logits`` (HF causal LMs), ``input_ids -> last_hidden_state`` (HF
   encoders) or ``x -> y`` (plain modules) with ``torch.onnx.export(dynamo=True)`` and our
   custom-op translation table;
3. folds int8-container casts into real INT4/UINT4 initializers;
4. runs the file in ONNX Runtime (CPU) on the example input and compares with PyTorch;
5. renames the file into place only if it matches (surgery.atomic), so a failed export leaves
   no half-written or wrong artifact.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from surgery.atomic import atomic_file
from surgery.modelcall import ModelKind, first_output, forward_ids
from surgery.backends.onnx.translations import EXPORT_MODULES, TRANSLATIONS, ExportOptions
from surgery.passapi import PassError, replace_module

# Translation modules of other families, imported when present.
@dataclass
class ExportReport:
    path: str
    bytes: int
    opset: int
    op_counts: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    verified: bool = False
    dynamic: bool = False  # batch (and sequence) axes are dynamic in the file

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Logits(nn.Module):
    """``input_ids -> logits`` (or last hidden state) without KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return first_output(forward_ids(self.model, input_ids))


class _Plain(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return first_output(forward_ids(self.model, x))


def _is_hf(model: nn.Module) -> bool:
    return ModelKind.of(model).takes_ids


def example_input(model: nn.Module, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    """A deterministic example: token ids for HF models, else a float batch for the first
    Linear/Conv-style layer (``in_features``)."""
    g = torch.Generator().manual_seed(seed)
    # Batch 2: a dimension of size 1 would be specialised and could not stay dynamic.
    if _is_hf(model):
        return torch.randint(0, model.config.vocab_size, (2, seqlen), generator=g)
    for _, m in model.named_modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            return torch.randn(2, n, generator=g)
    raise PassError(f"cannot infer an example input for {type(model).__name__}",
                    hint="call surgery.backends.onnx.export_onnx(model, path, example=...)")


@contextlib.contextmanager
def export_modules(model: nn.Module, options: ExportOptions) -> Iterator[int]:
    """Swap module types for their export equivalents; restore on exit.

    A module type says how it exports either by a method ``surgery_export_module(options)``
    (a pass family's own layer, e.g. QuantLinear: the backend never imports the family) or by a
    function registered with ``register_export_module``."""
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for path, mod in list(model.named_modules()):
            fn = EXPORT_MODULES.get(type(mod)) or getattr(type(mod), "surgery_export_module", None)
            if fn is not None and path:
                replace_module(model, path, fn(mod, options))
                swapped.append((path, mod))
        yield len(swapped)
    finally:
        for path, mod in reversed(swapped):
            replace_module(model, path, mod)


def _fold_int4_casts(model) -> None:
    """Cast(initializer int8/uint8 -> INT4/UINT4) becomes an INT4/UINT4 initializer."""
    from onnxscript import ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to = ir.DataType(node.attributes["to"].as_int())
        src = node.inputs[0]
        if to not in (ir.DataType.INT4, ir.DataType.UINT4) or src.const_value is None:
            continue
        arr = src.const_value.numpy().astype(np.int8 if to == ir.DataType.INT4 else np.uint8)
        out = node.outputs[0]
        value = ir.Value(name=f"{src.name}_int4", shape=ir.Shape(arr.shape),
                         type=ir.TensorType(to), const_value=ir.tensor(arr, dtype=to,
                                                                       name=f"{src.name}_int4"))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        if not src.uses() and src.name in graph.initializers:
            del graph.initializers[src.name]


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def ort_session(path: str | Path, accuracy_level: int = 0, threads: int | None = None):
    """A CPU session. ORT fuses QDQ ``DequantizeLinear + MatMul`` into MatMulNBits with
    ``session.qdq_matmulnbits_accuracy_level`` (default 4: int8 activations), so we pin it to the
    export's accuracy level; users running QDQ files should set the same entry."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_ort(path: str | Path, x: torch.Tensor, accuracy_level: int = 0) -> np.ndarray:
    sess = ort_session(path, accuracy_level)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, *, example: torch.Tensor | None = None,
                int4: str = "matmulnbits", accuracy_level: int = 0, opset: int = 21,
                verify: bool = True, tolerance: float = 1e-3, dynamic: bool = True
                ) -> ExportReport:
    """Export ``model`` to ``path`` (see the module docstring). Raises PassError on failure."""
    if int4 not in ("matmulnbits", "qdq"):
        raise PassError(f'int4 must be "matmulnbits" or "qdq", not {int4!r}')
    options = ExportOptions(int4=int4, accuracy_level=accuracy_level, opset=opset)
    was_training = model.training
    model.eval()
    hf = _is_hf(model)
    x = example if example is not None else example_input(model)
    wrapper = _Logits(model) if hf else _Plain(model)
    reference = wrapper(x).float().numpy() if verify else None
    name = "input_ids" if hf else "input"
    try:
        with export_modules(model, options), _quiet():
            prog, is_dynamic = _trace(wrapper, x, name, opset, dynamic)
    except PassError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing failures become one clear diagnostic
        raise PassError(f"ONNX export failed while tracing {type(model).__name__}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        hint="export a smaller submodule, or report the unsupported op") from e
    finally:
        model.train(was_training)
    _fold_int4_casts(prog.model)
    report = ExportReport(path=str(path), bytes=0, opset=opset, op_counts=_op_counts(prog.model),
                          dynamic=is_dynamic)
    with atomic_file(path) as tmp:
        prog.save(str(tmp))
        report.bytes = tmp.stat().st_size
        if verify:
            try:
                out = run_ort(tmp, x, accuracy_level)
            except Exception as e:  # noqa: BLE001
                raise PassError(f"ONNX Runtime cannot run the exported model: "
                                f"{str(e).splitlines()[0][:300]}") from e
            diff = np.abs(out.astype(np.float64) - reference)
            report.max_abs_diff = float(diff.max())
            report.max_rel_diff = float(diff.max() / max(np.abs(reference).max(), 1e-12))
            report.verified = report.max_rel_diff <= tolerance
            if not report.verified:
                raise PassError(f"ONNX Runtime output differs from PyTorch: max relative "
                                f"difference {report.max_rel_diff:.2e} > {tolerance:g}",
                                hint="accuracy_level=4 quantizes activations; raise tolerance")
    return report


def _trace(wrapper: nn.Module, x: torch.Tensor, name: str, opset: int, dynamic: bool):
    kwargs = dict(dynamo=True, opset_version=opset, custom_translation_table=dict(TRANSLATIONS),
                  input_names=[name], output_names=["output"], optimize=True, verbose=False)
    if dynamic:
        dims = {0: torch.export.Dim("batch", min=1, max=1024)}
        if x.dim() > 1 and name == "input_ids":
            dims[1] = torch.export.Dim("sequence", min=2, max=8192)
        try:
            return torch.onnx.export(wrapper, (x,), dynamic_shapes=(dims,), **kwargs), True
        except Exception:  # noqa: BLE001 - some models only trace with static shapes
            pass
    return torch.onnx.export(wrapper, (x,), **kwargs), False


@contextlib.contextmanager
def _quiet():
    """The exporter logs progress and warnings itself; passes never print."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), \
                redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)

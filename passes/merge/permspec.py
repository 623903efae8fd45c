"""Permutation groups derived automatically from a torch.fx trace (the PLeaS "compiler").

Every tensor axis in the traced graph (activations and parameters) gets an id; each op links the
axes that must carry the same permutation (union-find). A component that touches no model input or
output axis, holds parameter axes and has size > 1 is a permutation group: permuting all its
parameter axes together leaves the function unchanged. Residual additions join streams into one
group; BatchNorm/LayerNorm parameters and running statistics are carried along.

Models that do not trace as a whole (Hugging Face transformers) are handled block by block: each
MLP block (a module whose class name ends in "MLP") is traced on its own; its input and output
(the residual stream) are then IO axes, so only the hidden units are permuted and attention is left
unpermuted (a note says so).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

Axis = tuple  # ("s", tensor, axis) | ("n", unit, node, axis) | ("io", ...)


class PermSpecError(Exception):
    """The model cannot be traced or contains an op without a permutation rule."""


@dataclass
class PermGroup:
    key: str  # "tensor:axis" of the producing parameter axis
    size: int
    state: list[tuple[str, int]]  # (tensor name, axis) permuted together
    nodes: list[tuple[str, str, int]] = field(default_factory=list)  # (unit, node, axis<0)


@dataclass
class PermSpec:
    groups: list[PermGroup]
    units: dict[str, fx.GraphModule]  # traced unit path ("" = whole model) -> graph module
    notes: list[str] = field(default_factory=list)

    def axes_by_tensor(self) -> dict[str, dict[int, int]]:
        """tensor name -> {axis: group index}."""
        out: dict[str, dict[int, int]] = {}
        for gi, g in enumerate(self.groups):
            for name, ax in g.state:
                out.setdefault(name, {})[ax] = gi
        return out


class _UF:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


_ELEMENTWISE_NAMES = ("ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "Identity", "Dropout", "ELU",
                      "Softplus", "Mish", "Hardswish", "Swish", "Activation", "Hardtanh")
_ELEMENTWISE_FUNCS = {F.relu, F.gelu, F.silu, F.dropout, F.leaky_relu, F.elu, F.softplus,
                      torch.relu, torch.sigmoid, torch.tanh, torch.sqrt, torch.exp, F.sigmoid,
                      F.tanh, torch.abs, torch.neg, operator.neg}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "pow", "sqrt", "to", "type", "contiguous",
                        "float", "clone", "exp", "abs", "neg", "detach"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d,
               F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveAvgPool1d, nn.AvgPool1d, nn.MaxPool1d)


class _Linker(fx.Interpreter):
    """Runs the graph on real (or meta) tensors and links axes per op."""

    def __init__(self, gm: fx.GraphModule, unit: str, uf: _UF, io: set):
        super().__init__(gm)
        self.unit, self.uf, self.io = unit, uf, io
        self.shapes: dict[str, tuple] = {}

    # axis ids -------------------------------------------------------------------------
    def nid(self, node, i):
        return ("n", self.unit, node.name, i)

    def sid(self, target, i):
        name = f"{self.unit}.{target}" if self.unit else target
        return ("s", name, i)

    def link(self, a, b):
        self.uf.union(a, b)

    def block(self, a):
        self.io.add(a)

    def tensor_args(self, node):
        return [a for a in node.args if isinstance(a, fx.Node) and a.name in self.shapes]

    # running ----------------------------------------------------------------------------
    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        try:
            self._handle(n, out)
        except PermSpecError:
            raise
        except Exception as e:  # a rule hit an unexpected shape: say which node
            raise PermSpecError(f"no permutation rule applies to `{n.format_node()}`: {e}")
        return out

    def _handle(self, n, out):
        if n.op == "placeholder":
            for i in range(len(self.shapes.get(n.name, ()))):
                self.block(self.nid(n, i))
        elif n.op == "output":
            args = n.args[0] if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
            for a in args:
                if isinstance(a, fx.Node):
                    for i in range(len(self.shapes.get(a.name, ()))):
                        self.block(self.nid(a, i))
        elif n.op == "get_attr":
            for i in range(len(self.shapes.get(n.name, ()))):
                self.link(self.nid(n, i), self.sid(n.target, i))
        elif n.op == "call_module":
            self._module(n, self.module.get_submodule(n.target))
        elif n.op == "call_function":
            self._function(n)
        elif n.op == "call_method":
            self._method(n)

    def _passthrough(self, src, n, axes=None):
        rank = len(self.shapes[src.name])
        for i in (range(rank) if axes is None else axes):
            self.link(self.nid(src, i), self.nid(n, i))

    def _module(self, n, mod):
        x = n.args[0]
        t = n.target
        if isinstance(mod, nn.Linear):
            r = len(self.shapes[x.name])
            self._passthrough(x, n, range(r - 1))
            self.link(self.nid(x, r - 1), self.sid(f"{t}.weight", 1))
            self.link(self.nid(n, r - 1), self.sid(f"{t}.weight", 0))
            if mod.bias is not None:
                self.link(self.nid(n, r - 1), self.sid(f"{t}.bias", 0))
        elif isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(
                mod, nn.modules.conv._ConvTransposeNd):
            self.link(self.nid(x, 0), self.nid(n, 0))
            if mod.groups == 1:
                self.link(self.nid(x, 1), self.sid(f"{t}.weight", 1))
            elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise
                self.link(self.nid(x, 1), self.nid(n, 1))
            else:
                raise PermSpecError(f"grouped convolution `{self.unit_path(t)}` "
                                    f"(groups={mod.groups}) has no permutation rule")
            self.link(self.nid(n, 1), self.sid(f"{t}.weight", 0))
            if mod.bias is not None:
                self.link(self.nid(n, 1), self.sid(f"{t}.bias", 0))
            for i in range(2, len(self.shapes[x.name])):  # spatial axes never permute
                self.block(self.nid(x, i))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            self._passthrough(x, n)
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    self.link(self.nid(n, 1), self.sid(f"{t}.{p}", 0))
        elif isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or \
                type(mod).__name__.endswith("RMSNorm"):
            self._passthrough(x, n)
            r = len(self.shapes[x.name])
            shape = getattr(mod, "normalized_shape", None)
            k = len(shape) if shape is not None else 1
            for j in range(k):
                for p in ("weight", "bias"):
                    if isinstance(getattr(mod, p, None), torch.Tensor):
                        self.link(self.nid(n, r - k + j), self.sid(f"{t}.{p}", j))
        elif isinstance(mod, _POOL_MODULES):
            self._passthrough(x, n, (0, 1))
        elif isinstance(mod, nn.Flatten):
            self._reshape(x, n)
        elif any(k in type(mod).__name__ for k in _ELEMENTWISE_NAMES) and \
                not any(True for _ in mod.parameters()):
            self._passthrough(x, n)
        else:
            raise PermSpecError(f"module `{self.unit_path(t)}` ({type(mod).__name__}) has no "
                                "permutation rule")

    def unit_path(self, t):
        return f"{self.unit}.{t}" if self.unit else t

    def _binary(self, n, a, b):
        so = self.shapes[n.name]
        for side in (a, b):
            if not isinstance(side, fx.Node) or side.name not in self.shapes:
                continue
            s = self.shapes[side.name]
            off = len(so) - len(s)
            for i, size in enumerate(s):
                if size == so[off + i]:
                    self.link(self.nid(side, i), self.nid(n, off + i))

    def _reshape(self, x, n):
        """Link axes whose size and preceding element count agree; other input axes are mixed
        into a product and cannot be permuted."""
        si, so = self.shapes[x.name], self.shapes[n.name]

        def starts(s):
            out, acc = [], 1
            for v in s:
                out.append(acc)
                acc *= v
            return out

        pi, po = starts(si), starts(so)
        for i, (size, pre) in enumerate(zip(si, pi)):
            match = [j for j, (sz, pr) in enumerate(zip(so, po)) if sz == size and pr == pre]
            if match:
                self.link(self.nid(x, i), self.nid(n, match[0]))
            elif size > 1:
                self.block(self.nid(x, i))
        for j, sz in enumerate(so):
            if not any(sz == si[i] and po[j] == pi[i] for i in range(len(si))) and sz > 1:
                self.block(self.nid(n, j))

    def _reduce(self, x, n, dims, keepdim):
        r = len(self.shapes[x.name])
        dims = [d % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        j = 0
        for i in range(r):
            if i in dims:
                self.block(self.nid(x, i))
                if keepdim:
                    j += 1
                continue
            self.link(self.nid(x, i), self.nid(n, j))
            j += 1

    def _function(self, n):
        f = n.target
        args = n.args
        if f in _BINARY:
            self._binary(n, args[0], args[1])
        elif f in _ELEMENTWISE_FUNCS:
            self._passthrough(args[0], n)
        elif f in _POOL_FUNCS:
            self._passthrough(args[0], n, (0, 1))
        elif f is torch.flatten:
            self._reshape(args[0], n)
        elif f is torch.cat:
            dim = n.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            for src in args[0]:
                r = len(self.shapes[src.name])
                for i in range(r):
                    if i == dim % r:
                        self.block(self.nid(src, i))
                    else:
                        self.link(self.nid(src, i), self.nid(n, i))
        elif f in (getattr, operator.getitem) and n.name not in self.shapes:
            pass  # non-tensor values (sizes, attributes)
        else:
            name = getattr(f, "__name__", str(f))
            raise PermSpecError(f"function `{name}` at node `{n.name}` has no permutation rule")

    def _method(self, n):
        m = n.target
        x = n.args[0]
        if m in ("size", "dim") or n.name not in self.shapes:
            return
        if m in _ELEMENTWISE_METHODS:
            self._passthrough(x, n)
        elif m in _BINARY_METHODS:
            self._binary(n, x, n.args[1])
        elif m in ("view", "reshape", "flatten"):
            self._reshape(x, n)
        elif m in ("mean", "sum", "amax"):
            dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            if dims is None:
                for i in range(len(self.shapes[x.name])):
                    self.block(self.nid(x, i))
            else:
                self._reduce(x, n, dims, n.kwargs.get("keepdim", False))
        else:
            raise PermSpecError(f"method `.{m}()` at node `{n.name}` has no permutation rule")


def _example_for(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """A random input for a module whose first parametrised layer is a Linear (MLPs, MLP blocks)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, 3, m.in_features, device=m.weight.device, dtype=m.weight.dtype),)
        if isinstance(m, (nn.Conv2d, nn.Embedding)):
            break
    raise PermSpecError(f"{type(module).__name__}: pass an example input to derive permutation "
                        "groups (the first layer is not a Linear)")


def _state_order(model: nn.Module) -> dict[str, int]:
    return {k: i for i, k in enumerate(model.state_dict(keep_vars=True).keys())}


def derive_spec(model: nn.Module, example_inputs: tuple | None = None) -> PermSpec:
    """Permutation groups of `model`. Traces the whole model; if that fails, traces each MLP block
    on its own (transformers). Raises PermSpecError naming the module/op that has no rule."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        blocks = [(p, m) for p, m in model.named_modules() if type(m).__name__.endswith("MLP")]
        if not blocks:
            raise PermSpecError(f"{type(model).__name__} does not trace with torch.fx "
                                f"({str(e).splitlines()[0][:200]}) and has no MLP blocks")
        return _derive_units(model, {p: (fx.symbolic_trace(m), None) for p, m in blocks},
                             notes=[f"{type(model).__name__} traced block by block: "
                                    f"{len(blocks)} MLP blocks permuted on their hidden units; "
                                    "attention, embeddings and the residual stream are left "
                                    "unpermuted (merged by plain averaging)"])
    return _derive_units(model, {"": (gm, example_inputs)}, notes=[])


def _derive_units(model, units: dict, notes: list[str]) -> PermSpec:
    uf, io = _UF(), set()
    sizes: dict = {}
    ranks: dict = {}
    for unit, (gm, ex) in units.items():
        sub = model.get_submodule(unit) if unit else model
        ex = ex if ex is not None else _example_for(sub)
        linker = _Linker(gm, unit, uf, io)
        was = sub.training
        sub.eval()
        with torch.no_grad():
            linker.run(*ex)
        sub.train(was)
        for name, shp in linker.shapes.items():
            ranks[(unit, name)] = len(shp)
            for i, s in enumerate(shp):
                sizes[("n", unit, name, i)] = s
    state = dict(model.state_dict(keep_vars=True))
    for k, v in state.items():
        for i, s in enumerate(v.shape):
            sizes[("s", k, i)] = s
    comps: dict = {}
    for a in list(uf.parent):
        comps.setdefault(uf.find(a), []).append(a)
    blocked = {uf.find(a) for a in io}
    order = _state_order(model)
    groups = []
    for root, axes in comps.items():
        if root in blocked:
            continue
        st = sorted({(a[1], a[2]) for a in axes if a[0] == "s" and a[1] in state})
        if not st:
            continue
        szs = {sizes[("s", k, i)] for k, i in st}
        if len(szs) != 1:
            raise PermSpecError(f"inconsistent sizes {sorted(szs)} in one permutation group: "
                                + ", ".join(f"{k}:{i}" for k, i in st[:4]))
        size = szs.pop()
        if size <= 1:
            continue
        key = min(st, key=lambda ki: (order.get(ki[0], 1 << 30), -ki[1]))
        # Node axes counted from the end, so inputs with other leading (batch) dims still match.
        nodes = sorted({(a[1], a[2], a[3] - ranks[(a[1], a[2])]) for a in axes if a[0] == "n"})
        groups.append(PermGroup(f"{key[0]}:{key[1]}", size, st, nodes))
    groups.sort(key=lambda g: order.get(g.key.rsplit(":", 1)[0], 1 << 30))
    return PermSpec(groups, {u: gm for u, (gm, _) in units.items()}, notes)


# --- applying permutations ---------------------------------------------------------------------

def apply_perm(spec: PermSpec, perms: dict[int, torch.Tensor], state: dict) -> dict:
    """Permute every parameter axis of each group by its permutation (index_select)."""
    out = dict(state)
    for gi, g in enumerate(spec.groups):
        P = perms.get(gi)
        if P is None:
            continue
        for name, ax in g.state:
            out[name] = torch.index_select(out[name], ax, P.to(out[name].device))
    return out


def invert_perm(P: torch.Tensor) -> torch.Tensor:
    Q = torch.empty_like(P)
    Q[P] = torch.arange(P.numel(), device=P.device)
    return Q


def random_perms(spec: PermSpec, generator: torch.Generator) -> dict[int, torch.Tensor]:
    return {gi: torch.randperm(g.size, generator=generator) for gi, g in enumerate(spec.groups)}


def permute_model(model: nn.Module, spec: PermSpec, perms: dict[int, torch.Tensor]) -> None:
    """Permute a model in place (its function is unchanged)."""
    sd = apply_perm(spec, perms, model.state_dict())
    model.load_state_dict(sd)

"""The sparse expert dispatch as exported: the (token, expert) pairs sorted by expert, one Split.

PyTorch's `MoE.dispatch` runs each expert on the tokens `nonzero` finds for it; traced, that is
~19 nodes per expert (Equal, NonZero, Transpose, Squeeze, two GatherND, the expert, Mul, ScatterND,
...): 150 of the ~250 nodes of a `base` step, most of them run on zero rows for a decoded token.
Here the layer exports as a placeholder node (`ressformer::ExpertDispatch`, never saved) that
`expand` replaces with standard ONNX ops, 4 + 4E + ~16 nodes in all:

    flat = Reshape(experts, [-1])                          # (N e,) pair p = token p // e
    _, order = TopK(flat, N e, largest=0)                  # pairs sorted by expert; ties: lower index
    xs = Gather(x, order / e)                              # (N e, d) the pairs' rows, grouped by expert
    counts = ReduceSum(Equal(flat[:, None], arange(E)))    # (E,) rows per expert
    y_0 .. y_E-1 = Split(xs, counts)                       # one node; a part may have 0 rows
    y_j = Gelu(y_j @ w1[j] + b1[j]) @ w2[j] + b2[j]        # per expert: the weights as Gather(w, j) views
    out = ScatterND(zeros(N, d), order / e, Concat(y) * gates[order], reduction=add)

The same numbers as the per-expert loop: each expert's rows in token order, the gated outputs added
to zeros per token in expert order (ScatterND applies its updates in order, as index_add does per
expert). The weight views fold into initializers (ONNX Runtime at load; the quantizer before it
quantizes each expert's MatMuls, export/exporter.py `_fold_weight_views`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from onnx import helper, numpy_helper

from ressformer.model import MoE
from ressformer.ops import DOMAIN, OPSET_VERSION

PLACEHOLDER = "ExpertDispatch"


def _dispatch_placeholder(self, xf, gates, experts):
    """MoE.dispatch under export: one placeholder node (expanded by `expand`)."""
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{PLACEHOLDER}", (xf, gates, experts, self.w1, self.b1, self.w2, self.b2),
        {"n_experts": int(self.cfg.n_experts)}, dtype=xf.dtype, shape=xf.shape, version=OPSET_VERSION)


@contextlib.contextmanager
def sorted_dispatch():
    """Within, MoE.dispatch exports as the placeholder `expand` rewrites."""
    real = MoE.dispatch
    MoE.dispatch = _dispatch_placeholder
    try:
        yield
    finally:
        MoE.dispatch = real


class _Builder:
    """Appends nodes (outputs prefixed) to `out`; shared constants become initializers of g."""

    def __init__(self, g, out: list, opset: int):
        self.g, self.out, self.opset, self.prefix = g, out, opset, ""
        self.inits = {i.name for i in g.initializer}

    def const(self, name, value, dtype=np.int64):
        if name not in self.inits:
            self.g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
            self.inits.add(name)
        return name

    def __call__(self, op, ins, outs, **kw):
        names = [self.prefix + o for o in outs]
        self.out.append(helper.make_node(op, ins, names, name=names[0], **kw))
        return names if len(names) > 1 else names[0]

    def gelu(self, h, j):
        """Exact (erf) GELU: the Gelu op from opset 20; before it, as the torch exporter writes it."""
        if self.opset >= 20:
            return self("Gelu", [h], [f"g_{j}"])
        f = np.float32
        erf = self("Erf", [self("Div", [h, self.const("dispatch_sqrt2", math.sqrt(2.0), f)], [f"hs_{j}"])],
                   [f"erf_{j}"])
        half = self("Mul", [self("Add", [erf, self.const("dispatch_onef", 1.0, f)], [f"erf1_{j}"]),
                            self.const("dispatch_half", 0.5, f)], [f"half_{j}"])
        return self("Mul", [h, half], [f"g_{j}"])


def _expand_node(mk: _Builder, node, E: int) -> None:
    """The nodes of one sorted dispatch, writing the placeholder's output."""
    x, gates, experts, w1, b1, w2, b2 = node.input
    flat = mk("Reshape", [experts, mk.const("dispatch_minus_one", [-1])], ["flat"])  # (N e,)
    pairs = mk("Shape", [flat], ["pairs"])
    _, order = mk("TopK", [flat, pairs], ["sorted", "order"], largest=0, sorted=1)  # stable ascending
    e = mk("Shape", [experts], ["top_e"], start=1, end=2)
    tok = mk("Div", [order, e], ["tok"])  # (N e,) the token of each sorted pair
    xs = mk("Gather", [x, tok], ["xs"], axis=0)  # (N e, d)
    onehot = mk("Equal", [mk("Unsqueeze", [flat, mk.const("dispatch_one", [1])], ["flat_col"]),
                          mk.const(f"dispatch_arange_{E}", np.arange(E))], ["onehot"])  # (N e, E)
    counts = mk("ReduceSum", [mk("Cast", [onehot], ["onehot_i"], to=7), mk.const("dispatch_zero", [0])],
                ["counts"], keepdims=0)  # (E,) rows per expert
    parts = mk("Split", [xs, counts], [f"rows_{j}" for j in range(E)], axis=0)
    ys = []
    for j, rows in enumerate(parts):
        ej = mk.const(f"dispatch_expert_{j}", j)
        v = {w: mk("Gather", [w, ej], [f"{w}_{j}"], axis=0) for w in (w1, b1, w2, b2)}  # views: folded
        h = mk.gelu(mk("Add", [mk("MatMul", [rows, v[w1]], [f"h_{j}"]), v[b1]], [f"hb_{j}"]), j)
        ys.append(mk("Add", [mk("MatMul", [h, v[w2]], [f"y_{j}"]), v[b2]], [f"yb_{j}"]))
    y = mk("Concat", ys, ["ys"], axis=0)  # (N e, d) in sorted pair order
    gs = mk("Gather", [mk("Reshape", [gates, mk.const("dispatch_minus_one", [-1])], ["gates_flat"]), order],
            ["gates_sorted"], axis=0)
    y = mk("Mul", [y, mk("Unsqueeze", [gs, mk.const("dispatch_one", [1])], ["gates_col"])], ["gated"])
    zeros = mk("ConstantOfShape", [mk("Shape", [x], ["x_shape"])], ["zeros"],
               value=numpy_helper.from_array(np.zeros(1, np.float32)))
    tok_col = mk("Unsqueeze", [tok, mk.const("dispatch_one", [1])], ["tok_col"])
    mk.out.append(helper.make_node("ScatterND", [zeros, tok_col, y], [node.output[0]], name=mk.prefix + "sum",
                            reduction="add"))  # in update order: per token, the lower expert first


def expand(proto) -> int:
    """Replace every placeholder node of proto's graph with the sorted dispatch; returns how many."""
    g = proto.graph
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    out, n = [], 0
    mk = _Builder(g, out, opset)
    for node in list(g.node):
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            out.append(node)
            continue
        mk.prefix = f"dispatch{n}/"
        _expand_node(mk, node, next(helper.get_attribute_value(a) for a in node.attribute if a.name == "n_experts"))
        n += 1
    if n:
        del g.node[:]
        g.node.extend(out)
    return n

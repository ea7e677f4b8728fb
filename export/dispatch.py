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


def expand(proto) -> int:
    """Replace every placeholder node of proto's graph with the sorted dispatch; returns how many."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name for i in g.initializer}
    consts = {}

    def const(name, value):  # a shared int64 initializer
        if name not in consts:
            consts[name] = name
            if name not in inits:
                g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
                inits.add(name)
        return name

    def const_f(name, value):  # a shared float32 scalar initializer
        if name not in inits:
            g.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
            inits.add(name)
        return name

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    out, n = [], 0
    for node in g.node:
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            out.append(node)
            continue
        E = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "n_experts")
        x, gates, experts, w1, b1, w2, b2 = node.input
        p = f"dispatch{n}/"
        n += 1

        def mk(op, ins, outs, **kw):
            out.append(helper.make_node(op, ins, [p + o for o in outs], name=p + outs[0], **kw))
            return [p + o for o in outs] if len(outs) > 1 else p + outs[0]

        def gelu(h, j):  # exact (erf) GELU: the Gelu op from opset 20, before it as the exporter writes it
            if opset >= 20:
                return mk("Gelu", [h], [f"g_{j}"])
            half = mk("Mul", [mk("Add", [mk("Erf", [mk("Div", [h, const_f("dispatch_sqrt2", math.sqrt(2.0))],
                                                            [f"hs_{j}"])], [f"erf_{j}"]),
                                          const_f("dispatch_onef", 1.0)], [f"erf1_{j}"]),
                              const_f("dispatch_half", 0.5)], [f"half_{j}"])
            return mk("Mul", [h, half], [f"g_{j}"])

        flat = mk("Reshape", [experts, const("dispatch_minus_one", [-1])], ["flat"])  # (N e,)
        pairs = mk("Shape", [flat], ["pairs"])
        _, order = mk("TopK", [flat, pairs], ["sorted", "order"], largest=0, sorted=1)  # stable ascending
        e = mk("Shape", [experts], ["top_e"], start=1, end=2)
        tok = mk("Div", [order, e], ["tok"])  # (N e,) the token of each sorted pair
        xs = mk("Gather", [x, tok], ["xs"], axis=0)  # (N e, d)
        onehot = mk("Equal", [mk("Unsqueeze", [flat, const("dispatch_one", [1])], ["flat_col"]),
                              const(f"dispatch_arange_{E}", np.arange(E))], ["onehot"])  # (N e, E)
        counts = mk("ReduceSum", [mk("Cast", [onehot], ["onehot_i"], to=7), const("dispatch_zero", [0])],
                    ["counts"], keepdims=0)  # (E,)
        parts = mk("Split", [xs, counts], [f"rows_{j}" for j in range(E)], axis=0)
        ys = []
        for j, rows in enumerate(parts):
            ej = const(f"dispatch_expert_{j}", j)
            v = {w: mk("Gather", [w, ej], [f"{w}_{j}"], axis=0) for w in (w1, b1, w2, b2)}
            h = gelu(mk("Add", [mk("MatMul", [rows, v[w1]], [f"h_{j}"]), v[b1]], [f"hb_{j}"]), j)
            ys.append(mk("Add", [mk("MatMul", [h, v[w2]], [f"y_{j}"]), v[b2]], [f"yb_{j}"]))
        y = mk("Concat", ys, ["ys"], axis=0)  # (N e, d) in sorted pair order
        gs = mk("Gather", [mk("Reshape", [gates, const("dispatch_minus_one", [-1])], ["gates_flat"]), order],
                ["gates_sorted"], axis=0)
        y = mk("Mul", [y, mk("Unsqueeze", [gs, const("dispatch_one", [1])], ["gates_col"])], ["gated"])
        zeros = mk("ConstantOfShape", [mk("Shape", [x], ["x_shape"])], ["zeros"],
                   value=numpy_helper.from_array(np.zeros(1, np.float32)))
        out.append(helper.make_node("ScatterND", [zeros, mk("Unsqueeze", [tok, const("dispatch_one", [1])], ["tok_col"]), y],
                                    [node.output[0]], name=p + "sum", reduction="add"))
    if n:
        del g.node[:]
        g.node.extend(out)
    return n

"""The `ressformer` ONNX op domain (version 1), each op an onnxscript function.

Specifications: docs/custom_ops.md. numpy references: export/reference.py. The exporter appends
each function's FunctionProto to the model, so stock ONNX Runtime (or any runtime that
implements ONNX functions) runs them with no extra library.
"""

from __future__ import annotations

import onnx
from onnxscript import BOOL, DOUBLE, FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "ressformer"
OPSET_VERSION = 1
BASE_OPSET = 18  # the default-domain opset the function bodies are written against
SUPPORTED_OPSETS = (18, 19, 20, 21, 22, 23)  # default-domain opsets a model may use

ressformer = Opset(DOMAIN, OPSET_VERSION)


@script(ressformer, default_opset=op)
def Entmax15Sorted(X: FLOAT) -> FLOAT:
    """Entmax15 of X already sorted in descending order along the last axis (TopK's output, as in
    TopKAttention): the sort-free body of Entmax15."""
    Xh = X * op.CastLike(op.Constant(value_float=0.5), X)
    mx = op.ReduceMax(Xh, op.Constant(value_ints=[-1]), keepdims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), X)
    one = op.CastLike(op.Constant(value_float=1.0), X)
    # a row of only -inf has max -inf. Equal, not IsInf: IsInf-10 (opsets 18, 19) has no float16.
    valid = op.Not(op.Equal(mx, op.CastLike(op.Constant(value_float=float("-inf")), X)))
    mx0 = op.Where(valid, mx, zero)
    Zs = op.Max(op.Sub(Xh, mx0), op.CastLike(op.Constant(value_float=-2.0), X))  # a monotone map: still sorted
    n = op.Shape(X, start=-1)
    rho_i = op.Range(op.Constant(value_int=1), op.Add(op.Squeeze(n), op.Constant(value_int=1)),
                     op.Constant(value_int=1))
    rho = op.CastLike(rho_i, X)
    # the prefix sums accumulate in double (as torch's CPU cumsum does): a float32 CumSum was off by
    # 2.4e-6 on [1.9, 0 x 11] (mean_sq - mean^2 cancels), double 3e-7 (tests/test_onnx_ops.py)
    mean = op.CastLike(op.CumSum(op.Cast(Zs, to=DOUBLE.dtype), op.Constant(value_int=-1)), X) / rho
    mean_sq = op.CastLike(op.CumSum(op.Cast(Zs * Zs, to=DOUBLE.dtype), op.Constant(value_int=-1)), X) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = op.Max((one - ss) / rho, zero)
    tau = mean - op.Sqrt(delta)
    # Support size = length of the leading run of (tau <= Zs), counted in int64. Exactly, the
    # condition holds on a prefix; rounding (float16 cumsums of long rows) can make later
    # entries spuriously true, and float16 cannot count past 2048.
    lead = op.Equal(op.CumSum(op.Cast(op.Not(op.LessOrEqual(tau, Zs)), to=INT64.dtype),
                              op.Constant(value_int=-1)), op.Constant(value_int=0))
    support = op.ReduceSum(op.Cast(lead, to=INT64.dtype), op.Constant(value_ints=[-1]), keepdims=1)
    tau_star = op.ReduceSum(op.Where(op.Equal(rho_i, support), tau, zero), op.Constant(value_ints=[-1]),
                            keepdims=1)
    Yp = op.Max(Zs - tau_star, zero)
    Y = op.Where(valid, Yp * Yp, zero)
    return Y


@script(ressformer, default_opset=op)
def SparsemaxSorted(X: FLOAT) -> FLOAT:
    """Sparsemax of X already sorted in descending order along the last axis: the sort-free body
    of Sparsemax."""
    mx = op.ReduceMax(X, op.Constant(value_ints=[-1]), keepdims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), X)
    one = op.CastLike(op.Constant(value_float=1.0), X)
    valid = op.Not(op.Equal(mx, op.CastLike(op.Constant(value_float=float("-inf")), X)))
    mx0 = op.Where(valid, mx, zero)
    Zs = op.Max(op.Sub(X, mx0), op.CastLike(op.Constant(value_float=-2.0), X))
    n = op.Shape(X, start=-1)
    rho_i = op.Range(op.Constant(value_int=1), op.Add(op.Squeeze(n), op.Constant(value_int=1)),
                     op.Constant(value_int=1))
    rho = op.CastLike(rho_i, X)
    cs = op.CastLike(op.CumSum(op.Cast(Zs, to=DOUBLE.dtype), op.Constant(value_int=-1)), X) - one  # see Entmax15Sorted
    # Support size = length of the leading run of (rho * Zs > cs), in int64 (see Entmax15Sorted).
    lead = op.Equal(op.CumSum(op.Cast(op.Not(op.Greater(rho * Zs, cs)), to=INT64.dtype),
                              op.Constant(value_int=-1)), op.Constant(value_int=0))
    support = op.ReduceSum(op.Cast(lead, to=INT64.dtype), op.Constant(value_ints=[-1]), keepdims=1)
    tau = op.ReduceSum(op.Where(op.Equal(rho_i, support), cs, zero), op.Constant(value_ints=[-1]),
                       keepdims=1) / op.CastLike(support, X)
    Y = op.Where(valid, op.Max(Zs - tau, zero), zero)
    return Y


@script(ressformer, default_opset=op)
def Entmax15(X: FLOAT) -> FLOAT:
    """Y = entmax15(X) along the last axis: Y = [X/2 - tau]_+^2 with sum(Y) = 1. Sorts X
    (descending; ties: lower index first), applies Entmax15Sorted, and scatters back."""
    n = op.Shape(X, start=-1)
    Xs, order = op.TopK(X, n, axis=-1, largest=1, sorted=1)
    Ys = ressformer.Entmax15Sorted(Xs)
    return op.ScatterElements(op.Expand(op.CastLike(op.Constant(value_float=0.0), X), op.Shape(X)), order, Ys,
                              axis=-1)


@script(ressformer, default_opset=op)
def Sparsemax(X: FLOAT) -> FLOAT:
    """Y = sparsemax(X) along the last axis: Y = [X - tau]_+ with sum(Y) = 1. Sorts X, applies
    SparsemaxSorted, and scatters back."""
    n = op.Shape(X, start=-1)
    Xs, order = op.TopK(X, n, axis=-1, largest=1, sorted=1)
    Ys = ressformer.SparsemaxSorted(Xs)
    return op.ScatterElements(op.Expand(op.CastLike(op.Constant(value_float=0.0), X), op.Shape(X)), order, Ys,
                              axis=-1)


@script(ressformer, default_opset=op)
def SafeSoftmax(X: FLOAT) -> FLOAT:
    """Softmax along the last axis; a row of only -inf gives zeros (not NaN)."""
    mx = op.ReduceMax(X, op.Constant(value_ints=[-1]), keepdims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), X)
    valid = op.Not(op.Equal(mx, op.CastLike(op.Constant(value_float=float("-inf")), X)))
    Y = op.Where(valid, op.Softmax(op.Where(valid, X, zero), axis=-1), zero)
    return Y


@script(ressformer, default_opset=op)
def TopKRoute(logits: FLOAT, k: int) -> tuple[FLOAT, INT64]:
    """Top-k experts per row; gates = softmax over the selected logits (ties: lower index)."""
    kk = op.Reshape(op.Constant(value_int=k), op.Constant(value_ints=[1]))
    val, experts = op.TopK(logits, kk, axis=-1, largest=1, sorted=1)
    gates = ressformer.SafeSoftmax(val)  # a row of only -inf gives zero gates, not NaN
    return gates, experts


# Three variants with one body each: onnxscript cannot branch on a string attribute, and a
# runtime If/Where over all three normalizers would compute each of them (see topk_attention_proto).
@script(ressformer, default_opset=op)
def TopKAttentionEntmax15(Q: FLOAT, K: FLOAT, V: FLOAT, mask: BOOL, top_k: int, scale: float,
                          normalizer: str) -> tuple[FLOAT, INT64, FLOAT]:
    S = op.MatMul(Q, op.Transpose(K, perm=[0, 1, 3, 2])) * op.CastLike(op.Constant(value_float=scale), Q)
    # masked keys: an additive 0/-inf bias of shape (T, N), not a Where over (B, H, T, N)
    bias = op.Where(mask, op.CastLike(op.Constant(value_float=0.0), Q),
                    op.CastLike(op.Constant(value_float=float("-inf")), Q))
    S = op.Add(S, bias)
    n = op.Shape(K, start=-2, end=-1)
    tk = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    kk = op.Where(op.Greater(tk, op.Constant(value_ints=[0])), op.Min(tk, n), n)
    val, idx = op.TopK(S, kk, axis=-1, largest=1, sorted=1)
    W = ressformer.Entmax15Sorted(val)  # TopK returns val sorted: no second sort
    dense = op.ScatterElements(op.Expand(op.CastLike(op.Constant(value_float=0.0), Q), op.Shape(S)),
                               idx, W, axis=-1)
    O = op.MatMul(dense, V)  # noqa: E741 (the spec's output name)
    return O, idx, W


@script(ressformer, default_opset=op)
def TopKAttentionSparsemax(Q: FLOAT, K: FLOAT, V: FLOAT, mask: BOOL, top_k: int, scale: float,
                           normalizer: str) -> tuple[FLOAT, INT64, FLOAT]:
    S = op.MatMul(Q, op.Transpose(K, perm=[0, 1, 3, 2])) * op.CastLike(op.Constant(value_float=scale), Q)
    # masked keys: an additive 0/-inf bias of shape (T, N), not a Where over (B, H, T, N)
    bias = op.Where(mask, op.CastLike(op.Constant(value_float=0.0), Q),
                    op.CastLike(op.Constant(value_float=float("-inf")), Q))
    S = op.Add(S, bias)
    n = op.Shape(K, start=-2, end=-1)
    tk = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    kk = op.Where(op.Greater(tk, op.Constant(value_ints=[0])), op.Min(tk, n), n)
    val, idx = op.TopK(S, kk, axis=-1, largest=1, sorted=1)
    W = ressformer.SparsemaxSorted(val)
    dense = op.ScatterElements(op.Expand(op.CastLike(op.Constant(value_float=0.0), Q), op.Shape(S)),
                               idx, W, axis=-1)
    O = op.MatMul(dense, V)  # noqa: E741 (the spec's output name)
    return O, idx, W


@script(ressformer, default_opset=op)
def TopKAttentionSoftmax(Q: FLOAT, K: FLOAT, V: FLOAT, mask: BOOL, top_k: int, scale: float,
                         normalizer: str) -> tuple[FLOAT, INT64, FLOAT]:
    S = op.MatMul(Q, op.Transpose(K, perm=[0, 1, 3, 2])) * op.CastLike(op.Constant(value_float=scale), Q)
    # masked keys: an additive 0/-inf bias of shape (T, N), not a Where over (B, H, T, N)
    bias = op.Where(mask, op.CastLike(op.Constant(value_float=0.0), Q),
                    op.CastLike(op.Constant(value_float=float("-inf")), Q))
    S = op.Add(S, bias)
    n = op.Shape(K, start=-2, end=-1)
    tk = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    kk = op.Where(op.Greater(tk, op.Constant(value_ints=[0])), op.Min(tk, n), n)
    val, idx = op.TopK(S, kk, axis=-1, largest=1, sorted=1)
    W = ressformer.SafeSoftmax(val)
    dense = op.ScatterElements(op.Expand(op.CastLike(op.Constant(value_float=0.0), Q), op.Shape(S)),
                               idx, W, axis=-1)
    O = op.MatMul(dense, V)  # noqa: E741 (the spec's output name)
    return O, idx, W


_ATTENTION = {"entmax15": TopKAttentionEntmax15, "sparsemax": TopKAttentionSparsemax,
              "softmax": TopKAttentionSoftmax}
NORMALIZER_OPS = {"entmax15": "Entmax15Sorted", "sparsemax": "SparsemaxSorted", "softmax": "SafeSoftmax"}
TopKAttention = TopKAttentionEntmax15  # the default variant


def topk_attention_proto(normalizer: str) -> onnx.FunctionProto:
    """FunctionProto `ressformer::TopKAttention` whose body normalizes with `normalizer`.

    A model uses one normalizer; its TopKAttention body is that normalizer's variant, and the
    variant is recorded in the function's doc_string. Every TopKAttention node carries the
    matching `normalizer` attribute; `check_normalizers` refuses a model where they differ.
    """
    if normalizer not in _ATTENTION:
        raise ValueError(f"unknown normalizer {normalizer!r}; known: {sorted(_ATTENTION)}")
    proto = _ATTENTION[normalizer].to_function_proto()
    proto.name = "TopKAttention"
    proto.doc_string = f"normalizer={normalizer}"
    return proto


def function_protos(normalizer: str, opset: int = BASE_OPSET) -> list[onnx.FunctionProto]:
    """All functions of the domain for a model, callees before callers (the reference evaluator
    needs that order), with the default-domain import set to the model's opset."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"unsupported opset {opset}; supported: {SUPPORTED_OPSETS}")
    protos = [Entmax15Sorted.to_function_proto(), SparsemaxSorted.to_function_proto(), Entmax15.to_function_proto(),
              Sparsemax.to_function_proto(), SafeSoftmax.to_function_proto(), TopKRoute.to_function_proto(),
              topk_attention_proto(normalizer)]
    for p in protos:
        for imp in p.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    return protos


def check_normalizers(model: onnx.ModelProto) -> None:
    """Raise if a TopKAttention node's `normalizer` differs from what its function body computes.

    The body's normalizer is read from the body itself (the `ressformer` op it calls), and must
    also match the function's doc_string."""
    bodies = [f for f in model.functions if f.domain == DOMAIN and f.name == "TopKAttention"]
    body = None
    if bodies:
        calls = {n.op_type for n in bodies[0].node if n.domain == DOMAIN}
        found = [name for name, op_type in NORMALIZER_OPS.items() if op_type in calls]
        if len(found) != 1 or bodies[0].doc_string != f"normalizer={found[0]}":
            raise ValueError(f"TopKAttention function body calls {sorted(calls)} but its doc_string "
                             f"says {bodies[0].doc_string!r}")
        body = found[0]
    for node in _all_nodes(model.graph):
        if node.domain == DOMAIN and node.op_type == "TopKAttention":
            got = next((a.s.decode() for a in node.attribute if a.name == "normalizer"), "")
            if got != body:
                raise ValueError(f"TopKAttention node {node.name!r} asks normalizer={got!r} but the "
                                 f"model's function implements normalizer={body!r}")


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g.node:
                yield from _all_nodes(a.g)


OP_IO = {  # op -> (input names, output names)
    "Entmax15": (["X"], ["Y"]),
    "Sparsemax": (["X"], ["Y"]),
    "SafeSoftmax": (["X"], ["Y"]),
    "TopKRoute": (["logits"], ["gates", "experts"]),
    "TopKAttention": (["Q", "K", "V", "mask"], ["O", "idx", "W"]),
}


def make_op_model(op_type: str, dtype=onnx.TensorProto.FLOAT, opset: int = BASE_OPSET,
                  normalizer: str = "entmax15", rank: int = 2, **attrs) -> onnx.ModelProto:
    """A one-node model running `ressformer::op_type` with dynamic shapes (tests, parity rung 1)."""
    from onnx import helper

    ins, outs = OP_IO[op_type]
    if op_type == "TopKAttention":
        attrs = {"normalizer": normalizer, **attrs}
    rank = 4 if op_type == "TopKAttention" else rank

    def vi(name, elem, r=rank):
        return helper.make_tensor_value_info(name, elem, [None] * r)

    inputs = [vi(n, onnx.TensorProto.BOOL, 2) if n == "mask" else vi(n, dtype) for n in ins]
    outputs = [vi(n, onnx.TensorProto.INT64) if n in ("idx", "experts") else vi(n, dtype) for n in outs]
    node = helper.make_node(op_type, ins, outs, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], f"ressformer_{op_type}", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)],
                              functions=function_protos(normalizer, opset))
    model.ir_version = 10
    return model

"""The `ressformer` ONNX ops (export/ops.py), one-node models run in ONNX Runtime and in
onnx.reference.ReferenceEvaluator, against the numpy reference (export/reference.py) and the
PyTorch ops (ressformer/ops.py). Table-driven in the style of onnxscript's torch_lib tests: TABLE
has one row per op x dtype with that row's tolerances and the runtimes it runs in.

float16 rows run in the reference evaluator only: ONNX Runtime's CPU provider has no float16
kernel for TopK (nor for most other ops of these bodies), so it silently inserts Casts and computes
the whole body in float32, which is not the float16 computation the spec describes
(docs/custom_ops.md, "Types"). `test_ort_float16_loads` checks that such models still load and
agree; the `fp16` export keeps these ops in float32 (float16 weights, cast to float32).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx.reference import ReferenceEvaluator
from ressformer.export import reference
from ressformer.export.ops import check_normalizers, make_op_model, topk_attention_proto

from ressformer import ops as tops

from .op_cases import (
    ALL_MASKED_ROW,
    F16,
    F32,
    F64,
    LENGTHS,
    NORMALIZERS,
    K,
    attention_inputs,
    normalizer_rows,
    route_logits,
    support_mismatch,
)

# float16 inputs at scale 1e4: X - max(X) overflows to -inf in the reference evaluator's numpy,
# which the ops handle (clamped / exp(-inf) = 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

ONNX_TYPE = {F16: onnx.TensorProto.FLOAT16, F32: onnx.TensorProto.FLOAT, F64: onnx.TensorProto.DOUBLE}
ORT_AND_REF = ("ort", "ref")
REF_ONLY = ("ref",)  # float16: see the module docstring


@dataclasses.dataclass(frozen=True)
class Row:
    op: str  # op_type in domain `ressformer`
    dtype: np.dtype
    atol: float  # on probabilities / weights / gates (values in [0, 1])
    atol_out: float = 0.0  # TopKAttention's O (a weighted sum of V, |V| <= ~4)
    runtimes: tuple[str, ...] = ORT_AND_REF
    normalizer: str = ""  # TopKAttention only

    @property
    def id(self):
        return f"{self.op}{'-' + self.normalizer if self.normalizer else ''}-{self.dtype.name}"


TABLE = [
    Row("Entmax15", F16, 4e-3, runtimes=REF_ONLY),
    Row("Entmax15", F32, 2e-6),
    Row("Entmax15", F64, 1e-12),
    Row("Sparsemax", F16, 2e-3, runtimes=REF_ONLY),
    Row("Sparsemax", F32, 1e-6),
    Row("Sparsemax", F64, 1e-12),
    Row("SafeSoftmax", F16, 1e-3, runtimes=REF_ONLY),
    Row("SafeSoftmax", F32, 1e-6),
    Row("SafeSoftmax", F64, 1e-12),
    Row("TopKRoute", F16, 2e-3, runtimes=REF_ONLY),
    Row("TopKRoute", F32, 1e-6),
    Row("TopKRoute", F64, 1e-12),
    *[Row("TopKAttention", F16, 4e-3, 2e-2, runtimes=REF_ONLY, normalizer=n) for n in NORMALIZERS],
    *[Row("TopKAttention", F32, 2e-6, 1e-5, normalizer=n) for n in NORMALIZERS],
    *[Row("TopKAttention", F64, 1e-12, 1e-11, normalizer=n) for n in NORMALIZERS],
]
NORMALIZER_OPS = {"Entmax15": reference.entmax15, "Sparsemax": reference.sparsemax,
                  "SafeSoftmax": reference.safe_softmax}
TORCH_KERNELS = {"Entmax15": tops.entmax15_kernel, "Sparsemax": tops.sparsemax_kernel,
                 "SafeSoftmax": tops.softmax_kernel}
INPUTS = {"TopKRoute": ("logits",), "TopKAttention": ("Q", "K", "V", "mask")}


def rows(*ops):
    return [r for r in TABLE if r.op in ops]


def with_runtimes(table):
    return [pytest.param(r, rt, id=f"{r.id}-{rt}") for r in table for rt in r.runtimes]


def build(op, dtype, opset=18, normalizer="entmax15", attrs=()):
    return make_op_model(op, dtype=ONNX_TYPE[np.dtype(dtype)], opset=opset,
                         normalizer=normalizer or "entmax15", **dict(attrs))


@functools.cache
def runner(op, dtype, runtime, opset=18, normalizer="entmax15", attrs=()):
    """A callable(*inputs) -> outputs; built once per configuration and reused (fuzz included)."""
    model = build(op, dtype, opset, normalizer, attrs)
    names = INPUTS.get(op, ("X",))
    if runtime == "ort":
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return lambda *xs: sess.run(None, dict(zip(names, xs)))
    ev = ReferenceEvaluator(model)
    return lambda *xs: ev.run(None, dict(zip(names, xs)))


def run(row, runtime, *xs, opset=18, **attrs):
    fn = runner(row.op, row.dtype, runtime, opset, row.normalizer or "entmax15", tuple(sorted(attrs.items())))
    return fn(*xs)


def f64(a):
    return np.asarray(a).astype(np.float64)


def close(got, want, atol, what=""):
    np.testing.assert_allclose(f64(got), f64(want), rtol=0, atol=atol, err_msg=what)


def no_nan(*arrays_):
    for a in arrays_:
        assert not np.isnan(f64(a)).any()


# ---- normalizers ------------------------------------------------------------------------------
@pytest.mark.parametrize("row,rt", with_runtimes(rows("Entmax15", "Sparsemax")))
def test_golden_values(row, rt):
    (y,) = run(row, rt, np.array([[-2.0, 0.0, 0.5]], row.dtype))
    want = {"Sparsemax": [0, 0.25, 0.75], "Entmax15": [0, 0.3260, 0.6740]}[row.op]
    close(y[0], want, max(row.atol, 5e-5))  # golden values have 4 decimals
    assert y[0, 0] == 0


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("row,rt", with_runtimes(rows(*NORMALIZER_OPS)))
def test_normalizer(row, rt, n):
    x = normalizer_rows(n, row.dtype)
    (y,) = run(row, rt, x)
    assert y.dtype == row.dtype and y.shape == x.shape
    no_nan(y)
    ref = NORMALIZER_OPS[row.op](f64(x))
    close(y, ref, row.atol)
    assert (y[np.isneginf(x)] == 0).all()  # -inf entries: exactly 0
    assert (y[ALL_MASKED_ROW] == 0).all()  # no finite entry: zeros, not NaN
    valid = np.arange(len(x)) != ALL_MASKED_ROW
    close(y[valid].astype(np.float64).sum(-1), 1.0, max(n, 8) * row.atol)
    if row.op != "SafeSoftmax":  # sparse normalizers: exact zeros where the reference has them
        assert not support_mismatch(y, ref, row.atol if row.dtype == F16 else 0).any()
    yt = TORCH_KERNELS[row.op](torch.from_numpy(x)).numpy()  # the PyTorch op, same dtype
    close(y, yt, 2 * row.atol, "vs PyTorch")


# ---- TopKAttention ----------------------------------------------------------------------------
def _check_attention(row, rt, q, k, v, mask, top_k, scale, exact_idx=True):
    o, idx, w = run(row, rt, q, k, v, mask, top_k=top_k, scale=scale)
    n, t = k.shape[-2], q.shape[-2]
    kk = reference.effective_k(top_k, n)
    assert o.shape == q.shape and idx.shape == w.shape == (*q.shape[:-1], kk)
    assert o.dtype == w.dtype == row.dtype and idx.dtype == np.int64
    no_nan(o, w)
    ro, ri, rw = reference.topk_attention(f64(q), f64(k), f64(v), mask, top_k, row.normalizer, scale)
    if exact_idx:
        np.testing.assert_array_equal(idx, ri)
    close(w, rw, row.atol, "W")
    close(o, ro, row.atol_out, "O")
    picked_masked = ~mask[np.arange(t)[:, None], idx]  # (..., t, kk): selected masked keys
    assert (w[picked_masked] == 0).all()
    empty = ~mask.any(-1)
    assert (o[..., empty, :] == 0).all() and (w[..., empty, :] == 0).all()
    if row.normalizer != "softmax":
        assert not support_mismatch(w, rw, row.atol if row.dtype == F16 else 0).any()
    # the exported attribute is a 32-bit float: give PyTorch the same scale
    to, ti, tw = tops.topk_attention_kernel(*(torch.from_numpy(a) for a in (q, k, v, mask)), top_k,
                                            row.normalizer, float(np.float32(scale)))
    if exact_idx:  # PyTorch leaves ties among masked (-inf, weight 0) keys in its own order
        live = ~picked_masked
        np.testing.assert_array_equal(np.where(live, ti.numpy(), -1), np.where(live, idx, -1))
    close(w, tw.numpy(), 2 * row.atol, "W vs PyTorch")
    close(o, to.numpy(), 2 * row.atol_out, "O vs PyTorch")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("row,rt", with_runtimes(rows("TopKAttention")))
def test_topk_attention(row, rt, n):
    """Grid inputs: every score is exact, so idx must match exactly (ties to the lower index)."""
    q, k, v, mask, scale = attention_inputs(n, row.dtype)
    _check_attention(row, rt, q, k, v, mask, K, scale)


@pytest.mark.parametrize("n", (K + 1, 300))
@pytest.mark.parametrize("row,rt", with_runtimes([r for r in rows("TopKAttention") if r.dtype == F64]))
def test_topk_attention_gaussian_float64(row, rt, n):
    q, k, v, mask, scale = attention_inputs(n, row.dtype, grid=False, t=5)
    _check_attention(row, rt, q, k, v, mask, K, scale)


@pytest.mark.parametrize("scale", (1e-5, 1e-2, 1e2, 1e4))
@pytest.mark.parametrize("row,rt", with_runtimes([r for r in rows("TopKAttention") if r.dtype != F16]))
def test_topk_attention_scales(row, rt, scale):
    q, k, v, mask, _ = attention_inputs(3 * K, row.dtype)
    _check_attention(row, rt, q, k, v, mask, K, scale)


@pytest.mark.parametrize("top_k", (0, -1, 1, 1000))
@pytest.mark.parametrize("row,rt", with_runtimes([r for r in rows("TopKAttention") if r.dtype == F32]))
def test_topk_attention_top_k(row, rt, top_k):
    """top_k <= 0 selects all keys; top_k beyond N is clamped to N."""
    q, k, v, mask, scale = attention_inputs(K + 3, row.dtype)
    _check_attention(row, rt, q, k, v, mask, top_k, scale)


# ---- TopKRoute --------------------------------------------------------------------------------
@pytest.mark.parametrize("e,k", [(1, 1), (2, 1), (3, 2), (8, 2), (8, 8), (64, 2)])
@pytest.mark.parametrize("row,rt", with_runtimes(rows("TopKRoute")))
def test_topk_route(row, rt, e, k):
    x = route_logits(e, row.dtype)
    gates, experts = run(row, rt, x, k=k)
    assert gates.shape == experts.shape == (len(x), k) and gates.dtype == row.dtype
    no_nan(gates)
    rg, re = reference.topk_route(f64(x), k)
    np.testing.assert_array_equal(experts, re)  # ties: lower index
    close(gates, rg, row.atol)
    assert (gates[-1] == 0).all()  # a row of only -inf: zero gates
    tg, te = tops.topk_route_kernel(torch.from_numpy(x), k)
    live = np.isfinite(np.take_along_axis(f64(x), experts, -1))  # -inf picks (gate 0): any order
    np.testing.assert_array_equal(np.where(live, te.numpy(), -1), np.where(live, experts, -1))
    close(gates, tg.numpy(), 2 * row.atol, "vs PyTorch")


# ---- models, opsets, float16 in ORT -----------------------------------------------------------
def _attrs(row):
    return {"TopKRoute": {"k": 2}, "TopKAttention": {"top_k": K, "scale": 0.5}}.get(row.op, {})


def _inputs(row):
    if row.op == "TopKRoute":
        return (route_logits(8, row.dtype),)
    if row.op == "TopKAttention":
        return attention_inputs(2 * K, row.dtype)[:4]
    return (normalizer_rows(2 * K, row.dtype),)


def _reference(row, xs):
    xs = [f64(a) if a.dtype != bool else a for a in xs]
    if row.op == "TopKRoute":
        return reference.topk_route(*xs, 2)
    if row.op == "TopKAttention":
        return reference.topk_attention(*xs, K, row.normalizer, 0.5)
    return (NORMALIZER_OPS[row.op](*xs),)


@pytest.mark.parametrize("opset", (18, 23))
@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in TABLE])
def test_check_model(row, opset):
    model = build(row.op, row.dtype, opset, row.normalizer, tuple(_attrs(row).items()))
    onnx.checker.check_model(model, full_check=True)
    check_normalizers(model)


@pytest.mark.parametrize("opset", (18, 23))
@pytest.mark.parametrize("row,rt", with_runtimes(TABLE))
def test_opsets(row, rt, opset):
    xs = _inputs(row)
    got = run(row, rt, *xs, opset=opset, **_attrs(row))
    for g, r in zip(got, _reference(row, xs)):
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, r)
        else:
            close(g, r, row.atol_out or row.atol)


@pytest.mark.parametrize("opset", (18, 23))
@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in TABLE if r.dtype == F16])
def test_ort_float16_loads(row, opset):
    """float16 models load and run in ORT (its CPU provider upcasts the bodies to float32, see the
    module docstring), and agree with the reference within the float16 tolerance."""
    xs = _inputs(row)
    got = run(row, "ort", *xs, opset=opset, **_attrs(row))
    for g, r in zip(got, _reference(row, xs)):
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, r)
        else:
            assert g.dtype == F16
            close(g, r, row.atol_out or row.atol)


# ---- check_normalizers ------------------------------------------------------------------------
def test_check_normalizers_refuses_mismatch():
    model = make_op_model("TopKAttention", normalizer="sparsemax", top_k=K, scale=0.5)
    check_normalizers(model)  # consistent

    bad_attr = onnx.ModelProto()
    bad_attr.CopyFrom(model)
    for a in bad_attr.graph.node[0].attribute:
        if a.name == "normalizer":
            a.s = b"entmax15"
    with pytest.raises(ValueError, match="normalizer"):
        check_normalizers(bad_attr)

    swapped = onnx.ModelProto()  # the function body of another normalizer, doc_string forged
    swapped.CopyFrom(model)
    i = next(i for i, f in enumerate(swapped.functions) if f.name == "TopKAttention")
    body = topk_attention_proto("softmax")
    body.doc_string = "normalizer=sparsemax"
    swapped.functions[i].CopyFrom(body)
    with pytest.raises(ValueError, match="normalizer"):
        check_normalizers(swapped)

    missing = onnx.ModelProto()
    missing.CopyFrom(model)
    del missing.functions[i]
    with pytest.raises(ValueError):
        check_normalizers(missing)


# ---- fuzz ---------------------------------------------------------------------------------------
GRID = st.sampled_from([i / 4 for i in range(-8, 9)])  # exact scores: idx comparable exactly
VALUES = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([-np.inf, 0.0, 1.0, -1.0, 0.5]))
FUZZ_ROWS = {(r.op, r.normalizer, r.dtype): r for r in TABLE if r.dtype != F16}


@st.composite
def fuzz_cases(draw):
    op = draw(st.sampled_from(["Entmax15", "Sparsemax", "SafeSoftmax", "TopKRoute", "TopKAttention"]))
    dtype = draw(st.sampled_from([F32, F64]))
    rt = draw(st.sampled_from(ORT_AND_REF))
    if op in NORMALIZER_OPS:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 40)))
        return FUZZ_ROWS[op, "", dtype], rt, (draw(arrays(dtype, shape, elements=VALUES)),), {}
    if op == "TopKRoute":
        k = draw(st.integers(1, 4))
        shape = (draw(st.integers(1, 4)), draw(st.integers(k, 16)))
        return FUZZ_ROWS[op, "", dtype], rt, (draw(arrays(dtype, shape, elements=VALUES)),), {"k": k}
    norm = draw(st.sampled_from(NORMALIZERS))
    b, h, t, n, d = (draw(st.integers(1, hi)) for hi in (2, 2, 5, 12, 4))
    q = draw(arrays(dtype, (b, h, t, d), elements=GRID))
    kk = draw(arrays(dtype, (b, h, n, d), elements=GRID))
    v = draw(arrays(dtype, (b, h, n, d), elements=st.floats(-4, 4, width=32)))
    mask = draw(arrays(np.bool_, (t, n)))
    attrs = {"top_k": draw(st.sampled_from([0, 1, 2, K])), "scale": draw(st.sampled_from([1e-5, 0.5, 1e4]))}
    return FUZZ_ROWS[op, norm, dtype], rt, (q, kk, v, mask), attrs


def _check_fuzz_case(case):
    row, rt, xs, attrs = case
    got = run(row, rt, *xs, **attrs)
    no_nan(*got)
    if row.op == "TopKAttention":
        want = reference.topk_attention(*(f64(a) for a in xs[:3]), xs[3], attrs["top_k"], row.normalizer,
                                        attrs["scale"])
        torch_got = tops.topk_attention_kernel(*(torch.from_numpy(a) for a in xs), attrs["top_k"],
                                               row.normalizer, float(np.float32(attrs["scale"])))
        # scores up to 1e4 * 16: the normalizer sees exact scores, O sums |V| <= 4
        tols = (8 * row.atol_out, 0, row.atol)
    elif row.op == "TopKRoute":
        want = reference.topk_route(f64(xs[0]), attrs["k"])
        torch_got = tops.topk_route_kernel(torch.from_numpy(xs[0]), attrs["k"])
        tols = (row.atol, 0)
    else:
        want = (NORMALIZER_OPS[row.op](f64(xs[0])),)
        torch_got = (TORCH_KERNELS[row.op](torch.from_numpy(xs[0])),)
        tols = (row.atol,)
    for g, w, tg, tol in zip(got, want, torch_got, tols):
        tg = tg.detach().numpy()
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, w)
            # PyTorch leaves picks among -inf (masked, weight 0) entries in its own order
            if row.op == "TopKAttention":
                live = xs[3][np.arange(xs[3].shape[0])[:, None], w]
            else:
                live = np.isfinite(np.take_along_axis(f64(xs[0]), w, -1))
            np.testing.assert_array_equal(np.where(live, tg, -1), np.where(live, w, -1))
        else:
            close(g, w, tol)
            close(tg, w, tol, "PyTorch")
            if row.op in ("Entmax15", "Sparsemax") or row.normalizer in ("entmax15", "sparsemax"):
                assert not support_mismatch(g, w, tol).any()


_FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# the default suite's 1,000 cases are the same every run (CI stays deterministic); test_fuzz_slow explores.
# Random draws found float32 entmax-1.5 off by 2.35e-6 on [0.5, -1.1 x 26] and 2.44e-6 on [1.9, 0 x 11]
# (atol 2e-6): mean_sq - mean^2 cancels, and a float32 CumSum added its rounding. The bodies' prefix
# sums accumulate in double now (as torch's CPU cumsum): both are examples of every run.
@settings(max_examples=1000, derandomize=True, **_FUZZ_SETTINGS)
@given(fuzz_cases())
@example((FUZZ_ROWS["Entmax15", "", F32], "ort", (np.array([[1.9] + [0.0] * 11], F32),), {}))
@example((FUZZ_ROWS["Entmax15", "", F32], "ref", (np.array([[1.9] + [0.0] * 11], F32),), {}))
@example((FUZZ_ROWS["Entmax15", "", F32], "ort", (np.array([[0.5] + [-1.1] * 26], F32),), {}))
def test_fuzz(case):
    _check_fuzz_case(case)


@pytest.mark.slow
@settings(max_examples=20000, **_FUZZ_SETTINGS)
@given(fuzz_cases())
def test_fuzz_slow(case):
    _check_fuzz_case(case)

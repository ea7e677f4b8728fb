"""The `ressformer` ops in PyTorch (ressformer/ops.py): kernels and custom ops against golden
values, the entmax package and the numpy reference (export/reference.py); float64 gradcheck;
-inf entries and all-masked rows; fewer keys than k; fast path (custom op) == slow path (kernel).

Table-driven like onnxscript's torch_lib tests: TABLE has one row per op x dtype with its
tolerances (absolute, on values in [0, 1]; `atol_out` on attention outputs).
"""

from __future__ import annotations

import dataclasses
import os

import entmax
import numpy as np
import pytest
import torch
from ressformer.export import reference

from ressformer import native, ops

from .conftest import native_calls
from .op_cases import (
    ALL_MASKED_ROW,
    ATOL,
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

NP = {torch.float16: F16, torch.float32: F32, torch.float64: F64}


@dataclasses.dataclass(frozen=True)
class Row:
    op: str  # entmax15 | sparsemax | softmax | topk_route | topk_attention
    dtype: torch.dtype
    atol: float
    atol_out: float = 0.0
    normalizer: str = ""  # topk_attention only

    @property
    def id(self):
        return f"{self.op}{'-' + self.normalizer if self.normalizer else ''}-{str(self.dtype)[6:]}"


TABLE = [
    Row("entmax15", torch.float16, ATOL[F16]),
    Row("entmax15", torch.float32, ATOL[F32]),
    Row("entmax15", torch.float64, ATOL[F64]),
    Row("sparsemax", torch.float16, 2e-3),
    Row("sparsemax", torch.float32, 1e-6),
    Row("sparsemax", torch.float64, ATOL[F64]),
    Row("softmax", torch.float16, 1e-3),
    Row("softmax", torch.float32, 1e-6),
    Row("softmax", torch.float64, ATOL[F64]),
    Row("topk_route", torch.float16, 2e-3),
    Row("topk_route", torch.float32, 1e-6),
    Row("topk_route", torch.float64, ATOL[F64]),
    *[Row("topk_attention", torch.float16, ATOL[F16], 2e-2, n) for n in NORMALIZERS],
    *[Row("topk_attention", torch.float32, ATOL[F32], 1e-5, n) for n in NORMALIZERS],
    *[Row("topk_attention", torch.float64, ATOL[F64], 1e-11, n) for n in NORMALIZERS],
]
KERNEL = {"entmax15": ops.entmax15_kernel, "sparsemax": ops.sparsemax_kernel, "softmax": ops.softmax_kernel}
FAST = {"entmax15": ops.entmax15, "sparsemax": ops.sparsemax}  # the custom ops (closed-form backward)
PACKAGE = {"entmax15": entmax.entmax15, "sparsemax": entmax.sparsemax}
REFERENCE = {"entmax15": reference.entmax15, "sparsemax": reference.sparsemax,
             "softmax": reference.safe_softmax}


def rows(*names, dtypes=(torch.float16, torch.float32, torch.float64)):
    return [pytest.param(r, id=r.id) for r in TABLE if r.op in names and r.dtype in dtypes]


def close(got, want, atol, what=""):
    got, want = (np.asarray(t.detach().double().numpy() if torch.is_tensor(t) else t, np.float64)
                 for t in (got, want))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


def finite(*ts):
    for t in ts:
        assert torch.isfinite(t).all()


# ---- normalizers --------------------------------------------------------------------------------
@pytest.mark.parametrize("row", rows("entmax15", "sparsemax"))
def test_golden_values(row):
    x = torch.tensor([[-2.0, 0.0, 0.5]], dtype=row.dtype)
    want = {"sparsemax": [0, 0.25, 0.75], "entmax15": [0, 0.3260, 0.6740]}[row.op]
    for y in (KERNEL[row.op](x), FAST[row.op](x)):
        close(y[0], want, max(row.atol, 5e-5))
        assert y[0, 0] == 0


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("row", rows("entmax15", "sparsemax", dtypes=(torch.float32, torch.float64)))
def test_vs_entmax_package(row, n):
    x = torch.from_numpy(normalizer_rows(n, NP[row.dtype]))
    x = x[torch.isfinite(x).all(-1)]  # the package has no -inf handling
    want = PACKAGE[row.op](x.double(), dim=-1)
    for y in (KERNEL[row.op](x), FAST[row.op](x)):
        close(y, want, row.atol)
        assert ((y == 0) == (want == 0)).all()  # same support


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("row", rows("entmax15", "sparsemax", "softmax"))
def test_normalizer_vs_reference(row, n):
    x = normalizer_rows(n, NP[row.dtype])
    ref = REFERENCE[row.op](x.astype(np.float64))
    fns = [KERNEL[row.op]] + ([FAST[row.op]] if row.op in FAST else [])
    for y in (fn(torch.from_numpy(x)) for fn in fns):
        assert y.dtype == row.dtype
        finite(y)
        close(y, ref, row.atol)
        assert (y[torch.from_numpy(np.isneginf(x))] == 0).all()
        assert (y[ALL_MASKED_ROW] == 0).all()
        if row.op != "softmax":
            tol = row.atol if row.dtype == torch.float16 else 0  # float32/64: identical supports
            assert not support_mismatch(y.double().numpy(), ref, tol).any()


# ---- top-k selection, routing, attention ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "pytorch"])
@pytest.mark.parametrize("seed", range(3))
def test_topk_ties_lower_index(seed, use_native, dtype, monkeypatch):
    """torch.topk leaves ties unspecified; topk_lower_index breaks finite ties like ONNX TopK, in
    its C kernel (ressformer/native.c, built here: the test fails where it cannot be) and in
    PyTorch. Ties among -inf (masked, weight exactly 0) may come in any order in PyTorch; -0 == +0."""
    calls = native_calls(monkeypatch, "topk", use_native)
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n = int(torch.randint(1, 50, (1,), generator=g))
        x = torch.randint(-2, 3, (3, 4, n), generator=g).to(dtype)
        x[torch.rand(x.shape, generator=g) < 0.3] = float("-inf")
        x[torch.rand(x.shape, generator=g) < 0.1] = -0.0
        for k in sorted({0, 1, n // 2, n - 1, n}):
            val, idx = ops.topk_lower_index(x, k)
            rv, ri = reference.topk(x.numpy(), k)
            finite = np.isfinite(rv) | use_native  # the kernel orders -inf ties too
            np.testing.assert_array_equal(np.where(finite, idx.numpy(), -1), np.where(finite, ri, -1))
            np.testing.assert_array_equal(val.numpy(), rv)
    assert bool(calls) == use_native


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_entmax15_sorted(dtype):
    """The C entmax-1.5 of sorted rows (the custom op's forward on a CPU) against the float64
    reference, and on NaN rows against entmax15_kernel (the same operations; NaN -> -2). Not the
    kernel on large tensors: torch 2.13's CPU kernel gave 1 - 2^-11 instead of 1 on rows of one
    value in its second thread, now and then (issue 22's note)."""
    assert native.lib() is not None, native.ERROR
    g = torch.Generator().manual_seed(0)
    atol = 2e-6 if dtype == torch.float32 else 1e-13
    for k, scale in [(1, 1.0), (2, 1.0), (17, 0.1), (32, 1.0), (32, 10.0), (64, 1000.0)]:
        x = (torch.randn(3000, k, generator=g, dtype=dtype) * scale).sort(-1, descending=True).values
        x[:100, k // 2:] = float("-inf")
        x[100:110] = float("-inf")
        x[400:500] = x[400:500].round()
        got = native.entmax15_sorted(x)
        np.testing.assert_allclose(got.numpy(), reference.entmax15(x.numpy()), rtol=0, atol=atol)
        assert torch.equal(got[100:110], torch.zeros_like(got[100:110]))  # no finite entry: zeros
        nan = x[200:210].clone()
        nan[:, k // 3] = float("nan")
        torch.testing.assert_close(native.entmax15_sorted(nan), ops.entmax15_kernel(nan, presorted=True),
                                   rtol=0, atol=8 * torch.finfo(dtype).eps)
    assert native.entmax15_sorted(x.half()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_attention_out(dtype):
    """The C output of the custom op's forward (the k selected value rows summed) equals the dense
    rows' matmul; an index outside the keys is an error; the custom op's forward runs it."""
    assert native.lib() is not None, native.ERROR
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 50, 8, generator=g, dtype=dtype)
    idx = torch.rand(2, 3, 7, 50, generator=g).argsort(-1)[..., :5]
    w = torch.rand(2, 3, 7, 5, generator=g, dtype=dtype)
    want = torch.zeros(2, 3, 7, 50, dtype=dtype).scatter(-1, idx, w) @ v
    torch.testing.assert_close(native.attention_out(w, v, idx), want, rtol=0, atol=8 * torch.finfo(dtype).eps)
    with pytest.raises(ValueError, match="outside"):
        native.attention_out(w, v, idx + 50)
    assert native.attention_out(w.half(), v.half(), idx) is None


def test_native_build_and_fallback(tmp_path, monkeypatch):
    """A fresh cache: the kernels build there (one library, no temporary file left) and load again
    from it, a damaged library is rebuilt; no compiler: one warning, ERROR says why, and the PyTorch
    path gives the same top-k; RESSFORMER_NATIVE=1 (ENABLED True) makes that an error."""
    x = torch.randint(-3, 4, (50, 40), generator=torch.Generator().manual_seed(0)).float()
    want = ops.topk_lower_index(x, 7)
    monkeypatch.setenv("RESSFORMER_CACHE", str(tmp_path))
    for attr, value in (("_LIB", None), ("ERROR", None), ("ENABLED", None)):
        monkeypatch.setattr(native, attr, value)
    assert native.lib() is not None
    (so,) = tmp_path.iterdir()
    assert so.name.startswith("native-") and so.suffix == ".so"
    damaged = tmp_path / "damaged" / so.name  # another path: the process keeps the first one mapped
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a library")
    monkeypatch.setenv("RESSFORMER_CACHE", str(damaged.parent))
    monkeypatch.setattr(native, "_LIB", None)
    assert native.lib() is not None and damaged.stat().st_size > 1000 and len(list(damaged.parent.iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(native.topk(x, 7), want))

    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RESSFORMER_CACHE", str(tmp_path / "fresh"))
    with pytest.warns(RuntimeWarning, match="C kernels are unavailable"):
        assert native.lib() is None
    assert "no-such-compiler" in native.ERROR
    assert native.topk(x, 7) is None  # no second warning; the callers take PyTorch
    assert all(torch.equal(a, b) for a, b in zip(ops.topk_lower_index(x, 7), want))
    monkeypatch.setattr(native, "ENABLED", True)
    with pytest.raises(Exception, match="no-such-compiler"):
        native.lib()


def test_native_topk_nan_and_worst_case():
    """NaN ranks first (as in torch.topk), ties among NaN by index; rows in ascending order (every
    entry enters the kept k) and rows longer than the work split across threads."""
    assert native.lib() is not None, native.ERROR
    x = torch.tensor([[1.0, float("nan"), 3.0, float("nan"), float("inf"), -float("inf")]])
    val, idx = native.topk(x, 4)
    assert idx.tolist() == [[1, 3, 4, 2]] and val[0, 2:].tolist() == [float("inf"), 3.0]
    up = torch.arange(500.0).expand(3000, 500).contiguous()
    val, idx = native.topk(up, 33)
    assert torch.equal(idx, torch.arange(499, 466, -1).expand(3000, 33))
    x = torch.randn(64, 128, 300, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        val, idx = native.topk(x, 32)
    finally:
        torch.set_num_threads(threads)
    ref = x.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(idx, ref.indices[..., :32]) and torch.equal(val, ref.values[..., :32])
    assert native.topk(x.half(), 3) is None and native.topk(x, 0) is None  # not for the kernel: PyTorch
    # a forked child has the pool object but none of its threads: it forgets the pool (and would
    # start a new one). Only checked, not run: torch's OpenMP itself may hang in a forked child.
    assert native._POOL is not None
    pid = os.fork()
    if pid == 0:
        os._exit(0 if native._POOL is None else 1)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("e,k", [(1, 1), (3, 2), (8, 2), (8, 8), (64, 2)])
@pytest.mark.parametrize("row", rows("topk_route"))
def test_topk_route_vs_reference(row, e, k):
    x = route_logits(e, NP[row.dtype])
    rg, re = reference.topk_route(x.astype(np.float64), k)
    for fn in (ops.topk_route_kernel, ops.topk_route):
        gates, experts = fn(torch.from_numpy(x), k)
        assert gates.dtype == row.dtype and experts.shape == (len(x), k)
        finite(gates)
        sel = np.take_along_axis(x.astype(np.float64), re, -1)
        keep = np.isfinite(sel)  # experts picked among -inf logits (gate 0) may come in any order
        np.testing.assert_array_equal(np.where(keep, experts.numpy(), -1), np.where(keep, re, -1))
        close(gates, rg, row.atol)
        assert (gates[-1] == 0).all()  # only -inf logits: zero gates, not NaN


def _torch(*arrays):
    return [torch.from_numpy(a) for a in arrays]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("row", rows("topk_attention"))
def test_topk_attention_vs_reference(row, n):
    q, k, v, mask, scale = attention_inputs(n, NP[row.dtype], t=4 if n > 1000 else 6)
    ro, ri, rw = reference.topk_attention(*(a.astype(np.float64) for a in (q, k, v)), mask, K,
                                          row.normalizer, scale)
    slow = ops.topk_attention_kernel(*_torch(q, k, v, mask), K, row.normalizer, scale)
    fast = ops.topk_attention(*_torch(q, k, v, mask), K, row.normalizer, scale, chunk=3)
    for out, idx, w in (slow, fast):
        assert idx.shape == w.shape == (*q.shape[:-1], min(K, n)) and out.dtype == w.dtype == row.dtype
        finite(out, w)
        # exact scores: finite ties go to the lower index; masked picks (weight 0) in any order
        live = mask[np.arange(mask.shape[0])[:, None], ri]  # (T, k) broadcast over (B, H)
        np.testing.assert_array_equal(np.where(live, idx.numpy(), -1), np.where(live, ri, -1))
        close(w, rw, row.atol, "w")
        close(out, ro, row.atol_out, "out")
        assert (out[..., 1, :] == 0).all() and (w[..., 1, :] == 0).all()  # query 1 sees no key


@pytest.mark.parametrize("top_k", (0, 1, K, 100))
@pytest.mark.parametrize("n", (1, 3))
def test_fewer_keys_than_k(n, top_k):
    q, k, v, mask, scale = attention_inputs(n, F64)
    kk = reference.effective_k(top_k, n)
    want = reference.topk_attention(q, k, v, mask, top_k, "entmax15", scale)
    for got in (ops.topk_attention_kernel(*_torch(q, k, v, mask), top_k, "entmax15", scale),
                ops.topk_attention(*_torch(q, k, v, mask), top_k, "entmax15", scale)):
        assert got[1].shape[-1] == kk
        for g, w in zip(got, want):
            close(g, w, 1e-12)


# ---- gradients ----------------------------------------------------------------------------------
def _x(shape, seed=0, neg_inf=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if neg_inf:
        x[torch.rand(shape, generator=g) < neg_inf] = float("-inf")
        x[..., 0] = 0.3  # keep one finite entry per row
    return x


@pytest.mark.parametrize("name", ["entmax15", "sparsemax"])
def test_gradcheck_normalizer(name):
    x = _x((4, 9)).requires_grad_()
    assert torch.autograd.gradcheck(FAST[name], (x,))
    assert torch.autograd.gradcheck(KERNEL[name], (x,))


def test_gradcheck_topk_route():
    x = _x((5, 8)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.topk_route(t, 3)[0], (x,))


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradcheck_topk_attention(normalizer):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, s, 5, generator=g, dtype=torch.float64, requires_grad=True)
               for s in (4, 7, 7))
    mask = torch.ones(4, 7, dtype=torch.bool).tril(3)
    mask[1, 2] = False
    fn = lambda q, k, v: ops.topk_attention(q, k, v, mask, 3, normalizer, 0.7, 2)[::2]  # (out, w)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("name", ["entmax15", "sparsemax", "softmax"])
def test_neg_inf_and_all_masked_rows(name):
    x = _x((5, 11), seed=3, neg_inf=0.4)
    x[2] = float("-inf")
    fns = [KERNEL[name]] + ([FAST[name]] if name in FAST else [])
    for fn in fns:
        xr = x.clone().requires_grad_()
        y = fn(xr)
        finite(y)
        assert (y[torch.isinf(x)] == 0).all() and (y[2] == 0).all()
        (y * torch.randn_like(y)).sum().backward()
        finite(xr.grad)
        assert (xr.grad[torch.isinf(x)] == 0).all() and (xr.grad[2] == 0).all()


def test_all_masked_attention_and_route_grads():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, s, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for s in (3, 6, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0] = False
    mask[2, ::2] = False
    for normalizer in NORMALIZERS:
        out, _, w = ops.topk_attention(q, k, v, mask, 4, normalizer, 0.5)
        finite(out, w)
        assert (out[..., 0, :] == 0).all() and (w[..., 0, :] == 0).all()
        q.grad = k.grad = v.grad = None
        (out.sum() + w.sum()).backward()
        finite(q.grad, k.grad, v.grad)
        assert (q.grad[..., 0, :] == 0).all()
    logits = torch.randn(3, 5, dtype=torch.float64)
    logits[1] = float("-inf")
    logits.requires_grad_()
    gates, _ = ops.topk_route(logits, 2)
    finite(gates)
    assert (gates[1] == 0).all()
    (gates * torch.randn_like(gates)).sum().backward()
    finite(logits.grad)


# ---- fast path (custom ops) == slow path (plain kernels) --------------------------------------
@pytest.mark.parametrize("chunk", (0, 1, 4))
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_attention_fast_path_equals_slow_path(normalizer, chunk):
    q, k, v, mask, scale = attention_inputs(21, F64, grid=False, t=9)
    qs = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    qf = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    m = torch.from_numpy(mask)
    slow = ops.topk_attention_kernel(*qs, m, K, normalizer, scale)  # autograd through the kernel
    fast = ops.topk_attention(*qf, m, K, normalizer, scale, chunk)  # custom op, sparse backward
    close(slow[0], fast[0], 1e-13)
    close(slow[2], fast[2], 1e-13)
    live = slow[2] > 0  # which masked keys fill a row short of candidates is free (weight 0)
    assert torch.equal(slow[1][live], fast[1][live])
    g = torch.Generator().manual_seed(0)
    d_out, d_w = torch.randn(slow[0].shape, generator=g, dtype=torch.float64), torch.randn(
        slow[2].shape, generator=g, dtype=torch.float64)
    gs = torch.autograd.grad((slow[0], slow[2]), qs, (d_out, d_w))
    gf = torch.autograd.grad((fast[0], fast[2]), qf, (d_out, d_w))
    for a, b in zip(gs, gf):
        close(a, b, 1e-12)


@pytest.mark.parametrize("name", ["entmax15", "sparsemax"])
def test_normalizer_fast_path_equals_slow_path(name):
    x = _x((6, 33), seed=5, neg_inf=0.2)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = KERNEL[name](xs), FAST[name](xf)
    close(ys, yf, 0)
    dy = torch.randn_like(ys)
    (gs,), (gf,) = torch.autograd.grad(ys, xs, dy), torch.autograd.grad(yf, xf, dy)
    close(gs, gf, 1e-12)


def test_route_fast_path_equals_slow_path():
    x = _x((7, 8), seed=6)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (gs, es), (gf, ef) = ops.topk_route_kernel(xs, 3), ops.topk_route(xf, 3)
    assert torch.equal(es, ef)
    close(gs, gf, 0)
    d = torch.randn_like(gs)
    close(torch.autograd.grad(gs, xs, d)[0], torch.autograd.grad(gf, xf, d)[0], 1e-12)

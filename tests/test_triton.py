"""The fused Triton top-k attention (ressformer/triton_attention.py) against the PyTorch kernel.

Marked `triton` and deselected by default: they need the `triton` package (~1 GB installed, not
in CI's install). With it, `TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py`
runs the kernels on a CPU in Triton's interpreter (slow: keep the cases small); on a CUDA machine
`python -m pytest -m triton` runs them compiled. They fail (never skip) where triton is missing.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything

from ressformer import ops  # noqa: E402

NORMALIZERS = ("entmax15", "sparsemax", "softmax")


@pytest.fixture(scope="module")
def ta():
    try:
        from ressformer import triton_attention
    except ImportError as e:
        pytest.fail(f"tests marked triton need the triton package (pip install triton): {e}")
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without CUDA these tests need TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    return triton_attention


def case(dtype=torch.float32, grid=True, T=16, N=27, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if grid:  # exact scores in any summation order: the selection cannot depend on rounding
        q, k = (torch.randint(-4, 5, (1, 2, n, D), generator=g).double() / 4 for n in (T, N))
    else:
        q, k = (torch.randn(1, 2, n, D, generator=g, dtype=torch.float64) for n in (T, N))
    v = torch.randn(1, 2, N, D, generator=g, dtype=torch.float64)
    mask = (torch.arange(N)[None, :] <= torch.arange(T)[:, None] + N - T) & (torch.rand(T, N, generator=g) > 0.2)
    mask[1] = False  # a query without candidates: zeros
    return [t.to(DEV, dtype) for t in (q, k, v)] + [mask.to(DEV)]


@pytest.mark.parametrize("grid", (True, False))
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_forward_equals_pytorch_kernel(ta, normalizer, grid):
    q, k, v, mask = case(grid=grid)
    out, idx, w = ta.topk_attention_fwd(q, k, v, mask, 6, normalizer, 0.5)
    r_out, r_idx, r_w = ops.topk_attention_kernel(q, k, v, mask, 6, normalizer, 0.5)
    live = r_w > 0
    assert torch.equal(w > 0, live) and torch.equal(idx[live], r_idx[live])  # same keys, same order
    torch.testing.assert_close(w, r_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=0)
    assert (out[..., 1, :] == 0).all() and (w[..., 1, :] == 0).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_forward_half_equals_pytorch_kernel(ta, dtype):
    q, k, v, mask = case(dtype)
    out, idx, w = ta.topk_attention_fwd(q, k, v, mask, 6, "entmax15", 0.5)
    r_out, r_idx, r_w = ops.topk_attention_kernel(q, k, v, mask, 6, "entmax15", 0.5)
    live = r_w > 0
    assert out.dtype == w.dtype == dtype and torch.equal(idx[live], r_idx[live])
    torch.testing.assert_close(w.float(), r_w.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(out.float(), r_out.float(), atol=3e-2, rtol=0)


def backward_case(normalizer, T=16, N=27):
    q, k, v, mask = case(torch.float64, grid=False, T=T, N=N)
    _, idx, w = ops.topk_attention_kernel(q, k, v, mask, 6, normalizer, 0.5)
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEV)
    d_w = torch.randn(w.shape, generator=g, dtype=torch.float64).to(DEV)
    want = ops.topk_attention_backward(q, k, v, idx, w, d_out, d_w, normalizer, 0.5, gather=True)
    return (q, k, v, idx, w, d_out, d_w), want


@pytest.mark.parametrize("method", ("gather", "tiles"))
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_backward_equals_sparse_backward_float64_and_float32(ta, normalizer, method):
    (q, k, v, idx, w, d_out, d_w), want = backward_case(normalizer)
    got = ta.topk_attention_bwd(q, k, v, idx, w, d_out, d_w, normalizer, 0.5, method=method)  # float64: gather
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12
    got32 = ta.topk_attention_bwd(*(t.float() for t in (q, k, v)), idx, w.float(), d_out.float(), d_w.float(),
                                  normalizer, 0.5, method=method)
    for a, b in zip(got32, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_tiles_backward_spans_blocks_and_half_inputs(ta):
    """The `tiles` backward over several query and key blocks (T > BLOCK_M, N > BLOCK_N, keys picked
    from many blocks), in float32 and bfloat16, against the float64 sparse backward; its dk/dv are the
    same bits on every run (no atomics)."""
    T, N = 2 * ta.BLOCK_M + 3, 2 * ta.BLOCK_N + 5
    (q, k, v, idx, w, d_out, d_w), want = backward_case("entmax15", T=T, N=N)
    assert len(set(idx.flatten().tolist()) & set(range(ta.BLOCK_N, N))) > 5  # picks beyond the first key block
    f32 = [t.float() for t in (q, k, v)] + [idx, w.float(), d_out.float(), d_w.float()]
    got = ta.topk_attention_bwd(*f32, "entmax15", 0.5, method="tiles")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    again = ta.topk_attention_bwd(*f32, "entmax15", 0.5, method="tiles")
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    bf = [t.bfloat16() if t.is_floating_point() else t for t in f32]
    got16 = ta.topk_attention_bwd(*bf, "entmax15", 0.5, method="tiles")
    ref16 = ta.topk_attention_bwd(*bf, "entmax15", 0.5, method="gather")
    for a, b, c in zip(got16, ref16, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(a.double(), c, atol=6e-2, rtol=6e-2)
    with pytest.raises(ValueError, match="unknown backward"):
        ta.topk_attention_bwd(*f32, "entmax15", 0.5, method="dense")


@pytest.mark.parametrize("method", ("gather", "tiles"))
def test_custom_op_selects_triton_and_gradcheck_float64(ta, monkeypatch, method):
    """ops.TRITON=True routes the custom op through the kernels (automatic on CUDA): float32 forward
    and backward (either backward: triton_attention.BACKWARD) equal the PyTorch path's; float64
    (PyTorch forward, Triton backward) passes gradcheck."""
    monkeypatch.setattr(ta, "BACKWARD", method)
    q, k, v, mask = case(grid=True)
    results = []
    for flag in (False, True):
        monkeypatch.setattr(ops, "TRITON", flag)
        qs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, idx, w = ops.topk_attention(*qs, mask, 6, "entmax15", 0.5, 8)
        (out.pow(2).sum() + (w * torch.arange(6, device=DEV)).sum()).backward()
        results.append((out, idx, w, *(t.grad for t in qs)))
    (ref, got), live = results, results[0][2] > 0
    assert torch.equal(got[1][live], ref[1][live])  # the order of picked masked keys is free
    for i in (0, 2, 3, 4, 5):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(ops, "TRITON", True)
    q, k, v, mask = case(torch.float64, grid=False, T=4, N=9, D=3)
    args = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: ops.topk_attention(q, k, v, mask, 4, "entmax15", 0.7)[::2]  # (out, w)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)

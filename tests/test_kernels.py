"""Training kernels (issue 13): the sparse top-k attention backward against float64 autograd
through a plain reference, what it keeps and runs, branch-free tie handling, grouped experts
against the per-expert dispatch and the dense gated sum, and a training step without host reads.
"""

from __future__ import annotations

import entmax
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ressformer import ops
from ressformer.model import MoE

from .conftest import native_calls, perturbed_model

NORMALIZERS = ("entmax15", "sparsemax", "softmax")


# ---- a plain reference: dense scores, mask, stable sort, the entmax package, gathered values ----
def reference_attention(q, k, v, mask, top_k, normalizer, scale):
    """Autograd through plain torch: every score, ties to the lower index by a stable sort, the
    normalizer from the `entmax` package (masked entries as -1e6: weight and gradient exactly 0)."""
    kk = k.shape[-2] if top_k <= 0 else min(top_k, k.shape[-2])
    sc = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -1e6)  # (B, H, T, N)
    idx = sc.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
    val = sc.gather(-1, idx)
    w = {"entmax15": lambda x: entmax.entmax15(x, dim=-1), "sparsemax": lambda x: entmax.sparsemax(x, dim=-1),
         "softmax": lambda x: torch.softmax(x, -1)}[normalizer](val)
    B, H, T, _ = idx.shape
    rows = v[torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None], idx]  # (B, H, T, k, D)
    return (w.unsqueeze(-1) * rows).sum(-2), idx, w


def attention_case(seed=0, T=13, N=29, D=6, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # a grid: many exact score ties, also across the k-th place
        q, k = (torch.randint(-2, 3, (2, 3, n, D), generator=g).double() / 2 for n in (T, N))
    else:
        q, k = (torch.randn(2, 3, n, D, generator=g, dtype=torch.float64) for n in (T, N))
    v = torch.randn(2, 3, N, D, generator=g, dtype=torch.float64)
    mask = (torch.arange(N)[None, :] <= torch.arange(T)[:, None] + N - T) & (torch.rand(T, N, generator=g) > 0.25)
    mask[:, 0] = True  # every query has a candidate (the reference has no empty rows)
    return q, k, v, mask


LAYOUTS = dict(argvalues=(False, True, None), ids=("dense", "gather", "native"))


@pytest.mark.parametrize("gather", **LAYOUTS)
@pytest.mark.parametrize("ties", (False, True))
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_sparse_backward_vs_float64_reference(normalizer, ties, gather, monkeypatch):
    """Each backward layout: dense rows, gathered rows (PyTorch) and the C kernel (gather=None on a CPU)."""
    monkeypatch.setattr(ops, "BACKWARD_GATHER", gather)
    calls = native_calls(monkeypatch, "attention_backward")
    q, k, v, mask = attention_case(ties=ties)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out, idx, w = ops.topk_attention(*ours, mask, 5, normalizer, 0.45, 4)
    r_out, r_idx, r_w = reference_attention(*ref, mask, 5, normalizer, 0.45)
    live = w > 0
    assert torch.equal(idx[live], r_idx[live])
    torch.testing.assert_close(out, r_out, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(3)
    d_out, d_w = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(w.shape, generator=g,
                                                                                        dtype=torch.float64)
    d_w = d_w * live  # selected masked keys: any order (weight 0), so no cotangent that depends on it
    got = torch.autograd.grad((out, w), ours, (d_out, d_w))
    want = torch.autograd.grad((r_out, r_w), ref, (d_out, d_w))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-10
    assert bool(calls) == (gather is None)


@pytest.mark.parametrize("gather", **LAYOUTS)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradcheck_both_backward_layouts(normalizer, gather, monkeypatch):
    monkeypatch.setattr(ops, "BACKWARD_GATHER", gather)
    calls = native_calls(monkeypatch, "attention_backward")
    q, k, v, mask = attention_case(seed=1, T=5, N=9, D=3)
    args = [t[:1, :2].clone().requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: ops.topk_attention(q, k, v, mask, 4, normalizer, 0.7, 2)[::2]  # (out, w)
    assert torch.autograd.gradcheck(fn, args)
    assert bool(calls) == (gather is None)


def test_backward_layouts_agree_in_float32_and_bf16(monkeypatch):
    calls = native_calls(monkeypatch, "attention_backward")
    q, k, v, mask = attention_case(seed=2, T=40, N=70, D=8)
    _, idx, w = ops.topk_attention(q, k, v, mask, 6, "entmax15", 0.3)
    g = torch.Generator().manual_seed(0)
    d_out, d_w = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(w.shape, generator=g,
                                                                                      dtype=torch.float64)
    want = ops.topk_attention_backward(q, k, v, idx, w, d_out, d_w, "entmax15", 0.3, 16, gather=True)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        c = [t.to(dt) for t in (q, k, v)]
        for gather in (False, True, None):  # None: the C kernel for float32, a layout by shape for bf16
            got = ops.topk_attention_backward(*c, idx, w.to(dt), d_out.to(dt), d_w.to(dt), "entmax15", 0.3, 16,
                                              gather=gather)
            for a, b in zip(got, want):
                assert a.dtype == dt
                torch.testing.assert_close(a.double(), b, atol=tol * b.abs().max().item(), rtol=0)
    assert len(calls) == 2  # float32 ran the kernel; bfloat16 tried it


class OpLog(TorchDispatchMode):
    """Records the aten ops that run; steps into the `ressformer` custom ops' own kernels."""

    def __init__(self, forbid=()):
        super().__init__()
        self.ops, self.forbid = [], set(forbid)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in self.forbid:
            raise AssertionError(f"{func} reads a tensor's value on the host (a device sync on CUDA)")
        kwargs = kwargs or {}
        if func.namespace == "ressformer":  # opaque to the mode: run its kernel under the mode
            op = {"topk_attention": ops._topk_attention_op, "topk_route": ops._topk_route_op,
                  "entmax15": ops._entmax15_op, "sparsemax": ops._sparsemax_op}[name]
            with self:
                return op._init_fn(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # composite ops (seen inside custom ops): look at what they run
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def test_backward_keeps_the_selection_and_runs_no_topk_or_sort():
    """What the backward keeps is q, k, v and the O(T k) selection (no T x N scores or mask), and
    it runs no top-k and no sort."""
    q, k, v, mask = attention_case(seed=4, T=64, N=96, D=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, idx, w = ops.topk_attention(q, k, v, mask, 8, "entmax15", 0.3, 16)
    inputs = q.numel() + k.numel() + v.numel()
    assert sum(t.numel() for t in saved) == inputs + 2 * idx.numel()
    log = OpLog()
    with log:
        (out.sum() + w.pow(2).sum()).backward()
    assert not {"topk", "sort", "argsort", "masked_fill"} & set(log.ops), sorted(set(log.ops))


# ---- branch-free tie handling ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_topk_branch_free_equals_branching(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        n = int(torch.randint(1, 70, (1,), generator=g))
        x = torch.randint(-3, 4, (2, 5, n), generator=g).float()
        x[torch.rand(x.shape, generator=g) < 0.3] = float("-inf")
        for k in sorted({1, n // 3, n // 2, n - 1, n} - {0}):
            (va, ia), (vb, ib) = ops.topk_lower_index(x, k, True), ops.topk_lower_index(x, k, False)
            assert torch.equal(va, vb)
            # finite ties: the lower index; the order of picked -inf entries is free
            assert torch.equal(ia[va > float("-inf")], ib[vb > float("-inf")])
            ref = x.sort(dim=-1, descending=True, stable=True)  # ONNX TopK's order
            assert torch.equal(va, ref.values[..., :k])
            fin = va > float("-inf")
            assert torch.equal(ia[fin], ref.indices[..., :k][fin])


# ---- grouped experts ------------------------------------------------------------------------------
def moe_case(dtype=torch.float32, starve=False):
    m = perturbed_model("tiny", n_experts=6, top_e=2).train()
    moe = m.blocks[0].moe.to(dtype)
    if starve:  # expert 3 gets no token
        with torch.no_grad():
            moe.router.weight[3] = 0
            moe.router.weight[3, 0] = -50.0
    x = torch.randn(3, 23, m.config.d_model, generator=torch.Generator().manual_seed(0)).to(dtype)
    if starve:
        x[..., 0] = x[..., 0].abs() + 0.5
    return moe, x


@pytest.mark.parametrize("starve", (False, True))
def test_grouped_experts_equal_dispatch_and_dense(starve):
    moe, x = moe_case(starve=starve)
    assert MoE.grouped_ok(x)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    grouped, experts, _ = moe(xs[0])
    if starve:
        assert not (experts == 3).any()
    logits = moe.router(xs[1].reshape(-1, x.shape[-1]))
    gates, ex = ops.topk_route(logits, moe.cfg.top_e)
    dispatch = moe.dispatch(xs[1].reshape(-1, x.shape[-1]), gates, ex).view_as(x)
    dense = moe.dense_forward(xs[2])
    torch.testing.assert_close(grouped, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, dispatch, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(x)
    grads = []
    for xi, y in zip(xs, (grouped, dispatch, dense)):
        moe.zero_grad()
        (y * cot).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                  for p in moe.parameters()])
    for a, b, c in zip(*grads):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4)


def test_grouped_experts_bf16_close_to_fp32():
    moe, x = moe_case()
    ref = moe.dense_forward(x)
    out, _, _ = moe.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


def test_float64_falls_back_to_dispatch():
    moe, x = moe_case(torch.float64)
    assert not MoE.grouped_ok(x)
    out, _, _ = moe(x)
    torch.testing.assert_close(out, moe.dense_forward(x), atol=1e-12, rtol=0)


# ---- the training step reads nothing on the host --------------------------------------------------
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_consecutive",
              "unique_dim", "repeat_interleave"}


def test_training_step_has_no_host_reads(monkeypatch):
    """Forward, loss and backward of a training step run no op that reads a tensor's value on the
    host (on CUDA each would be a device sync): tie handling branch-free, experts grouped, every
    custom op's kernel checked from inside. The model's token range check (a deliberate read of
    the input) runs first, outside the checked region."""
    monkeypatch.setattr(ops, "BRANCH_FREE", True)
    model = perturbed_model("tiny").train()
    x = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    model.check_tokens(x)
    monkeypatch.setattr(model, "check_tokens", lambda tokens: None)
    log = OpLog(forbid=HOST_READS)
    with log:
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + out.aux["loss"]
        loss.backward()
    assert "topk" in log.ops and "_grouped_mm" in log.ops  # the kernels were looked into
    assert all(p.grad is not None for n, p in model.named_parameters() if "pos" not in n)


def test_topk_route_backward_mixed_dtypes():
    """torch.compile with bf16 autocast hands the route's backward a bf16 gradient for float32 gates
    (inductor failed: `scatter(): Expected self.dtype to be equal to src.dtype`, issue 22). The
    gradient comes back in the logits' dtype and equals the float32 one up to bf16 rounding."""
    from types import SimpleNamespace

    logits = torch.randn(7, 8, dtype=torch.float32)
    gates, idx = ops.topk_route_kernel(logits, 2)
    ctx = SimpleNamespace(saved_tensors=(gates, idx), n=8, dtype=torch.float32)
    dg = torch.randn_like(gates)
    ref, _ = ops._topk_route_backward(ctx, dg, None)
    got, _ = ops._topk_route_backward(ctx, dg.bfloat16(), None)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    assert (got != 0).sum(-1).le(2).all()  # only the selected columns get a gradient

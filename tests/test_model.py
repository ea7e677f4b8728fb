"""The reference model: causality, pieces == whole, memory gates, L_struct, MoE dispatch, errors."""

import math

import pytest
import torch

from ressformer import ReSSFormer, ReSSFormerConfig, native
from ressformer import model as model_mod
from ressformer.model import State, structural_continuity

from .conftest import native_calls, perturbed_model


@pytest.fixture(scope="module")
def model():
    return perturbed_model()


def tokens(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_presets_and_param_counts():
    counts = {n: ReSSFormer(ReSSFormerConfig.preset(n)).num_params() for n in ("tiny", "baby", "small")}
    assert counts["tiny"] < 200_000 < counts["baby"] == 833_185 < counts["small"]
    baby = ReSSFormerConfig.preset("baby")  # the demo's model: nanoGPT's baby-GPT width and context, K=2
    assert (baby.d_model, baby.n_heads, baby.n_steps, baby.segment_len, baby.n_experts, baby.top_e) == \
        (128, 4, 2, 64, 4, 2)
    base = ReSSFormerConfig.preset("base")
    assert (base.d_model, base.n_heads, base.n_steps, base.top_k, base.mem_slots, base.n_experts, base.top_e) == \
        (768, 12, 4, 32, 128, 8, 2)


def test_no_positional_parameters_by_default(model):
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos" in n for n in names)
    assert model.config.pos_encoding == "none"


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        ReSSFormerConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        ReSSFormerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown config field"):
        ReSSFormerConfig.preset("tiny", nope=1)
    with pytest.raises(ValueError, match="cache_len"):
        ReSSFormerConfig.preset("tiny", cache_len=999)


@pytest.mark.parametrize("j", [5, 31, 32, 40, 70])  # inside, at and across segment boundaries (L=32)
def test_causality(model, j):
    x = tokens(2, 80)
    y = x.clone()
    y[:, j] = (y[:, j] + 7) % 256
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    # not bitwise: the change reroutes later tokens, so each expert's matmul has another row count,
    # and BLAS may then block (and round) the earlier rows differently
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert (a[:, j:] - b[:, j:]).abs().max() > 1e-4  # the change does matter downstream


@pytest.mark.parametrize("splits", [[1] * 70, [7, 33, 1, 29], [32, 32, 6], [64, 6]])
def test_pieces_equal_whole(model, splits):
    x = tokens(3, sum(splits), seed=1)
    with torch.no_grad():
        whole = model(x).logits
        st, outs, i = None, [], 0
        for n in splits:
            o = model(x[:, i:i + n], st)
            st, i = o.state, i + n
            outs.append(o.logits)
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=2e-5, rtol=1e-4)


def test_state_carries_memory_and_cache(model):
    x = tokens(1, 40)
    with torch.no_grad():
        st = model(x).state
    assert st.pos == 40 and st.cache_valid == model.config.cache_len
    assert st.past_k.shape[-2] == 40 - 32
    assert not torch.allclose(st.memory, model.mem_init[None])


def test_memory_matters_across_segments(model):
    """Changing a token of segment 0 that is outside the next segment's cache still changes
    segment 1's logits: it travelled through the memory."""
    x = tokens(1, 64)
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 256  # cache holds positions 24..31 only
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, 32:] - b[:, 32:]).abs().max() > 1e-5


def test_memory_gates_in_unit_interval(model):
    B, m, d = 2, model.config.mem_slots, model.config.d_model
    H, D = model.config.n_heads, model.config.head_dim
    mem = torch.randn(B, m, d) * 10
    k, v = torch.randn(B, H, 32, D) * 10, torch.randn(B, H, 32, D)
    with torch.no_grad():
        new, alpha = model.mem_update(mem, k, v)
    assert alpha.shape == (B, m, 1)
    assert (alpha >= 0).all() and (alpha <= 1).all()


def test_test_time_depth(model):
    x = tokens(1, 40)
    with torch.no_grad():
        a = model(x, steps=2).logits
        b = model(x, steps=4).logits
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_struct_loss_zero_for_equal_graphs():
    idx = torch.rand(2, 3, 5, 50).argsort(-1)[..., :4]  # distinct keys per query, as top-k gives
    w = torch.softmax(torch.randn(2, 3, 5, 4), -1)
    assert structural_continuity(idx, w, idx, w).abs() < 1e-7
    perm = torch.randperm(4)
    assert structural_continuity(idx, w, idx[..., perm], w[..., perm]).abs() < 1e-7


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "pytorch"])
def test_struct_loss_matches_dense(use_native, monkeypatch):
    """Both ways of matching the two rows' keys: the C kernel (ressformer/native.c, built here: the
    test fails where it cannot be) and the sort of the 2k indices."""
    calls = native_calls(monkeypatch, "match", use_native)
    g = torch.Generator().manual_seed(0)
    B, H, T, N, k = 2, 2, 6, 20, 5
    ia, ib = (torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * H * T)]).view(B, H, T, k)
              for _ in range(2))
    wa, wb = torch.rand(B, H, T, k, generator=g), torch.rand(B, H, T, k, generator=g)
    da = torch.zeros(B, H, T, N).scatter(-1, ia, wa)
    db = torch.zeros(B, H, T, N).scatter(-1, ib, wb)
    dense = ((da - db) ** 2).sum(-1).mean()
    torch.testing.assert_close(structural_continuity(ia, wa, ib, wb), dense)
    # float64: the same value and gradients as the dense rows' (autograd through both)
    wa64, wb64 = (w.double().requires_grad_() for w in (wa, wb))
    got = structural_continuity(ia, wa64, ib, wb64)
    ga = torch.autograd.grad(got, (wa64, wb64))
    wa2, wb2 = (w.double().requires_grad_() for w in (wa, wb))
    ref = ((torch.zeros(B, H, T, N, dtype=torch.float64).scatter(-1, ia, wa2)
            - torch.zeros(B, H, T, N, dtype=torch.float64).scatter(-1, ib, wb2)) ** 2).sum(-1).mean()
    gr = torch.autograd.grad(ref, (wa2, wb2))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert structural_continuity(ia[:, :, :0], wa[:, :, :0], ib[:, :, :0], wb[:, :, :0]) == 0
    assert bool(calls) == use_native


def test_first_segment_scores_no_cache(monkeypatch):
    """Before the first segment ends the cache is all masked; the attention scores without it
    (Attention.skip_empty_cache) and gives the same logits, losses, gradients and selected keys
    (renumbered), whole and in pieces; with fewer candidates than top_k it keeps the cache."""
    from ressformer.model import Attention

    cfg = ReSSFormerConfig.preset("tiny", mem_slots=8)  # top_k 8 <= 8 memory slots: every query has 8
    torch.manual_seed(0)
    m = ReSSFormer(cfg).train()
    x = tokens(2, 2 * cfg.segment_len + 5)
    seen = []
    attn = Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, *a, **kw: seen.append(r := attn(self, *a, **kw)) or r)

    def run(skip, pieces):
        monkeypatch.setattr(Attention, "skip_empty_cache", skip)
        seen.clear()
        m.zero_grad()
        state, logits, loss = None, [], 0
        for p in pieces:
            out = m(x[:, p], state=state)
            state, loss = out.state, loss + out.logits.logsumexp(-1).mean() + out.aux["loss"]
            logits.append(out.logits)
        loss.backward()
        return torch.cat(logits, 1), [p.grad.clone() for p in m.parameters()], [s[3] for s in seen]

    for pieces in ([slice(None)], [slice(0, 7), slice(7, 30), slice(30, None)]):
        (la, ga, ia), (lb, gb, ib) = run(True, pieces), run(False, pieces)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert len(ia) == len(ib) and all(torch.equal(a, b) for a, b in zip(ia, ib))
    # the first segment's attention read no cache row: its keys are memory + segment only
    calls = []
    real = model_mod.topk_attention
    monkeypatch.setattr(model_mod, "topk_attention", lambda q, k, *a: calls.append(k.shape[-2]) or real(q, k, *a))
    run(True, [slice(None)])
    assert calls[:cfg.n_steps] == [cfg.mem_slots + cfg.segment_len] * cfg.n_steps
    calls.clear()
    m2 = ReSSFormer(ReSSFormerConfig.preset("tiny")).eval()  # top_k 8 > 4 slots + 1: the cache stays
    with torch.no_grad():
        m2(x[:, :4])
    assert calls[0] == 4 + cfg.cache_len + 4


def test_native_match():
    """pos[j]: the slot of a's row holding b[j], or k; indices outside [0, n) are an error."""
    g = torch.Generator().manual_seed(1)
    n, k = 30, 7
    a, b = (torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(200)]) for _ in range(2))
    pos = native.match(a, b, n)
    for ra, rb, rp in zip(a.tolist(), b.tolist(), pos.tolist()):
        assert rp == [ra.index(x) if x in ra else k for x in rb]
    with pytest.raises(ValueError, match="outside"):
        native.match(a, b.clamp(max=n - 1) + 1, n)


def test_sparse_moe_equals_dense(model):
    moe = model.blocks[0].moe
    x = torch.randn(3, 17, model.config.d_model)
    with torch.no_grad():
        sparse, experts, _ = moe(x)
        dense = moe.dense_forward(x)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert experts.shape == (3, 17, model.config.top_e)


def test_aux_losses_and_backward():
    m = perturbed_model()
    m.train()
    out = m(tokens(2, 70))
    for key in ("balance", "z", "struct", "loss"):
        assert torch.isfinite(out.aux[key])
    assert out.aux["struct"] > 0
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), tokens(2, 70)[:, 1:].reshape(-1))
    (loss + out.aux["loss"]).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["mem_update.gate.weight"].abs().sum() > 0  # memory trained through segment 2


@pytest.mark.parametrize("normalizer", ["entmax15", "sparsemax", "softmax"])
def test_normalizers_and_few_candidates(normalizer):
    # top_k larger than any candidate set of the first tokens: k is clamped
    m = perturbed_model(top_k=64, mem_slots=0, cache_len=0, normalizer=normalizer)
    with torch.no_grad():
        out = m(tokens(1, 5))
    assert torch.isfinite(out.logits).all()


def test_baseline_same_code():
    cfg = ReSSFormerConfig.preset("tiny")
    base = ReSSFormer(cfg.baseline())
    assert len(base.blocks) == cfg.n_steps
    with torch.no_grad():
        out = base(tokens(2, 20))
    assert out.logits.shape == (2, 20, 256)


@pytest.mark.parametrize("bad,err,match", [
    (torch.tensor([[1, 2, 300]]), ValueError, "token id 300 out of range"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1 out of range"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer"),
    (torch.tensor([1, 2, 3]), ValueError, "shape"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
])
def test_bad_inputs(model, bad, err, match):
    with pytest.raises(err, match=match):
        model(bad)


def test_bad_state(model):
    st = model(tokens(2, 5)).state
    with pytest.raises(ValueError, match="batch"):
        model(tokens(3, 5), st)
    with pytest.raises(ValueError, match="steps"):
        model(tokens(2, 5), st, steps=3)
    other = perturbed_model(d_model=32)
    with pytest.raises(ValueError, match="another config"):
        other(tokens(2, 5), other.init_state(2).__class__(**{**st.__dict__}))
    assert isinstance(st, State)


def test_attention_memory_is_chunked():
    """Scores are computed a query chunk at a time: results equal the unchunked computation."""
    from ressformer.ops import topk_attention_kernel

    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8)
    mask = torch.ones(50, 60, dtype=torch.bool).tril(10)
    a = topk_attention_kernel(q, k, v, mask, 8, "entmax15", 1 / math.sqrt(8), chunk=7)
    b = topk_attention_kernel(q, k, v, mask, 8, "entmax15", 1 / math.sqrt(8), chunk=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("normalizer", ["entmax15", "sparsemax"])
def test_attention_grad_finite_at_support_edge(normalizer):
    """Regression: the recompute backward once differentiated through the sort-based kernel,
    whose sqrt(delta) has an infinite derivative where delta = 0: NaN gradients in training."""
    from ressformer.ops import topk_attention

    # scores [0, 0, -2, -2]: entmax's halved, shifted [0, 0, -1, -1] has ss = 1, so delta = 0
    # exactly at rho = 4 (outside the support of size 2)
    q = torch.tensor([[[[1.0, 0.0]]]], requires_grad=True)
    k = torch.tensor([[[[0.0, 1.0], [0.0, -1.0], [-2.0, 0.5], [-2.0, 0.0]]]], requires_grad=True)
    v = torch.randn(1, 1, 4, 2, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out, _, w = topk_attention(q, k, v, mask, 4, normalizer, 1.0)
    (out.sum() + (w ** 2).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_dense_baseline_fast_path_equals_topk_attention():
    """The dense softmax baseline runs PyTorch's scaled_dot_product_attention; it must be the same
    function as TopKAttention over all keys (what its ONNX export runs)."""
    from ressformer.train import baseline_config

    torch.manual_seed(0)
    m = ReSSFormer(baseline_config(ReSSFormerConfig.preset("tiny"), 64)).eval()
    attns = [mod for mod in m.modules() if hasattr(mod, "dense_fast_path")]
    assert attns and all(a.dense_fast_path for a in attns)
    x = tokens(2, 64)
    with torch.no_grad():
        fast = m(x).logits
        for a in attns:
            a.dense_fast_path = False
        slow = m(x).logits
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not any(a.dense_fast_path for a in ReSSFormer(ReSSFormerConfig.preset("tiny")).modules()
                   if hasattr(a, "dense_fast_path"))


def test_custom_ops_keep_the_input_dtype_under_autocast():
    from ressformer import ops

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    q = k = v = torch.randn(1, 2, 8, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.entmax15(x).dtype == ops.sparsemax(x).dtype == torch.bfloat16
        out, _, w = ops.topk_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool).tril(), 3, "entmax15", 0.5)
        assert out.dtype == w.dtype == torch.bfloat16
        assert ops.topk_route(x.float(), 2)[0].dtype == torch.float32

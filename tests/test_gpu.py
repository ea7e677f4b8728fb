"""CUDA tests. Deselected by default; run on a GPU machine with `python -m pytest -m gpu`.

They fail (never skip) where CUDA is missing: selecting them says a GPU is there. The ONNX Runtime
CUDA test is marked `ort_gpu` as well: it needs onnxruntime-gpu (`pip install -e '.[gpu]'`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ressformer import ops
from ressformer.train import TrainConfig, read_metrics, train

from .conftest import perturbed_model

pytestmark = pytest.mark.gpu
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module", autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests marked gpu need a CUDA GPU and a CUDA build of torch; none is available here")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with the CPU, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


@pytest.mark.parametrize("preset, T", [("tiny", 80), ("small", 600)])
def test_forward_matches_cpu(cuda, preset, T):
    """fp32 on CUDA == fp32 on CPU: logits, every aux term and the carried state, across segments."""
    model = perturbed_model(preset)
    x = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        out = model.to(cuda)(x.to(cuda))
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=2e-4, rtol=1e-3)
    for k in ("balance", "struct"):
        torch.testing.assert_close(out.aux[k].cpu(), ref.aux[k], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out.state.memory.cpu(), ref.state.memory, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out.state.cache_k.cpu(), ref.state.cache_k, atol=1e-4, rtol=1e-3)


def test_pieces_equal_whole_on_cuda(cuda):
    model = perturbed_model("tiny").to(cuda)
    x = torch.randint(0, 256, (2, 75), device=cuda)
    with torch.no_grad():
        whole = model(x).logits
        st, outs = None, []
        for a, b in ((0, 10), (10, 45), (45, 75)):
            o = model(x[:, a:b], st)
            st = o.state
            outs.append(o.logits)
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["entmax15", "sparsemax"])
def test_normalizers_match_cpu_forward_and_backward(cuda, name):
    fn = getattr(ops, name)
    x = torch.randn(64, 300, dtype=torch.float64) * 3
    x[:4, 100:] = float("-inf")  # masked tails
    dy = torch.randn_like(x)
    xc = x.clone().requires_grad_(True)
    xg = x.to(cuda).requires_grad_(True)
    y, yg = fn(xc), fn(xg)
    y.backward(dy)
    yg.backward(dy.to(cuda))
    torch.testing.assert_close(yg.cpu(), y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=1e-12, rtol=1e-10)
    assert torch.equal(yg.cpu() > 0, y > 0)  # the same support


@pytest.mark.parametrize("normalizer", ["entmax15", "sparsemax", "softmax"])
def test_topk_attention_matches_cpu_and_gradcheck(cuda, normalizer):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    args = (mask, 6, normalizer, 0.35, 16)
    ref = ops.topk_attention(q, k, v, *args)
    out = ops.topk_attention(q.to(cuda), k.to(cuda), v.to(cuda), mask.to(cuda), *args[1:])
    torch.testing.assert_close(out[0].cpu(), ref[0], atol=1e-12, rtol=1e-10)
    picked = ref[2] > 0  # the same keys wherever they carry weight (-inf ties are unordered by design)
    assert torch.equal(out[1].cpu()[picked], ref[1][picked])
    qc, kc, vc = (t[:1, :1, :12].to(cuda).requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.topk_attention(a, b, c, mask[:12, :12].to(cuda),
                                                                       *args[1:])[0], (qc, kc, vc))


def test_bf16_training_lowers_loss_and_logs_memory(cuda, tmp_path):
    res = train(TrainConfig(steps=40, batch_size=16, eval_every=40, eval_batches=2, warmup=5, lr=1e-2,
                            device="cuda", out=str(tmp_path)), **QUIET)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert val[0] == pytest.approx(math.log(256), abs=0.3) and val[-1] < val[0] - 1.0
    steps = [r for r in recs if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["cuda_peak_gb"] > 0 for r in steps)
    assert res["step"] == 40


def test_resume_on_cuda_continues(cuda, tmp_path):
    """Resume restores the CUDA RNG and optimizer state: the resumed losses equal the uninterrupted
    run's (to float noise: CUDA's scatter/index reductions are not bitwise deterministic)."""
    common = dict(preset="tiny", batch_size=4, eval_batches=1, eval_every=0, warmup=2, steps=8, device="cuda")
    train(TrainConfig(**common, out=str(tmp_path / "full")), **QUIET)
    train(TrainConfig(**common, out=str(tmp_path / "split"), stop_at=4), **QUIET)
    train(TrainConfig(**common, out=str(tmp_path / "split"), resume=str(tmp_path / "split")), **QUIET)
    full, split = ([r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
                   for run in ("full", "split"))
    assert len(split) == 8
    np.testing.assert_allclose(split, full, rtol=1e-3)


def test_compiled_model_matches_eager(cuda):
    model = perturbed_model("tiny").to(cuda)
    x = torch.randint(0, 256, (2, 70), device=cuda)
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model)(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_training_step_without_host_sync(cuda, monkeypatch, preset):
    """A bf16 training step (forward, loss, backward, clip, AdamW) with no device-to-host
    synchronisation: CUDA's sync debug mode raises on any. The model's token range check reads
    the input by design and runs first, outside the checked region."""
    model = perturbed_model(preset).to(cuda).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randint(0, 256, (2, 2 * model.config.segment_len), device=cuda)
    model.check_tokens(x)
    monkeypatch.setattr(model, "check_tokens", lambda tokens: None)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, state=model.init_state(2, dtype=torch.bfloat16))
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x.flatten()) + out.aux["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # first step: lazy initialisation (cuBLAS handles, Triton compilation, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(loss))


def test_triton_kernel_is_selected_on_cuda(cuda):
    """On CUDA the custom op runs the fused Triton kernels: forward and backward equal the
    PyTorch kernel's (same keys; fp32 tolerance)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g).to(cuda) for _ in range(3))
    mask = torch.ones(300, 300, dtype=torch.bool, device=cuda).tril()
    res = []
    for flag in (True, False):  # True: as the automatic choice on CUDA, asserted below
        ops.TRITON = flag
        try:
            qs = [t.clone().requires_grad_() for t in (q, k, v)]
            out, idx, w = ops.topk_attention(*qs, mask, 32, "entmax15", 32 ** -0.5, 128)
            (out.pow(2).sum() + w.pow(2).sum()).backward()
            res.append((out, idx, w, *(t.grad for t in qs)))
        finally:
            ops.TRITON = None
    assert ops._triton(q, k, v, 32, forward=True) is not None and ops.TRITON_ERROR is None  # automatic on CUDA
    (tri, ref), live = res, res[1][2] > 0
    assert (tri[1][live] == ref[1][live]).float().mean() > 0.999  # fp32 sums in another order: rare flips
    for a, b in zip(tri[3:], ref[3:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(tri[0], ref[0], atol=1e-4, rtol=1e-3)


@pytest.mark.ort_gpu
def test_ort_cuda_session_matches_cpu(request):
    import onnxruntime as ort
    from ressformer.runtime import ReSSFormerSession

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.fail(f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()}); "
                    "install onnxruntime-gpu in place of onnxruntime")
    tiny_export = request.getfixturevalue("tiny_export")  # after the check: exporting takes a while
    ids = np.random.default_rng(0).integers(0, 256, (1, 70))
    cpu, gpu = ReSSFormerSession(tiny_export), ReSSFormerSession(tiny_export, provider="cuda")
    (ref, ref_state), (out, state) = cpu.forward(ids), gpu.forward(ids)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
    mem = state.memory.numpy() if isinstance(state.memory, ort.OrtValue) else state.memory  # state stays on the GPU
    np.testing.assert_allclose(mem, ref_state.memory, atol=1e-4, rtol=1e-3)
    greedy = [list(s.generate(ids[0, :20], 30, temperature=0)) for s in (cpu, gpu)]
    assert greedy[0] == greedy[1]

"""The dense-baseline comparison (bench/dense.py): the dense GPT's ONNX graph with its growing
key/value cache computes what PyTorch computes, however the input is cut; the smoke comparison
produces a complete report. No timing assertions (CI machines vary)."""

import json
import math
import re

import numpy as np
import pytest
from ressformer.bench import dense as db

from ressformer import ReSSFormerConfig

TINY = db.DenseConfig(vocab_size=256, n_layer=2, d_model=64, n_heads=2, d_ff=96)
ATOL = 1e-4  # fp32; measured max |ORT - PyTorch| 2.8e-5 on logits of magnitude up to ~5


@pytest.fixture(scope="module")
def tiny_model(torch_threads):
    torch = torch_threads
    model = db.dense_gpt(TINY, seed=0)
    with torch.no_grad():  # a random init near zero would hide position/mask mistakes: scale the weights up
        for p in model.parameters():
            p.mul_(4.0)
    return model


@pytest.fixture(scope="module", params=[("per_layer", 20), ("stacked", 18)], ids=lambda p: f"{p[0]}-opset{p[1]}")
def tiny_dense(request, tiny_model, tmp_path_factory):
    layout, opset = request.param
    path = db.export_dense(tiny_model, tmp_path_factory.mktemp("dense") / "dense.onnx", opset=opset, layout=layout)
    sess = db.DenseSession(path, threads=1)
    assert sess.layout == layout and sess.n_layer == TINY.n_layer and sess.n_heads == TINY.n_heads
    return tiny_model, sess


def _torch_forward(model, x):
    import torch

    z = torch.zeros(x.shape[0], TINY.n_heads, 0, TINY.head_dim)
    with torch.no_grad():
        lg, k, v = model(torch.from_numpy(x), torch.tensor(0), (z,) * TINY.n_layer, (z,) * TINY.n_layer)
    return lg.numpy(), torch.stack(k).numpy(), torch.stack(v).numpy()


def test_dense_onnx_equals_pytorch_whole_chunked_token_by_token(tiny_dense):
    model, sess = tiny_dense
    x = np.random.default_rng(1).integers(0, 256, (2, 19))
    ref, ref_k, ref_v = _torch_forward(model, x)
    assert np.abs(ref).max() > 0.5  # the logits are not trivially small
    whole, st = sess.forward(x)
    k, v = sess.cache_arrays(st)
    assert st[0] == 19 and k.shape == (TINY.n_layer, 2, TINY.n_heads, 19, TINY.head_dim)
    np.testing.assert_allclose(whole, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(k, ref_k, atol=ATOL, rtol=0)
    np.testing.assert_allclose(v, ref_v, atol=ATOL, rtol=0)
    for chunk in (1, 4, 7):  # 1 = token by token with the cache
        got, st = sess.forward(x, chunk=chunk)
        assert st[0] == 19
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        np.testing.assert_allclose(sess.cache_arrays(st)[0], ref_k, atol=ATOL, rtol=0)
    # decode by hand with explicit state: prefill 11 tokens, then one token at a time
    lg, st = sess.forward(x[:, :11])
    parts = [lg]
    for i in range(11, 19):
        lg, st = sess.forward(x[:, i:i + 1], st)
        parts.append(lg)
    np.testing.assert_allclose(np.concatenate(parts, 1), ref, atol=ATOL, rtol=0)


def test_dense_mask_is_causal(tiny_dense):
    """Changing a later token leaves the earlier logits unchanged (the mask over the cache)."""
    _, sess = tiny_dense
    x = np.random.default_rng(2).integers(0, 256, (1, 12))
    y = x.copy()
    y[0, 8] = (y[0, 8] + 1) % 256
    a, _ = sess.forward(x, chunk=5)
    b, _ = sess.forward(y, chunk=5)
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-4


def test_matching_config_within_one_percent():
    for name in ("tiny", "small"):
        cfg = ReSSFormerConfig.preset(name)
        target = db._ressformer_params(cfg)
        dc = db.matching_config(cfg)
        assert abs(dc.params - target) / target < 0.01, (name, dc, target)
        assert dc.d_model == cfg.d_model and dc.n_layer == cfg.n_steps
    assert db.matching_config(ReSSFormerConfig.preset("small")).params == db.dense_gpt(
        db.matching_config(ReSSFormerConfig.preset("small"))).num_params()


def test_crossover_interpolates_on_log_length():
    c = db.crossover([2048, 8192, 32768], [0.5, 2.0, 4.0])
    assert c["length"] == pytest.approx(4096)  # log ratio -0.69 -> +0.69 over log 2048 -> log 8192
    assert c["between"] == [2048, 8192]
    assert db.crossover([2048, 8192], [1.5, 3.0])["below"] == 2048
    assert db.crossover([2048, 8192], [0.5, 0.8])["never"] is True
    c = db.crossover([2048, 8192, 32768], [0.5, 0.9, None])  # dense out of memory at 32k
    assert c["length"] is None and c["between"] == [8192, 32768]


def test_smoke_comparison_report(tiny_checkpoint, tiny_export, tmp_path):
    # the suite's shared tiny export (conftest) saves exporting again; `--smoke` alone exports the tiny preset
    rep = db.run_comparison(smoke=True, threads=1, checkpoint=tiny_checkpoint, export_dir=tiny_export, progress=None)
    m = rep["meta"]
    assert m["checkpoint"] == str(tiny_checkpoint) and m["ressformer_config"]["d_model"] == 64
    assert m["lengths"] == [64, 128] and m["smoke"] is True and m["layout"] == "per_layer"
    assert m["onnx_opset"] == json.loads((tiny_export / "ressformer.json").read_text())["onnx_opset"]
    assert abs(m["dense_params"] - m["ressformer_params"]) / m["ressformer_params"] < 0.01
    assert len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert [c["length"] for c in rep["prefill"]] == [64, 128]
    assert [c["length"] for c in rep["decode"]] == [64, 128]
    assert [c["length"] for c in rep["memory"]] == [64, 128]
    for c in rep["prefill"]:
        assert c["measured"] == "in process" and len(c["runs"]["dense"]) == 2
        assert c["ressformer_s"] > 0 and c["dense_s"] > 0 and c["dense_status"] == "ok"
        assert c["ratio"] == pytest.approx(c["dense_s"] / c["ressformer_s"])
    for c in rep["decode"]:
        assert c["ressformer_tok_s"] > 0 and c["dense_tok_s"] > 0
        assert c["ratio"] == pytest.approx(c["ressformer_tok_s"] / c["dense_tok_s"])
    for c in rep["memory"]:
        for eng in ("ressformer", "dense"):
            assert c[eng]["status"] == "ok" and c[f"{eng}_peak_mb"] > 0
            assert c[eng]["peak_mb"] >= c[eng]["loaded_mb"]
            assert c[f"{eng}_peak_mb"] < 400  # the children import numpy + onnxruntime, never torch
            assert c[eng]["prefill_s"] > 0 and c[eng]["decode_tok_s"] > 0
    for kind in ("prefill", "decode"):
        cx = rep["crossover"][kind]
        assert isinstance(cx["text"], str) and cx["text"]
        assert cx["length"] is None or 64 <= cx["length"] <= 128 or not math.isfinite(cx["length"])
    t = rep["table"]
    assert "crossover, prefill" in t and "crossover, decode" in t and "load avg" in t and "chunks of" in t
    assert [ln.split()[0] for ln in t.splitlines() if re.match(r"\s*\d+\*? +\| +[\d.]+ s ", ln)] == ["64", "128"]
    assert "cross-check" in t  # the children's single runs at the lengths timed in process
    json.loads(json.dumps(rep, default=float))
    png = db.plot(rep, tmp_path / "dense.png")
    assert png.stat().st_size > 1000


def test_long_lengths_run_once_in_the_child():
    """Lengths with one round (the full run's 32k) are timed in the peak-memory child only."""
    assert db._plan(32768, smoke=False) == (0, 1) and db._plan(8192, smoke=False)[1] > 1
    assert db._predict([(2048, 1.0), (8192, 8.0)], 32768) == pytest.approx(64.0)  # exponent 1.5
    assert db._predict([(2048, 1.0)], 4096) == pytest.approx(4.0)  # quadratic from one point
    assert db._predict([], 4096) is None
    assert db._dense_guard(32768, db.DenseConfig(), 2048, [(8192, 100.0)], 240.0).startswith("too slow")
    assert db._dense_guard(2048, db.DenseConfig(), 2048, [], 240.0) is None


def test_cli_rejects_bad_lengths():
    with pytest.raises(SystemExit, match="--lengths"):
        db._lengths("2k,8k")
    with pytest.raises(SystemExit, match="positive"):
        db._lengths("0,128")


def test_bench_cli_lengths_need_baseline():
    from click.testing import CliRunner

    from ressformer.cli import main

    r = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--lengths", "64"])
    assert r.exit_code == 2 and "--lengths goes with --baseline" in r.output

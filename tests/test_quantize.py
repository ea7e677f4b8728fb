"""Weight-only int8/int4 exports (ONNX Runtime flavour) and weights-once loading (issue 20)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from ressformer.export.exporter import export_checkpoint
from ressformer.export.ops import _all_nodes as _nodes
from ressformer.parity.ladder import validate_export
from ressformer.parity.quality import BUDGETS, check_quality
from ressformer.runtime import ModelError, ReSSFormerSession

from ressformer import load_checkpoint
from ressformer.cli import main


@pytest.fixture(scope="module")
def int4_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    return export_checkpoint(tiny_checkpoint, out, quantize="int4", validate=validate_export, progress=lambda s: None)


def _weight_matmuls(g):
    inits = {i.name for i in g.initializer}
    return [n.name for n in _nodes(g) if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def _branches(g):
    """(then, else) graphs of the piece graph's one If."""
    ifs = [n for n in g.node if n.op_type == "If"]
    assert len(ifs) == 1
    return tuple(next(a.g for a in ifs[0].attribute if a.name == b) for b in ("then_branch", "else_branch"))


def test_int4_covers_every_weight_matmul(int4_export):
    """Attention, experts, memory update and head: no float weight MatMul is left but the routers."""
    meta = json.loads((int4_export / "ressformer.json").read_text())
    assert meta["quantize"] == "int4" and meta["quantize_block_size"] == 32 and meta["flavour"] == "onnxruntime"
    assert meta["onnxruntime_ops"] == ["MatMulNBits", "QMoE"] and meta["expert_layer"] == "qmoe"  # auto, tiny
    assert set(meta["graphs"]) == {"init", "piece_k2", "segment_end_k2"}  # no step graphs unless asked
    for name in ("piece_k2", "segment_end_k2"):
        g = onnx.load(str(int4_export / meta["graphs"][name]["file"])).graph
        left = _weight_matmuls(g)
        assert all(n.op_type == "Gemm" for n in _nodes(g) if n.name in left)  # the routers' E-wide Gemms only
        ops = [n.op_type for n in _nodes(g)]
        assert ops.count("MatMulNBits") >= 3 and all(
            a.i == 4 for n in _nodes(g) if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")


def test_hybrid_runs_qmoe_for_one_token_and_the_dispatch_otherwise(int4_export, tiny_checkpoint, tmp_path):
    """The hybrid piece graph: If(one token) holds the QMoE graph (one node per step, no dispatch), else the
    dispatch graph (per-expert MatMulNBits, no QMoE); its file holds one copy of the expert weights (the
    dispatch's are views of QMoE's stacked ones). Each branch gives what the export of its flavour gives:
    a decoded token the qmoe export's logits, a prefill the dispatch export's."""
    ex = {e: export_checkpoint(tiny_checkpoint, tmp_path / e, quantize="int4", experts=e, validate=None,
                               progress=lambda s: None) for e in ("hybrid", "dispatch")}
    ex["qmoe"] = int4_export  # auto at tiny
    meta = json.loads((ex["hybrid"] / "ressformer.json").read_text())
    assert meta["expert_layer"] == "hybrid" and meta["onnxruntime_ops"] == ["MatMulNBits", "QMoE"]
    g = onnx.load(str(ex["hybrid"] / "piece_k2.onnx")).graph
    one, many = _branches(g)
    ops = [[n.op_type for n in _nodes(b)] for b in (one, many)]
    assert ops[0].count("QMoE") == 2 and "ScatterND" not in ops[0]  # one node per step
    assert "QMoE" not in ops[1] and ops[1].count("ScatterND") == 2  # the sorted dispatch, once per step
    inits = {i.name: i for i in g.initializer}
    expert_w = {n.input[1] for n in _nodes(many) if n.op_type == "MatMulNBits"} - {
        n.input[1] for n in _nodes(one) if n.op_type == "MatMulNBits"}  # the experts' (the rest is shared)
    assert len(expert_w) == 2 * 4 and not expert_w & set(inits)  # views (Gather + Reshape), not stored again
    stored = {k: sum(i.ByteSize() for i in onnx.load(str(d / "piece_k2.onnx")).graph.initializer)
              for k, d in ex.items()}
    assert stored["hybrid"] <= 1.05 * stored["qmoe"], stored
    ids = np.random.default_rng(0).integers(0, 256, (1, 45))  # a segment end (32), then 13 tokens
    runs = {}
    for name, d in ex.items():
        sess = ReSSFormerSession(d, threads=1)
        pre = sess.forward(ids)[0][0]  # pieces of 32 and 13 tokens
        dec, st = [], None
        for t in range(ids.shape[1]):  # one token per run, across the segment end
            lo, st = sess.forward(ids[:, t:t + 1], st)
            dec.append(lo[0, 0])
        runs[name] = (pre, np.stack(dec))
    np.testing.assert_allclose(runs["hybrid"][0], runs["dispatch"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(runs["hybrid"][1], runs["qmoe"][1], atol=1e-5, rtol=0)
    assert np.abs(runs["qmoe"][1] - runs["dispatch"][1]).max() > 1e-4  # so the two branches really differ
    rep = check_quality(load_checkpoint(tiny_checkpoint), ex["hybrid"])  # its last 256 bytes: the QMoE graph
    assert rep["passed"] and rep["quality"]["decoded_positions"] == 256, rep["summary"]


def test_auto_expert_layer():
    """auto: QMoE while the quantized experts are small, the dispatch from AUTO_DISPATCH_BYTES on; QMoE
    needs the block size to divide d_model and d_ff."""
    from ressformer.export.exporter import AUTO_DISPATCH_BYTES, resolve_expert_layer

    from ressformer import ReSSFormerConfig

    tiny, base = ReSSFormerConfig.preset("tiny"), ReSSFormerConfig.preset("base")
    assert resolve_expert_layer(tiny, "auto", "int4", 32) == "qmoe"
    assert resolve_expert_layer(base, "auto", "int4", 32) == "dispatch"  # 18.9 MB of int4 experts
    assert 8 * 2 * 768 * 3072 // 2 >= AUTO_DISPATCH_BYTES > 8 * 2 * 256 * 512  # base vs small, int8 too
    assert resolve_expert_layer(base, "hybrid", "int4", 32) == "hybrid"
    assert resolve_expert_layer(tiny, "qmoe", "int8", 256) == "dispatch"  # 256 divides neither 64 nor 128


def test_quantized_export_is_validated_on_quality(int4_export):
    rep = json.loads((int4_export / "validation.json").read_text())
    q = rep["quality"]
    assert rep["passed"] and q["mode"] == "int4" and q["bytes"] == 8192 and q["decoded_positions"] == 256
    assert abs(q["bpb_delta"]) <= BUDGETS["int4"]["bpb"] and q["top1_agreement"] >= BUDGETS["int4"]["top1"]
    card = (int4_export / "README.md").read_text()
    assert "bits per byte" in card and f"{q['bpb_delta']:+.4f}" in card and "MatMulNBits" in card


def test_quality_check_fails_over_budget(int4_export, tiny_checkpoint):
    """The budget is a real gate: a model that is not the export's fails it."""
    from tests.conftest import perturbed_model

    other = perturbed_model(seed=1)
    rep = check_quality(other, int4_export, text=b"To be, or not to be, that is the question. " * 20)
    assert not rep["passed"] and rep["first_failing_rung"] == "quality"


def test_quantized_export_hashes_and_runs(int4_export, tiny_export):
    sess = ReSSFormerSession(int4_export, threads=1)
    x = np.random.default_rng(0).integers(0, 256, (2, 70))  # two segment ends
    a, _ = sess.forward(x)
    b, _ = ReSSFormerSession(tiny_export, threads=1).forward(x)
    assert np.isfinite(a).all() and np.abs(a - b).max() < 0.2 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8
    data = (int4_export / "piece_k2.onnx").read_bytes()
    (int4_export / "piece_k2.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        with pytest.raises(ModelError, match="sha256"):
            ReSSFormerSession(int4_export)
    finally:
        (int4_export / "piece_k2.onnx").write_bytes(data)


def test_int8_and_block_size(tiny_checkpoint, tmp_path):
    out = export_checkpoint(tiny_checkpoint, tmp_path / "q", quantize="int8", block_size=16, validate=None,
                            progress=lambda s: None)
    meta = json.loads((out / "ressformer.json").read_text())
    assert meta["quantize_block_size"] == 16
    g = onnx.load(str(out / "piece_k2.onnx")).graph
    attrs = {a.name: a.i for n in _nodes(g) if n.op_type == "QMoE" for a in n.attribute}
    assert attrs["expert_weight_bits"] == 8 and attrs["block_size"] == 16
    rep = check_quality(load_checkpoint(tiny_checkpoint), out)
    assert rep["passed"] and rep["quality"]["bpb_delta"] <= BUDGETS["int8"]["bpb"], rep["summary"]


def test_dispatch_experts_use_matmulnbits_only(tiny_checkpoint, tmp_path):
    """--experts dispatch: the portable sparse dispatch with each expert's two MatMuls as MatMulNBits (no
    QMoE): the experts are quantized too, and the export passes the same quality budget."""
    out = export_checkpoint(tiny_checkpoint, tmp_path / "d", quantize="int4", experts="dispatch",
                            validate=validate_export, progress=lambda s: None)
    meta = json.loads((out / "ressformer.json").read_text())
    assert meta["onnxruntime_ops"] == ["MatMulNBits"]
    g = onnx.load(str(out / "piece_k2.onnx")).graph
    assert not [n for n in g.node if n.op_type == "QMoE"]
    n_experts = 4  # tiny
    assert sum(n.op_type == "MatMulNBits" for n in g.node) >= 2 * n_experts * 2  # w1, w2 per expert per step
    assert [n.op_type for n in g.node if n.name in _weight_matmuls(g)] == ["Gemm"] * 2  # the routers
    assert json.loads((out / "validation.json").read_text())["passed"]


def test_bad_quantize_options(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unsupported quantization"):
        export_checkpoint(tiny_checkpoint, tmp_path / "a", quantize="int3")
    with pytest.raises(ValueError, match="block size 48"):
        export_checkpoint(tiny_checkpoint, tmp_path / "b", quantize="int4", block_size=48)
    with pytest.raises(ValueError, match="leave out the trained K"):
        export_checkpoint(tiny_checkpoint, tmp_path / "c", steps=3)
    r = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "d"), "--block-size", "64"])
    assert r.exit_code == 2 and "--quantize" in r.output
    r = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "d"), "--quantize", "int2"])
    assert r.exit_code == 2 and "unsupported quantization" in r.output
    r = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "d"),
                                  "--experts", "dispatch"])
    assert r.exit_code == 2 and "--quantize" in r.output
    with pytest.raises(ValueError, match="unknown expert layer"):
        export_checkpoint(tiny_checkpoint, tmp_path / "e", quantize="int4", experts="dense")


def test_session_loads_only_the_graphs_its_path_runs(tiny_checkpoint, tiny_export, tmp_path):
    """Weights once in memory: the unrolled path never loads the step graphs (which repeat the weights);
    they load on first use of the steps path. An export without them says how to get them."""
    sess = ReSSFormerSession(tiny_export, threads=1)
    assert set(sess.graphs) == {"init", "piece_k2", "segment_end_k2"}
    sess.forward(np.array([[1, 2, 3]]), path="steps")
    assert {"embed", "step", "head"} <= set(sess.graphs)  # memory.onnx: at the first segment end
    out = export_checkpoint(tiny_checkpoint, tmp_path / "u", validate=None, progress=lambda s: None)
    meta = json.loads((out / "ressformer.json").read_text())
    assert set(meta["graphs"]) == {"init", "piece_k2", "segment_end_k2"}
    with pytest.raises(ValueError, match="--step-graphs"):
        ReSSFormerSession(out).forward(np.array([[1]]), steps=3)



def test_pieces_are_bounded_and_equal_the_whole(tiny_export):
    """max_piece cuts long inputs into bounded runs (prefill memory independent of the prompt's length);
    the logits and the state do not depend on the cut."""
    x = np.random.default_rng(1).integers(0, 256, (2, 75))
    a, sa = ReSSFormerSession(tiny_export, max_piece=None).forward(x)
    small = ReSSFormerSession(tiny_export, max_piece=5)
    runs = []
    real = small.graphs["piece_k2"].run
    small.graphs["piece_k2"].run = lambda feeds, outputs=None: (runs.append(feeds["tokens"].shape[1]),
                                                                  real(feeds, outputs))[1]
    b, sb = small.forward(x)
    assert max(runs) == 5 and sum(runs) == 75
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(sa.memory, sb.memory, atol=2e-5)
    with pytest.raises(ValueError, match="max_piece"):
        ReSSFormerSession(tiny_export, max_piece=0)


def test_sessions_run_without_the_cpu_memory_arena(tiny_export):
    """The arena would keep a prefill's peak allocations for the session's life: off unless asked for, and
    the numbers do not depend on it."""
    x = np.random.default_rng(2).integers(0, 256, (1, 40))
    off = ReSSFormerSession(tiny_export, threads=1)
    on = ReSSFormerSession(tiny_export, threads=1, memory_arena=True)
    assert all(not g.sess.get_session_options().enable_cpu_mem_arena for g in off.graphs.values())
    assert all(g.sess.get_session_options().enable_cpu_mem_arena for g in on.graphs.values())
    np.testing.assert_array_equal(off.forward(x)[0], on.forward(x)[0])

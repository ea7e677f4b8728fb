"""The parity ladder passes on a real export, and catches planted defects at the right rung."""

import hashlib
import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from ressformer.export.exporter import model_hash
from ressformer.parity.ladder import Ladder, compare, run_ladder, validate_export

from ressformer import load_checkpoint

FAST = dict(lengths=[1, 7, 9, 40, 69], batches=(1, 3), generate_tokens=128)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def test_ladder_passes(model, tiny_export):
    rep = run_ladder(model, tiny_export, **FAST)
    assert rep["passed"], rep["summary"]
    rungs = {r["rung"] for r in rep["rows"]}
    assert rungs == {"ops", "step", "segment", "stream", "decode", "generate"}
    gen = next(r for r in rep["rows"] if r["rung"] == "generate")
    assert gen["compared"] == 128 and gen["max_abs"] == 0.0
    # K at inference other than trained, and K = 1
    assert any("K=1" in r["case"] for r in rep["rows"]) and any("K=4" in r["case"] for r in rep["rows"])


def test_compare_fails_on_mismatch():
    ref = np.ones((2, 3))
    assert compare("x", "c", "o", ref + 1e-6, ref, (1e-5, 0)).passed
    assert not compare("x", "c", "o", ref + 1e-3, ref, (1e-5, 0)).passed
    assert not compare("x", "c", "o", np.full((2, 3), np.nan), ref, (1e-5, 0)).passed
    assert not compare("x", "c", "o", ref[:1], ref, (1e-5, 0)).passed


# ---- planted defects --------------------------------------------------------------------------
def planted(src, dst, graph: str, edit):
    """Copy an export, edit one graph, and re-sign it so the runtime loads it."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "ressformer.json").read_text())
    path = dst / meta["graphs"][graph]["file"]
    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(path))
    meta["graphs"][graph]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta["model_sha256"] = model_hash(meta)
    (dst / "ressformer.json").write_text(json.dumps(meta))
    return dst


def first_failing(model, export_dir):
    rep = run_ladder(model, export_dir, lengths=[9, 69], batches=(2,), generate_tokens=32)
    assert not rep["passed"]
    return rep["first_failing_rung"]


def perturb_weight(m):
    t = max(m.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)  # the expert weights
    a = numpy_helper.to_array(t).copy()
    a.flat[a.size // 3] += 0.05 * float(np.abs(a).max())
    t.CopyFrom(numpy_helper.from_array(a, t.name))


def softmax_body(m):
    from ressformer.export.ops import topk_attention_proto

    for i, f in enumerate(m.functions):
        if f.name == "TopKAttention":
            new = topk_attention_proto("softmax")
            new.doc_string = f.doc_string  # pretend it is still the entmax body
            for imp in new.opset_import:
                if imp.domain == "":
                    imp.version = next(o.version for o in m.opset_import if o.domain == "")
            m.functions[i].CopyFrom(new)


def gate_sign(m):
    node = next(n for n in m.graph.node if n.op_type == "Sigmoid")
    neg = helper.make_node("Neg", [node.input[0]], [node.input[0] + "_neg"], name="planted_neg")
    node.input[0] = node.input[0] + "_neg"
    idx = list(m.graph.node).index(node)
    m.graph.node.insert(idx, neg)


@pytest.mark.parametrize("graph,edit,rung", [
    ("step", perturb_weight, "step"),
    ("step", softmax_body, "ops"),
    ("memory", gate_sign, "stream"),
    ("piece_k2", perturb_weight, "step"),
    ("piece_k2", softmax_body, "ops"),
    ("segment_end_k2", gate_sign, "stream"),
])
def test_planted_defect_caught_at_right_rung(model, tiny_export, tmp_path, graph, edit, rung):
    bad = planted(tiny_export, tmp_path / "bad", graph, edit)
    assert first_failing(model, bad) == rung


def run_rungs(lad):
    """The ladder's rungs in order on a prepared Ladder; returns the first failing rung."""
    lad.rung_ops()
    lad.rung_step(batch=2)
    lad.rung_segment(2, 9)
    lad.rung_stream(2, 69)
    lad.rung_decode(2, 40)
    lad.rung_generate(new_tokens=32)
    f = lad.report.first_failure()
    return f.rung if f else None


def test_stream_rung_catches_cache_off_by_one(model, tiny_export, monkeypatch):
    """The next segment's token cache shifted by one position (oldest entry repeated)."""
    lad = Ladder(model, tiny_export)
    real = lad.sess._piece_unrolled

    def shifted(tokens, state, diagnostics=None):
        logits, new = real(tokens, state, diagnostics)
        if new.pos % lad.sess.segment_len == 0:  # a segment ended: shift its next caches
            roll = lambda c: np.concatenate([c[..., :1, :], c[..., :-1, :]], -2)  # noqa: E731
            new = replace(new, cache_k=roll(new.cache_k), cache_v=roll(new.cache_v))
        return logits, new

    monkeypatch.setattr(lad.sess, "_piece_unrolled", shifted)
    assert run_rungs(lad) == "stream"


def test_decode_rung_catches_bad_kv_cache(model, tiny_export, monkeypatch):
    """A runtime that appends a piece's keys/values one row too early into the segment's buffers
    (over the newest key/value, leaving the last row empty): the segment rung (one piece, no past)
    passes, the decode rung fails."""
    lad = Ladder(model, tiny_export)
    sess = lad.sess
    real = sess._appended

    def off_by_one(state, fed, new_k, new_v, T):
        if state.pos % sess.segment_len == 0:
            return real(state, fed, new_k, new_v, T)
        early = replace(state, pos=state.pos - 1)
        out = real(early, fed, new_k, new_v, T)
        out.tip.n += 1  # the state claims its rows: only the attention sees the damage
        return replace(out, pos=state.pos + T, past_len=(out.past_len + 1) % sess.segment_len)

    monkeypatch.setattr(sess, "_appended", off_by_one)
    lad.rung_segment(1, 20)
    assert lad.report.passed
    lad.rung_decode(1, 20)
    assert lad.report.first_failure().rung == "decode"


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["sparsemax", "softmax"])
def test_ladder_other_normalizers(normalizer, tmp_path):
    from ressformer.export.exporter import export_checkpoint

    from ressformer import save_checkpoint
    from tests.conftest import perturbed_model

    save_checkpoint(perturbed_model(normalizer=normalizer), tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", validate=validate_export, progress=lambda s: None)
    rep = run_ladder(load_checkpoint(tmp_path / "ck"), tmp_path / "ex", **FAST)
    assert rep["passed"], rep["summary"]


@pytest.mark.slow
def test_ladder_long_inputs(model, tiny_export):
    rep = run_ladder(model, tiny_export, lengths=[257, 2048], batches=(1, 3), generate_tokens=128)
    assert rep["passed"], rep["summary"]

"""bench/decode_floor.py: the weight matmuls a decoded token runs, split from the rest of its time."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from ressformer.bench import decode_floor as df
from ressformer.export.exporter import export_checkpoint
from ressformer.runtime import ReSSFormerSession

CONTEXT = 20


def _routing(export, context: int) -> list[set[int]]:
    """The experts each step routes the token decode_floor decodes (the same random tokens)."""
    s = ReSSFormerSession(export, threads=1)
    rng = np.random.default_rng(0)
    _, st = s.forward(rng.integers(0, s.vocab_size, (1, context)))
    diag = []
    s.forward(rng.integers(0, s.vocab_size, (1, 1)), st, diagnostics=diag)
    return [set(d["experts"].reshape(-1).tolist()) for d in diag]


@pytest.mark.parametrize("quantize,experts", [(None, "dispatch"), ("int4", "dispatch"), ("int4", "qmoe")])
def test_weights_are_the_matmuls_a_decoded_token_runs(tiny_checkpoint, tmp_path, quantize, experts):
    from ressformer import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    cfg = model.config
    ex = export_checkpoint(tiny_checkpoint, tmp_path / "ex", quantize=quantize, experts=experts, validate=None,
                           progress=lambda s: None)
    work = tmp_path / "work"
    work.mkdir()
    nodes, inits, opsets, widths = df.ressformer_weights(ex, CONTEXT, 1, work)
    per_step = 3 + (1 if experts == "qmoe" else 2 * cfg.top_e)  # qkv, proj, router; the experts
    assert len(nodes) == cfg.n_steps * per_step + 1  # + the head
    if experts == "dispatch":  # only the routed experts' matmuls (the others ran on no rows)
        ran = [set() for _ in range(cfg.n_steps)]
        for n in nodes:
            m = re.match(r"dispatch(\d+)/[hy]_(\d+)", n.name)
            if m:
                ran[int(m[1])].add(int(m[2]))
        assert ran == _routing(ex, CONTEXT)
    else:
        assert sum(n.op_type == "QMoE" for n in nodes) == cfg.n_steps
    proto, feeds = df.floor_model(nodes, inits, opsets, widths)
    outs = df._session(proto, 1).run(None, feeds)
    assert all(o.shape[0] == 1 and np.isfinite(o).all() for o in outs)
    d = cfg.d_model
    assert sorted(o.shape[1] for o in outs).count(3 * d) == cfg.n_steps  # qkv once per step
    if quantize is None:  # the floor graph multiplies by the model's own weights
        w = model.blocks[0].attn.qkv.weight.detach().numpy()
        g = onnx.load_from_string(proto).graph
        for node, o in zip(g.node, outs):
            if o.shape[1] == 3 * d:
                np.testing.assert_allclose(o, feeds[node.input[0]] @ w.T, rtol=1e-5, atol=1e-6)
    assert df.weight_bytes(nodes, inits) > 0


def test_hybrid_export_is_refused(tiny_checkpoint, tmp_path):
    ex = export_checkpoint(tiny_checkpoint, tmp_path / "ex", quantize="int4", experts="hybrid", validate=None,
                           progress=lambda s: None)
    with pytest.raises(ValueError, match="hybrid export"):
        df.ressformer_weights(ex, CONTEXT, 1, tmp_path)


def test_measure_splits_a_token(tiny_export):
    rep = df.measure(tiny_export, context=CONTEXT, tokens=3, threads=1, rounds=1, progress=lambda s: None)
    assert rep["token_ms"] >= rep["run_ms"] > rep["weights_ms"] > 0
    assert rep["weight_nodes"] > 0 and "genai" not in rep
    text = df.format_report(rep)
    assert "weights" in text and "Python" in text


def test_genai_weights_are_its_constant_matmuls(tmp_path):
    r = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(r.standard_normal((8, 8)).astype(np.float32), n) for n in ("w1", "w2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="a"),
             helper.make_node("MatMul", ["a", "a"], ["b"], name="b"),  # activations only: not a weight
             helper.make_node("Gemm", ["b", "w2"], ["y"], name="c", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 8])], [w1, w2])
    onnx.save(helper.make_model(g), tmp_path / "model.onnx")
    found, inits, _, widths = df.genai_weights(tmp_path)
    assert [n.name for n in found] == ["a", "c"] and widths == {"a": (8,), "c": (8,)}
    assert df.weight_bytes(found, inits) == 2 * 8 * 8 * 4


def test_cli_checks_its_numbers(capsys):
    with pytest.raises(SystemExit):
        df.main(["some_export", "--tokens", "0"])
    assert "--tokens must be >= 1" in capsys.readouterr().err

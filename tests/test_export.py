"""Export: graphs, sidecar, function nodes, checker, ORT load, validation, bad input."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from ressformer.export.exporter import ExportError, export_checkpoint
from ressformer.parity.ladder import validate_export

from ressformer.cli import main


def test_export_contents(tiny_export):
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    assert meta["ressformer_opset"] == {"domain": "ressformer", "version": 1}
    assert meta["steps"] == 2 and meta["tokenizer"]["type"] == "bytes"
    assert set(meta["graphs"]) == {"init", "embed", "step", "head", "memory", "piece_k2", "segment_end_k2"}
    assert meta["unrolled"] == {"2": {"piece": "piece_k2", "segment_end": "segment_end_k2"}}
    assert meta["format_version"] == 3 and len(meta["model_sha256"]) == 64
    assert json.loads((tiny_export / "validation.json").read_text())["passed"]
    for name, g in meta["graphs"].items():
        path = tiny_export / g["file"]
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        assert m.ir_version <= 10
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # no extra library
        assert [i.name for i in m.graph.input] == [i["name"] for i in g["inputs"]]
        if name in ("step", "piece_k2", "segment_end_k2", "memory"):
            ops = {n.op_type for n in m.graph.node if n.domain == "ressformer"}
            # the piece graph attends over the parts (format 3): TopK + the sorted normalizer inline
            assert ("Entmax15Sorted" if name == "piece_k2" else "TopKAttention") in ops
            funcs = {f.name for f in m.functions if f.domain == "ressformer"}
            assert ops <= funcs and "Entmax15" in funcs
            assert ("ressformer", 1) in {(o.domain, o.version) for o in m.opset_import}
        if name == "piece_k2":  # the segment's keys/values are read, never copied (no Split/Concat/Slice)
            state = ("past_", "cache_k_", "cache_v_")
            readers = {n.op_type for n in m.graph.node for i in n.input if i.startswith(state)}
            assert readers <= {"Shape", "Transpose", "MatMul"}, readers
            assert [o.name for o in m.graph.output][2:4] == ["new_k", "new_v"]
        if name == "step":
            assert "TopKRoute" in ops
            dims = {d.dim_param for i in m.graph.input for d in i.type.tensor_type.shape.dim}
            assert {"batch", "length", "past"} <= dims


def test_weights_stored_once(tiny_checkpoint, tiny_export):
    """piece_k2.onnx unrolls K steps but holds the shared block's weights once."""
    from ressformer import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    full = onnx.load(str(tiny_export / "piece_k2.onnx"))
    init_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in full.graph.initializer)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert init_bytes < 1.5 * param_bytes


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_bad_inputs(tiny_checkpoint, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", out)
    with pytest.raises(ValueError, match="unsupported opset"):
        export_checkpoint(tiny_checkpoint, out, opset=9)
    with pytest.raises(ValueError, match="unsupported dtype"):
        export_checkpoint(tiny_checkpoint, out, dtype="bf16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(tiny_checkpoint, tmp_path / "full")
    # corrupted weights
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        export_checkpoint(bad, out)
    # config that does not match the weights
    mis = tmp_path / "mis"
    shutil.copytree(tiny_checkpoint, mis)
    meta = json.loads((mis / "config.json").read_text())
    meta["config"]["d_ff"] = 64
    (mis / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its config"):
        export_checkpoint(mis, out)
    assert not out.exists() and not _leftovers(tmp_path)


def test_broken_export_fails_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """A graph that computes the wrong thing fails validation: error, no folder, no temp files."""
    import ressformer.export.exporter as ex

    real = ex._export_graph

    def broken(model, name, spec, cfg, opset):
        proto = real(model, name, spec, cfg, opset)
        if name in ("head", "piece_k2"):
            w = next(t for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).size > 1000)
            arr = onnx.numpy_helper.to_array(w).copy()
            arr.flat[0] += 0.5
            w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
        return proto

    monkeypatch.setattr(ex, "_export_graph", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="validation failed"):
        export_checkpoint(tiny_checkpoint, out, validate=validate_export, progress=lambda s: None)
    assert not out.exists() and not _leftovers(tmp_path)


def test_cli_errors_exit_nonzero(tiny_checkpoint, tmp_path):
    r = CliRunner().invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--dtype", "int4"])
    assert r.exit_code != 0 and "unsupported dtype" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("opset", [18, 23])
def test_opsets(tiny_checkpoint, tmp_path, opset):
    out = export_checkpoint(tiny_checkpoint, tmp_path / f"o{opset}", opset=opset, validate=validate_export,
                            step_graphs=True, progress=lambda s: None)
    m = onnx.load(str(out / "step.onnx"))
    assert ("", opset) in {(o.domain, o.version) for o in m.opset_import}
    from ressformer.runtime import ReSSFormerSession

    logits, _ = ReSSFormerSession(out).forward(np.array([[1, 2, 3]]))
    assert np.isfinite(logits).all()


def test_unrolled_graphs_for_several_k(tiny_checkpoint, tmp_path):
    """--steps 2,3: each K gets its piece/segment_end graphs; K=3 (test-time depth) then runs
    unrolled, equal to PyTorch and to the step graphs."""
    import torch
    from ressformer.runtime import ReSSFormerSession

    from ressformer import load_checkpoint

    out = export_checkpoint(tiny_checkpoint, tmp_path / "ex", steps=[2, 3], validate=None, step_graphs=True,
                            progress=lambda s: None)
    meta = json.loads((out / "ressformer.json").read_text())
    assert sorted(meta["unrolled"]) == ["2", "3"] and meta["steps"] == 2
    sess = ReSSFormerSession(out)
    x = np.random.default_rng(0).integers(0, 256, (2, 70))  # two segment ends
    got, st = sess.forward(x, steps=3)
    assert st.path == "unrolled" and st.steps == 3
    with torch.no_grad():
        ref = load_checkpoint(tiny_checkpoint)(torch.from_numpy(x), steps=3).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(got, sess.forward(x, steps=3, path="steps")[0], atol=1e-5, rtol=1e-4)


def test_attention_over_parts_selects_as_over_their_concatenation(tmp_path):
    """The piece graphs' attention (format 3) in ONNX Runtime: keys in three parts (the middle one a
    buffer with ignored rows), integer scores full of ties: the same selection (ties to the lower
    index of the concatenation), weights and output as the PyTorch kernel over the valid rows."""
    import torch
    from ressformer.export.ops import function_protos

    from ressformer.ops import topk_attention_kernel, topk_attention_parts

    class Parts(torch.nn.Module):
        def forward(self, q, k0, v0, k1, v1, k2, v2, n_valid):
            T, cap = q.shape[-2], k1.shape[-2]
            mask = torch.cat([torch.ones(T, k0.shape[-2], dtype=torch.bool),
                              (torch.arange(cap) < n_valid)[None, :].expand(T, cap),
                              torch.ones(T, T, dtype=torch.bool).tril()], 1)
            return topk_attention_parts(q, [k0, k1, k2], [v0, v1, v2], mask, 6, "entmax15", 0.5, parts=True)

    g = torch.Generator().manual_seed(0)
    B, H, T, D, m, cap, P = 2, 3, 4, 8, 5, 12, 7
    q = torch.randint(-1, 2, (B, H, T, D), generator=g).float()  # small integers: many exact ties
    ks = [torch.randint(-1, 2, (B, H, n, D), generator=g).float() for n in (m, cap, T)]
    vs = [torch.randn(B, H, n, D, generator=g) for n in (m, cap, T)]
    args = (q, ks[0], vs[0], ks[1], vs[1], ks[2], vs[2], torch.tensor(P))
    dyn = {"q": {2: "t"}, "k0": {}, "v0": {}, "k1": {2: "cap"}, "v1": {2: "cap"}, "k2": {2: "t"}, "v2": {2: "t"},
           "n_valid": {}}
    prog = torch.onnx.export(Parts().eval(), args, dynamo=True, opset_version=20, dynamic_shapes=dyn, verbose=False)
    proto = prog.model_proto
    proto.functions.extend(function_protos("entmax15", 20))
    proto.opset_import.append(onnx.helper.make_opsetid("ressformer", 1))
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    o, idx, w = s.run(None, {n.name: a.numpy() for n, a in zip(s.get_inputs(), args)})
    keys = torch.cat([ks[0], ks[1][..., :P, :], ks[2]], -2)
    vals = torch.cat([vs[0], vs[1][..., :P, :], vs[2]], -2)
    mask = torch.ones(T, m + P + T, dtype=torch.bool)
    mask[:, m + P:] = torch.ones(T, T, dtype=torch.bool).tril()
    ro, ridx, rw = topk_attention_kernel(q, keys, vals, mask, 6, "entmax15", 0.5)
    sc = q @ keys.transpose(-1, -2)
    assert (sc.unsqueeze(-1) == sc.unsqueeze(-2)).sum() > sc.numel(), "the case must hold ties"
    shifted = np.where(idx >= m + cap, idx - (cap - P), idx)  # the buffer's ignored rows are never picked here
    np.testing.assert_array_equal(shifted, ridx.numpy())
    np.testing.assert_allclose(w, rw.numpy(), atol=1e-6)
    np.testing.assert_allclose(o, ro.numpy(), atol=1e-5)


@pytest.mark.parametrize("opset", [18, 20])
def test_sorted_dispatch_equals_the_per_expert_loop(opset):
    """The exported expert layer (export/dispatch.py: pairs sorted by expert, one Split, one ScatterND)
    in ONNX Runtime gives PyTorch's per-expert dispatch on any number of rows: one row (most experts
    empty), rows routed to few experts, many rows; no NonZero left, one Split per layer."""
    import torch
    from ressformer.export import dispatch
    from ressformer.export.ops import function_protos

    from ressformer import ReSSFormerConfig
    from ressformer.model import MoE

    cfg = ReSSFormerConfig.preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        for p in (moe.b1, moe.b2, moe.w1, moe.w2):
            p.normal_(0, 0.3)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return self.moe(x)[0]

    x0 = torch.randn(2, 5, cfg.d_model)
    with dispatch.sorted_dispatch():
        prog = torch.onnx.export(Layer(), (x0,), dynamo=True, opset_version=opset, verbose=False,
                                 dynamic_shapes={"x": {0: "batch", 1: "time"}})
    proto = prog.model_proto
    assert dispatch.expand(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert "NonZero" not in ops and ops.count("Split") == 1 and ops.count("ScatterND") == 1
    assert dispatch.PLACEHOLDER not in ops  # replaced (TopKRoute stays: an ONNX function)
    proto.functions.extend(function_protos("entmax15", opset))
    proto.opset_import.append(onnx.helper.make_opsetid("ressformer", 1))
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    skew = torch.zeros(cfg.d_model)
    skew[:8] = 4.0  # rows leaning one way: the router sends them to few experts
    for x in (torch.randn(1, 1, cfg.d_model, generator=g), torch.randn(1, 6, cfg.d_model, generator=g) + skew,
              torch.randn(3, 40, cfg.d_model, generator=g)):
        with torch.no_grad():
            ref, experts, _ = moe(x)
        used = torch.bincount(experts.reshape(-1), minlength=cfg.n_experts)
        got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=1e-5)
        if x.shape[1] > 1:
            assert x.shape[0] * x.shape[1] > 2 * cfg.n_experts or (used == 0).any()

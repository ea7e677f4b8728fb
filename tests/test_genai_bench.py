"""The onnxruntime-genai yardstick (bench/genai.py, `ressformer bench --against genai`).

Without onnxruntime-genai: the Llama solved for ReSSFormer's parameter count, its Hugging Face folder
and byte tokenizer, the result tables, ratios, crossovers and plot from a synthetic report, and the
CLI's option checks. With it (marker `genai`, deselected by default: `pytest -m genai
tests/test_genai_bench.py`): genai's fp32 build computes what transformers computes for the folder
we write, and the smoke comparison produces a complete report. No timing assertions."""

import json
import math

import numpy as np
import pytest
from ressformer.bench import dense as db
from ressformer.bench import genai as gb

from ressformer import ReSSFormerConfig

TINY = gb.LlamaSpec(vocab_size=256, n_layer=2, d_model=64, n_heads=2, n_kv_heads=2, d_ff=96)


# ---- the dense Llama -------------------------------------------------------------------------------------
def test_matching_llama_has_ressformers_parameter_count():
    for name, d_ff, heads in (("small", 480, 4), ("base", 3456, 12)):  # the measured configs
        cfg = ReSSFormerConfig.preset(name)
        target = db._ressformer_params(cfg)
        spec = gb.matching_llama(cfg)
        assert abs(spec.params - target) / target < 0.01, (name, spec, target)
        assert (spec.d_ff, spec.n_heads, spec.n_kv_heads) == (d_ff, heads, heads)
        assert spec.n_layer == cfg.n_steps and spec.d_model == cfg.d_model and spec.tied
        assert spec.d_ff % gb.FF_MULTIPLE == 0
        step = 3 * cfg.d_model * spec.n_layer * gb.FF_MULTIPLE  # one multiple more or less of d_ff
        assert abs(spec.params - target) <= step / 2
    # the count is the tensors' count
    assert TINY.params == sum(math.prod(s) for s in TINY.shapes().values())
    untied = gb.LlamaSpec(**{**TINY.__dict__, "tied": False})
    assert untied.params == TINY.params + 256 * 64 and "lm_head.weight" in untied.shapes()
    gqa = gb.LlamaSpec(**{**TINY.__dict__, "n_kv_heads": 1})
    assert gqa.params == TINY.params - 2 * 2 * 64 * 32  # k and v lose one head of 32 in each of 2 layers
    with pytest.raises(ValueError, match="divisible"):
        gb.matching_llama(ReSSFormerConfig.preset("small"), n_heads=3, target=1)


def test_max_positions_just_above_the_longest_sequence():
    for L, n in ((32768, 64), (128, 8), (2048, 64), (255, 0)):
        m = gb.max_positions(L, n)
        assert L + n + 2 <= m < L + n + 2 + 256 and m % 256 == 0


def test_byte_tokenizer_is_the_identity_on_bytes():
    tok = gb.byte_tokenizer()
    vocab, b2u = tok["model"]["vocab"], gb.byte_to_unicode()
    assert tok["model"]["type"] == "BPE" and tok["model"]["merges"] == []
    assert sorted(vocab.values()) == list(range(256)) and len(vocab) == 256
    assert all(len(c) == 1 and c.isprintable() and not c.isspace() for c in vocab)
    assert tok["pre_tokenizer"]["type"] == "ByteLevel" and tok["decoder"]["type"] == "ByteLevel"
    text = "héllo wörld\n\x00\x7f\xff".encode() + bytes(range(256))
    assert [vocab[b2u[b]] for b in text] == list(text)
    assert b2u[ord("A")] == "A" and b2u[ord(" ")] == "Ġ"  # GPT-2's alphabet


def test_write_llama_folder(tmp_path):
    from safetensors.numpy import load_file

    folder = gb.write_llama(TINY, tmp_path / "hf", positions=640, seed=3)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    w = load_file(str(folder / "model.safetensors"))
    assert {k: v.shape for k, v in w.items()} == TINY.shapes()
    assert sum(v.size for v in w.values()) == TINY.params and all(v.dtype == np.float32 for v in w.values())
    assert np.all(w["model.norm.weight"] == 1.0)
    q = w["model.layers.1.self_attn.q_proj.weight"]
    assert 0.015 < q.std() < 0.025 and abs(q.mean()) < 0.005
    assert not np.array_equal(q, w["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 640 and cfg["tie_word_embeddings"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 96, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (2, 2, 256)
    assert json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) == gb.byte_tokenizer()
    again = load_file(str(gb.write_llama(TINY, tmp_path / "hf2", positions=640, seed=3) / "model.safetensors"))
    np.testing.assert_array_equal(again["model.embed_tokens.weight"], w["model.embed_tokens.weight"])  # seeded


# ---- results from a synthetic report ------------------------------------------------------------------------
def _point(engine, T, prefill, decode, peak, loaded=100.0):
    return {"engine": engine, "length": T, "status": "ok", "prefill_s": prefill, "decode_tok_s": decode,
            "peak_mb": peak, "loaded_mb": loaded}


def synthetic_report():
    Ls = [128, 2048, 8192, 32768]
    engines = [{"name": "ReSSFormer fp32", "kind": "ressformer", "variant": "fp32", "status": "ok", "disk_mb": 349.0},
               {"name": "ReSSFormer int4", "kind": "ressformer", "variant": "int4", "disk_mb": None,
                "status": "failed: unsupported quantization 'int4'; supported: int8"},
               {"name": "genai fp32", "kind": "genai", "variant": "fp32", "status": "ok", "disk_mb": 175.0},
               {"name": "genai int4", "kind": "genai", "variant": "int4", "status": "ok", "disk_mb": 35.0}]
    pts = []
    for T, rp, rd, gp, gd in zip(Ls, (0.1, 1.8, 6.8, 26.2), (118, 137, 146, 133), (0.05, 1.04, 5.5, 42.6),
                                 (1038, 331, 71, 21)):
        pts.append(_point("ReSSFormer fp32", T, rp, rd, 1300.0))
        pts.append({"engine": "ReSSFormer int4", "length": T, "status": engines[1]["status"]})
        pts.append(_point("genai int4", T, gp, gd, 350.0))
        pts.append(_point("genai fp32", T, gp, gd / 2, 460.0) if T < 32768 else
                   {"engine": "genai fp32", "length": T, "status": "out of memory (killed)"})
    meta = {"checkpoint": None, "preset": "base", "smoke": False, "threads": 2, "decode_tokens": 64, "lengths": Ls,
            "reference": gb.REFERENCE, "ressformer_params": 41_630_209, "llama_params": 41_491_200,
            "llama_config": gb.LlamaSpec(256, 4, 768, 12, 12, 3456).__dict__, "onnxruntime": "1.32.0",
            "onnxruntime_genai": "0.18.0", "machine": "test CPU", "cpu_count": 2, "loadavg_start": [1.0, 1.0, 1.0],
            "loadavg_end": [2.0, 2.0, 2.0]}
    rep = {"meta": meta, "engines": engines, "points": pts}
    rep["crossover"] = gb.crossovers(rep)
    rep["table"] = gb.format_table(rep)
    return rep


def test_ratios_and_crossovers_from_synthetic_rows():
    rep = synthetic_report()
    r = gb.ratios(rep, "ReSSFormer fp32", "genai int4")
    assert r["decode"][128] == pytest.approx(118 / 1038) and r["decode"][32768] == pytest.approx(133 / 21)
    assert r["prefill"][2048] == pytest.approx(1.04 / 1.8) and r["peak"][8192] == pytest.approx(350 / 1300)
    assert gb.ratios(rep, "ReSSFormer fp32", "genai fp32")["decode"][32768] is None  # genai fp32 failed there
    assert gb.series(rep, "ReSSFormer int4", "prefill_s") == dict.fromkeys(rep["meta"]["lengths"])
    cx = rep["crossover"]
    assert set(cx) == {"ReSSFormer fp32"} and set(cx["ReSSFormer fp32"]) == {"genai fp32", "genai int4"}
    dec = cx["ReSSFormer fp32"]["genai int4"]["decode"]
    assert dec["between"] == [2048, 8192]  # 0.41x at 2k, 2.06x at 8k
    x1, x2, y1, y2 = math.log(2048), math.log(8192), math.log(137 / 331), math.log(146 / 71)
    assert dec["length"] == pytest.approx(math.exp(x1 - y1 * (x2 - x1) / (y2 - y1)))
    pre = cx["ReSSFormer fp32"]["genai int4"]["prefill"]
    assert pre["between"] == [8192, 32768] and "genai int4 faster" not in pre["text"]
    # genai fp32 failed at 32k: its crossover uses the lengths where both ran
    assert cx["ReSSFormer fp32"]["genai fp32"]["prefill"]["never"] is True
    assert "dense" not in json.dumps(cx)  # the texts name the genai engine


def test_table_and_plot_from_synthetic_rows(tmp_path):
    rep = synthetic_report()
    t = rep["table"]
    lines = t.splitlines()
    assert "41,630,209" in t and "41,491,200" in t and "SwiGLU 3456" in t and "load avg" in t
    row = next(ln for ln in lines if ln.strip().startswith("genai int4") and "1,038.0" in ln)
    assert row.split()[2:] == ["1,038.0", "331.0", "71.0", "21.0"]
    assert next(ln for ln in lines if ln.strip().startswith("ReSSFormer int4")).split()[2:] == ["-"] * 4
    assert "failed: unsupported quantization 'int4'" in t
    dec = next(ln for ln in lines if ln.strip().startswith("fp32 decode"))
    assert dec.split()[2:] == ["0.11", "0.41", "2.06", "6.33"]
    assert "ReSSFormer fp32 on disk: 9.97x genai int4's" in t
    assert "ReSSFormer fp32 vs genai int4: prefill ~" in t and "crossovers" in t
    json.loads(json.dumps(rep))
    png = gb.plot(rep, tmp_path / "img" / "genai.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_checked():
    assert gb._variants("fp32, int8,fp32", gb.RESS_VARIANTS, "v") == ["fp32", "int8"]
    assert gb._variants(("int4",), gb.RESS_VARIANTS, "v") == ["int4"]
    with pytest.raises(ValueError, match="'int3'"):
        gb._variants("fp32,int3", gb.RESS_VARIANTS, "v")
    with pytest.raises(ValueError, match="none given"):
        gb._variants(" , ", gb.RESS_VARIANTS, "v")
    with pytest.raises(ValueError, match="'int8'"):
        gb._variants("int8", gb.GENAI_VARIANTS, "genai")
    assert gb._variants("int4-hybrid,int4-dispatch", gb.ALL_VARIANTS, "v") == ["int4-hybrid", "int4-dispatch"]
    from ressformer.deploy_cli import VariantList

    assert VariantList.choices == gb.ALL_VARIANTS  # the CLI's copy (it must not import onnxruntime)
    with pytest.raises(ValueError, match="unknown genai precision"):
        gb.build_genai("x", "y", "int8", "z")


def test_an_export_the_exporter_refuses_is_a_failed_row(tiny_checkpoint, tmp_path):
    e = gb._export_variant(tiny_checkpoint, tmp_path / "x", "int3", progress=lambda s: None)
    assert e["name"] == "ReSSFormer int3" and e["status"].startswith("failed: ") and "int3" in e["status"]
    assert e["disk_mb"] is None and not (tmp_path / "x").exists()


def test_a_failing_genai_child_is_a_failed_point(tmp_path):
    """No model there (or no onnxruntime-genai installed): one failed point, not a crash."""
    r = gb._run_genai_child(tmp_path / "missing", 16, 2, 1, 0, timeout=120)
    assert r["engine"] == "genai" and r["length"] == 16 and r["status"].startswith("failed: "), r
    assert "prefill_s" not in r


# ---- the CLI -----------------------------------------------------------------------------------------------
def _cli(args):
    from click.testing import CliRunner

    from ressformer.cli import main

    return CliRunner().invoke(main, ["bench", "--preset", "tiny", *args])


@pytest.mark.parametrize("args, message", [
    (["--against", "gpt"], "unknown yardstick 'gpt'"),
    (["--against", "genai", "--variants", "fp32,int3"], "unknown variant 'int3'"),
    (["--against", "genai", "--variants", ","], "unknown variant"),
    (["--variants", "fp32"], "--variants goes with --against genai"),
    (["--against", "genai", "--baseline"], "different benchmarks"),
    (["--lengths", "128"], "--lengths goes with --baseline or --against"),
    (["--against", "genai", "--lengths", "0"], "must be >= 1"),
    (["--block-size", "128"], "--block-size goes with --against genai"),
    (["--against", "genai", "--block-size", "48"], "unsupported block size"),
])
def test_bench_against_option_errors(args, message):
    r = _cli(args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_bench_against_genai_without_the_extra(monkeypatch):
    from ressformer import deploy_cli

    monkeypatch.setattr(deploy_cli, "_installed", lambda m: m != "onnxruntime_genai")
    r = _cli(["--against", "genai"])
    assert r.exit_code == 1 and "needs the genai extra (missing onnxruntime_genai)" in r.output, r.output
    assert "pip install 'ressformer[genai]'" in r.output


# ---- with onnxruntime-genai ----------------------------------------------------------------------------------
@pytest.mark.genai
def test_genai_fp32_build_computes_what_transformers_computes(tmp_path, torch_threads):
    """The folder we write is a Llama to transformers and to the builder, and genai's fp32 graph gives
    transformers' logits: the yardstick runs the model the bench says it runs."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = gb.LlamaSpec(vocab_size=256, n_layer=2, d_model=64, n_heads=2, n_kv_heads=2, d_ff=96)
    hf = gb.write_llama(spec, tmp_path / "hf", positions=gb.max_positions(40, 8), seed=1)
    model = LlamaForCausalLM.from_pretrained(str(hf)).eval()
    assert model.num_parameters() == spec.params
    with torch.no_grad():  # scale up: random weights of std 0.02 give near-uniform logits that hide mistakes
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    model.save_pretrained(str(hf))
    tok = AutoTokenizer.from_pretrained(str(hf))
    text = "ROMEO: héllo\n\x01"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    out = gb.build_genai(hf, tmp_path / "g", "fp32", tmp_path / "cache")
    gc = json.loads((out / "genai_config.json").read_text())
    assert gc["model"]["context_length"] == gb.max_positions(40, 8) and gc["model"]["vocab_size"] == 256
    assert og.Tokenizer(og.Model(str(out))).encode(text).tolist() == list(text.encode())

    x = np.random.default_rng(0).integers(0, 256, 40)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)[None]).logits[0].numpy()  # (40, V)
    assert ref.std() > 0.5
    m = og.Model(str(out))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=48, min_length=48, do_sample=False, batch_size=1)
    gen = og.Generator(m, params)
    gen.append_tokens(x[:32].astype(np.int32))  # a prefill, then tokens one at a time through the cache
    np.testing.assert_allclose(gen.get_logits().reshape(-1, 256)[-1], ref[31], atol=2e-3, rtol=0)
    for i in range(32, 40):
        gen.append_tokens(x[i:i + 1].astype(np.int32))
        np.testing.assert_allclose(gen.get_logits().reshape(-1, 256)[-1], ref[i], atol=2e-3, rtol=0)


@pytest.mark.genai
def test_genai_smoke_comparison(tiny_checkpoint, tmp_path):
    """`ressformer bench CK --against genai --smoke` end to end: a complete report, its JSON and plot."""
    from click.testing import CliRunner

    from ressformer.cli import main

    out, png = tmp_path / "genai.json", tmp_path / "genai.png"
    r = CliRunner().invoke(main, ["bench", str(tiny_checkpoint), "--against", "genai", "--smoke", "--threads", "1",
                                  "--variants", "fp32,int8", "--json", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["table"] in r.output and png.stat().st_size > 10_000
    m = rep["meta"]
    assert m["lengths"] == [64, 128] and m["smoke"] is True and m["decode_tokens"] == 8
    assert m["max_position_embeddings"] >= 128 + 8 + 2 and m["onnxruntime_genai"]
    assert abs(m["llama_params"] - m["ressformer_params"]) / m["ressformer_params"] < 0.05  # tiny: d_ff steps of 32
    names = [e["name"] for e in rep["engines"]]
    assert names == ["ReSSFormer fp32", "ReSSFormer int8", "genai fp32", "genai int4"]
    assert all(e["status"] == "ok" and e["disk_mb"] > 0 for e in rep["engines"])
    disk = {e["name"]: e["disk_mb"] for e in rep["engines"]}
    assert disk["genai int4"] < disk["genai fp32"] and disk["ReSSFormer int8"] < disk["ReSSFormer fp32"]
    assert len(rep["points"]) == 8
    for p in rep["points"]:
        assert p["status"] == "ok", p
        assert p["prefill_s"] > 0 and p["decode_tok_s"] > 0 and p["peak_mb"] >= p["loaded_mb"] > 0
        assert p["peak_mb"] < 400  # the children load numpy + onnxruntime(-genai), never torch
    cx = rep["crossover"]
    assert set(cx) == {"ReSSFormer fp32", "ReSSFormer int8"}
    assert all(isinstance(c[k]["text"], str) and c[k]["text"] for by in cx.values() for c in by.values()
               for k in ("prefill", "decode"))
    t = rep["table"]
    assert "against genai int4" in t and "crossovers" in t and "[smoke]" in t
    assert [ln.split()[0] for ln in t.splitlines() if ln.startswith("prefill (s)")] == ["prefill"]
    assert m["checkpoint"] == str(tiny_checkpoint) and m["threads"] == 1 and m["variants"] == ["fp32", "int8"]


def test_block_size_reaches_both_engines(tiny_checkpoint, tmp_path, monkeypatch):
    """--block-size: the ReSSFormer export quantizes in blocks of it, and the genai builder is asked for it
    (int4 only; its own default 32 is not passed)."""
    import subprocess

    import onnx
    from ressformer.bench import genai

    e = genai._export_variant(tiny_checkpoint, tmp_path / "int4", "int4", lambda s: None, block_size=64)
    assert e["status"] == "ok"
    blocks = {a.i for n in onnx.load(str(tmp_path / "int4" / "piece_k2.onnx")).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {64}
    cmds = []

    def fake_run(cmd, **kw):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no model")

    monkeypatch.setattr(genai.subprocess, "run", fake_run)
    for precision, bs in (("int4", 128), ("int4", 32), ("fp32", 128)):
        with pytest.raises(RuntimeError, match="model builder failed"):
            genai.build_genai(tmp_path / "hf", tmp_path / f"out_{precision}_{bs}", precision, tmp_path / "c",
                              block_size=bs)
    assert cmds[0][-2:] == ["--extra_options", "block_size=128"]
    assert "--extra_options" not in cmds[1] and "--extra_options" not in cmds[2]

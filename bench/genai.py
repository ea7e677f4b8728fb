"""ReSSFormer against onnxruntime-genai's dense Llama of the same parameter count (issue 20, item 6:
"the yardstick": what a user putting a small language model on a device builds today).

The dense model is a Llama (SwiGLU MLP, RoPE, RMSNorm, tied embedding and head, vocabulary 256)
sized to ReSSFormer's parameter count, with random weights, written locally as a Hugging Face
folder (config.json, model.safetensors, and a 256-token byte-level BPE tokenizer with no merges:
onnxruntime-genai's model builder insists on a tokenizer) without transformers or any hub, then
built by `python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu` (int4: MatMulNBits,
attention: GroupQueryAttention with a shared past/present buffer) and run by onnxruntime-genai.
Its RoPE tables are sized by `max_position_embeddings`, set just above the longest context here;
random weights may emit EOS early, so every generator runs with min_length = max_length.

ReSSFormer is exported once per variant (`export_checkpoint(..., quantize=None | "int8" | "int4")`)
and runs in `ReSSFormerSession` (the child of bench/dense.py, reused as is).

Both engines run with the same intra-op thread count (`threads`; inter-op 1): ReSSFormerSession's
`threads=`, and for genai an overlay of the decoder's session options (genai's own default runs
one intra-op thread on the 2-core CI machine). Every point is one fresh child process per engine
and length, as a deployment would be: load
(RSS after loading), prefill of T random tokens (timed, one run, cold), one untimed decode token,
then `decode_tokens` tokens one at a time (tokens/s); peak = VmHWM of that process. Size on disk:
the files of each engine's folder. Crossovers (bench/dense.py's `crossover`, log length) of each
ReSSFormer variant against each genai variant.

    ressformer bench --preset small --against genai [--variants fp32,int8,int4] [--lengths 128,2048,8192,32768]
    python -m ressformer.bench.genai [CHECKPOINT] [--preset small] [--threads 2] [--variants fp32,int8]
        [--genai-variants fp32,int4] [--lengths ...] [--decode-tokens 64] [--json F] [--plot F] [--smoke]

Needs the `genai` extra (`pip install 'ressformer[genai]'`: onnxruntime-genai, transformers) for the
dense side; the model folder, tables, crossovers and the plot work without it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ressformer.bench import dense as db

LENGTHS = (128, 2048, 8192, 32768)
SMOKE_LENGTHS = (64, 128)
DECODE_TOKENS = 64
RESS_VARIANTS = ("fp32", "int8", "int4")  # the default set; int8/int4 take the exporter's expert layer (auto)
EXPERT_VARIANTS = tuple(f"{q}-{e}" for q in ("int8", "int4") for e in ("hybrid", "qmoe", "dispatch"))
ALL_VARIANTS = RESS_VARIANTS + EXPERT_VARIANTS  # int4-hybrid: int4 with that expert layer
GENAI_VARIANTS = ("fp32", "int4")
REFERENCE = "genai int4"  # the ratios' denominator: what users pick today
FF_MULTIPLE = 32  # SwiGLU width: a multiple of MatMulNBits' block (32)
BOS_EOS = 0  # the byte vocabulary has no special tokens; byte 0 (NUL) stands for both
HF_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
          "TOKENIZERS_PARALLELISM": "false"}


# ---- the dense Llama --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 480
    tied: bool = True
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def params(self) -> int:
        """Parameter count: embedding (+ head when untied), per layer q/k/v/o, SwiGLU gate/up/down and
        two RMSNorm weights, the final RMSNorm; no biases."""
        d, hd = self.d_model, self.head_dim
        attn = 2 * d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd
        per_layer = attn + 3 * d * self.d_ff + 2 * d
        emb = self.vocab_size * d * (1 if self.tied else 2)
        return emb + self.n_layer * per_layer + d

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face Llama tensor names -> shapes (nn.Linear weights are (out, in))."""
        d, hd = self.d_model, self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (self.n_heads * hd, d),
                    p + "self_attn.k_proj.weight": (self.n_kv_heads * hd, d),
                    p + "self_attn.v_proj.weight": (self.n_kv_heads * hd, d),
                    p + "self_attn.o_proj.weight": (d, self.n_heads * hd),
                    p + "mlp.gate_proj.weight": (self.d_ff, d), p + "mlp.up_proj.weight": (self.d_ff, d),
                    p + "mlp.down_proj.weight": (d, self.d_ff)}
        out["model.norm.weight"] = (d,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab_size, d)
        return out

    def hf_config(self, max_positions: int) -> dict:
        """config.json of a transformers LlamaForCausalLM with this shape."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.d_model, "intermediate_size": self.d_ff, "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "hidden_act": "silu", "max_position_embeddings": int(max_positions),
                "rms_norm_eps": self.rms_eps, "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"}, "rope_scaling": None,
                "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
                "tie_word_embeddings": self.tied, "bos_token_id": BOS_EOS, "eos_token_id": BOS_EOS,
                "pad_token_id": BOS_EOS, "use_cache": True, "pretraining_tp": 1, "torch_dtype": "float32",
                "dtype": "float32"}


def matching_llama(cfg, n_layer: int | None = None, n_heads: int | None = None, target: int | None = None,
                   multiple: int = FF_MULTIPLE) -> LlamaSpec:
    """The Llama with ReSSFormer config `cfg`'s width and vocabulary whose parameter count is closest
    to ReSSFormer's (`target`, computed when None): n_layer defaults to ReSSFormer's K (the depth a
    token goes through), n_heads to head_dim 64 (no grouped keys: n_kv_heads = n_heads), tied
    embedding and head, and the SwiGLU width solved for the count (a multiple of `multiple`)."""
    target = db._ressformer_params(cfg) if target is None else int(target)
    n_layer = n_layer or cfg.n_steps
    n_heads = n_heads or max(cfg.d_model // 64, 1)
    if cfg.d_model % n_heads:
        raise ValueError(f"d_model {cfg.d_model} is not divisible by {n_heads} heads")
    return db.matched_width(lambda f: LlamaSpec(cfg.vocab_size, n_layer, cfg.d_model, n_heads, n_heads, f),
                            target, per_ff=3 * cfg.d_model * n_layer, multiple=multiple)  # gate, up, down


def max_positions(longest: int, decode_tokens: int, multiple: int = 256) -> int:
    """max_position_embeddings just above the longest sequence (prompt + warm-up token + decoded
    tokens), rounded up to `multiple`: the builder sizes its RoPE cos/sin tables by it."""
    need = int(longest) + int(decode_tokens) + 2
    return -(-need // multiple) * multiple


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> dict:
    """tokenizer.json (the `tokenizers` serialization) of a 256-token byte-level BPE with no merges:
    token id = byte value."""
    b2u = byte_to_unicode()
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": BOS_EOS, "content": b2u[BOS_EOS], "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": level, "post_processor": None, "decoder": level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {b2u[b]: b for b in range(256)}, "merges": []}}


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """tokenizer.json + tokenizer_config.json of the byte tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = folder / "tokenizer.json"
    tok.write_text(json.dumps(byte_tokenizer(), ensure_ascii=False, indent=1), encoding="utf-8")
    special = byte_to_unicode()[BOS_EOS]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special, "eos_token": special,
         "pad_token": special, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False},
        ensure_ascii=False, indent=1), encoding="utf-8")
    return tok


def write_llama(spec: LlamaSpec, folder: str | os.PathLike, positions: int, seed: int = 0) -> Path:
    """A randomly initialized Llama (numpy seed `seed`; Linear and embedding weights N(0, 0.02),
    norms 1) as a Hugging Face folder: config.json, generation_config.json, model.safetensors and
    the byte tokenizer. Needs safetensors (the torch extra), not transformers."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in spec.shapes().items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(spec.hf_config(positions), indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_EOS, "eos_token_id": BOS_EOS, "pad_token_id": BOS_EOS, "do_sample": False}, indent=1))
    write_tokenizer(folder)
    return folder


def build_genai(hf_dir: str | os.PathLike, out: str | os.PathLike, precision: str, cache: str | os.PathLike,
                timeout: float = 3600, block_size: int = 32) -> Path:
    """Run onnxruntime-genai's model builder (CPU) on `hf_dir` at `precision` (fp32 | int4) into `out`;
    int4 weights in blocks of `block_size` (the builder's own default: 32)."""
    if precision not in GENAI_VARIANTS:
        raise ValueError(f"unknown genai precision {precision!r}; use one of {', '.join(GENAI_VARIANTS)}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if precision != "fp32" and block_size != 32:
        cmd += ["--extra_options", f"block_size={int(block_size)}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **HF_ENV), timeout=timeout)
    if p.returncode != 0 or not (Path(out) / "genai_config.json").is_file():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"onnxruntime-genai's model builder failed ({precision}, exit {p.returncode}):\n{tail}")
    return Path(out)


def folder_mb(path: str | os.PathLike) -> float:
    """Size on disk of every file under `path` (MB = 1e6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


# ---- child process: onnxruntime-genai at one length ------------------------------------------------------
def genai_child(path: str, length: int, decode: int, threads: int, seed: int) -> dict:
    """In a fresh process: load the genai model, prefill `length` random tokens (timed, one
    `append_tokens`, cold: it runs the model and leaves the logits), sample the first token and run
    one untimed token, then `decode` tokens one at a time (each `generate_next_token` runs the model
    on the token before and samples; greedy;
    min_length = max_length, so an early EOS cannot cut the run short); the peak RSS (VmHWM).
    Imports numpy + onnxruntime-genai only. The same protocol and random tokens as the ReSSFormer
    child of bench/dense.py."""
    import onnxruntime_genai as og

    rng = np.random.default_rng(seed)
    cfg = og.Config(path)
    if threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    loaded = db._status_mb("VmRSS")
    vocab = json.loads((Path(path) / "genai_config.json").read_text())["model"]["vocab_size"]
    total = length + 2 + decode  # the first generate_next_token only samples from the prefill's logits
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
    gen = og.Generator(model, params)
    x = rng.integers(0, vocab, (1, length))[0].astype(np.int32)
    t0 = time.perf_counter()
    gen.append_tokens(x)
    prefill_s = time.perf_counter() - t0
    gen.generate_next_token()  # samples the first token from the prefill's logits (no model run)
    gen.generate_next_token()  # warm-up: the first one-token run
    t0 = time.perf_counter()
    for _ in range(decode):
        gen.generate_next_token()
    decode_s = time.perf_counter() - t0
    if gen.token_count() != total:
        raise RuntimeError(f"genai stopped at {gen.token_count()} tokens, not {total}")
    return {"engine": "genai", "length": length, "status": "ok", "loaded_mb": loaded,
            "peak_mb": db._status_mb("VmHWM"), "prefill_s": prefill_s, "decode_tok_s": decode / decode_s}


def _run_genai_child(path: Path, length: int, decode: int, threads: int | None, seed: int, timeout: float) -> dict:
    return db.run_child("ressformer.bench.genai", "genai", length, timeout,
                        [str(path), str(length), str(decode), str(threads or 0), str(seed)], env=HF_ENV)


# ---- the comparison ---------------------------------------------------------------------------------------
def _variants(s, allowed: tuple[str, ...], what: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8'] (order kept, duplicates dropped); ValueError on an unknown one."""
    items = [x.strip() for x in s.split(",")] if isinstance(s, str) else list(s)
    items = [x for x in items if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: unknown variant(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def engine_name(kind: str, variant: str) -> str:
    return f"{'ReSSFormer' if kind == 'ressformer' else 'genai'} {variant}"


def run_comparison(preset: str = "small", lengths=None, threads: int | None = 2, variants=RESS_VARIANTS,
                   genai_variants=GENAI_VARIANTS, decode_tokens: int = DECODE_TOKENS, smoke: bool = False,
                   seed: int = 0, checkpoint=None, n_heads: int | None = None, keep: str | None = None,
                   progress=print, block_size: int = 32) -> dict:
    """Measure ReSSFormer (one export per entry of `variants`) against onnxruntime-genai's dense Llama
    of the same parameter count (one build per entry of `genai_variants`), every point a fresh child
    process (see the module doc). `checkpoint`: a ReSSFormer checkpoint folder, or None for the
    `preset` at random init (seed 0). `keep`: a folder to keep the exports and builds in (default: a
    temporary one). `block_size`: weights per scale of both engines' int8/int4 weights (default 32, each
    one's default). Returns the report dict; key "table" holds the printable summary."""
    import onnxruntime as ort

    progress = progress or (lambda s: None)
    if smoke:
        preset, lengths, decode_tokens = "tiny", lengths or SMOKE_LENGTHS, min(decode_tokens, 8)
    lengths = sorted(set(lengths or LENGTHS))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be >= 1, got {decode_tokens}")
    variants = _variants(variants, ALL_VARIANTS, "variants")
    genai_variants = _variants(genai_variants, GENAI_VARIANTS, "genai variants")
    import onnxruntime_genai as og  # the genai extra: fail before any export

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ressformer-genai-") as tmp:
        work = Path(keep) if keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, cfg, ress_params = _checkpoint(checkpoint, preset, work, progress)
        spec = matching_llama(cfg, n_heads=n_heads, target=ress_params)
        positions = max_positions(lengths[-1], decode_tokens)
        engines = []
        for v in variants:
            engines.append(_export_variant(ckpt, work / f"ressformer_{v}", v, progress, block_size))
        hf = write_llama(spec, work / "llama_hf", positions, seed)
        progress(f"dense Llama: {spec.params:,} params ({spec.n_layer} layers, d {spec.d_model}, {spec.n_heads} "
                 f"heads, SwiGLU {spec.d_ff}, vocab {spec.vocab_size}, tied), max_position_embeddings {positions}")
        for v in genai_variants:
            t0 = time.perf_counter()
            out = work / f"genai_{v}"
            e = {"name": engine_name("genai", v), "kind": "genai", "variant": v, "path": str(out)}
            try:
                build_genai(hf, out, v, work / "builder_cache", block_size=block_size)
                e |= {"status": "ok", "disk_mb": folder_mb(out), "build_s": time.perf_counter() - t0}
                progress(f"{e['name']}: built in {e['build_s']:.1f}s, {e['disk_mb']:.1f} MB on disk")
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                e |= {"status": db._status(err), "disk_mb": None}
                progress(f"{e['name']}: {e['status']}")
            engines.append(e)
        report = {"meta": {
            "checkpoint": str(checkpoint) if checkpoint else None, "preset": None if checkpoint else preset,
            "smoke": smoke, "seed": seed, "threads": threads, "decode_tokens": decode_tokens, "lengths": lengths,
            "variants": variants, "genai_variants": genai_variants, "block_size": block_size, "reference": REFERENCE,
            "ressformer_params": ress_params, "llama_params": spec.params, "ressformer_config": cfg.to_dict(),
            "llama_config": asdict(spec), "max_position_embeddings": positions,
            "onnxruntime": ort.__version__, "onnxruntime_genai": og.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": db._cpu_name(),
            "loadavg_start": list(os.getloadavg())},
            "engines": engines, "points": []}
        points = {e["name"]: [] for e in engines}  # measured (length, prefill seconds): the child timeouts
        for T in lengths:
            progress(f"{T} tokens: a fresh child process per engine (prefill, 1 + {decode_tokens} decoded tokens) ...")
            for e in engines:
                if e["status"] != "ok":
                    r = {"engine": e["name"], "length": T, "status": e["status"]}
                else:
                    guess = db._predict(points[e["name"]], T)
                    timeout = max(3 * guess + 300, 300) if guess else 3600
                    if e["kind"] == "genai":
                        r = _run_genai_child(Path(e["path"]), T, decode_tokens, threads, seed, timeout)
                    else:
                        r = db._run_child("ressformer", Path(e["path"]), T, decode_tokens, threads, seed, db.CHUNK,
                                          timeout)
                    r["engine"] = e["name"]
                    if r.get("status") == "ok":
                        points[e["name"]].append((T, r["prefill_s"]))
                report["points"].append(r)
                progress("  " + _point_line(r))
    report["meta"]["loadavg_end"] = list(os.getloadavg())
    report["meta"]["seconds"] = time.perf_counter() - t_all
    report["crossover"] = crossovers(report)
    report["table"] = format_table(report)
    return report


def _checkpoint(checkpoint, preset: str, work: Path, progress) -> tuple[Path, object, int]:
    """-> (checkpoint folder, its config, its parameter count): `checkpoint`, or the `preset` at
    random init (torch seed 0) saved into `work`."""
    import torch

    from ressformer import ReSSFormer, ReSSFormerConfig, load_checkpoint, save_checkpoint

    if checkpoint is None:
        torch.manual_seed(0)
        model = ReSSFormer(ReSSFormerConfig.preset(preset))
        checkpoint = save_checkpoint(model, work / "checkpoint", extra={"seed": 0, "preset": preset})
        progress(f"random-init preset {preset}: {model.num_params():,} parameters")
    else:
        model = load_checkpoint(checkpoint)
    return Path(checkpoint), model.config, model.num_params()


def _export_variant(ckpt, out: Path, variant: str, progress, block_size: int = 32) -> dict:
    """One ReSSFormer export (no validation: only speed, memory and size are compared here)."""
    from ressformer.export.exporter import export_checkpoint

    t0 = time.perf_counter()
    e = {"name": engine_name("ressformer", variant), "kind": "ressformer", "variant": variant, "path": str(out)}
    logging.disable(logging.WARNING)  # ONNX Runtime's quantizer warns once per graph ("consider pre-processing")
    try:
        quantize, _, experts = variant.partition("-")  # int4-hybrid: int4 with the hybrid expert layer
        export_checkpoint(ckpt, out, quantize=None if quantize == "fp32" else quantize, experts=experts or "auto",
                          validate=None, overwrite=True, block_size=block_size,
                          progress=lambda s: None)
    except (ValueError, RuntimeError) as err:  # e.g. a quantization this exporter does not know (yet)
        e |= {"status": f"failed: {str(err).splitlines()[0][:200]}", "disk_mb": None}
        progress(f"{e['name']}: export {e['status']}")
        return e
    finally:
        logging.disable(logging.NOTSET)
    e |= {"status": "ok", "disk_mb": folder_mb(out), "export_s": time.perf_counter() - t0}
    progress(f"{e['name']}: exported in {e['export_s']:.1f}s, {e['disk_mb']:.1f} MB on disk")
    return e


def _point_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['engine']}: {r.get('status')}"
    return (f"{r['engine']}: prefill {r['prefill_s']:.3f} s, decode {r['decode_tok_s']:.1f} tok/s, "
            f"peak {r['peak_mb']:.0f} MB (loaded {r['loaded_mb']:.0f} MB)")


# ---- results -----------------------------------------------------------------------------------------------
def series(report, engine: str, field: str) -> dict[int, float | None]:
    """length -> the engine's value of `field` (prefill_s, decode_tok_s, peak_mb, loaded_mb); None
    where that point failed."""
    return {r["length"]: (r.get(field) if r.get("status") == "ok" else None)
            for r in report["points"] if r["engine"] == engine}


def ratios(report, engine: str, ref: str) -> dict[str, dict[int, float | None]]:
    """Per measure and length, `engine` against `ref`, > 1 meaning `engine` is better: prefill
    ref s / engine s, decode engine tok/s / ref tok/s, peak ref MB / engine MB. None where either
    failed."""
    out = {}
    for key, field, inv in (("prefill", "prefill_s", True), ("decode", "decode_tok_s", False),
                            ("peak", "peak_mb", True)):
        a, b = series(report, engine, field), series(report, ref, field)
        out[key] = {T: ((b[T] / a[T]) if inv else (a[T] / b.get(T))) if a.get(T) and b.get(T) else None
                    for T in report["meta"]["lengths"]}
    return out


def crossovers(report) -> dict:
    """{ReSSFormer engine: {genai engine: {"prefill": crossover, "decode": crossover}}} on the lengths
    where both ran (bench/dense.py's `crossover`: interpolated on log length; > 1: ReSSFormer faster)."""
    names = {e["name"]: e for e in report["engines"]}
    out = {}
    for r in (n for n, e in names.items() if e["kind"] == "ressformer" and e["status"] == "ok"):
        out[r] = {}
        for g in (n for n, e in names.items() if e["kind"] == "genai" and e["status"] == "ok"):
            rat = ratios(report, r, g)
            out[r][g] = {}
            for key in ("prefill", "decode"):
                pts = [(T, x) for T, x in rat[key].items() if x is not None]
                c = db.crossover([T for T, _ in pts], [x for _, x in pts])
                for item in [c, *c.get("crossings", [])]:  # the texts name the dense engine
                    item["text"] = item["text"].replace("dense", g)
                out[r][g][key] = c
    return out


def _cell(x, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def format_table(report) -> str:
    m = report["meta"]
    lc = m["llama_config"]
    Ls = m["lengths"]
    la0, la1 = m["loadavg_start"], m.get("loadavg_end", m["loadavg_start"])
    ok = [e for e in report["engines"]]
    w = max(len(e["name"]) for e in ok) + 2
    lines = [
        f"ReSSFormer {m['checkpoint'] or m['preset']} ({m['ressformer_params']:,} params) vs a dense Llama in "
        f"onnxruntime-genai ({m['llama_params']:,} params: {lc['n_layer']} layers, d {lc['d_model']}, "
        f"{lc['n_heads']} heads, SwiGLU {lc['d_ff']}, vocab {lc['vocab_size']}, tied; random weights)"
        f"{' [smoke]' if m['smoke'] else ''}",
        f"onnxruntime {m['onnxruntime']}, onnxruntime-genai {m['onnxruntime_genai']}, "
        f"threads={m['threads'] or 'default'}, batch 1, int8/int4 blocks of {m.get('block_size', 32)}; "
        f"{m['machine']}, {m['cpu_count']} CPUs; load avg (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end",
        f"every point: a fresh process per engine and length, one run: prefill of T random tokens (cold), one "
        f"untimed token, {m['decode_tokens']} decoded tokens; peak = VmHWM",
        "",
    ]
    head = f"{'':{w}}" + "".join(f"{T:>10}" for T in Ls)
    for title, field, fmt in (("prefill (s)", "prefill_s", ".3f"), ("decode (tok/s)", "decode_tok_s", ",.1f"),
                              ("peak RSS (MB)", "peak_mb", ",.0f")):
        lines.append(f"{title:{w}}" + head[w:])
        for e in ok:
            s = series(report, e["name"], field)
            lines.append(f"  {e['name']:{w - 2}}" + "".join(f"{_cell(s.get(T), fmt):>10}" for T in Ls))
        lines.append("")
    lines.append(f"{'size':{w}}{'disk MB':>10}{'loaded MB':>10}   (loaded: RSS after loading, at {Ls[0]} tokens)")
    for e in ok:
        loaded = series(report, e["name"], "loaded_mb").get(Ls[0])
        lines.append(f"  {e['name']:{w - 2}}{_cell(e.get('disk_mb'), ',.1f'):>10}{_cell(loaded, ',.0f'):>10}"
                     + ("" if e["status"] == "ok" else f"   {e['status']}"))
    ref = m["reference"]
    if any(e["name"] == ref and e["status"] == "ok" for e in ok):
        lines += ["", f"against {ref} (> 1: ReSSFormer faster / smaller)", f"{'':{w}}" + head[w:]]
        for e in (e for e in ok if e["kind"] == "ressformer" and e["status"] == "ok"):
            rat = ratios(report, e["name"], ref)
            for key in ("prefill", "decode", "peak"):
                lines.append(f"  {e['name'].split()[1] + ' ' + key:{w - 2}}" + "".join(
                    f"{_cell(rat[key][T], '.2f'):>10}" for T in Ls))
        dm = {e["name"]: e.get("disk_mb") for e in ok}
        for e in (e for e in ok if e["kind"] == "ressformer" and e.get("disk_mb") and dm.get(ref)):
            lines.append(f"  {e['name']} on disk: {e['disk_mb'] / dm[ref]:.2f}x {ref}'s")
    cx = report.get("crossover", {})
    if cx:
        lines += ["", "crossovers (where ReSSFormer becomes faster, interpolated on log length):"]
        for r, by in cx.items():
            for g, c in by.items():
                lines.append(f"  {r} vs {g}: prefill {c['prefill']['text']}; decode {c['decode']['text']}")
    return "\n".join(lines).rstrip()


STYLES = {"ReSSFormer fp32": ("s-", "C0"), "ReSSFormer int8": ("s--", "C2"), "ReSSFormer int4": ("s:", "C4"),
          "genai fp32": ("o-", "C1"), "genai int4": ("o--", "C3")}


def plot(report, path) -> Path:
    """PNG: prefill time, decode tokens/s and peak RSS against the context length (log x), one line
    per engine; the size on disk as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
    panels = [("prefill_s", "prefill latency (s, one run)", "prefill, batch 1", True),
              ("decode_tok_s", "decode tokens/s", "decode after the context", True),
              ("peak_mb", "peak RSS (MB, fresh process)", "peak memory (prefill + decode)", True)]
    for ax, (field, ylabel, title, logy) in zip(axes, panels):
        for i, e in enumerate(report["engines"]):
            style, color = STYLES.get(e["name"], ("^-", f"C{5 + i % 5}"))
            pts = [(T, v) for T, v in series(report, e["name"], field).items() if v]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=e["name"])
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    es = report["engines"]
    ax.bar(range(len(es)), [e.get("disk_mb") or 0 for e in es],
           color=[STYLES.get(e["name"], ("", "C5"))[1] for e in es])
    ax.set_xticks(range(len(es)), [e["name"].replace(" ", "\n") for e in es], fontsize=8)
    for i, e in enumerate(es):  # an engine that did not export or build: "n/a" where its bar would be
        ax.annotate(f"{e['disk_mb']:.1f}" if e.get("disk_mb") else "n/a", (i, e.get("disk_mb") or 0), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title("ONNX files on disk")
    m = report["meta"]
    fig.suptitle(f"ReSSFormer {m['checkpoint'] or m['preset']} ({m['ressformer_params']:,} params) vs dense Llama "
                 f"in onnxruntime-genai ({m['llama_params']:,}), threads={m['threads'] or 'default'}, load avg "
                 f"{m['loadavg_start'][0]:.1f}")
    return db.save_figure(fig, path)


def main(argv=None):
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        path, length, decode, threads, seed = argv[1:6]
        print(json.dumps(genai_child(path, int(length), int(decode), int(threads), int(seed))))
        return
    p = argparse.ArgumentParser(prog="python -m ressformer.bench.genai", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="a ReSSFormer checkpoint (default: --preset at random init)")
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=db._lengths, help="comma-separated context lengths (default 128,2048,8192,32768)")
    p.add_argument("--variants", default=",".join(RESS_VARIANTS),
                   help=f"ReSSFormer exports, from {','.join(ALL_VARIANTS)}")
    p.add_argument("--genai-variants", default=",".join(GENAI_VARIANTS), help="genai builds, from fp32,int4")
    p.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64, 128, 256),
                   help="int8/int4 weights per scale, both engines (default 32: each one's default)")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    p.add_argument("--heads", type=int, help="Llama attention heads (default: head_dim 64)")
    p.add_argument("--keep", help="keep the exports and builds in this folder")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 64/128 tokens (CI)")
    p.add_argument("--json")
    p.add_argument("--plot")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    try:
        variants = _variants(a.variants, ALL_VARIANTS, "--variants")
        gvariants = _variants(a.genai_variants, GENAI_VARIANTS, "--genai-variants")
    except ValueError as e:
        p.error(str(e))
    rep = run_comparison(preset=a.preset, lengths=a.lengths, threads=a.threads, variants=variants,
                         genai_variants=gvariants, decode_tokens=a.decode_tokens, smoke=a.smoke, n_heads=a.heads,
                         checkpoint=a.checkpoint, keep=a.keep, progress=lambda s: print(s, flush=True),
                         block_size=a.block_size)
    print(rep["table"])
    if a.json:
        db._write_json(rep, a.json)
    if a.plot:
        plot(rep, a.plot)


if __name__ == "__main__":
    main()

"""Export a checkpoint to an ONNX folder: graphs + the `ressformer.json` sidecar (the runtime's
whole contract). Written to a temporary folder, validated, then renamed: a failed or
interrupted export leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import onnx
import torch

from ressformer import fsutil
from ressformer.checkpoint import checkpoint_hash, load_checkpoint
from ressformer.ops import OPSET_VERSION

from . import dispatch, ort_moe
from .modules import example_inputs, wrapper_for
from .ops import DOMAIN, SUPPORTED_OPSETS, check_normalizers, function_protos
from .ops import _all_nodes as _nodes
from .spec import UNROLLED_ROLES, graph_specs, unrolled_names

SIDECAR = "ressformer.json"
FORMAT = "ressformer-export"
FORMAT_VERSION = 3  # 2: unrolled piece/segment_end graphs, memory keys/values as state, model_sha256;
# 3: per-step cache/past inputs of the piece graphs, past as buffers of any capacity, new_k/new_v outputs
# Generation defaults written to the sidecar (editable: not covered by model_sha256); `generate`
# uses them unless told otherwise, like the generation configs of ONNX Runtime GenAI / HF.
GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "max_new_tokens": 200,
                       "repetition_penalty": 1.0, "stop": []}
IR_VERSION = 10  # onnxruntime-gpu 1.31 accepts IR <= 13; 10 is what torch writes
DTYPES = ("fp32", "fp16")
# Weight-only quantization (ONNX Runtime flavour): every weight MatMul becomes com.microsoft
# MatMulNBits with `bits` per weight, symmetric, one float32 scale per block of `block_size` inputs.
# Accuracy level 4: activations are quantized to int8 per block inside the kernel (MLAS's fastest
# CPU path); the quality cost is measured at export (validate) and stated in the model card.
QUANTIZE_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
EXPERT_LAYERS = ("auto", "hybrid", "qmoe", "dispatch")
# auto: QMoE while the quantized experts are small (a decoded token is bound by its node count: `small`
# decodes 866 vs 759 tok/s with QMoE), the sorted dispatch from this size on (ONNX Runtime's CPU QMoE
# dequantizes per row: `base` int4, 18.9 MB of experts, prefills 1.5x faster and decodes as fast with the
# dispatch). hybrid (both, under one If) is opt-in: two in-memory copies of the experts, and since the
# sorted dispatch (session 8) no faster than it at `base`.
AUTO_DISPATCH_BYTES = 8_000_000
# Opset 20: GELU exports as one `Gelu` node instead of five (Div, Erf, Add, Mul, Mul), 32 fewer nodes
# per decoded token for `small` (docs/performance.md)
DEFAULT_OPSET = 20
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this, weights go to external data (protobuf's 2 GB cap)


class ExportError(RuntimeError):
    """The export could not be produced or failed validation; nothing was written."""


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                      dtype: str = "fp32", steps: int | list[int] | None = None, validate=None,
                      quantize: str | None = None, progress=print, overwrite: bool = False,
                      step_graphs: bool = False, block_size: int = DEFAULT_BLOCK_SIZE, experts: str = "auto",
                      top_k: int | None = None) -> Path:
    """Export CHECKPOINT to the folder OUT; returns OUT. Raises ExportError / ValueError.

    Graphs: `init.onnx` and, for each K of `steps` (default: the trained K), `piece_kK.onnx` +
    `segment_end_kK.onnx`; with step_graphs also embed/step/head/memory (any K at run time; they
    repeat the weights). quantize: None (float weights, portable: ONNX functions only) or
    "int8"/"int4" (weight-only MatMulNBits, ONNX Runtime flavour; block_size weights per scale).
    experts (quantized exports): "hybrid" (the piece graphs hold two graphs under If(one token): one
    com.microsoft QMoE node per step for a decoded token, the sparse dispatch on MatMulNBits for prefill
    pieces and batches, one copy of the weights on disk but two in memory), "qmoe" (QMoE always: fewest
    nodes, but ONNX Runtime's CPU QMoE costs grow per row), "dispatch" (MatMulNBits only, as
    onnxruntime-web has) or "auto" (qmoe below AUTO_DISPATCH_BYTES of quantized expert weights, else
    dispatch). QMoE needs d_model and d_ff divisible by the block size; otherwise all export the dispatch.

    top_k: keys per query at test time (None: the trained top_k). The weights do not depend on it: the
    attention and the memory update select top_k candidates instead of the trained number; the sidecar's
    config carries the new value and `trained_top_k` the old one, and validation compares against
    PyTorch run with the same top_k.

    validate: None (no validation) or a callable `validate(model, folder, progress=...) -> report`
    run on the finished folder before it is moved into place (the CLI passes the parity ladder's
    `ressformer.parity.ladder.validate_export`; the exporter itself never imports the parity code)."""
    out = Path(out)
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"unsupported opset {opset}; supported: {', '.join(map(str, SUPPORTED_OPSETS))}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if quantize not in (None, *QUANTIZE_BITS):
        raise ValueError(f"unsupported quantization {quantize!r}; supported: {', '.join(QUANTIZE_BITS)}")
    if quantize and dtype != "fp32":  # quantized weights replace fp32 ones; fp16 ones sit behind Casts
        raise ValueError(f"quantize={quantize} needs dtype fp32 (the {quantize} weights replace the float32 "
                         f"ones), got dtype {dtype}")
    if experts not in EXPERT_LAYERS:
        raise ValueError(f"unknown expert layer {experts!r}; use one of {', '.join(EXPERT_LAYERS)}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size!r} is not supported; use one of "
                         f"{', '.join(map(str, BLOCK_SIZES))}")
    if fsutil.same_or_nested(out, checkpoint):  # never replace (or write into) the input, even with overwrite
        raise ValueError(f"output {out} overlaps the checkpoint {checkpoint} (the same folder, or one inside "
                         "the other); export to a folder outside the checkpoint")
    fsutil.recover(out)  # an export killed earlier: restore its backup, remove its temporary folder
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty (pass overwrite to replace it)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder's parent {parent}: {e}") from e
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output location {parent} is not writable")

    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer (keys per query at test time), got {top_k!r}")
    model = load_checkpoint(checkpoint)
    cfg = model.config
    trained_top_k = cfg.top_k
    if top_k is not None:
        if trained_top_k == 0:
            raise ValueError("the checkpoint attends to all keys (top_k 0); a test-time top_k needs a sparse model")
        cfg.top_k = top_k  # every module reads this one config object
    if not cfg.shared:
        raise ValueError("export supports the shared-block ReSSFormer (config shared=True); "
                         "the dense baseline is a PyTorch-only comparison model")
    steps_list = _steps_list(steps, cfg.n_steps)
    if cfg.n_steps not in steps_list and not step_graphs:
        raise ValueError(f"steps {steps_list} leave out the trained K={cfg.n_steps}: include it, or write the "
                         "step graphs (step_graphs / --step-graphs), which run any K")
    specs = graph_specs(cfg, steps_list, step_graphs=step_graphs)
    expert_layer = resolve_expert_layer(cfg, experts, quantize, block_size) if quantize else None
    tmp = fsutil.make_tmp_dir(parent / out.name)  # .NAME.tmp-PID-*: removed by a later run if this one dies
    t_start = time.perf_counter()
    try:
        graphs, ort_ops = {}, set()
        for i, (name, spec) in enumerate(specs.items(), 1):
            t0 = time.perf_counter()
            if expert_layer == "hybrid" and name.startswith("piece_k"):  # one token: QMoE; more: the dispatch
                proto = ort_moe.switch_by_rows(*(_build_graph(model, name, spec, cfg, opset, dtype, quantize,
                                                              block_size, with_qmoe) for with_qmoe in (True, False)))
            else:  # (a hybrid's other graphs never run one token: the dispatch)
                proto = _build_graph(model, name, spec, cfg, opset, dtype, quantize, block_size,
                                     expert_layer == "qmoe")
            ort_ops |= {n.op_type for n in _nodes(proto.graph) if n.domain == ort_moe.DOMAIN}
            path = tmp / spec.file
            _save(proto, path)
            onnx.checker.check_model(str(path), full_check=True)
            graphs[name] = {**spec.to_json(), "sha256": _sha256(path), "bytes": _size(path)}
            progress(f"[{i}/{len(specs)}] {spec.file}: {graphs[name]['bytes'] / 1e6:.2f} MB "
                     f"in {time.perf_counter() - t0:.1f}s")
        sidecar = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "ressformer_opset": {"domain": DOMAIN, "version": OPSET_VERSION},
            "onnx_opset": opset, "ir_version": IR_VERSION, "dtype": dtype, "quantize": quantize,
            **({"quantize_block_size": block_size, "flavour": "onnxruntime", "expert_layer": expert_layer}
               if quantize else {"flavour": "portable"}),
            "onnxruntime_ops": sorted(ort_ops),  # com.microsoft contrib ops the graphs use (none: portable)
            "config": cfg.to_dict(), "steps": cfg.n_steps,
            **({"trained_top_k": trained_top_k} if cfg.top_k != trained_top_k else {}),
            "segment_len": cfg.segment_len, "cache_len": cfg.cache_len, "mem_slots": cfg.mem_slots,
            "tokenizer": {"type": "bytes", "vocab_size": cfg.vocab_size, "encoding": "utf-8"},
            "checkpoint_sha256": checkpoint_hash(checkpoint),
            "graphs": graphs,
            "unrolled": {str(k): dict(zip(UNROLLED_ROLES, unrolled_names(k))) for k in steps_list},
        }
        sidecar["model_sha256"] = model_hash(sidecar)
        sidecar["generation"] = dict(GENERATION_DEFAULTS)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        if validate:
            progress("validating ONNX Runtime against PyTorch ...")
            report = validate(model, tmp, progress=progress)
            (tmp / "validation.json").write_text(json.dumps(report, indent=2))
            if not report["passed"]:
                raise ExportError("export validation failed:\n" + report["summary"])
        write_model_card(tmp, sidecar, report if validate else None)  # README.md, for people
        # atomic: the old export stays readable until the new one is in place (ressformer.fsutil)
        fsutil.replace_dir(tmp, parent / out.name, overwrite=overwrite or not fsutil.is_nonempty_dir(out))
    except (Exception, KeyboardInterrupt):  # a kill leaves tmp to the next run's fsutil.recover
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"exported {checkpoint} -> {out} in {time.perf_counter() - t_start:.1f}s")
    return out


def write_model_card(folder: str | os.PathLike, sidecar: dict, report: dict | None) -> Path:
    """Write FOLDER/README.md: what the export is (config, parameters, K, sizes, hashes), its
    validation result, its generation defaults, and how to run it (Python, the command line, and the
    loop for other languages). For readers only: the runtime reads the sidecar and the graphs."""
    from ressformer import ReSSFormer, ReSSFormerConfig

    cfg = sidecar["config"]
    with torch.device("meta"):  # the parameter count without allocating the weights
        n_params = ReSSFormer(ReSSFormerConfig.from_dict(cfg)).num_params()
    ks = sorted(int(k) for k in sidecar["unrolled"])
    k = int(sidecar["steps"])
    piece, seg_end = (sidecar["graphs"][n]["file"] for n in sidecar["unrolled"][str(k)].values()) \
        if str(k) in sidecar["unrolled"] else (f"piece_k{ks[0]}.onnx", f"segment_end_k{ks[0]}.onnx")
    q = sidecar.get("quantize")
    weights = (f"{q} weight MatMuls (weight-only, ONNX Runtime's MatMulNBits, {sidecar['quantize_block_size']} "
               "weights per float32 scale; the routers and the embedding stay float32)" if q else
               "float32" if sidecar["dtype"] == "fp32" else "float16 (computation in float32)")
    if q and sidecar.get("expert_layer"):
        weights += "; experts: " + {"hybrid": "QMoE for a decoded token, the dispatch on MatMulNBits for prefill",
                                    "qmoe": "QMoE", "dispatch": "the dispatch on MatMulNBits"}[sidecar["expert_layer"]]
    ort_ops = ", ".join(sidecar.get("onnxruntime_ops", []))
    flavour = (f"ONNX Runtime flavour: `com.microsoft` {ort_ops} (onnxruntime, onnxruntime-node/web >= 1.31)"
               if q else "portable: standard ONNX ops and ONNX functions only")
    total = sum(g["bytes"] for g in sidecar["graphs"].values())
    lines = [
        "# ReSSFormer language model (ONNX export)", "",
        "A [ReSSFormer](https://arxiv.org/abs/2510.01585) (Recursive Sparse Structured Transformer) byte-level "
        "language model exported by the ressformer project for ONNX Runtime. "
        "Tokens are UTF-8 bytes (ids 0..255); the model reads text of any length with constant memory: a "
        "recurrent state (memory slots, key/value caches) carried from segment to segment.", "",
        "| | |", "|---|---|",
        f"| parameters | {n_params:,} |",
        f"| recurrent steps K (trained) | {k}; graphs unrolled for K = {', '.join(map(str, ks))}; "
        + ("any other K runs on the step graphs |" if "step" in sidecar["graphs"] else
           "no step graphs (export with `--step-graphs` to run other K) |"),
        f"| segment length L | {sidecar['segment_len']} tokens |",
        f"| token cache C | {sidecar['cache_len']} keys/values per step from the previous segment |",
        f"| memory | {sidecar['mem_slots']} slots of {cfg['d_model']} |",
        f"| weights | {weights}; {len(sidecar['graphs'])} graphs, {total / 1e6:.2f} MB |",
        f"| flavour | {flavour} |",
        f"| ONNX | opset {sidecar['onnx_opset']}, IR {sidecar['ir_version']}, ops of domain "
        f"`{sidecar['ressformer_opset']['domain']}` v{sidecar['ressformer_opset']['version']} stored as ONNX "
        "functions inside the graphs (stock ONNX Runtime runs them) |",
        f"| checkpoint sha256 | `{sidecar['checkpoint_sha256']}` |",
        f"| model sha256 | `{sidecar['model_sha256']}` (of `ressformer.json`'s model fields) |", "",
        "## Config", "", "| field | value |", "|---|---|",
        *(f"| `{name}` | {value} |" for name, value in cfg.items()), "",
        "## Validation", "",
    ]
    if report is None:
        lines += ["Not validated at export (`--no-validate`). Check it against its checkpoint with "
                  "`ressformer parity CHECKPOINT EXPORT_DIR`.", ""]
    elif "quality" in report:  # a quantized export: its measured quality cost
        qr, b = report["quality"], report["budgets"]
        verdict = "passed" if report["passed"] else "FAILED"
        lines += [f"Quality against the PyTorch fp32 checkpoint at export: **{verdict}** "
                  f"({qr['bytes']:,} bytes of held-out text, streamed through the memory as deployed).", "",
                  "| measure | PyTorch fp32 | this export | cost | budget |", "|---|---|---|---|---|",
                  f"| bits per byte | {qr['bpb_pytorch_fp32']:.4f} | {qr['bpb_onnxruntime']:.4f} | "
                  f"{qr['bpb_delta']:+.4f} | <= +{b['bpb']} |",
                  f"| top-1 next byte agrees (positions off ties) | | {qr['top1_agreement']:.3f} "
                  f"({qr['top1_positions']:,} positions) | | >= {b['top1']} |", ""]
    else:
        rows = report["rows"]
        lines += [f"ONNX Runtime against PyTorch at export: **{'passed' if report['passed'] else 'FAILED'}**, "
                  f"{len(rows)} comparisons (`validation.json` has them all). An output passes iff, elementwise, "
                  "|ort − torch| ≤ a·max|torch| + r·|torch|.", "",
                  "| rung | comparisons | worst max abs error | tolerance a, r | selection flips | result |",
                  "|---|---|---|---|---|---|"]
        for rung in dict.fromkeys(r["rung"] for r in rows):
            rs = [r for r in rows if r["rung"] == rung]
            flips, ok = sum(r["flips"] for r in rs), all(r["passed"] for r in rs)
            if rung == "generate":
                worst, tol = f"{sum(r['compared'] for r in rs)} greedy tokens identical", "exact"
            else:
                w = max(rs, key=lambda r: r["max_abs"])
                worst, tol = f"{w['max_abs']:.1e} ({w['output']}, {w['case']})", f"{w['atol']:.0e}, {w['rtol']:.0e}"
            lines.append(f"| {rung} | {len(rs)} | {worst} | {tol} | {flips} | {'passed' if ok else 'FAILED'} |")
        lines.append("")
    gen = sidecar.get("generation", {})
    lines += [
        "## Generation defaults", "",
        "`generation` in `ressformer.json` (editable: it is not covered by model sha256); `ressformer generate` "
        "and `ReSSFormerSession.generate` use them for options left unset.", "",
        "| option | default |", "|---|---|", *(f"| `{n}` | {v!r} |" for n, v in gen.items()), "",
        "## Run it in Python", "", "`EXPORT_DIR` below is this folder.", "",
        "Needs `numpy` and `onnxruntime` only (`pip install .` in a ressformer checkout installs the runtime "
        "without torch).", "",
        "```python",
        "import numpy as np",
        "from ressformer.runtime import ReSSFormerSession",
        "",
        'sess = ReSSFormerSession("EXPORT_DIR", threads=1)     # checks every graph\'s sha256',
        'print("".join(sess.generate_text("ROMEO:", max_new_tokens=100, seed=0)))',
        "ids = np.frombuffer(b\"To be, or not to be\", np.uint8).astype(np.int64)[None]  # (batch 1, length 19)",
        "logits, state = sess.forward(ids)                     # logits (1, 19, 256)",
        "logits, state = sess.forward(ids[:, :1], state)       # continue: the state carries the text so far",
        "```", "",
        "## Run it on the command line", "",
        "```bash",
        'ressformer generate EXPORT_DIR --prompt "ROMEO:" --max-new-tokens 200 --seed 0',
        'ressformer generate EXPORT_DIR --prompt "ROMEO:" --prompt "JULIET:"   # a batch',
        "ressformer generate EXPORT_DIR --interactive   # a chat: the state carries over between turns",
        "ressformer score EXPORT_DIR some.txt        # bits per byte",
        "```", "",
        "## Other languages", "",
        "Any ONNX Runtime binding (C, C++, C#, Java, JavaScript, ...) runs this folder with a short loop, "
        "specified in `docs/runtime-contract.md` of the ressformer repository (its `runtime/js` implements it "
        "for JavaScript, in Node and browsers). In short: read "
        "`ressformer.json`, check `format_version`, `model_sha256` and the graphs' sha256; make the state "
        "(`init.onnx` gives the memory and its keys/values, the rest starts at zeros); then",
        "",
        f"- `{piece}`: tokens of one piece of a segment (one token when decoding) and the state → logits "
        f"(batch, length, {cfg['vocab_size']}) and the updated state (one run per piece);",
        f"- `{seg_end}`: after every {sidecar['segment_len']} tokens (a segment's end), the memory and the "
        "segment's keys/values → the next memory, its keys/values and the next segment's caches.",
        "",
        "A piece never crosses a segment boundary. Sample the next byte from the last logits (temperature, "
        "top-k, top-p as in the generation defaults), feed it back as a piece of one token.", "",
    ]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _steps_list(steps, trained: int) -> list[int]:
    """--steps: None (the trained K), an int, or a list of K values that get unrolled graphs."""
    items = [trained] if steps is None else [steps] if isinstance(steps, int) else list(steps)
    for k in items:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"steps must be positive integers (K of the unrolled graphs), got {k!r}")
    return list(dict.fromkeys(items))


def model_hash(sidecar: dict) -> str:
    """sha256 of the sidecar's model fields (everything but `model_sha256` and the editable
    `generation` defaults), as canonical JSON. The runtime recomputes it (runtime/session.py
    `_model_hash`, the same three lines) and refuses an edited sidecar."""
    fields = {k: v for k, v in sidecar.items() if k not in ("model_sha256", "generation")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve_expert_layer(cfg, experts: str, quantize: str, block_size: int) -> str:
    """The expert layer a quantized export gets: qmoe | hybrid | dispatch (see export_checkpoint)."""
    if experts == "dispatch" or not ort_moe.supported(cfg, block_size):
        return "dispatch"
    if experts == "auto":
        size = cfg.n_experts * 2 * cfg.d_model * cfg.d_ff * QUANTIZE_BITS[quantize] // 8
        return "dispatch" if size >= AUTO_DISPATCH_BYTES else "qmoe"
    return experts


def _build_graph(model, name, spec, cfg, opset, dtype, quantize, block_size, with_qmoe) -> onnx.ModelProto:
    """One graph: exported (the experts as QMoE nodes if with_qmoe), fp16 weights or quantized."""
    with contextlib.ExitStack() as stack:
        if with_qmoe:  # the ONNX Runtime flavour's experts: one QMoE node per MoE call (export/ort_moe.py)
            stack.enter_context(ort_moe.qmoe_layers(model, QUANTIZE_BITS[quantize], block_size))
        proto = _export_graph(model, name, spec, cfg, opset)
    if dtype == "fp16":
        proto = _fp16_weights(proto)
    if quantize:
        proto = quantize_weights(proto, QUANTIZE_BITS[quantize], block_size)
    return proto


def _export_graph(model, name, spec, cfg, opset) -> onnx.ModelProto:
    wrapper = wrapper_for(name, model)
    args = example_inputs(name, cfg)
    with warnings.catch_warnings(), _quiet(), dispatch.sorted_dispatch():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            wrapper.eval(), args, input_names=[i.name for i in spec.inputs],
            output_names=[o.name for o in spec.outputs], dynamic_shapes=_shared_capacity(spec.dynamic_shapes()),
            dynamo=True, opset_version=opset, optimize=True, verbose=False)
    proto = prog.model_proto
    dispatch.expand(proto)  # the experts' placeholders -> the sorted dispatch (export/dispatch.py)
    if any(n.domain == ort_moe.DOMAIN for n in _nodes(proto.graph)) and \
            not any(o.domain == ort_moe.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ort_moe.DOMAIN, 1))
    used = {n.op_type for n in _nodes(proto.graph) if n.domain == DOMAIN}
    if used:
        proto.functions.extend(function_protos(cfg.normalizer, opset))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    for o in proto.opset_import:
        if o.domain == DOMAIN and o.version != OPSET_VERSION:
            raise ExportError(f"{spec.file}: {DOMAIN} opset {o.version}, expected {OPSET_VERSION}")
    proto.ir_version = IR_VERSION
    proto.producer_name = "ressformer"
    _name_dynamic_axes(proto, spec)
    check_normalizers(proto)
    return proto


def _shared_capacity(shapes: dict) -> dict:
    """The per-step buffers' `capacity` axis (and the caches' `cache` axis) as ONE symbol each (the
    runtime feeds equal sizes for all steps): the piece graph then builds its attention mask once for
    all steps, not once per step."""
    dims = {"capacity": torch.export.Dim("capacity"), "cache": torch.export.Dim("cache")}
    return {k: [{i: dims.get(a, a) for i, a in d.items()} for d in v] if isinstance(v, list)
            else v for k, v in shapes.items()}


def _name_dynamic_axes(proto, spec):
    """Give graph inputs/outputs the spec's axis names (torch names them s0, s1, ...)."""
    ios = {io.name: io for io in (*spec.inputs, *spec.outputs)}
    for vi in (*proto.graph.input, *proto.graph.output):
        io = ios.get(vi.name)
        if io is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(io.shape):
            continue
        for dim, s in zip(dims, io.shape):
            if isinstance(s, str):
                dim.dim_param = s


def _fp16_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Store float32 initializers as float16, each followed by a Cast back to float32: half the
    file size; computation stays float32 (ORT's CPU TopK has no float16 kernel)."""
    import numpy as np
    from onnx import numpy_helper

    g = proto.graph
    casts = []
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        new = numpy_helper.from_array(arr, name + "__fp16")
        init.CopyFrom(new)
        casts.append(onnx.helper.make_node("Cast", [name + "__fp16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"cast_fp16_{len(casts)}"))
    for c in reversed(casts):
        g.node.insert(0, c)
    return proto


def quantize_weights(proto: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    """Weight-only quantization of every weight MatMul (attention, experts, head, memory update)
    to com.microsoft MatMulNBits: `bits`-bit symmetric weights, a float32 scale per block of
    `block_size` inputs. Weight views (Transpose, Gather of one expert) are folded first so each
    MatMul reads an initializer; the routers' Gemms (E outputs, where a flip changes the experts
    a token uses) stay float32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _fold_weight_views(proto)
    with _quiet("onnxruntime.quantization"):
        q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL)
        q.process()
    out = q.model.model
    left = [n.name for n in out.graph.node if n.op_type == "MatMul"
            and n.input[1] in {i.name for i in out.graph.initializer}]
    if left:
        raise ExportError(f"weight MatMuls left unquantized: {left[:5]}")
    out.ir_version = IR_VERSION
    return out


def _fold_weight_views(proto: onnx.ModelProto) -> int:
    """Fold Transpose(initializer) and Gather(initializer, constant index) into initializers.

    onnxruntime's quantizers (MatMulNBitsQuantizer, as quantize_dynamic before it) quantize only
    MatMuls whose weight input *is* an initializer; the torch exporter leaves the q/k/v weight behind
    a Transpose (nn.Linear) and each expert's weights behind a Gather (`w1[e]`), so without this fold
    quantization covered ~10% of the weights. Equal
    folds (the same view of the same weight, e.g. in each unrolled step) share one initializer;
    weights left unused are dropped. Returns the number of nodes folded."""
    import numpy as np
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    arrays = {}

    def arr(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    graph_outputs = {o.name for o in g.output}
    keep, rename, made, folded = [], {}, {}, 0
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input)
        key = None
        if node.op_type == "Transpose" and len(ins) == 1 and ins[0] in inits:
            perm = attrs.get("perm")
            key = ("Transpose", ins[0], tuple(perm) if perm is not None else None)
        elif node.op_type == "Gather" and len(ins) == 2 and all(n in inits for n in ins):
            idx, axis = arr(ins[1]), int(attrs.get("axis", 0))
            if idx.size <= 64:
                key = ("Gather", ins[0], axis, idx.dtype.str, idx.shape, idx.tobytes())
        if key is None or node.output[0] in graph_outputs:
            keep.append(node)
            continue
        folded += 1
        if key in made:
            rename[node.output[0]] = made[key]
            continue
        if key[0] == "Transpose":
            value = np.transpose(arr(ins[0]), key[2])
        else:
            value = np.take(arr(ins[0]), arr(ins[1]), axis=key[2])
        out = node.output[0]
        t = numpy_helper.from_array(np.ascontiguousarray(value), out)
        g.initializer.append(t)
        inits[out] = t
        made[key] = out
    if not folded:
        return 0
    del g.node[:]
    g.node.extend(keep)
    for node in _nodes(g):  # also subgraphs reading an outer name
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {n for node in _nodes(g) for n in node.input}
    live = [i for i in g.initializer if i.name in used or i.name in graph_outputs]
    del g.initializer[:]
    g.initializer.extend(live)
    return folded


def _save(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    data = path.with_name(path.name + ".data")
    if data.exists():
        h.update(data.read_bytes())
    return h.hexdigest()


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@contextlib.contextmanager
def _quiet(*more: str):
    """Silence the exporter's (and quantizer's) own chatter (we print our own progress)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", *more)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)

"""Edge deployment: fp32 vs fp16-stored weights vs int8/int4 (weight-only MatMulNBits) exports of one
checkpoint, and the ORT-format conversion.

For each export mode: file size (all graphs), speed (prefill through the unrolled graphs, decode tokens/s;
the modes alternate, medians), and quality against fp32: bits per byte on held-out text (the
last 5% of the default Shakespeare corpus, via `session.score_stream`) and top-1 agreement of the
next-token predictions with the fp32 export on the same text. Then the fp32 export is converted
with `python -m onnxruntime.tools.convert_onnx_models_to_ort` and run through the runtime.

    python -m ressformer.bench.edge [CHECKPOINT | --preset NAME] [--smoke] [--threads N] [--json F] [--keep DIR]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ressformer.parity.quality import held_out_text, torch_predictions
from ressformer.runtime.sidecar import model_hash

from .run import _med, alternate

MODES = {"fp32": {}, "fp16": {"dtype": "fp16"}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}
FULL = dict(text_bytes=32768, prefill=2048, repeats=5, decode_repeats=3)
SMOKE = dict(text_bytes=2048, prefill=None, repeats=2, decode_repeats=2)  # prefill None: 4 segments


# ---- data and quality ---------------------------------------------------------------------------
def ort_predictions(sess, data: bytes, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stream `data` through the session in segment pieces: (argmax next-token predictions (N,),
    logits (N, V) float32)."""
    ids = np.frombuffer(data, np.uint8).astype(np.int64)
    state, preds, logits = None, [], []
    L = sess.segment_len
    for i in range(0, ids.size, L):
        lo, state = sess.forward(ids[None, i:i + L], state, path=path)
        preds.append(lo[0].argmax(-1))
        logits.append(lo[0])
    return np.concatenate(preds), np.concatenate(logits)


def quality(sess, data: bytes, ref_pred: np.ndarray | None = None, ref_logits: np.ndarray | None = None,
            torch_pred: np.ndarray | None = None) -> dict:
    """bits per byte (session.score_stream) and, against a reference (the fp32 export), top-1
    agreement of the next-token predictions and the logit differences; optionally also the
    agreement with PyTorch's predictions."""
    q = {"bits_per_byte": sess.score_stream([data])["bits_per_byte"]}
    pred, lo = ort_predictions(sess, data)
    if ref_pred is not None:
        q["top1_agreement"] = float((pred == ref_pred).mean())
    if torch_pred is not None:
        q["top1_agreement_vs_torch"] = float((pred == torch_pred).mean())
    if ref_logits is not None:
        d = np.abs(lo.astype(np.float64) - ref_logits)
        q["max_abs_logit_diff"], q["mean_abs_logit_diff"] = float(d.max()), float(d.mean())
    q["finite"] = bool(np.isfinite(lo).all())
    return q


def export_size(export_dir) -> dict:
    meta = json.loads((Path(export_dir) / "ressformer.json").read_text())
    per = {g["file"]: int(g["bytes"]) for g in meta["graphs"].values()}
    # what the default (unrolled) path loads: init + the unrolled graphs of the trained K
    needed = ["init", *meta["unrolled"][str(meta["steps"])].values()]
    return {"total_bytes": sum(per.values()), "graphs": per,
            "deploy_bytes": sum(int(meta["graphs"][n]["bytes"]) for n in needed)}


# ---- ORT format ---------------------------------------------------------------------------------
def ort_format_check(export_dir, out_dir, data: bytes | None = None, threads: int | None = None) -> dict:
    """Convert every graph of `export_dir` to ORT format (.ort) with onnxruntime's converter,
    write a runtime folder whose sidecar names the .ort files, load it with ReSSFormerSession and
    compare its logits (unrolled and step-graph paths) with the .onnx export."""
    from ressformer.runtime import ReSSFormerSession

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    conv = out_dir / "converted"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(export_dir),
                        "--output_dir", str(conv), "--optimization_style", "Fixed"],
                       capture_output=True, text=True, timeout=1800)
    res = {"converted": p.returncode == 0, "convert_seconds": time.perf_counter() - t0}
    if p.returncode != 0:
        res["error"] = (p.stderr or p.stdout)[-2000:]
        return res
    meta = json.loads((export_dir / "ressformer.json").read_text())
    run_dir = out_dir / "export_ort"
    run_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for g in meta["graphs"].values():
        f = Path(g["file"]).with_suffix(".ort").name
        shutil.copy(conv / f, run_dir / f)
        g["file"], g["sha256"] = f, hashlib.sha256((run_dir / f).read_bytes()).hexdigest()
        g["bytes"] = sizes[f] = (run_dir / f).stat().st_size
    meta["model_sha256"] = model_hash(meta)  # the graphs' entries changed: re-sign the model fields
    (run_dir / "ressformer.json").write_text(json.dumps(meta, indent=2))
    res["ort_bytes"], res["ort_total_bytes"] = sizes, sum(sizes.values())
    try:
        sess = ReSSFormerSession(run_dir, threads=threads)
        ref = ReSSFormerSession(export_dir, threads=threads)
    except Exception as e:  # report, do not raise: this is a finding
        res.update(runs=False, error=f"{type(e).__name__}: {e}")
        return res
    data = data or held_out_text(4 * sess.segment_len)
    ids = np.frombuffer(data, np.uint8).astype(np.int64)[None]
    diffs = {}
    for path in ("unrolled", "steps") if ref.has_step_graphs else ("unrolled",):
        a, _ = sess.forward(ids, path=path)
        b, _ = ref.forward(ids, path=path)
        diffs[path] = float(np.abs(a - b).max())
    res.update(runs=True, max_abs_logit_diff_vs_onnx=diffs)
    return res


# ---- the comparison -----------------------------------------------------------------------------
def run_edge(checkpoint=None, preset=None, smoke: bool = False, threads: int | None = None,
             progress=print, keep=None, modes=("fp32", "fp16", "int8", "int4"), ort_format: bool = True) -> dict:
    """Export the checkpoint (or a random-init preset, seed 0) in each mode and compare them.
    `keep`: a folder to keep the exports in (default: a temporary folder)."""
    import torch
    from ressformer.export.exporter import export_checkpoint
    from ressformer.runtime import ReSSFormerSession

    from ressformer import ReSSFormer, ReSSFormerConfig, load_checkpoint, save_checkpoint

    progress = progress or (lambda s: None)
    sizes = dict(SMOKE if smoke else FULL)
    tmp = tempfile.TemporaryDirectory(prefix="ressformer-edge-")
    work = Path(keep) if keep else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if checkpoint is None:
            torch.manual_seed(0)
            m = ReSSFormer(ReSSFormerConfig.preset(preset or "tiny"))
            checkpoint = save_checkpoint(m, work / "checkpoint", extra={"seed": 0, "preset": preset})
        model = load_checkpoint(checkpoint).eval()
        cfg = model.config
        L = cfg.segment_len
        T = sizes["prefill"] or 4 * L
        meta = {"checkpoint": str(checkpoint), "preset": preset, "smoke": smoke, "threads": threads,
                "params": model.num_params(), "config": cfg.to_dict()}
        dirs, report = {}, {"meta": meta, "modes": {}}
        for mode in modes:
            t0 = time.perf_counter()
            dirs[mode] = export_checkpoint(checkpoint, work / f"export_{mode}", validate=False,
                                           overwrite=True, progress=lambda s: None, **MODES[mode])
            progress(f"exported {mode} in {time.perf_counter() - t0:.1f}s")
            report["modes"][mode] = {"export_seconds": time.perf_counter() - t0, **export_size(dirs[mode])}
        sess = {mode: ReSSFormerSession(d, threads=threads) for mode, d in dirs.items()}
        # quality
        data = held_out_text(sizes["text_bytes"])
        ref_pred, ref_logits = torch_predictions(model, data)
        report["meta"]["text_bytes"] = len(data)
        report["torch_fp32_bits_per_byte"] = _bpb(ref_logits, data)
        base = "fp32" if "fp32" in sess else None
        if base:
            b_pred, b_logits = ort_predictions(sess[base], data)
        for mode, s in sess.items():
            progress(f"quality {mode}: {len(data)} held-out bytes ...")
            q = quality(s, data, b_pred if base else ref_pred, b_logits if base else ref_logits, ref_pred)
            report["modes"][mode].update(q)
        # speed
        rng = np.random.default_rng(0)
        x = rng.integers(0, cfg.vocab_size, (1, T))
        progress(f"prefill {T} tokens (unrolled graphs), {sizes['repeats']} rounds ...")
        ts = alternate({mode: (lambda s=s: s.forward(x)) for mode, s in sess.items()},
                       sizes["repeats"])
        for mode in sess:
            report["modes"][mode]["prefill_s"] = _med(ts[mode])
            report["modes"][mode]["prefill_length"] = T
        prompt = rng.integers(0, cfg.vocab_size, (1, max(L // 2, 1)))
        toks = [rng.integers(0, cfg.vocab_size, (1, 1)) for _ in range(L)]
        states = {mode: s.forward(prompt)[1] for mode, s in sess.items()}

        def decode(s, st):
            for t in toks:
                _, st = s.forward(t, st)

        progress(f"decode {L} tokens, {sizes['decode_repeats']} rounds ...")
        ts = alternate({mode: (lambda s=s, st=states[mode]: decode(s, st)) for mode, s in sess.items()},
                       sizes["decode_repeats"])
        for mode in sess:
            r = report["modes"][mode]
            r["decode_tok_s"] = L / _med(ts[mode])
        if base:
            f = report["modes"][base]
            for r in report["modes"].values():
                r["size_vs_fp32"] = r["total_bytes"] / f["total_bytes"]
                r["prefill_speedup_vs_fp32"] = f["prefill_s"] / r["prefill_s"]
                r["decode_speedup_vs_fp32"] = r["decode_tok_s"] / f["decode_tok_s"]
                r["bpb_delta_vs_fp32"] = r["bits_per_byte"] - f["bits_per_byte"]
        if ort_format and base:
            progress("ORT format: converting the fp32 export ...")
            report["ort_format"] = ort_format_check(dirs[base], work / "ort_format", data[:4 * L], threads)
        report["table"] = format_table(report)
        return report
    finally:
        tmp.cleanup()


def _bpb(logits: np.ndarray, data: bytes) -> float:
    ids = np.frombuffer(data, np.uint8).astype(np.int64)
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(lp, ids[1:, None], 1).mean() / np.log(2))


def format_table(report) -> str:
    m = report["meta"]
    lines = [f"edge: {m['checkpoint']} ({m['params']:,} params){' [smoke]' if m['smoke'] else ''}, "
             f"threads={m['threads'] or 'default'}, {m['text_bytes']} held-out bytes; PyTorch fp32 "
             f"{report['torch_fp32_bits_per_byte']:.4f} bits/byte",
             f"{'mode':6} {'size MB':>8} {'vs fp32':>7} {'prefill ms':>10} {'speedup':>7} "
             f"{'decode tok/s':>12} {'speedup':>7} {'bits/byte':>9} {'delta':>8} {'top-1 agree':>11} "
             f"{'max|dlogit|':>11}"]
    for mode, r in report["modes"].items():
        lines.append(f"{mode:6} {r['total_bytes'] / 1e6:8.2f} {r.get('size_vs_fp32', 1):7.2f} "
                     f"{r['prefill_s'] * 1e3:10.1f} {r.get('prefill_speedup_vs_fp32', 1):7.2f} "
                     f"{r['decode_tok_s']:12.1f} {r.get('decode_speedup_vs_fp32', 1):7.2f} "
                     f"{r['bits_per_byte']:9.4f} {r.get('bpb_delta_vs_fp32', 0):+8.4f} "
                     f"{100 * r.get('top1_agreement', 1):10.2f}% {r.get('max_abs_logit_diff', 0):11.2e}")
    first = next(iter(report["modes"].values()))
    lines.append(f"(prefill: {first['prefill_length']} tokens through the unrolled graphs; size: all graphs, "
                 "deploy: init + unrolled graphs; agreement and logit diff vs the fp32 export)")
    o = report.get("ort_format")
    if o:
        if o.get("runs"):
            lines.append(f"ORT format (fp32): converted in {o['convert_seconds']:.1f}s, "
                         f"{o['ort_total_bytes'] / 1e6:.2f} MB, runs in ReSSFormerSession; "
                         "max |logit diff| vs .onnx: "
                         + ", ".join(f"{k} {v:.1e}" for k, v in o["max_abs_logit_diff_vs_onnx"].items()))
        else:
            lines.append(f"ORT format (fp32): converted={o['converted']}, runs={o.get('runs')}: "
                         f"{o.get('error', '')}")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m ressformer.bench.edge", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--preset")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--keep", help="keep the exports in this folder")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not a.checkpoint and not a.preset:
        p.error("give a CHECKPOINT or --preset NAME")
    rep = run_edge(checkpoint=a.checkpoint, preset=a.preset, smoke=a.smoke, threads=a.threads, keep=a.keep,
                   progress=lambda s: print(s, flush=True))
    print(rep["table"])
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2, default=float))


if __name__ == "__main__":
    main()

"""The paper's trade-off in deployment terms (issue 23), measured in ONNX Runtime.

For a checkpoint trained on the recall task (`ressformer recall --out CK`):
1. recall through the memory: accuracy against the answer's distance, from 0 to 1,023 segments
   back (32k bytes at segment_len 32), the export streamed through `ReSSFormerSession`;
2. accuracy against latency: exports with test-time top_k in `top_ks` (the weights do not change,
   the selection does), each with the K graphs of `steps_list` unrolled; per (K, k) the accuracy
   on `context`-token sequences with answers 0..max_distance segments back, and the decode
   latency per token at batch 1 after that context.

    ressformer bench CK --tradeoff --json recall.json --plot docs/img/tradeoff.png
    python -m ressformer.bench.recall CK --out runs/tradeoff     # the same, keeping the exports

Imports the model (to export) and the runtime: a bench, not part of either.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ressformer.runtime import ReSSFormerSession

from ressformer.recall import FILL_LO, KEY_LO, recall_batch

DISTANCES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1023)
TOP_KS = (2, 4, 8, 16, 32)
STEPS = (1, 2, 3, 4, 6, 8)
SMOKE = dict(distances=(0, 1, 2, 4), top_ks=(4, 8), steps_list=(1, 2), context=256, examples=16, decode_tokens=8)


def accuracy(sess: ReSSFormerSession, seq_len: int, distance, examples: int, steps: int | None = None,
             batch: int = 32, seed: int = 1) -> float:
    """Share of `examples` held-out sequences of seq_len tokens whose answer the export predicts
    (argmax at the last position), answers `distance` (int or (lo, hi)) segments back."""
    x, y, _ = recall_batch(examples, seq_len, sess.segment_len, distance, seed=[seed, 2, seq_len])
    hits = 0
    for i in range(0, examples, batch):
        lg, _ = sess.forward(x[i:i + batch], steps=steps, logits="last")  # (b, 1, V)
        hits += int((lg[:, -1].argmax(-1) == y[i:i + batch, -1]).sum())
    return hits / examples


def decode_latency(sess: ReSSFormerSession, context: int, tokens: int, steps: int | None = None) -> float:
    """Median seconds per decoded token at batch 1 after `context` tokens of filler."""
    x = np.random.default_rng([0, 3]).integers(FILL_LO, KEY_LO, size=(1, context + tokens))  # filler
    _, state = sess.forward(x[:, :context], steps=steps, logits="last")
    times = []
    for i in range(context, context + tokens):
        t0 = time.perf_counter()
        _, state = sess.forward(x[:, i:i + 1], state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def distance_sweep(sess: ReSSFormerSession, distances=DISTANCES, examples: int = 64,
                   progress=print) -> list[dict]:
    """Accuracy against distance: sequences of (d + 1) segments, the queried record in the first."""
    rows = []
    for d in distances:
        t0 = time.perf_counter()
        acc = accuracy(sess, (d + 1) * sess.segment_len, d, examples)
        rows.append({"distance": d, "tokens": (d + 1) * sess.segment_len, "accuracy": acc})
        progress(f"distance {d:>5} segments ({rows[-1]['tokens']:>6} tokens): accuracy {acc:.3f} "
                 f"({time.perf_counter() - t0:.1f}s)")
    return rows


def run_tradeoff(checkpoint: str | Path, out: str | Path | None = None, distances=DISTANCES, top_ks=TOP_KS,
                 steps_list=STEPS, context: int = 4096, max_distance: int | None = None, examples: int = 128,
                 decode_tokens: int = 64, threads: int = 1, smoke: bool = False, validate: bool = True,
                 progress=print) -> dict:
    """Export CHECKPOINT once per top_k (K graphs of steps_list unrolled; with validate, the trained
    top_k's export is checked by the parity ladder), then the distance sweep and the (K, k) grid.
    Returns the report (with a table)."""
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export

    from ressformer.checkpoint import read_meta

    if smoke:
        distances, top_ks, steps_list = SMOKE["distances"], SMOKE["top_ks"], SMOKE["steps_list"]
        context, examples, decode_tokens = SMOKE["context"], SMOKE["examples"], SMOKE["decode_tokens"]
    meta = read_meta(checkpoint)
    cfg = meta["config"]
    trained = meta.get("recall", {})
    max_distance = max_distance if max_distance is not None else trained.get("max_distance", 8)
    L, K0, k0 = cfg["segment_len"], cfg["n_steps"], cfg["top_k"]
    if context < (max_distance + 1) * L:
        raise ValueError(f"context {context} is shorter than {max_distance + 1} segments of {L}")
    steps_list = sorted({*steps_list, K0})
    top_ks = sorted({*top_ks, k0})
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="ressformer-tradeoff-"))
    rep = {"checkpoint": str(checkpoint), "config": cfg, "trained": trained, "context": context,
           "max_distance": max_distance, "examples": examples, "threads": threads, "grid": [], "distance": []}
    for k in top_ks:
        folder = root / f"top{k}"
        t0 = time.perf_counter()
        check = validate and k == k0
        export_checkpoint(checkpoint, folder, steps=steps_list, top_k=None if k == k0 else k,
                          validate=validate_export if check else None, overwrite=True, progress=lambda m: None)
        progress(f"exported top_k {k} (K {','.join(map(str, steps_list))}) in {time.perf_counter() - t0:.1f}s"
                 + (", validated against PyTorch" if check else ""))
        sess = ReSSFormerSession(folder, threads=threads)
        if k == k0:
            rep["distance"] = distance_sweep(sess, distances, examples=min(examples, 64), progress=progress)
        for K in steps_list:
            acc = accuracy(sess, context, (0, max_distance), examples, steps=K)
            lat = decode_latency(sess, context, decode_tokens, steps=K)
            rep["grid"].append({"K": K, "top_k": k, "accuracy": acc, "ms_per_token": 1e3 * lat,
                                "trained": K == K0 and k == k0})
            progress(f"K {K} top_k {k:>3}: accuracy {acc:.3f}, decode {1e3 * lat:.2f} ms/token")
    rep["table"] = table(rep)
    if out:
        (root / "tradeoff.json").write_text(json.dumps(rep, indent=2))
    return rep


def table(rep: dict) -> str:
    cfg = rep["config"]
    lines = [f"Recall through the memory (ONNX Runtime, trained K={cfg['n_steps']}, top_k={cfg['top_k']}, "
             f"segments of {cfg['segment_len']}):", "", "| distance (segments) | tokens | accuracy |", "|---|---|---|"]
    lines += [f"| {r['distance']} | {r['tokens']:,} | {r['accuracy']:.3f} |" for r in rep["distance"]]
    lines += ["", f"Accuracy against decode latency ({rep['context']:,}-token contexts, answers 0-"
              f"{rep['max_distance']} segments back, {rep['threads']} thread(s), batch 1):", "",
              "| K | top_k | accuracy | ms per token | |", "|---|---|---|---|---|"]
    lines += [f"| {g['K']} | {g['top_k']} | {g['accuracy']:.3f} | {g['ms_per_token']:.2f} | "
              f"{'trained' if g['trained'] else ''} |" for g in rep["grid"]]
    return "\n".join(lines)


def plot(rep: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ressformer.bench.dense import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    d = rep["distance"]
    a.plot([max(r["distance"], 0.5) for r in d], [r["accuracy"] for r in d], "o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("answer distance (segments; 0 plotted at 0.5)")
    a.set_ylabel("accuracy")
    a.set_ylim(-0.02, 1.02)
    a.axhline(1 / 128, color="grey", lw=0.8, ls=":", label="chance")
    a.set_title("recall through the memory (ONNX Runtime)")
    a.legend()
    for k in sorted({g["top_k"] for g in rep["grid"]}):
        pts = sorted((g["ms_per_token"], g["accuracy"], g["K"]) for g in rep["grid"] if g["top_k"] == k)
        b.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"top_k {k}")
        for ms, acc, K in pts:
            b.annotate(f"K{K}", (ms, acc), fontsize=7, xytext=(2, 2), textcoords="offset points")
    b.set_xlabel("decode latency (ms per token, batch 1)")
    b.set_ylabel(f"accuracy at {rep['context']:,} tokens")
    b.set_ylim(-0.02, 1.02)
    b.set_title("test-time K and top_k")
    b.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", help="keep the exports and tradeoff.json here")
    ap.add_argument("--top-ks", default=",".join(map(str, TOP_KS)))
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--distances", default=",".join(map(str, DISTANCES)))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    rep = run_tradeoff(a.checkpoint, a.out, ints(a.distances), ints(a.top_ks), ints(a.steps), a.context,
                       examples=a.examples, threads=a.threads, smoke=a.smoke)
    print(rep["table"])
    if a.plot:
        plot(rep, a.plot)


if __name__ == "__main__":
    main()

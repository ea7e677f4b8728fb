"""Tables and plots for docs/results.md from the runs of bench/experiments.sh.

    python bench/results.py runs/results --plots docs/img

Reads each run folder's metrics.jsonl (language modelling, ablations), the mqar_*.json and the
eval_*.json files, prints Markdown tables, and writes the validation curves as PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ressformer.train import read_metrics

LM_RUNS = [("lm_ressformer", "ReSSFormer small"), ("lm_baseline", "dense baseline"),
           ("lm_baseline_700", "dense baseline, about the same wall time")]
ABLATIONS = [("lm_ressformer", "ReSSFormer small (reference)"), ("seed1_ressformer", "the reference, seed 1"),
             ("abl_noconv", "no local conv (paper-literal)"),
             ("abl_rope", "RoPE instead of the conv"), ("abl_nomem", "no memory (mem_slots=0)"),
             ("abl_softmax", "softmax instead of entmax-1.5"), ("abl_k1", "K=1 (one recurrent step)")]


def summary(run: Path, at: int | None = None) -> dict | None:
    if not (run / "metrics.jsonl").is_file():
        return None
    recs = read_metrics(run / "metrics.jsonl")
    vals = [r for r in recs if "val_loss" in r and (at is None or r["step"] == at)]
    steps = [r for r in recs if "loss" in r and (at is None or r["step"] <= at)]
    if not vals or not steps:
        return None
    last = steps[-1]
    return {"step": vals[-1]["step"], "val_bpb": vals[-1]["val_bpb"], "train_ce": last["ce"],
            "struct": last["struct"], "tokens": last["tokens"], "tokens_per_s": last["tokens_per_s"]}


def n_params(run: Path) -> str:
    cfg = run / "ckpt" / "config.json"
    return f"{json.loads(cfg.read_text())['n_params']:,}" if cfg.is_file() else "?"


def lm_table(root: Path) -> str:
    rows = ["| model | parameters | steps (tokens) | val bpb | train CE (nats) | tokens/s |",
            "|---|---|---|---|---|---|"]
    for name, label in LM_RUNS:
        s = summary(root / name)
        if s:
            rows.append(f"| {label} | {n_params(root / name)} | {s['step']} ({s['tokens']:,}) | {s['val_bpb']:.3f} | "
                        f"{s['train_ce']:.3f} | {s['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


def ablation_table(root: Path) -> str:
    ref = summary(root / "lm_ressformer", at=100)
    rows = ["| variant | val bpb @100 | Δ vs reference | train CE | L_struct | tokens/s |", "|---|---|---|---|---|---|"]
    for name, label in ABLATIONS:
        s = summary(root / name, at=100)
        if s and ref:
            rows.append(f"| {label} | {s['val_bpb']:.3f} | {s['val_bpb'] - ref['val_bpb']:+.3f} | "
                        f"{s['train_ce']:.3f} | {s['struct']:.3f} | {s['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


TINY_ABLATIONS = [("ref", "ReSSFormer tiny (reference)"), ("noconv", "no local conv (paper-literal)"),
                  ("rope", "RoPE instead of the conv"), ("nomem", "no memory (mem_slots=0)"),
                  ("softmax", "softmax instead of entmax-1.5"), ("k1", "K=1 (one recurrent step)")]


def tiny_ablation_table(root: Path, seeds=(0, 1)) -> str:
    """val bpb at the end of each tiny run, per seed, their mean and its difference to the reference's."""
    def final(name):
        s = summary(root / name)
        return s["val_bpb"] if s else None

    ref = [final(f"tiny_ref_s{k}") for k in seeds]
    rows = ["| variant | " + " | ".join(f"seed {k}" for k in seeds) + " | mean | Δ mean | tokens/s |",
            "|---|" + "---|" * (len(seeds) + 3)]
    for key, label in TINY_ABLATIONS:
        v = [final(f"tiny_{key}_s{k}") for k in seeds]
        if None in v or None in ref:
            continue
        tps = summary(root / f"tiny_{key}_s{seeds[0]}")["tokens_per_s"]
        mean, rmean = sum(v) / len(v), sum(ref) / len(ref)
        rows.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {mean:.3f} | {mean - rmean:+.3f} | "
                    f"{tps:,.0f} |")
    return "\n".join(rows)


def mqar_table(root: Path) -> str:
    """mqar_r_[VARIANT_]S_P.json (ReSSFormer) next to mqar_b_S_P.json (the baseline), by length."""
    rows = ["| seq len | pairs | steps | ReSSFormer tiny | dense baseline |", "|---|---|---|---|---|"]
    for prefix in ("mqar", "mqarlong"):
        runs = [(json.loads(f.read_text()), f) for f in root.glob(f"{prefix}_r_*.json")]
        for r, f in sorted(runs, key=lambda x: (x[0]["seq_len"], x[1].name)):
            variant = f.stem.split("_")[2:-2]  # e.g. ["noconv"]
            b = root / f"{prefix}_b_{r['seq_len']}_{r['n_pairs']}.json"
            bacc = f"{json.loads(b.read_text())['accuracy']:.3f}" if b.is_file() and not variant else "–"
            name = f"{r['accuracy']:.3f}" + (f" ({', '.join(variant)})" if variant else "")
            rows.append(f"| {r['seq_len']} | {r['n_pairs']} | {r['steps']} | {name} | {bacc} |")
    return "\n".join(rows)


def structure_table(root: Path) -> str:
    rows = ["| model | window | val bpb, paragraphs in order | shuffled | Δ |", "|---|---|---|---|---|"]
    for f in sorted(root.glob("eval_*_ordered.json")):
        a = json.loads(f.read_text())
        b = json.loads(f.with_name(f.name.replace("_ordered", "_shuffled")).read_text())
        rows.append(f"| {f.stem[5:-8]} | {a['seq_len']} | {a['val_bpb']:.3f} | {b['val_bpb']:.3f} | "
                    f"{b['val_bpb'] - a['val_bpb']:+.3f} |")
    return "\n".join(rows)


# issue 13's refresh at the baby-GPT budget (bench/experiments.sh ROOT baby, ROOT recipe): run, label, speed run
REFRESH_RUNS = [("baby_baseline_lr3e-3", "dense baseline, lr 3e-3", "speed_baseline"),
                ("baby_baseline_lr3e-3_4600", "dense baseline, lr 3e-3, 4,600 steps", "speed_baseline"),
                ("res_lr6e-3", "ReSSFormer K=4, lr 6e-3", "speed_k4"),
                ("res_k2_2000_lr6e-3", "ReSSFormer K=2 (baby), lr 6e-3", "speed_k2")]


def _refresh_runs(root: Path):
    """(run name, label, its summary, its model's speed-run summary) of the refresh runs present in ROOT."""
    for name, label, speed in REFRESH_RUNS:
        s, v = summary(root / name), summary(root / speed)
        if s and v:
            yield name, label, s, v


def refresh_table(root: Path) -> str:
    """Final val bpb of the refresh runs, with the training time each would take alone on one thread
    (steps x bytes per step / the tokens/s of its model's 100-step speed run)."""
    rows = ["| run | steps (tokens) | val bpb | tokens/s alone | training time alone |", "|---|---|---|---|---|"]
    for _, label, s, v in _refresh_runs(root):
        secs, tps = s["tokens"] / v["tokens_per_s"], v["tokens_per_s"]
        rows.append(f"| {label} | {s['step']:,} ({s['tokens']:,}) | {s['val_bpb']:.3f} | {tps:,.0f} | "
                    f"{secs // 60:.0f} min {secs % 60:02.0f} s |")
    return "\n".join(rows)


def refresh_plot(root: Path, out: Path) -> Path | None:
    """Validation bpb of the refresh runs against tokens and against training time alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = False
    for name, label, s, v in _refresh_runs(root):
        recs = read_metrics(root / name / "metrics.jsonl")
        per_step = s["tokens"] / s["step"]
        pts = [(r["step"] * per_step, r["val_bpb"]) for r in recs if "val_bpb" in r and r["step"] > 0]
        axes[0].plot([t / 1e6 for t, _ in pts], [b for _, b in pts], "o-", ms=3, label=label)
        axes[1].plot([t / v["tokens_per_s"] / 60 for t, _ in pts], [b for _, b in pts], "o-", ms=3, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_xlabel("training tokens (millions of bytes)")
    axes[1].set_xlabel("training minutes alone on one CPU thread (tokens / the model's tokens/s)")
    axes[0].set_ylabel("validation bits per byte")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "refresh_val_bpb.png", dpi=90)
    plt.close(fig)
    return out / "refresh_val_bpb.png"


def plot(root: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, runs in (("lm_val_bpb.png", LM_RUNS), ("ablations_val_bpb.png", ABLATIONS)):
        if not any((root / name / "metrics.jsonl").is_file() for name, _ in runs):
            continue  # none of these runs in ROOT: keep the plot that is there
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, label in runs:
            if (root / name / "metrics.jsonl").is_file():
                v = [(r["step"], r["val_bpb"]) for r in read_metrics(root / name / "metrics.jsonl") if "val_bpb" in r]
                ax.plot(*zip(*[p for p in v if p[0] > 0]), "o-", ms=3, label=label)
        ax.set_xlabel("step (4,096 bytes each)")
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        written.append(out / fname)
    return written + [p for p in [refresh_plot(root, out), curves_plot(root, out)] if p]


CURVES = [("mqar_curriculum_r_256_16.json", "MQAR 256/16, ReSSFormer, curriculum 128/8 for 800 steps"),
          ("mqar_curriculum_b_256_16.json", "MQAR 256/16, dense baseline, the same curriculum"),
          ("mqar_anneal_r_256_16.json", "MQAR 256/16, ReSSFormer, top_k annealed all -> 8"),
          ("recall_tiny.json", "recall through the memory, ReSSFormer (mean over distances 0-8)"),
          ("recall_tiny_baseline.json", "recall, dense baseline (mean over distances 0-8)")]


def curves_plot(root: Path, out: Path) -> Path | None:
    """Held-out accuracy against the training step of the issue-23 runs (their `curve`)."""
    runs = [(json.loads((root / f).read_text()), label) for f, label in CURVES if (root / f).is_file()]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for res, label in runs:
        acc = [c["accuracy"] for c in res["curve"]]
        acc = [sum(a.values()) / len(a) if isinstance(a, dict) else a for a in acc]
        ax.plot([c["step"] for c in res["curve"]], acc, "o-", ms=3, label=label)
    ax.axhline(1 / 128, color="grey", lw=0.8, ls=":", label="chance (1/128)")
    ax.set_xlabel("training step (32 sequences each)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "recall_mqar_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--plots", type=Path, help="folder for the PNG plots")
    a = ap.parse_args()
    for title, table in (("Refresh (issue 13): language modelling at the baby-GPT budget", refresh_table),
                         ("Language modelling", lm_table), ("Ablations (step 100)", ablation_table),
                         ("Ablations, tiny, two seeds (step 600)", tiny_ablation_table),
                         ("MQAR accuracy", mqar_table), ("Structure", structure_table)):
        print(f"### {title}\n\n{table(a.root)}\n")
    if a.plots:
        for p in plot(a.root, a.plots):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()

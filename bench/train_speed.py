"""Training speed and memory: ReSSFormer vs the dense baseline of the same parameter count (issue 13).

One run, the same data and batch for both models, each model trained in a fresh child process
(so each peak RSS is its own): a few AdamW steps (forward, backward, clip, optimizer step) on fixed
windows of the default corpus; tokens/s over the timed steps (after warm-up steps) and the peak
RSS (ru_maxrss) of the child. Then the peak RSS of one training step against the sequence length
(batch 1), each point again in a fresh child.

    python -m ressformer.bench.train_speed [--preset small] [--batch-size 8] [--seq-len 512]
        [--steps 6] [--warmup 2] [--threads 1] [--lengths 512,1024,2048] [--json F] [--plot F]
        [--compile] [--checkout DIR]

Steps of the two models alternate in one child (A B A B ...: load changes hit both alike;
tokens/s from the median step). `--checkout DIR` runs the children against another copy of the package (a folder holding
`ressformer/`, e.g. `git archive HEAD~3 ressformer | tar -x -C DIR`): before/after in one run.
Targets (issue 13, tightened by issue 22): ReSSFormer tokens/s >= 0.6x the baseline's, peak RSS <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TARGET_SPEED_RATIO = 0.6
TARGET_RSS_RATIO = 1.5


# ---- the child: one or both models, a few training steps -------------------------------------
def child(spec: dict) -> dict:
    """spec["models"]: "ressformer" and/or "baseline". With both, their steps alternate (A B A B ...),
    so a change of machine load hits both alike; tokens/s from the median step time."""
    import resource
    import statistics

    import numpy as np
    import torch
    import torch.nn.functional as F

    from ressformer import data as D
    from ressformer.model import ReSSFormer
    from ressformer.train import TrainConfig, make_optimizer, model_config

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec.get("device", "cpu"))
    bf16 = spec.get("dtype", "fp32") == "bf16"
    runs = []
    for name in spec["models"]:
        tc = TrainConfig(preset=spec["preset"], baseline=name == "baseline", seq_len=spec["seq_len"],
                         batch_size=spec["batch_size"])
        cfg, seq_len = model_config(tc)
        torch.manual_seed(0)
        model = ReSSFormer(cfg).to(dev).train()
        runs.append({"name": name, "cfg": cfg, "model": model, "opt": make_optimizer(model, tc),
                     "fwd": torch.compile(model) if spec.get("compile") else model, "times": [], "losses": []})
    seq_len, batch = spec["seq_len"], spec["batch_size"]
    train, _ = D.split(D.default_corpus(), seq_len)
    rng = np.random.default_rng(0)  # the same windows for every model
    starts = rng.integers(0, train.size - seq_len - 1, (spec["steps"] + spec["warmup"], batch))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB (Linux: KiB)

    def step(r, x, y):
        model = r["model"]
        if bf16:  # as train.py: bf16 autocast with a bf16 initial state
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = r["fwd"](x, state=model.init_state(x.shape[0], dtype=torch.bfloat16))
        else:
            out = r["fwd"](x)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten()) + out.aux["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)
        return loss

    for i, row in enumerate(starts):
        w = np.stack([train[s:s + seq_len + 1] for s in row]).astype(np.int64)
        x, y = torch.from_numpy(w[:, :-1]).to(dev), torch.from_numpy(w[:, 1:]).to(dev)
        for r in runs:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            loss = step(r, x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= spec["warmup"]:
                r["times"].append(time.perf_counter() - t0)
            r["losses"].append(float(loss))
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
           "rss_before_steps_mib": rss_before, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           "cpu", "dtype": spec.get("dtype", "fp32"), "models": {}}
    for r in runs:
        tps = batch * seq_len / statistics.median(r["times"]) if r["times"] else float("nan")
        flops = 3 * _model_flops(r["cfg"])  # forward + backward (2x) per trained token
        rec = {"params": r["model"].num_params(), "step_s": r["times"], "tokens_per_s": tps, "loss": r["losses"],
               "train_flops_per_token": flops}
        if dev.type == "cuda":
            rec["mfu"] = tps * flops / (spec.get("peak_tflops", 989.0) * 1e12)
        out["models"][r["name"]] = rec
    if dev.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def _model_flops(cfg) -> float:
    try:
        from ressformer.bench.run import model_flops
    except ImportError:  # --checkout of a bare package folder
        return float("nan")
    return model_flops(cfg)["per_token"]


def run_child(spec: dict, checkout: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(checkout).resolve()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({spec}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the parent: both models, ratios, memory vs length -----------------------------------------
def run_bench(preset="small", batch_size=8, seq_len=512, steps=3, warmup=1, threads=1, lengths=(512, 1024, 2048),
              compile=False, checkout=None, device="cpu", dtype="fp32", peak_tflops=989.0, memory=True,
              log=print) -> dict:
    base = dict(preset=preset, seq_len=seq_len, batch_size=batch_size, steps=steps, warmup=warmup,
                threads=threads, compile=compile, device=device, dtype=dtype, peak_tflops=peak_tflops)
    names = ("ressformer", "baseline")
    speed_run = run_child({**base, "models": names}, checkout)  # steps alternate between the models
    speeds = speed_run["models"]
    for name in names:
        r = speeds[name]
        log(f"{name:>10}: {r['tokens_per_s']:,.0f} tokens/s" + (f", MFU {100 * r['mfu']:.2f}%" if "mfu" in r else "")
            + f" ({r['params']:,} parameters, steps {', '.join(f'{t:.2f}' for t in r['step_s'])} s)")
    if not memory:
        return {"settings": base, "speed_run": speed_run, "speed_ratio": speeds["ressformer"]["tokens_per_s"]
                / speeds["baseline"]["tokens_per_s"]}
    # peak memory: each model alone in a fresh process (2 steps of the same batch)
    mem_runs = {n: run_child({**base, "models": [n], "steps": 1, "warmup": 1}, checkout) for n in names}
    for n in names:
        extra = f", CUDA peak {mem_runs[n]['cuda_peak_gib']:.2f} GiB" if "cuda_peak_gib" in mem_runs[n] else ""
        log(f"{n:>10}: peak RSS {mem_runs[n]['peak_rss_mib']:,.0f} MiB{extra}")
    speed = speeds["ressformer"]["tokens_per_s"] / speeds["baseline"]["tokens_per_s"]
    rss = mem_runs["ressformer"]["peak_rss_mib"] / mem_runs["baseline"]["peak_rss_mib"]
    mem = []
    for n in lengths:
        for name in names:
            r = run_child({**base, "models": [name], "seq_len": n, "batch_size": 1, "steps": 1, "warmup": 0},
                          checkout)
            mem.append({"model": name, "seq_len": n, "peak_rss_mib": r["peak_rss_mib"],
                        "step_s": r["models"][name]["step_s"][0], **({"cuda_peak_gib": r["cuda_peak_gib"]}
                                                                     if "cuda_peak_gib" in r else {})})
            log(f"  seq {n:>6} {name:>10}: peak RSS {r['peak_rss_mib']:,.0f} MiB, one step "
                f"{r['models'][name]['step_s'][0]:.2f} s")
    table = "\n".join([
        "| measure | value | target |", "|---|---|---|",
        f"| ReSSFormer tokens/s / baseline tokens/s | {speed:.2f} "
        f"({speeds['ressformer']['tokens_per_s']:,.0f} / {speeds['baseline']['tokens_per_s']:,.0f}) "
        f"| >= {TARGET_SPEED_RATIO} |",
        f"| ReSSFormer peak RSS / baseline peak RSS | {rss:.2f} "
        f"({mem_runs['ressformer']['peak_rss_mib']:,.0f} / {mem_runs['baseline']['peak_rss_mib']:,.0f} MiB) "
        f"| <= {TARGET_RSS_RATIO} |"])
    return {"settings": {**base, "lengths": list(lengths), "checkout": checkout},
            "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "device": speed_run["device"]},
            "speed_run": speed_run, "memory_runs": mem_runs, "speed_ratio": speed, "rss_ratio": rss,
            "memory_vs_length": mem, "table": table,
            "targets_met": speed >= TARGET_SPEED_RATIO and rss <= TARGET_RSS_RATIO}


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("ressformer", "baseline"):
        pts = [(m["seq_len"], m["peak_rss_mib"]) for m in report["memory_vs_length"] if m["model"] == name]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("peak RSS of one training step (MiB)")
    ax.set_title(f"preset {report['settings']['preset']}, {report['settings']['threads']} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)  # the first steps still grow the heap
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="512,1024,2048", help="comma-separated; empty: skip")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each child")
    p.add_argument("--checkout", help="run the children against the package under this folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, as train.py on CUDA")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak, for MFU (H100/H200 bf16)")
    p.add_argument("--speed-only", action="store_true", help="skip the peak-memory children")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="peak memory vs sequence length, PNG")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    lengths = tuple(int(n) for n in a.lengths.split(",") if n.strip())
    rep = run_bench(a.preset, a.batch_size, a.seq_len, a.steps, a.warmup, a.threads, lengths, a.compile, a.checkout,
                    a.device, a.dtype, a.peak_tflops, not a.speed_only)
    print(rep.get("table", f"speed ratio {rep['speed_ratio']:.3f}"))
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rep, indent=2))
        tmp.replace(a.json)
    if a.plot and rep.get("memory_vs_length"):
        plot(rep, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

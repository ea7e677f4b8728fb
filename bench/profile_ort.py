"""Where ONNX Runtime spends its time: prefill and decode of an export under ORT's profiler
(SessionOptions.enable_profiling), plus a sweep of session settings (graph optimization level,
a saved pre-optimized model, threads, spinning).

    python -m ressformer.bench.profile_ort EXPORT_DIR [--length 2048] [--decode 64] [--threads 2] [--sweep]

Prints the kernel time per op type (functions are inlined by ORT, so the `ressformer` ops show up
as their ONNX primitives: TopK, ScatterElements, CumSum, ...) and per graph; with --sweep, the
median prefill / decode time of each setting.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from ressformer.runtime import ReSSFormerSession
from ressformer.runtime.session import OPT_LEVELS, _Graph


def _options(threads=None, optimization="all", profile_prefix=None, spinning=None, optimized_path=None):
    o = ort.SessionOptions()
    o.graph_optimization_level = OPT_LEVELS[optimization]
    o.log_severity_level = 3
    if threads:
        o.intra_op_num_threads = int(threads)
        o.inter_op_num_threads = 1
    if spinning is not None:
        o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        o.enable_profiling = True
        o.profile_file_prefix = str(profile_prefix)
    if optimized_path:
        o.optimized_model_filepath = str(optimized_path)
    return o


def session_with(export_dir, **opt_kw) -> ReSSFormerSession:
    """A ReSSFormerSession whose graphs use custom SessionOptions (same files, same behaviour).
    spinning=None does what the runtime does: spinning workers for step/piece graphs only."""
    sess = ReSSFormerSession(export_dir, threads=opt_kw.get("threads"))
    for name, g in sess.meta["graphs"].items():
        kw = dict(opt_kw)
        if kw.get("spinning") is None:
            kw["spinning"] = name == "step" or name.startswith("piece_k")
        if kw.get("profile_prefix"):
            kw["profile_prefix"] = f"{kw['profile_prefix']}_{name}"
        if kw.get("optimized_path"):
            kw["optimized_path"] = Path(kw["optimized_path"]) / g["file"]
        sess.graphs[name] = _Graph(sess.dir / g["file"], _options(**kw), ["CPUExecutionProvider"], "cpu")
    return sess


def saved_optimized_export(export_dir, out_dir, threads=None) -> Path:
    """Copy of the export whose graphs are ORT's optimized models (level 'all', CPU): loading
    them with optimization disabled skips the optimizer at start-up."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    session_with(export_dir, threads=threads, optimized_path=out_dir)
    meta = json.loads((Path(export_dir) / "ressformer.json").read_text())
    for g in meta["graphs"].values():
        g["sha256"] = ""  # not checked when empty
    (out_dir / "ressformer.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def workloads(sess, length, decode, seed=0, setup=None, prompt_len=None):
    """Prefill and decode callables on `sess`; the decode's prompt states are made with `setup`
    (another session of the same export, so a profiled session records the workload alone)."""
    setup = setup or sess
    rng = np.random.default_rng(seed)
    V, L = sess.vocab_size, sess.segment_len
    x = rng.integers(0, V, (1, length))
    prompt = rng.integers(0, V, (1, prompt_len or max(L // 2, 1)))
    toks = [rng.integers(0, V, (1, 1)) for _ in range(decode)]
    _, st0 = setup.forward(prompt)

    st0_steps = setup.forward(prompt, path="steps")[1] if setup.has_step_graphs else None

    def prefill():
        sess.forward(x, path="unrolled")

    def prefill_steps():
        sess.forward(x, path="steps")

    def dec(st0=st0):
        st = st0
        for t in toks:
            _, st = sess.forward(t, st)

    return {"prefill": prefill, "prefill_steps": prefill_steps, "decode": dec,
            "decode_steps": lambda: dec(st0_steps)}


def matmul_flops(ev_args: dict) -> float:
    """FLOPs (multiply-add = 2) of one profiled MatMul-like node from its input/output shapes."""
    op = ev_args.get("op_name", "")
    if op not in ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"):
        return 0.0
    ins = [next(iter(d.values())) for d in ev_args.get("input_type_shape", [])]
    outs = [next(iter(d.values())) for d in ev_args.get("output_type_shape", [])]
    if not ins or not outs or len(ins[0]) < 1 or len(outs[0]) < 1:
        return 0.0
    a, y = ins[0], outs[0]
    if len(a) >= 2 and len(y) >= 2 and a[-2] != y[-2]:
        k = a[-2]  # A transposed (FusedMatMul transA / Gemm transA)
    else:
        k = a[-1]
    return 2.0 * float(np.prod(y)) * k


def profiled(sess_factory, workload: str, length=2048, decode=64, workdir=None, setup=None,
             prompt_len=None) -> dict:
    """Run one workload under ORT's profiler: kernel time per op type and graph, node count, the
    FLOPs of every MatMul-like node actually executed, and ONNX Runtime runs per graph."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ressformer-prof-"))
    sess = sess_factory(workdir / workload)
    fns = workloads(sess, length, decode, setup=setup, prompt_len=prompt_len)
    runs = defaultdict(int)
    for name, g in sess.graphs.items():
        real = g.run

        def counted(feeds, outputs=None, name=name, real=real):
            runs[name] += 1
            return real(feeds, outputs)

        g.run = counted
    t0 = time.perf_counter()
    fns[workload]()
    wall = time.perf_counter() - t0
    by_op, by_graph, flops, nodes = defaultdict(float), defaultdict(float), 0.0, 0
    for name, g in sess.graphs.items():
        path = g.sess.end_profiling()
        for ev in json.loads(Path(path).read_text()):
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                us = float(ev.get("dur", 0))
                args = ev.get("args", {})
                by_op[args.get("op_name", "?")] += us
                by_graph[name] += us
                flops += matmul_flops(args)
                nodes += 1
    total = sum(by_op.values())
    return {"wall_s": wall, "kernel_s": total / 1e6, "flops": flops, "nodes_executed": nodes,
            "runs": dict(runs), "by_op": {k: v / 1e6 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "by_graph": {k: v / 1e6 for k, v in sorted(by_graph.items(), key=lambda kv: -kv[1])}}


def profile(export_dir, length=2048, decode=64, threads=None, workdir=None,
            workloads_=("prefill", "prefill_steps", "decode", "decode_steps"), prompt_len=None) -> dict:
    """Run prefill and decode on both paths (unrolled graphs, step graphs) under ORT's profiler;
    return, for each, the kernel time per op type and per graph, the executed MatMul FLOPs, the
    executed node count and the runs per graph (see `profiled`)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ressformer-prof-"))
    setup = ReSSFormerSession(export_dir, threads=threads)
    if not setup.has_step_graphs:  # an export without --step-graphs: the unrolled path only
        workloads_ = [w for w in workloads_ if not w.endswith("_steps")]
    return {wl: profiled(lambda prefix: session_with(export_dir, threads=threads, profile_prefix=prefix), wl,
                         length, decode, workdir, setup, prompt_len) for wl in workloads_}


def sweep(export_dir, length=2048, decode=64, threads=2, repeats=3) -> list[dict]:
    """Median times of prefill / decode under several session settings."""
    rows = []
    settings = [("all (default: step/full graphs spin)", {}), ("extended", {"optimization": "extended"}),
                ("basic", {"optimization": "basic"}), ("disable", {"optimization": "disable"}),
                ("no graph spins", {"spinning": False}),
                ("every graph spins (before the fix)", {"spinning": True}), ("1 thread", {"threads": 1})]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        opt_dir = saved_optimized_export(export_dir, Path(tmp) / "opt", threads=threads)
        save_s = time.perf_counter() - t0
        runs = [(name, export_dir, dict({"threads": threads}, **kw)) for name, kw in settings]
        runs.append(("saved optimized model, load with 'disable'", opt_dir,
                     {"threads": threads, "optimization": "disable"}))
        for name, d, kw in runs:
            t0 = time.perf_counter()
            sess = session_with(d, **kw)
            load = time.perf_counter() - t0
            fns = workloads(sess, length, decode)
            r = {"setting": name, "load_s": load}
            for wl in ("prefill", "decode"):
                fns[wl]()
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fns[wl]()
                    ts.append(time.perf_counter() - t0)
                r[f"{wl}_s"] = statistics.median(ts)
            r["decode_tok_s"] = decode / r["decode_s"]
            rows.append(r)
        rows.append({"setting": "(saving the optimized models took)", "load_s": save_s})
    return rows


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m ressformer.bench.profile_ort", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--prompt", type=int, help="tokens before the decoded ones (default: half a segment)")
    p.add_argument("--only", choices=["prefill", "decode"], help="profile one workload")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--sweep", action="store_true", help="also time the session settings")
    p.add_argument("--json")
    a = p.parse_args(argv)
    wls = [a.only] if a.only else ["prefill", "prefill_steps", "decode", "decode_steps"]
    rep = {"profile": profile(a.export_dir, a.length, a.decode, a.threads, workloads_=wls, prompt_len=a.prompt)}
    for wl, r in rep["profile"].items():
        print(f"\n{wl}: wall {r['wall_s'] * 1e3:.1f} ms, kernels {r['kernel_s'] * 1e3:.1f} ms, "
              f"{r['nodes_executed']} nodes, {r['flops'] / 1e6:.1f} MFLOP (MatMul), runs {r['runs']}; by graph: "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["by_graph"].items()))
        for op, s in list(r["by_op"].items())[:a.top]:
            print(f"  {op:24} {s * 1e3:9.2f} ms  {100 * s / r['kernel_s']:5.1f}%")
    if a.sweep:
        rep["sweep"] = sweep(a.export_dir, a.length, a.decode, a.threads)
        print(f"\n{'setting':44} {'load s':>7} {'prefill ms':>10} {'decode tok/s':>12}")
        for r in rep["sweep"]:
            if "prefill_s" in r:
                print(f"{r['setting']:44} {r['load_s']:7.2f} {r['prefill_s'] * 1e3:10.1f} "
                      f"{r['decode_tok_s']:12.1f}")
            else:
                print(f"{r['setting']:44} {r['load_s']:7.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark and accuracy table of the `ressformer` ONNX ops.

1. Speed: `ressformer::TopKAttention` (entmax15, top_k=32, causal mask, B=1, H=4, T=N queries,
   D=64, float32) in ONNX Runtime vs the same computation in PyTorch eager
   (ressformer.ops.topk_attention_kernel), median of several runs, at N = 1024 and 4096 keys.
2. Accuracy: max |difference| against the float64 numpy reference (export/reference.py) per op
   and dtype, in ONNX Runtime, in onnx.reference.ReferenceEvaluator and in the PyTorch kernels.

    python bench/bench_ops.py [--sizes 1024 4096] [--repeats 5] [--skip-speed] [--skip-accuracy]

Single process; ORT and PyTorch use their default thread pools (all cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator
from ressformer.export import reference
from ressformer.export.ops import make_op_model

from ressformer import ops as tops

ONNX_TYPE = {np.float16: onnx.TensorProto.FLOAT16, np.float32: onnx.TensorProto.FLOAT,
             np.float64: onnx.TensorProto.DOUBLE}


def ort_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


# ---- speed ----------------------------------------------------------------------------------------
def _bench_size(sess, n, repeats, heads, d, top_k, normalizer, scale):
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((1, heads, n, d)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((n, n), dtype=bool))
    feeds = {"Q": q, "K": k, "V": v, "mask": mask}
    tq, tk, tv, tm = (torch.from_numpy(a) for a in (q, k, v, mask))

    def run_torch():
        with torch.no_grad():
            return tops.topk_attention_kernel(tq, tk, tv, tm, top_k, normalizer, scale)

    t_ort, t_ort_min = median_time(lambda: sess.run(None, feeds), repeats)
    t_pt, t_pt_min = median_time(run_torch, repeats)
    o1, i1, _ = sess.run(None, feeds)
    o2, i2, _ = (t.numpy() for t in run_torch())
    return n, t_ort, t_ort_min, t_pt, t_pt_min, float(np.abs(o1 - o2).max()), float(np.mean(i1 == i2))


def bench_speed(sizes, repeats, heads=4, d=64, top_k=32, normalizer="entmax15"):
    model = make_op_model("TopKAttention", dtype=onnx.TensorProto.FLOAT, normalizer=normalizer,
                          top_k=top_k, scale=float(np.float32(1 / np.sqrt(d))))
    sess = ort_session(model)
    scale = float(np.float32(1 / np.sqrt(d)))
    rows = [_bench_size(sess, n, repeats, heads, d, top_k, normalizer, scale) for n in sizes]
    print(f"\nTopKAttention speed: B=1 H={heads} T=N D={d} top_k={top_k} {normalizer} causal float32, "
          f"median (min) of {repeats} runs; ORT {ort.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'N':>6} | {'ORT ms':>16} | {'PyTorch eager ms':>17} | {'PyTorch/ORT':>11} | "
          f"{'max|dO|':>8} | idx equal")
    for n, a, amin, b, bmin, do, ieq in rows:
        print(f"{n:>6} | {a * 1e3:8.1f} ({amin * 1e3:5.1f}) | {b * 1e3:9.1f} ({bmin * 1e3:5.1f}) | "
              f"{b / a:11.2f} | {do:8.1e} | {ieq:.4%}")


# ---- accuracy -------------------------------------------------------------------------------------
def normalizer_rows(n, dtype, rng):
    rows = [np.clip(rng.standard_normal(n), -4, 4) * s for s in (1e-5, 1e-2, 1.0, 1e2, 1e4)]
    r = rng.standard_normal(n)
    r[rng.random(n) < 0.4] = -np.inf
    r[0] = 0.5
    rows += [r, np.full(n, -np.inf), np.round(rng.standard_normal(n)), np.full(n, 3.0)]
    return np.stack(rows).astype(dtype)


def attention_inputs(n, dtype, rng, t=8, h=2):
    """Grid-valued q, k (exact scores in every dtype), causal mask with holes."""
    q = rng.integers(-4, 5, (1, h, t, 4)) / 4
    k = rng.integers(-4, 5, (1, h, n, 4)) / 4
    v = rng.standard_normal((1, h, n, 4))
    mask = (np.arange(n)[None, :] <= np.arange(t)[:, None] + n - t) & (rng.random((t, n)) > 0.2)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


NORM_REF = {"Entmax15": reference.entmax15, "Sparsemax": reference.sparsemax,
            "SafeSoftmax": reference.safe_softmax}
NORM_TORCH = {"Entmax15": tops.entmax15_kernel, "Sparsemax": tops.sparsemax_kernel,
              "SafeSoftmax": tops.softmax_kernel}


def op_cases(dtype, rng):
    """(label, op_type, normalizer, attrs, list of input tuples, reference fn, torch fn)."""
    for op in NORM_REF:
        xs = [(normalizer_rows(n, dtype, rng),) for n in (1, 7, 8, 9, 33, 1024, 4096)]
        yield op, op, "entmax15", {}, xs, lambda x, op=op: (NORM_REF[op](x),), \
            lambda x, op=op: (NORM_TORCH[op](x),)
    logits = [(np.concatenate([rng.standard_normal((6, e)), np.round(rng.standard_normal((2, e)))]
                              ).astype(dtype),) for e in (2, 8, 64)]
    yield "TopKRoute(k=2)", "TopKRoute", "entmax15", {"k": 2}, logits, \
        lambda x: reference.topk_route(x, 2), lambda x: tops.topk_route_kernel(x, 2)
    for norm in ("entmax15", "sparsemax", "softmax"):
        xs = [attention_inputs(n, dtype, rng) for n in (1, 31, 32, 33, 1024, 4096)]
        yield f"TopKAttention({norm})", "TopKAttention", norm, {"top_k": 32, "scale": 0.5}, xs, \
            lambda q, k, v, m, norm=norm: reference.topk_attention(q, k, v, m, 32, norm, 0.5), \
            lambda q, k, v, m, norm=norm: tops.topk_attention_kernel(q, k, v, m, 32, norm, 0.5)


def max_diffs(outs, refs):
    """max |float difference| over float outputs; number of differing int64 entries."""
    d, bad = 0.0, 0
    for o, r in zip(outs, refs):
        o = np.asarray(o)
        if o.dtype == np.int64:
            bad += int(np.sum(o != r))
        else:
            d = max(d, float(np.nanmax(np.abs(o.astype(np.float64) - r))) if o.size else 0.0)
            bad += int(np.isnan(o.astype(np.float64)).sum()) * 10**6  # flag NaN loudly
    return d, bad


def _runners(model, torch_fn):
    names = [i.name for i in model.graph.input]
    sess, ev = ort_session(model), ReferenceEvaluator(model)
    return (lambda xs: sess.run(None, dict(zip(names, xs))),
            lambda xs: ev.run(None, dict(zip(names, xs))),
            lambda xs: [t.numpy() for t in torch_fn(*(torch.from_numpy(a) for a in xs))])


def bench_accuracy():
    print("\nmax |difference| vs the float64 numpy reference (export/reference.py); in brackets the "
          "number of differing indices (idx/experts), if any")
    print(f"{'op':<24} {'dtype':<8} | {'ORT':>14} | {'ReferenceEvaluator':>18} | {'PyTorch kernel':>14}")
    for dtype in (np.float16, np.float32, np.float64):
        rng = np.random.default_rng(0)
        for label, op, norm, attrs, inputs, ref_fn, torch_fn in op_cases(dtype, rng):
            model = make_op_model(op, dtype=ONNX_TYPE[dtype], normalizer=norm, **attrs)
            cols = []
            for runner in _runners(model, torch_fn):
                d, bad = 0.0, 0
                for xs in inputs:
                    refs = ref_fn(*(a.astype(np.float64) if a.dtype != bool else a for a in xs))
                    dd, bb = max_diffs(runner(xs), refs)
                    d, bad = max(d, dd), bad + bb
                cols.append(f"{d:.1e}" + (f" [{bad}]" if bad else ""))
            note = " (*)" if dtype == np.float16 else ""
            print(f"{label:<24} {np.dtype(dtype).name:<8} | {cols[0] + note:>14} | {cols[1]:>18} | "
                  f"{cols[2]:>14}")
    print("(*) ORT's CPU provider has no float16 TopK (and most other ops of the bodies): it inserts "
          "Casts and runs the body in float32, so its float16 column is float32 math rounded once. "
          "The ReferenceEvaluator and PyTorch columns compute in float16.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # float16 overflow to -inf at scale 1e4 (handled)
    if not args.skip_speed:
        bench_speed(args.sizes, args.repeats)
    if not args.skip_accuracy:
        bench_accuracy()


if __name__ == "__main__":
    main()

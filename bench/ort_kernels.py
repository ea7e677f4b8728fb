"""What stock ONNX Runtime charges per kernel for the top-k attention's small operators (issue 20).

    python -m ressformer.bench.ort_kernels [--preset base] [--keys 257] [--piece 128] [--threads 2] [--json F]

A decoded token of the unrolled graph runs, per recurrent step, one-query score and weighted-sum
MatMuls per state part (memory, cache, past, current), a TopK over the scores and the normalizer's
elementwise nodes; a prefill piece runs the same over `--piece` queries. Each operator is timed here
alone, in a session of its own, at the preset's shapes (heads, head dim, top_k):

* empty run: one Identity node, the fixed cost of a `run` (subtracted in the "kernel" column);
* q·Kᵀ: FusedMatMul (transB, as ONNX Runtime fuses the export's MatMul+Transpose) of one query
  (1, H, 1, D) against (1, H, N, D) keys; w·V: MatMul of (1, H, 1, N) weights with the values;
* TopK(top_k) over H rows of N scores (a decoded token) and over H x piece rows (a prefill piece),
  on normal scores and on the same rows sorted descending. ONNX Runtime's CPU TopK keeps a heap of the
  k best in index order, so its cost follows the number of heap insertions (~k ln(N/k) on
  unordered rows, none after the first k on sorted ones), not the number of scores.

Every kernel's output is checked against numpy before it is timed. Per-call times: the mean of
`--calls` calls, best of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from ressformer.bench import decode_floor

from ressformer.config import PRESETS, ReSSFormerConfig
from ressformer.fsutil import write_json

MS = "com.microsoft"


def _session(node, inputs: dict, threads: int, inits=()) -> ort.InferenceSession:
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in inputs.items()]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    model = helper.make_model(helper.make_graph([node], "k", vi, outs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    return decode_floor._session(model.SerializeToString(), threads)  # options as the runtime's sessions


def _time(sess, feeds, calls: int, rounds: int) -> float:
    """Microseconds per run: the mean of `calls` runs, best of `rounds`."""
    for _ in range(max(calls // 10, 3)):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def _topk(scores, k, threads) -> ort.InferenceSession:
    kk = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    return _session(helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1), {"s": scores}, threads, [kk])


def measure(heads: int, head_dim: int, keys: int, top_k: int, piece: int, threads: int = 2,
            calls: int = 2000, rounds: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    q, kmat, w = f32(1, heads, 1, head_dim), f32(1, heads, keys, head_dim), f32(1, heads, 1, keys)
    k = min(top_k, keys)
    rows = {"decode": f32(1, heads, 1, keys), "piece": f32(1, heads, piece, keys)}
    cases = {  # name: (node, feeds, numpy reference of output 0)
        "empty run": (helper.make_node("Identity", ["q"], ["o"]), {"q": q}, q),
        "q·Kᵀ (FusedMatMul)": (helper.make_node("FusedMatMul", ["q", "k"], ["o"], domain=MS, transB=1),
                               {"q": q, "k": kmat}, q @ kmat.transpose(0, 1, 3, 2)),
        "w·V (MatMul)": (helper.make_node("MatMul", ["w", "v"], ["o"]), {"w": w, "v": kmat}, w @ kmat),
    }
    out = {"shapes": {"heads": heads, "head_dim": head_dim, "keys": keys, "top_k": k, "piece": piece},
           "threads": threads, "us": {}, "topk_ns_per_score": {}}
    for name, (node, feeds, want) in cases.items():
        sess = _session(node, feeds, threads)
        got = sess.run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
        out["us"][name] = _time(sess, feeds, calls, rounds)
    for where, s in rows.items():
        for order, x in (("unordered", s), ("sorted", -np.sort(-s, axis=-1))):
            x = np.ascontiguousarray(x)
            sess = _topk(x, k, threads)
            vals, idx = sess.run(None, {"s": x})
            np.testing.assert_array_equal(vals, -np.sort(-x, axis=-1)[..., :k], err_msg=f"TopK {where} {order}")
            np.testing.assert_array_equal(np.take_along_axis(x, idx, -1), vals)
            n_calls = calls if where == "decode" else max(calls // 100, 5)
            us = _time(sess, {"s": x}, n_calls, rounds)
            out["us"][f"TopK {where} ({x.size // keys} rows), {order}"] = us
            out["topk_ns_per_score"][f"{where}, {order}"] = 1e3 * max(us - out["us"]["empty run"], 0.0) / x.size
    return out


def format_report(rep: dict) -> str:
    sh, empty = rep["shapes"], rep["us"]["empty run"]
    lines = [f"heads {sh['heads']}, head dim {sh['head_dim']}, {sh['keys']} keys, top {sh['top_k']}, "
             f"prefill piece {sh['piece']} queries, {rep['threads']} threads",
             f"{'operator':44s} {'us per run':>11s} {'kernel us':>10s}"]
    for name, us in rep["us"].items():
        lines.append(f"{name:44s} {us:11.2f} {max(us - empty, 0.0):10.2f}")
    lines.append("TopK, ns per score: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["topk_ns_per_score"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ressformer.bench.ort_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="base", choices=sorted(PRESETS), help="heads, head dim and top_k")
    p.add_argument("--keys", type=int, default=257, help="keys a query scores (base after 128 tokens: 128 memory "
                   "slots + 128 past + itself)")
    p.add_argument("--piece", type=int, default=128, help="queries in a prefill piece")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    cfg = ReSSFormerConfig.preset(a.preset)
    if a.keys < 1 or a.piece < 1:
        p.error("--keys and --piece must be >= 1")
    rep = measure(cfg.n_heads, cfg.head_dim, a.keys, cfg.top_k, a.piece, a.threads, a.calls, a.rounds)
    rep["preset"] = a.preset
    print(format_report(rep))
    if a.json:
        write_json(a.json, rep)
    return rep


if __name__ == "__main__":
    main()

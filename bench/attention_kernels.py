"""The fused Triton top-k attention's kernels timed on CUDA: the forward and both backwards
(`gather`: atomic adds of dk/dv; `tiles`: tl.dot tiles per key block, no atomics), on one call of
`base`'s shape (issue 22). Prints one JSON line: ms per call (median) and how far the two backwards'
gradients are apart.

    python -m ressformer.bench.attention_kernels [--batch 8] [--queries 1024] [--keys 1408] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ressformer.bench.attention_kernels",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--queries", type=int, default=1024, help="T: a segment's queries")
    p.add_argument("--keys", type=int, default=1408, help="N: memory 128 + cache 256 + the segment's 1,024")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from ressformer import triton_attention as ta

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, N, D = a.batch, a.heads, a.queries, a.keys, a.dim
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt, generator=g) for n in (T, N, N))
    # the model's pattern: the first N - T keys (memory, cache) visible to all, the segment's causally
    mask = torch.arange(N, device="cuda")[None, :] <= torch.arange(T, device="cuda")[:, None] + (N - T)
    out, idx, w = ta.topk_attention_fwd(q, k, v, mask, a.top_k, "entmax15", D ** -0.5)
    d_out, d_w = torch.randn_like(out), torch.randn_like(w)
    rep = {"shape": {"B": B, "H": H, "T": T, "N": N, "D": D, "k": a.top_k}, "dtype": a.dtype,
           "gpu": torch.cuda.get_device_name(),
           "forward_ms": _ms(lambda: ta.topk_attention_fwd(q, k, v, mask, a.top_k, "entmax15", D ** -0.5), a.reps)}
    grads = {}
    for method in ta.BACKWARDS:
        def bwd(method=method):
            return ta.topk_attention_bwd(q, k, v, idx, w, d_out, d_w, "entmax15", D ** -0.5, method=method)
        rep[f"backward_{method}_ms"] = _ms(bwd, a.reps)
        grads[method] = bwd()
    rep["backward_tiles_over_gather"] = rep["backward_tiles_ms"] / rep["backward_gather_ms"]
    rep["max_rel_diff"] = {name: float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
                           for name, x, y in zip(("dq", "dk", "dv"), grads["tiles"], grads["gather"])}
    print(json.dumps(rep))
    return rep


if __name__ == "__main__":
    main()

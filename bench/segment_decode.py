"""Decode speed along a segment (issue 20): prefill `start` tokens (a segment start), then decode one
token at a time to `start + max(offsets) + window`, timing each token (process CPU time and wall).
Prints tokens/s over `window` tokens at each offset into the segment. Runtime only (no torch):

    python bench/segment_decode.py EXPORT [--threads 1] [--start 1024] [--offsets 0,256,512,768,1000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ressformer.runtime import ReSSFormerSession


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--start", type=int, default=1024)
    ap.add_argument("--offsets", default="0,256,512,768,1000")
    ap.add_argument("--window", type=int, default=16)
    a = ap.parse_args(argv)
    offsets = [int(o) for o in a.offsets.split(",")]
    sess = ReSSFormerSession(a.export, threads=a.threads)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, a.start + max(offsets) + a.window))
    _, st = sess.forward(x[:, :a.start], logits="last")
    cpu, wall = [], []
    for i in range(a.start, x.shape[1]):
        c, w = time.process_time(), time.perf_counter()
        _, st = sess.forward(x[:, i:i + 1], st, logits="last")
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    rows = [{"offset": o, "cpu_tok_s": a.window / sum(cpu[o:o + a.window]),
             "wall_tok_s": a.window / sum(wall[o:o + a.window])} for o in offsets]
    for r in rows:
        print(f"after {a.start} + {r['offset']:4d}: {r['cpu_tok_s']:7.1f} tok/s (CPU time), "
              f"{r['wall_tok_s']:7.1f} (wall)")
    print(json.dumps({"export": a.export, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()

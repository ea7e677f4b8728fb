"""Child process of the streaming-memory benchmark: stream LENGTH random tokens through one engine
in segment-sized pieces and print one JSON line with the process's peak RSS.

    python bench/stream_child.py ort|torch PATH LENGTH PIECE THREADS SEED

PATH is the export folder (ort) or the checkpoint folder (torch); THREADS 0 keeps the engine's
default. The ort child imports only numpy + onnxruntime (the runtime package), as a deployment
would; the torch child imports torch. Run as a separate process per measurement, so each peak
belongs to one engine and one length.

Peak = VmHWM of /proc/self/status (the high-water mark of this process's own address space).
Not `ru_maxrss`: Linux carries the pre-exec high-water mark into it, and Python's subprocess
starts children with vfork, so a child's ru_maxrss (and the parent's RUSAGE_CHILDREN) is at
least the *parent's* RSS at spawn time (measured: 475 MB for every child of a torch parent).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Current resident set size in MB."""
    v = _status_mb("VmRSS")
    return v if v is not None else _peak_mb()


def _peak_mb() -> float:
    """Peak resident set size in MB (VmHWM; ru_maxrss where /proc is missing)."""
    v = _status_mb("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> dict:
    engine, path, length, piece, threads, seed = argv
    length, piece, threads, seed = int(length), int(piece), int(threads), int(seed)
    import numpy as np

    rng = np.random.default_rng(seed)
    if engine == "ort":
        from ressformer.runtime import ReSSFormerSession

        sess = ReSSFormerSession(path, threads=threads or None)
        vocab = sess.vocab_size

        def run(x, state):
            _, state = sess.forward(x, state)
            return state
    elif engine == "torch":
        import torch

        from ressformer import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(path).eval()
        vocab = model.config.vocab_size

        def run(x, state):
            with torch.no_grad():
                return model(torch.from_numpy(x), state).state
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    state = run(rng.integers(0, vocab, (1, piece)), None)  # warm: first allocations, one piece
    loaded = _rss_mb()
    state, done = None, 0
    t0 = time.perf_counter()
    while done < length:
        n = min(piece, length - done)
        state = run(rng.integers(0, vocab, (1, n)), state)
        done += n
    seconds = time.perf_counter() - t0
    return {"engine": engine, "tokens": done, "seconds": seconds, "loaded_mb": loaded,
            "peak_mb": _peak_mb(), "final_mb": _rss_mb()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))

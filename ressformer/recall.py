"""Long-range recall through the segment memory (issue 23): a key-value pair placed many segments
before the query that asks for it.

A sequence of byte tokens is random filler from [FILL_LO, KEY_LO); somewhere in it stand
`n_pairs` records `STORE key value` (key in [KEY_LO, VALUE_LO), value in [VALUE_LO, 256)), each
inside one segment; the sequence ends with `QUERY key` for one of them, and the model must predict
that key's value as the token after the key (only that position is scored; chance 1/128).

The *distance* of an example is the number of segment ends between the queried record and the
answer: 0 = the same segment (ordinary attention), 1 = the segment before (the token cache can hold
it if it is among the last `cache_len` positions), >= 2 = only the gated memory can carry it.
The generator is numpy and deterministic in its seed; `train_recall` trains a model on fresh
batches (seed, step) with distances drawn uniformly from [0, max_distance] and scores a held-out
set per distance. Evaluation through the exported ONNX graphs: `ressformer.bench.recall`.
"""

from __future__ import annotations

import math
import time

import numpy as np

IGNORE = -100  # label of the positions that are not scored
STORE, QUERY = 1, 2  # the record and query markers
FILL_LO, KEY_LO, VALUE_LO, VOCAB = 3, 64, 128, 256


def recall_batch(n: int, seq_len: int, segment_len: int, distance, seed=0,
                 n_pairs: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, distances): int64 (n, seq_len), (n, seq_len), (n,). distance: an int, or
    (lo, hi) inclusive to draw one per example. labels[i, seq_len - 1] is the queried value."""
    if segment_len < 4:
        raise ValueError(f"segment_len must be >= 4 for a record of 3 tokens, got {segment_len}")
    last_seg = (seq_len - 1) // segment_len  # the answer's segment
    lo, hi = (distance, distance) if isinstance(distance, (int, np.integer)) else distance
    if not 0 <= lo <= hi:
        raise ValueError(f"distance must be >= 0 (or lo <= hi), got {distance!r}")
    if hi > last_seg:
        raise ValueError(f"distance {hi} needs a sequence of more than {hi} segments of {segment_len}; "
                         f"seq_len {seq_len} has {last_seg + 1}")
    room = seq_len - 2 - last_seg * segment_len >= 3  # a record fits before the query in the last segment
    if lo == 0 and not room:
        raise ValueError(f"seq_len {seq_len} leaves no room for a record before the query in its last segment")
    most = min(VALUE_LO - KEY_LO, last_seg + int(room))
    if not 1 <= n_pairs <= most:
        raise ValueError(f"n_pairs must be in [1, {most}] (one record per segment, distinct keys), got {n_pairs}")
    rng = np.random.default_rng(seed)
    x = rng.integers(FILL_LO, KEY_LO, size=(n, seq_len))
    y = np.full((n, seq_len), IGNORE, dtype=np.int64)
    dist = rng.integers(lo, hi + 1, size=n)
    q = seq_len - 2  # QUERY at q, the key at q + 1, the answer predicted there
    for i in range(n):
        keys = rng.choice(np.arange(KEY_LO, VALUE_LO), n_pairs, replace=False)
        values = rng.integers(VALUE_LO, VOCAB, size=n_pairs)
        segs = [last_seg - int(dist[i])]  # the queried record's segment, then the others' (distinct)
        others = np.setdiff1d(np.arange(last_seg + int(room)), segs)
        segs += [int(s) for s in rng.choice(others, n_pairs - 1, replace=False)]
        for key, value, s in zip(keys, values, segs):
            start, end = s * segment_len, min((s + 1) * segment_len, q) - 3  # the record ends before the query
            at = int(rng.integers(start, end + 1))
            x[i, at:at + 3] = (STORE, key, value)
        x[i, q:q + 2] = (QUERY, keys[0])
        y[i, q + 1] = values[0]
    return x.astype(np.int64), y, dist.astype(np.int64)


def train_recall(preset: str = "tiny", overrides: dict | None = None, max_distance: int = 8, n_pairs: int = 1,
                 steps: int = 1000, batch_size: int = 16, lr: float = 3e-3, warmup: int = 50, seed: int = 0,
                 baseline: bool = False, eval_examples: int = 64, eval_every: int = 0, device: str = "auto",
                 out: str | None = None, depths: tuple[int, int] | None = None, log=print) -> dict:
    """Train a fresh model on recall at distances 0..max_distance (sequences of max_distance + 1
    segments plus the query); return the held-out accuracy per distance (PyTorch). out: save the
    checkpoint there (ReSSFormer only; the exporter reads it). depths (lo, hi): each training batch runs
    a recurrence depth K drawn from lo..hi (a model meant to run at several K at test time); the
    held-out set and the checkpoint's K stay the config's n_steps."""
    import torch
    import torch.nn.functional as F

    from .config import ReSSFormerConfig
    from .model import ReSSFormer
    from .mqar import task_step
    from .train import TrainConfig, baseline_config, lr_at, make_optimizer, resolve_device

    cfg = ReSSFormerConfig.preset(preset, **(overrides or {}))
    if cfg.vocab_size != VOCAB:
        raise ValueError(f"the recall task uses {VOCAB} tokens; the config has vocab_size {cfg.vocab_size}")
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if depths is not None and not (len(depths) == 2 and 1 <= depths[0] <= depths[1]):
        raise ValueError(f"depths must be (lo, hi) with 1 <= lo <= hi, got {depths!r}")
    L = cfg.segment_len
    seq_len = (max_distance + 1) * L
    if baseline:
        cfg = baseline_config(cfg, seq_len)
    tc = TrainConfig(steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seed=seed)
    tc.validate()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = ReSSFormer(cfg).to(dev)
    opt = make_optimizer(model, tc)
    held = {d: recall_batch(eval_examples, seq_len, L, d, seed=[seed, 0, d], n_pairs=n_pairs)
            for d in range(max_distance + 1)}  # train batches use [seed, 1, step]
    log(f"recall: {'baseline' if baseline else 'ReSSFormer'} {preset}, {model.num_params():,} parameters, "
        f"segments of {L}, distances 0..{max_distance} ({seq_len} tokens), {n_pairs} pair(s)")

    def accuracy() -> dict[int, float]:
        model.eval()
        acc = {}
        with torch.no_grad():
            for d, (ex, ey, _) in held.items():
                hits = 0
                for i in range(0, eval_examples, batch_size):
                    lg = model(torch.from_numpy(ex[i:i + batch_size]).to(dev)).logits[:, -1]
                    hits += int((lg.argmax(-1).cpu().numpy() == ey[i:i + batch_size, -1]).sum())
                acc[d] = hits / eval_examples
        model.train()
        return acc

    t0, loss, curve = time.perf_counter(), math.nan, []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        x, y, _ = recall_batch(batch_size, seq_len, L, (0, max_distance), seed=[seed, 1, step], n_pairs=n_pairs)
        x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        K = None if depths is None else int(np.random.default_rng([seed, 4, step]).integers(depths[0], depths[1] + 1))
        out_ = model(x, steps=K)
        ce = F.cross_entropy(out_.logits[:, -1].float(), y[:, -1])
        loss = task_step(model, opt, ce, out_.aux["loss"])
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            acc = accuracy()
            curve.append({"step": step + 1, "loss": loss, "accuracy": acc})
            log(f"step {step + 1:>5}/{steps} | held-out accuracy by distance "
                + " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            log(f"step {step + 1:>5}/{steps} | query loss {loss:.4f} | {time.perf_counter() - t0:.1f}s")
    acc = accuracy()
    curve.append({"step": steps, "loss": loss, "accuracy": acc})
    log("held-out accuracy by distance (segments): " + " ".join(f"{d}:{a:.3f}" for d, a in acc.items()))
    res = {"accuracy": {str(d): a for d, a in acc.items()}, "loss": loss, "steps": steps, "seq_len": seq_len,
           "segment_len": L, "max_distance": max_distance, "n_pairs": n_pairs, "baseline": baseline,
           "preset": preset, "n_params": model.num_params(), "depths": list(depths) if depths else None,
           "curve": curve, "seconds": time.perf_counter() - t0}
    if out is not None:
        if baseline:
            raise ValueError("only a ReSSFormer checkpoint can be saved for export (the baseline is PyTorch-only)")
        from .checkpoint import save_checkpoint

        save_checkpoint(model, out, extra={"task": "recall", "recall": {k: v for k, v in res.items()
                                                                         if k not in ("curve", "accuracy")}})
        res["checkpoint"] = str(out)
    return res

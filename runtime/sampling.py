"""Next-token sampling on numpy logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import math

import numpy as np


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise ValueError naming the first bad sampling option."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy (argmax, lowest id on ties)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.sort(z, -1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, -1, kind="stable")
        ps = np.take_along_axis(p, order, -1)
        keep_sorted = (np.cumsum(ps, -1) - ps) < top_p  # smallest set with mass >= top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)


def penalize(logits: np.ndarray, seen: list[set], penalty: float) -> np.ndarray:
    """CTRL-style repetition penalty on logits (B, V): a token already in row b's prompt or output
    (`seen[b]`) has its logit divided by `penalty` if positive, multiplied if negative (float64 copy)."""
    out = logits.astype(np.float64, copy=True)
    for b, toks in enumerate(seen):
        idx = np.fromiter(toks, np.int64)
        v = out[b, idx]
        out[b, idx] = np.where(v > 0, v / penalty, v * penalty)
    return out

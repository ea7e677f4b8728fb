"""Next-token sampling on numpy logits: greedy, temperature, top-k, top-p; the options' rules.

`RULES` is the one table of the generation options (range, extremes, what the limits mean). The
JavaScript runtime holds the same table (`SAMPLING_RULES` in runtime/js/ressformer.mjs; the tests
compare the two) and docs/reliability.md prints it. Whatever the table accepts gives finite
probabilities: logits are shifted by their maximum before the temperature divides them, and a
penalized logit is clamped to the float32 range."""

from __future__ import annotations

import math

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)

# name -> type ("number": finite float, "integer"), min/max (None: unbounded), min_open (min excluded),
# must (the message's words), limits (what the extremes mean).
RULES = {
    "temperature": {"type": "number", "min": 0, "min_open": False, "max": None, "js": "temperature",
                    "must": "a finite number >= 0 (0 = greedy)",
                    "limits": "0: greedy (argmax, lowest id on ties); a tiny value samples among the tied "
                              "maxima; a huge one tends to uniform"},
    "top_k": {"type": "integer", "min": 0, "min_open": False, "max": None, "js": "topK",
              "must": "an integer >= 0 (0 = no top-k filter)",
              "limits": "0 or >= the vocabulary: no filter; ties with the k-th logit are kept"},
    "top_p": {"type": "number", "min": 0, "min_open": True, "max": 1, "js": "topP",
              "must": "in (0, 1] (1 = no nucleus filter)",
              "limits": "1: no filter; a tiny value keeps the most probable token (lowest id on ties)"},
    "repetition_penalty": {"type": "number", "min": 0, "min_open": True, "max": None, "js": "repetitionPenalty",
                           "must": "a finite number > 0 (1 = no penalty)",
                           "limits": "1: none; the penalized logits are clamped to the float32 range"},
    "max_new_tokens": {"type": "integer", "min": 0, "min_open": False, "max": None, "js": "maxNewTokens",
                       "must": "an integer >= 0", "limits": "0: nothing is generated"},
    "seed": {"type": "integer", "min": 0, "min_open": False, "max": None, "js": "seed",
             "must": "an integer >= 0", "limits": "None (left out): a random seed"},
}


def rule_error(name: str, value, label: str | None = None, shown: str | None = None) -> str | None:
    """The message for a value that breaks RULES[name] (None if it is valid). label: how the value
    is named to the user (an option `--top-p`, a field `ressformer.json: generation.top_p`); shown:
    the value as the user typed it (default: its repr)."""
    r = RULES[name]
    if value is None and name == "seed":
        return None
    if r["type"] == "integer":
        ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
            and math.isfinite(value)
    if ok:
        lo, hi = r["min"], r["max"]
        ok = (lo is None or (value > lo if r["min_open"] else value >= lo)) and (hi is None or value <= hi)
    return None if ok else f"{label or name} must be {r['must']}, got {repr(value) if shown is None else shown}"


def check_option(name: str, value, label: str | None = None, error=ValueError) -> None:
    """Raise `error` (ValueError) if value breaks RULES[name]."""
    msg = rule_error(name, value, label)
    if msg:
        raise error(msg)


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise ValueError naming the first bad sampling option."""
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        check_option(name, value)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy (argmax, lowest id on ties)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # <= 0: a tiny temperature gives -inf (exp: 0), never inf - inf (NaN)
        z = (z - z.max(-1, keepdims=True)) / temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.sort(z, -1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)  # the maxima are exp(0) = 1: the sum is >= 1
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, -1, kind="stable")
        ps = np.take_along_axis(p, order, -1)
        keep_sorted = (np.cumsum(ps, -1) - ps) < top_p  # smallest set with mass >= top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0)
        p /= p.sum(-1, keepdims=True)
    # the token: the number of ids whose cumulative probability is <= u, at most the last id with p > 0
    # (u = 0 or a rounded cumulative sum never picks a token of probability 0)
    u = rng.random((p.shape[0], 1))
    last = p.shape[-1] - 1 - (p[:, ::-1] > 0).argmax(-1)
    return np.minimum((np.cumsum(p, -1) <= u).sum(-1), last).astype(np.int64)


def penalize(logits: np.ndarray, seen: list[set], penalty: float) -> np.ndarray:
    """CTRL-style repetition penalty on logits (B, V): a token already in row b's prompt or output
    (`seen[b]`) has its logit divided by `penalty` if positive, multiplied if negative (float64 copy),
    clamped to the float32 range so that an extreme penalty stays finite."""
    out = logits.astype(np.float64, copy=True)
    for b, toks in enumerate(seen):
        idx = np.fromiter(toks, np.int64)
        v = out[b, idx]
        with np.errstate(over="ignore"):  # overflow: +-inf, clamped
            out[b, idx] = np.clip(np.where(v > 0, v / penalty, v * penalty), -F32_MAX, F32_MAX)
    return out

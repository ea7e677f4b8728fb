"""numpy reference implementations of the `ressformer` ops (domain version 1).

Each function follows docs/custom_ops.md exactly and is written for clarity, not speed: it
computes in float64 and returns arrays of the input's float type (indices as int64). Pass
float64 inputs to get the float64 result itself (every float16/float32 value is exact in float64).

Deliberately independent of the production kernels (ressformer/ops.py, export/ops.py): no
max-shift clamp (−inf entries are simply left out of the threshold computation, which checks
that the clamp in the kernels is exact), and top-k selection by a stable sort. numpy only, so the
torch-free runtime package can use it too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["entmax15", "sparsemax", "safe_softmax", "topk", "topk_route", "topk_attention",
           "NORMALIZERS", "effective_k"]


def _rows(x):
    """(float64 rows of shape (R, n), output dtype, original shape)."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("need at least one axis")
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    return x.astype(np.float64).reshape(-1, x.shape[-1]), out_dtype, x.shape


def _sort_desc(z):
    """Row-wise descending sort; ties keep index order; −inf last."""
    order = np.argsort(-z, axis=-1, kind="stable")
    return np.take_along_axis(z, order, axis=-1)


def sparsemax(x):
    """sparsemax along the last axis: y = max(x − τ, 0) with Σy = 1. A row of only −inf → 0."""
    rows, dt, shape = _rows(x)
    out = np.zeros_like(rows)
    for r, row in enumerate(rows):
        fin = row[row > -np.inf]
        if fin.size == 0:
            continue  # all −inf: zeros
        z = _sort_desc(fin - fin.max())
        rho = np.arange(1, z.size + 1)
        cs = np.cumsum(z)
        s = int(np.sum(1 + rho * z > cs))  # support size (>= 1; the condition is a prefix)
        tau = (cs[s - 1] - 1) / s
        out[r] = np.maximum(row - fin.max() - tau, 0)  # −inf entries give 0
    return out.reshape(shape).astype(dt)


def entmax15(x):
    """entmax-1.5 along the last axis (Peters et al., 2019): y = max(x/2 − τ, 0)² with Σy = 1.

    A row of only −inf → 0."""
    rows, dt, shape = _rows(x)
    out = np.zeros_like(rows)
    for r, row in enumerate(rows):
        fin = row[row > -np.inf] / 2
        if fin.size == 0:
            continue
        mx = fin.max()
        z = _sort_desc(fin - mx)
        rho = np.arange(1, z.size + 1)
        mean = np.cumsum(z) / rho
        mean_sq = np.cumsum(z * z) / rho
        ss = rho * (mean_sq - mean * mean)
        tau = mean - np.sqrt(np.maximum((1 - ss) / rho, 0))
        s = int(np.sum(tau <= z))  # support size (>= 1)
        out[r] = np.maximum(row / 2 - mx - tau[s - 1], 0) ** 2
    return out.reshape(shape).astype(dt)


def safe_softmax(x):
    """softmax along the last axis; a row of only −inf → 0 (not NaN)."""
    rows, dt, shape = _rows(x)
    out = np.zeros_like(rows)
    for r, row in enumerate(rows):
        if not np.any(row > -np.inf):
            continue
        e = np.exp(row - row.max())
        out[r] = e / e.sum()
    return out.reshape(shape).astype(dt)


NORMALIZERS = {"entmax15": entmax15, "sparsemax": sparsemax, "softmax": safe_softmax}


def topk(x, k):
    """(values, indices) of the k largest along the last axis, descending; ties: lower index first."""
    x = np.asarray(x)
    order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, order, axis=-1), order.astype(np.int64)


def effective_k(top_k: int, n: int) -> int:
    """TopKAttention's k: top_k <= 0 selects all n keys, otherwise min(top_k, n)."""
    return n if top_k <= 0 else min(top_k, n)


def topk_route(logits, k: int):
    """(gates, experts): the k largest logits per row (ties: lower index), gates = safe softmax
    over the selected logits. Requires 1 <= k <= number of experts."""
    logits = np.asarray(logits)
    n = logits.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"TopKRoute needs 1 <= k <= {n}, got k={k}")
    val, idx = topk(logits, k)
    return safe_softmax(val), idx


def topk_attention(q, k, v, mask, top_k: int, normalizer: str, scale: float):
    """(out, idx, w) of `ressformer::TopKAttention`.

    q (B, H, T, D); k, v (B, H, N, D); mask (T, N) bool (True = candidate). Scores
    S = (q k^T) * scale with `scale` rounded to float32 (an ONNX FLOAT attribute), masked
    entries −inf. idx: the kk = effective_k(top_k, N) largest scores per query, descending, ties
    to the lower index (masked keys fill up when fewer than kk candidates exist; they get weight
    0); w = normalizer(selected scores); out = Σ_j w_j v[idx_j]. A query with no candidate gets
    w = 0 and out = 0.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; known: {sorted(NORMALIZERS)}")
    q, k, v = (np.asarray(t) for t in (q, k, v))
    dt = q.dtype
    mask = np.asarray(mask, dtype=bool)
    n = k.shape[-2]
    if n < 1:
        raise ValueError("TopKAttention needs at least one key")
    kk = effective_k(top_k, n)
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
    s = s * float(np.float32(scale))
    s = np.where(mask, s, -np.inf)
    val, idx = topk(s, kk)  # (B, H, T, kk)
    w = NORMALIZERS[normalizer](val)  # float64 in, float64 out
    vsel = np.take_along_axis(v.astype(np.float64)[..., None, :, :],  # (B, H, 1, N, D)
                              idx[..., None], axis=-2)  # (B, H, T, kk, D)
    out = np.einsum("bhtk,bhtkd->bhtd", w, vsel)
    return out.astype(dt), idx, w.astype(dt)

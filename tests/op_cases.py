"""Shared inputs and tolerances for tests/test_ops.py (PyTorch) and tests/test_onnx_ops.py (ONNX).

numpy only. Every generator is seeded, so each test sees the same data on every run.
"""

from __future__ import annotations

import numpy as np

K = 8  # top_k used by the tests (the "tiny" config's); lengths around it probe the clamp
LENGTHS = (1, K - 1, K, K + 1, 4096)
SCALES = (1e-5, 1e-2, 1.0, 1e2, 1e4)
NORMALIZERS = ("entmax15", "sparsemax", "softmax")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F16, F32, F64)

# Absolute tolerance on probabilities (outputs in [0, 1]) against the float64 reference run on
# the same (exactly representable) inputs. float16: storage + arithmetic rounding of the sort-based
# threshold over rows of up to 4096 (measured worst 1.5e-3 for entmax15 at 4096, see bench).
ATOL = {F16: 4e-3, F32: 2e-6, F64: 1e-12}


def normalizer_rows(n: int, dtype, seed: int = 0) -> np.ndarray:
    """(9, n) rows: normal noise at each of SCALES, a row with -inf entries, a row of only -inf,
    a row with ties (rounded normals) and a constant row."""
    rng = np.random.default_rng(seed + n)
    rows = [np.clip(rng.standard_normal(n), -4, 4) * s for s in SCALES]  # fits float16 at 1e4
    r = rng.standard_normal(n)
    r[rng.random(n) < 0.4] = -np.inf
    r[rng.integers(n)] = 0.5  # at least one finite entry
    rows.append(r)
    rows.append(np.full(n, -np.inf))
    rows.append(np.round(rng.standard_normal(n)))
    rows.append(np.full(n, 3.0))
    return np.stack(rows).astype(dtype)


ALL_MASKED_ROW = 6  # index of the only -inf row in normalizer_rows


def attention_inputs(n: int, dtype, *, t: int = 6, grid: bool = True, seed: int = 0, b: int = 1,
                     h: int = 2):
    """q (b, h, t, d), k, v (b, h, n, d), mask (t, n), scale.

    grid=True: q, k on a grid of multiples of 1/4 in [-1, 1] with d = 4 and scale 0.5, so every
    score is exact in float16/32/64 (the top-k choice cannot depend on rounding, and ties are
    frequent). grid=False: standard normals, d = 16, scale 1/sqrt(d) (float64 tests only).
    The mask is causal aligned to the end (key j visible to query i iff j <= i + n - t), with
    random holes; query 1 (if any) sees no key at all.
    """
    rng = np.random.default_rng(seed + 7 * n)
    if grid:
        d, scale = 4, 0.5
        q = rng.integers(-4, 5, (b, h, t, d)) / 4
        k = rng.integers(-4, 5, (b, h, n, d)) / 4
    else:
        d = 16
        scale = 1 / np.sqrt(d)
        q, k = rng.standard_normal((b, h, t, d)), rng.standard_normal((b, h, n, d))
    v = rng.standard_normal((b, h, n, d))
    i, j = np.arange(t)[:, None], np.arange(n)[None, :]
    mask = (j <= i + n - t) & (rng.random((t, n)) > 0.2)
    diag = np.arange(t) + n - t  # the newest key each query may see: keep it, if any
    mask[np.arange(t)[diag >= 0], diag[diag >= 0]] = True
    if t > 1:
        mask[1] = False
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, float(scale))


def route_logits(e: int, dtype, seed: int = 0) -> np.ndarray:
    """(6, e) router logits: normals, ties, a constant row, -inf entries, a row of only -inf."""
    rng = np.random.default_rng(seed + e)
    rows = [rng.standard_normal(e), rng.standard_normal(e) * 30, np.round(rng.standard_normal(e)),
            np.full(e, 1.5)]
    r = rng.standard_normal(e)
    r[rng.random(e) < 0.5] = -np.inf
    rows.append(r)
    rows.append(np.full(e, -np.inf))
    return np.stack(rows).astype(dtype)


def support_mismatch(y, ref, atol: float) -> np.ndarray:
    """Entries where y and the reference disagree on exact zero and either exceeds atol.

    float32/64 get atol = 0 (supports identical); float16 may flip entries within its tolerance."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return ((y == 0) != (ref == 0)) & ((np.abs(y) > atol) | (np.abs(ref) > atol))

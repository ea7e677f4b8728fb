"""The C kernels of ressformer/native.c for CPU training: exact top-k selection (ONNX TopK's order,
no tie repair needed), entmax-1.5 of the sorted top-k values, the top-k attention's output and backward
from the selection alone, and the structural loss's index matching.

Compiled on first use with the system's C compiler (`cc`, or $CC; no PyTorch headers, well under a
second), cached under $RESSFORMER_CACHE or ~/.cache/ressformer by the source's hash, loaded with
ctypes (calls release the GIL, so rows are split over torch's intra-op thread count). Where there is
no compiler the callers use their PyTorch paths, which give the same results (tests compare both).
RESSFORMER_NATIVE=0 turns the kernels off; =1 makes a failure to build them an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
ENABLED: bool | None = {"0": False, "1": True}.get(os.environ.get("RESSFORMER_NATIVE", ""))
ERROR: str | None = None  # why the kernels could not be built (then the PyTorch paths run)
_LIB: ctypes.CDLL | None = None
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RESSFORMER_CACHE") or Path.home() / ".cache" / "ressformer")
    so = cache / f"native-{tag}.so"
    try:
        lib = ctypes.CDLL(str(so))
    except OSError:  # not built yet (or a damaged file): build, then load
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".native-", suffix=".so", dir=cache)
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}") from None
            os.replace(tmp, so)  # atomic: a concurrent or interrupted build never leaves half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        lib = ctypes.CDLL(str(so))
    for name, argtypes in _SIGNATURES.items():
        for fn in ([name] if name == "match_rows" else [f"{name}_f32", f"{name}_f64"]):
            getattr(lib, fn).argtypes = argtypes
    return lib


_SIGNATURES = {  # native.c's functions (float ones as _f32 and _f64): pointers _P, int64 _I
    "topk": [_P, _I, _I, _I, _P, _P],
    "entmax15_sorted": [_P, _I, _I, _P],
    "attn_out": [_P, _P, _P, _I, _I, _I, _I, _I, _P],
    "attn_dw": [_P, _P, _P, _I, _I, _I, _I, _I, _P],
    "attn_grads": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P],
    "match_rows": [_P, _P, _I, _I, _I, _P],
}


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None where they are off or cannot be built."""
    global _LIB, ERROR
    if ENABLED is False or (ERROR is not None and not ENABLED):
        return None
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                try:
                    _LIB = _build()
                except Exception as e:  # no compiler, read-only home, ...: the PyTorch paths
                    ERROR = f"{type(e).__name__}: {e}"
                    if ENABLED:
                        raise
                    warnings.warn(f"ressformer: the C kernels are unavailable ({ERROR}); PyTorch code runs "
                                  "instead (the same results, slower training on a CPU)", RuntimeWarning, stacklevel=3)
                    return None
    return _LIB


def _split(fn, rows: int, work: int) -> None:
    """fn(r0, r1) over row ranges, on torch's intra-op thread count where there is enough work."""
    global _POOL
    n = min(torch.get_num_threads(), rows, max(1, work // 200_000))
    if n <= 1:
        fn(0, rows)
        return
    if _POOL is None or _POOL._max_workers < n:
        _POOL = ThreadPoolExecutor(n, thread_name_prefix="ressformer-native")
    step = -(-rows // n)
    for f in [_POOL.submit(fn, r, min(r + step, rows)) for r in range(0, rows, step)]:
        f.result()


ROWS = object()  # _call's placeholder for a block's row count


def _call(name: str, dtype, rows: int, work: int, error: str, *args) -> None:
    """The C function `name` (+ _f32/_f64 for a float dtype) over blocks of `rows` rows, split across
    threads: an argument (tensor, n) passes the block's pointer, n elements a row; ROWS the block's row
    count; anything else as is. A nonzero return raises ValueError(error)."""
    fn = getattr(_LIB, name if dtype is None else f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")

    def block(r0, r1):
        if r1 > r0 and fn(*(r1 - r0 if a is ROWS else a[0].data_ptr() + r0 * a[1] * a[0].element_size()
                            if isinstance(a, tuple) else a for a in args)):
            raise ValueError(error)

    _split(block, rows, work)


def usable(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in ts) and lib() is not None


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (..., n) float32/float64 on a CPU -> (values, indices) (..., k), like `x.topk(k)` with ties
    toward the lower index; None where the kernel does not apply (dtype, device, k, no compiler)."""
    n = x.shape[-1]
    if x.dtype not in (torch.float32, torch.float64) or not 0 < k <= n or not usable(x):
        return None
    x = x.detach().contiguous()
    rows = x.numel() // n
    val = x.new_empty((*x.shape[:-1], k))
    idx = torch.empty((*x.shape[:-1], k), dtype=torch.long)
    _call("topk", x.dtype, rows, rows * n, f"topk: k={k} out of range for rows of {n}",
          (x, n), ROWS, n, k, (val, k), (idx, k))
    return val, idx


def entmax15_sorted(x: torch.Tensor) -> torch.Tensor | None:
    """entmax-1.5 along the last axis of rows sorted descending (float32/float64 on a CPU), as
    ops.entmax15_kernel(x, presorted=True) computes it (the same operations; torch's vectorized sqrt
    is not correctly rounded, so the results may differ in the last bit). None where it does not apply."""
    k = x.shape[-1]
    if x.dtype not in (torch.float32, torch.float64) or k < 1 or not usable(x):
        return None
    x = x.detach().contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // k
    _call("entmax15_sorted", x.dtype, rows, rows * k * 8, "entmax15_sorted: out of memory", (x, k), ROWS, k, (y, k))
    return y


def attention_out(w: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """out (..., t, D) = sum_j w[..., j] v[..., idx[..., j], :] for w, idx (..., t, k) and v (..., N, D) of
    the same leading shape, float32/float64 on a CPU (no n-wide rows); None where it does not apply."""
    lead, (t, kk), (N, D) = w.shape[:-2], w.shape[-2:], v.shape[-2:]
    if (w.dtype not in (torch.float32, torch.float64) or v.dtype != w.dtype or v.shape[:-2] != lead
            or idx.shape != w.shape or not usable(w)):
        return None
    w, v, idx = w.detach().contiguous(), v.detach().contiguous(), idx.contiguous()
    out = w.new_zeros((*lead, t, D))
    heads = w.numel() // max(t * kk, 1)
    if t * kk:  # blocks of heads
        _call("attn_out", w.dtype, heads, heads * t * kk * D, f"attention: a selected index outside [0, {N})",
              (w, t * kk), (v, N * D), (idx, t * kk), ROWS, t, N, kk, D, (out, t * D))
    return out


def attention_backward(q, k, v, idx, w, d_out, d_w, vjp, scale: float):
    """ops.topk_attention_backward's sums from the selection alone, per head and query over its k keys
    (no n-wide rows): q, d_out (..., T, D), k, v (..., N, D) with the same leading shape, idx, w,
    d_w (..., T, k), float32/float64 on a CPU; vjp(w, dw) the normalizer's. (dq, dk, dv), or None
    where the kernel does not apply."""
    lead, (T, D), N, kk = q.shape[:-2], q.shape[-2:], k.shape[-2], idx.shape[-1]
    ts = (q, k, v, w, d_out)
    if (q.dtype not in (torch.float32, torch.float64) or any(t.dtype != q.dtype for t in ts)
            or k.shape[:-2] != lead or v.shape != k.shape or idx.shape[:-1] != (*lead, T) or not usable(q)):
        return None
    q, k, v, idx, w, d_out = (t.detach().contiguous() for t in (q, k, v, idx, w, d_out))
    heads, work = q.numel() // max(T * D, 1), q.numel() * kk  # blocks of heads
    error = f"attention backward: a selected index outside [0, {N})"
    dw = torch.empty_like(w)
    _call("attn_dw", q.dtype, heads, work, error, (d_out, T * D), (v, N * D), (idx, T * kk), ROWS, T, N, kk, D,
          (dw, T * kk))
    if d_w is not None:
        dw += d_w
    ds = (vjp(w, dw) * scale).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _call("attn_grads", q.dtype, heads, 3 * work, error, (ds, T * kk), (w, T * kk), (q, T * D), (d_out, T * D),
          (k, N * D), (idx, T * kk), ROWS, T, N, kk, D, (dq, T * D), (dk, N * D), (dv, N * D))
    return dq, dk, dv


def match(idx_a: torch.Tensor, idx_b: torch.Tensor, n: int) -> torch.Tensor | None:
    """idx_a, idx_b (..., k) int64, distinct indices in [0, n) per row -> pos (..., k): the slot of
    idx_a's row holding idx_b[..., j], or k where it holds none. None where the kernel does not apply."""
    if idx_a.shape != idx_b.shape or idx_a.dtype != torch.long or idx_b.dtype != torch.long or not usable(idx_a):
        return None
    k = idx_a.shape[-1]
    a, b = idx_a.contiguous(), idx_b.contiguous()
    rows = a.numel() // max(k, 1)
    pos = torch.empty_like(a)
    if k:
        _call("match_rows", None, rows, rows * k * 8, f"match: an index outside [0, {n})",
              (a, k), (b, k), ROWS, k, n, (pos, k))
    return pos

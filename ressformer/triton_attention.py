"""Fused top-k attention for CUDA in Triton: forward and backward (issue 13).

The same function as `ops.topk_attention_kernel`, in two kernels, one program per (batch x head,
block of BLOCK_M queries):

* forward: scores tile by tile (`tl.dot`, BLOCK_N = KP keys), masked to -inf; each score packed with its
  key index into one int64 sort key (order-preserving integer image of the float32 score in the
  high half, 2^32 - 1 - index in the low half), so a running `tl.topk` over [best so far, tile]
  keeps the top KP keys ordered by score, ties to the lower index (ONNX TopK's rule, the PyTorch
  kernel's); then entmax-1.5 / sparsemax / softmax on the k sorted values (cumsum threshold, no
  sort) and the weighted sum of the k selected value rows. Nothing of size T x N is stored.
* backward: from the saved indices and weights only: the selected key/value rows gathered, the
  closed-form normalizer backward on the k weights, dq written; dk/dv either accumulated with
  float32 (float64) atomic adds at the selected rows (`gather`, the default), or (`tiles`, issue 22)
  without atomics: the first kernel stores the score gradients ds (T x k), a second kernel runs one
  program per block of BLOCK_N keys over the blocks of queries, expands the (query, slot) pairs
  that picked one of its keys into dense (BLOCK_M x BLOCK_N) tiles of ds and w, and multiplies them
  with `tl.dot` (dK += dSᵀ Q, dV += Wᵀ dO; TF32 tensor cores for half inputs, IEEE float32 for
  float32): the same sums on every run (atomics add in any order). Query blocks without a pick in
  the key block are skipped. Chosen by `BACKWARD` (env RESSFORMER_TRITON_BACKWARD=gather|tiles);
  float64 always takes `gather`.

Scores are computed like the PyTorch kernel (float32 products, then `* scale`; half inputs are
rounded to their dtype at the same two points), so equal inputs give the same selection unless
two scores differ by less than the rounding of their sums. The forward needs a 32-bit score to
pack: float32/bfloat16/float16; float64 runs the PyTorch forward and this backward.

Runs on a CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NORM_ID = {"entmax15": 0, "sparsemax": 1, "softmax": 2}
MAX_KP = 128  # larger selections (e.g. top_k = 0 over long contexts) use the PyTorch kernel
BLOCK_M = 16
BLOCK_N = 32  # keys per program of the `tiles` backward's dk/dv kernel
BACKWARDS = ("gather", "tiles")
BACKWARD = os.environ.get("RESSFORMER_TRITON_BACKWARD", "gather")
if BACKWARD not in BACKWARDS:
    raise ValueError(f"RESSFORMER_TRITON_BACKWARD={BACKWARD!r}: use one of {', '.join(BACKWARDS)}")
HAS_TOPK = hasattr(tl, "topk")  # Triton >= 3.3 or so; else a sort of the merged candidates


@triton.jit
def _to_key(s, cols, N):
    """float32 scores (M, BN) and their key indices (BN,) -> int64 keys, larger = preferred."""
    b = (s + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 and 0.0 tie, as they compare equal
    o = b ^ ((b >> 31) & 0x7FFFFFFF)  # order-preserving: signed integer order == float order
    low = 4294967295 - cols.to(tl.int64)  # lower index -> larger key among equal scores
    key = (o.to(tl.int64) << 32) | low[None, :]
    return tl.where((cols < N)[None, :], key, -9223372036854775807 - 1)


@triton.jit
def _normalize(val, live, NORM: tl.constexpr, KP: tl.constexpr):
    """The normalizer on rows of values sorted descending (M, KP); entries not live count as -inf."""
    val = tl.where(live, val, float("-inf"))
    valid = tl.max(val, axis=1) > float("-inf")  # (M,): the row has a candidate
    rho = (tl.arange(0, KP) + 1).to(tl.float32)[None, :]
    if NORM == 2:  # softmax
        mx = tl.where(valid, tl.max(val, axis=1), 0.0)
        e = tl.exp(val - mx[:, None])
        y = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    else:
        z = val * 0.5 if NORM == 0 else val
        mx = tl.where(valid, tl.max(z, axis=1), 0.0)
        z = tl.maximum(z - mx[:, None], -2.0)  # the floor: exact (see ops._FLOOR)
        if NORM == 0:  # entmax-1.5
            mean = tl.cumsum(z, axis=1) / rho
            mean_sq = tl.cumsum(z * z, axis=1) / rho
            delta = tl.maximum((1 - rho * (mean_sq - mean * mean)) / rho, 0.0)
            tau = mean - tl.sqrt(delta)
            cond = tau <= z
        else:  # sparsemax
            cs = tl.cumsum(z, axis=1) - 1
            cond = rho * z > cs
            tau = cs / rho
        run = tl.sum((tl.cumsum((cond == 0).to(tl.int32), axis=1) == 0).to(tl.int32), axis=1)  # >= 1
        tau_star = tl.sum(tl.where(rho == run.to(tl.float32)[:, None], tau, 0.0), axis=1)
        y = tl.maximum(z - tau_star[:, None], 0.0)
        if NORM == 0:
            y = y * y
    return tl.where(valid[:, None] & live, y, 0.0)


@triton.jit
def _fwd_kernel(Q, K, V, MASK, OUT, IDX, W, T, N, scale,
                D: tl.constexpr, DP: tl.constexpr, KK: tl.constexpr, KP: tl.constexpr,
                BLOCK_M: tl.constexpr, NORM: tl.constexpr, ROUND: tl.constexpr, HAS_TOPK: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dc = tl.arange(0, DP)
    rmask = rows < T
    q = tl.load(Q + bh * T * D + rows[:, None] * D + dc[None, :], mask=rmask[:, None] & (dc < D)[None, :], other=0.0)
    best = tl.full((BLOCK_M, KP), -9223372036854775807 - 1, tl.int64)
    for n0 in range(0, N, KP):
        cols = n0 + tl.arange(0, KP)
        kt = tl.load(K + bh * N * D + cols[:, None] * D + dc[None, :], mask=(cols < N)[:, None] & (dc < D)[None, :],
                     other=0.0)
        if ROUND:  # half inputs are exact in TF32: tensor-core products, float32 sums (as cuBLAS)
            s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="tf32")  # (M, KP)
        else:  # float32: exact float32 products and sums (no TF32)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        if ROUND:  # half inputs: the matmul's result and the scaled score are rounded to the dtype
            s = (s.to(Q.dtype.element_ty).to(tl.float32) * scale).to(Q.dtype.element_ty).to(tl.float32)
        else:
            s = s * scale
        m = tl.load(MASK + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & (cols < N)[None, :], other=0)
        s = tl.where(m != 0, s, float("-inf"))
        both = tl.reshape(tl.join(best, _to_key(s, cols, N)), (BLOCK_M, 2 * KP))
        if HAS_TOPK:
            best = tl.topk(both, KP, dim=1)
        else:  # older Triton: sort all 2 KP, keep the first half
            srt = tl.reshape(tl.sort(both, dim=1, descending=True), (BLOCK_M, 2, KP))
            best, _ = tl.split(tl.permute(srt, (0, 2, 1)))
    o = (best >> 32).to(tl.int32)
    val = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # (M, KP), sorted descending
    idx = 4294967295 - (best & 4294967295)
    slot = tl.arange(0, KP)
    live = (slot < KK)[None, :] & (idx < N)
    w = _normalize(val, live, NORM, KP)
    if ROUND:
        w = w.to(Q.dtype.element_ty).to(tl.float32)
    idx = tl.where(live, idx, 0)
    vr = tl.load(V + bh * N * D + idx[:, :, None] * D + dc[None, None, :],
                 mask=live[:, :, None] & rmask[:, None, None] & (dc < D)[None, None, :], other=0.0)
    out = tl.sum(w[:, :, None] * vr.to(tl.float32), axis=1)  # (M, DP)
    tl.store(OUT + bh * T * D + rows[:, None] * D + dc[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & (dc < D)[None, :])
    sel = rmask[:, None] & (slot < KK)[None, :]
    tl.store(IDX + bh * T * KK + rows[:, None] * KK + slot[None, :], idx, mask=sel)
    tl.store(W + bh * T * KK + rows[:, None] * KK + slot[None, :], w.to(W.dtype.element_ty), mask=sel)


@triton.jit
def _bwd_kernel(Q, K, V, IDX, W, DO, DW, DQ, DK, DV, DS, T, N, scale,
                D: tl.constexpr, DP: tl.constexpr, KK: tl.constexpr, KP: tl.constexpr,
                BLOCK_M: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, ATOMIC: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dc = tl.arange(0, DP)
    slot = tl.arange(0, KP)
    rmask = rows < T
    rd = rmask[:, None] & (dc < D)[None, :]
    sel = rmask[:, None] & (slot < KK)[None, :]
    at = rows[:, None] * KK + slot[None, :]
    idx = tl.load(IDX + bh * T * KK + at, mask=sel, other=0)
    w = tl.load(W + bh * T * KK + at, mask=sel, other=0.0).to(ACC)
    dw = tl.load(DW + bh * T * KK + at, mask=sel, other=0.0).to(ACC)
    q = tl.load(Q + bh * T * D + rows[:, None] * D + dc[None, :], mask=rd, other=0.0).to(ACC)
    go = tl.load(DO + bh * T * D + rows[:, None] * D + dc[None, :], mask=rd, other=0.0).to(ACC)
    rows3 = idx[:, :, None] * D + dc[None, None, :]
    m3 = sel[:, :, None] & (dc < D)[None, None, :]
    vr = tl.load(V + bh * N * D + rows3, mask=m3, other=0.0).to(ACC)  # (M, KP, DP)
    dwt = dw + tl.sum(vr * go[:, None, :], axis=2)  # dL/dw
    if NORM == 0:  # entmax-1.5: g = sqrt(w)
        g = tl.sqrt(w)
        dx = dwt * g
        sg = tl.sum(g, axis=1)  # 0 on a row without candidates: then every gradient is 0
        ds = dx - (tl.sum(dx, axis=1) / tl.where(sg > 0, sg, 1.0))[:, None] * g
    elif NORM == 1:  # sparsemax
        supp = (w > 0).to(ACC)
        v_hat = tl.sum(dwt * supp, axis=1) / tl.maximum(tl.sum(supp, axis=1), 1.0)
        ds = supp * (dwt - v_hat[:, None])
    else:  # softmax
        ds = w * (dwt - tl.sum(dwt * w, axis=1)[:, None])
    ds = tl.where(sel, ds * scale, 0.0)
    kr = tl.load(K + bh * N * D + rows3, mask=m3, other=0.0).to(ACC)
    dq = tl.sum(ds[:, :, None] * kr, axis=1)
    tl.store(DQ + bh * T * D + rows[:, None] * D + dc[None, :], dq.to(DQ.dtype.element_ty), mask=rd)
    if ATOMIC:
        tl.atomic_add(DK + bh * N * D + rows3, ds[:, :, None] * q[:, None, :], mask=m3)
        tl.atomic_add(DV + bh * N * D + rows3, w[:, :, None] * go[:, None, :], mask=m3)
    else:  # dk/dv by _bwd_kv_kernel, from these ds
        tl.store(DS + bh * T * KK + at, ds.to(DS.dtype.element_ty), mask=sel)


@triton.jit
def _bwd_kv_kernel(Q, IDX, W, DS, DO, DK, DV, T, N,
                   D: tl.constexpr, DP: tl.constexpr, KK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dK/dV of BLOCK_N keys: over the query blocks, the picks of these keys as dense (M, BLOCK_N) tiles
    of ds and w, times the queries' q and dO (`tl.dot`); no atomics."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dc = tl.arange(0, DP)
    acc_k = tl.zeros((BLOCK_N, DP), tl.float32)
    acc_v = tl.zeros((BLOCK_N, DP), tl.float32)
    for m0 in range(0, T, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < T
        dsp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        wp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        hits = 0
        for j in tl.static_range(KK):  # slot by slot: (M, BLOCK_N) registers, not (M, KK, BLOCK_N)
            at = bh * T * KK + rows * KK + j
            i = tl.load(IDX + at, mask=rmask, other=-1)
            hit = i[:, None] == cols[None, :]
            hits += tl.sum(hit.to(tl.int32))
            dsp += tl.where(hit, tl.load(DS + at, mask=rmask, other=0.0).to(tl.float32)[:, None], 0.0)
            wp += tl.where(hit, tl.load(W + at, mask=rmask, other=0.0).to(tl.float32)[:, None], 0.0)
        if hits > 0:
            rd = rmask[:, None] & (dc < D)[None, :]
            q = tl.load(Q + bh * T * D + rows[:, None] * D + dc[None, :], mask=rd, other=0.0)
            go = tl.load(DO + bh * T * D + rows[:, None] * D + dc[None, :], mask=rd, other=0.0)
            # PRECISION "ieee" for float32 inputs (exact float32 products and sums), "tf32" for half
            # inputs (exact in TF32: tensor-core tiles, float32 sums; ds and w keep 10 bits)
            acc_k += tl.dot(tl.trans(dsp), q.to(tl.float32), input_precision=PRECISION)
            acc_v += tl.dot(tl.trans(wp), go.to(tl.float32), input_precision=PRECISION)
    kd = (cols < N)[:, None] & (dc < D)[None, :]
    tl.store(DK + bh * N * D + cols[:, None] * D + dc[None, :], acc_k.to(DK.dtype.element_ty), mask=kd)
    tl.store(DV + bh * N * D + cols[:, None] * D + dc[None, :], acc_v.to(DV.dtype.element_ty), mask=kd)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def supported(q, k, v, top_k: int, forward: bool = True) -> bool:
    """Shapes and dtypes these kernels take (else the caller uses the PyTorch kernel)."""
    T, N = q.shape[-2], k.shape[-2]
    kk = N if top_k <= 0 else min(top_k, N)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) + (() if forward else (torch.float64,))
    return (T > 0 and kk > 0 and _pow2(kk) <= MAX_KP and q.dtype in dtypes and q.dtype == k.dtype == v.dtype
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and N < 2**31)


def _flat(x):
    return x.contiguous().view(-1, *x.shape[-2:])  # (B*H, L, D)


def topk_attention_fwd(q, k, v, mask, top_k: int, normalizer: str, scale: float):
    """(out, idx, w) as `ops.topk_attention_kernel`; q (..., T, D), k/v (..., N, D), mask (T, N)."""
    T, N, D = q.shape[-2], k.shape[-2], q.shape[-1]
    kk = N if top_k <= 0 else min(top_k, N)
    KP = _pow2(kk, 16)  # tl.dot needs tiles of 16 or more; slots past kk are masked
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    BH = qf.shape[0]
    out = torch.empty_like(qf)
    idx = torch.empty((BH, T, kk), dtype=torch.int64, device=q.device)
    w = torch.empty((BH, T, kk), dtype=q.dtype, device=q.device)
    m8 = mask.to(device=q.device, dtype=torch.uint8).contiguous()
    grid = (BH, triton.cdiv(T, BLOCK_M))
    _fwd_kernel[grid](qf, kf, vf, m8, out, idx, w, T, N, float(scale), D=D, DP=_pow2(D, 16), KK=kk, KP=KP,
                      BLOCK_M=BLOCK_M, NORM=NORM_ID[normalizer], ROUND=q.dtype != torch.float32,
                      HAS_TOPK=HAS_TOPK)
    lead = q.shape[:-2]
    return out.view(q.shape), idx.view(*lead, T, kk), w.view(*lead, T, kk)


def topk_attention_bwd(q, k, v, idx, w, d_out, d_w, normalizer: str, scale: float, method: str | None = None):
    """(dq, dk, dv) as `ops.topk_attention_backward`, from the selection (idx, w) alone. method:
    gather | tiles (default `BACKWARD`; float64 always gather)."""
    method = method or BACKWARD
    if method not in BACKWARDS:
        raise ValueError(f"unknown backward {method!r}; use one of {', '.join(BACKWARDS)}")
    T, N, D = q.shape[-2], k.shape[-2], q.shape[-1]
    kk = idx.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    tiles = method == "tiles" and acc == torch.float32
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    BH = qf.shape[0]
    dq = torch.empty_like(qf)
    if tiles:  # ds (T x k, float32) for _bwd_kv_kernel; dk/dv written there, not accumulated
        ds = torch.empty((BH, T, kk), dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(kf), torch.empty_like(vf)
    else:
        ds = dq  # unused
        dk = torch.zeros(kf.shape, dtype=acc, device=q.device)
        dv = torch.zeros(vf.shape, dtype=acc, device=q.device)
    idx_f, w_f, do_f = _flat(idx), _flat(w), _flat(d_out)
    grid = (BH, triton.cdiv(T, BLOCK_M))
    DP = _pow2(D, 16) if tiles else _pow2(D, 2)  # tl.dot: tiles of 16 or more
    _bwd_kernel[grid](qf, kf, vf, idx_f, w_f, do_f, _flat(d_w), dq, dk, dv, ds, T, N, float(scale),
                      D=D, DP=DP, KK=kk, KP=_pow2(kk, 2),
                      BLOCK_M=BLOCK_M, NORM=NORM_ID[normalizer], ACC=tl.float64 if acc == torch.float64 else tl.float32,
                      ATOMIC=not tiles)
    if tiles:
        _bwd_kv_kernel[(BH, triton.cdiv(N, BLOCK_N))](qf, idx_f, w_f, ds, do_f, dk, dv, T, N, D=D, DP=DP, KK=kk,
                                                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
    return dq.view(q.shape), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)

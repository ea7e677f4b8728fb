"""The `ressformer` ops in PyTorch: entmax-1.5, sparsemax, top-k attention, top-k routing.

Layout follows deep-spin/entmax: a plain kernel (differentiable torch code), a
`torch.library.custom_op` with a closed-form or recomputing backward, and a functional entry
point that the model calls. Under `torch.onnx.export` the functional entry point emits one
`ressformer::<Op>` node (`torch.onnx.ops.symbolic`), whose body the exporter appends as an
ONNX FunctionProto (see export/ops.py and docs/custom_ops.md).
"""

from __future__ import annotations

import os

import torch

from . import native

DOMAIN = "ressformer"
OPSET_VERSION = 1  # version of the `ressformer` op domain; bump on any semantic change

# Relative (max-subtracted) inputs below this are clamped. Exact: entmax-1.5 (on x/2) and
# sparsemax both have tau >= max - 1, so anything at or below max - 1 is outside the support
# and never enters the threshold; clamping removes -inf/overflow without changing the result.
_FLOOR = -2.0


def _prepare(x: torch.Tensor, halve: bool):
    """Max-shift along the last axis, clamp to the floor, flag rows without any finite entry."""
    if halve:
        x = x / 2
    valid = torch.isfinite(x).any(-1, keepdim=True)  # (..., 1)
    mx = x.amax(-1, keepdim=True)
    mx = torch.where(valid, mx, torch.zeros_like(mx))
    z = (x - mx).clamp(min=_FLOOR)
    z = torch.nan_to_num(z, nan=_FLOOR)
    return z, valid


def _leading_run(cond: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True along the last axis, (..., 1) int64. The sort-based
    support conditions hold on a prefix exactly; rounding (float16 cumsums of long rows) can make
    later entries spuriously true, so count the run, not all True entries."""
    return (~cond).cumsum(-1).eq(0).sum(-1, keepdim=True)


def entmax15_kernel(x: torch.Tensor, presorted: bool = False) -> torch.Tensor:
    """Exact sort-based entmax-1.5 along the last axis (Peters et al., 2019). presorted: x is
    already sorted descending along the axis (top-k output): no sort, the same result."""
    z, valid = _prepare(x, halve=True)
    zs = z if presorted else torch.sort(z, dim=-1, descending=True)[0]
    n = z.shape[-1]
    rho = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(-1) / rho
    mean_sq = (zs * zs).cumsum(-1) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = ((1 - ss) / rho).clamp(min=0)
    tau = mean - delta.sqrt()
    support = _leading_run(tau <= zs)  # >= 1
    tau_star = tau.gather(-1, support - 1)
    y = (z - tau_star).clamp(min=0) ** 2
    return torch.where(valid, y, torch.zeros_like(y))


def sparsemax_kernel(x: torch.Tensor, presorted: bool = False) -> torch.Tensor:
    """Exact sort-based sparsemax along the last axis (Martins & Astudillo, 2016); presorted as
    for entmax15_kernel."""
    z, valid = _prepare(x, halve=False)
    zs = z if presorted else torch.sort(z, dim=-1, descending=True)[0]
    n = z.shape[-1]
    rho = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    cs = zs.cumsum(-1) - 1
    support = _leading_run(rho * zs > cs)  # >= 1
    tau = cs.gather(-1, support - 1) / support.to(z.dtype)
    y = (z - tau).clamp(min=0)
    return torch.where(valid, y, torch.zeros_like(y))


def softmax_kernel(x: torch.Tensor, presorted: bool = False) -> torch.Tensor:
    """Softmax along the last axis; a row with no finite entry gives zeros, not NaN."""
    valid = torch.isfinite(x).any(-1, keepdim=True)
    y = torch.softmax(torch.where(valid, x, torch.zeros_like(x)), dim=-1)
    return torch.where(valid, y, torch.zeros_like(y))


KERNELS = {"entmax15": entmax15_kernel, "sparsemax": sparsemax_kernel, "softmax": softmax_kernel}


# ---- custom ops with closed-form backward ---------------------------------------------------
def _no_autocast(x: torch.Tensor):
    """The custom ops compute in their inputs' dtype: CUDA autocast would otherwise run cumsum, pow
    and softmax inside the kernels in float32 and hand back float32 from bfloat16 inputs."""
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("ressformer::entmax15", mutates_args=())
def _entmax15_op(x: torch.Tensor) -> torch.Tensor:
    with _no_autocast(x):
        return entmax15_kernel(x).contiguous()  # contiguous, as the fake says (torch.compile)


@_entmax15_op.register_fake
def _(x):
    return x.new_empty(x.shape)


def _entmax15_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def entmax15_vjp(y, dy):
    """dL/dx of y = entmax15(x) from y alone (closed form): g = sqrt(y), dx = g dy - g (g.dy)/sum(g)."""
    g = y.sqrt()  # gppr
    dx = dy * g
    q = dx.sum(-1, keepdim=True) / g.sum(-1, keepdim=True).clamp(min=torch.finfo(y.dtype).tiny)
    return dx - q * g


def sparsemax_vjp(y, dy):
    """dL/dx of y = sparsemax(x): dy minus its mean over the support, zero off the support."""
    supp = (y > 0).to(dy.dtype)
    v_hat = (dy * supp).sum(-1, keepdim=True) / supp.sum(-1, keepdim=True).clamp(min=1)
    return supp * (dy - v_hat)


def softmax_vjp(y, dy):
    return y * (dy - (dy * y).sum(-1, keepdim=True))


VJPS = {"entmax15": entmax15_vjp, "sparsemax": sparsemax_vjp, "softmax": softmax_vjp}


def _entmax15_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return entmax15_vjp(y, dy)


_entmax15_op.register_autograd(_entmax15_backward, setup_context=_entmax15_setup)


@torch.library.custom_op("ressformer::sparsemax", mutates_args=())
def _sparsemax_op(x: torch.Tensor) -> torch.Tensor:
    with _no_autocast(x):
        return sparsemax_kernel(x).contiguous()


@_sparsemax_op.register_fake
def _(x):
    return x.new_empty(x.shape)


def _sparsemax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return sparsemax_vjp(y, dy)


_sparsemax_op.register_autograd(_sparsemax_backward, setup_context=_entmax15_setup)


# The normalizers as differentiated inside top-k attention: autograd through the sort-based
# kernels is wrong at the support's edge (d sqrt(delta) at delta = 0 is inf, and inf * 0 = NaN;
# seen as NaN losses after ~100 training steps), so use the closed-form backward.
_NORM_OPS = {"entmax15": _entmax15_op, "sparsemax": _sparsemax_op, "softmax": softmax_kernel}


# ---- top-k attention ------------------------------------------------------------------------
# None: branch-free tie handling on accelerators only. On a CPU, reading a tensor's value costs no
# device synchronisation, so the CPU skips the (rarely needed) repair when no row has a tie.
BRANCH_FREE: bool | None = None


def _branch_free(device: torch.device) -> bool:
    return BRANCH_FREE if BRANCH_FREE is not None else device.type != "cpu"


def topk_lower_index(x: torch.Tensor, k: int, branch_free: bool | None = None):
    """`x.topk(k, dim=-1)` (sorted, descending) with ties broken toward the lower index, as ONNX
    TopK specifies; torch.topk leaves the order (and which tied entries make the cut) unspecified.

    On a CPU (not branch-free) the C kernel of `ressformer.native` selects in that order directly
    where it is built (~2.4x torch.topk and its tie repair on a trained model's scores;
    `native.ENABLED = False` forces what follows, which gives the same results):

    Branch-free (`branch_free`, default: BRANCH_FREE, else off a CPU): every row takes the same
    path, no host synchronisation, no data-dependent shape, so a CUDA training step never waits
    on the host; on a CPU the repair runs only when some row has a tie (same result). Ties among
    -inf (masked) entries are broken toward the lower index too where repaired (their weight is 0
    either way). Values are gathered from `x`, so they stay differentiable.
    """
    n = x.shape[-1]
    if k == 0 or x.numel() == 0:
        return x.topk(k, dim=-1)
    if branch_free is None:
        branch_free = _branch_free(x.device)
    if not branch_free and not torch.compiler.is_compiling():
        got = native.topk(x, k)  # the C kernel: ONNX's order directly, no repair (float32/64 on a CPU)
        if got is not None:
            val, idx = got
            return (x.gather(-1, idx) if x.requires_grad else val), idx
    val, idx = x.topk(min(k + 1, n), dim=-1)  # one extra: does a tie straddle the cut?
    # a finite tie straddles the cut (NaN never ties; which -inf entries make it does not matter)
    bad = (val[..., k:k + 1] == val[..., k - 1:k]) & (val[..., k - 1:k] > float("-inf")) if k < n else None
    val, idx = val[..., :k], idx[..., :k]
    if not branch_free:
        tied = (val[..., 1:] == val[..., :-1]) & (val[..., 1:] > float("-inf"))
        if not bool(tied.any() if bad is None else tied.any() | bad.any()):
            return val, idx
    if bad is not None:
        # the slots holding the k-th value form the tail; on a bad row they take the lowest
        # indices among all entries equal to it: the r-th tail slot gets the r-th equal entry
        kth = val[..., -1:]
        rank = torch.arange(k, device=x.device) - (k - (val == kth).sum(-1, keepdim=True))  # (..., k)
        nth = torch.searchsorted((x == kth).cumsum(-1, dtype=torch.int32), (rank + 1).to(torch.int32))
        idx = torch.where(bad & (rank >= 0), nth.clamp(max=n - 1), idx)
    # ties inside the selection in index order: val is sorted, so number its runs of equal values
    # (g) and sort the key g n + index once
    val = x.gather(-1, idx)
    kt = torch.int32 if k * n < 2**31 else torch.int64
    g = torch.cat([torch.zeros_like(idx[..., :1], dtype=kt), (val[..., 1:] != val[..., :-1]).cumsum(-1, dtype=kt)], -1)
    idx = (g * n + idx.to(kt)).sort(dim=-1).values.remainder(n).long()
    return x.gather(-1, idx), idx


def topk_attention_kernel(q, k, v, mask, top_k: int, normalizer: str, scale: float, chunk: int = 0):
    """Per query: the top-k unmasked keys by score, normalized, weighted sum of values.

    q (B, H, T, D); k, v (B, H, N, D); mask (T, N) bool, True = candidate.
    Returns out (B, H, T, D), idx (B, H, T, k_eff) int64 and w (B, H, T, k_eff), k_eff =
    min(top_k, N) (top_k = 0: all N keys). Selected masked keys get weight 0; a query with no
    candidate gets zeros. Queries are processed `chunk` at a time (0 = all at once), so at most
    chunk x N scores are held.
    """
    T, N = q.shape[-2], k.shape[-2]
    kk = N if top_k <= 0 else min(top_k, N)
    norm = _NORM_OPS[normalizer]  # custom ops: their closed-form backward, also in the recompute
    chunk = chunk if chunk > 0 else max(T, 1)
    trim = not _branch_free(q.device)  # on a CPU: reading the mask costs no device sync
    q = q.contiguous()  # heads() gives a (B, T, H, D) view: BLAS multiplies it ~4x slower on a CPU
    outs, idxs, ws = [], [], []
    for s in range(0, T, chunk):
        qc, mc, kc, vc = q[..., s:s + chunk, :], mask[s:s + chunk], k, v
        if trim and kk < N:  # drop the trailing keys no query of the chunk may see (the causal tail):
            # they are -inf for every row, never picked before a candidate; ties keep index order
            n_c = max(kk, N - int(mc.any(0).flip(0).int().argmax()) if bool(mc.any()) else kk)
            mc, kc, vc = mc[:, :n_c], k[..., :n_c, :], v[..., :n_c, :]
        sc = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)  # (B, H, t, N); in place: one buffer
        sc.masked_fill_(~mc, float("-inf"))
        val, idx = topk_lower_index(sc, kk)  # sorted, descending, ties: lower index
        if val.requires_grad:  # autograd through the kernel (the reference path)
            w = norm(val)  # (B, H, t, kk)
            out = torch.matmul(torch.zeros_like(sc).scatter(-1, idx, w), vc)  # sparse weights as dense rows
        else:  # the custom op's forward: the normalizer on the sorted values; on a CPU in C
            w = native.entmax15_sorted(val) if normalizer == "entmax15" and trim else None
            w = KERNELS[normalizer](val, presorted=True) if w is None else w
            out = native.attention_out(w, v, idx) if trim else None  # C: the k rows, no n-wide row
            out = torch.matmul(sc.zero_().scatter_(-1, idx, w), vc) if out is None else out  # sc's buffer reused
        outs.append(out)
        idxs.append(idx)
        ws.append(w)
    if T == 0:
        shape = (*q.shape[:-2], 0)
        return q.new_zeros(q.shape), q.new_zeros((*shape, kk), dtype=torch.long), q.new_zeros((*shape, kk))
    return torch.cat(outs, -2), torch.cat(idxs, -2), torch.cat(ws, -2)


# The fused Triton kernels (ressformer/triton_attention.py): None = on CUDA when triton imports;
# True = wherever they support the inputs (on a CPU that needs TRITON_INTERPRET=1); False = never.
# (env RESSFORMER_TRITON=0/1 sets it at import)
TRITON: bool | None = {"0": False, "1": True}.get(os.environ.get("RESSFORMER_TRITON", ""))
TRITON_ERROR: str | None = None  # set (with a warning) if the kernels failed to build or run: PyTorch then


def _triton(q, k, v, top_k: int, forward: bool):
    """The Triton module if it should run these inputs, else None."""
    if TRITON is False or (TRITON is None and (q.device.type != "cuda" or TRITON_ERROR)):
        return None
    try:
        from . import triton_attention as ta
    except ImportError:  # triton not installed: the PyTorch kernel
        if TRITON:
            raise
        return None
    return ta if ta.supported(q, k, v, top_k, forward) else None


def _triton_failed(e: Exception) -> None:
    global TRITON_ERROR
    if TRITON:  # asked for explicitly: an error
        raise e
    TRITON_ERROR = f"{type(e).__name__}: {e}"
    import warnings

    warnings.warn(f"ressformer: the Triton top-k attention failed, using the PyTorch kernel: {TRITON_ERROR}",
                  RuntimeWarning, stacklevel=3)


@torch.library.custom_op("ressformer::topk_attention", mutates_args=())
def _topk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       top_k: int, normalizer: str, scale: float, chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad(), _no_autocast(q):
        ta = _triton(q, k, v, top_k, forward=True)
        if ta is not None:
            try:
                return ta.topk_attention_fwd(q, k, v, mask, top_k, normalizer, scale)
            except Exception as e:  # e.g. an older Triton without tl.topk: fall back, loudly
                _triton_failed(e)
        out, idx, w = topk_attention_kernel(q, k, v, mask, top_k, normalizer, scale, chunk)
    return out.contiguous(), idx.contiguous(), w.contiguous()


@_topk_attention_op.register_fake
def _(q, k, v, mask, top_k, normalizer, scale, chunk):
    N = k.shape[-2]
    kk = N if top_k <= 0 else min(top_k, N)
    shape = (*q.shape[:-1], kk)
    # contiguous like the kernel's torch.cat (empty_like would copy q's strides: a stride
    # mismatch under torch.compile, since q is usually a transposed view)
    return q.new_empty(q.shape), q.new_empty(shape, dtype=torch.long), q.new_empty(shape)


def _topk_attention_setup(ctx, inputs, output):
    q, k, v, mask, top_k, normalizer, scale, chunk = inputs
    _, idx, w = output
    ctx.save_for_backward(q, k, v, idx, w)  # O(T k) beyond the inputs: no scores, no mask
    ctx.args = (normalizer, scale, chunk)


def _rows(x, idx):
    """x (..., N, D) at idx (..., t, k) -> (..., t, k, D): the selected keys' (or values') rows."""
    t, kk = idx.shape[-2:]
    flat = idx.reshape(*idx.shape[:-2], t * kk, 1).expand(*idx.shape[:-2], t * kk, x.shape[-1])
    return x.gather(-2, flat).view(*idx.shape, x.shape[-1])


def _scatter_rows(acc, idx, src):
    """acc (..., N, D) += src (..., t, k, D) at the rows idx (..., t, k)."""
    t, kk, D = src.shape[-3:]
    flat = idx.reshape(*idx.shape[:-2], t * kk, 1).expand(*idx.shape[:-2], t * kk, D)
    acc.scatter_add_(-2, flat, src.reshape(*src.shape[:-3], t * kk, D).to(acc.dtype))


def topk_attention_backward(q, k, v, idx, w, d_out, d_w, normalizer: str, scale: float, chunk: int = 0,
                            gather: bool | None = None):
    """Backward of top-k attention from the forward's selection (idx) and weights (w) alone.

    out_i = sum_j w_ij v_idx(ij) and w_i = norm(scale q_i . k_idx(i)) over the k selected keys, so
    every gradient lives on the selected (query, key) pairs: the closed-form normalizer backward
    on the k weights, then dq, dk, dv from those pairs only. No scores are recomputed, no second
    top-k or sort; what is kept from the forward is O(T k). Masked or unselected keys get weight 0
    and so no gradient, as in autograd through the forward.

    Two layouts of the same sums, chunk queries at a time: `gather=True` gathers the selected
    key/value rows (chunk x k x D) and scatter-adds into dk/dv; `gather=False` scatters the k
    weights of each query into a chunk x N row block and runs dense matmuls (the forward's own
    layout, chunk x N like its scores). On a CPU the matmuls are ~4x faster while k D > N (the
    training shapes: k 32, D 32, N <= 416); gathering wins once N >> k D (long contexts).
    None: gather iff N > 2 k D. dk/dv accumulate in float32 for half inputs. On a CPU, for
    float32/float64 and gather None, the C kernels of `ressformer.native` compute the same sums per
    (query, selected key) pair instead, with no n-wide rows (3x the dense layout at `small`).
    """
    T, N, D = q.shape[-2], k.shape[-2], q.shape[-1]
    kk = idx.shape[-1]
    if gather is None and not _branch_free(q.device) and not torch.compiler.is_compiling():
        got = native.attention_backward(q, k, v, idx, w, d_out, d_w, VJPS[normalizer], scale)  # C, on a CPU
        if got is not None:
            return got
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    qx, kx, vx = (t.contiguous().expand(*lead, *t.shape[-2:]) for t in (q, k, v))  # contiguous: see the forward
    d_out = d_out.contiguous()
    # not while torch.compile traces this backward: the traced graph would keep one chunk's width
    trim = not _branch_free(q.device) and not torch.compiler.is_compiling()
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    gather = N > 2 * kk * D if gather is None else gather
    dq = torch.empty((*lead, T, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros(kx.shape, dtype=acc, device=q.device)
    dv = torch.zeros(vx.shape, dtype=acc, device=q.device)
    vjp = VJPS[normalizer]
    chunk = chunk if chunk > 0 else max(T, 1)
    for s in range(0, T, chunk):
        sl = slice(s, s + chunk)
        ic, wc, go, qc = idx[..., sl, :], w[..., sl, :], d_out[..., sl, :], qx[..., sl, :]  # (.., t, k|D)
        if gather:
            dwc = d_w[..., sl, :] + (_rows(vx, ic) @ go.unsqueeze(-1)).squeeze(-1)  # dL/dw (.., t, k)
            _scatter_rows(dv, ic, wc.unsqueeze(-1) * go.unsqueeze(-2))  # dv[idx] += w d_out
            ds = vjp(wc, dwc) * scale  # dL/dscore of the selected keys (.., t, k)
            dq[..., sl, :] = (ds.unsqueeze(-2) @ _rows(kx, ic)).squeeze(-2)
            _scatter_rows(dk, ic, ds.unsqueeze(-1) * qc.unsqueeze(-2))  # dk[idx] += ds q
        else:  # on a CPU only the keys up to the last one selected (the chunk's causal tail is not)
            n = int(ic.max()) + 1 if trim and ic.numel() else N
            kc, vc = kx[..., :n, :], vx[..., :n, :]
            dwc = d_w[..., sl, :] + (go @ vc.transpose(-1, -2)).gather(-1, ic)  # (.., t, k)
            ds = vjp(wc, dwc) * scale
            rows = (*ic.shape[:-1], n)
            dense_w = wc.new_zeros(rows).scatter_(-1, ic, wc)  # (.., t, n), zero off the selection
            dense_s = ds.new_zeros(rows).scatter_(-1, ic, ds)
            dv[..., :n, :] += (dense_w.transpose(-1, -2) @ go).to(acc)
            dq[..., sl, :] = dense_s @ kc
            dk[..., :n, :] += (dense_s.transpose(-1, -2) @ qc).to(acc)
    return (dq.sum_to_size(q.shape), dk.to(k.dtype).sum_to_size(k.shape), dv.to(v.dtype).sum_to_size(v.shape))


BACKWARD_GATHER: bool | None = None  # the backward's layout (topk_attention_backward's `gather`); None: by shape


def _topk_attention_backward(ctx, d_out, d_idx, d_w):
    q, k, v, idx, w = ctx.saved_tensors
    with _no_autocast(q):
        grads, ta = None, _triton(q, k, v, idx.shape[-1], forward=False)
        if ta is not None:
            try:
                grads = ta.topk_attention_bwd(q, k, v, idx, w, d_out, d_w, *ctx.args[:2])
            except Exception as e:
                _triton_failed(e)
        if grads is None:
            grads = topk_attention_backward(q, k, v, idx, w, d_out, d_w, *ctx.args, gather=BACKWARD_GATHER)
    dq, dk, dv = grads
    return dq, dk, dv, None, None, None, None, None


_topk_attention_op.register_autograd(_topk_attention_backward, setup_context=_topk_attention_setup)


# ---- top-k routing --------------------------------------------------------------------------
def topk_route_kernel(logits: torch.Tensor, k: int):
    """Top-k experts per token; gates = softmax over the selected logits (a row of only -inf
    gives zero gates). Ties: lower index."""
    val, idx = topk_lower_index(logits, k)
    return softmax_kernel(val), idx


@torch.library.custom_op("ressformer::topk_route", mutates_args=())
def _topk_route_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with _no_autocast(logits):
        gates, idx = topk_route_kernel(logits, k)
    return gates.contiguous(), idx.contiguous()


@_topk_route_op.register_fake
def _(logits, k):
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.long)


def _topk_route_setup(ctx, inputs, output):
    gates, idx = output
    ctx.save_for_backward(gates, idx)
    ctx.n, ctx.dtype = inputs[0].shape[-1], inputs[0].dtype


def _topk_route_backward(ctx, d_gates, d_idx):
    """d logits: the softmax VJP scattered back to the selected columns, in the logits' dtype (under
    torch.compile with bf16 autocast the incoming gradient may be bf16 while the gates are float32:
    inductor's scatter needs one dtype)."""
    gates, idx = ctx.saved_tensors
    g = softmax_vjp(gates, d_gates.to(gates.dtype))
    d = gates.new_zeros((*gates.shape[:-1], ctx.n), dtype=ctx.dtype)
    return d.scatter(-1, idx, g.to(ctx.dtype)), None


_topk_route_op.register_autograd(_topk_route_backward, setup_context=_topk_route_setup)


# ---- functional entry points (what the model calls) -----------------------------------------
def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def entmax15(x: torch.Tensor) -> torch.Tensor:
    if _exporting():
        return torch.onnx.ops.symbolic("ressformer::Entmax15", (x,), {}, dtype=x.dtype,
                                       shape=x.shape, version=OPSET_VERSION)
    return _entmax15_op(x)


def sparsemax(x: torch.Tensor) -> torch.Tensor:
    if _exporting():
        return torch.onnx.ops.symbolic("ressformer::Sparsemax", (x,), {}, dtype=x.dtype,
                                       shape=x.shape, version=OPSET_VERSION)
    return _sparsemax_op(x)


def topk_attention(q, k, v, mask, top_k: int, normalizer: str, scale: float, chunk: int = 0):
    """See `topk_attention_kernel`. Returns (out, idx, w)."""
    if _exporting():
        N = k.shape[-2]
        kk = N if top_k <= 0 else torch.sym_min(top_k, N)
        sel = (*q.shape[:-1], kk)
        return torch.onnx.ops.symbolic_multi_out(
            "ressformer::TopKAttention", (q, k, v, mask),
            {"top_k": int(top_k), "normalizer": normalizer, "scale": float(scale)},
            dtypes=(q.dtype, torch.int64, q.dtype), shapes=(q.shape, sel, sel), version=OPSET_VERSION)
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # e.g. bf16 q, fp32 cache
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return _topk_attention_op(q, k, v, mask, int(top_k), normalizer, float(scale), int(chunk))


def topk_attention_parts(q, ks, vs, mask, top_k: int, normalizer: str, scale: float, chunk: int = 0,
                         parts: bool | None = None):
    """`topk_attention` over keys/values given as parts along the key axis (memory, cache, the
    segment's buffer, the piece's own): the same numbers as over their concatenation. Under ONNX
    export (or parts=True) the parts are never concatenated: each part's scores are computed
    on its own and only the (B, H, T, N) scores are concatenated; the top-k runs over them (sorted,
    ties: lower index, so the concatenation's order decides ties as before), and the output sums
    the weights of each part's slice times that part's values. mask (T, N) over the concatenation."""
    if parts is None:
        parts = _exporting()
    if not parts:
        return topk_attention(q, torch.cat(ks, -2), torch.cat(vs, -2), mask, top_k, normalizer, scale, chunk)
    sc = torch.cat([torch.matmul(q, k.transpose(-1, -2)) for k in ks], -1) * scale  # (B, H, T, N)
    sc = sc + torch.where(mask, 0.0, float("-inf")).to(sc.dtype)  # additive 0/-inf bias, as TopKAttention
    N = sc.shape[-1]
    kk = N if top_k <= 0 else torch.sym_min(top_k, N)
    val, idx = sc.topk(kk, dim=-1) if _exporting() else topk_lower_index(sc, kk)  # ONNX TopK: ties to the lower index
    w = _sorted_normalizer(val, normalizer)
    dense = torch.zeros_like(sc).scatter(-1, idx, w)
    out = None
    for d, v in zip(dense.split([v.shape[-2] for v in vs], -1), vs):  # one Split node
        o = torch.matmul(d, v)
        out = o if out is None else out + o
    return out, idx, w


def _sorted_normalizer(val, normalizer: str):
    """The normalizer on TopK's sorted values: one `ressformer::<Op>Sorted` node under export."""
    if _exporting():
        name = {"entmax15": "Entmax15Sorted", "sparsemax": "SparsemaxSorted", "softmax": "SafeSoftmax"}[normalizer]
        return torch.onnx.ops.symbolic(f"ressformer::{name}", (val,), {}, dtype=val.dtype, shape=val.shape,
                                       version=OPSET_VERSION)
    return KERNELS[normalizer](val, presorted=True)


def topk_route(logits: torch.Tensor, k: int):
    """Returns (gates, experts), each (..., k)."""
    if _exporting():
        shape = (*logits.shape[:-1], k)
        return torch.onnx.ops.symbolic_multi_out(
            "ressformer::TopKRoute", (logits,), {"k": int(k)},
            dtypes=(logits.dtype, torch.int64), shapes=(shape, shape), version=OPSET_VERSION)
    return _topk_route_op(logits, int(k))

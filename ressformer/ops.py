"""The `ressformer` ops in PyTorch: entmax-1.5, sparsemax, top-k attention, top-k routing.

Layout follows deep-spin/entmax: a plain kernel (differentiable torch code), a
`torch.library.custom_op` with a closed-form or recomputing backward, and a functional entry
point that the model calls. Under `torch.onnx.export` the functional entry point emits one
`ressformer::<Op>` node (`torch.onnx.ops.symbolic`), whose body the exporter appends as an
ONNX FunctionProto (see export/ops.py and docs/custom_ops.md).
"""

from __future__ import annotations

import torch

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


def entmax15_kernel(x: torch.Tensor) -> torch.Tensor:
    """Exact sort-based entmax-1.5 along the last axis (Peters et al., 2019)."""
    z, valid = _prepare(x, halve=True)
    zs, _ = torch.sort(z, dim=-1, descending=True)
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


def sparsemax_kernel(x: torch.Tensor) -> torch.Tensor:
    """Exact sort-based sparsemax along the last axis (Martins & Astudillo, 2016)."""
    z, valid = _prepare(x, halve=False)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    n = z.shape[-1]
    rho = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    cs = zs.cumsum(-1) - 1
    support = _leading_run(rho * zs > cs)  # >= 1
    tau = cs.gather(-1, support - 1) / support.to(z.dtype)
    y = (z - tau).clamp(min=0)
    return torch.where(valid, y, torch.zeros_like(y))


def softmax_kernel(x: torch.Tensor) -> torch.Tensor:
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


def _entmax15_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    g = y.sqrt()  # gppr
    dx = dy * g
    q = dx.sum(-1, keepdim=True) / g.sum(-1, keepdim=True).clamp(min=torch.finfo(y.dtype).tiny)
    return dx - q * g


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
    supp = (y > 0).to(dy.dtype)
    v_hat = (dy * supp).sum(-1, keepdim=True) / supp.sum(-1, keepdim=True).clamp(min=1)
    return supp * (dy - v_hat)


_sparsemax_op.register_autograd(_sparsemax_backward, setup_context=_entmax15_setup)


# The normalizers as differentiated inside top-k attention: autograd through the sort-based
# kernels is wrong at the support's edge (d sqrt(delta) at delta = 0 is inf, and inf * 0 = NaN;
# seen as NaN losses after ~100 training steps), so use the closed-form backward.
_NORM_OPS = {"entmax15": _entmax15_op, "sparsemax": _sparsemax_op, "softmax": softmax_kernel}


# ---- top-k attention ------------------------------------------------------------------------
def topk_lower_index(x: torch.Tensor, k: int):
    """`x.topk(k, dim=-1)` (sorted, descending) with ties broken toward the lower index, as ONNX
    TopK specifies; torch.topk leaves the order (and which tied entries make the cut) unspecified.

    Values are gathered from `x`, so they stay differentiable.
    """
    n = x.shape[-1]
    if k == 0 or x.numel() == 0:
        return x.topk(k, dim=-1)
    val, idx = x.topk(min(k + 1, n), dim=-1)  # one extra: does a tie straddle the cut?
    # Ties among -inf (masked) entries are left in torch's order: they get weight exactly 0, and
    # the masked rows of causal attention would otherwise all take the slow path below.
    bad = (val[..., k] == val[..., k - 1]) & (val[..., k - 1] > float("-inf")) if k < n \
        else torch.zeros_like(val[..., 0], dtype=torch.bool)
    val, idx = val[..., :k], idx[..., :k]
    tied = bad | ((val[..., 1:] == val[..., :-1]) & (val[..., 1:] > float("-inf"))).any(-1)
    if bool(tied.any()):
        idx = idx.clone()
        if bool(bad.any()):  # pick the lowest indices among the entries tied with the k-th value
            xb, kth = x[bad], val[bad][:, -1:]  # (m, N), (m, 1)
            eq, gt = xb == kth, (xb > kth) | xb.isnan()  # topk ranks NaN highest
            take = gt | (eq & (eq.cumsum(-1) <= k - gt.sum(-1, keepdim=True)))
            idx[bad] = take.nonzero()[:, 1].view(-1, k)  # exactly k per row, ascending index
        it, _ = idx[tied].sort(-1)  # then by value descending, ties in index order
        order = x[tied].gather(-1, it).sort(dim=-1, descending=True, stable=True).indices
        idx[tied] = it.gather(-1, order)
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
    outs, idxs, ws = [], [], []
    for s in range(0, T, chunk):
        qc, mc = q[..., s:s + chunk, :], mask[s:s + chunk]
        sc = torch.matmul(qc, k.transpose(-1, -2)) * scale  # (B, H, t, N)
        sc = sc.masked_fill(~mc, float("-inf"))
        val, idx = topk_lower_index(sc, kk)  # sorted, descending, ties: lower index
        w = norm(val)  # (B, H, t, kk)
        dense = torch.zeros_like(sc).scatter(-1, idx, w)  # sparse weights as a dense row
        outs.append(torch.matmul(dense, v))
        idxs.append(idx)
        ws.append(w)
    if T == 0:
        shape = (*q.shape[:-2], 0)
        return q.new_zeros(q.shape), q.new_zeros((*shape, kk), dtype=torch.long), q.new_zeros((*shape, kk))
    return torch.cat(outs, -2), torch.cat(idxs, -2), torch.cat(ws, -2)


@torch.library.custom_op("ressformer::topk_attention", mutates_args=())
def _topk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       top_k: int, normalizer: str, scale: float, chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad(), _no_autocast(q):
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
    ctx.save_for_backward(q, k, v, mask)
    ctx.args = (top_k, normalizer, scale, chunk)


def _topk_attention_backward(ctx, d_out, d_idx, d_w):
    # Recompute-based backward (like activation checkpointing): memory stays chunk x N.
    q, k, v, mask = ctx.saved_tensors
    top_k, normalizer, scale, chunk = ctx.args
    with torch.enable_grad(), _no_autocast(q):
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, _, w = topk_attention_kernel(q_, k_, v_, mask, top_k, normalizer, scale, chunk)
        grads = torch.autograd.grad((out, w), (q_, k_, v_), (d_out, d_w), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]
    return (*grads, None, None, None, None, None)


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
    ctx.n = inputs[0].shape[-1]


def _topk_route_backward(ctx, d_gates, d_idx):
    gates, idx = ctx.saved_tensors
    g = gates * (d_gates - (d_gates * gates).sum(-1, keepdim=True))  # softmax backward
    d = gates.new_zeros((*gates.shape[:-1], ctx.n))
    return d.scatter(-1, idx, g), None


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


def topk_route(logits: torch.Tensor, k: int):
    """Returns (gates, experts), each (..., k)."""
    if _exporting():
        shape = (*logits.shape[:-1], k)
        return torch.onnx.ops.symbolic_multi_out(
            "ressformer::TopKRoute", (logits,), {"k": int(k)},
            dtypes=(logits.dtype, torch.int64), shapes=(shape, shape), version=OPSET_VERSION)
    return _topk_route_op(logits, int(k))

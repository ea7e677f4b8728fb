"""ReSSFormer: Recursive Sparse Structured Transformer (arXiv 2510.01585), the PyTorch reference.

One segment of `segment_len` tokens flows through K applications of one shared block (R2MU).
Each query attends (ASAM) to the top-k of: the segment memory M (m slots, as it stood at the end
of the previous segment), the token cache C_t (the previous segment's last `cache_len` keys and
values at step t) and its own segment causally. No positional encoding (SOES): scores are
q_i . k_j / sqrt(d_h); local order comes from a causal depthwise convolution over the embeddings.
At a segment's end the memory is refined over the K steps with a learned per-slot gate.
See docs/architecture.md for the equations as implemented.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .config import ReSSFormerConfig
from .ops import _branch_free, _exporting, topk_attention, topk_attention_parts, topk_route


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # x / sqrt(.), not x * rsqrt(.): the form ONNX Runtime fuses into one
        # SimplifiedLayerNormalization node (7 nodes otherwise; docs/performance.md)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) at absolute positions pos (T,)."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)  # (D/2,)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


@dataclass
class State:
    """Everything a segment needs from the past. Batch rows advance in lockstep.

    pos: tokens consumed so far; conv (B, kernel-1, d): the last embeddings; memory (B, m, d);
    cache_k/v (S, B, H, C, D): previous segment's last C keys/values at each of the S steps;
    cache_valid: 0 before the first segment ends, else C; past_k/v (S, B, H, P, D): keys/values
    of the current segment so far (P = pos % segment_len).
    """

    pos: int
    conv: torch.Tensor
    memory: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    cache_valid: int
    past_k: torch.Tensor
    past_v: torch.Tensor
    fingerprint: str = ""

    @property
    def steps(self) -> int:
        return self.cache_k.shape[0]

    def detach(self, memory: bool = True) -> State:
        names = ("conv", "cache_k", "cache_v", "past_k", "past_v") + (("memory",) if memory else ())
        return replace(self, **{f: getattr(self, f).detach() for f in names})


@dataclass
class Output:
    logits: torch.Tensor
    state: State
    aux: dict = field(default_factory=dict)


class Attention(nn.Module):
    """ASAM attention: q/k/v projections and top-k sparse attention over memory, cache, segment."""

    record: list | None = None  # set to a list to record (q, keys, mask, idx, w) of each call
    skip_empty_cache = True  # before the first segment ends, score without the (all masked) cache

    def __init__(self, cfg: ReSSFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.dense_fast_path = cfg.top_k == 0 and cfg.normalizer == "softmax" and cfg.lambda_struct == 0

    def heads(self, x):  # (B, T, d) -> (B, H, T, D)
        B, T, _ = x.shape
        return x.view(B, T, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)

    def kv(self, x):  # keys/values only, e.g. of the memory slots
        _, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x, mem_k, mem_v, cache_k, cache_v, cache_valid, past_k, past_v, pos, past_len=None):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = (self.heads(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, D)
        if cfg.pos_encoding == "rope":
            p = pos + torch.arange(T, device=x.device)
            q, k = rope(q, p, cfg.rope_base), rope(k, p, cfg.rope_base)
        if past_len is not None:  # past_k/v: a buffer whose first past_len rows are the segment so far
            return self._forward_parts(q, k, v, mem_k, mem_v, cache_k, cache_v, cache_valid, past_k, past_v, past_len)
        P, C, m = past_k.shape[-2], cache_k.shape[-2], mem_k.shape[-2]
        skipped = 0  # before the first segment ends no query may see the cache: score without it (as
        # the runtimes do; eager runs only), the same selection while every query has >= top_k candidates
        if (self.skip_empty_cache and isinstance(cache_valid, int) and cache_valid == 0 and C
                and 0 < cfg.top_k <= m + P + 1 and self.record is None and not _exporting()):
            skipped, C, cache_k, cache_v = C, 0, cache_k[..., :0, :], cache_v[..., :0, :]
        keys = torch.cat([mem_k, cache_k, past_k, k], dim=-2)  # (B, H, m + C + P + T, D)
        vals = torch.cat([mem_v, cache_v, past_v, v], dim=-2)
        # candidates: memory always; cache entries right-aligned, the last `cache_valid` valid;
        # the segment so far; the piece itself causally.
        dev = x.device
        cache_ok = torch.arange(C, device=dev) >= (C - cache_valid)
        mask = torch.cat([
            torch.ones(T, m, dtype=torch.bool, device=dev),
            cache_ok[None, :].expand(T, C),
            torch.ones(T, P, dtype=torch.bool, device=dev),
            torch.ones(T, T, dtype=torch.bool, device=dev).tril(),
        ], dim=1)  # (T, N)
        if self.dense_fast_path and self.record is None and not _exporting():
            # the dense softmax baseline: plain scaled dot-product attention (PyTorch's fused
            # kernels); the same numbers as TopKAttention over all keys, which the export keeps
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask)
            idx = w = None  # no sparse pattern: L_struct is off (lambda_struct == 0)
        else:
            out, idx, w = topk_attention(q, keys, vals, mask, cfg.top_k, cfg.normalizer,
                                         1.0 / math.sqrt(cfg.head_dim), cfg.attn_chunk)
        if self.record is not None:
            self.record.append({"q": q.detach(), "keys": keys.detach(), "mask": mask, "idx": idx, "w": w.detach()})
        if skipped:  # idx renumbered to the cache's place
            idx = idx + skipped * (idx >= m)
        out = out.transpose(1, 2).reshape(B, T, cfg.d_model)
        return self.proj(out), k, v, idx, w

    def _forward_parts(self, q, k, v, mem_k, mem_v, cache_k, cache_v, cache_valid, past_k, past_v, past_len):
        """The exported piece's attention (runtime contract v3): the keys/values stay in their parts
        (memory, cache, the segment's buffer of which the first past_len rows are valid, the piece);
        the same selection and numbers as forward's concatenation. idx numbers the concatenation of
        the parts (buffer rows included)."""
        cfg = self.cfg
        B, H, T, _ = q.shape
        C, cap, m, dev = cache_k.shape[-2], past_k.shape[-2], mem_k.shape[-2], q.device
        mask = torch.cat([
            torch.ones(T, m, dtype=torch.bool, device=dev),
            (torch.arange(C, device=dev) >= (C - cache_valid))[None, :].expand(T, C),
            (torch.arange(cap, device=dev) < past_len)[None, :].expand(T, cap),
            torch.ones(T, T, dtype=torch.bool, device=dev).tril(),
        ], dim=1)
        out, idx, w = topk_attention_parts(q, [mem_k, cache_k, past_k, k], [mem_v, cache_v, past_v, v], mask,
                                           cfg.top_k, cfg.normalizer, 1.0 / math.sqrt(cfg.head_dim), parts=True)
        out = out.transpose(1, 2).reshape(B, T, cfg.d_model)
        return self.proj(out), k, v, idx, w


class MoE(nn.Module):
    """Top-e-of-E mixture of GELU experts with sparse dispatch (each expert sees only its tokens).

    Training and inference run the experts as grouped matrix products (`torch._grouped_mm`):
    the (token, expert) pairs sorted by expert, one GEMM per layer for all experts, no host
    synchronisation. Where that is unavailable (float64, torch without it) and under ONNX export,
    `dispatch` runs each expert on the tokens `nonzero` finds for it.
    """

    record: list | None = None  # set to a list to record (router logits, experts) of each call

    def __init__(self, cfg: ReSSFormerConfig):
        super().__init__()
        self.cfg = cfg
        E, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, d, f))
        self.b1 = nn.Parameter(torch.zeros(E, f))
        self.w2 = nn.Parameter(torch.empty(E, f, d))
        self.b2 = nn.Parameter(torch.zeros(E, d))

    def expert(self, e: int, x):
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    @staticmethod
    def compute_dtype(x):
        """The experts' matmul dtype: autocast's if on, else x's."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    @classmethod
    def grouped_ok(cls, x) -> bool:
        """torch._grouped_mm runs float32/bfloat16/float16 on a CPU, but on CUDA (torch 2.11) and in
        its meta function (what torch.compile traces with) bfloat16 only."""
        bf16_only = x.device.type == "cuda" or torch.compiler.is_compiling()
        ok = (torch.bfloat16,) if bf16_only else (torch.float32, torch.bfloat16, torch.float16)
        return hasattr(torch, "_grouped_mm") and cls.compute_dtype(x) in ok

    def grouped(self, xf, gates, experts):
        """xf (N, d), gates/experts (N, e) -> (N, d): the N*e (token, expert) pairs sorted by
        expert (stable), two grouped GEMMs, the gated rows summed back per token."""
        N, e = experts.shape
        flat = experts.reshape(-1)  # (N e,) pair p = token p // e, slot p % e
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.zeros(self.cfg.n_experts, dtype=torch.long, device=xf.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        es = flat[order]  # (N e,) expert of each sorted pair
        dt = self.compute_dtype(xf)
        # index_select, not x[idx]: its backward is an index_add (x[idx]'s sorts the indices: ~10x slower on CUDA)
        with torch.autocast(xf.device.type, enabled=False):
            xs = xf.index_select(0, order // e).to(dt)  # (N e, d)
            h = torch._grouped_mm(xs, self.w1.to(dt), offs=offs) + self.b1.index_select(0, es).to(dt)  # (N e, f)
            y = torch._grouped_mm(F.gelu(h), self.w2.to(dt), offs=offs) + self.b2.index_select(0, es).to(dt)
            y = y * gates.reshape(-1).index_select(0, order).unsqueeze(-1).to(dt)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=xf.device))
        return y.index_select(0, inv).view(N, e, -1).sum(1).to(xf.dtype)  # back to pair order, summed per token

    def dispatch(self, xf, gates, experts):
        """Per expert: its tokens (`nonzero`, a host synchronisation on CUDA), run, gate, add."""
        out = torch.zeros_like(xf)
        for e in range(self.cfg.n_experts):
            tok, slot = torch.nonzero(experts == e, as_tuple=True)  # tokens routed to e
            y = self.expert(e, xf[tok]) * gates[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y.to(out.dtype))  # autocast may give y another dtype
        return out

    def forward(self, x):
        cfg = self.cfg
        B, T, d = x.shape
        xf = x.reshape(B * T, d)
        logits = self.router(xf)  # (N, E)
        if cfg.n_experts == 1:
            out = self.expert(0, xf)
            experts = torch.zeros(B * T, 1, dtype=torch.long, device=x.device)
            gates = torch.ones(B * T, 1, dtype=x.dtype, device=x.device)
        else:
            gates, experts = topk_route(logits, cfg.top_e)  # (N, e)
            if _exporting() or not self.grouped_ok(xf):
                out = self.dispatch(xf, gates, experts)
            else:
                out = self.grouped(xf, gates, experts)
        if self.record is not None:
            self.record.append({"logits": logits.detach().view(B, T, -1), "experts": experts.view(B, T, -1)})
        aux = {}
        if self.training or not _exporting():
            probs = torch.softmax(logits.float(), -1)
            counts = torch.zeros(cfg.n_experts, device=x.device).index_add_(
                0, experts.reshape(-1), torch.ones(experts.numel(), device=x.device))  # no one_hot: no value check
            frac = counts / (experts.shape[0] * cfg.top_e)  # f_e: share of routed pairs per expert
            aux["balance"] = cfg.n_experts * (frac * probs.mean(0)).sum()
            aux["z"] = torch.logsumexp(logits.float(), -1).pow(2).mean()
        return out.view(B, T, d), experts.view(B, T, -1), aux

    def dense_forward(self, x):
        """All experts on all tokens, gated sum: the slow reference for the sparse dispatch."""
        logits = self.router(x)
        gates, experts = topk_route(logits, self.cfg.top_e) if self.cfg.n_experts > 1 else (
            torch.ones_like(logits), torch.zeros_like(logits, dtype=torch.long))
        full = torch.zeros_like(logits).scatter(-1, experts, gates)  # (B, T, E)
        ys = torch.stack([self.expert(e, x) for e in range(self.cfg.n_experts)], -2)  # (B, T, E, d)
        return (full.unsqueeze(-1) * ys).sum(-2)


class Block(nn.Module):
    """H^(t+1) = Block(H^(t), M, C_t): pre-norm top-k attention, then the MoE FFN."""

    def __init__(self, cfg: ReSSFormerConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model)
        self.moe = MoE(cfg)

    def memory_kv(self, mem):
        """The memory slots' keys/values (B, H, m, D): they depend on the memory alone, so one
        segment needs them once for all its tokens and (shared block) all its K steps."""
        return self.attn.kv(self.norm1(mem))

    def forward(self, h, mem, cache_k, cache_v, cache_valid, past_k, past_v, pos, mem_kv=None, past_len=None):
        mem_k, mem_v = self.memory_kv(mem) if mem_kv is None else mem_kv  # (B, H, m, D)
        a, k, v, idx, w = self.attn(self.norm1(h), mem_k, mem_v, cache_k, cache_v, cache_valid,
                                    past_k, past_v, pos, past_len)
        h = h + a
        f, experts, aux = self.moe(self.norm2(h))
        return h + f, k, v, idx, w, experts, aux


class MemoryUpdate(nn.Module):
    """M^(t+1) = a ⊙ M^(t) + (1 - a) ⊙ U^(t); U^(t): the slots attending (top-k) to the segment's
    keys/values at step t; a = sigmoid(w_m . M^(t) + w_u . U^(t) + b), one gate per slot."""

    def __init__(self, cfg: ReSSFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.norm = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(2 * d, 1)

    def forward(self, mem, seg_k, seg_v):
        cfg = self.cfg
        B, m, d = mem.shape
        q = self.q(self.norm(mem)).view(B, m, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        mask = torch.ones(m, seg_k.shape[-2], dtype=torch.bool, device=mem.device)
        u, _, _ = topk_attention(q, seg_k, seg_v, mask, cfg.top_k, cfg.normalizer,
                                 1.0 / math.sqrt(cfg.head_dim), cfg.attn_chunk)
        u = self.proj(u.transpose(1, 2).reshape(B, m, d))
        alpha = torch.sigmoid(self.gate(torch.cat([mem, u], -1)))  # (B, m, 1) in [0, 1]
        return alpha * mem + (1 - alpha) * u, alpha


class ReSSFormer(nn.Module):
    def __init__(self, cfg: ReSSFormerConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        if cfg.conv_kernel > 0:
            self.conv = nn.Parameter(torch.zeros(cfg.conv_kernel, d))  # depthwise, causal taps
        if cfg.pos_encoding == "learned":
            self.pos_embed = nn.Embedding(cfg.max_positions, d)
        n_blocks = 1 if cfg.shared else cfg.n_steps
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n_blocks))
        self.step_embed = nn.Embedding(cfg.n_steps, d)
        if cfg.mem_slots > 0:
            self.mem_init = nn.Parameter(torch.empty(cfg.mem_slots, d))
            self.mem_update = MemoryUpdate(cfg)
        self.norm_f = RMSNorm(d)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if "norm" in name:  # RMSNorm gains stay 1
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            else:  # biases
                nn.init.zeros_(p)
        for n, p in self.named_parameters():
            if n.endswith("proj.weight") or n.endswith(".w2"):  # GPT-2 style residual scaling
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_steps))
        if self.config.conv_kernel > 0:
            with torch.no_grad():
                self.conv.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- pieces of one segment (also the export units) --------------------------------------
    def block_for(self, t: int) -> Block:
        return self.blocks[0] if self.config.shared else self.blocks[min(t, len(self.blocks) - 1)]

    def embed_tokens(self, tokens, conv_state, pos):
        """tokens (B, T), conv_state (B, kernel-1, d) -> h0 (B, T, d), new conv_state."""
        cfg = self.config
        x = self.embed(tokens)  # (B, T, d)
        if cfg.pos_encoding == "learned":
            p = pos + torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.pos_embed(p)
        if cfg.conv_kernel == 0:
            return x, conv_state
        kc, T = cfg.conv_kernel, tokens.shape[1]
        xc = torch.cat([conv_state, x], 1)  # (B, kc-1+T, d)
        h = x
        for j in range(kc):  # tap j looks j tokens back
            h = h + xc[:, kc - 1 - j: kc - 1 - j + T] * self.conv[j]
        return h, xc[:, xc.shape[1] - (kc - 1):]

    def step(self, t: int, h, mem, cache_k, cache_v, cache_valid, past_k, past_v, pos, mem_kv=None,
             past_len=None):
        """One recurrent step: H^(t+1) from H^(t); also returns this piece's keys/values.
        mem_kv: the memory's keys/values if already computed (Block.memory_kv). past_len: past_k/v
        are a buffer whose first past_len rows are the segment so far (the export's layout)."""
        emb_t = self.step_embed.weight[min(t, self.config.n_steps - 1)]
        return self.block_for(t)(h + emb_t, mem, cache_k, cache_v, cache_valid, past_k, past_v, pos, mem_kv,
                                 past_len)

    def head(self, h):
        return self.norm_f(h) @ self.embed.weight.t()  # tied output head, (B, T, V)

    def update_memory(self, mem, seg_k, seg_v):
        """Refine the memory over the steps of a finished segment. seg_k/v (S, B, H, L, D)."""
        alphas = []
        for t in range(seg_k.shape[0]):
            mem, a = self.mem_update(mem, seg_k[t], seg_v[t])
            alphas.append(a)
        return mem, alphas

    # ---- state --------------------------------------------------------------------------
    def init_state(self, batch: int, steps: int | None = None, device=None, dtype=None) -> State:
        cfg = self.config
        S = _check_steps(cfg.n_steps if steps is None else steps)
        p = self.embed.weight
        device, dtype = device or p.device, dtype or p.dtype
        H, D, C, m = cfg.n_heads, cfg.head_dim, cfg.cache_len, cfg.mem_slots
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        mem = self.mem_init.to(dtype)[None].expand(batch, m, cfg.d_model) if m else z(batch, 0, cfg.d_model)
        return State(pos=0, conv=z(batch, max(cfg.conv_kernel - 1, 0), cfg.d_model), memory=mem,
                     cache_k=z(S, batch, H, C, D), cache_v=z(S, batch, H, C, D), cache_valid=0,
                     past_k=z(S, batch, H, 0, D), past_v=z(S, batch, H, 0, D),
                     fingerprint=self.fingerprint())

    def fingerprint(self) -> str:
        return hashlib.sha256(self.config.to_json().encode()).hexdigest()[:16]

    # ---- forward ------------------------------------------------------------------------
    def check_tokens(self, tokens):
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor (int64), got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, length), got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)})")
        if tokens.device.type != "cpu":  # reading a value would be a device sync: check on the device
            torch._assert_async(((tokens >= 0) & (tokens < self.config.vocab_size)).all(),
                                f"token ids must be in [0, {self.config.vocab_size})")
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size})")

    def check_state(self, state: State, batch: int, steps: int):
        if not isinstance(state, State):
            raise TypeError(f"state must be a ressformer State, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint():
            raise ValueError("state belongs to a model with another config")
        if state.memory.shape[0] != batch:
            raise ValueError(f"state has batch {state.memory.shape[0]} but tokens have batch {batch}")
        if state.steps != steps:
            raise ValueError(f"state was built for {state.steps} steps, asked to run {steps}")

    def forward(self, tokens, state: State | None = None, steps: int | None = None) -> Output:
        """tokens (B, T) -> Output(logits (B, T, V), state, aux). Any T; segments by position."""
        self.check_tokens(tokens)
        cfg = self.config
        B, T = tokens.shape
        steps = _check_steps(cfg.n_steps if steps is None else steps)
        if state is None:
            state = self.init_state(B, steps)
        self.check_state(state, B, steps)
        logits, auxs = [], []
        i = 0
        while i < T:
            off = state.pos % cfg.segment_len
            n = min(T - i, cfg.segment_len - off)
            lg, state, aux = self._piece(tokens[:, i:i + n], state, steps)
            logits.append(lg)
            auxs.append((n, aux))
            i += n
        aux = {k: sum(a[k] * n for n, a in auxs) / T for k in ("balance", "z", "struct")}
        gates = [a["gates"] for _, a in auxs if "gates" in a]
        if gates:
            aux["gates"] = torch.stack(gates).mean()
        if aux:
            aux["loss"] = (cfg.lambda_bal * aux["balance"] + cfg.lambda_z * aux["z"]
                           + cfg.lambda_struct * aux["struct"])
        return Output(torch.cat(logits, 1), state, aux)

    def _piece(self, tokens, state: State, steps: int):
        """A piece that stays inside one segment: K steps, then the memory update if it ends it."""
        cfg = self.config
        pos = state.pos
        h, conv = self.embed_tokens(tokens, state.conv, pos)
        ks, vs, bal, zl, struct = [], [], 0.0, 0.0, h.new_zeros(())
        prev = None
        # one shared block: the memory's keys/values are the same at every step of the segment
        mem_kv = self.blocks[0].memory_kv(state.memory) if cfg.shared else None
        for t in range(steps):
            h, k, v, idx, w, _, aux = self.step(t, h, state.memory, state.cache_k[t], state.cache_v[t],
                                                state.cache_valid, state.past_k[t], state.past_v[t], pos,
                                                mem_kv)
            ks.append(k)
            vs.append(v)
            bal, zl = bal + aux["balance"], zl + aux["z"]
            if prev is not None and idx is not None:
                struct = struct + structural_continuity(prev[0], prev[1], idx, w)
            prev = (idx, w)
        aux = {"balance": bal / steps, "z": zl / steps,
               "struct": struct / max(steps - 1, 1) if steps > 1 else h.new_zeros(())}
        past_k = torch.cat([state.past_k, torch.stack(ks)], -2)  # (S, B, H, P+T, D)
        past_v = torch.cat([state.past_v, torch.stack(vs)], -2)
        new = replace(state, pos=pos + tokens.shape[1], conv=conv, past_k=past_k, past_v=past_v)
        if new.pos % cfg.segment_len == 0:  # the segment is complete
            mem = new.memory
            if cfg.mem_slots > 0:
                mem, alphas = self.update_memory(mem, past_k, past_v)
                aux["gates"] = torch.stack([a.mean() for a in alphas]).mean().detach()
            C = cfg.cache_len
            new = replace(new, memory=mem, cache_k=past_k[..., past_k.shape[-2] - C:, :],
                          cache_v=past_v[..., past_v.shape[-2] - C:, :], cache_valid=C,
                          past_k=past_k[..., :0, :], past_v=past_v[..., :0, :])
            # Transformer-XL style: the token cache carries no gradient into the next segment;
            # the memory does (within one training sequence) unless detach_memory, or else the
            # memory update would never be trained.
            new = new.detach(memory=cfg.detach_memory)
        return self.head(h), new, aux


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (K, the recurrent depth), got {steps!r}")
    return steps


def structural_continuity(idx_a, w_a, idx_b, w_b):
    """L_struct term: mean over queries and heads of ||A_b,i - A_a,i||^2 for sparse rows given
    as (indices, weights) (B, H, T, k) (distinct indices per row, as top-k gives), without an n x n
    matrix or an n-wide row: ||a||^2 + ||b||^2 - 2 a.b, where a.b sums a_j b_j over the keys both
    selected: the 2k indices of a row sorted, a key selected by both is an adjacent equal pair.
    O(k log k) per query whatever the number of keys (forward + backward, 1 CPU thread: 3.6x faster
    than one dense row read back at b's keys at `base`'s shapes, 5.6x faster than the k x k match).
    On a CPU the C kernel of `ressformer.native` finds the pairs in O(k) instead (~4x the sort)."""
    if not _branch_free(idx_a.device) and not torch.compiler.is_compiling() and idx_a.numel():
        # the C kernel: the slot of a's row holding each of b's keys (k: none), O(k) per query
        pos = native.match(idx_a, idx_b, int(torch.maximum(idx_a.max(), idx_b.max())) + 1)
        if pos is not None:
            cross = (F.pad(w_a, (0, 1)).gather(-1, pos) * w_b).sum(-1)  # a's slot k: weight 0
            d = w_a.pow(2).sum(-1) + w_b.pow(2).sum(-1) - 2 * cross
            return d.mean()
    keys, order = torch.cat([idx_a, idx_b], -1).sort(-1)  # (B, H, T, 2k)
    v = torch.cat([w_a, w_b], -1).gather(-1, order)
    cross = (v[..., 1:] * v[..., :-1] * (keys[..., 1:] == keys[..., :-1])).sum(-1)
    d = w_a.pow(2).sum(-1) + w_b.pow(2).sum(-1) - 2 * cross
    return d.mean() if d.numel() else w_a.new_zeros(())

"""Tensor-only wrappers around the model's pieces: the units torch.onnx.export traces."""

from __future__ import annotations

import torch
from torch import nn

from ressformer.model import ReSSFormer


class Init(nn.Module):
    def __init__(self, model: ReSSFormer):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        m = self.model
        cfg = m.config
        mem = (m.mem_init[None] if cfg.mem_slots else m.embed.weight[:0][None]).expand(
            tokens.shape[0], cfg.mem_slots, cfg.d_model) * 1.0
        mem_k, mem_v = m.blocks[0].memory_kv(mem)
        return mem, mem_k, mem_v


class Embed(nn.Module):
    def __init__(self, model: ReSSFormer):
        super().__init__()
        self.model = model

    def forward(self, tokens, conv):
        return self.model.embed_tokens(tokens, conv, 0)


class Step(nn.Module):
    def __init__(self, model: ReSSFormer):
        super().__init__()
        self.model = model

    def forward(self, h, step, pos, memory, cache_k, cache_v, cache_valid, past_k, past_v):
        m = self.model
        # index_select, not weight[step]: torch 2.11's exporter cannot index with a data-dependent scalar
        emb = m.step_embed.weight.index_select(0, step.clamp(min=0, max=m.config.n_steps - 1).reshape(1))[0]
        h, k, v, idx, w, experts, _ = m.blocks[0](h + emb, memory, cache_k, cache_v, cache_valid,
                                                  past_k, past_v, pos)
        return h, torch.cat([past_k, k], -2), torch.cat([past_v, v], -2), idx, w, experts


class Head(nn.Module):
    def __init__(self, model: ReSSFormer):
        super().__init__()
        self.model = model

    def forward(self, h):
        return self.model.head(h)


class Memory(nn.Module):
    def __init__(self, model: ReSSFormer):
        super().__init__()
        self.model = model

    def forward(self, memory, seg_k, seg_v):
        """One refinement step with a finished segment's keys/values at step t, plus that step's
        cache for the next segment (its last cache_len keys/values)."""
        m = self.model
        C, T = m.config.cache_len, seg_k.shape[-2]
        if m.config.mem_slots > 0:
            memory, alpha = m.mem_update(memory, seg_k, seg_v)
        else:
            memory, alpha = memory * 1.0, memory[..., :1] * 0.0
        return memory, alpha, seg_k[..., T - C:, :], seg_v[..., T - C:, :]


class Piece(nn.Module):
    """A piece of a segment through the whole model with K steps unrolled: embed, K applications of
    the shared block (the memory's keys/values given, computed once per segment), head.

    Runtime contract v3: the caches and the segment's keys/values come per step (lists of K tensors,
    graph inputs cache_k_0.., past_k_0..), past_k[t] a buffer (B, H, capacity, D) whose first
    pos mod segment_len rows are valid (the rest ignored), so the runtime feeds its buffers
    without a copy; the outputs are only the piece's new keys/values (S, B, H, T, D), which the
    runtime appends. Attention runs over the parts (never concatenated)."""

    def __init__(self, model: ReSSFormer, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, tokens, pos, conv, mem_k, mem_v, cache_k, cache_v, cache_valid, past_k, past_v):
        m = self.model
        cfg = m.config
        P = pos % cfg.segment_len  # valid rows of each past buffer
        h, conv_out = m.embed_tokens(tokens, conv, pos)  # (B, T, d)
        ks, vs, idxs, ws, exps = [], [], [], [], []
        for t in range(self.steps):
            h, k, v, idx, w, experts, _ = m.step(t, h, None, cache_k[t], cache_v[t], cache_valid,
                                                 past_k[t], past_v[t], pos, (mem_k, mem_v), past_len=P)
            ks.append(k)
            vs.append(v)
            idxs.append(idx)
            ws.append(w)
            exps.append(experts)
        return (m.head(h), conv_out, torch.stack(ks), torch.stack(vs), torch.stack(idxs), torch.stack(ws),
                torch.stack(exps))


class SegmentEnd(nn.Module):
    """At a segment's end: the K memory refinements, the next segment's caches, and the new
    memory's keys/values."""

    def __init__(self, model: ReSSFormer, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, memory, seg_k, seg_v):  # seg_k/v (S, B, H, L, D)
        m = self.model
        C, T = m.config.cache_len, seg_k.shape[-2]
        if m.config.mem_slots > 0:
            memory, _ = m.update_memory(memory, seg_k, seg_v)
        else:
            memory = memory * 1.0
        mem_k, mem_v = m.blocks[0].memory_kv(memory)
        return memory, mem_k, mem_v, seg_k[..., T - C:, :], seg_v[..., T - C:, :]


WRAPPERS = {"init": Init, "embed": Embed, "step": Step, "head": Head, "memory": Memory,
            "piece": Piece, "segment_end": SegmentEnd}


def wrapper_for(name: str, model: ReSSFormer):
    """The module that traces graph `name` (unrolled graphs are named e.g. piece_k4)."""
    kind, _, k = name.partition("_k") if name.startswith(("piece_k", "segment_end_k")) else (name, "", "")
    return WRAPPERS[kind](model, int(k)) if k else WRAPPERS[kind](model)


def example_inputs(name: str, cfg, batch: int = 2, length: int = 3, past: int = 2):
    """Example inputs for tracing; sizes avoid 0 and 1 so torch.export keeps the axes dynamic."""
    d, H, D, C, m = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.cache_len, cfg.mem_slots
    w = max(cfg.conv_kernel - 1, 0)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tok = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    if name == "init":
        return (tok,)
    if name == "embed":
        return (tok, r(batch, w, d))
    if name == "step":
        return (r(batch, length, d), torch.tensor(1), torch.tensor(5), r(batch, m, d), r(batch, H, C, D),
                r(batch, H, C, D), torch.tensor(C), r(batch, H, past, D), r(batch, H, past, D))
    if name == "head":
        return (r(batch, length, d),)
    if name == "memory":
        seg = max(cfg.top_k, cfg.cache_len, 4) + 1
        return (r(batch, m, d), r(batch, H, seg, D), r(batch, H, seg, D))
    if name.startswith("piece_k"):
        S, P = int(name.rsplit("_k", 1)[1]), past
        per_step = lambda n: [r(batch, H, n, D) for _ in range(S)]  # noqa: E731
        return (tok, torch.tensor(5), r(batch, w, d), r(batch, H, m, D), r(batch, H, m, D), per_step(C),
                per_step(C), torch.tensor(C), per_step(P), per_step(P))
    if name.startswith("segment_end_k"):
        S = int(name[len("segment_end_k"):])
        seg = max(cfg.top_k, cfg.cache_len, 4) + 1
        return (r(batch, m, d), r(S, batch, H, seg, D), r(S, batch, H, seg, D))
    raise KeyError(name)

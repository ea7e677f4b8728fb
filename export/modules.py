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
        cfg = self.model.config
        return self.model.mem_init[None].expand(tokens.shape[0], cfg.mem_slots, cfg.d_model) * 1.0


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
        emb = m.step_embed.weight[step.clamp(min=0, max=m.config.n_steps - 1)]
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


class Full(nn.Module):
    """One whole segment from its start: embed, K unrolled steps, head, memory update, cache."""

    def __init__(self, model: ReSSFormer, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, tokens, conv, memory, cache_k, cache_v, cache_valid):
        m = self.model
        cfg = m.config
        h, conv_out = m.embed_tokens(tokens, conv, 0)
        zero = torch.zeros((), dtype=torch.long)
        ks, vs = [], []
        for t in range(self.steps):
            empty_k = cache_k[t][..., :0, :]
            h, k, v, *_ = m.step(t, h, memory, cache_k[t], cache_v[t], cache_valid, empty_k, empty_k, zero)
            ks.append(k)
            vs.append(v)
        seg_k, seg_v = torch.stack(ks), torch.stack(vs)  # (S, B, H, T, D)
        mem = memory
        if cfg.mem_slots > 0:
            mem, _ = m.update_memory(memory, seg_k, seg_v)
        T = seg_k.shape[-2]
        C = cfg.cache_len
        return (m.head(h), conv_out, mem, seg_k[..., T - C:, :], seg_v[..., T - C:, :])


WRAPPERS = {"init": Init, "embed": Embed, "step": Step, "head": Head, "memory": Memory, "full": Full}


def example_inputs(name: str, cfg, steps: int, batch: int = 2, length: int = 3, past: int = 2):
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
    if name == "full":
        length = max(length, C + 1)  # the cache slice needs T >= C
        tok = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        return (tok, r(batch, w, d), r(batch, m, d), r(steps, batch, H, C, D), r(steps, batch, H, C, D),
                torch.tensor(C))
    raise KeyError(name)

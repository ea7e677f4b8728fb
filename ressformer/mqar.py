"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), a synthetic recall task.

A sequence starts with n_pairs key-value pairs `k1 v1 k2 v2 ...`; every key is then queried once,
at a position drawn with a power-law preference for short gaps, and the model must predict the
key's value as the token after the query. Keys come from [1, V/2), values from [V/2, V); the
other positions hold random tokens. Only the query positions are scored.

The generator is numpy (deterministic in its seed); `train_mqar` trains a model on fresh batches
(seed, step) and reports the accuracy on a held-out set.
"""

from __future__ import annotations

import math
import time

import numpy as np

IGNORE = -100  # label of the positions that are not scored


def mqar_batch(n: int, seq_len: int = 64, n_pairs: int = 4, vocab_size: int = 256, seed: int | list[int] = 0,
               power_a: float = 0.01, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), int64 (n, seq_len). labels[i, t] is the value that must be predicted from
    inputs[i, :t + 1] (t = a query's position), IGNORE elsewhere."""
    half = vocab_size // 2
    if n_pairs < 1 or n_pairs > half - 1:
        raise ValueError(f"n_pairs must be in [1, {half - 1}] for vocab_size {vocab_size}, got {n_pairs}")
    ctx = 2 * n_pairs
    space = (seq_len - ctx) // 2  # query slots: every other position after the context
    if space < n_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {n_pairs} pairs and their queries "
                         f"(needs >= {4 * n_pairs})")
    rng = np.random.default_rng(seed)
    keys = np.stack([rng.choice(np.arange(1, half), n_pairs, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), n_pairs, replace=False) for _ in range(n)])
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    # gap g (0-based slot) has probability ~ a * (g + 1) ** (a - 1): short gaps are more likely
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    slots = np.stack([rng.choice(space, n_pairs, replace=False, p=p) for _ in range(n)])
    qpos = ctx + 2 * slots  # (n, n_pairs)
    np.put_along_axis(inputs, qpos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, qpos, values, axis=1)
    if noise:
        free = inputs == 0
        free[:, :ctx] = False
        inputs[free] = rng.integers(1, vocab_size, size=int(free.sum()))
    return inputs, labels


def train_mqar(preset: str = "tiny", overrides: dict | None = None, seq_len: int = 64, n_pairs: int = 4,
               vocab_size: int = 256, steps: int = 500, batch_size: int = 32, lr: float = 3e-3,
               warmup: int = 50, seed: int = 0, baseline: bool = False, eval_examples: int = 512,
               device: str = "auto", log=print, top_k_start: int | None = None, anneal_frac: float = 0.5,
               eval_every: int = 0, curriculum: tuple[int, int, int] | None = None) -> dict:
    """Train a fresh model on MQAR and return the query accuracy on `eval_examples` held-out sequences.

    top_k_start: an annealed selection (issue 23): train with this many keys per query (0: all keys)
    at step 0, narrowing geometrically to the config's top_k at `anneal_frac` of the steps, then the
    config's top_k to the end (what is evaluated and exported). eval_every: also score the held-out
    set every N steps (the `curve` of the result). curriculum: (seq_len, n_pairs, steps): the first
    `steps` training batches are of that shorter task (e.g. 128 tokens, 8 pairs), the rest of the
    asked one; the held-out set is always the asked task."""
    import torch
    import torch.nn.functional as F

    from .config import ReSSFormerConfig
    from .model import ReSSFormer
    from .train import TrainConfig, baseline_config, lr_at, make_optimizer, resolve_device

    cfg = ReSSFormerConfig.preset(preset, **{**(overrides or {}), "vocab_size": vocab_size})
    if baseline:
        cfg = baseline_config(cfg, seq_len)
    tc = TrainConfig(steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seed=seed)
    tc.validate()
    schedule = _topk_schedule(cfg, seq_len, steps, top_k_start, anneal_frac)
    if curriculum is not None:
        c_len, c_pairs, c_steps = curriculum
        if not 0 <= c_steps <= steps or c_len > seq_len or c_pairs > n_pairs:
            raise ValueError(f"curriculum (seq_len, pairs, steps) must be a task no larger than the asked one "
                             f"for at most {steps} steps, got {curriculum}")
        mqar_batch(1, c_len, c_pairs, vocab_size)  # a bad layout fails here, not at step 0
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = ReSSFormer(cfg).to(dev)
    opt = make_optimizer(model, tc)
    gen = dict(seq_len=seq_len, n_pairs=n_pairs, vocab_size=vocab_size)
    ex, ey = mqar_batch(eval_examples, seed=[seed, 0], **gen)  # held out: train batches use [seed, 1, step]
    log(f"mqar: {'baseline' if baseline else 'ReSSFormer'} {preset}, {model.num_params():,} parameters, "
        f"seq_len {seq_len}, {n_pairs} pairs, vocab {vocab_size}")

    def accuracy() -> float:
        model.eval()
        hits = total = 0
        with torch.no_grad():
            for i in range(0, eval_examples, batch_size):
                x = torch.from_numpy(ex[i:i + batch_size]).to(dev)
                y = torch.from_numpy(ey[i:i + batch_size]).to(dev)
                pred = model(x).logits.argmax(-1)
                mask = y != IGNORE
                hits += int((pred[mask] == y[mask]).sum())
                total += int(mask.sum())
        model.train()
        return hits / total

    t0, loss, curve = time.perf_counter(), math.nan, []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        model.config.top_k = schedule(step)  # every module reads the one config object
        task = gen if curriculum is None or step >= curriculum[2] else {
            **gen, "seq_len": curriculum[0], "n_pairs": curriculum[1]}
        x, y = (torch.from_numpy(a).to(dev) for a in mqar_batch(batch_size, seed=[seed, 1, step], **task))
        out = model(x)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss = task_step(model, opt, ce, out.aux["loss"])
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append({"step": step + 1, "top_k": model.config.top_k, "loss": loss, "accuracy": accuracy()})
            log(f"step {step + 1:>5}/{steps} | top_k {model.config.top_k} | held-out accuracy "
                f"{curve[-1]['accuracy']:.4f}")
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"step {step + 1:>5}/{steps} | query loss {loss:.4f} | {time.perf_counter() - t0:.1f}s")
    model.config.top_k = cfg_top_k = schedule(steps)
    acc = accuracy()
    curve.append({"step": steps, "top_k": cfg_top_k, "loss": loss, "accuracy": acc})
    log(f"mqar accuracy {acc:.4f} on {eval_examples} held-out sequences")
    return {"accuracy": acc, "loss": loss, "steps": steps, "seq_len": seq_len, "n_pairs": n_pairs,
            "vocab_size": vocab_size, "baseline": baseline, "preset": preset, "n_params": model.num_params(),
            "top_k": cfg_top_k, "top_k_start": top_k_start, "anneal_frac": anneal_frac,
            "curriculum": list(curriculum) if curriculum else None, "curve": curve,
            "seconds": time.perf_counter() - t0}


def task_step(model, opt, ce, aux_loss) -> float:
    """One optimizer step of a synthetic task: backward of ce + the auxiliary losses, unused parameters
    given zero gradients (AdamW then still decays them, as in training), clipped to norm 1."""
    import torch

    (ce + aux_loss).backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(ce.detach())


def _topk_schedule(cfg, seq_len: int, steps: int, top_k_start: int | None, anneal_frac: float):
    """step -> keys per query. Without top_k_start: the config's top_k throughout."""
    final = cfg.top_k
    if top_k_start is None:
        return lambda step: final
    if isinstance(top_k_start, bool) or not isinstance(top_k_start, int) or top_k_start < 0:
        raise ValueError(f"top_k_start must be an integer >= 0 (0: all keys), got {top_k_start!r}")
    if not 0 < anneal_frac <= 1:
        raise ValueError(f"anneal_frac must be in (0, 1], got {anneal_frac}")
    if final == 0:
        raise ValueError("an annealed selection needs a final top_k > 0 (the config's top_k is 0: all keys)")
    n_keys = cfg.mem_slots + cfg.cache_len + seq_len  # every candidate a query can see
    start = n_keys if top_k_start == 0 else top_k_start
    if start < final:
        raise ValueError(f"top_k_start ({top_k_start}) must be >= the final top_k ({final})")
    end = max(1, round(anneal_frac * steps))

    def k_at(step: int) -> int:
        f = min(step / end, 1.0)
        return max(final, round(start * (final / start) ** f))
    return k_at

"""Declarative export spec: which graphs are written, their inputs/outputs and named dynamic axes.

Axis names: batch, length (tokens of the piece), past (keys/values of the current segment so far),
capacity (rows of a per-step buffer of the segment's keys/values, at least the valid ones), segment
(a finished segment's keys/values), cache (the piece graphs' token caches: cache_len rows, or 0 while
cache_valid is 0, so a first segment scores no empty cache). Integers are static sizes from the config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IO:
    name: str
    dtype: str  # float32 | int64 | bool
    shape: tuple  # ints (static) and axis names (dynamic)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    doc: str

    def dynamic_shapes(self) -> dict:
        """Per input of the traced module: its named dynamic axes; per-step inputs NAME_0, NAME_1, ...
        (PER_STEP) are one list argument NAME of the module."""
        out = {}
        for io in self.inputs:
            axes = {i: s for i, s in enumerate(io.shape) if isinstance(s, str)}
            base, _, t = io.name.rpartition("_")
            if base in PER_STEP and t.isdigit():
                out.setdefault(base, []).append(axes)
            else:
                out[io.name] = axes
        return out

    def to_json(self) -> dict:
        def j(io):
            return {"name": io.name, "dtype": io.dtype, "shape": list(io.shape)}

        return {"file": self.file, "doc": self.doc, "inputs": [j(i) for i in self.inputs],
                "outputs": [j(o) for o in self.outputs]}


UNROLLED_ROLES = ("piece", "segment_end")


def unrolled_names(steps: int) -> tuple[str, str]:
    """Names of the graphs that run a model with K = steps unrolled: (piece, segment_end)."""
    return tuple(f"{role}_k{steps}" for role in UNROLLED_ROLES)


STEP_GRAPHS = ("embed", "step", "head", "memory")
PER_STEP = ("cache_k", "cache_v", "past_k", "past_v")  # the piece graphs' per-step inputs (contract v3)


def graph_specs(cfg, steps_list=(None,), step_graphs: bool = True) -> dict[str, GraphSpec]:
    """The graphs of one export. `cfg` is a ReSSFormerConfig; `steps_list` the K values that get
    unrolled graphs (None: the trained K). The step-graph path (embed, step, head, memory; only
    with step_graphs) runs any K; the unrolled path (piece + segment_end) runs one of `steps_list`
    in one ONNX Runtime run per piece of a segment (docs/runtime-contract.md)."""
    d, H, D, C, m, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.cache_len, cfg.mem_slots, cfg.vocab_size
    w = max(cfg.conv_kernel - 1, 0)
    f, i64 = "float32", "int64"
    kv = lambda n, ax: IO(n, f, ("batch", H, ax, D))  # noqa: E731
    specs = [
        GraphSpec("init", "init.onnx", (IO("tokens", i64, ("batch", "length")),),
                  (IO("memory", f, ("batch", m, d)), kv("mem_k", m), kv("mem_v", m)),
                  "initial segment memory (the learned M_0) for a batch, and its keys/values"),
        GraphSpec("embed", "embed.onnx",
                  (IO("tokens", i64, ("batch", "length")), IO("conv", f, ("batch", w, d))),
                  (IO("h", f, ("batch", "length", d)), IO("conv_out", f, ("batch", w, d))),
                  "token embedding + causal depthwise conv; carries the last kernel-1 embeddings"),
        GraphSpec("step", "step.onnx",
                  (IO("h", f, ("batch", "length", d)), IO("step", i64, ()), IO("pos", i64, ()),
                   IO("memory", f, ("batch", m, d)), kv("cache_k", C), kv("cache_v", C),
                   IO("cache_valid", i64, ()), kv("past_k", "past"), kv("past_v", "past")),
                  (IO("h_out", f, ("batch", "length", d)), kv("present_k", "present"),
                   kv("present_v", "present"),
                   IO("attn_idx", i64, ("batch", H, "length", "topk")),
                   IO("attn_w", f, ("batch", H, "length", "topk")),
                   IO("experts", i64, ("batch", "length", cfg.top_e))),
                  "one application t of the shared block to a piece of a segment; present = past "
                  "keys/values followed by the piece's (present = past + length)"),
        GraphSpec("head", "head.onnx", (IO("h", f, ("batch", "length", d)),),
                  (IO("logits", f, ("batch", "length", V)),), "final RMSNorm + tied output head"),
        GraphSpec("memory", "memory.onnx",
                  (IO("memory", f, ("batch", m, d)), kv("seg_k", "segment"), kv("seg_v", "segment")),
                  (IO("memory_out", f, ("batch", m, d)), IO("alpha", f, ("batch", m, 1)),
                   kv("cache_k_out", C), kv("cache_v_out", C)),
                  "at a segment's end, for each step t in order: one gated memory refinement with the "
                  "segment's keys/values at t, and step t's token cache for the next segment"),
    ]
    if not step_graphs:
        specs = [s for s in specs if s.name not in STEP_GRAPHS]
    for steps in dict.fromkeys(s or cfg.n_steps for s in steps_list):
        S = steps
        skv = lambda n, ax, S=S: IO(n, f, (S, "batch", H, ax, D))  # noqa: E731
        piece, end = unrolled_names(S)
        ins = (IO("tokens", i64, ("batch", "length")), IO("pos", i64, ()), IO("conv", f, ("batch", w, d)),
               kv("mem_k", m), kv("mem_v", m), *(kv(f"cache_k_{t}", "cache") for t in range(S)),
               *(kv(f"cache_v_{t}", "cache") for t in range(S)), IO("cache_valid", i64, ()),
               *(kv(f"past_k_{t}", "capacity") for t in range(S)), *(kv(f"past_v_{t}", "capacity") for t in range(S)))
        outs = (IO("logits", f, ("batch", "length", V)), IO("conv_out", f, ("batch", w, d)),
                skv("new_k", "length"), skv("new_v", "length"),
                IO("attn_idx", i64, (S, "batch", H, "length", "topk")),
                IO("attn_w", f, (S, "batch", H, "length", "topk")),
                IO("experts", i64, (S, "batch", "length", cfg.top_e)))
        specs += [
            GraphSpec(piece, f"{piece}.onnx", ins, outs,
                      f"a piece of a segment (up to the rest of the segment) through embedding, K={S} "
                      "unrolled steps and the head in one run; per step t the token cache (cache_k_t) and "
                      "a buffer of the segment's keys/values (past_k_t, capacity >= pos mod segment_len "
                      "rows, the first pos mod segment_len valid, the rest ignored); new_k/new_v: the "
                      "piece's keys/values only (the caller appends them at row pos mod segment_len); "
                      "attn_idx/attn_w/experts are diagnostics (parity flip accounting)"),
            GraphSpec(end, f"{end}.onnx",
                      (IO("memory", f, ("batch", m, d)), skv("seg_k", "segment"), skv("seg_v", "segment")),
                      (IO("memory_out", f, ("batch", m, d)), kv("mem_k_out", m), kv("mem_v_out", m),
                       skv("cache_k_out", C), skv("cache_v_out", C)),
                      f"at a segment's end (segment = segment_len): the K={S} gated memory refinements in "
                      "order, the next segment's token caches, and the new memory's keys/values"),
        ]
    return {s.name: s for s in specs}

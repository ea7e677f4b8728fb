"""Model configuration: a dataclass with presets. Imports no torch."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

NORMALIZERS = ("entmax15", "sparsemax", "softmax")
POS_ENCODINGS = ("none", "rope", "learned")
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}  # annotations are strings here


@dataclass
class ReSSFormerConfig:
    vocab_size: int = 256  # byte-level tokens
    d_model: int = 64
    n_heads: int = 4
    n_steps: int = 2  # K: how often the shared block is applied
    shared: bool = True  # one shared block (R2MU); False = K independent layers (baseline)
    top_k: int = 8  # keys per query (0 = all keys, i.e. dense)
    normalizer: str = "entmax15"  # entmax15 | sparsemax | softmax
    mem_slots: int = 4  # m; 0 disables the segment memory
    segment_len: int = 32  # L
    cache_len: int = 8  # C: previous segment's last states each step (<= segment_len)
    n_experts: int = 4  # E
    top_e: int = 2
    d_ff: int = 128  # hidden width of each expert
    conv_kernel: int = 4  # causal depthwise conv over embeddings (0 disables)
    pos_encoding: str = "none"  # none | rope | learned (learned: baseline only)
    max_positions: int = 0  # for pos_encoding == "learned"
    rope_base: float = 10000.0
    attn_chunk: int = 128  # queries per chunk of the score matrix
    lambda_bal: float = 0.01  # Switch load-balancing loss weight
    lambda_z: float = 0.0  # router z-loss weight
    lambda_struct: float = 0.01  # SOES structural-continuity loss weight
    detach_memory: bool = False  # cut the memory's gradient across segments too (the cache's always is)
    init_std: float = 0.02

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid ReSSFormerConfig: {msg}")

        for f in dataclasses.fields(self):  # types first: the range checks below assume them
            v, kind = getattr(self, f.name), _FIELD_TYPES[f.type]
            if kind is float:
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            elif kind is int:
                ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
            else:
                ok = isinstance(v, kind)
            want = {"float": "a finite number", "int": "an integer", "bool": "true or false", "str": "a string"}
            need(ok, f"{f.name} must be {want[f.type]}, got {v!r}")
        for name in ("vocab_size", "d_model", "n_heads", "n_steps", "segment_len", "n_experts", "top_e",
                     "d_ff", "attn_chunk"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("top_k", "mem_slots", "cache_len", "conv_kernel", "max_positions", "lambda_bal", "lambda_z",
                     "lambda_struct", "init_std"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(self.normalizer in NORMALIZERS, f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        need(self.pos_encoding in POS_ENCODINGS,
             f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        need(self.pos_encoding != "learned" or self.max_positions > 0,
             "pos_encoding='learned' needs max_positions > 0")
        need(0 <= self.cache_len <= self.segment_len,
             f"cache_len ({self.cache_len}) must be within [0, segment_len={self.segment_len}]")
        need(1 <= self.top_e <= self.n_experts, f"need 1 <= top_e ({self.top_e}) <= n_experts ({self.n_experts})")
        need(self.head_dim % 2 == 0 or self.pos_encoding != "rope", "rope needs an even head_dim")

    # ---- presets -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ReSSFormerConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown config field(s): {', '.join(bad)}")
        return cls(**{**PRESETS[name], **overrides})

    def baseline(self, d_ff: int | None = None) -> ReSSFormerConfig:
        """The dense baseline of the same size: K independent layers, softmax over all keys,
        learned absolute positions, no memory, no conv, one dense FFN per layer."""
        return dataclasses.replace(
            self, shared=False, top_k=0, normalizer="softmax", mem_slots=0, cache_len=0,
            n_experts=1, top_e=1, d_ff=d_ff or self.d_ff, conv_kernel=0, pos_encoding="learned",
            max_positions=self.segment_len, lambda_struct=0.0, lambda_bal=0.0)

    # ---- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ReSSFormerConfig:
        if not isinstance(d, dict):
            raise TypeError(f"a config is a JSON object of fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config has unknown field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, dict] = {
    # CI-sized: trains in seconds on a CPU.
    "tiny": dict(d_model=64, n_heads=4, n_steps=2, top_k=8, mem_slots=4, segment_len=32,
                 cache_len=8, n_experts=4, top_e=2, d_ff=128),
    # The demo's model (issue 13): nanoGPT's CPU "baby GPT" width (128, 4 heads, 64-byte context),
    # K=2 (at its 2-4 minute budget K=2 learns as well per step as K=4 at half the cost); 0.83M parameters.
    "baby": dict(d_model=128, n_heads=4, n_steps=2, top_k=8, mem_slots=4, segment_len=64,
                 cache_len=8, n_experts=4, top_e=2, d_ff=680),
    # CPU experiments (issue 7): about 2M parameters.
    "small": dict(d_model=256, n_heads=8, n_steps=4, top_k=32, mem_slots=32, segment_len=256,
                  cache_len=128, n_experts=8, top_e=2, d_ff=512),
    # The paper's scale: d 768, 12 heads, K=4, top-32 keys, m=128 slots, E=8, top-2.
    "base": dict(d_model=768, n_heads=12, n_steps=4, top_k=32, mem_slots=128, segment_len=1024,
                 cache_len=256, n_experts=8, top_e=2, d_ff=3072),
}

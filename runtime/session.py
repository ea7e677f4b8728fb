"""`ReSSFormerSession`: runs an exported ReSSFormer with ONNX Runtime.

The session reads only the export folder's `ressformer.json` and `.onnx` files and implements the
loop of docs/runtime-contract.md. Two paths:

* unrolled (default, for each K the export unrolled): a piece of a segment (one token when
  decoding) is ONE run of `piece_kK.onnx` (embedding, K steps, head); a segment's end is one run of
  `segment_end_kK.onnx` (memory refinement, next caches, the new memory's keys/values);
* steps (any K, test-time depth): embed, K runs of `step.onnx`, head; K runs of `memory.onnx` at a
  segment's end.

State is a set of explicit input/output pairs (`RuntimeState`); on CUDA it stays on the device
as OrtValues bound with IO binding. A session holds no per-call state, so one session can serve
several threads at once.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from dataclasses import field as _field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .sampling import check_option, penalize, sample
from .sidecar import (  # noqa: F401 (re-exported)
    FORMAT,
    GENERATION_FALLBACK,
    KNOWN_FORMAT_VERSIONS,
    KNOWN_RESSFORMER_OPSETS,
    SIDECAR,
    STEP_GRAPHS,
    ModelError,
    read_sidecar,
)
from .sidecar import model_hash as _model_hash  # noqa: F401 (the exporter's docstring names it)
from .tokenizer import make_tokenizer

DOMAIN = "ressformer"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PATHS = ("unrolled", "steps")
# Prefill runs a long input in pieces of at most this many tokens (and never across a segment end):
# the attention's (B, H, T, N) score tensors, and so the peak memory, stay bounded whatever the
# prompt's length (base, int4, 2,048-token prompt: peak RSS 975 MB in 1,024-token pieces, 353 MB in
# 128-token pieces, prefill time +9%; docs/performance.md). The logits do not depend on the cut.
MAX_PIECE = 128
# The per-step buffers of a segment's keys/values start with this many rows and grow by an eighth (at
# least MIN_CAPACITY rows, at most segment_len) when a piece does not fit: the attention scores the whole
# buffer (rows past P are ignored, but scored), so the slack stays under max(64, P / 8) rows; growing
# copies the P valid rows, on average at most 8 rows per decoded token. (Doubling left up to half the
# rows scored in vain: `base` int4 decode after 512 tokens scored 1,024 buffer rows.)
MIN_CAPACITY = 64
GROWTH = 8
OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass(frozen=True)
class RuntimeState:
    """Explicit recurrent state (docs/runtime-contract.md). pos: tokens consumed; conv
    (B, kernel-1, d); memory (B, m, d); mem_k/mem_v (B, H, m, D): the memory's keys/values
    (unrolled path; None on the steps path, whose graphs compute them); cache_k/v (S, B, H, C, D):
    the previous segment's last C keys/values at each step; past_k/v (S, B, H, capacity, D): buffers
    of the current segment's keys/values whose first P = pos mod segment_len rows are valid
    (P <= capacity <= segment_len; past_len = P; `ReSSFormerSession.past(state)` gives the valid
    rows). conv, memory and mem_k/v are numpy arrays on CPU and OrtValues on CUDA; the caches and
    buffers are numpy arrays (host memory) everywhere. `owner` ties the state to one model; `path`
    to the graphs that advance it.

    A session appends a piece's keys/values into the buffers in place when the state is the latest
    one written to them (`tip`), else into a copy: states stay values (advancing an older state
    twice gives the same results as advancing copies). A state the session returned is checked once, when
    made; one built or replaced by hand (`dataclasses.replace`) is checked on every use (_validate_state)."""

    pos: int
    conv: object
    memory: object
    mem_k: object
    mem_v: object
    cache_k: object
    cache_v: object
    cache_valid: int
    past_k: object
    past_v: object
    owner: str
    batch: int
    path: str
    tip: _Tip | None = _field(default=None, compare=False, repr=False)
    past_len: int = 0  # rows of the buffers this state holds (= pos mod segment_len; set by the session)

    @property
    def steps(self) -> int:
        return _shape(self.cache_k)[0]


@dataclass
class _Tip:
    """The buffers past_k/past_v of a segment and how many rows the latest state written to them
    holds (n; -1 while a run appends to them)."""

    k: np.ndarray
    v: np.ndarray
    n: int


class _Graph:
    """One ONNX Runtime session plus its cached I/O metadata (io_binding_helper style)."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: list, device: str):
        try:
            self.sess = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {path.name}: {e}") from e
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.device = device

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        outputs = outputs or self.outputs
        if self.device == "cpu":
            vals = self.sess.run(outputs, {n: _host(feeds[n]) for n in self.inputs})
            return dict(zip(outputs, vals))
        binding = self.sess.io_binding()
        for n in self.inputs:
            v = feeds[n]
            if not isinstance(v, ort.OrtValue):
                v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0)
            binding.bind_ortvalue_input(n, v)
        for n in outputs:
            binding.bind_output(n, "cuda", 0)
        self.sess.run_with_iobinding(binding)
        return dict(zip(outputs, binding.get_outputs()))


class _LazyGraphs(dict):
    """name -> _Graph, each loaded (its file checked) on first use; thread-safe."""

    def __init__(self, load):
        super().__init__()
        self._load, self._lock = load, threading.Lock()

    def __missing__(self, name: str) -> _Graph:
        with self._lock:
            if not dict.__contains__(self, name):
                dict.__setitem__(self, name, self._load(name))
            return dict.__getitem__(self, name)


def _host(v):
    return v.numpy() if isinstance(v, ort.OrtValue) else v


def _shape(v) -> tuple:
    return tuple(v.shape()) if isinstance(v, ort.OrtValue) else v.shape


class ReSSFormerSession:
    """Load an export folder. provider: cpu | cuda; threads: intra-op threads (None = ORT's
    default); optimization: disable | basic | extended | all; steps: default K at inference
    (default: the trained K); path: unrolled | steps (default: unrolled where the export has
    graphs unrolled for K, else steps); max_piece: the most tokens one run takes (bounds prefill
    memory; None: up to a segment's end); memory_arena: ONNX Runtime's CPU memory arena (default off:
    a lower peak memory at the same speed)."""

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 optimization: str = "all", steps: int | None = None, verify_hashes: bool = True,
                 path: str | None = None, max_piece: int | None = MAX_PIECE, memory_arena: bool = False):
        self.dir = Path(export_dir)
        self.meta = self._read_sidecar()
        cfg = self.meta["config"]
        self.config = cfg
        self.vocab_size = int(cfg["vocab_size"])
        self.segment_len, self.cache_len = int(cfg["segment_len"]), int(cfg["cache_len"])
        self.n_heads, self.head_dim = int(cfg["n_heads"]), int(cfg["d_model"]) // int(cfg["n_heads"])
        self.d_model, self.mem_slots = int(cfg["d_model"]), int(cfg["mem_slots"])
        self.conv_width = max(int(cfg["conv_kernel"]) - 1, 0)
        self.trained_steps = int(self.meta["steps"])
        self.unrolled = {int(k): v for k, v in self.meta["unrolled"].items()}
        self.steps = self._check_steps(self.trained_steps if steps is None else steps)
        self.path = self._check_path(path)
        if max_piece is not None and (isinstance(max_piece, bool) or not isinstance(max_piece, int) or max_piece < 1):
            raise ValueError(f"max_piece must be a positive integer or None, got {max_piece!r}")
        self.max_piece = max_piece or self.segment_len
        self.generation = self.meta["generation"]  # checked, over GENERATION_FALLBACK (runtime/sidecar.py)
        self.tokenizer = make_tokenizer(self.meta["tokenizer"])
        self.fingerprint = self.meta["checkpoint_sha256"][:16]
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; use one of {sorted(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ValueError(f"provider {provider!r} is not available in this onnxruntime build "
                             f"(available: {ort.get_available_providers()}); for CUDA install onnxruntime-gpu")
        if optimization not in OPT_LEVELS:
            raise ValueError(f"unknown optimization level {optimization!r}; use one of {sorted(OPT_LEVELS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.device = provider

        def options(spinning: bool) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = OPT_LEVELS[optimization]
            # No CPU memory arena: the arena keeps a prefill's peak allocations (rounded up to its chunks) for
            # the session's life. Measured (`base` int4, 2 threads): peak RSS after 512 / 2,048 tokens 238 / 351
            # -> 211 / 296 MB, decode and prefill unchanged (docs/performance.md).
            opts.enable_cpu_mem_arena = memory_arena
            if threads:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            if not spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        # Each graph has its own intra-op thread pool, whose idle workers busy-wait (spin) after a
        # run. Graphs that run between the hot graph's calls (embed, head, memory, segment_end)
        # would steal a core from it: they get workers that do not spin. Measured on 2 cores
        # (`small`, threads=2, step path): decode 112 -> 214 tokens/s (docs/performance.md).
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])

        def load(name: str) -> _Graph:
            g = self.meta["graphs"].get(name)
            if g is None:
                raise ModelError(f"{SIDECAR} in {self.dir} names no graph {name!r}")
            path = self.dir / g["file"]
            self._check_graph_file(name, path, g, verify_hashes)
            return _Graph(path, options(name == "step" or name.startswith("piece_k")), providers, provider)

        # Only the graphs a path runs are loaded (weights once in memory): the default path's now,
        # checked and ready; another path's (the step graphs, another K) on first use.
        self.graphs = _LazyGraphs(load)
        self._tip_lock = threading.Lock()
        # States this session returned (by identity, weakly): RuntimeState is frozen, so one of them still
        # holds what the session made and skips _validate_state (its finiteness scans cost ~0.1 ms a token at
        # `base`); a state built or replaced by hand is validated.
        self._issued: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        # piece graph -> its caches may have 0 rows (axis `cache`; exports before it: C rows, an integer)
        self._cache_axis = {n["piece"]: any(i["name"] == "cache_k_0" and isinstance(i["shape"][2], str)
                                            for i in self.meta["graphs"].get(n["piece"], {}).get("inputs", []))
                            for n in self.unrolled.values()}
        for name in self.graph_names(self.steps):
            self.graphs[name]

    # ---- loading and checks -----------------------------------------------------------------
    def _read_sidecar(self) -> dict:
        return read_sidecar(self.dir)  # every check of ressformer.json, shared with the CLI (runtime/sidecar.py)

    def _check_graph_file(self, name: str, path: Path, g: dict, verify: bool):
        if not path.is_file():
            raise ModelError(f"graph file {path.name} ({name}) is missing from {self.dir}")
        data = path.read_bytes()
        if verify and g.get("sha256"):
            h = hashlib.sha256(data)
            ext = path.with_name(path.name + ".data")
            if ext.exists():
                h.update(ext.read_bytes())
            if h.hexdigest() != g["sha256"]:
                raise ModelError(f"graph file {path.name} ({name}) is corrupted: sha256 differs from "
                                 f"{SIDECAR}")
        if path.suffix == ".ort":  # ORT format (flatbuffers, not protobuf): ORT checks its op sets on load
            return
        for version in _ressformer_opset_versions(data):
            if version not in KNOWN_RESSFORMER_OPSETS:
                raise ModelError(f"{path.name} uses ressformer op-set version {version}; this runtime "
                                 f"knows versions {KNOWN_RESSFORMER_OPSETS}")

    def _check_steps(self, steps) -> int:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer (K, the recurrent depth), got {steps!r}")
        return int(steps)

    def _check_path(self, path) -> str | None:
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
        return path

    def path_for(self, steps: int, path: str | None = None) -> str:
        """The graphs that run K = steps: unrolled where exported for this K, else steps."""
        path = self._check_path(path) or self.path
        if path == "unrolled" and steps not in self.unrolled:
            raise ValueError(f"this export has unrolled graphs for K in {sorted(self.unrolled)}, not {steps}; "
                             "use path='steps' or re-export with --steps")
        path = path or ("unrolled" if steps in self.unrolled else "steps")
        if path == "steps" and not self.has_step_graphs:
            raise ValueError(f"this export has no step graphs, so it runs K in {sorted(self.unrolled)} only, not "
                             f"K={steps} on the steps path; re-export with --step-graphs (any K) or --steps {steps}")
        return path

    @property
    def has_step_graphs(self) -> bool:
        return all(n in self.meta["graphs"] for n in STEP_GRAPHS)

    def graph_names(self, steps: int, path: str | None = None) -> list[str]:
        """The graphs that run K = steps on a path (the ones a session loads for it)."""
        if self.path_for(steps, path) == "unrolled":
            return ["init", *self.unrolled[steps].values()]
        return ["init", *STEP_GRAPHS]

    def check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got shape {tokens.shape}")
        if tokens.size == 0:
            raise ValueError(f"tokens is empty (shape {tokens.shape})")
        if tokens.size == 1:  # a decoded token: no reductions
            lo = hi = int(tokens.reshape(-1)[0])
        else:
            lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} out of range [0, {self.vocab_size})")
        return tokens.astype(np.int64, copy=False)

    def _check_state(self, state: RuntimeState, batch: int, steps: int, path: str):
        if not isinstance(state, RuntimeState):
            raise TypeError(f"state must be a RuntimeState (from init_state or forward), got {type(state).__name__}")
        if state.owner != self.fingerprint:
            raise ValueError("state belongs to another model (checkpoint hash differs)")
        if state.batch != batch:
            raise ValueError(f"state has batch {state.batch} but tokens have batch {batch}")
        if state.steps != steps:
            raise ValueError(f"state was built for {state.steps} steps, asked to run {steps}")
        if state.path != path:
            raise ValueError(f"state was built for the {state.path} path, asked to run the {path} path")

    def _validate_state(self, s: RuntimeState):
        """A state edited by hand is refused here, naming the field, before ONNX Runtime sees it:
        positions, shapes, dtypes, and finiteness of the small tensors (conv, memory, mem_k/v)."""
        if s.owner != self.fingerprint:
            raise ValueError("state belongs to another model (checkpoint hash differs)")
        arrays = ("conv", "memory", "cache_k", "cache_v")
        for name in arrays + (("mem_k", "mem_v") if s.path == "unrolled" else ()):
            v = getattr(s, name)
            if not isinstance(v, (np.ndarray, ort.OrtValue)):
                raise TypeError(f"state.{name} must be a float32 array, got {type(v).__name__}")
            dtype = v.dtype if isinstance(v, np.ndarray) else v.data_type()
            if dtype != (np.float32 if isinstance(v, np.ndarray) else "tensor(float)"):  # (a numpy dtype compared
                raise TypeError(f"state.{name} must be float32, got {dtype}")  # with a str parses it: slow)
        B, S, H, D, L, C = s.batch, s.steps, self.n_heads, self.head_dim, self.segment_len, self.cache_len
        for name in ("pos", "cache_valid", "batch"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"state.{name} must be an integer >= 0, got {v!r}")
        if s.cache_valid != (C if s.pos >= L else 0):
            raise ValueError(f"state.cache_valid must be {C if s.pos >= L else 0} at pos {s.pos}, got {s.cache_valid}")
        unrolled = s.path == "unrolled"
        want = {"conv": (B, self.conv_width, self.d_model), "memory": (B, self.mem_slots, self.d_model),
                "mem_k": (B, H, self.mem_slots, D) if unrolled else None,
                "mem_v": (B, H, self.mem_slots, D) if unrolled else None,
                "cache_k": (S, B, H, C, D), "cache_v": (S, B, H, C, D)}
        for name, shape in want.items():
            v = getattr(s, name)
            if shape is None:
                if v is not None:
                    raise ValueError(f"state.{name} must be None on the steps path")
                continue
            if _shape(v) != shape:
                raise ValueError(f"state.{name} must have shape {shape} at pos {s.pos}, got {_shape(v)}")
            if name in ("conv", "memory", "mem_k", "mem_v") and isinstance(v, np.ndarray) and not np.isfinite(v).all():
                raise ValueError(f"state.{name} holds NaN or infinite values; start again from init_state")
        P = s.pos % L
        for name in ("past_k", "past_v"):  # buffers: (S, B, H, capacity, D), P <= capacity <= L
            v = getattr(s, name)
            if not isinstance(v, np.ndarray):
                raise TypeError(f"state.{name} must be a float32 numpy array, got {type(v).__name__}")
            cap = v.shape[3] if v.ndim == 5 else -1
            if v.ndim != 5 or v.shape[:3] != (S, B, H) or v.shape[4] != D or not P <= cap <= L:
                raise ValueError(f"state.{name} must have shape {(S, B, H, 'capacity', D)} with {P} <= capacity "
                                 f"<= {L} at pos {s.pos}, got {v.shape}")
        if s.past_len != P:
            raise ValueError(f"state.past_k holds {s.past_len} keys/values of the segment but pos {s.pos} needs {P}")

    # ---- state ------------------------------------------------------------------------------
    def init_state(self, batch: int = 1, steps: int | None = None, path: str | None = None) -> RuntimeState:
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        S = self._check_steps(self.steps if steps is None else steps)
        path = self.path_for(S, path)
        H, D, C = self.n_heads, self.head_dim, self.cache_len
        r = self.graphs["init"].run({"tokens": np.zeros((batch, 1), np.int64)})
        z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        unrolled = path == "unrolled"
        return RuntimeState(pos=0, conv=self._dev(z(batch, self.conv_width, self.d_model)), memory=r["memory"],
                            mem_k=r["mem_k"] if unrolled else None, mem_v=r["mem_v"] if unrolled else None,
                            cache_k=z(S, batch, H, C, D), cache_v=z(S, batch, H, C, D), cache_valid=0,
                            past_k=z(S, batch, H, 0, D), past_v=z(S, batch, H, 0, D),
                            owner=self.fingerprint, batch=int(batch), path=path)

    def past(self, state: RuntimeState) -> tuple[np.ndarray, np.ndarray]:
        """The current segment's keys/values (S, B, H, P, D), P = pos mod segment_len: views of the
        state's buffers."""
        P = state.pos % self.segment_len
        return state.past_k[..., :P, :], state.past_v[..., :P, :]

    def _feed(self, state: RuntimeState, T: int) -> tuple:
        """The buffers a piece of T tokens reads (rows P = pos mod segment_len on are ignored): the
        state's, claimed for appending in place if the state is the latest one written to them and
        they have room for the T rows; at a segment's start, new ones (claimed). Returns (k, v, tip
        or None)."""
        k, v, tip = state.past_k, state.past_v, state.tip
        if k.shape[3] == 0:
            cap = min(self.segment_len, max(T, MIN_CAPACITY))
            nk, nv = (np.zeros((*k.shape[:3], cap, k.shape[4]), np.float32) for _ in range(2))
            return nk, nv, _Tip(nk, nv, -1)
        P = state.pos % self.segment_len
        with self._tip_lock:
            if tip is not None and tip.k is k and tip.v is v and tip.n == P and k.shape[3] >= P + T:
                tip.n = -1  # claimed: a state forked at P now appends into a copy
                return k, v, tip
        return k, v, None

    def _appended(self, state: RuntimeState, fed: tuple, new_k, new_v, T: int) -> RuntimeState:
        """The state with the piece's T keys/values per step (S, B, H, T, D) written at row P of the
        claimed buffers, else of new ones (grown_capacity: an eighth more, at most segment_len) holding a copy of
        the P valid rows: fed first, grown after, so a piece reads at most the capacity it found."""
        k, v, tip = fed
        P, L = state.pos % self.segment_len, self.segment_len
        if tip is None:
            cap = grown_capacity(k.shape[3], P + T, L)
            nk, nv = (np.zeros((*k.shape[:3], cap, k.shape[4]), np.float32) for _ in range(2))
            nk[..., :P, :], nv[..., :P, :] = k[..., :P, :], v[..., :P, :]
            tip = _Tip(nk, nv, -1)
        tip.k[..., P:P + T, :], tip.v[..., P:P + T, :] = _host(new_k), _host(new_v)
        tip.n = P + T
        return replace(state, pos=state.pos + T, past_k=tip.k, past_v=tip.v, tip=tip, past_len=(P + T) % L)

    def _segment_ended(self, state: RuntimeState, memory, mem_k, mem_v, cache_k, cache_v) -> RuntimeState:
        empty = np.zeros((state.steps, state.batch, self.n_heads, 0, self.head_dim), np.float32)
        return replace(state, memory=memory, mem_k=mem_k, mem_v=mem_v, cache_k=_host(cache_k),
                       cache_v=_host(cache_v), cache_valid=self.cache_len, past_k=empty, past_v=empty.copy(),
                       tip=None, past_len=0)

    def _dev(self, arr: np.ndarray):
        if self.device == "cpu":
            return arr
        return ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, tokens, state: RuntimeState | None = None, steps: int | None = None,
                path: str | None = None, diagnostics: list | None = None, logits: str = "all"):
        """tokens (B, T) -> (logits (B, T, V) float32, state). Any T: pieces are cut at segment
        boundaries and the memory is updated at each segment's end. steps/path default to the
        state's (or the session's). diagnostics: a list that receives, per piece and step, the
        selected keys/weights and experts (the parity ladder's flip accounting). logits="last":
        only the last position's, (B, 1, V): memory bounded by one segment whatever T (prefill)."""
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        keep_all = logits == "all"
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        if state is not None and not isinstance(state, RuntimeState):
            raise TypeError(f"state must be a RuntimeState (from init_state or forward), got {type(state).__name__}")
        if state is not None and self._issued.get(id(state)) is not state:  # made here: frozen, already valid
            self._validate_state(state)
        steps = self._check_steps(steps if steps is not None else state.steps if state is not None else self.steps)
        path = self.path_for(steps, path if path is not None else state.path if state is not None else None)
        if state is None:
            state = self.init_state(B, steps, path)
        self._check_state(state, B, steps, path)
        logits, state = self._advance(tokens, state, diagnostics, keep_all)
        self._issued[id(state)] = state
        return logits, state

    def _advance(self, tokens: np.ndarray, state: RuntimeState, diagnostics=None, keep_all: bool = True):
        """forward after its checks: checked int64 tokens (B, T), a state this session made."""
        T = tokens.shape[1]
        run = self._piece_unrolled if state.path == "unrolled" else self._piece_steps
        out, i = [], 0
        while i < T:
            n = min(T - i, self.segment_len - state.pos % self.segment_len, self.max_piece)
            lg, state = run(tokens[:, i:i + n], state, diagnostics)
            out = [*out, _host(lg)] if keep_all else [_host(lg)[:, -1:]]  # (B, n, V) or (B, 1, V)
            i += n
        return (out[0] if len(out) == 1 else np.concatenate(out, 1)), state

    def _empty_cache_ok(self, piece: str) -> bool:
        """Whether graph `piece` takes caches of 0 rows (axis `cache`; exports before it: C rows)."""
        return self._cache_axis.get(piece, False)

    def _piece_unrolled(self, tokens, state: RuntimeState, diagnostics=None):
        names = self.unrolled[state.steps]
        T, S = tokens.shape[1], state.steps
        fed = pk, pv, _ = self._feed(state, T)
        ck, cv = _host(state.cache_k), _host(state.cache_v)
        if state.cache_valid == 0 and self._empty_cache_ok(names["piece"]):  # first segment: no cache rows to
            ck = cv = np.zeros((S, state.batch, self.n_heads, 0, self.head_dim), np.float32)  # score (all masked)
        feeds = {"tokens": tokens, "pos": np.array(state.pos, np.int64), "conv": state.conv, "mem_k": state.mem_k,
                 "mem_v": state.mem_v, "cache_valid": np.array(state.cache_valid, np.int64)}
        for t in range(S):  # per step: views of the (S, ...) arrays, contiguous, fed without a copy
            feeds |= {f"cache_k_{t}": ck[t], f"cache_v_{t}": cv[t], f"past_k_{t}": pk[t], f"past_v_{t}": pv[t]}
        r = self.graphs[names["piece"]].run(
            feeds, None if diagnostics is not None else ["logits", "conv_out", "new_k", "new_v"])
        if diagnostics is not None:
            d = {k: _host(v) for k, v in r.items()}
            idx = reference_index(d["attn_idx"], self.mem_slots + ck.shape[3], pk.shape[3],
                                  state.pos % self.segment_len, skipped=self.cache_len - ck.shape[3])
            diagnostics += [{"attn_idx": idx[t], "attn_w": d["attn_w"][t], "experts": d["experts"][t],
                             "new_k": d["new_k"][t]} for t in range(S)]
        new = replace(self._appended(state, fed, r["new_k"], r["new_v"], T), conv=r["conv_out"])
        if new.pos % self.segment_len == 0:  # the buffers hold the whole segment: (S, B, H, L, D)
            e = self.graphs[names["segment_end"]].run({"memory": new.memory, "seg_k": new.past_k, "seg_v": new.past_v})
            new = self._segment_ended(new, e["memory_out"], e["mem_k_out"], e["mem_v_out"], e["cache_k_out"],
                                      e["cache_v_out"])
        return r["logits"], new

    def _piece_steps(self, tokens, state: RuntimeState, diagnostics=None):
        g = self.graphs
        T, P = tokens.shape[1], state.pos % self.segment_len
        e = g["embed"].run({"tokens": tokens, "conv": state.conv})
        h = e["h"]
        pos = np.array(state.pos, np.int64)
        valid = np.array(state.cache_valid, np.int64)
        ck, cv = _host(state.cache_k), _host(state.cache_v)
        pk, pv = (np.ascontiguousarray(x) for x in self.past(state))
        new_k, new_v = [], []
        for t in range(state.steps):
            r = g["step"].run({"h": h, "step": np.array(t, np.int64), "pos": pos, "memory": state.memory,
                               "cache_k": ck[t], "cache_v": cv[t], "cache_valid": valid, "past_k": pk[t],
                               "past_v": pv[t]})
            h = r["h_out"]
            new_k.append(_host(r["present_k"])[..., P:, :])
            new_v.append(_host(r["present_v"])[..., P:, :])
            if diagnostics is not None:
                diagnostics.append({k: _host(v) for k, v in r.items()})
        logits = g["head"].run({"h": h})["logits"]
        new = replace(self._appended(state, self._feed(state, T), np.stack(new_k), np.stack(new_v), T),
                      conv=e["conv_out"])
        if new.pos % self.segment_len == 0:  # refine the memory over the steps in order
            mem, ck, cv = new.memory, [], []
            for t in range(state.steps):
                r = g["memory"].run({"memory": mem, "seg_k": new.past_k[t], "seg_v": new.past_v[t]})
                mem = r["memory_out"]
                ck.append(_host(r["cache_k_out"]))
                cv.append(_host(r["cache_v_out"]))
            new = self._segment_ended(new, mem, None, None, np.stack(ck), np.stack(cv))
        return logits, new

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str | bytes] | None = None, steps: int | None = None, path: str | None = None,
                 repetition_penalty: float | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (batch 1). prompt: str or 1-D token ids. Options left
        None take the export's generation defaults (`generation` in ressformer.json). Prefill runs
        the prompt in segment pieces; decoding feeds one token at a time. Generation ends after
        max_new_tokens or once the output ends with a stop sequence (str, matched on its UTF-8
        bytes, or bytes); the stop sequence is part of the output."""
        for row in self.generate_batch([prompt], max_new_tokens, temperature, top_k, top_p, seed, stop, steps,
                                       path, repetition_penalty):
            yield int(row[0])

    def generate_batch(self, prompts, max_new_tokens: int | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       stop: list[str | bytes] | None = None, steps: int | None = None, path: str | None = None,
                       repetition_penalty: float | None = None) -> Iterator[np.ndarray]:
        """Generate for several prompts at once (rows may differ in length): yields, per new
        position, an int64 array (B,) of token ids; a row that has stopped (stop sequence) yields
        -1 from then on. Each prompt is prefilled on its own (the recurrent state has no padding),
        then all rows decode together in one batch."""
        o = self._generation_options(max_new_tokens, temperature, top_k, top_p, stop, repetition_penalty)
        check_option("seed", seed)
        if isinstance(prompts, (str, bytes, np.ndarray)):
            raise TypeError(f"prompts must be a list of prompts (strings or token id sequences), got a "
                            f"{type(prompts).__name__}; for one prompt use generate(prompt) or [prompt]")
        ids = [self._prompt_ids(p) for p in prompts]
        if not ids:
            raise ValueError("prompts is empty: give at least one prompt")
        rng = np.random.default_rng(seed)
        # The recurrent state has one position per batch, so rows advance in lockstep: prompts of
        # equal length are prefilled and decoded together, one group (one ONNX Runtime run) each.
        groups: dict[int, list[int]] = {}
        for b, x in enumerate(ids):
            groups.setdefault(len(x), []).append(b)
        B = len(ids)
        logits = np.zeros((B, self.vocab_size), np.float32)
        states = {}
        for n, rows in groups.items():
            lg, states[n] = self.forward(np.stack([ids[b] for b in rows]), steps=steps, path=path, logits="last")
            logits[rows] = lg[:, -1]
        seen = [set(x.tolist()) for x in ids]
        tails, done = [b""] * B, np.zeros(B, bool)
        stops, longest = o["stop"], max((len(s) for s in o["stop"]), default=0)
        for _ in range(o["max_new_tokens"]):
            if o["repetition_penalty"] != 1.0:
                logits = penalize(logits, seen, o["repetition_penalty"])
            nxt = sample(logits, rng, o["temperature"], o["top_k"], o["top_p"])
            yield np.where(done, -1, nxt)
            for b in range(B):
                if done[b]:
                    continue
                seen[b].add(int(nxt[b]))
                if stops:
                    tails[b] = (tails[b] + bytes([int(nxt[b])]))[-longest:]
                    done[b] = any(tails[b].endswith(s) for s in stops)
            if done.all():
                return
            for n, rows in groups.items():
                if done[rows].all():
                    continue
                lg, states[n] = self._advance(nxt[rows, None], states[n], keep_all=False)  # states made here
                logits[rows] = lg[:, -1]

    def _prompt_ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, (bytes, bytearray)):
            prompt = np.frombuffer(bytes(prompt), np.uint8)
        ids = self.tokenizer.encode(prompt, "prompt") if isinstance(prompt, str) else np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt must be a string or a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise ValueError("prompt is empty: generation needs at least one token")
        return self.check_tokens(ids[None])[0]

    def _generation_options(self, max_new_tokens, temperature, top_k, top_p, stop, repetition_penalty) -> dict:
        """The call's options over the export's defaults, each checked by its rule (runtime/sampling.py)."""
        given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "repetition_penalty": repetition_penalty, "stop": stop}
        o = {k: self.generation[k] if v is None else v for k, v in given.items()}
        for name in ("temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty"):
            check_option(name, o[name])
        if isinstance(o["stop"], (str, bytes)) or not isinstance(o["stop"], (list, tuple)) \
                or not all(isinstance(s, (str, bytes)) for s in o["stop"]):
            raise ValueError(f"stop must be a list of strings or bytes, got {o['stop']!r}")
        o["stop"] = [s if isinstance(s, bytes) else self._utf8(s, "stop") for s in o["stop"] if s]
        return o

    def _utf8(self, text: str, what: str) -> bytes:
        return self.tokenizer.encode(text, what).astype(np.uint8).tobytes()

    def generate_text(self, prompt: str, **kw) -> Iterator[str]:
        """Like `generate`, yielding decoded text as soon as characters complete."""
        dec = self.tokenizer.stream_decoder()
        for tok in self.generate(prompt, **kw):
            piece = dec(tok)
            if piece:
                yield piece

    # ---- scoring ----------------------------------------------------------------------------
    def score_stream(self, chunks, steps: int | None = None, path: str | None = None, progress=None) -> dict:
        """Bits per byte over a stream of byte chunks (any size). Memory stays bounded: one
        segment's logits at a time."""
        state, prev, nll, count = None, None, 0.0, 0
        buf = b""
        for chunk in chunks:
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError(f"score_stream takes chunks of bytes, got {type(chunk).__name__}")
            buf += chunk
            while len(buf) >= self.segment_len:
                seg, buf = buf[:self.segment_len], buf[self.segment_len:]
                prev, state, nll, count = self._score_piece(seg, state, prev, nll, count, steps, path)
                if progress:
                    progress(len(seg))
        if buf:
            prev, state, nll, count = self._score_piece(buf, state, prev, nll, count, steps, path)
            if progress:
                progress(len(buf))
        if count == 0:
            raise ValueError("need at least 2 bytes to score")
        bpb = nll / count / math.log(2)
        return {"bytes": count + 1, "predicted": count, "nll_nats": nll, "bits_per_byte": bpb,
                "perplexity": math.exp(nll / count)}

    def _score_piece(self, data: bytes, state, prev, nll, count, steps, path):
        ids = np.frombuffer(data, np.uint8).astype(np.int64)[None]
        logits, state = self.forward(ids, state, steps=steps, path=path)
        lp = _log_softmax(logits[0])  # (T, V)
        if prev is not None:  # the previous piece's last position predicts this piece's first byte
            nll -= float(prev[ids[0, 0]])
            count += 1
        if ids.shape[1] > 1:
            nll -= float(np.take_along_axis(lp[:-1], ids[0, 1:, None], 1).sum())
            count += ids.shape[1] - 1
        return lp[-1], state, nll, count


def grown_capacity(capacity: int, need: int, segment_len: int) -> int:
    """The capacity of a buffer replacing one of `capacity` rows that must hold `need` (MIN_CAPACITY)."""
    return min(segment_len, max(need, capacity + max(MIN_CAPACITY, capacity // GROWTH)))


def reference_index(idx: np.ndarray, before: int, capacity: int, P: int, skipped: int = 0) -> np.ndarray:
    """A piece graph's attn_idx, which numbers keys over (memory, cache: `before` rows, the buffer of
    `capacity` rows, the piece), renumbered over (memory, cache, the P valid rows, the piece) as
    PyTorch's attention numbers them; a pick of an ignored buffer row (weight 0: fewer candidates
    than top_k) becomes -1. skipped: cache rows not fed (a first segment's empty cache: 0 rows fed
    of the C PyTorch numbers), so picks from `before` on move up by it."""
    piece = idx >= before + capacity
    ignored = (idx >= before + P) & ~piece
    out = np.where(piece, idx - (capacity - P), np.where(ignored, -1, idx))
    return np.where(out >= before, out + skipped, out) if skipped else out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ressformer_opset_versions(model_bytes: bytes) -> list[int]:
    """The `ressformer` opset versions a serialized ModelProto imports, read from the protobuf
    wire format directly (no onnx dependency): ModelProto.opset_import is field 8."""
    out = []
    for field, value in _fields(model_bytes):
        if field == 8 and isinstance(value, bytes):
            domain, version = "", 0
            for f2, v2 in _fields(value):
                if f2 == 1 and isinstance(v2, bytes):
                    domain = v2.decode("utf-8", "replace")
                elif f2 == 2 and isinstance(v2, int):
                    version = v2
            if domain == DOMAIN:
                out.append(version)
    return out


def _fields(buf: bytes):
    """Top-level (field number, value) pairs of a protobuf message; corrupt data raises ModelError."""
    i, n = 0, len(buf)
    try:
        while i < n:
            key, i = _varint(buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                v, i = _varint(buf, i)
                yield field, v
            elif wire == 2:
                ln, i = _varint(buf, i)
                if i + ln > n:
                    raise ValueError("truncated")
                yield field, buf[i:i + ln]
                i += ln
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"wire type {wire}")
    except (ValueError, IndexError) as e:
        raise ModelError(f"graph file is not a valid ONNX model ({e})") from e


def _varint(buf: bytes, i: int):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7

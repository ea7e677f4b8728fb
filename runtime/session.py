"""`ReSSFormerSession`: runs an exported ReSSFormer with ONNX Runtime.

The session reads only the export folder's `ressformer.json` and `.onnx` files. It runs the
unrolled K-step recurrence itself with the step graphs (K selectable at inference), carries
the segment memory and per-step key/value caches across calls, streams and generates. State is
a set of explicit input/output pairs (`RuntimeState`); on CUDA the state stays on the device
as OrtValues bound with IO binding. A session holds no per-call state, so one session can
serve several threads at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .sampling import sample
from .tokenizer import make_tokenizer

SIDECAR = "ressformer.json"
FORMAT = "ressformer-export"
KNOWN_FORMAT_VERSIONS = (1,)
KNOWN_RESSFORMER_OPSETS = (1,)
DOMAIN = "ressformer"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class ModelError(ValueError):
    """The export folder is missing, corrupted, or of a version this runtime does not know."""


@dataclass(frozen=True)
class RuntimeState:
    """Explicit recurrent state. pos: tokens consumed; conv (B, kernel-1, d); memory (B, m, d);
    per step t: cache_k/v[t] (B, H, C, D), the previous segment's last C keys/values;
    past_k/v[t] (B, H, P, D), the current segment's so far. Values are numpy arrays on CPU and
    OrtValues on CUDA. `owner` ties the state to one model and step count."""

    pos: int
    conv: object
    memory: object
    cache_k: tuple
    cache_v: tuple
    cache_valid: int
    past_k: tuple
    past_v: tuple
    owner: str
    batch: int

    @property
    def steps(self) -> int:
        return len(self.cache_k)


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


def _host(v):
    return v.numpy() if isinstance(v, ort.OrtValue) else v


def _shape(v) -> tuple:
    return tuple(v.shape()) if isinstance(v, ort.OrtValue) else v.shape


class ReSSFormerSession:
    """Load an export folder. provider: cpu | cuda; threads: intra-op threads (None = ORT's
    default); optimization: disable | basic | extended | all; steps: default K at inference."""

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 optimization: str = "all", steps: int | None = None, verify_hashes: bool = True):
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
        self.steps = self._check_steps(steps or self.trained_steps)
        self.tokenizer = make_tokenizer(self.meta["tokenizer"])
        self.fingerprint = self.meta["checkpoint_sha256"][:16]
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; use one of {sorted(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ValueError(f"provider {provider!r} is not available in this onnxruntime build "
                             f"(available: {ort.get_available_providers()}); for CUDA install onnxruntime-gpu")
        if optimization not in OPT_LEVELS:
            raise ValueError(f"unknown optimization level {optimization!r}; use one of {sorted(OPT_LEVELS)}")
        self.device = provider

        def options(spinning: bool) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = OPT_LEVELS[optimization]
            if threads:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            if not spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        # Each graph has its own intra-op thread pool, whose idle workers busy-wait (spin) after a
        # run. The small graphs run between step-graph calls (embed, head, memory) and would steal a
        # core from the step graph that runs next: they get workers that do not spin. Measured on 2
        # cores (`small`, threads=2): decode 112 -> 214 tokens/s, step-graph prefill of 2048
        # tokens 1284 -> 802 ms; model.onnx unchanged (docs/performance.md).
        spin_graphs = ("step", "full")
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        self.graphs: dict[str, _Graph] = {}
        for name, g in self.meta["graphs"].items():
            path = self.dir / g["file"]
            self._check_graph_file(name, path, g, verify_hashes)
            self.graphs[name] = _Graph(path, options(name in spin_graphs), providers, provider)

    # ---- loading and checks -----------------------------------------------------------------
    def _read_sidecar(self) -> dict:
        if not self.dir.is_dir():
            raise ModelError(f"export folder {self.dir} does not exist")
        path = self.dir / SIDECAR
        if not path.is_file():
            raise ModelError(f"{self.dir} has no {SIDECAR}: not a ressformer export folder")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path} is corrupted: {e}") from e
        if meta.get("format") != FORMAT or meta.get("format_version") not in KNOWN_FORMAT_VERSIONS:
            raise ModelError(f"{path}: unknown export format {meta.get('format')!r} version "
                             f"{meta.get('format_version')!r}; this runtime reads {FORMAT} {KNOWN_FORMAT_VERSIONS}")
        ops = meta.get("ressformer_opset", {})
        if ops.get("version") not in KNOWN_RESSFORMER_OPSETS:
            raise ModelError(f"{path}: unknown ressformer op-set version {ops.get('version')!r}; this "
                             f"runtime knows versions {KNOWN_RESSFORMER_OPSETS}")
        for key in ("config", "graphs", "steps", "tokenizer", "checkpoint_sha256"):
            if key not in meta:
                raise ModelError(f"{path} has no {key!r} entry")
        missing = {"embed", "step", "head", "init", "memory"} - set(meta["graphs"])
        if missing:
            raise ModelError(f"{path} names no graph for {sorted(missing)}")
        return meta

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
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return int(steps)

    def check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got shape {tokens.shape}")
        if tokens.size == 0:
            raise ValueError(f"tokens is empty (shape {tokens.shape})")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} out of range [0, {self.vocab_size})")
        return tokens.astype(np.int64, copy=False)

    def _check_state(self, state: RuntimeState, batch: int, steps: int):
        if not isinstance(state, RuntimeState):
            raise TypeError(f"state must be a RuntimeState, got {type(state).__name__}")
        if state.owner != self.fingerprint:
            raise ValueError("state belongs to another model (checkpoint hash differs)")
        if state.batch != batch:
            raise ValueError(f"state has batch {state.batch} but tokens have batch {batch}")
        if state.steps != steps:
            raise ValueError(f"state was built for {state.steps} steps, asked to run {steps}")

    # ---- state ------------------------------------------------------------------------------
    def init_state(self, batch: int = 1, steps: int | None = None) -> RuntimeState:
        S = self._check_steps(steps or self.steps)
        H, D, C = self.n_heads, self.head_dim, self.cache_len
        mem = self.graphs["init"].run({"tokens": np.zeros((batch, 1), np.int64)})["memory"]
        z = lambda *s: self._dev(np.zeros(s, np.float32))  # noqa: E731
        return RuntimeState(pos=0, conv=z(batch, self.conv_width, self.d_model), memory=mem,
                            cache_k=tuple(z(batch, H, C, D) for _ in range(S)),
                            cache_v=tuple(z(batch, H, C, D) for _ in range(S)), cache_valid=0,
                            past_k=tuple(z(batch, H, 0, D) for _ in range(S)),
                            past_v=tuple(z(batch, H, 0, D) for _ in range(S)),
                            owner=self.fingerprint, batch=batch)

    def _dev(self, arr: np.ndarray):
        if self.device == "cpu":
            return arr
        return ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, tokens, state: RuntimeState | None = None, steps: int | None = None,
                full_graph: bool = False, diagnostics: list | None = None):
        """tokens (B, T) -> (logits (B, T, V) float32, state). Any T: pieces are cut at segment
        boundaries and the memory is updated at each segment's end. full_graph=True runs whole
        segments through model.onnx (trained K only) and the rest through the step graphs."""
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        steps = self._check_steps(steps or (state.steps if state is not None else self.steps))
        if state is None:
            state = self.init_state(B, steps)
        self._check_state(state, B, steps)
        out, i = [], 0
        while i < T:
            off = state.pos % self.segment_len
            n = min(T - i, self.segment_len - off)
            piece = tokens[:, i:i + n]
            if full_graph and off == 0 and n == self.segment_len and "full" in self.graphs \
                    and steps == self.trained_steps:
                logits, state = self._full_segment(piece, state)
            else:
                logits, state = self._piece(piece, state, diagnostics)
            out.append(_host(logits))
            i += n
        return np.concatenate(out, 1), state

    def _piece(self, tokens, state: RuntimeState, diagnostics=None):
        g = self.graphs
        e = g["embed"].run({"tokens": tokens, "conv": state.conv})
        h = e["h"]
        pos = np.array(state.pos, np.int64)
        valid = np.array(state.cache_valid, np.int64)
        pk, pv = [], []
        for t in range(state.steps):
            r = g["step"].run({"h": h, "step": np.array(t, np.int64), "pos": pos, "memory": state.memory,
                               "cache_k": state.cache_k[t], "cache_v": state.cache_v[t],
                               "cache_valid": valid, "past_k": state.past_k[t], "past_v": state.past_v[t]})
            h = r["h_out"]
            pk.append(r["present_k"])
            pv.append(r["present_v"])
            if diagnostics is not None:
                diagnostics.append({k: _host(v) for k, v in r.items()})
        logits = g["head"].run({"h": h})["logits"]
        new = replace(state, pos=state.pos + tokens.shape[1], conv=e["conv_out"], past_k=tuple(pk),
                      past_v=tuple(pv))
        if new.pos % self.segment_len == 0:
            new = self._end_segment(new)
        return logits, new

    def _end_segment(self, state: RuntimeState) -> RuntimeState:
        """Refine the memory over the steps in order; take each step's cache for the next segment."""
        mem, ck, cv = state.memory, [], []
        for t in range(state.steps):
            r = self.graphs["memory"].run({"memory": mem, "seg_k": state.past_k[t], "seg_v": state.past_v[t]})
            mem = r["memory_out"]
            ck.append(r["cache_k_out"])
            cv.append(r["cache_v_out"])
        empty = tuple(self._dev(np.zeros((state.batch, self.n_heads, 0, self.head_dim), np.float32))
                      for _ in range(state.steps))
        return replace(state, memory=mem, cache_k=tuple(ck), cache_v=tuple(cv), cache_valid=self.cache_len,
                       past_k=empty, past_v=empty)

    def _full_segment(self, tokens, state: RuntimeState):
        r = self.graphs["full"].run({
            "tokens": tokens, "conv": _host(state.conv), "memory": _host(state.memory),
            "cache_k": np.stack([_host(c) for c in state.cache_k]),
            "cache_v": np.stack([_host(c) for c in state.cache_v]),
            "cache_valid": np.array(state.cache_valid, np.int64)})
        S = state.steps
        return r["logits"], replace(
            state, pos=state.pos + tokens.shape[1], conv=self._dev(_host(r["conv_out"])),
            memory=self._dev(_host(r["memory_out"])), cache_valid=self.cache_len,
            cache_k=tuple(self._dev(_host(r["cache_k_out"])[t]) for t in range(S)),
            cache_v=tuple(self._dev(_host(r["cache_v_out"])[t]) for t in range(S)))

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str | bytes] | None = None,
                 steps: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (batch 1). prompt: str or token ids. Prefill runs the
        prompt in segment pieces; decoding feeds one token at a time with the per-step caches.
        Generation ends after max_new_tokens or once the output ends with a stop sequence (str,
        matched on its UTF-8 bytes, or bytes); the stop sequence is part of the output."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt must be a string or a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise ValueError("prompt is empty: generation needs at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        rng = np.random.default_rng(seed)
        logits, state = self.forward(ids[None, :], steps=steps)
        stops = [s if isinstance(s, bytes) else s.encode("utf-8") for s in (stop or []) if s]
        tail = b""
        for _ in range(max_new_tokens):
            nxt = sample(logits[:, -1], rng, temperature, top_k, top_p)
            tok = int(nxt[0])
            yield tok
            if stops:
                tail = (tail + bytes([tok]))[-max(len(s) for s in stops):]
                if any(tail.endswith(s) for s in stops):
                    return
            logits, state = self.forward(nxt[:, None], state)

    def generate_text(self, prompt: str, **kw) -> Iterator[str]:
        """Like `generate`, yielding decoded text as soon as characters complete."""
        dec = self.tokenizer.stream_decoder()
        for tok in self.generate(prompt, **kw):
            piece = dec(tok)
            if piece:
                yield piece

    # ---- scoring ----------------------------------------------------------------------------
    def score_stream(self, chunks, steps: int | None = None, full_graph: bool = True,
                     progress=None) -> dict:
        """Bits per byte over a stream of byte chunks (any size). Memory stays bounded: one
        segment's logits at a time."""
        state, prev, nll, count = None, None, 0.0, 0
        buf = b""
        for chunk in chunks:
            buf += chunk
            while len(buf) >= self.segment_len:
                seg, buf = buf[:self.segment_len], buf[self.segment_len:]
                prev, state, nll, count = self._score_piece(seg, state, prev, nll, count, steps, full_graph)
                if progress:
                    progress(len(seg))
        if buf:
            prev, state, nll, count = self._score_piece(buf, state, prev, nll, count, steps, full_graph)
            if progress:
                progress(len(buf))
        if count == 0:
            raise ValueError("need at least 2 bytes to score")
        bpb = nll / count / math.log(2)
        return {"bytes": count + 1, "predicted": count, "nll_nats": nll, "bits_per_byte": bpb,
                "perplexity": math.exp(nll / count)}

    def _score_piece(self, data: bytes, state, prev, nll, count, steps, full_graph):
        ids = np.frombuffer(data, np.uint8).astype(np.int64)[None]
        logits, state = self.forward(ids, state, steps=steps, full_graph=full_graph)
        lp = _log_softmax(logits[0])  # (T, V)
        if prev is not None:  # the previous piece's last position predicts this piece's first byte
            nll -= float(prev[ids[0, 0]])
            count += 1
        if ids.shape[1] > 1:
            nll -= float(np.take_along_axis(lp[:-1], ids[0, 1:, None], 1).sum())
            count += ids.shape[1] - 1
        return lp[-1], state, nll, count


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

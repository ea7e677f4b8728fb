"""ReSSFormer against a dense GPT of the same parameter count, both on ONNX Runtime (issue 12,
"the comparison a user makes").

The dense baseline is a minimal decoder-only GPT (byte vocabulary, RoPE on q/k, pre-RMSNorm,
causal softmax attention, GELU MLP, tied head) sized to ReSSFormer's parameter count. Its ONNX
graph carries a growing key/value cache, one tensor per layer (as LLM exports do):

    tokens (B, T), pos (), past_k_i, past_v_i (B, H, P, D) for i < n_layer
      -> logits (B, T, V), present_k_i, present_v_i (B, H, P + T, D)

or, with layout "stacked", past_k/past_v (n_layer, B, H, P, D) -> present_k/present_v (which
costs a Split and a stack, two more copies of the cache per run). Standard attention: MatMul,
additive causal mask for queries pos..pos+T-1 over keys 0..P+T-1, Softmax, MatMul; exported with
`torch.onnx.export(dynamo=True)` at the ReSSFormer export's opset (opset 20 exports GELU as one
node; RMSNorm is written in the form ONNX Runtime fuses, as in the ReSSFormer model). Prefill is
chunked (2048 tokens per run by default): one 32k piece would need a 32k x 32k score matrix per
head (4 GiB each). Decode is one run per token; the cache stays in OrtValues between runs.

Measured in one run (`run_comparison`), both engines on ONNX Runtime with the same thread count:
prefill latency at each length (ReSSFormer `sess.forward(x)`, which cuts segments itself; dense:
chunked), decode tokens/s after each context length (from the prefill's state), and the peak RSS
(VmHWM) of a fresh child process per engine and length (prefill, then decode; the child imports
numpy + onnxruntime only, as a deployment would). Lengths up to 16k are timed in this process,
the engines alternating; longer ones once, in those children. From these: the crossover lengths
where ReSSFormer becomes faster, interpolated on log length.

    python -m ressformer.bench.dense [CHECKPOINT] [--preset small] [--threads 2]
        [--lengths 2048,8192,32768] [--decode-tokens 64] [--chunk 2048] [--json F] [--plot F] [--smoke]

This module imports torch only where it builds or exports the PyTorch model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

LENGTHS = (2048, 8192, 32768)
SMOKE_LENGTHS = (64, 128)
CHUNK = 2048  # dense prefill: queries per ONNX Runtime run
DECODE_TOKENS = 64
MAX_POINT_S = 240.0  # skip a dense point whose predicted single run takes longer ("too slow")
ENGINES = ("ressformer", "dense")
LAYOUTS = ("per_layer", "stacked")


# ---- the dense model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseConfig:
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 712
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def params(self) -> int:
        """Parameter count (embedding tied with the head; no biases)."""
        d = self.d_model
        per_layer = 4 * d * d + 2 * d * self.d_ff + 2 * d  # q/k/v/out, MLP, two RMSNorm weights
        return self.vocab_size * d + self.n_layer * per_layer + d  # + the final RMSNorm


def matching_config(cfg, n_layer: int | None = None, n_heads: int | None = None) -> DenseConfig:
    """The dense GPT with ReSSFormer config `cfg`'s width and vocabulary whose parameter count is
    closest to ReSSFormer's (d_ff a multiple of 8). n_layer defaults to ReSSFormer's K (the depth
    a token goes through), n_heads to head_dim 64 (GPT-2's layout; for the same width fewer heads
    mean fewer softmax elements, so this favours the baseline)."""
    n_layer = n_layer or cfg.n_steps
    n_heads = n_heads or max(cfg.d_model // 64, 1)
    return matched_width(lambda f: DenseConfig(cfg.vocab_size, n_layer, cfg.d_model, n_heads, f),
                         _ressformer_params(cfg), per_ff=2 * cfg.d_model * n_layer, multiple=8)


def matched_width(make, target: int, per_ff: int, multiple: int):
    """make(d_ff) -> a model spec with `.params`; the spec whose FFN width (a multiple of `multiple`,
    `per_ff` parameters per unit) brings its count closest to `target`."""
    d_ff = max(multiple, round((target - make(0).params) / per_ff / multiple) * multiple)
    return make(d_ff)


def _ressformer_params(cfg) -> int:
    import torch

    from ressformer import ReSSFormer

    with torch.device("meta"):
        return ReSSFormer(cfg).num_params()


@functools.cache
def _torch_classes():
    """The PyTorch classes, defined on first use so that this module imports without torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float = 1e-6):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):  # x / sqrt(.): the form ONNX Runtime fuses (as ressformer/model.py)
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotate(x, cos, sin):  # x (B, H, T, D); cos/sin (T, D/2): rotary embedding, halves layout
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)

    class Block(nn.Module):
        def __init__(self, c: DenseConfig):
            super().__init__()
            self.c = c
            self.ln1, self.ln2 = RMSNorm(c.d_model), RMSNorm(c.d_model)
            self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
            self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
            self.fc = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.out = nn.Linear(c.d_ff, c.d_model, bias=False)

        def forward(self, x, cos, sin, mask, past_k, past_v):
            B, T, d = x.shape
            H, D = self.c.n_heads, self.c.head_dim
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
            q, k = rotate(q, cos, sin) * D ** -0.5, rotate(k, cos, sin)
            k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)  # (B, H, P + T, D)
            att = torch.softmax(q @ k.transpose(-2, -1) + mask, -1)  # (B, H, T, P + T)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, d))
            x = x + self.out(F.gelu(self.fc(self.ln2(x))))
            return x, k, v

    class DenseGPT(nn.Module):
        """tokens (B, T), pos () int64, past_k/past_v: n_layer tensors (B, H, P, D) -> logits
        (B, T, V), present_k/present_v: n_layer tensors (B, H, P + T, D). pos is the absolute
        position of tokens[:, 0] (= P when the cache holds everything before)."""

        def __init__(self, c: DenseConfig):
            super().__init__()
            self.config = c
            self.wte = nn.Embedding(c.vocab_size, c.d_model)
            self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
            self.norm = RMSNorm(c.d_model)
            inv = c.rope_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
            self.register_buffer("inv_freq", inv, persistent=False)  # (D/2,)
            for n, p in self.named_parameters():  # GPT-2 init: residual projections scaled down
                if p.dim() == 2:
                    scale = math.sqrt(2 * c.n_layer) if n.endswith(("proj.weight", "out.weight")) else 1.0
                    nn.init.normal_(p, std=0.02 / scale)

        def num_params(self) -> int:
            return sum(p.numel() for p in self.parameters())

        def forward(self, tokens, pos, past_k, past_v):
            T, P = tokens.shape[1], past_k[0].shape[2]
            qpos = pos + torch.arange(T)  # (T,) absolute positions of the queries
            kpos = torch.arange(P + T)  # (P + T,) of the keys
            mask = torch.zeros(()).masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))  # (T, P + T)
            ang = qpos.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, D/2)
            cos, sin = ang.cos(), ang.sin()
            x = self.wte(tokens)  # (B, T, d)
            ks, vs = [], []
            for blk, pk, pv in zip(self.blocks, past_k, past_v):
                x, k, v = blk(x, cos, sin, mask, pk, pv)
                ks.append(k)
                vs.append(v)
            logits = self.norm(x) @ self.wte.weight.t()  # tied head (B, T, V)
            return logits, tuple(ks), tuple(vs)

    class Stacked(nn.Module):
        """The same model with the cache as one tensor per k/v: (n_layer, B, H, P, D)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, pos, past_k, past_v):
            logits, ks, vs = self.model(tokens, pos, past_k.unbind(0), past_v.unbind(0))
            return logits, torch.stack(ks), torch.stack(vs)

    return DenseGPT, Stacked


def dense_gpt(c: DenseConfig, seed: int = 0):
    """A randomly initialized (torch seed `seed`) PyTorch DenseGPT in eval mode."""
    import torch

    torch.manual_seed(seed)
    return _torch_classes()[0](c).eval()


def cache_names(n_layer: int, layout: str) -> tuple[list[str], list[str]]:
    """(past input names, present output names), k before v. layout: per_layer | stacked."""
    if layout == "stacked":
        return ["past_k", "past_v"], ["present_k", "present_v"]
    if layout == "per_layer":
        past = [f"past_{kv}_{i}" for kv in "kv" for i in range(n_layer)]
        return past, [n.replace("past_", "present_") for n in past]
    raise ValueError(f"unknown cache layout {layout!r}; use one of {LAYOUTS}")


def export_dense(model, path: str | os.PathLike, opset: int = 18, layout: str = "per_layer") -> Path:
    """Export DenseGPT to one ONNX file (batch, T and the cache length P dynamic); written to a
    temporary name, then renamed. layout per_layer: inputs past_k_0.., past_v_0.. (B, H, P, D) and
    outputs present_k_0.., present_v_0.. (B, H, P + T, D), as LLM exports do; stacked: past_k,
    past_v (n_layer, B, H, P, D) -> present_k, present_v (costs a Split and a stack per run)."""
    import onnx
    import torch

    c = model.config
    past, present = cache_names(c.n_layer, layout)
    B, T, P = 2, 3, 5  # example sizes > 1: torch.export specializes 0 and 1
    tokens, pos = torch.zeros(B, T, dtype=torch.int64), torch.tensor(P, dtype=torch.int64)
    kv = lambda: torch.zeros(B, c.n_heads, P, c.head_dim)  # noqa: E731
    dyn_tok = {0: "batch", 1: "T"}
    if layout == "stacked":
        module = _torch_classes()[1](model)
        args = (tokens, pos, *(torch.stack([kv() for _ in range(c.n_layer)]) for _ in "kv"))
        cache = {1: "batch", 3: "past"}
        dyn = {"tokens": dyn_tok, "pos": {}, "past_k": cache, "past_v": cache}
    else:
        module = model
        args = (tokens, pos, tuple(kv() for _ in range(c.n_layer)), tuple(kv() for _ in range(c.n_layer)))
        cache = tuple({0: "batch", 2: "past"} for _ in range(c.n_layer))
        dyn = {"tokens": dyn_tok, "pos": {}, "past_k": cache, "past_v": cache}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), args, input_names=["tokens", "pos", *past],
                                 output_names=["logits", *present], dynamic_shapes=dyn,
                                 dynamo=True, opset_version=opset, optimize=True, verbose=False)
    proto = prog.model_proto
    proto.ir_version = 10  # what onnxruntime(-gpu) builds accept (docs/export.md)
    proto.producer_name = "ressformer-bench-dense"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- the dense runtime (numpy + onnxruntime) ------------------------------------------------------
class DenseSession:
    """Runs the dense graph: forward(tokens, state) with the key/value cache as explicit state
    (pos, cache tensors); prefill in chunks of `chunk` tokens, one run each. The cache stays in
    OrtValues from one run to the next (each present output is fed back as the next past input,
    never copied into numpy)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.sess.get_inputs()}
        self.layout = "stacked" if "past_k" in inputs else "per_layer"
        self.n_layer = inputs["past_k"][0] if self.layout == "stacked" else sum(n.startswith("past_k_") for n in inputs)
        self.past, self.present = cache_names(self.n_layer, self.layout)
        shape = inputs[self.past[0]]  # [..., batch, H, past, D]
        self.n_heads, self.head_dim = shape[-3], shape[-1]
        self.vocab_size = self.sess.get_outputs()[0].shape[2]

    def init_state(self, batch: int = 1) -> tuple:
        """(pos, cache): pos 0 and empty (P = 0) caches."""
        shape = (batch, self.n_heads, 0, self.head_dim)
        z = np.zeros((self.n_layer, *shape) if self.layout == "stacked" else shape, np.float32)
        return 0, tuple(ort.OrtValue.ortvalue_from_numpy(z) for _ in self.past)

    def forward(self, tokens, state: tuple | None = None, chunk: int = CHUNK):
        """tokens (B, T) int64 -> (logits (B, T, V) numpy, state (pos, cache OrtValues))."""
        tokens = np.ascontiguousarray(tokens, np.int64)
        pos, cache = state if state is not None else self.init_state(tokens.shape[0])
        out = []
        for i in range(0, tokens.shape[1], chunk):
            x = np.ascontiguousarray(tokens[:, i:i + chunk])
            feeds = {"tokens": ort.OrtValue.ortvalue_from_numpy(x),
                     "pos": ort.OrtValue.ortvalue_from_numpy(np.array(pos, np.int64)), **dict(zip(self.past, cache))}
            r = self.sess.run_with_ort_values(["logits", *self.present], feeds)
            out.append(r[0].numpy())
            cache = tuple(r[1:])
            pos += x.shape[1]
        return (out[0] if len(out) == 1 else np.concatenate(out, 1)), (pos, cache)

    def cache_arrays(self, state: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The state's keys and values as numpy arrays (n_layer, B, H, P, D)."""
        vals = [v.numpy() for v in state[1]]
        if self.layout == "stacked":
            return vals[0], vals[1]
        return np.stack(vals[:self.n_layer]), np.stack(vals[self.n_layer:])


# ---- measurement helpers ------------------------------------------------------------------------
def _med(ts) -> float:
    return float(np.median(ts))


def _plan(T: int, smoke: bool) -> tuple[int, int]:
    """(warm-up runs, timed rounds) of the prefill at length T. Lengths with one round (above 16k:
    a 32k dense prefill is minutes on 2 loaded cores) are timed once in the fresh child process
    that also measures the peak memory, instead of once more in this process."""
    if smoke:
        return 1, 2
    if T <= 4096:
        return 1, 5
    if T <= 16384:
        return 1, 3
    return 0, 1


def _predict(points: list, T: int) -> float | None:
    """Seconds at length T extrapolated from measured (length, seconds) points: a power law
    through the last two (exponent clamped to [1, 2]), quadratic from one; None without points."""
    if not points:
        return None
    T1, t1 = points[-1]
    e = 2.0
    if len(points) >= 2 and points[-2][0] != T1:
        T0, t0 = points[-2]
        e = min(max(math.log(t1 / t0) / math.log(T1 / T0), 1.0), 2.0)
    return t1 * (T / T1) ** e


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _dense_guard(T: int, dc: DenseConfig, chunk: int, points: list, max_point_s: float) -> str | None:
    """Why a dense prefill of T tokens should not be tried (None: try it). Memory: a chunk's
    score tensor (H x chunk x T floats; ONNX Runtime holds about three of them: scores, masked,
    softmax) against MemAvailable. Time: extrapolated from the lengths measured before."""
    scores = dc.n_heads * min(chunk, T) * T * 4
    avail = _mem_available_bytes()
    if avail is not None and 3 * scores > 0.8 * avail:
        return f"out of memory (predicted): 3 x {scores / 2**30:.1f} GiB score buffers, {avail / 2**30:.1f} GiB free"
    guess = _predict(points, T)
    if guess is not None and guess > max_point_s:
        return f"too slow (predicted {guess:.0f} s > {max_point_s:.0f} s)"
    return None


def _status(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    oom = isinstance(e, MemoryError) or any(s in str(e).lower() for s in ("allocate", "bad_alloc", "out of memory"))
    return ("out of memory: " if oom else "failed: ") + msg[:200]


def crossover(lengths, ratios) -> dict:
    """Where ReSSFormer becomes faster. ratios[i] = dense time / ReSSFormer time at lengths[i]
    (> 1: ReSSFormer faster; None: dense could not run, counted as a ReSSFormer win). A crossing
    between two measured lengths is interpolated linearly in (log length, log ratio)."""
    pts = [(T, math.inf if r is None else r) for T, r in zip(lengths, ratios)]
    if not pts:
        return {"length": None, "text": "no data"}
    lo, hi = pts[0][0], pts[-1][0]
    if all(r > 1 for _, r in pts):
        return {"length": None, "below": lo,
                "text": f"ReSSFormer faster at every measured length (crossover below {lo})"}
    if all(r <= 1 for _, r in pts):
        return {"length": None, "never": True,
                "text": f"ReSSFormer never faster from {lo} to {hi} (best ratio {max(r for _, r in pts):.2f})"}
    crossings = []
    for (T1, r1), (T2, r2) in zip(pts, pts[1:]):
        if (r1 > 1) == (r2 > 1):
            continue
        if math.isinf(r2):
            crossings.append({"length": None, "between": [T1, T2], "up": True,
                              "text": f"between {T1} and {T2} (dense could not run at {T2})"})
            continue
        x1, x2, y1, y2 = math.log(T1), math.log(T2), math.log(r1), math.log(r2)
        L = math.exp(x1 + (x2 - x1) * (0 - y1) / (y2 - y1))
        crossings.append({"length": L, "between": [T1, T2], "up": r2 > 1,
                          "text": f"~{L:,.0f} tokens ({'ReSSFormer' if r2 > 1 else 'dense'} faster above)"})
    first = next((c for c in crossings if c["up"]), crossings[0])
    return {"length": first["length"], "between": first["between"], "crossings": crossings,
            "text": "; ".join(c["text"] for c in crossings)}


# ---- child process: one engine at one length ------------------------------------------------------
def _status_mb(key: str) -> float | None:
    """VmHWM (peak) or VmRSS of this process in MB; see bench/stream_child.py for why not ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_main(engine: str, path: str, length: int, decode: int, threads: int, seed: int, chunk: int) -> dict:
    """In a fresh process: load one engine, prefill `length` random tokens (timed, one run), decode
    `decode` more one at a time from that state (one untimed warm-up token first); report the
    times and the peak RSS (VmHWM). Imports numpy + onnxruntime only, as a deployment would."""
    rng = np.random.default_rng(seed)
    if engine == "ressformer":
        from ressformer.runtime import ReSSFormerSession

        sess = ReSSFormerSession(path, threads=threads or None)
        run = lambda x, s: sess.forward(x, s, logits="last")[1]  # a prefill keeps the last logits only
    elif engine == "dense":
        sess = DenseSession(path, threads=threads or None)
        run = lambda x, s: sess.forward(x, s, chunk=chunk)[1]
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    loaded = _status_mb("VmRSS")
    x = rng.integers(0, sess.vocab_size, (1, length))
    t0 = time.perf_counter()
    state = run(x, None)
    prefill_s = time.perf_counter() - t0
    toks = rng.integers(0, sess.vocab_size, (decode, 1, 1))
    run(toks[0], state)  # warm-up: the first one-token run allocates
    s = state
    t0 = time.perf_counter()
    for t in toks:
        s = run(t, s)
    decode_s = time.perf_counter() - t0
    return {"engine": engine, "length": length, "status": "ok", "loaded_mb": loaded, "peak_mb": _status_mb("VmHWM"),
            "prefill_s": prefill_s, "decode_tok_s": decode / decode_s}


def _run_child(engine: str, path: Path, length: int, decode: int, threads: int | None, seed: int, chunk: int,
               timeout: float) -> dict:
    return run_child("ressformer.bench.dense", engine, length, timeout,
                     [engine, str(path), str(length), str(decode), str(threads or 0), str(seed), str(chunk)])


def run_child(module: str, engine: str, length: int, timeout: float, args: list[str], env: dict | None = None) -> dict:
    """`python -m MODULE --child ARGS` in a fresh process (this checkout first on the path); its last
    stdout line is the point's JSON. A timeout, the OOM killer or an error becomes the point's status."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    try:
        p = subprocess.run([sys.executable, "-m", module, "--child", *args], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "length": length, "status": f"too slow (over {timeout:.0f} s in the child)"}
    if p.returncode != 0:
        if p.returncode in (-9, 137):  # SIGKILL: the kernel's OOM killer
            return {"engine": engine, "length": length, "status": "out of memory (killed)"}
        err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit code {p.returncode}"
        return {"engine": engine, "length": length, "status": _status(RuntimeError(err))}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the comparison ---------------------------------------------------------------------------------
def run_comparison(preset: str = "small", lengths=None, threads: int | None = 2, decode_tokens: int = DECODE_TOKENS,
                   chunk: int = CHUNK, smoke: bool = False, memory: bool = True, seed: int = 0,
                   n_heads: int | None = None, max_point_s: float = MAX_POINT_S, checkpoint=None, export_dir=None,
                   layout: str = "per_layer", progress=print) -> dict:
    """Measure ReSSFormer against the dense GPT of the same parameter count, both in ONNX Runtime
    with `threads` intra-op threads (see the module doc). ReSSFormer: `checkpoint` (a folder), or
    the `preset` at random init (seed 0); `export_dir`: an existing fp32 export of it (skips
    exporting). The dense GPT is random init (torch seed `seed`): only speed and memory are
    compared; `layout`: its cache inputs (per_layer | stacked). `memory`: run the peak-memory
    children (they also time the lengths measured once). Returns the report dict; key "table"
    holds the printable summary."""
    import torch
    from ressformer.bench.run import _prepare

    progress = progress or (lambda s: None)
    if smoke:
        preset, lengths, decode_tokens = "tiny", lengths or SMOKE_LENGTHS, min(decode_tokens, 8)
    lengths = sorted(set(lengths or LENGTHS))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    if chunk < 1 or decode_tokens < 1:
        raise ValueError(f"chunk and decode_tokens must be >= 1, got {chunk}, {decode_tokens}")
    cache_names(1, layout)  # validates the layout
    t_all = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with tempfile.TemporaryDirectory(prefix="ressformer-dense-") as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            _, exp, model = _prepare(checkpoint, preset, export_dir, tmp, progress)
            cfg = model.config
            progress(f"ReSSFormer: {model.num_params():,} params, ready in {time.perf_counter() - t0:.1f}s")
            dc = matching_config(cfg, n_heads=n_heads)
            dense = dense_gpt(dc, seed)
            t0 = time.perf_counter()
            opset = int(json.loads((exp / "ressformer.json").read_text())["onnx_opset"])  # the same for both
            dense_path = export_dense(dense, tmp / "dense.onnx", opset=opset, layout=layout)
            progress(f"dense GPT: {dense.num_params():,} params ({dc.n_layer} layers, d {dc.d_model}, "
                     f"{dc.n_heads} heads, d_ff {dc.d_ff}), opset {opset}, exported in {time.perf_counter() - t0:.1f}s")
            report = {"meta": {
                "checkpoint": str(checkpoint) if checkpoint else None, "preset": None if checkpoint else preset,
                "smoke": smoke, "seed": seed, "threads": threads, "chunk": chunk, "layout": layout, "onnx_opset": opset,
                "decode_tokens": decode_tokens, "lengths": lengths,
                "ressformer_params": model.num_params(), "dense_params": dense.num_params(),
                "ressformer_config": cfg.to_dict(), "dense_config": asdict(dc),
                "onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": _cpu_name(),
                "loadavg_start": list(os.getloadavg())},
                "prefill": [], "decode": [], "memory": []}
            del model, dense
            in_process = [T for T in lengths if not (memory and _plan(T, smoke)[1] == 1)]
            points = {"ressformer": [], "dense": []}  # measured (length, prefill seconds)
            if in_process:
                from ressformer.runtime import ReSSFormerSession

                rs = ReSSFormerSession(exp, threads=threads)
                ds = DenseSession(dense_path, threads=threads)
                for T in in_process:
                    status = _dense_guard(T, dc, chunk, points["dense"], max_point_s)
                    p, d = _measure(rs, ds, T, status, decode_tokens, chunk, smoke, seed, progress)
                    report["prefill"].append(p)
                    report["decode"].append(d)
                    for eng in ENGINES:
                        if p[f"{eng}_s"]:
                            points[eng].append((T, p[f"{eng}_s"]))
                del rs, ds  # free this process's arenas before the children run
            if memory:
                _children(report, exp, dense_path, dc, lengths, in_process, points, decode_tokens, threads, seed,
                          chunk, max_point_s, progress)
    finally:
        torch.set_num_threads(old_threads)
    for key in ("prefill", "decode"):
        report[key].sort(key=lambda c: c["length"])
    report["crossover"] = {
        "prefill": crossover([c["length"] for c in report["prefill"]], [c["ratio"] for c in report["prefill"]]),
        "decode": crossover([c["length"] for c in report["decode"]], [c["ratio"] for c in report["decode"]])}
    report["meta"]["loadavg_end"] = list(os.getloadavg())
    report["meta"]["seconds"] = time.perf_counter() - t_all
    report["table"] = format_table(report)
    return report


def _measure(rs, ds, T, status, decode_tokens, chunk, smoke, seed, progress) -> tuple[dict, dict]:
    """Prefill at T, then decode from its state, in this process, the engines alternating
    (rotating order, medians). status: why dense is skipped (None: run it)."""
    rng = np.random.default_rng([seed, T])
    V = rs.vocab_size
    x = rng.integers(0, V, (1, T))
    warm, reps = _plan(T, smoke)
    states = {}

    def ress(x=x, states=states):
        states["ressformer"] = rs.forward(x, logits="last")[1]

    def dense(x=x, states=states):
        states["dense"] = ds.forward(x, chunk=chunk)[1]

    fns = {"ressformer": ress} if status else {"ressformer": ress, "dense": dense}
    progress(f"prefill {T}: {warm} warm-up + {reps} rounds of {' / '.join(fns)}"
             f"{f' (dense in chunks of {chunk})' if T > chunk and not status else ''}"
             f"{f'; dense skipped: {status}' if status else ''} ...")
    try:
        ts = _alternate(fns, reps, warm)
    except Exception as e:  # noqa: BLE001  (ORT raises its own types, e.g. on a failed allocation)
        status = _status(e)
        progress(f"  dense failed: {status}")
        states.pop("dense", None)
        ts = _alternate({"ressformer": ress}, reps, warm)
    p = {"length": T, "measured": "in process", "ressformer_s": _med(ts["ressformer"]),
         "dense_s": _med(ts["dense"]) if "dense" in ts else None, "dense_status": status or "ok", "runs": ts}
    p["ratio"] = p["dense_s"] / p["ressformer_s"] if p["dense_s"] else None
    progress(f"  ReSSFormer {p['ressformer_s']:.3f} s, dense {_fmt(p['dense_s'], 's', p['dense_status'])}")
    # decode after T tokens of context, from the prefill's state (neither engine mutates a state)
    toks = [rng.integers(0, V, (1, 1)) for _ in range(decode_tokens)]

    def ress_dec(s=states["ressformer"], toks=toks):
        for t in toks:
            s = rs.forward(t, s)[1]

    fns = {"ressformer": ress_dec}
    if "dense" in states:
        def dense_dec(s=states["dense"], toks=toks):
            for t in toks:
                s = ds.forward(t, s)[1]

        fns["dense"] = dense_dec
    dstatus = "ok" if "dense" in states else f"no prefill state ({p['dense_status']})"
    reps = 2 if smoke or T > 4096 else 3
    try:
        ts = _alternate(fns, reps, 1)
    except Exception as e:  # noqa: BLE001
        dstatus = _status(e)
        ts = _alternate({"ressformer": ress_dec}, reps, 1)
    d = {"length": T, "measured": "in process", "tokens": decode_tokens,
         "ressformer_tok_s": decode_tokens / _med(ts["ressformer"]),
         "dense_tok_s": decode_tokens / _med(ts["dense"]) if "dense" in ts else None,
         "dense_status": dstatus, "runs": ts}
    d["ratio"] = d["ressformer_tok_s"] / d["dense_tok_s"] if d["dense_tok_s"] else None
    progress(f"  decode after {T}: ReSSFormer {d['ressformer_tok_s']:.1f} tok/s, dense "
             f"{_fmt(d['dense_tok_s'], 'tok/s', dstatus)}")
    return p, d


def _fmt(x, unit: str, status: str) -> str:
    return f"{x:.3f} {unit}" if x else status


def _alternate(fns: dict, repeats: int, warmup: int) -> dict:
    from ressformer.bench.run import alternate

    return alternate(fns, repeats, warmup=warmup)


def _children(report, exp, dense_path, dc, lengths, in_process, points, decode_tokens, threads, seed, chunk,
              max_point_s, progress) -> None:
    """A fresh child process per engine and length (prefill, then decode): the peak RSS at every
    length, and the timings of the lengths not measured in this process (one run each)."""
    skip = {c["length"]: c["dense_status"] for c in report["prefill"] if c["dense_s"] is None}
    for T in lengths:
        once = T not in in_process
        if once and T not in skip:
            status = _dense_guard(T, dc, chunk, points["dense"], max_point_s)
            if status:
                skip[T] = status
        progress(f"{'prefill + decode + peak memory' if once else 'peak memory'} at {T} tokens "
                 f"(a fresh child process per engine{', one run each' if once else ''}) ...")
        row = {"length": T}
        for eng in ENGINES:
            if eng == "dense" and T in skip:
                r = {"engine": eng, "length": T, "status": skip[T]}
            else:
                guess = _predict(points[eng], T)
                timeout = 3 * guess + 120 if guess else 3600  # prefill, decode and start-up, with slack
                r = _run_child(eng, exp if eng == "ressformer" else dense_path, T, decode_tokens, threads, seed, chunk,
                               timeout=max(timeout, 120))
            row[eng] = r
            row[f"{eng}_peak_mb"] = r.get("peak_mb")
            if once and r.get("prefill_s"):
                points[eng].append((T, r["prefill_s"]))
        row["ratio"] = (row["dense_peak_mb"] / row["ressformer_peak_mb"]
                        if row["dense_peak_mb"] and row["ressformer_peak_mb"] else None)
        report["memory"].append(row)
        progress(f"  peak RSS ReSSFormer {_mb(row['ressformer'])}, dense {_mb(row['dense'])}")
        if once:
            rr, dr = row["ressformer"], row["dense"]
            if rr.get("status") != "ok":
                raise RuntimeError(f"ReSSFormer at {T} tokens: {rr.get('status')}")
            ok = dr.get("status") == "ok"
            p = {"length": T, "measured": "child, one run", "ressformer_s": rr["prefill_s"],
                 "dense_s": dr["prefill_s"] if ok else None, "dense_status": dr.get("status", "failed"),
                 "runs": {"ressformer": [rr["prefill_s"]], **({"dense": [dr["prefill_s"]]} if ok else {})}}
            p["ratio"] = p["dense_s"] / p["ressformer_s"] if ok else None
            d = {"length": T, "measured": "child, one run", "tokens": decode_tokens,
                 "ressformer_tok_s": rr["decode_tok_s"], "dense_tok_s": dr["decode_tok_s"] if ok else None,
                 "dense_status": dr.get("status", "failed") if ok else f"no prefill state ({p['dense_status']})"}
            d["ratio"] = d["ressformer_tok_s"] / d["dense_tok_s"] if ok else None
            report["prefill"].append(p)
            report["decode"].append(d)
            progress(f"  prefill ReSSFormer {p['ressformer_s']:.3f} s, dense "
                     f"{_fmt(p['dense_s'], 's', p['dense_status'])}; decode ReSSFormer "
                     f"{d['ressformer_tok_s']:.1f} tok/s, dense {_fmt(d['dense_tok_s'], 'tok/s', d['dense_status'])}")


def _mb(r: dict) -> str:
    return f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") else r.get("status", "?")


def _cpu_name() -> str:
    from ressformer.bench.run import _cpu_name as name

    return name()


# ---- output -------------------------------------------------------------------------------------
def format_table(report) -> str:
    m = report["meta"]
    dc = m["dense_config"]
    la0, la1 = m["loadavg_start"], m.get("loadavg_end", m["loadavg_start"])
    lines = [
        f"ReSSFormer {m['checkpoint'] or m['preset']} ({m['ressformer_params']:,} params) vs dense GPT "
        f"({m['dense_params']:,} params: "
        f"{dc['n_layer']} layers, d {dc['d_model']}, {dc['n_heads']} heads, d_ff {dc['d_ff']}, RoPE)"
        f"{' [smoke]' if m['smoke'] else ''}",
        f"both on ONNX Runtime {m['onnxruntime']}, threads={m['threads'] or 'default'}, batch 1; {m['machine']}, "
        f"{m['cpu_count']} CPUs; load avg (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end",
        f"dense prefill runs in chunks of {m['chunk']} tokens with the key/value cache (one piece of 32k would "
        f"need a 32k x 32k score matrix per head); cache layout {m['layout']}; both at ONNX opset {m['onnx_opset']}",
        f"decode: {m['decode_tokens']} tokens, one run each, from the prefill's state; peak = VmHWM of a fresh "
        "process per engine and length (prefill + decode); ratio > 1: ReSSFormer faster / smaller",
        "medians of alternating rounds in one process; * = one run each in the fresh child process",
        "",
        f"{'length':>8} | {'prefill ReSSF':>13} {'prefill dense':>14} {'ratio':>6} | {'decode ReSSF':>12} "
        f"{'decode dense':>12} {'ratio':>6} | {'peak ReSSF':>10} {'peak dense':>10} {'ratio':>6}",
    ]
    mem = {r["length"]: r for r in report.get("memory", [])}
    for p, d in zip(report["prefill"], report["decode"]):
        T = p["length"]
        r = mem.get(T)
        pd = f"{p['dense_s']:11.3f} s" if p["dense_s"] else f"{_short(p['dense_status']):>13}"
        dd = f"{d['dense_tok_s']:6.1f} tok/s" if d["dense_tok_s"] else f"{_short(d['dense_status']):>12}"
        if r:
            rm = f"{_mbcell(r['ressformer']):>10} {_mbcell(r['dense']):>10} {_ratio(r['ratio'])}"
        else:
            rm = f"{'-':>10} {'-':>10} {'-':>6}"
        star = "*" if p.get("measured", "").startswith("child") else " "
        lines.append(f"{T:>7}{star} | {p['ressformer_s']:11.3f} s {pd} {_ratio(p['ratio'])} | "
                     f"{d['ressformer_tok_s']:6.1f} tok/s {dd} {_ratio(d['ratio'])} | {rm}")
    timed = {p["length"] for p in report["prefill"] if not p.get("measured", "").startswith("child")}
    checks = [r for r in report.get("memory", []) if r["length"] in timed]
    if checks:  # the memory children's own single runs: a second sample of the in-process medians
        lines += ["", "cross-check, one run each in the memory children (no alternation):"]
        for r in checks:
            ok = [r[e].get("status") == "ok" for e in ENGINES]
            pre = [f"{r[e]['prefill_s']:.3f} s" if k else "-" for e, k in zip(ENGINES, ok)]
            dec = [f"{r[e]['decode_tok_s']:.1f} tok/s" if k else "-" for e, k in zip(ENGINES, ok)]
            pr = _ratio(r["dense"]["prefill_s"] / r["ressformer"]["prefill_s"] if all(ok) else None).strip()
            dr = _ratio(r["ressformer"]["decode_tok_s"] / r["dense"]["decode_tok_s"] if all(ok) else None).strip()
            lines.append(f"{r['length']:>8} | prefill {pre[0]} vs {pre[1]} (ratio {pr}) | "
                         f"decode {dec[0]} vs {dec[1]} (ratio {dr})")
    cx = report.get("crossover", {})
    if cx:
        lines += ["", f"crossover, prefill: {cx['prefill']['text']}", f"crossover, decode:  {cx['decode']['text']}"]
    notes = sorted({s for c in report["prefill"] + report["decode"] for s in [c["dense_status"]] if s != "ok"})
    lines += [f"dense: {s}" for s in notes]
    return "\n".join(lines)


def _short(s: str) -> str:
    return "OOM" if s.startswith("out of memory") else "too slow" if s.startswith("too slow") else \
        "n/a" if s.startswith("no prefill") else "failed"


def _mbcell(r: dict) -> str:
    return f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") else _short(r.get("status", "failed"))


def _ratio(x) -> str:
    return f"{x:6.2f}" if x else f"{'-':>6}"


def plot(report, path) -> Path:
    """PNG: prefill time vs length, decode tokens/s vs context, peak RSS vs length (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [("prefill", "s", "prefill latency (s, median)", "prefill, batch 1", True),
              ("decode", "tok_s", "decode tokens/s (median)", "decode after the context", False),
              ("memory", "peak_mb", "peak RSS (MB, fresh process)", "peak memory (prefill + decode)", True)]
    for ax, (key, field, ylabel, title, logy) in zip(axes, panels):
        rows = report.get(key, [])
        for eng, style, label in (("ressformer", "s-", "ReSSFormer"), ("dense", "o-", "dense GPT")):
            pts = [(r["length"], r[f"{eng}_{field}"]) for r in rows if r.get(f"{eng}_{field}")]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
            for r in rows:
                if not r.get(f"{eng}_{field}") and eng == "dense":
                    ax.axvline(r["length"], color="C1", ls=":", alpha=0.6)
                    ax.annotate("dense: " + _short(r.get("dense_status") or r["dense"].get("status", "failed")),
                                (r["length"], 0.5), xycoords=("data", "axes fraction"), rotation=90,
                                ha="right", va="center", fontsize=8, color="C1")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = report["meta"]
    fig.suptitle(f"ReSSFormer {m['checkpoint'] or m['preset']} ({m['ressformer_params']:,} params) vs dense GPT "
                 f"({m['dense_params']:,}), ONNX Runtime, threads={m['threads'] or 'default'}, load avg "
                 f"{m['loadavg_start'][0]:.1f}")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure atomically (a temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_json(report, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, path)


def _lengths(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lengths takes comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--lengths takes positive integers, got {s!r}")
    return out


def main(argv=None):
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        engine, path, length, decode, threads, seed, chunk = argv[1:8]
        print(json.dumps(child_main(engine, path, int(length), int(decode), int(threads), int(seed), int(chunk))))
        return
    p = argparse.ArgumentParser(prog="python -m ressformer.bench.dense", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="a ReSSFormer checkpoint (default: --preset at random init)")
    p.add_argument("--preset", default="small")
    p.add_argument("--export-dir", help="an existing fp32 export of CHECKPOINT (skips exporting)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=_lengths, help="comma-separated prefill/context lengths (default 2048,8192,32768)")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    p.add_argument("--chunk", type=int, default=CHUNK, help="dense prefill tokens per ONNX Runtime run")
    p.add_argument("--layout", choices=LAYOUTS, default="per_layer",
                   help="dense cache inputs: one tensor per layer (default) or stacked (n_layer, B, H, P, D)")
    p.add_argument("--heads", type=int, help="dense attention heads (default: head_dim 64)")
    p.add_argument("--max-point-seconds", type=float, default=MAX_POINT_S,
                   help="skip a dense length whose predicted prefill takes longer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 64/128 tokens (CI)")
    p.add_argument("--json")
    p.add_argument("--plot")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    rep = run_comparison(preset=a.preset, lengths=a.lengths, threads=a.threads, decode_tokens=a.decode_tokens,
                         chunk=a.chunk, smoke=a.smoke, memory=not a.no_memory, n_heads=a.heads,
                         max_point_s=a.max_point_seconds, checkpoint=a.checkpoint, export_dir=a.export_dir,
                         layout=a.layout, progress=lambda s: print(s, flush=True))
    print(rep["table"])
    if a.json:
        _write_json(rep, a.json)
    if a.plot:
        plot(rep, a.plot)


if __name__ == "__main__":
    main()

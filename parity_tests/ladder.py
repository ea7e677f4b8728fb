"""The parity ladder: ONNX Runtime against PyTorch, rung by rung, so a mismatch is pinned to
where it starts.

  1 ops      each `ressformer` op function shipped in the export's graphs, against the PyTorch kernel
  2 step     one recurrent step (step.onnx), and one piece through the K unrolled steps
             (piece_kK.onnx), on a real mid-sequence state
  3 segment  the forward of one segment (unrolled graphs; the step graphs on one case)
  4 stream   several segments with the memory and caches carried
  5 decode   token-by-token decoding with the per-step key/value caches
  6 generate greedy generation: identical tokens

Tie awareness: top-k key selection and expert routing are discrete. Where the selected set of
a query (or token) differs between PyTorch and ORT, that is a flip; its margin is PyTorch's
gap between the last selected and the first unselected score (logit). A flip is accepted only
when its margin is below FLIP_EPS; outputs at and after the first accepted flip are then left
out of the numeric comparison (they legitimately differ); any other flip fails.

Tolerances live in TOLERANCES (docs/parity.md gives the measured distributions behind them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from ressformer.export.ops import DOMAIN, OPSET_VERSION
from ressformer.runtime import ReSSFormerSession
from ressformer.runtime.session import reference_index
from ressformer.runtime.sidecar import read_sidecar

from ressformer import ops as tops

from .quality import BUDGETS, check_quality

# (a, r) per export mode and rung: an output passes iff, elementwise,
#   |ort - torch| <= a * max|torch| + r * |torch|
# i.e. an absolute tolerance relative to the tensor's scale plus a relative one. See
# docs/parity.md for the measured error distributions these are set from.
TOLERANCES = {
    "fp32": {"ops": (1e-6, 1e-5), "step": (1e-5, 1e-4), "segment": (2e-5, 1e-4), "stream": (5e-5, 2e-4),
             "decode": (5e-5, 2e-4)},
    # fp16 / int8: the `a` each rung needed at these `r` (max over its rows), measured 2026-11-25 on
    # a trained tiny (600 steps, 2.87 val bpb) / the tests' perturbed tiny / a random-init small:
    #   fp16 step 2.1e-4 / 2.2e-4 / 1.6e-4, segment 3.5e-4 / 2.2e-4 / 1.9e-4,
    #        stream 2.2e-4 / 3.4e-4 / 2.0e-4, decode 7.6e-4 / 3.0e-2 / 0.24;
    #   int8 step 5.9e-3 / 3.0e-3 / 6.4e-3, segment 7.2e-3 / 8.3e-3 / 3.6e-3,
    #        stream 7.1e-3 / 8.9e-3 / 4.6e-3, decode 9.2e-2 / 0.19 / 0.46.
    # Set to ~10x the worst of these; the decode rung has no flip handling (it compares every
    # position even after a selection flip), so its tolerance is wider and a random-init model,
    # whose scores are near-ties everywhere, still fails it. Judged flip margins: fp16 <= 4.1e-3,
    # int8 <= 2.7e-2 (under FLIP_EPS). int8 = every weight MatMul quantized (export/exporter.py).
    "fp16": {"ops": (1e-6, 1e-5), "step": (2e-3, 2e-2), "segment": (3e-3, 5e-2), "stream": (3e-3, 5e-2),
             "decode": (5e-2, 5e-2)},
    "int8": {"ops": (1e-6, 1e-5), "step": (5e-2, 1e-1), "segment": (8e-2, 1e-1), "stream": (8e-2, 1e-1),
             "decode": (3e-1, 1e-1)},
}
FLIP_EPS = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}  # margin (score / logit units) under which a flip is a tie


@dataclass
class Row:
    rung: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    flips: int = 0
    max_flip_margin: float = 0.0
    compared: int = 0
    passed: bool = True
    note: str = ""


@dataclass
class Report:
    mode: str
    rows: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.passed), None)

    def table(self) -> str:
        hdr = f"{'rung':8} {'case':40} {'output':12} {'max_abs':>9} {'max_rel':>9} {'mean_abs':>9} " \
              f"{'flips':>5} {'margin':>9}  ok"
        lines = [hdr, "-" * len(hdr)]
        for r in self.rows:
            lines.append(f"{r.rung:8} {r.case[:40]:40} {r.output[:12]:12} {r.max_abs:9.2e} {r.max_rel:9.2e} "
                         f"{r.mean_abs:9.2e} {r.flips:5d} {r.max_flip_margin:9.2e}  "
                         f"{'ok' if r.passed else 'FAIL'}{' ' + r.note if r.note else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        f = self.first_failure()
        return {"mode": self.mode, "passed": self.passed, "first_failing_rung": f.rung if f else None,
                "rows": [asdict(r) for r in self.rows], "summary": self.table()}


def compare(rung, case, name, got, ref, tol, flips=0, margin=0.0, note="") -> Row:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    atol, rtol = tol
    if got.shape != ref.shape:
        return Row(rung, case, name, math.inf, math.inf, math.inf, atol, rtol, flips, margin, 0, False,
                   f"shape {got.shape} != {ref.shape}")
    if got.size == 0:
        return Row(rung, case, name, 0.0, 0.0, 0.0, atol, rtol, flips, margin, 0, True, note or "nothing compared")
    with np.errstate(invalid="ignore"):
        d = np.where(got == ref, 0.0, np.abs(got - ref))  # equal infinities are equal
        d = np.where(np.isnan(d), np.inf, d)  # NaN where PyTorch has a number is an infinite error
        scale = float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 0.0
        ok = bool((d <= atol * scale + rtol * np.abs(ref)).all())
        rel = d / np.maximum(np.abs(ref), 1e-6)
    return Row(rung, case, name, float(d.max()), float(rel.max()), float(d.mean()), atol, rtol,
               flips, margin, int(got.size), ok, note)


# ---- torch side with recorded selections ---------------------------------------------------------
class Recorder:
    """Records every attention call's (q, keys, mask, idx, w) and router logits in the model."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.attn, self.moe = [], []
        for b in self.model.blocks:
            b.attn.record, b.moe.record = self.attn, self.moe
        return self

    def __exit__(self, *exc):
        for b in self.model.blocks:
            b.attn.record = b.moe.record = None


def key_flips(rec: dict, ort_idx: np.ndarray, scale: float, top_k: int):
    """Per query (B, H, T): does ORT's selected (unmasked) key set differ from PyTorch's? Returns
    (flip mask (B, H, T), margins of the flipped queries)."""
    mask = rec["mask"].numpy()  # (T, N)
    t_idx = rec["idx"].numpy()
    flips = _set_diff(t_idx, ort_idx, mask)
    if not flips.any():
        return flips, np.zeros(0)
    s = (rec["q"] @ rec["keys"].transpose(-1, -2)).double().numpy() * scale  # (B, H, T, N)
    s = np.where(mask[None, None], s, -np.inf)
    srt = -np.sort(-s, -1)
    kk = t_idx.shape[-1]
    if kk >= s.shape[-1]:
        margins = np.zeros(int(flips.sum()))
    else:
        gap = srt[..., kk - 1] - srt[..., kk]
        margins = np.where(np.isfinite(gap), gap, 0.0)[flips]
    return flips, margins


def _set_diff(t_idx, o_idx, mask):
    T = t_idx.shape[2]
    rows = np.arange(T)[None, None, :, None]
    tv = np.where(mask[rows, t_idx], t_idx, -1)
    ov = np.where(mask[rows, np.clip(o_idx, 0, mask.shape[1] - 1)], o_idx, -1)
    return (np.sort(tv, -1) != np.sort(ov, -1)).any(-1)


def expert_flips(rec: dict, ort_experts: np.ndarray):
    t = rec["experts"].numpy()
    flips = (np.sort(t, -1) != np.sort(ort_experts, -1)).any(-1)  # (B, T)
    if not flips.any():
        return flips, np.zeros(0)
    lg = -np.sort(-rec["logits"].double().numpy(), -1)
    e = t.shape[-1]
    gap = lg[..., e - 1] - lg[..., e] if e < lg.shape[-1] else np.zeros(lg.shape[:-1])
    return flips, gap[flips]


# ---- the ladder ---------------------------------------------------------------------------------
class Ladder:
    def __init__(self, model, export_dir, provider="cpu", mode=None, progress=None, threads=None):
        self.model = model.eval()
        self.cfg = model.config
        self.dir = export_dir
        # max_piece=None: the session cuts pieces at segment ends only, as the diagnostics accounting expects
        self.sess = ReSSFormerSession(export_dir, provider=provider, threads=threads, max_piece=None)
        meta = self.sess.meta
        self.mode = mode or ("int8" if meta.get("quantize") == "int8" else meta.get("dtype", "fp32"))
        self.tol = TOLERANCES[self.mode]
        self.eps = FLIP_EPS[self.mode]
        self.report = Report(self.mode)
        self.progress = progress or (lambda s: None)
        self.scale = 1.0 / math.sqrt(self.cfg.head_dim)

    def add(self, row: Row):
        self.report.rows.append(row)
        return row

    # rung 1 -------------------------------------------------------------------------------------
    def rung_ops(self, seed=0):
        """Each op function as shipped inside step.onnx and each unrolled piece graph, run alone in
        ORT, against PyTorch."""
        names = [u["piece"] for u in self.sess.meta["unrolled"].values()]
        if self.sess.has_step_graphs:
            names.insert(0, "step")
        for name in names:
            self._ops_of(name, seed)

    def _ops_of(self, graph: str, seed):
        proto = onnx.load(str(self.sess.dir / self.sess.meta["graphs"][graph]["file"]), load_external_data=False)
        funcs = [f for f in proto.functions if f.domain == DOMAIN]
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        where = "" if graph == "step" else f" ({graph})"
        for op_name in ("Entmax15", "Sparsemax", "Entmax15Sorted", "SparsemaxSorted", "SafeSoftmax", "TopKRoute",
                        "TopKAttention"):
            m = _op_model(op_name, funcs, opset, cfg)
            s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            if op_name == "TopKAttention":
                B, H, T, N, D = 2, cfg.n_heads, 9, cfg.top_k + 5, cfg.head_dim
                q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, N, N))
                mask = torch.ones(T, N, dtype=torch.bool).tril(N - T)
                mask[0] = False
                feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "mask": mask.numpy()}
                o, idx, w = s.run(None, feeds)
                ro, ridx, rw = tops.topk_attention_kernel(q, k, v, mask, cfg.top_k, cfg.normalizer, self.scale)
                fl = _set_diff(ridx.numpy(), idx, mask.numpy())
                self.add(compare("ops", f"TopKAttention[{cfg.normalizer}]{where}", "O", o, ro.numpy(),
                                 self.tol["ops"], flips=int(fl.sum())))
                self.rows_fail_on_flips(fl)
            elif op_name == "TopKRoute":
                x = torch.randn(37, cfg.n_experts, generator=g)
                gates, ex = s.run(None, {"logits": x.numpy()})
                rg, rex = tops.topk_route_kernel(x, cfg.top_e)
                fl = (np.sort(ex, -1) != np.sort(rex.numpy(), -1)).any(-1)
                self.add(compare("ops", f"TopKRoute{where}", "gates", gates, rg.numpy(), self.tol["ops"],
                                 flips=int(fl.sum())))
                self.rows_fail_on_flips(fl)
            else:
                x = torch.randn(23, cfg.top_k + 1, generator=g) * 3
                x[0] = float("-inf")
                x[1, ::2] = float("-inf")
                if op_name.endswith("Sorted"):  # their input is TopK's output: sorted, descending
                    x = x.sort(-1, descending=True).values
                kern = {"Entmax15": tops.entmax15_kernel, "Sparsemax": tops.sparsemax_kernel,
                        "Entmax15Sorted": tops.entmax15_kernel, "SparsemaxSorted": tops.sparsemax_kernel,
                        "SafeSoftmax": tops.softmax_kernel}[op_name]
                y = s.run(None, {"X": x.numpy()})[0]
                self.add(compare("ops", op_name + where, "Y", y, kern(x).numpy(), self.tol["ops"]))

    def rows_fail_on_flips(self, flips):
        if flips.any():  # random op inputs have no near-ties: any flip is a bug
            r = self.report.rows[-1]
            r.passed, r.note = False, f"{int(flips.sum())} selection flips on random inputs"

    # rungs 2-5 ----------------------------------------------------------------------------------
    def run_pieces(self, tokens: np.ndarray, pieces: list[int], steps: int, case: str, rung: str,
                   check_state: bool = False, path: str | None = None):
        """Feed `tokens` in pieces of the given lengths to both sides, with diagnostics; compare
        logits (up to the first accepted flip) and, if check_state, the final memory."""
        sess, model = self.sess, self.model
        path = sess.path_for(steps, path)
        case = f"{case} {path}"
        t_state, o_state = None, None
        t_logits, o_logits = [], []
        n_flips, margins, first_flip = 0, [], None
        pos = 0
        for n in pieces:
            x = tokens[:, pos:pos + n]
            diag = []
            with torch.no_grad(), Recorder(model) as rec:
                out = model(torch.from_numpy(x), t_state, steps=steps)
            lo, o_state = sess.forward(x, o_state, steps=steps, path=path, diagnostics=diag)
            t_state = out.state
            t_logits.append(out.logits.numpy())
            o_logits.append(lo)
            # diagnostics come per (sub-piece, step); the recorder saw the same calls in order. The
            # session cuts a piece at segment boundaries: call c belongs to sub-piece c // steps.
            starts, i = [], 0
            while i < n:
                starts.append(pos + i)
                i += min(n - i, self.cfg.segment_len - (pos + i) % self.cfg.segment_len)
            for c, (ra, rm, d) in enumerate(zip(rec.attn, rec.moe, diag)):
                kf, km = key_flips(ra, d["attn_idx"], self.scale, self.cfg.top_k)
                ef, em = expert_flips(rm, d["experts"])
                n_flips += int(kf.sum()) + int(ef.sum())
                # absolute positions of the flipped queries / tokens, in the order of their margins
                where = starts[c // steps] + np.concatenate([np.nonzero(kf)[2], np.nonzero(ef)[1]])
                ms = np.concatenate([np.asarray(km, np.float64), np.asarray(em, np.float64)])
                # Judge a flip's margin only where both sides still compute on the same values:
                # before the earliest flip of an earlier call (causal: a flip at p changes nothing
                # before p). Later flips follow from the divergence and can have any margin.
                margins += list(ms if first_flip is None else ms[where < first_flip])
                if where.size:
                    first_flip = int(where.min()) if first_flip is None else min(first_flip, int(where.min()))
            pos += n
        tl, ol = np.concatenate(t_logits, 1), np.concatenate(o_logits, 1)
        max_margin = float(max(margins)) if margins else 0.0
        bad_flip = any(m >= self.eps for m in margins)
        upto = tl.shape[1] if first_flip is None else first_flip
        note = "" if first_flip is None else f"compared up to position {upto} (first accepted flip)"
        row = self.add(compare(rung, case, "logits", ol[:, :upto], tl[:, :upto], self.tol[rung],
                               flips=n_flips, margin=max_margin, note=note))
        if bad_flip:
            row.passed = False
            row.note = f"flip with margin {max_margin:.2e} >= eps {self.eps:.0e}"
        if check_state and first_flip is None:
            self.add(compare(rung, case, "memory", _h(o_state.memory), t_state.memory.detach().numpy(), self.tol[rung]))
            for t in range(steps):
                self.add(compare(rung, case, f"cache_k[{t}]", _h(o_state.cache_k)[t],
                                 t_state.cache_k[t].detach().numpy(), self.tol[rung]))
            if o_state.mem_k is not None:  # the unrolled path carries the memory's keys/values
                with torch.no_grad():
                    mk, mv = model.blocks[0].memory_kv(t_state.memory)
                self.add(compare(rung, case, "mem_k", _h(o_state.mem_k), mk.numpy(), self.tol[rung]))
                self.add(compare(rung, case, "mem_v", _h(o_state.mem_v), mv.numpy(), self.tol[rung]))
        return tl, ol, first_flip

    def rung_step(self, batch=2, seed=0):
        """One step on a mid-sequence state: h_out, present keys/values, attention weights."""
        cfg, model, sess = self.cfg, self.model, self.sess
        rng = np.random.default_rng(seed)
        L = cfg.segment_len
        warm = rng.integers(0, cfg.vocab_size, (batch, L + L // 2 + 1))  # one segment + some: cache, memory, past
        with torch.no_grad():
            st = model(torch.from_numpy(warm)).state
        x = rng.integers(0, cfg.vocab_size, (batch, min(16, L - st.pos % L)))  # the rest of the segment
        if sess.has_step_graphs:
            self._step_graph(st, x, batch)
        for steps, names in sorted(sess.unrolled.items()):
            self._piece_on_state(st, x, steps, names["piece"], batch)

    def _step_graph(self, st, x, batch):
        """step.onnx, step by step, on the state st and piece x, against model.step."""
        cfg, model, sess = self.cfg, self.model, self.sess
        with torch.no_grad():
            h, _ = model.embed_tokens(torch.from_numpy(x), st.conv, st.pos)
            for t in range(cfg.n_steps):
                with Recorder(model) as rec:
                    th, tk, tv, tidx, tw, tex, _ = model.step(t, h, st.memory, st.cache_k[t], st.cache_v[t],
                                                             st.cache_valid, st.past_k[t], st.past_v[t], st.pos)
                r = sess.graphs["step"].run({
                    "h": h.numpy(), "step": np.array(t), "pos": np.array(st.pos), "memory": st.memory.numpy(),
                    "cache_k": st.cache_k[t].numpy(), "cache_v": st.cache_v[t].numpy(),
                    "cache_valid": np.array(st.cache_valid), "past_k": st.past_k[t].numpy(),
                    "past_v": st.past_v[t].numpy()})
                kf, km = key_flips(rec.attn[0], r["attn_idx"], self.scale, cfg.top_k)
                ef, em = expert_flips(rec.moe[0], r["experts"])
                margins = list(km) + list(em)
                mx = float(max(margins)) if margins else 0.0
                case = f"B={batch} t={t}"
                # Within one step a flip changes h_out at its own position only (keys, values and
                # the other queries' selections do not depend on it): leave flipped positions out.
                flipped = kf.any(1) | ef  # (B, T)
                note = f"{int(flipped.sum())} flipped positions left out" if flipped.any() else ""
                row = self.add(compare("step", case, "h_out", r["h_out"][~flipped], th.numpy()[~flipped],
                                       self.tol["step"], flips=int(kf.sum() + ef.sum()), margin=mx,
                                       note=note))
                if margins and mx >= self.eps:
                    row.passed, row.note = False, f"flip with margin {mx:.2e} >= eps {self.eps:.0e}"
                if not (kf.any() or ef.any()):
                    self.add(compare("step", case, "present_k", r["present_k"],
                                     torch.cat([st.past_k[t], tk], -2).numpy(), self.tol["step"]))
                    self.add(compare("step", case, "attn_w", r["attn_w"], tw.numpy(), self.tol["step"]))
                h = th

    def _piece_on_state(self, st, x, steps, graph, batch):
        """The unrolled piece graph on the same mid-sequence state: logits and present keys."""
        model, sess = self.model, self.sess
        if st.steps != steps:
            return
        with torch.no_grad(), Recorder(model) as rec:
            out = model(torch.from_numpy(x), st, steps=steps)
            mk, mv = model.blocks[0].memory_kv(st.memory)
        P, cap = st.pos % self.cfg.segment_len, self.cfg.segment_len  # the past in buffers of a whole segment
        buf = lambda a: np.concatenate([a.numpy(), np.zeros((*a.shape[:-2], cap - P, a.shape[-1]), np.float32)], -2)  # noqa: E731
        feeds = {"tokens": x, "pos": np.array(st.pos), "conv": st.conv.numpy(), "mem_k": mk.numpy(),
                 "mem_v": mv.numpy(), "cache_valid": np.array(st.cache_valid)}
        for t in range(steps):
            feeds |= {f"cache_k_{t}": st.cache_k[t].numpy(), f"cache_v_{t}": st.cache_v[t].numpy(),
                      f"past_k_{t}": buf(st.past_k[t]), f"past_v_{t}": buf(st.past_v[t])}
        r = sess.graphs[graph].run(feeds)
        n_flips, margins = 0, []
        idx = reference_index(r["attn_idx"], self.cfg.mem_slots + self.cfg.cache_len, cap, P)
        for t in range(steps):
            kf, km = key_flips(rec.attn[t], idx[t], self.scale, self.cfg.top_k)
            ef, em = expert_flips(rec.moe[t], r["experts"][t])
            n_flips += int(kf.sum() + ef.sum())
            margins += list(km) + list(em)
        mx = float(max(margins)) if margins else 0.0
        case = f"B={batch} {graph}"
        if n_flips:  # a flip changes later steps at and after its position: compare nothing numeric
            row = self.add(Row("step", case, "logits", 0.0, 0.0, 0.0, 0.0, 0.0, compared=0, passed=mx < self.eps,
                               flips=n_flips, max_flip_margin=mx, note="selection flips: numbers not compared"))
            return row
        self.add(compare("step", case, "logits", r["logits"], out.logits.numpy(), self.tol["step"]))
        if out.state.pos % self.cfg.segment_len:
            self.add(compare("step", case, "new_k", r["new_k"], out.state.past_k[..., P:, :].numpy(), self.tol["step"]))

    def rung_segment(self, batch, length, seed=0, steps=None, path=None):
        steps = steps or self.cfg.n_steps
        x = np.random.default_rng(seed).integers(0, self.cfg.vocab_size, (batch, length))
        self.run_pieces(x, [length], steps, f"B={batch} T={length} K={steps}", "segment", path=path)

    def rung_stream(self, batch, length, seed=0, steps=None, path=None):
        steps = steps or self.cfg.n_steps
        x = np.random.default_rng(seed).integers(0, self.cfg.vocab_size, (batch, length))
        rng = np.random.default_rng(seed + 1)
        pieces, left = [], length
        while left:
            n = int(min(left, rng.integers(1, self.cfg.segment_len + 7)))
            pieces.append(n)
            left -= n
        self.run_pieces(x, pieces, steps, f"B={batch} T={length} K={steps} pieces", "stream", check_state=True,
                        path=path)

    def rung_decode(self, batch, length, seed=0, steps=None, path=None):
        """Prefill half, then one token at a time with the per-step caches (flip-aware)."""
        steps = steps or self.cfg.n_steps
        x = np.random.default_rng(seed).integers(0, self.cfg.vocab_size, (batch, length))
        half = length // 2
        pieces = ([half] if half else []) + [1] * (length - half)
        self.run_pieces(x, pieces, steps, f"B={batch} T={length} K={steps}", "decode", path=path)

    def rung_generate(self, prompt="The ", new_tokens=128, steps=None, path=None):
        """Greedy generation: PyTorch (incremental, with its own state) vs the runtime."""
        steps = steps or self.cfg.n_steps
        path = self.sess.path_for(steps, path)
        ids = np.frombuffer(prompt.encode(), np.uint8).astype(np.int64)
        got = list(self.sess.generate(ids, max_new_tokens=new_tokens, temperature=0, steps=steps, path=path))
        ref, margins = [], []
        with torch.no_grad():
            out = self.model(torch.from_numpy(ids)[None], steps=steps)
            for _ in range(new_tokens):
                lg = out.logits[0, -1].double()
                top2 = lg.topk(2).values
                margins.append(float(top2[0] - top2[1]))
                tok = int(lg.argmax())
                ref.append(tok)
                out = self.model(torch.tensor([[tok]]), out.state, steps=steps)
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        row = Row("generate", f"greedy {new_tokens} K={steps} {path}", "tokens", 0.0 if same is None else 1.0, 0.0, 0.0,
                  0.0, 0.0, compared=new_tokens, passed=same is None)
        if same is not None:
            row.note = f"first differing token at {same} (PyTorch top-2 logit gap there {margins[same]:.2e})"
            if margins[same] < self.eps:
                row.passed, row.flips = True, 1
                row.max_flip_margin = margins[same]
                row.note += ": accepted tie"
        self.add(row)


def _h(v):
    return v.numpy() if isinstance(v, ort.OrtValue) else np.asarray(v)


def _op_model(op_name, funcs, opset, cfg) -> onnx.ModelProto:
    """A one-node model calling `op_name` with the export's own FunctionProtos."""
    from onnx import TensorProto, helper

    if op_name == "TopKAttention":
        ins, outs = ["Q", "K", "V", "mask"], ["O", "idx", "W"]
        attrs = {"top_k": cfg.top_k, "scale": 1.0 / math.sqrt(cfg.head_dim), "normalizer": cfg.normalizer}
        in_vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 4) for n in ins[:3]] + \
                [helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, None])]
        out_vi = [helper.make_tensor_value_info("O", TensorProto.FLOAT, [None] * 4),
                  helper.make_tensor_value_info("idx", TensorProto.INT64, [None] * 4),
                  helper.make_tensor_value_info("W", TensorProto.FLOAT, [None] * 4)]
    elif op_name == "TopKRoute":
        ins, outs, attrs = ["logits"], ["gates", "experts"], {"k": cfg.top_e}
        in_vi = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None])]
        out_vi = [helper.make_tensor_value_info("gates", TensorProto.FLOAT, [None, None]),
                  helper.make_tensor_value_info("experts", TensorProto.INT64, [None, None])]
    else:
        ins, outs, attrs = ["X"], ["Y"], {}
        in_vi = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None])]
        out_vi = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None])]
    node = helper.make_node(op_name, ins, outs, domain=DOMAIN, **attrs)
    m = helper.make_model(helper.make_graph([node], op_name, in_vi, out_vi),
                          opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    m.functions.extend(funcs)
    m.ir_version = 10
    return m


# ---- entry points ---------------------------------------------------------------------------------
def run_ladder(model, export_dir, lengths=None, batches=(1, 3), steps_list=None, provider="cpu",
               generate_tokens=128, progress=None, mode=None, threads=None) -> dict:
    """The whole ladder (the `ressformer parity` command). Returns the report as a dict. A
    quantized export is checked on quality instead (parity_tests/quality.py)."""
    if _quantized(export_dir):
        return check_quality(model, export_dir, threads=threads, progress=progress)
    lad = Ladder(model, export_dir, provider=provider, mode=mode, progress=progress, threads=threads)
    cfg = model.config
    k, L = cfg.top_k, cfg.segment_len
    lengths = lengths or sorted({1, max(k - 1, 1), k, k + 1, 257, 2 * L + 3})
    # other K run on the step graphs, or on the unrolled graphs exported for them
    other = {1, cfg.n_steps + 2} if lad.sess.has_step_graphs else set(lad.sess.unrolled)
    steps_list = steps_list or sorted({cfg.n_steps} | other)
    say = progress or (lambda s: None)
    say("rung ops: each ressformer op")
    lad.rung_ops()
    say("rung step: one recurrent step, one unrolled piece")
    for b in batches:
        lad.rung_step(batch=b)
    for rung, fn in (("segment", lad.rung_segment), ("stream", lad.rung_stream), ("decode", lad.rung_decode)):
        say(f"rung {rung}")
        for b in batches:
            for n in lengths:
                if rung == "segment" and n > L:
                    continue
                if rung == "stream" and n <= L:
                    continue
                if rung == "decode" and n > 2 * L + 8:
                    continue
                fn(b, n)
        longest = min(max(lengths), 2 * L + 3) if rung != "segment" else min(L, max(lengths))
        if lad.sess.has_step_graphs and lad.sess.path_for(cfg.n_steps) == "unrolled":  # one case per rung
            fn(batches[-1], longest, path="steps")
        for s in steps_list:
            if s != cfg.n_steps:
                fn(batches[0], longest, steps=s)
    if generate_tokens:
        say("rung generate: greedy generation")
        lad.rung_generate(new_tokens=generate_tokens)
    return lad.report.to_dict()


def _quantized(export_dir) -> bool:
    return read_sidecar(export_dir).get("quantize") in BUDGETS


def validate_export(model, export_dir, progress=None) -> dict:
    """The exporter's check: shapes other than the export shapes (batch 1 and 3; lengths 1,
    k-1, k+1 and several segments), one pass of each rung (the step graphs' cases where the export
    has them). A quantized export is checked on quality instead (parity_tests/quality.py)."""
    if _quantized(export_dir):
        return check_quality(model, export_dir, progress=progress)
    lad = Ladder(model, export_dir, progress=progress)
    cfg = model.config
    k, L = cfg.top_k, cfg.segment_len
    lad.rung_ops()
    lad.rung_step(batch=3)
    for b in (1, 3):
        for n in sorted({1, max(k - 1, 1), min(k + 1, L)}):
            lad.rung_segment(b, n)
    lad.rung_segment(1, L)
    lad.rung_stream(3, 2 * L + 5)
    lad.rung_decode(1, min(L + 6, 2 * L))
    if lad.sess.has_step_graphs:
        lad.rung_segment(1, L, path="steps")
        lad.rung_stream(1, L + 5, path="steps")
        lad.rung_decode(1, min(L + 6, 2 * L), path="steps")
    lad.rung_generate(new_tokens=16)
    rep = lad.report.to_dict()
    if progress:
        progress(rep["summary"])
    return rep

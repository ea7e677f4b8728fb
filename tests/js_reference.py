"""Reference values from the Python runtime for the JavaScript tests (runtime/js/test/*.test.mjs).

`write_reference(export_dir, out, tolerance)` runs `ReSSFormerSession` (threads=1) on fixed inputs and
writes a JSON file: logits fed whole and token by token, greedy generation (plain and with a repetition
penalty), the step-graph path (trained K and K + 1), bits per byte, sampling decisions for fixed
uniforms, and canonical-JSON cases.
tests/test_js.py calls it on two tiny exports: `tiny_export` (tests/conftest.py; small logits, checked
within 1e-5, but its greedy output is one byte repeated) and a strongly perturbed one whose generation
varies (logits up to ~9: float32 rounding alone moves them by ~2e-5 in Python and ~1e-4 in
WebAssembly; checked within 5e-4).
`python tests/js_reference.py DIR` makes both exports and references (for `npm test` on its own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from ressformer.runtime import ReSSFormerSession
from ressformer.runtime.sampling import sample

PROMPT = "The ReSSFormer reads bytes; "
N_TOKENS = 80  # > 2 segments of tiny (segment_len 32)
N_GREEDY = 128
SCORE_TEXT = "Edge runtimes are mostly not Python: web pages, Node services, mobile apps. " * 2


class _FixedU:
    """Stands in for numpy's Generator in `sample`: hands out the given uniforms."""

    def __init__(self, u: float):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


def write_reference(export_dir, out, tolerance: float) -> dict:
    s = ReSSFormerSession(export_dir, threads=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (1, N_TOKENS))
    whole, _ = s.forward(ids)
    state, steps = None, []
    for t in range(N_TOKENS):
        lg, state = s.forward(ids[:, t:t + 1], state)
        steps.append(lg[0, 0])
    greedy = list(s.generate(PROMPT, max_new_tokens=N_GREEDY, temperature=0))
    text = "".join(s.generate_text(PROMPT, max_new_tokens=N_GREEDY, temperature=0))
    penalized = list(s.generate(PROMPT, max_new_tokens=N_GREEDY, temperature=0, repetition_penalty=1.3))
    # the step graphs: the trained K, and K + 1 (test-time depth, no unrolled graphs for it)
    k = s.trained_steps
    steps_path = {str(kk): {"logits_whole": s.forward(ids, steps=kk, path="steps")[0][0].tolist(),
                            "greedy": list(s.generate(PROMPT, max_new_tokens=40, temperature=0, steps=kk,
                                                      path="steps"))} for kk in (k, k + 1)}
    cases = []
    for i in range(40):  # sampling decisions on random logits for fixed uniforms
        logits = (rng.standard_normal(256) * 3).astype(np.float32)
        opts = {"temperature": float([0.5, 1.0, 1.7][i % 3]), "top_k": [0, 1, 5, 40][i % 4],
                "top_p": [1.0, 0.9, 0.5, 0.2, 0.97][i % 5]}
        u = float(rng.random())
        tok = int(sample(logits[None], _FixedU(u), **opts)[0])
        cases.append({"logits": logits.tolist(), "u": u, **opts, "token": tok})
    floats = [0.0, -0.0, 1.0, 10000.0, 0.1, 1e-4, 1e-5, 1.5e-7, 123456789.125, 1e15, 1e16, 2.5e16, 1e22,
              -3.25, 0.3333333333333333, 5e-324, 1.7976931348623157e308]
    odd = {"b": [1.0, 2, {"z": "é ü ✓ 😀 \u007f\n\t\"\\"}], "a": 10000.0, "c": None, "d": True,
           "e": 12345678901234567890}
    ref = {"export": str(export_dir), "tolerance": tolerance,
           "python_whole_vs_steps": float(np.abs(whole[0] - np.stack(steps)).max()), "prompt": PROMPT,
           "tokens": ids[0].tolist(), "logits_whole": whole[0].tolist(),
           "logits_steps": np.stack(steps).tolist(), "greedy": greedy, "greedy_text": text,
           "greedy_penalized_1.3": penalized, "steps_path": steps_path, "score_text": SCORE_TEXT,
           "score": s.score_stream([SCORE_TEXT.encode()]), "sampling": cases,
           "floats": [[repr(f), f] for f in floats],
           "canonical": {"text": json.dumps({**odd, "model_sha256": "x", "generation": {}}, indent=2),
                         "expected": json.dumps(odd, sort_keys=True, separators=(",", ":"))}}
    Path(out).write_text(json.dumps(ref))
    return ref


def make_tiny_export(folder: Path, strong: bool) -> Path:
    """A tiny checkpoint with every weight perturbed, exported. strong=False: tests/conftest.py's
    `perturbed_model()`; strong=True: larger weights, whose greedy output varies."""
    import torch
    from ressformer.export.exporter import export_checkpoint

    from ressformer import ReSSFormer, ReSSFormerConfig, save_checkpoint

    torch.manual_seed(0)
    m = ReSSFormer(ReSSFormerConfig.preset("tiny", **({"init_std": 0.2} if strong else {})))
    with torch.no_grad():
        for p in m.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else 0.05
            p.add_(torch.randn_like(p) * (1.0 if strong else 0.3) * scale)
    save_checkpoint(m.eval(), folder / "ck")
    export_checkpoint(folder / "ck", folder / "export", validate=None, step_graphs=True, progress=lambda s: None)
    return folder / "export"


TOLERANCES = {"light": 1e-5, "strong": 5e-4}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    paths = []
    for kind, tol in TOLERANCES.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        export = make_tiny_export(root / kind, strong=kind == "strong")
        paths.append(str(root / kind / "reference.json"))
        write_reference(export, paths[-1], tol)
    (root / "references.txt").write_text(",".join(paths))

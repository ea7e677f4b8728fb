"""The JavaScript runtime (runtime/js/, docs/javascript.md) against the Python runtime.

The Python runtime writes reference values (tests/js_reference.py) for two tiny exports:
`tiny_export` (logits within 1e-5) and a strongly perturbed one whose greedy output varies (logits up
to ~9, within 5e-4). Node's own test runner then checks runtime/js/ressformer.mjs against them on
onnxruntime-node and onnxruntime-web (`node --test`, the same tests as `cd runtime/js && npm test`).
The `browser` test opens the demo page in headless Chromium. Needs Node 20+ with `npm ci` done in
runtime/js, and Chromium for the browser test (.ci/run installs both and runs
`pytest -m browser tests/test_js.py`; docs/javascript.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "runtime" / "js"
_PY = {"make_reference": ROOT / "tests" / "js_reference.py", "chromium": JS / "test" / "chromium.py"}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"ressformer_js_{name}", _PY[name])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _node() -> str:
    node = shutil.which("node")
    assert node, "Node.js 20+ is needed for the JavaScript runtime's tests (docs/javascript.md)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"Node.js 20+ is needed, found {version}"
    assert (JS / "node_modules" / "onnxruntime-node").is_dir(), \
        "runtime/js has no node_modules: run `cd runtime/js && npm ci` (docs/javascript.md)"
    return node


@pytest.fixture(scope="module")
def js_references(tiny_export, tmp_path_factory) -> list[dict]:
    mk = _module("make_reference")
    root = tmp_path_factory.mktemp("js")
    strong = mk.make_tiny_export(root / "strong", strong=True)
    refs = []
    for name, export, tol in (("light", tiny_export, mk.TOLERANCES["light"]),
                              ("strong", strong, mk.TOLERANCES["strong"])):
        path = root / f"{name}.json"
        ref = mk.write_reference(export, path, tol)
        refs.append({**ref, "path": str(path)})
    return refs


def test_node_runtime_matches_python(js_references):
    """runtime/js/test/*.test.mjs: logits whole and token by token across 2+ segments, 128 greedy tokens,
    the step-graph path, bits per byte, sampling, sidecar checks and errors, the CLI; onnxruntime-node
    and -web."""
    env = {**os.environ, "RESSFORMER_REFERENCES": ",".join(r["path"] for r in js_references)}
    r = subprocess.run([_node(), "--test", "--test-reporter=tap", "test/"], cwd=JS, env=env, capture_output=True,
                       text=True, timeout=900)
    parity = [line for line in r.stdout.splitlines() if "max |logit JS - Python|" in line]
    print("\n".join(parity))
    failed = [line for line in r.stdout.splitlines() if line.startswith("not ok")]
    assert r.returncode == 0, f"node --test failed: {failed}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert sum("token by token" in line for line in parity) == 2 * len(js_references), \
        "each export and backend reports its logit difference"
    assert re.search(r"^# fail 0$", r.stdout, re.M) and not failed


@pytest.mark.browser
def test_browser_demo_streams_python_greedy_text(js_references, tmp_path):
    """The demo page (runtime/js/demo/) in headless Chromium, served over HTTP on 127.0.0.1: it loads the
    export with onnxruntime-web and shows the Python runtime's greedy text; it refuses an edited sidecar
    and a folder without one. Set RESSFORMER_JS_SCREENSHOT (e.g. docs/img/js-demo.png) to keep the
    screenshot."""
    _node()
    cr = _module("chromium")
    ref = js_references[1]  # the export whose greedy output varies
    edited = tmp_path / "edited"  # the same export with a model field edited: the page must refuse it
    shutil.copytree(ref["export"], edited)
    sidecar = edited / "ressformer.json"
    sidecar.write_text(sidecar.read_text().replace('"top_k": 8', '"top_k": 4', 1))
    server = cr.Server({"js": JS, "export": Path(ref["export"]), "edited": edited})
    browser = cr.Chromium()
    try:
        query = urllib.parse.urlencode({"export": "/export/", "prompt": ref["prompt"], "tokens": 128,
                                        "temperature": 0, "auto": 1})
        result = browser.run_demo(f"{server.url}js/demo/index.html?{query}", timeout=300)
        assert result["ok"], result.get("error")
        assert result["ids"] == ref["greedy"]
        assert result["pageText"] == result["text"] == ref["greedy_text"]
        assert result["tokensPerSecond"] > 0
        status = browser.evaluate("document.getElementById('status').textContent")
        assert status.startswith("done: 128 tokens") and "tokens/s" in status, status
        shot = ROOT / os.environ["RESSFORMER_JS_SCREENSHOT"] if os.environ.get("RESSFORMER_JS_SCREENSHOT") \
            else tmp_path / "js-demo.png"
        browser.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(json.dumps({"browser_tokens_per_s": result["tokensPerSecond"], "screenshot": str(shot)}))
        for folder, error in (("edited", "was edited: its model fields no longer match model_sha256"),
                              ("missing", "has no ressformer.json: not a ressformer export folder")):
            query = urllib.parse.urlencode({"export": f"/{folder}/", "prompt": "x", "tokens": 4, "auto": 1})
            bad = browser.run_demo(f"{server.url}js/demo/index.html?{query}", timeout=120)
            assert not bad["ok"] and error in bad["error"], bad
    finally:
        browser.close()
        server.close()


@pytest.mark.parametrize("experts,backend", [("hybrid", "onnxruntime-node"), ("dispatch", "onnxruntime-web")])
def test_node_runtime_runs_the_quantized_flavour(tiny_checkpoint, tmp_path, experts, backend):
    """An int4 export in the JavaScript runtime: the hybrid experts (If(one token): QMoE, else the dispatch on
    MatMulNBits; the prompt runs the dispatch, the generated tokens QMoE) on onnxruntime-node,
    with the dispatch (MatMulNBits only) on onnxruntime-web (WebAssembly, as in a browser): the same logits
    as the Python runtime on the same graphs (two segment ends), the same greedy tokens."""
    import numpy as np
    from ressformer.export.exporter import export_checkpoint
    from ressformer.runtime import ReSSFormerSession

    ex = export_checkpoint(tiny_checkpoint, tmp_path / "int4", quantize="int4", experts=experts, validate=None,
                           progress=lambda s: None)
    ops = json.loads((ex / "ressformer.json").read_text())["onnxruntime_ops"]
    assert ops == (["MatMulNBits", "QMoE"] if experts == "hybrid" else ["MatMulNBits"])
    ids = np.random.default_rng(0).integers(0, 256, (1, 70))
    s = ReSSFormerSession(ex, threads=1)
    want = s.forward(ids)[0][0]
    greedy = list(s.generate("ROMEO:", max_new_tokens=40, temperature=0))
    opts = "threads: 1" if backend == "onnxruntime-node" else ""
    script = (  # evaluated with runtime/js as the working folder: its node_modules resolve
        f"import * as ort from '{backend}';\n"
        "import { load } from './ressformer.mjs';\n"
        f"const m = await load({json.dumps(str(ex))}, {{ ort, {opts} }});\n"
        f"const r = await m.forward([{json.dumps(ids[0].tolist())}]);\n"
        "const toks = [];\n"
        "for await (const t of m.generate('ROMEO:', { maxNewTokens: 40, temperature: 0 })) toks.push(t);\n"
        "console.log(JSON.stringify({ logits: Array.from(r.logits), toks }));\n")
    r = subprocess.run([_node(), "--input-type=module", "-e", script], cwd=JS, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    lg = np.array(got["logits"], np.float32).reshape(want.shape)
    if backend == "onnxruntime-node":  # the same native kernels as the Python runtime
        diff = np.abs(lg - want).max()
        assert diff <= 1e-4 * max(1.0, np.abs(want).max()), diff
        assert got["toks"] == greedy
    else:  # WebAssembly's MatMulNBits computes in float32 (native: int8 activations, accuracy level 4): the
        def bpb(x):  # same model to within the quantization's own noise, judged as the export is
            x = x.astype(np.float64) - x.max(-1, keepdims=True)
            lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
            return -np.take_along_axis(lp[:-1], ids[0, 1:, None], 1).mean() / np.log(2)

        assert abs(bpb(lg) - bpb(want)) <= 0.01 and (lg.argmax(-1) == want.argmax(-1)).mean() >= 0.9

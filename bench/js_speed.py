"""Decode tokens/s of the same export in the Python runtime, Node (onnxruntime-node) and the browser demo
(onnxruntime-web in headless Chromium), measured alternately on one machine; prints a Markdown table.

    python -m ressformer.bench.js_speed EXPORT_DIR [EXPORT_DIR ...] --tokens 200 --repeats 3 [--no-browser]

Greedy decoding after a short prompt, one intra-op thread everywhere (WebAssembly: one thread); decode
tokens/s = (N - 1) / (time from the first generated token to the last), the median of the repeats. Each
repeat generates twice in one process (one page for the browser) and keeps the second ("warm") run; for
WebAssembly the first ("cold") run is reported too: V8 optimizes the WebAssembly code while it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from ressformer.runtime import ReSSFormerSession

JS = Path(__file__).resolve().parents[1] / "runtime" / "js"
PROMPT = "Once upon a time"


def python_decode(export: Path, tokens: int) -> tuple[float, float]:
    s = ReSSFormerSession(export, threads=1)
    rates = []
    for _ in range(2):
        first = last = 0.0
        for _ in s.generate(PROMPT, max_new_tokens=tokens, temperature=0):
            last = time.perf_counter()
            first = first or last
        rates.append((tokens - 1) / (last - first))
    return rates[0], rates[1]


def node_decode(export: Path, tokens: int, backend: str) -> tuple[float, float]:
    out = subprocess.run(["node", str(JS / "bench.mjs"), str(export), "--tokens", str(tokens), "--threads", "1",
                          "--backend", backend, "--repeats", "2"], capture_output=True, text=True, check=True,
                         cwd=JS).stdout
    runs = [json.loads(line)["decodeTokensPerSecond"] for line in out.splitlines()]
    return runs[0], runs[1]


def browser_decode(export: Path, tokens: int) -> tuple[float, float]:
    sys.path.insert(0, str(JS / "test"))
    from chromium import Chromium, Server

    server, browser = Server({"js": JS, "export": export}), Chromium()
    try:
        q = urllib.parse.urlencode({"export": "/export/", "prompt": PROMPT, "tokens": tokens, "temperature": 0,
                                    "auto": 1})
        rates = []
        for again in (False, True):
            r = browser.run_demo(f"{server.url}js/demo/index.html?{q}", timeout=600, again=again)
            if not r["ok"]:
                raise RuntimeError(r["error"])
            rates.append(r["tokensPerSecond"])
        return rates[0], rates[1]
    finally:
        browser.close()
        server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true")
    a = ap.parse_args()
    runs = {"Python (onnxruntime)": lambda e: python_decode(e, a.tokens),
            "Node (onnxruntime-node)": lambda e: node_decode(e, a.tokens, "node"),
            "Node (onnxruntime-web, wasm)": lambda e: node_decode(e, a.tokens, "web")}
    if not a.no_browser:
        runs["Chromium (onnxruntime-web, wasm)"] = lambda e: browser_decode(e, a.tokens)
    table = {}
    for export in a.exports:
        preset = json.loads((export / "ressformer.json").read_text())["config"]["d_model"]
        got = {name: [] for name in runs}
        for _ in range(a.repeats):  # alternate, so that load changes hit every runtime alike
            for name, fn in runs.items():
                got[name].append(fn(export))
        table[f"{export.name} (d_model {preset})"] = {
            k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in got.items()}
        print(json.dumps({str(export): got}), file=sys.stderr)
    names = list(table)
    print(f"| decode tokens/s ({a.tokens} tokens, 1 thread): warm (cold) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for name in runs:
        print(f"| {name} | " + " | ".join(f"{table[n][name][1]:.0f} ({table[n][name][0]:.0f})" for n in names) + " |")


if __name__ == "__main__":
    main()

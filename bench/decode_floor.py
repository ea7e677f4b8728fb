"""Where a decoded token's time goes: the weights it reads against everything else (issue 20).

    python -m ressformer.bench.decode_floor EXPORT [--context 128] [--tokens 64] [--threads 2] [--genai DIR]

A decoded token runs each weight matrix on one row: memory-bound work whose cost is set by the
bytes of weights read. Everything else a token does (attention over the state, top-k, the
normalizer, routing, norms, the nodes' own overhead, Python) is what an engine adds on top. In one
process, interleaved:

* token: `ReSSFormerSession.forward` of one token, `--tokens` of them after `--context` tokens;
* run: the piece graph's ONNX Runtime run inside it (the rest is Python: feeds, state);
* weights: only the weight matmuls that token ran (MatMulNBits, MatMul/FusedMatMul/Gemm with a
  constant weight, QMoE; the experts as routed: nodes ONNX Runtime's profiler saw run on rows), each
  on one row, in one session of their own: the same nodes, attributes and weights as the optimized
  piece graph, so the same kernels and prepacked weights.

With `--genai DIR` (a folder built by onnxruntime-genai's model builder, e.g. kept by
`python -m ressformer.bench.genai ... --keep DIR`, then DIR/genai_int4): the same split for it, its
token timed as in `ressformer bench --against genai` and its weights being every weight MatMul of
its model.onnx (a dense model runs all of them per token).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from ressformer.bench.profile_ort import session_with
from ressformer.runtime import ReSSFormerSession

WEIGHT_OPS = ("MatMulNBits", "MatMul", "FusedMatMul", "Gemm", "QMoE")


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weight_width(node, inits: dict) -> int | None:
    """K, the row width a weight matmul node multiplies (None: not a matmul by a constant weight)."""
    if node.op_type == "MatMulNBits":
        return int(_attrs(node)["K"])
    if node.op_type in ("MatMul", "FusedMatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
        dims, attrs = list(inits[node.input[1]].dims), _attrs(node)
        if len(dims) != 2 or attrs.get("transA", 0):  # fed (1, K) rows below: A as it is
            return None
        return int(dims[1] if attrs.get("transB", 0) else dims[0])
    return None


def floor_model(nodes, inits: dict, opsets, widths: dict) -> tuple[bytes, dict]:
    """One graph of `nodes` (each a weight matmul), each fed its own one-row input: (model, feeds).
    widths: node name -> (K,) or, for QMoE, (d, E)."""
    r = np.random.default_rng(0)
    out_nodes, inputs, outputs, used, feeds = [], [], [], set(), {}
    for i, n in enumerate(nodes):
        ins = list(n.input)
        x = f"x{i}"
        if n.op_type == "QMoE":
            d, E = widths[n.name]
            ins[0], ins[1] = x, f"r{i}"
            feeds[x] = r.standard_normal((1, d)).astype(np.float32)
            feeds[f"r{i}"] = r.standard_normal((1, E)).astype(np.float32)
            inputs += [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, d]),
                       helper.make_tensor_value_info(f"r{i}", onnx.TensorProto.FLOAT, [1, E])]
        else:
            (K,) = widths[n.name]
            ins[0] = x
            feeds[x] = r.standard_normal((1, K)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, K]))
        used.update(a for a in ins[1:] if a and a in inits)
        node = helper.make_node(n.op_type, ins, [f"y{i}"], name=n.name, domain=n.domain)
        node.attribute.extend(n.attribute)
        out_nodes.append(node)
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None))
    g = helper.make_graph(out_nodes, "weights", inputs, outputs, [inits[u] for u in sorted(used)])
    m = helper.make_model(g, opset_imports=list(opsets))
    m.ir_version = 10
    return m.SerializeToString(), feeds


def _session(model, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.enable_cpu_mem_arena = False  # as the runtime's sessions
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.log_severity_level = 3
    return ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])


def _ran_rows(ev: dict) -> int:
    shapes = [next(iter(d.values())) for d in ev.get("args", {}).get("input_type_shape", [])]
    return int(np.prod(shapes[0][:-1])) if shapes and shapes[0] else 0


def ressformer_weights(export_dir, context: int, threads: int, work: Path):
    """The weight matmuls one decoded token runs (after `context` tokens): (nodes, inits, opsets, widths),
    read off the optimized piece graph and ONNX Runtime's profile of that token."""
    ref = ReSSFormerSession(export_dir, threads=threads)
    piece = ref.unrolled[ref.steps]["piece"]
    rng = np.random.default_rng(0)
    _, st = ref.forward(rng.integers(0, ref.vocab_size, (1, context)))
    (work / "opt").mkdir(parents=True, exist_ok=True)
    prof = session_with(export_dir, threads=threads, profile_prefix=work / "p", optimized_path=work / "opt")
    prof.forward(rng.integers(0, ref.vocab_size, (1, 1)), st)
    events = json.loads(Path(prof.graphs[piece].sess.end_profiling()).read_text())
    ran = {e["name"][:-len("_kernel_time")] for e in events if e.get("cat") == "Node"
           and e["name"].endswith("_kernel_time") and e.get("args", {}).get("op_name") in WEIGHT_OPS
           and _ran_rows(e) > 0}
    opt = onnx.load(str(work / "opt" / ref.meta["graphs"][piece]["file"]))
    if any(n.op_type == "If" for n in opt.graph.node):  # the hybrid expert layer: its nodes sit in branches
        raise ValueError(f"{export_dir}: a hybrid export (--experts hybrid) is not supported; "
                         "split one exported with --experts dispatch or qmoe")
    inits = {i.name: i for i in opt.graph.initializer}
    nodes, widths = [], {}
    for n in opt.graph.node:
        if n.name not in ran:
            continue
        if n.op_type == "QMoE":
            widths[n.name] = (ref.d_model, int(ref.config["n_experts"]))  # rows (1, d), router logits (1, E)
        else:
            k = weight_width(n, inits)
            if k is None:
                continue
            widths[n.name] = (k,)
        nodes.append(n)
    return nodes, inits, opt.opset_import, widths


def genai_weights(folder):
    m = onnx.load(str(Path(folder) / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    nodes, widths = [], {}
    for n in m.graph.node:
        k = weight_width(n, inits) if n.op_type in WEIGHT_OPS else None
        if k is not None:
            nodes.append(n)
            widths[n.name] = (k,)
    return nodes, inits, m.opset_import, widths


def weight_bytes(nodes, inits) -> int:
    """Bytes of the weight inputs (packed weights, scales, zero points, biases) the nodes read."""
    seen = set()
    for n in nodes:
        seen.update(a for a in n.input[1:] if a in inits)
    return sum(numpy_helper.to_array(inits[a]).nbytes for a in seen)


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(export_dir, context: int = 128, tokens: int = 64, threads: int = 2, rounds: int = 3,
            genai: str | None = None, progress=print) -> dict:
    """Per decoded token (ms): token, run, weights (and genai's token and weights); best of `rounds`."""
    with tempfile.TemporaryDirectory(prefix="ressformer-floor-") as tmp:
        nodes, inits, opsets, widths = ressformer_weights(export_dir, context, threads, Path(tmp))
    model, feeds = floor_model(nodes, inits, opsets, widths)
    floor = _session(model, threads)
    s = ReSSFormerSession(export_dir, threads=threads)
    g = s.graphs[s.unrolled[s.steps]["piece"]]
    run_s = [0.0]
    real = g.sess.run

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        run_s[0] += time.perf_counter() - t0
        return out

    g.sess.run = timed
    rng = np.random.default_rng(1)
    _, st0 = s.forward(rng.integers(0, s.vocab_size, (1, context)))
    toks = rng.integers(0, s.vocab_size, (tokens, 1, 1))

    def decode():
        st = st0
        for x in toks:
            _, st = s.forward(x, st)

    rep = {"export": str(export_dir), "context": context, "tokens": tokens, "threads": threads,
           "weight_nodes": len(nodes), "weight_mb": weight_bytes(nodes, inits) / 1e6}
    floor.run(None, feeds)
    decode()  # warm-up (buffers, first runs)
    tok, run, wts = [], [], []
    for r in range(rounds):
        run_s[0] = 0.0
        tok.append(_time(decode, 1) / tokens)
        run.append(run_s[0] / tokens)
        wts.append(_time(lambda: floor.run(None, feeds), tokens))
        progress(f"round {r + 1}/{rounds}: token {tok[-1] * 1e3:.3f} ms, run {run[-1] * 1e3:.3f} ms, "
                 f"weights {wts[-1] * 1e3:.3f} ms")
    rep |= {"token_ms": min(tok) * 1e3, "run_ms": min(run) * 1e3, "weights_ms": min(wts) * 1e3}
    if genai:
        from ressformer.bench.genai import genai_child

        gn, gi, go, gw = genai_weights(genai)
        gmodel, gfeeds = floor_model(gn, gi, go, gw)
        gfloor = _session(gmodel, threads)
        gtok = [1.0 / genai_child(str(genai), context, tokens, threads, 0)["decode_tok_s"] for _ in range(rounds)]
        gwts = [_time(lambda: gfloor.run(None, gfeeds), tokens) for _ in range(rounds)]
        rep["genai"] = {"folder": str(genai), "weight_nodes": len(gn), "weight_mb": weight_bytes(gn, gi) / 1e6,
                        "token_ms": min(gtok) * 1e3, "weights_ms": min(gwts) * 1e3}
    return rep


def format_report(rep: dict) -> str:
    t, r, w = rep["token_ms"], rep["run_ms"], rep["weights_ms"]
    lines = [f"decoded token after {rep['context']} tokens, {rep['threads']} threads, best of rounds of "
             f"{rep['tokens']} tokens (ms per token):",
             f"  ReSSFormer {Path(rep['export']).name}: token {t:.3f} = weights {w:.3f} ({100 * w / t:.0f}%, "
             f"{rep['weight_nodes']} matmuls, {rep['weight_mb']:.1f} MB) + the rest of the run {r - w:.3f} "
             f"({100 * (r - w) / t:.0f}%) + Python {t - r:.3f} ({100 * (t - r) / t:.0f}%)"]
    gr = rep.get("genai")
    if gr:
        gt, gw = gr["token_ms"], gr["weights_ms"]
        lines.append(f"  genai {Path(gr['folder']).name}: token {gt:.3f} = weights {gw:.3f} ({100 * gw / gt:.0f}%, "
                     f"{gr['weight_nodes']} matmuls, {gr['weight_mb']:.1f} MB) + everything else {gt - gw:.3f} "
                     f"({100 * (gt - gw) / gt:.0f}%)")
        lines.append(f"  ReSSFormer / genai: token {t / gt:.2f}x the time, weights {w / gw:.2f}x, the rest "
                     f"{(t - w) / max(gt - gw, 1e-9):.2f}x")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m ressformer.bench.decode_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--context", type=int, default=128, help="tokens before the decoded ones (default 128)")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per round (default 64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--genai", help="an onnxruntime-genai model folder to split the same way")
    p.add_argument("--json")
    a = p.parse_args(argv)
    for name in ("context", "tokens", "rounds", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    rep = measure(a.export_dir, a.context, a.tokens, a.threads, a.rounds, a.genai)
    print(format_report(rep))
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()

"""The ONNX Runtime flavour's expert layer: one `com.microsoft::QMoE` node per MoE call.

The portable graphs run the top-e-of-E experts as a sparse dispatch (export/dispatch.py: the pairs
sorted by expert, one Split, per expert two MatMuls and a GELU, one ScatterND): ~4E + 16 nodes a layer.
A quantized export (`--quantize int8|int4`) targets ONNX Runtime anyway (MatMulNBits), so there
the whole layer becomes one QMoE node: routing (softmax over the top-e router logits, as
`ressformer::TopKRoute`), both expert GEMMs on block-quantized weights, and the gated sum.

QMoE (onnxruntime contrib op, CPU kernel in onnxruntime >= 1.22): input (N, d), router_probs (N, E)
(raw logits with normalize_routing_weights=1 = softmax over the top-k logits), fc1 weights
(E, f, d * bits / 8) uint8 with scales (E, f, d / block), fc2 weights (E, d, f * bits / 8) with
scales (E, d, f / block), symmetric (zero point 2^(bits-1)), the layout MatMulNBits uses.
Its GELU is the tanh approximation (<= 4.7e-4 from the exact GELU), one more reason the quantized
export is judged by bits per byte (parity_tests/quality.py), not by tolerances.

ONNX Runtime's CPU QMoE dequantizes the experts' weights per token (its cost grows linearly with the
rows: 0.44 ms for one `base` token, 0.86 for two, 34 for 128), while MatMulNBits reads the int4
weights once per call (2 experts x 2 MatMulNBits: 0.35 ms for one row, 20.5 for 128). So the exporter
picks the layer by size (`resolve_expert_layer`), and offers the **hybrid**: `If(Size(tokens) == 1)`
runs the piece graph exported with one QMoE node per step (a decoded token: fewest nodes), otherwise
the one exported with the sparse dispatch on MatMulNBits (prefill pieces, batches); both branches
read one copy of the quantized weights on disk (`switch_by_rows`). One If per run: an If per expert
layer cost 5-10% of a decoded token (each If's setup). (Measured before the sorted dispatch; with it,
`base` decodes as fast without QMoE, so the hybrid pays only where QMoE's one node matters: small experts.)
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ressformer.model import MoE
from ressformer.ops import topk_route

from .ops import _all_nodes

DOMAIN = "com.microsoft"


def supported(cfg, block_size: int) -> bool:
    """QMoE needs d_model and d_ff divisible by the block size (else: the dispatch + MatMulNBits)."""
    return cfg.n_experts > 1 and cfg.d_model % block_size == 0 and cfg.d_ff % block_size == 0


def quantize_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w (K, N) float32 -> (packed (N, K * bits / 8) uint8, scales (N, K / block_size) float32):
    symmetric block quantization along K, onnxruntime's own routine (MatMulNBits' layout)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    K, N = w.shape
    nb = K // block_size
    packed = np.zeros((N, nb, block_size * bits // 8), np.uint8)
    scales = np.zeros(N * nb, np.float32)
    zp = np.zeros(N * ((nb * bits + 7) // 8), np.uint8)  # unused: symmetric
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w, np.float32), scales, zp, block_size, N, K, True)
    return packed.reshape(N, K * bits // 8), scales.reshape(N, nb)


def _qmoe_forward(self, x):
    """MoE.forward for export: the same outputs (y, experts, aux), y from one QMoE node."""
    cfg = self.cfg
    B, T, d = x.shape
    xf = x.reshape(B * T, d)  # (N, d)
    logits = self.router(xf)  # (N, E)
    _, experts = topk_route(logits, cfg.top_e)  # the graphs' `experts` diagnostic output
    y = torch.onnx.ops.symbolic(
        f"{DOMAIN}::QMoE", (xf, logits, self.q_w1, self.q_s1, self.b1, self.q_w2, self.q_s2, self.b2),
        {"k": int(cfg.top_e), "activation_type": "gelu", "normalize_routing_weights": 1,
         "expert_weight_bits": int(self.q_bits), "block_size": int(self.q_block), "accuracy_level": 4},
        dtype=xf.dtype, shape=xf.shape, version=1)
    return y.view(B, T, d), experts.view(B, T, -1), {}


@contextlib.contextmanager
def qmoe_layers(model, bits: int, block_size: int):
    """Within the block, every MoE exports as one QMoE node with `bits`-bit expert weights."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        w1, w2 = m.w1.detach().float().numpy(), m.w2.detach().float().numpy()  # (E, d, f), (E, f, d)
        q1 = [quantize_blocks(w1[e], bits, block_size) for e in range(w1.shape[0])]
        q2 = [quantize_blocks(w2[e], bits, block_size) for e in range(w2.shape[0])]
        for name, arr in (("q_w1", [p for p, _ in q1]), ("q_s1", [s for _, s in q1]),
                          ("q_w2", [p for p, _ in q2]), ("q_s2", [s for _, s in q2])):
            m.register_buffer(name, torch.from_numpy(np.stack(arr)), persistent=False)
        m.q_bits, m.q_block = bits, block_size
    real = MoE.forward
    MoE.forward = _qmoe_forward
    try:
        yield
    finally:
        MoE.forward = real
        for m in moes:
            for name in ("q_w1", "q_s1", "q_w2", "q_s2"):
                delattr(m, name)


def switch_by_rows(one, many, rows_input: str = "tokens"):
    """One model from two exports of the same graph (same inputs and outputs): `If(Size(rows_input)
    == 1)` runs `one`'s nodes (the QMoE flavour: a decoded token), else `many`'s (the dispatch:
    prefill pieces, batches). One If per run; both branches read the outer graph's initializers,
    equal ones stored once, and the dispatch's per-expert MatMulNBits weights become views of the
    QMoE's stacked ones (`_share_expert_weights`): the file holds one copy of the weights."""
    import onnx
    from onnx import helper, numpy_helper

    g1, g2 = one.graph, many.graph
    sig = [([(i.name, i.type.SerializeToString()) for i in g.input], [o.name for o in g.output]) for g in (g1, g2)]
    if sig[0] != sig[1]:
        raise ValueError("switch_by_rows: the two graphs differ in their inputs or outputs")
    names = {i.name for i in g1.input}
    if rows_input not in names:
        raise ValueError(f"switch_by_rows: no input {rows_input!r}")
    inits, by_bytes, branches = [], {}, []
    for g, prefix in ((g1, "one/"), (g2, "many/")):
        ren = {}
        for t in g.initializer:
            key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            if key in by_bytes:
                ren[t.name] = by_bytes[key]
                continue
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = by_bytes[key] = ren[t.name] = prefix + t.name
            inits.append(c)
        for n in _all_nodes(g):
            for o in n.output:
                if o:
                    ren.setdefault(o, prefix + o)
        branch = helper.make_graph(g.node, f"{g.name or 'graph'}_{prefix[:-1]}", [], [])  # copies the nodes
        for n in _all_nodes(branch):
            n.name = prefix + n.name if n.name else n.name
            for j, i in enumerate(n.input):
                n.input[j] = ren.get(i, i)
            for j, o in enumerate(n.output):
                n.output[j] = ren.get(o, o)
        for o in g.output:
            v = branch.output.add()
            v.CopyFrom(o)
            v.name = ren.get(o.name, o.name)
            if v.name == o.name:  # an input passed through: give the branch its own output name
                branch.node.append(helper.make_node("Identity", [o.name], [prefix + o.name],
                                                    name=f"{prefix}out_{o.name}"))
                v.name = prefix + o.name
        branches.append(branch)
    main = [helper.make_node("Size", [rows_input], ["rows"], name="rows"),
            helper.make_node("Constant", [], ["one_row"], name="one_row",
                             value=numpy_helper.from_array(np.array(1, np.int64))),
            helper.make_node("Equal", ["rows", "one_row"], ["is_one_row"], name="is_one_row"),
            helper.make_node("If", ["is_one_row"], [o.name for o in g1.output], name="one_row_or_many",
                             then_branch=branches[0], else_branch=branches[1])]
    graph = helper.make_graph(main, g1.name, list(g1.input), list(g1.output), inits)
    model = helper.make_model(graph, opset_imports=list({(o.domain, o.version): o for o in
                                                         (*one.opset_import, *many.opset_import)}.values()))
    model.ir_version, model.producer_name = one.ir_version, one.producer_name
    fns = {(f.domain, f.name): f for f in (*one.functions, *many.functions)}
    model.functions.extend(fns.values())
    _share_expert_weights(model.graph)
    return model


def _share_expert_weights(g) -> None:
    """Each dispatch MatMulNBits weight (and scale) equal to expert e of a QMoE's stacked weight becomes
    Reshape(Gather(stacked, e)): one copy on disk."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in g.initializer}
    stacked = {}
    for n in _all_nodes(g):
        if n.op_type == "QMoE":
            for name in (n.input[2], n.input[3], n.input[5], n.input[6]):
                if name in inits and name not in stacked:
                    stacked[name] = numpy_helper.to_array(inits[name])
    slices = {}  # bytes of one expert's slice -> (stacked name, e)
    for name, a in stacked.items():
        for e in range(a.shape[0]):
            slices.setdefault((a[e].dtype.str, a[e].tobytes()), (name, e))
    weights = {name for n in _all_nodes(g) if n.op_type == "MatMulNBits" for name in n.input[1:3]}
    made, views = set(), []
    for name in sorted(weights):
        if name not in inits or name in stacked:
            continue
        a = numpy_helper.to_array(inits[name])
        hit = slices.get((a.dtype.str, a.tobytes()))
        if hit is None:
            continue
        src, e = hit
        views += [helper.make_node("Constant", [], [f"{name}_expert"], name=f"{name}_expert_idx",
                                   value=numpy_helper.from_array(np.array(e, np.int64))),
                  helper.make_node("Constant", [], [f"{name}_shape"], name=f"{name}_shape_const",
                                   value=numpy_helper.from_array(np.array(a.shape, np.int64))),
                  helper.make_node("Gather", [src, f"{name}_expert"], [f"{name}_slice"], name=f"{name}_gather"),
                  helper.make_node("Reshape", [f"{name}_slice", f"{name}_shape"], [name], name=f"{name}_view")]
        made.add(name)
    if not made:
        return
    live = [i for i in g.initializer if i.name not in made]
    del g.initializer[:]
    g.initializer.extend(live)
    for v in reversed(views):
        g.node.insert(0, v)

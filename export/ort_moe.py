"""The ONNX Runtime flavour's expert layer: one `com.microsoft::QMoE` node per MoE call.

The portable graphs run the top-e-of-E experts as a sparse dispatch: per expert NonZero, Gather,
two MatMuls, GELU, ScatterND (~60% of the nodes a decoded token executes, docs/performance.md).
A quantized export (`--quantize int8|int4`) targets ONNX Runtime anyway (MatMulNBits), so there
the whole layer becomes one QMoE node: routing (softmax over the top-e router logits, as
`ressformer::TopKRoute`), both expert GEMMs on block-quantized weights, and the gated sum.

QMoE (onnxruntime contrib op, CPU kernel in onnxruntime >= 1.22): input (N, d), router_probs (N, E)
(raw logits with normalize_routing_weights=1 = softmax over the top-k logits), fc1 weights
(E, f, d * bits / 8) uint8 with scales (E, f, d / block), fc2 weights (E, d, f * bits / 8) with
scales (E, d, f / block), symmetric (zero point 2^(bits-1)), the layout MatMulNBits uses.
Its GELU is the tanh approximation (<= 4.7e-4 from the exact GELU), one more reason the quantized
export is judged by bits per byte (parity_tests/quality.py), not by tolerances.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ressformer.model import MoE
from ressformer.ops import topk_route

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

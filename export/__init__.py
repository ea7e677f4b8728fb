"""Export ReSSFormer checkpoints to ONNX (uses `ressformer`; `runtime` never imports this)."""

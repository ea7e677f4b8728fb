"""ONNX Runtime wrapper for exported ReSSFormer models. Needs numpy and onnxruntime only: it
never imports torch, `ressformer` or `export`."""

from .session import KNOWN_RESSFORMER_OPSETS, ModelError, ReSSFormerSession, RuntimeState
from .tokenizer import ByteTokenizer

__all__ = ["KNOWN_RESSFORMER_OPSETS", "ByteTokenizer", "ModelError", "ReSSFormerSession", "RuntimeState"]

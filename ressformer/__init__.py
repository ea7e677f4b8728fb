"""ressformer: the Recursive Sparse Structured Transformer, from PyTorch training to ONNX Runtime.

Importing this package does not import torch: torch-backed names load on first use.
"""

from __future__ import annotations

from importlib import import_module

from .config import PRESETS, ReSSFormerConfig

__version__ = "0.1.0"

_LAZY = {
    "ReSSFormer": "ressformer.model",
    "State": "ressformer.model",
    "Output": "ressformer.model",
    "save_checkpoint": "ressformer.checkpoint",
    "load_checkpoint": "ressformer.checkpoint",
    "CheckpointError": "ressformer.checkpoint",
}

__all__ = ["PRESETS", "ReSSFormerConfig", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ressformer' has no attribute {name!r}")

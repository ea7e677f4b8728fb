"""Checkpoints: a directory with config.json and model.safetensors, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ReSSFormerConfig
from .model import ReSSFormer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not match its config."""


def atomic_dir(final: str | os.PathLike, overwrite: bool = True):
    """Context manager: yields a temporary sibling folder, renamed to `final` on success."""
    return _AtomicDir(Path(final), overwrite)


class _AtomicDir:
    def __init__(self, final: Path, overwrite: bool):
        self.final, self.overwrite = final, overwrite

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise FileExistsError(f"{self.final} already exists")
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def save_checkpoint(model: ReSSFormer, path: str | os.PathLike, extra: dict | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors (+ optional extra tensors/metadata) atomically."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"config": model.config.to_dict(), "format": "ressformer-checkpoint-v1",
                "n_params": model.num_params(), "sha256": file_sha256(tmp / WEIGHTS_FILE),
                **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / "train_state.safetensors"))
    return path


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} has no 'config' entry")
    return meta


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> ReSSFormer:
    """Load a checkpoint folder; the model is returned in eval mode with `.config` set."""
    path = Path(path)
    meta = read_meta(path)
    try:
        cfg = ReSSFormerConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad config: {e}") from e
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    if meta.get("sha256") and file_sha256(wfile) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} is corrupted (sha256 mismatch)")
    try:
        state = load_file(str(wfile), device=map_location)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {WEIGHTS_FILE}: {e}") from e
    model = ReSSFormer(cfg)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in want.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"checkpoint {path} does not match its config: {k} has shape "
                                  f"{tuple(state[k].shape)}, config implies {tuple(v.shape)}")
    model.load_state_dict(state)
    return model.eval()


def checkpoint_hash(path: str | os.PathLike) -> str:
    meta = read_meta(path)
    return meta.get("sha256") or file_sha256(Path(path) / WEIGHTS_FILE)

"""Checkpoints: a directory with config.json and model.safetensors, written atomically."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import fsutil
from .config import ReSSFormerConfig
from .fsutil import atomic_dir, recover
from .model import ReSSFormer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not match its config."""


def save_checkpoint(model: ReSSFormer, path: str | os.PathLike, extra: dict | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, overwrite: bool = True) -> Path:
    """Write config.json + model.safetensors (+ optional extra tensors/metadata) into a temporary
    sibling folder, then put it in place of `path` (ressformer.fsutil: the old checkpoint stays
    readable until the new one is complete). overwrite=False refuses an existing `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is a file, not a folder")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        fsutil._step("weights")
        _save(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {"config": model.config.to_dict(), "format": "ressformer-checkpoint-v1",
                "n_params": model.num_params(), "sha256": file_sha256(tmp / WEIGHTS_FILE)}
        if tensors:
            fsutil._step("train_state")
            _save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / TRAIN_STATE_FILE)
            meta["train_state_sha256"] = file_sha256(tmp / TRAIN_STATE_FILE)
        fsutil._step("config")
        (tmp / CONFIG_FILE).write_text(json.dumps({**meta, **(extra or {})}, indent=2, sort_keys=True))
    return path


def _save(tensors: dict, file: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file; its I/O errors (a full disk: SafetensorError "... (os error 28)") become
    the OSError they are, naming the file, so the CLI says "No space left on device; free some space"."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m[1]) if m else errno.EIO
        raise OSError(code, os.strerror(code), str(file)) from e


def load_train_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The optimizer/RNG tensors of a training checkpoint, checked against their recorded hash."""
    path = Path(path)
    meta, f = read_meta(path), path / TRAIN_STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} has no optimizer state ({TRAIN_STATE_FILE}); "
                              "it cannot be resumed (train from it with a new run instead)")
    if meta.get("train_state_sha256") and file_sha256(f) != meta["train_state_sha256"]:
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE_FILE} is corrupted (sha256 mismatch)")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAIN_STATE_FILE}: {e}") from e


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        recover(path)  # a save killed between its two renames left only the backup: restore it
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; a checkpoint is a folder (config.json + "
                              f"{WEIGHTS_FILE})")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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

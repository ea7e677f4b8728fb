"""Byte-level tokenizer: UTF-8 bytes are the token ids 0..255."""

from __future__ import annotations

import codecs

import numpy as np


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """Incremental decoder: feed ids one at a time, get text as soon as characters complete."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([int(i)]))


TOKENIZERS = {"bytes": ByteTokenizer}


def make_tokenizer(spec: dict):
    kind = spec.get("type")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r} in sidecar; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind]()

"""Byte-level tokenizer: UTF-8 bytes are the token ids 0..255."""

from __future__ import annotations

import codecs

import numpy as np


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str, what: str = "text") -> np.ndarray:
        """UTF-8 bytes as int64 ids. A string that is not valid Unicode (a lone surrogate, e.g. an
        undecodable command-line byte) is a ValueError naming `what` and the position."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start].encode("utf-8", "surrogateescape") if e.start < len(text) else b""
            raise ValueError(f"{what} is not valid UTF-8 text (byte {bad.hex() or '?'} at character {e.start}); "
                             "give it as UTF-8 text") from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """Incremental decoder: feed ids one at a time, get text as soon as characters complete."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([int(i)]))


TOKENIZERS = {"bytes": ByteTokenizer}


def make_tokenizer(spec: dict):
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in TOKENIZERS:
        raise ValueError(f"ressformer.json: tokenizer.type {kind!r} is unknown; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind]()

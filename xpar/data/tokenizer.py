"""Tokenizers: the built-in byte tokenizer and a local Hugging Face tokenizer.json.

Both expose the same small surface the pipeline needs: `vocab_size`, `eod_id`,
`fingerprint` (identity for the token cache), `encode_batch` and `decode`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from xpar.errors import XparConfigError

# Tried in order when tokenizer_config.json names no usable eos token.
EOD_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
)
ADDED_EOD = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eod_id: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one end-of-document id 256: vocab_size 257, nothing to download."""

    name = "byte"
    vocab_size = 257
    eod_id = 256
    fingerprint = "byte-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # surrogatepass: a lone surrogate in the text still becomes bytes instead of an error.
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8) for t in texts]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        # The eod id has no byte; it is rendered as a newline so documents stay apart.
        out = bytearray()
        for i in ids:
            i = int(i)
            out += b"\n" if i == self.eod_id else bytes((i,))
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json from a local directory, run by the `tokenizers` library (never the hub).

    The end-of-document token is the eos token that tokenizer_config.json names, else the
    first special token of EOD_CANDIDATES in the vocabulary, else a new "<|endoftext|>".
    """

    def __init__(self, path: str) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        file = _tokenizer_file(path)
        with open(file, "rb") as f:
            raw = f.read()
        try:
            self._tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise XparConfigError(
                f"data.tokenizer={path!r} is invalid: {file} could not be read by `tokenizers` "
                f"({e}); point it at a directory holding a valid tokenizer.json"
            ) from e
        eod = _find_eod(self._tok, os.path.dirname(file))
        added = eod is None
        if added:
            warnings.warn(
                f"data.tokenizer={path!r} has no end-of-text token; adding {ADDED_EOD!r}",
                stacklevel=2,
            )
            self._tok.add_special_tokens([AddedToken(ADDED_EOD, special=True)])
            eod = ADDED_EOD
        self.name = file
        self.eod_token = eod
        self.eod_id = int(self._tok.token_to_id(eod))
        # max id + 1, not get_vocab_size: ids may have gaps and the model embeds by id.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        h = hashlib.sha256(raw)
        h.update(f"|eod={eod}|added={added}".encode())
        self.fingerprint = "hf-" + h.hexdigest()[:32]
        self._dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets we never use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encs = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encs]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`spec` is data.tokenizer: "byte" or a local directory (or file) with tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def token_dtype(vocab_size: int) -> type[np.integer]:
    """Smallest dtype that stores every id of the vocabulary on disk."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _tokenizer_file(path: str) -> str:
    p = os.path.abspath(os.path.expanduser(path))
    file = os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
    if not os.path.isfile(file):
        raise XparConfigError(
            f'data.tokenizer={path!r} is invalid: no tokenizer.json at {file}; use "byte" or a '
            "local directory holding a Hugging Face tokenizer.json (nothing is downloaded)"
        )
    return file


def _find_eod(tok, directory: str) -> str | None:
    cfg_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for cand in EOD_CANDIDATES:
        if tok.token_to_id(cand) is not None:
            return cand
    return None

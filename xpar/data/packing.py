"""Packing: documents -> one token stream per split (each document followed by eod) -> blocks.

The stream is written to disk as it grows (memory stays bounded by one batch of
documents) and read back memory-mapped. Blocks are a view of the stream: block i is
tokens[i*(L+1) : (i+1)*(L+1)] for seq_len L; inputs are block[:-1], targets block[1:];
the tail that does not fill a block is dropped. The stream does not depend on seq_len,
so changing seq_len reuses the cached tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from xpar.data.tokenizer import Tokenizer, token_dtype


def write_token_stream(batches: Iterable[list[str]], tok: Tokenizer, path: str) -> dict:
    """Tokenize document batches into the raw file `path`; returns {"docs", "tokens", "dtype"}."""
    dtype = np.dtype(token_dtype(tok.vocab_size))
    eod = np.array([tok.eod_id], dtype=dtype)
    n_docs = 0
    n_tokens = 0
    with open(path, "wb") as f:
        for texts in batches:
            pieces = []
            for ids in tok.encode_batch(texts):
                pieces.append(np.asarray(ids).astype(dtype, copy=False))
                pieces.append(eod)
            n_docs += len(pieces) // 2
            if pieces:
                chunk = np.concatenate(pieces)
                n_tokens += chunk.size
                f.write(chunk.tobytes())
    return {"docs": n_docs, "tokens": n_tokens, "dtype": dtype.name}


def read_token_stream(path: str, dtype: str, n_tokens: int) -> np.ndarray:
    """The stream written by write_token_stream, memory-mapped read-only."""
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def blocks_view(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[num_blocks, seq_len + 1] view of the stream; the remainder is dropped."""
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)

"""Helpers for the data pipeline tests: small on-disk corpora and stream readers."""

from __future__ import annotations

import json
import os

import numpy as np


def make_text(i: int, n_lines: int = 20) -> str:
    """A deterministic document of a few hundred bytes, different for every i."""
    return "".join(f"doc {i} line {j}: {'xyz' * (j % 5)} {i * j}\n" for j in range(n_lines))


def write_txt(directory, names_texts: dict[str, str]) -> list[str]:
    paths = []
    for name, text in names_texts.items():
        p = os.path.join(directory, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        paths.append(p)
    return paths


def write_jsonl(path, texts: list[str], field: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return str(path)


def read_stream(bundle, split: str) -> np.ndarray:
    """The whole cached token stream of a split (not just the packed blocks)."""
    with open(os.path.join(bundle.stats.cache_dir, "meta.json")) as f:
        info = json.load(f)["splits"][split]
    return np.fromfile(os.path.join(bundle.stats.cache_dir, split + ".bin"), dtype=info["dtype"])


def split_docs(stream: np.ndarray, eod: int) -> list[list[int]]:
    """Token stream -> documents; every document must end with eod."""
    assert len(stream) == 0 or stream[-1] == eod
    docs, cur = [], []
    for t in stream.tolist():
        if t == eod:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs

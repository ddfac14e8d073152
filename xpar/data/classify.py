"""A jsonl sequence-classification dataset and its loaders.

    data = load_classify_data(train_file, val_file, tokenizer, seq_len=L, pad_id=p)
    train = ClassifyLoader(data.train, rank=r, world_size=W, micro_batch_size=B, seed=s)
    tokens_BL, labels_B = train.next_batch()
    val = ClassifyValLoader(data.val, rank=r, world_size=W, micro_batch_size=B)
    batches = val.batches(val.full_epoch_batches(), mask_repeats=True)

Each line of a file is a JSON object with a text field and a label field (names
configurable). Labels are strings or integers; their ids are the positions in the sorted
set of the train file's labels (integers before strings), so the mapping depends on the
train file only. A validation label the train file lacks is an error naming the line.

Texts are tokenised with the run's tokenizer (xpar.data.tokenizer's protocol, no eod
added), cut to their first seq_len tokens and padded with pad_id at the end.

ClassifyLoader shards like xpar.data.loader.TrainLoader (it is one, over rows instead of
blocks): an endless stream, epoch e in a permutation seeded by (seed, e), each step takes
the next B * world_size rows and rank r keeps rows [r*B, (r+1)*B); its position is the
same JSON-able state_dict / load_state_dict. ClassifyValLoader shards like ValLoader: batch
g is rows [g*G, (g+1)*G) modulo the count, G = B * world_size.

Shape suffixes: N rows, L sequence (seq_len), B batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xpar.data.loader import TrainLoader, ValLoader
from xpar.data.tokenizer import Tokenizer
from xpar.errors import XparConfigError

IGNORE = -100
ENCODE_BATCH = 512  # texts per tokenizer call

ClassifyBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ClassifySplit:
    """One split, tokenised: tokens_NL padded with pad_id, label ids, true lengths."""

    path: str
    tokens_NL: np.ndarray  # int64
    labels_N: np.ndarray  # int64, ids into ClassifyData.labels
    lengths_N: np.ndarray  # tokens before truncation
    pad_id: int

    @property
    def num_rows(self) -> int:
        return len(self.labels_N)

    @property
    def seq_len(self) -> int:
        return self.tokens_NL.shape[1]

    @property
    def truncated(self) -> int:
        """Rows longer than seq_len (cut)."""
        return int((self.lengths_N > self.seq_len).sum())

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels_N, minlength=num_classes).tolist()


@dataclass
class ClassifyData:
    labels: list  # label values; a label's id is its index here
    train: ClassifySplit
    val: ClassifySplit

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        """One line: classes, and each split's rows, truncation and class counts."""
        parts = [f"classify: {self.num_classes} labels {_short(self.labels)}"]
        for name, s in (("train", self.train), ("val", self.val)):
            counts = s.class_counts(self.num_classes)
            parts.append(
                f"{name} {s.num_rows} rows ({s.truncated} cut at {s.seq_len} tokens; "
                f"per label {min(counts)}..{max(counts)})"
            )
        return "; ".join(parts)


def _short(labels: list, n: int = 8) -> str:
    shown = ", ".join(map(str, labels[:n]))
    return f"[{shown}{', ...' if len(labels) > n else ''}]"


def read_jsonl(
    path: str, *, text_field: str, label_field: str, where: str
) -> tuple[list[str], list, list[int]]:
    """(texts, labels, line numbers) of a jsonl file; any bad line is a config error naming
    file, line and fix. Blank lines are skipped."""
    if not os.path.isfile(path):
        raise XparConfigError(
            f"{where}={path!r} is invalid: no such file; give a jsonl file with one "
            f'{{"{text_field}": ..., "{label_field}": ...}} object per line'
        )
    texts, labels, lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            text, label = _parse_line(line, path, no, text_field, label_field)
            texts.append(text)
            labels.append(label)
            lines.append(no)
    return texts, labels, lines


def _parse_line(line: str, path: str, no: int, text_field: str, label_field: str):
    at = f"{path}:{no}"
    try:
        row = json.loads(line)
    except ValueError as e:
        raise XparConfigError(
            f"{at} is not valid JSON ({e}); each line must be one JSON object"
        ) from e
    if not isinstance(row, dict):
        raise XparConfigError(f"{at} holds {type(row).__name__}, not a JSON object; fix the line")
    for name, field_name in (("text_field", text_field), ("label_field", label_field)):
        if field_name not in row:
            raise XparConfigError(
                f"{at} has no field {field_name!r} (its fields: {', '.join(map(repr, row))}); "
                f"add it, or set task.{name} to the field that holds it"
            )
    text, label = row[text_field], row[label_field]
    if not isinstance(text, str):
        raise XparConfigError(
            f"{at}: field {text_field!r} is {type(text).__name__}, not a string; fix the line"
        )
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise XparConfigError(
            f"{at}: label {label!r} in field {label_field!r} is neither a string nor an "
            "integer; use a string or integer class label"
        )
    return text, label


def label_set(labels: Sequence, path: str) -> list:
    """The sorted distinct labels of the train file (integers first, then strings)."""
    out = sorted(set(labels), key=lambda v: (isinstance(v, str), v))
    if len(out) < 2:
        raise XparConfigError(
            f"task.train_file={path!r} is invalid: it has {len(out)} distinct label(s) "
            f"({_short(out)}); a classifier needs at least 2"
        )
    return out


def encode_rows(
    texts: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_NL int64 padded with pad_id, lengths_N before truncation)."""
    tokens_NL = np.full((len(texts), seq_len), pad_id, dtype=np.int64)
    lengths_N = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), ENCODE_BATCH):
        ids = tokenizer.encode_batch(list(texts[start : start + ENCODE_BATCH]))
        for i, row in enumerate(ids, start=start):
            lengths_N[i] = len(row)
            n = min(len(row), seq_len)
            tokens_NL[i, :n] = row[:n]
    return tokens_NL, lengths_N


def _read_rows(path: str, fields: tuple[str, str], where: str) -> tuple[list, list, list]:
    texts, labels, lines = read_jsonl(
        path, text_field=fields[0], label_field=fields[1], where=where
    )
    if not texts:
        raise XparConfigError(
            f"{where}={path!r} is invalid: it holds no row; give a jsonl file with one "
            f'{{"{fields[0]}": ..., "{fields[1]}": ...}} object per line'
        )
    return texts, labels, lines


def _split(path, rows, tokenizer, label_ids: dict, seq_len: int, pad_id: int) -> ClassifySplit:
    texts, labels, lines = rows
    for label, no in zip(labels, lines, strict=True):
        if label not in label_ids:
            raise XparConfigError(
                f"{path}:{no}: label {label!r} does not occur in the train file (its labels: "
                f"{_short(list(label_ids))}); remove the line or add that class to the train file"
            )
    tokens_NL, lengths_N = encode_rows(texts, tokenizer, seq_len=seq_len, pad_id=pad_id)
    labels_N = np.array([label_ids[v] for v in labels], dtype=np.int64)
    return ClassifySplit(path, tokens_NL, labels_N, lengths_N, int(pad_id))


def load_classify_data(
    train_file: str,
    val_file: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    pad_id: int,
    text_field: str = "text",
    label_field: str = "label",
) -> ClassifyData:
    """Both splits, tokenised, with the train file's label mapping."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    fields = (text_field, label_field)
    train_rows = _read_rows(train_file, fields, "task.train_file")
    labels = label_set(train_rows[1], train_file)
    val_rows = _read_rows(val_file, fields, "task.val_file")
    ids = {v: i for i, v in enumerate(labels)}
    train = _split(train_file, train_rows, tokenizer, ids, seq_len, pad_id)
    val = _split(val_file, val_rows, tokenizer, ids, seq_len, pad_id)
    return ClassifyData(labels=labels, train=train, val=val)


class ClassifyLoader(TrainLoader):
    """Endless (tokens_BL, labels_B) batches for one rank: TrainLoader's order, sharding
    and position (state_dict / load_state_dict), over the rows of a split."""

    def __init__(
        self,
        split: ClassifySplit,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            split.tokens_NL,
            rank=rank,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            seed=seed,
            shuffle=shuffle,
        )
        self.split = split

    @property
    def seq_len(self) -> int:
        return self.split.seq_len

    def next_batch(self) -> ClassifyBatch:
        ids = self._take(self.global_batch_blocks)
        b = self.micro_batch_size
        mine = ids[self.rank * b : (self.rank + 1) * b]
        return _rows(self.split, mine)


def _rows(split: ClassifySplit, ids: np.ndarray, repeat_B: np.ndarray | None = None):
    tokens_BL = torch.from_numpy(split.tokens_NL[ids])
    labels_B = torch.from_numpy(split.labels_N[ids])
    if repeat_B is not None:
        labels_B[torch.from_numpy(repeat_B)] = IGNORE
    return tokens_BL, labels_B


class ClassifyValLoader(ValLoader):
    """A fixed list of (tokens_BL, labels_B) validation batches, sharded like ValLoader."""

    def __init__(
        self, split: ClassifySplit, *, rank: int, world_size: int, micro_batch_size: int
    ) -> None:
        super().__init__(
            split.tokens_NL, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size
        )
        self.split = split

    def batches(self, n: int, *, mask_repeats: bool = False) -> list[ClassifyBatch]:
        """This rank's first n batches, wrapping around the split. mask_repeats=True sets
        the label of every row past the first pass to IGNORE, so over
        full_epoch_batches() batches each row counts exactly once (summed over ranks)."""
        g = self.micro_batch_size * self.world_size
        start = self.rank * self.micro_batch_size
        out = []
        for step in range(n):
            pos = np.arange(start, start + self.micro_batch_size) + step * g
            repeat = pos >= self.num_blocks if mask_repeats else None
            out.append(_rows(self.split, pos % self.num_blocks, repeat))
        return out

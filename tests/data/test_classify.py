"""The jsonl classification dataset: labels, tokenising, truncation and padding, errors
naming file and line, and loaders that shard and resume like TrainLoader / ValLoader."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xpar.data.classify import (
    IGNORE,
    ClassifyLoader,
    ClassifyValLoader,
    encode_rows,
    load_classify_data,
)
from xpar.data.loader import TrainLoader, ValLoader
from xpar.data.tokenizer import ByteTokenizer
from xpar.errors import XparConfigError

PAD = 256  # the byte tokenizer's eod id


def write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def rows_of(labels, text=lambda i: f"row {i} " + "x" * (i % 7)):
    return [{"text": text(i), "label": lab} for i, lab in enumerate(labels)]


@pytest.fixture
def files(tmp_path):
    train = write(tmp_path / "train.jsonl", rows_of(["b", "a", "c", "a", "b", "c", "a"]))
    val = write(tmp_path / "val.jsonl", rows_of(["c", "a"]))
    return train, val


def load(train, val, seq_len=8, **kw):
    return load_classify_data(train, val, ByteTokenizer(), seq_len=seq_len, pad_id=PAD, **kw)


def test_labels_tokens_truncation_and_padding(files):
    data = load(*files, seq_len=8)
    assert data.labels == ["a", "b", "c"] and data.num_classes == 3
    assert data.train.labels_N.tolist() == [1, 0, 2, 0, 1, 2, 0]
    assert data.val.labels_N.tolist() == [2, 0]
    for i in range(7):
        raw = list(f"row {i} {'x' * (i % 7)}".encode())
        row = data.train.tokens_NL[i].tolist()
        want = (raw + [PAD] * 8)[:8]
        assert row == want and data.train.lengths_N[i] == len(raw)
    assert data.train.tokens_NL.dtype == np.int64
    assert data.train.truncated == sum(len(f"row {i} ") + i % 7 > 8 for i in range(7))
    line = data.summary()
    assert "3 labels [a, b, c]" in line and "train 7 rows" in line and "val 2 rows" in line


def test_integer_labels_sort_numerically_before_strings(tmp_path):
    tr = write(tmp_path / "t.jsonl", rows_of([10, 2, "z", 2, 10]))
    va = write(tmp_path / "v.jsonl", rows_of([2, "z"]))
    data = load(tr, va)
    assert data.labels == [2, 10, "z"]
    assert data.train.labels_N.tolist() == [1, 0, 2, 0, 1]


def test_custom_fields_and_blank_lines(tmp_path):
    rows = ['{"body": "hi", "y": "p"}', "", '{"body": "yo", "y": "q"}', "   "]
    tr = write(tmp_path / "t.jsonl", rows)
    data = load(tr, tr, text_field="body", label_field="y")
    assert data.labels == ["p", "q"] and data.train.num_rows == 2


def test_encode_rows_with_a_stub_tokenizer():
    class Words:  # the Tokenizer protocol, nothing else
        name, vocab_size, eod_id, fingerprint = "words", 10, 9, "w"

        def encode_batch(self, texts):
            return [np.array([len(w) for w in t.split()], dtype=np.uint16) for t in texts]

        def decode(self, ids):
            return ""

    tokens, lengths = encode_rows(["a bb ccc", "", "dddd"], Words(), seq_len=2, pad_id=0)
    assert tokens.tolist() == [[1, 2], [0, 0], [4, 0]] and lengths.tolist() == [3, 0, 1]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a", "label": "x"}', "not json"], r"t.jsonl:2 is not valid JSON"),
        (['{"text": "a", "label": "x"}', "[1, 2]"], r"t.jsonl:2 holds list, not a JSON object"),
        (['{"text": "a"}'], r"t.jsonl:1 has no field 'label' .*task.label_field"),
        (
            ['{"label": "x", "body": "a"}'],
            r"t.jsonl:1 has no field 'text' .*'label', 'body'.*task.text_field",
        ),
        (['{"text": 3, "label": "x"}'], r"t.jsonl:1: field 'text' is int, not a string"),
        (
            ['{"text": "a", "label": true}'],
            r"t.jsonl:1: label True .*neither a string nor an integer",
        ),
        (['{"text": "a", "label": 1.5}'], r"t.jsonl:1: label 1.5"),
        (
            ['{"text": "a", "label": "x"}', '{"text": "b", "label": "x"}'],
            r"1 distinct label.*at least 2",
        ),
        ([""], r"task.train_file=.*t.jsonl.* holds no row"),
    ],
)
def test_bad_train_file(tmp_path, lines, match):
    tr = write(tmp_path / "t.jsonl", lines)
    va = write(tmp_path / "v.jsonl", rows_of(["x", "y"]))
    with pytest.raises(XparConfigError, match=match):
        load(tr, va)


def test_val_label_missing_from_train_names_file_line_and_label(files, tmp_path):
    va = write(tmp_path / "v.jsonl", rows_of(["a", "b"]) + [""] + rows_of(["zz"]))
    with pytest.raises(XparConfigError, match=r"v.jsonl:4: label 'zz' does not occur in the train"):
        load(files[0], va)


def test_missing_files(files, tmp_path):
    with pytest.raises(XparConfigError, match=r"task.train_file=.*nope.jsonl.* no such file"):
        load(str(tmp_path / "nope.jsonl"), files[1])
    with pytest.raises(XparConfigError, match=r"task.val_file=.*nope.jsonl.* no such file"):
        load(files[0], str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------- loaders


def split_of(n, seq_len=3):
    """A split whose row i holds i at every position and label i % 5: batches tell rows."""
    from xpar.data.classify import ClassifySplit

    tokens = np.repeat(np.arange(n)[:, None], seq_len, axis=1).astype(np.int64)
    labels = np.arange(n) % 5
    return ClassifySplit("mem", tokens, labels, np.full(n, seq_len), PAD)


def row_ids(batch):
    tokens, labels = batch
    ids = tokens[:, 0]
    assert torch.equal(labels, ids % 5) and bool((tokens == ids[:, None]).all())
    assert tokens.dtype == labels.dtype == torch.long
    return ids.tolist()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 19),
    world=st.integers(1, 4),
    b=st.integers(1, 3),
    steps=st.integers(1, 10),
    shuffle=st.booleans(),
)
def test_train_loader_shards_like_train_loader(n, world, b, steps, shuffle):
    split = split_of(n)
    # TrainLoader over blocks whose first token is the row id: the reference order.
    blocks = np.repeat(np.arange(n)[:, None], 2, axis=1).astype(np.uint16)
    mine = [
        ClassifyLoader(split, rank=r, world_size=world, micro_batch_size=b, seed=3, shuffle=shuffle)
        for r in range(world)
    ]
    ref = [
        TrainLoader(blocks, rank=r, world_size=world, micro_batch_size=b, seed=3, shuffle=shuffle)
        for r in range(world)
    ]
    single = ClassifyLoader(
        split, rank=0, world_size=1, micro_batch_size=b * world, seed=3, shuffle=shuffle
    )
    for _ in range(steps):
        got = [row_ids(ld.next_batch()) for ld in mine]
        want = [ld.next_batch()[0][:, 0].tolist() for ld in ref]
        assert got == want
        assert sum(got, []) == row_ids(single.next_batch())
    assert mine[0].state_dict() == ref[0].state_dict() == single.state_dict()


def test_every_row_once_per_epoch_and_seeded_order():
    ld = ClassifyLoader(split_of(12), rank=0, world_size=1, micro_batch_size=4, seed=1)
    epoch0 = sum((row_ids(ld.next_batch()) for _ in range(3)), [])
    epoch1 = sum((row_ids(ld.next_batch()) for _ in range(3)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    other = ClassifyLoader(split_of(12), rank=0, world_size=1, micro_batch_size=4, seed=2)
    assert sum((row_ids(other.next_batch()) for _ in range(3)), []) != epoch0
    assert ld.epoch_progress == 2.0 and ld.seq_len == 3


def test_resume_continues_bitwise_through_json():
    def fresh():
        return ClassifyLoader(split_of(10), rank=1, world_size=2, micro_batch_size=3, seed=5)

    a = fresh()
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert set(state) == {"epoch", "index", "num_blocks"}
    b = fresh()
    b.load_state_dict(state)
    for _ in range(6):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_val_batches_shard_like_val_loader_and_count_each_row_once():
    n, b, world = 11, 2, 3
    split = split_of(n)
    blocks = np.repeat(np.arange(n)[:, None], 2, axis=1).astype(np.uint16)
    vals = [
        ClassifyValLoader(split, rank=r, world_size=world, micro_batch_size=b) for r in range(world)
    ]
    assert vals[0].full_epoch_batches() == 2  # ceil(11 / 6)
    counted = []
    for r, v in enumerate(vals):
        ref = ValLoader(blocks, rank=r, world_size=world, micro_batch_size=b).batches(3)
        got = v.batches(3)
        assert [row_ids(x) for x in got] == [x[0][:, 0].tolist() for x in ref]
        assert [row_ids(x) for x in v.batches(3)] == [row_ids(x) for x in got]  # fixed
        for tokens, labels in v.batches(v.full_epoch_batches(), mask_repeats=True):
            kept = labels != IGNORE
            assert torch.equal(labels[kept], tokens[kept, 0] % 5)
            counted += tokens[kept, 0].tolist()
    assert sorted(counted) == list(range(n))  # 12 slots, the one repeat left out


def test_loaders_on_a_real_file(files):
    data = load(*files, seq_len=6)
    ld = ClassifyLoader(data.train, rank=0, world_size=1, micro_batch_size=7, seed=0)
    tokens, labels = ld.next_batch()
    assert tokens.shape == (7, 6) and sorted(labels.tolist()) == sorted(
        data.train.labels_N.tolist()
    )
    ((vt, vl),) = ClassifyValLoader(data.val, rank=0, world_size=1, micro_batch_size=2).batches(1)
    assert torch.equal(vt, torch.from_numpy(data.val.tokens_NL)) and vl.tolist() == [2, 0]

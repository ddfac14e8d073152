"""The shipped stdlib_code task, built from this interpreter's real standard library:
byte-identical rebuilds, a split by file, every label on both sides and balanced, chunk
sizes bounded; the chunker and the file split on their own; the cache and the command."""

import json
import os

import pytest

from xpar.data.classify import ClassifyLoader, load_classify_data
from xpar.data.tasks import stdlib_code as sc
from xpar.data.tokenizer import ByteTokenizer
from xpar.errors import XparConfigError

FILES = ("train.jsonl", "val.jsonl", "meta.json")


def read_rows(d, split):
    with open(os.path.join(d, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("stdlib_code"))
    return d, sc.build_task(d)


def test_rebuild_is_byte_identical(built, tmp_path):
    d, meta = built
    again = sc.build_task(str(tmp_path), packages=list(reversed(sc.DEFAULT_PACKAGES)))
    assert again == meta
    for name in FILES:
        with open(os.path.join(d, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    other = sc.build_task(str(tmp_path / "s1"), seed=1)
    assert read_rows(str(tmp_path / "s1"), "train") != read_rows(d, "train")
    assert other["labels"] == meta["labels"]


def test_split_by_file_balanced_every_label_both_sides(built):
    d, meta = built
    labels = sorted(sc.DEFAULT_PACKAGES)
    assert meta["labels"] == labels
    files = {}
    for split in sc.SPLITS:
        rows = read_rows(d, split)
        files[split] = {r["file"] for r in rows}
        per = {lab: sum(r["label"] == lab for r in rows) for lab in labels}
        assert set(per.values()) == {meta["rows"][split][labels[0]]}, per  # balanced
        assert min(per.values()) >= (200 if split == "train" else 40)  # 3.11: 291, 76
        assert per == meta["rows"][split]
        for r in rows:
            assert r["file"].split("/")[0] == r["label"]  # the label is the file's package
            assert not {"test", "tests"} & set(r["file"].split("/")[1:-1])
            assert r["file"].endswith(".py")
        # Rows come shuffled, not grouped by label.
        assert len({r["label"] for r in rows[:40]}) == len(labels)
    assert not files["train"] & files["val"]  # no file on both sides
    for lab in labels:
        for split in sc.SPLITS:
            assert any(f.startswith(lab + "/") for f in files[split]), (lab, split)
    assert meta["python"] and len(meta["source_hash"]) == 64


def test_chunks_are_bounded_and_come_from_their_file(built):
    d, meta = built
    cb = meta["chunk_bytes"]
    root = sc.stdlib_root()
    sources = {}
    for split in sc.SPLITS:
        for r in read_rows(d, split):
            n = len(r["text"].encode("utf-8"))
            assert cb // 4 <= n <= cb and r["text"].strip()
            if r["file"] not in sources:
                with open(os.path.join(root, r["file"]), encoding="utf-8") as f:
                    sources[r["file"]] = f.read()
            assert r["text"] in sources[r["file"]]


def test_chunk_source_cuts_at_lines_and_characters():
    text = "".join(f"line {i:03d} {'ab' * (i % 9)}\n" for i in range(60))
    chunks = sc.chunk_source(text, 64)
    assert "".join(chunks) == text  # every chunk long enough: nothing dropped
    assert all(c.endswith("\n") and len(c.encode()) <= 64 for c in chunks)
    # A long line of 3-byte characters is cut at character boundaries.
    long = "é€" * 100 + "\nshort\n"
    parts = sc.chunk_source(long, 50)
    assert all(len(p.encode()) <= 50 for p in parts)
    assert "".join(parts).startswith("é€" * 20)
    assert sc.chunk_source("x\n", 64) == []  # under chunk_bytes // 4
    assert sc.chunk_source("\n" * 40, 64) == []  # blank


def test_split_files_rules():
    sizes = {f"p/{i}.py": 100 + 37 * i for i in range(10)}
    seen = set()
    for seed in range(10):
        val = sc.split_files(sizes, 0.3, seed=seed)
        assert 0 < len(val) < 10 and set(val) <= set(sizes)
        # Within one file of the target: a file that would bring it closer is taken.
        assert abs(sum(sizes[f] for f in val) - 0.3 * sum(sizes.values())) <= max(sizes.values())
        assert val == sc.split_files(sizes, 0.3, seed=seed)
        seen.add(tuple(sorted(val)))
    assert len(seen) > 5  # the seed decides
    assert sc.split_files({"a.py": 10, "b.py": 1000}, 0.9, seed=0) != ["a.py", "b.py"]
    assert len(sc.split_files({"a.py": 10, "b.py": 20}, 0.01, seed=3)) == 1  # at least one
    with pytest.raises(XparConfigError, match="a package needs 2 or more files"):
        sc.split_files({"a.py": 10}, 0.2, seed=0)


def test_bad_options():
    with pytest.raises(XparConfigError, match="package 'nosuchpkg' is not a directory"):
        sc.build_task("/tmp/unused", packages=["json", "nosuchpkg"])
    with pytest.raises(XparConfigError, match="chunk_bytes=8"):
        sc.build_task("/tmp/unused", chunk_bytes=8)
    with pytest.raises(XparConfigError, match="at least 2 distinct"):
        sc.build_task("/tmp/unused", packages=["json", "json"])
    with pytest.raises(XparConfigError, match="val_fraction=1.0"):
        sc.build_task("/tmp/unused", val_fraction=1.0)


def test_ensure_task_builds_once_into_the_cache(built, tmp_path):
    d, meta = built
    directory, got = sc.ensure_task(str(tmp_path))
    assert directory.startswith(str(tmp_path / "tasks" / "stdlib_code"))
    assert {k: v for k, v in got.items() if k != "build_s"} == meta
    with open(os.path.join(directory, "train.jsonl"), "rb") as a:
        with open(os.path.join(d, "train.jsonl"), "rb") as b:
            assert a.read() == b.read()
    mtime = os.path.getmtime(os.path.join(directory, "train.jsonl"))
    again, _ = sc.ensure_task(str(tmp_path))
    assert again == directory and os.path.getmtime(os.path.join(again, "train.jsonl")) == mtime
    smaller, _ = sc.ensure_task(str(tmp_path), chunk_bytes=256)
    assert smaller != directory


def test_loads_as_a_classification_dataset(built):
    d, meta = built
    data = load_classify_data(
        os.path.join(d, "train.jsonl"),
        os.path.join(d, "val.jsonl"),
        ByteTokenizer(),
        seq_len=meta["chunk_bytes"],
        pad_id=256,
    )
    assert data.labels == meta["labels"] and data.train.truncated == 0
    counts = data.val.class_counts(data.num_classes)
    assert counts == [meta["rows"]["val"][lab] for lab in data.labels]
    x, y = ClassifyLoader(data.train, rank=0, world_size=2, micro_batch_size=4, seed=0).next_batch()
    assert x.shape == (4, 512) and y.max() < 8


def test_command_line(tmp_path, capsys):
    out = str(tmp_path / "task")
    assert sc.main(["--out", out, "--packages", "json,email", "http", "--chunk-bytes", "256"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("stdlib_code: 3 labels (email, http, json)")
    assert out in line[0]
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["labels"] == ["email", "http", "json"] and meta["chunk_bytes"] == 256
    assert sc.main(["--out", out, "--packages", "json", "nope"]) == 2
    assert "error: stdlib_code: package 'nope'" in capsys.readouterr().err

"""build_data end to end on small real corpora: loading, packing, cache, errors, concurrency."""

import json
import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import make_text, read_stream, split_docs, write_jsonl, write_txt

from xpar.data import DataConfig, build_data
from xpar.errors import XparConfigError

EOD = 256


def decode_docs(bundle, split):
    docs = split_docs(read_stream(bundle, split), bundle.tokenizer.eod_id)
    return [bytes(d).decode("utf-8") for d in docs]


def test_txt_packing_places_eod_and_shifts_targets(tmp_path, cache_dir):
    texts = {f"f{i}.txt": make_text(i, n_lines=3 + i) for i in range(6)}
    write_txt(tmp_path / "c", texts)
    cfg = DataConfig(files=[str(tmp_path / "c")], seq_len=16, cache_dir=cache_dir, shuffle=False)
    b = build_data(cfg, micro_batch_size=2)
    train, val = decode_docs(b, "train"), decode_docs(b, "validation")
    # Each file is one document, in sorted order, and each split holds whole files.
    assert sorted(train + val) == sorted(texts.values())
    assert train == [t for t in texts.values() if t in train]
    assert b.stats.train.docs == len(train) and b.stats.validation.docs == len(val) >= 1
    stream = read_stream(b, "train")
    assert b.stats.train.tokens == len(stream) == sum(len(t) + 1 for t in train)
    n = len(stream) // 17
    assert b.stats.train.blocks == n == len(b.train.blocks)  # the remainder is dropped
    np.testing.assert_array_equal(np.asarray(b.train.blocks).reshape(-1), stream[: n * 17])
    x, y = b.train.next_batch()
    assert torch.equal(x[0], torch.as_tensor(stream[0:16], dtype=torch.long))
    assert torch.equal(y[0], torch.as_tensor(stream[1:17], dtype=torch.long))
    assert torch.equal(x[1], torch.as_tensor(stream[17:33], dtype=torch.long))
    ends = np.flatnonzero(stream == EOD)
    assert list(ends + 1) == list(np.cumsum([len(t) + 1 for t in train]))


def test_jsonl_by_file_and_by_document(tmp_path, cache_dir):
    docs = [make_text(i, n_lines=2) for i in range(40)] + [""]
    write_jsonl(tmp_path / "a.jsonl", docs[:20], field="body")
    write_jsonl(tmp_path / "b.jsonl", docs[20:], field="body")
    two = build_data(
        DataConfig(
            files=[str(tmp_path / "*.jsonl")], text_field="body", seq_len=8, cache_dir=cache_dir
        )
    )
    assert two.stats.split_by == "file"
    got = decode_docs(two, "train"), decode_docs(two, "validation")
    assert sorted(got, key=len) == [docs[:20], docs[20:40]] or sorted(got, key=len) == [
        docs[20:40],
        docs[:20],
    ]
    one = build_data(
        DataConfig(
            files=[str(tmp_path / "a.jsonl")], text_field="body", seq_len=8, cache_dir=cache_dir
        )
    )
    assert one.stats.split_by == "document"
    train, val = decode_docs(one, "train"), decode_docs(one, "validation")
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(docs[:20])
    assert train == [d for d in docs[:20] if d in train]  # file order kept
    again = build_data(
        DataConfig(
            files=[str(tmp_path / "a.jsonl")],
            text_field="body",
            seq_len=8,
            cache_dir=cache_dir + "2",
        )
    )
    assert decode_docs(again, "validation") == val and not again.stats.cache_hit


def test_json_and_parquet_load(tmp_path, cache_dir):
    docs = [make_text(i, n_lines=3) for i in range(12)]
    with open(tmp_path / "recs.json", "w") as f:
        json.dump([{"text": t, "n": i} for i, t in enumerate(docs[:6])], f)
    pq.write_table(pa.table({"text": docs[6:], "n": list(range(6))}), tmp_path / "rows.parquet")
    b = build_data(
        DataConfig(
            files=[str(tmp_path / "recs.json"), str(tmp_path / "rows.parquet")],
            seq_len=8,
            cache_dir=cache_dir,
        )
    )
    got = decode_docs(b, "train") + decode_docs(b, "validation")
    assert sorted(got) == sorted(docs)
    assert b.stats.train.files == 1 and b.stats.validation.files == 1


def test_single_text_file_splits_by_position(tmp_path, cache_dir):
    text = "".join(make_text(i) for i in range(10))
    write_txt(tmp_path, {"book.txt": text})
    b = build_data(
        DataConfig(
            files=[str(tmp_path / "book.txt")], seq_len=32, val_fraction=0.1, cache_dir=cache_dir
        )
    )
    (train,), (val,) = decode_docs(b, "train"), decode_docs(b, "validation")
    assert train + val == text and train.endswith("\n")
    assert 0.08 < len(val) / len(text) < 0.12


def test_default_stdlib_corpus_small_and_cached(cache_dir):
    cfg = DataConfig(max_files=30, seq_len=64, cache_dir=cache_dir)
    first = build_data(cfg, rank=1, world_size=2, micro_batch_size=4)
    s = first.stats
    assert s.corpus == "stdlib" and s.split_by == "file" and not s.cache_hit
    assert s.train.files + s.validation.files == 30 and s.validation.files >= 1
    assert s.train.blocks > 0 and s.validation.blocks > 0 and s.vocab_size == 257
    x, y = first.train.next_batch()
    assert x.shape == (4, 64) and int(x.max()) <= 256
    text = first.tokenizer.decode(read_stream(first, "train")[:2000].tolist())
    assert "def " in text or "import " in text
    second = build_data(cfg, rank=1, world_size=2, micro_batch_size=4)
    assert second.stats.cache_hit and second.stats.train == s.train
    assert torch.equal(second.train.next_batch()[0], x)
    # seq_len only re-cuts the cached stream.
    other = build_data(DataConfig(max_files=30, seq_len=32, cache_dir=cache_dir))
    assert other.stats.cache_hit and other.stats.train.tokens == s.train.tokens


def test_changed_file_rebuilds_the_cache(tmp_path, cache_dir):
    write_txt(tmp_path, {f"f{i}.txt": make_text(i) for i in range(3)})
    cfg = DataConfig(files=[str(tmp_path)], seq_len=8, cache_dir=cache_dir)
    a = build_data(cfg)
    assert build_data(cfg).stats.cache_hit
    write_txt(tmp_path, {"f1.txt": make_text(1) + "more\n"})
    b = build_data(cfg)
    assert not b.stats.cache_hit and b.stats.cache_dir != a.stats.cache_dir
    assert b.stats.train.tokens + b.stats.validation.tokens == (
        a.stats.train.tokens + a.stats.validation.tokens + 5
    )


def test_bad_inputs_name_the_field(tmp_path, cache_dir):
    write_txt(tmp_path, {"a.txt": "short\n", "b.txt": "tiny\n"})
    with pytest.raises(
        XparConfigError, match=r"data\.seq_len=64 leaves no train block.*data\.files"
    ):
        build_data(DataConfig(files=[str(tmp_path / "*.txt")], seq_len=64, cache_dir=cache_dir))
    write_jsonl(tmp_path / "d.jsonl", ["x" * 50, "y" * 50], field="content")
    with pytest.raises(XparConfigError, match=r"data\.text_field='text' is not a column.*content"):
        build_data(DataConfig(files=[str(tmp_path / "d.jsonl")], cache_dir=cache_dir))
    with pytest.raises(XparConfigError, match=r"data\.text_field='id' holds"):
        build_data(
            DataConfig(files=[str(tmp_path / "d.jsonl")], text_field="id", cache_dir=cache_dir)
        )
    with open(tmp_path / "broken.jsonl", "w") as f:
        f.write('{"text": "ok"}\n{not json\n')
    with pytest.raises(XparConfigError, match=r"data\.files: datasets could not load"):
        build_data(DataConfig(files=[str(tmp_path / "broken.jsonl")], cache_dir=cache_dir))
    with pytest.raises(XparConfigError, match=r"data\.tokenizer='.*nope'"):
        build_data(DataConfig(tokenizer=str(tmp_path / "nope"), cache_dir=cache_dir))
    with pytest.raises(XparConfigError, match=r"train\.micro_batch_size=0"):
        build_data(
            DataConfig(files=[str(tmp_path / "a.txt")], cache_dir=cache_dir), micro_batch_size=0
        )
    # A failed build leaves no cache entry behind.
    assert not [d for d in os.listdir(os.path.join(cache_dir, "tokens")) if ".tmp-" in d]


def _build_in_process(files, cache_dir, rank):
    torch.set_num_threads(1)
    b = build_data(DataConfig(files=files, seq_len=8, cache_dir=cache_dir), rank, 2, 2)
    return b.stats.cache_hit, b.stats.cache_dir, b.train.next_batch()[0].tolist()


@pytest.mark.slow  # spawns two interpreters that import torch and datasets
def test_concurrent_ranks_build_once_without_a_process_group(tmp_path, cache_dir):
    write_txt(tmp_path, {f"f{i}.txt": make_text(i, n_lines=50) for i in range(8)})
    files = [str(tmp_path / "*.txt")]
    with mp.get_context("spawn").Pool(2) as pool:
        out = pool.starmap(_build_in_process, [(files, cache_dir, r) for r in range(2)])
    hits = sorted(o[0] for o in out)
    assert hits == [False, True]  # one process built, the other waited and reused it
    assert out[0][1] == out[1][1]
    (single,) = [build_data(DataConfig(files=files, seq_len=8, cache_dir=cache_dir), 0, 1, 4)]
    assert single.train.next_batch()[0].tolist() == out[0][2] + out[1][2]

"""build_data end to end on small real corpora: loading, packing, cache, errors, concurrency."""

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import make_text, read_stream, split_docs, write_jsonl, write_txt

from xpar.config.store import XparConfigWarning
from xpar.data import DataConfig, build_data
from xpar.data.build import describe_cache
from xpar.data.corpus import VAL_TOLERANCE
from xpar.errors import XparConfigError

EOD = 256


def decode_docs(bundle, split):
    docs = split_docs(read_stream(bundle, split), bundle.tokenizer.eod_id)
    return [bytes(d).decode("utf-8") for d in docs]


def test_txt_packing_places_eod_and_shifts_targets(tmp_path, cache_dir):
    texts = {f"f{i}.txt": make_text(i, n_lines=3 + i) for i in range(6)}
    write_txt(tmp_path / "c", texts)
    # val_fraction 0.12: whole files (8% to 25% of the bytes each) can reach the share.
    cfg = DataConfig(
        files=[str(tmp_path / "c")],
        seq_len=16,
        val_fraction=0.12,
        cache_dir=cache_dir,
        shuffle=False,
    )
    b = build_data(cfg, micro_batch_size=2)
    train, val = decode_docs(b, "train"), decode_docs(b, "validation")
    # Each file is one document, in sorted order, and each split holds whole files.
    assert b.stats.split_by == "file"
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


def test_jsonl_files_that_miss_the_share_split_by_document(tmp_path, cache_dir):
    docs = [make_text(i, n_lines=2) for i in range(40)] + [""]
    write_jsonl(tmp_path / "a.jsonl", docs[:20], field="body")
    write_jsonl(tmp_path / "b.jsonl", docs[20:], field="body")
    two = build_data(
        DataConfig(
            files=[str(tmp_path / "*.jsonl")], text_field="body", seq_len=8, cache_dir=cache_dir
        )
    )
    # Either file would be half the corpus: documents from both files are split instead.
    assert two.stats.split_by == "document" and two.stats.val_share_ok
    train, val = decode_docs(two, "train"), decode_docs(two, "validation")
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(docs[:40])
    assert train == [d for d in docs[:40] if d in train]  # corpus order kept
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


def test_two_unequal_files_give_val_fraction_not_the_smaller_file(tmp_path, cache_dir):
    """The issue's case: files of 65% and 35% of the tokens, val_fraction=0.05."""
    docs = [make_text(i, n_lines=3) for i in range(200)]
    write_jsonl(tmp_path / "a.jsonl", docs[:130])
    write_jsonl(tmp_path / "b.jsonl", docs[130:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", XparConfigWarning)  # met: no warning
        b = build_data(DataConfig(files=[str(tmp_path / "*.jsonl")], cache_dir=cache_dir))
    s = b.stats
    assert s.split_by == "document" and s.val_fraction == 0.05
    assert s.val_share == s.validation.tokens / (s.train.tokens + s.validation.tokens)
    assert abs(s.val_share - 0.05) <= VAL_TOLERANCE * 0.05 and 0.04 < s.val_share <= 0.05
    assert "; val share 4." in s.summary() and s.summary().endswith("(target 5% ±2.5%)")


def test_two_text_files_give_validation_the_tail_of_each(tmp_path, cache_dir):
    # Two text files are two documents, either far more than 5% of the tokens: every
    # document's last 5% (from a line break when one is near) goes to validation instead.
    a, b_ = make_text(1, 40), make_text(2, 20)
    write_txt(tmp_path, {"a.txt": a, "b.txt": b_})
    cfg = DataConfig(files=[str(tmp_path / "*.txt")], seq_len=8, cache_dir=cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", XparConfigWarning)
        b = build_data(cfg)
    train, val = decode_docs(b, "train"), decode_docs(b, "validation")
    assert b.stats.split_by == "document" and b.stats.val_share_ok
    assert sorted(t + v for t, v in zip(train, val, strict=True)) == sorted([a, b_])


def test_documents_too_short_to_cut_warn_once_on_rank_0(tmp_path, cache_dir):
    write_txt(tmp_path, {f"{c}.txt": f"{c}{c}\n" for c in "abc"})
    cfg = DataConfig(files=[str(tmp_path / "*.txt")], seq_len=1, cache_dir=cache_dir)
    with pytest.warns(XparConfigWarning) as got:
        b = build_data(cfg)
    (w,) = got
    msg = str(w.message)
    assert "\n" not in msg and msg.startswith("data.val_fraction=0.05 not met: validation is ")
    assert "(cut from every document), outside 2.5%..7.5%" in msg and "too short" in msg
    assert b.stats.split_by == "document" and not b.stats.val_share_ok
    assert b.stats.summary().endswith(", missed)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", XparConfigWarning)
        build_data(cfg, rank=1, world_size=2, micro_batch_size=1)  # other ranks stay quiet


def test_cache_report_names_who_built_it():
    assert describe_cache([None]) == "cache hit"
    assert describe_cache([None, None]) == "cache hit (all ranks)"
    assert describe_cache([None, 2.34]) == "cache built by rank 1 in 2.3s"
    assert describe_cache([1.0, None, None, 2.5]) == "cache built by 2 ranks (0, 3) in up to 2.5s"
    many = describe_cache([1.0] * 6)
    assert many == "cache built by 6 ranks (0, 1, 2, 3, ...) in up to 1.0s"


def test_json_and_parquet_load(tmp_path, cache_dir):
    docs = [make_text(i, n_lines=3) for i in range(12)]
    with open(tmp_path / "recs.json", "w") as f:
        json.dump([{"text": t, "n": i} for i, t in enumerate(docs[:6])], f)
    pq.write_table(pa.table({"text": docs[6:], "n": list(range(6))}), tmp_path / "rows.parquet")
    b = build_data(
        DataConfig(
            files=[str(tmp_path / "recs.json"), str(tmp_path / "rows.parquet")],
            seq_len=8,
            val_fraction=0.1,  # one document is 1/12 of the tokens: whole documents reach it
            cache_dir=cache_dir,
        )
    )
    got = decode_docs(b, "train") + decode_docs(b, "validation")
    assert sorted(got) == sorted(docs)
    # One file of two would be half the tokens: the twelve documents are split instead.
    assert b.stats.split_by == "document" and b.stats.train.docs + b.stats.validation.docs == 12


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
    assert 0.08 < len(val) / len(text) < 0.12 and b.stats.val_share_ok


def test_single_document_with_a_far_line_break_is_cut_mid_line(tmp_path, cache_dir):
    # The only line break after the cut would leave 4.9% for val_fraction=0.3.
    text = "x" * 950 + "\n" + "y" * 49
    write_txt(tmp_path, {"one.txt": text})
    cfg = DataConfig(files=[str(tmp_path / "one.txt")], seq_len=8, val_fraction=0.3)
    b = build_data(dataclasses.replace(cfg, cache_dir=cache_dir))
    (train,), (val,) = decode_docs(b, "train"), decode_docs(b, "validation")
    assert train + val == text and len(val) == 300 and b.stats.val_share_ok


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


def test_a_binary_renamed_txt_is_refused_or_skipped(tmp_path, cache_dir):
    write_txt(tmp_path, {"good.txt": make_text(1, n_lines=40)})
    shutil.copy(sys.executable, tmp_path / "x.txt")  # a real ELF
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "a"}\n\0\0\n')
    files = [str(tmp_path / "*.txt"), str(tmp_path / "nul.jsonl")]
    with pytest.raises(XparConfigError) as e:
        build_data(DataConfig(files=files, seq_len=8, cache_dir=cache_dir))
    msg = str(e.value)
    assert f"2 file(s) not text: {str(tmp_path / 'nul.jsonl')!r} (a NUL byte at offset 14), " in msg
    assert f"{str(tmp_path / 'x.txt')!r} (a NUL byte at offset 7)" in msg
    assert "good.txt" not in msg and "data.skip_bad_files=true" in msg
    cfg = DataConfig(files=files, seq_len=8, cache_dir=cache_dir, skip_bad_files=True)
    for hit in (False, True):  # the same line when the cache is reused
        with pytest.warns(XparConfigWarning) as got:
            b = build_data(cfg)
        (w,) = got
        assert str(w.message).startswith(
            "data.skip_bad_files=true: skipped 2 file(s) that are not text: "
        )
        assert b.stats.cache_hit is hit
        assert decode_docs(b, "train")[0] + decode_docs(b, "validation")[0] == make_text(1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", XparConfigWarning)
        build_data(cfg, rank=1, world_size=2, micro_batch_size=1)  # other ranks stay quiet
    # That cache skipped the binaries: a run that must refuse them does not reuse it.
    with pytest.raises(XparConfigError, match="not text"):
        build_data(DataConfig(files=files, seq_len=8, cache_dir=cache_dir))


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

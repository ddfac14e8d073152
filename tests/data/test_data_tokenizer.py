"""Byte tokenizer and a local Hugging Face tokenizer.json (a tiny BPE trained here)."""

import json

import numpy as np
import pytest
from data_helpers import make_text, read_stream, split_docs, write_txt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xpar.data import ByteTokenizer, DataConfig, HFTokenizer, build_data, build_tokenizer
from xpar.errors import XparConfigError


def train_bpe(directory, special_tokens, vocab_size=300, config=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([make_text(i) for i in range(50)], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_byte_tokenizer():
    t = build_tokenizer("byte")
    assert isinstance(t, ByteTokenizer) and t.vocab_size == 257 and t.eod_id == 256
    ids = t.encode("héllo\n")
    assert ids.tolist() == list("héllo\n".encode()) and t.decode(ids) == "héllo\n"
    assert t.decode([104, 105, 256, 106]) == "hi\nj"


def test_hf_tokenizer_uses_its_end_of_text_token(tmp_path):
    ref = train_bpe(tmp_path / "tok", ["<pad>", "<|endoftext|>"])
    t = build_tokenizer(str(tmp_path / "tok"))
    assert isinstance(t, HFTokenizer)
    assert t.eod_id == ref.token_to_id("<|endoftext|>") == 1
    assert t.vocab_size == ref.get_vocab_size() <= 300
    text = make_text(3)
    ids = t.encode(text)
    assert ids.dtype == np.uint16 and len(ids) < len(text.encode())  # merges happened
    assert t.decode(ids) == text
    # The tokenizer.json path itself works too.
    assert build_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).eod_id == 1


def test_hf_tokenizer_config_eos_wins(tmp_path):
    train_bpe(
        tmp_path / "tok", ["<|endoftext|>", "</s>"], config={"eos_token": {"content": "</s>"}}
    )
    t = build_tokenizer(str(tmp_path / "tok"))
    assert t.eod_token == "</s>" and t.eod_id == 1


def test_hf_tokenizer_without_eos_gets_one_added(tmp_path):
    ref = train_bpe(tmp_path / "tok", [])
    with pytest.warns(UserWarning, match="adding '<\\|endoftext\\|>'"):
        t = build_tokenizer(str(tmp_path / "tok"))
    assert t.eod_id == ref.get_vocab_size() and t.vocab_size == t.eod_id + 1


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(XparConfigError, match=r"data\.tokenizer=.*no tokenizer\.json"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(XparConfigError, match=r"data\.tokenizer=.*could not be read"):
        build_tokenizer(str(tmp_path))


def test_build_data_with_hf_tokenizer(tmp_path):
    train_bpe(tmp_path / "tok", ["<|endoftext|>"])
    texts = {f"f{i}.txt": make_text(100 + i) for i in range(5)}
    write_txt(tmp_path / "c", texts)
    common = {
        "files": [str(tmp_path / "c")],
        "seq_len": 16,
        "val_fraction": 0.2,  # one of 5 files: whole files reach the share
        "cache_dir": str(tmp_path / "cache"),
    }
    b = build_data(DataConfig(tokenizer=str(tmp_path / "tok"), **common))
    byte = build_data(DataConfig(**common))
    assert b.stats.cache_dir != byte.stats.cache_dir  # the tokenizer is part of the cache key
    assert b.stats.vocab_size == b.tokenizer.vocab_size <= 300
    decoded = [
        b.tokenizer.decode(d)
        for split in ("train", "validation")
        for d in split_docs(read_stream(b, split), b.tokenizer.eod_id)
    ]
    assert sorted(decoded) == sorted(texts.values())
    assert b.stats.train.tokens < byte.stats.train.tokens
    x, y = b.train.next_batch()
    assert int(x.max()) < b.tokenizer.vocab_size

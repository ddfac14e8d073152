"""The one secret rule: keys and values, for the printed, logged and saved config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from xpar.config.schema import XparConfig
from xpar.config.store import to_plain_dict
from xpar.redact import (
    REDACTED,
    SECRET_VALUE_PATTERNS,
    is_secret_key,
    looks_like_secret,
    redact,
    redact_yaml_files,
    to_plain,
)

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_HF_TOKEN = "hf_" + "Ab3" * 12

# What each of the two former value rules caught. The monitor's rule (a W&B key with an
# optional host label, a Hugging Face token) was always inside the config schema's rule as
# well, so no value was caught by the monitor's alone.
ONLY_OLD_SCHEMA_RULE = ["ghp_" + "x1" * 10, "sk-" + "a" * 20, "Ab1" * 12, "wandb_" + "Q" * 16]
OLD_MONITOR_RULE = [f"local-{FAKE_WANDB_KEY}", f"x {FAKE_WANDB_KEY} y", FAKE_HF_TOKEN]
OLD_MONITOR_PATTERNS = SECRET_VALUE_PATTERNS[3:]


def test_redact():
    cfg = {
        "WANDB_API_KEY": "abc",
        "apiKey": "abc",
        "hfToken": "abc",
        "client_secret": {"nested": 1},
        "tokenizer": "byte",
        "keep_checkpoints": 2,
        "max_tokens": 5,
        "token_key": "",  # empty: nothing to hide, left as is
        "list": [f"x {FAKE_WANDB_KEY} y", f"local-{FAKE_WANDB_KEY}", "a" * 39],
    }
    out = redact(cfg)
    assert out["WANDB_API_KEY"] == out["apiKey"] == out["hfToken"] == REDACTED
    assert out["client_secret"] == REDACTED
    assert out["tokenizer"] == "byte" and out["keep_checkpoints"] == 2 and out["max_tokens"] == 5
    assert out["token_key"] == ""
    # a string holding a key goes whole (the monitor used to cut out only the key)
    assert out["list"] == [REDACTED, REDACTED, "a" * 39]
    assert cfg["apiKey"] == "abc"  # a copy: the caller's config is untouched


def test_secret_keys_are_matched_word_by_word():
    for key in ("hf_token", "apiKey", "WANDB_API_KEY", "db.password", "auth", "my-credentials"):
        assert is_secret_key(key), key
    for key in ("tokenizer", "max_tokens", "keep_checkpoints", "monkey", "author", 3, None):
        assert not is_secret_key(key), key


@pytest.mark.parametrize("value", ONLY_OLD_SCHEMA_RULE + OLD_MONITOR_RULE)
def test_values_either_old_rule_caught_are_redacted(value):
    assert looks_like_secret(value)
    assert redact({"notes": value, "list": [value]}) == {"notes": REDACTED, "list": [REDACTED]}
    cfg = XparConfig()
    cfg.train.out_dir = value
    for node in (cfg, OmegaConf.structured(cfg)):
        assert to_plain_dict(node)["train"]["out_dir"] == REDACTED


@pytest.mark.parametrize(
    "value",
    [
        "api_key=SECRET123",
        "run api_key=SECRET123 b",
        "token: abc",
        "password = hunter2",
        "--api-key abc",
        "--hf-token=abc",
        "https://example.com/x?access_token=abc&b=1",
        "+parallel.deepspeed.comet.api_key=abc",  # an override as Hydra records it
    ],
)
def test_a_secret_key_given_a_value_in_a_string_is_a_secret(value):
    assert looks_like_secret(value)
    assert redact({"run_name": value, "list": [value]}) == {
        "run_name": REDACTED,
        "list": [REDACTED],
    }
    cfg = XparConfig()
    cfg.logger.run_name = value  # validation refuses it; to_plain_dict redacts it anyway
    for node in (cfg, OmegaConf.structured(cfg)):
        assert to_plain_dict(node)["logger"]["run_name"] == REDACTED


def test_yaml_files_are_redacted_in_place(tmp_path):
    (tmp_path / "overrides.yaml").write_text("- experiment=tiny\n- logger.run_name='api_key=S3'\n")
    (tmp_path / "config.yaml").write_text("a:\n  token: abc\n  out: x/${a.b}\n  b: 1\n")
    clean = "train:\n  steps: 5\n"
    (tmp_path / "hydra.yaml").write_text(clean)
    (tmp_path / "notes.txt").write_text("token: abc\n")  # not yaml: left alone
    assert redact_yaml_files(tmp_path) == ["config.yaml", "overrides.yaml"]
    assert OmegaConf.load(tmp_path / "overrides.yaml") == ["experiment=tiny", REDACTED]
    conf = OmegaConf.load(tmp_path / "config.yaml")
    assert conf.a.token == REDACTED and conf.a.out == "x/1"  # interpolations kept
    assert (tmp_path / "hydra.yaml").read_text() == clean
    assert (tmp_path / "notes.txt").read_text() == "token: abc\n"
    assert redact_yaml_files(None) == redact_yaml_files(tmp_path / "none") == []


def test_which_old_rule_caught_what():
    for value in ONLY_OLD_SCHEMA_RULE:
        assert not any(p.search(value) for p in OLD_MONITOR_PATTERNS), value
    for value in OLD_MONITOR_RULE:
        assert any(p.search(value) for p in OLD_MONITOR_PATTERNS), value


@pytest.mark.parametrize(
    "value",
    [
        "quality_moe",
        "my-team",
        "openwebtext_2024_shard_00001_of_00128.jsonl",
        "run-3f2a9c1d7e",
        "outputs/main",
        # key=value whose key is not a secret by the words rule, or with nothing to hide
        "tokenizer=byte",
        "data.tokenizer=/models/tok",
        "max_tokens=5",
        "--tokenizer byte",
        "monkey: 3",
        "token=",
        "--api-key",
        "https://example.com/a:b",
        "a" * 39,
        "",
        7,
        None,
    ],
)
def test_ordinary_values_stay(value):
    assert not looks_like_secret(value)
    assert redact({"v": value}) == {"v": value}


def test_to_plain_dict_is_redact_of_to_plain():
    cfg = XparConfig()
    cfg.parallel.deepspeed = {"comms_logger": {"auth_token": "abc", "enabled": True}}
    d = to_plain_dict(cfg)
    assert d == redact(to_plain(cfg)) == to_plain_dict(OmegaConf.structured(cfg))
    assert d["parallel"]["deepspeed"]["comms_logger"] == {"auth_token": REDACTED, "enabled": True}
    assert d["model"] == dataclasses.asdict(cfg.model)


def test_to_plain():
    @dataclasses.dataclass
    class Node:
        path: Path = Path("a/b")
        shape: tuple = (1, 2)
        other: object = dataclasses.field(default_factory=lambda: 1j)

    assert to_plain(Node()) == {"path": "a/b", "shape": [1, 2], "other": "1j"}
    assert to_plain(OmegaConf.create({"a": {"b": [1, "${c}"]}, "c": 2})) == {
        "a": {"b": [1, 2]},
        "c": 2,
    }
    assert to_plain({1: None}) == {"1": None}

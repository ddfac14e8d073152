"""DataConfig: defaults, OmegaConf round trip, and errors that name the field."""

import pytest
from omegaconf import OmegaConf

from xpar.data import DataConfig
from xpar.errors import XparConfigError


def test_defaults_match_interface():
    c = DataConfig()
    assert c.files == [] and c.text_field == "text" and c.tokenizer == "byte"
    # The main job's data: conf/data/stdlib.yaml carries no values of its own.
    assert (c.seq_len, c.val_fraction, c.max_files, c.seed) == (128, 0.05, 100, 1234)
    assert c.shuffle is True and c.cache_dir == "" and c.skip_bad_files is False


def test_omegaconf_structured_round_trip():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, {"files": ["a/*.jsonl", "b.txt"], "seq_len": 64})
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DataConfig)
    assert obj.files == ["a/*.jsonl", "b.txt"] and obj.seq_len == 64
    with pytest.raises(XparConfigError, match=r"data\.seq_len=0"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"seq_len": 0}))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 1.5}, "seq_len"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_files": -1}, "max_files"),
        ({"files": "x.txt"}, "files"),
        ({"files": [""]}, "files"),
        ({"text_field": ""}, "text_field"),
        ({"tokenizer": ""}, "tokenizer"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"skip_bad_files": 1}, "skip_bad_files"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(XparConfigError, match=rf"data\.{field}="):
        DataConfig(**kwargs)

"""Two trained checkpoints shared by the generate and eval tests (trained once per session)."""

import pytest

from tests.infer.infer_helpers import train_checkpoint


@pytest.fixture(scope="session")
def infer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("infer_data_cache")


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory, infer_cache):
    """A dense decoder with plain multi-head attention."""
    return train_checkpoint(tmp_path_factory.mktemp("dense"), infer_cache, "moe.every=0")


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory, infer_cache):
    """The tiny top-2 MoE decoder (capacity 1.25, so training drops tokens) with grouped-query
    attention: 4 query heads sharing 2 key/value heads."""
    return train_checkpoint(
        tmp_path_factory.mktemp("moe"), infer_cache, "model.n_heads=4", "model.n_kv_heads=2"
    )

"""TrainLoader / ValLoader: rank sharding, epoch order, resumable position."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xpar.data import TrainLoader, ValLoader
from xpar.errors import XparConfigError


def fake_blocks(n: int, seq_len: int = 5) -> np.ndarray:
    # Block i holds i*100 + position, so each row tells which block it came from.
    return (np.arange(n)[:, None] * 100 + np.arange(seq_len + 1)[None, :]).astype(np.uint16)


def block_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 100).tolist()


def loaders(blocks, world_size, b, seed=7, shuffle=True):
    return [
        TrainLoader(
            blocks, rank=r, world_size=world_size, micro_batch_size=b, seed=seed, shuffle=shuffle
        )
        for r in range(world_size)
    ]


def test_batch_shape_dtype_and_shift():
    (ld,) = loaders(fake_blocks(10), 1, 3)
    x, y = ld.next_batch()
    assert x.shape == y.shape == (3, 5) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1] - x[:, 0], torch.full((3,), 5))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 23),
    world=st.integers(1, 4),
    b=st.integers(1, 3),
    steps=st.integers(1, 12),
    shuffle=st.booleans(),
)
def test_single_rank_with_b_times_w_is_concat_of_ranks(n, world, b, steps, shuffle):
    blocks = fake_blocks(n)
    ranks = loaders(blocks, world, b, shuffle=shuffle)
    (single,) = loaders(blocks, 1, b * world, shuffle=shuffle)
    for _ in range(steps):
        xs, ys = zip(*(ld.next_batch() for ld in ranks), strict=True)
        x1, y1 = single.next_batch()
        assert torch.equal(torch.cat(xs), x1) and torch.equal(torch.cat(ys), y1)
    assert single.state_dict() == ranks[0].state_dict() == ranks[-1].state_dict()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 17),
    world=st.integers(1, 3),
    b=st.integers(1, 3),
    before=st.integers(0, 15),
    after=st.integers(1, 8),
)
def test_resume_yields_the_uninterrupted_batches(n, world, b, before, after):
    blocks = fake_blocks(n)
    for rank in range(world):
        run = loaders(blocks, world, b)[rank]
        for _ in range(before):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))
        expected = [run.next_batch() for _ in range(after)]
        resumed = loaders(blocks, world, b)[rank]
        resumed.load_state_dict(state)
        got = [resumed.next_batch() for _ in range(after)]
        for (x, y), (xe, ye) in zip(got, expected, strict=True):
            assert torch.equal(x, xe) and torch.equal(y, ye)


def test_resume_under_a_different_world_size():
    # The position counts blocks, not steps: 2 ranks x B=2 resumed as 1 rank x B=4.
    blocks = fake_blocks(13)
    two = loaders(blocks, 2, 2)
    for _ in range(5):
        for ld in two:
            ld.next_batch()
    (one,) = loaders(blocks, 1, 4)
    one.load_state_dict(two[0].state_dict())
    x1, _ = one.next_batch()
    assert torch.equal(x1, torch.cat([ld.next_batch()[0] for ld in two]))


def test_epochs_visit_every_block_once_in_fresh_orders():
    n, b = 12, 3
    (ld,) = loaders(fake_blocks(n), 1, b, seed=3)
    epochs = []
    for _ in range(3):
        seen = [i for _ in range(n // b) for i in block_ids(ld.next_batch()[0])]
        assert sorted(seen) == list(range(n))
        epochs.append(seen)
    assert ld.state_dict()["epoch"] == 3 and ld.state_dict()["index"] == 0
    assert epochs[0] != epochs[1] != epochs[2]
    (other_seed,) = loaders(fake_blocks(n), 1, b, seed=4)
    assert (
        block_ids(other_seed.next_batch()[0]) + block_ids(other_seed.next_batch()[0])
        != (epochs[0][: 2 * b])
    )


def test_no_shuffle_is_stored_order_with_wraparound():
    (ld,) = loaders(fake_blocks(5), 1, 2, shuffle=False)
    got = [i for _ in range(4) for i in block_ids(ld.next_batch()[0])]
    assert got == [0, 1, 2, 3, 4, 0, 1, 2]
    assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["index"] == 3
    assert ld.epoch_progress == pytest.approx(1.6)


def test_val_batches_fixed_and_sharded_like_train():
    blocks = fake_blocks(7)
    world, b, n = 3, 2, 4
    ranks = [ValLoader(blocks, rank=r, world_size=world, micro_batch_size=b) for r in range(world)]
    single = ValLoader(blocks, rank=0, world_size=1, micro_batch_size=b * world)
    per_rank = [ld.batches(n) for ld in ranks]
    for step, (x1, y1) in enumerate(single.batches(n)):
        assert torch.equal(torch.cat([per_rank[r][step][0] for r in range(world)]), x1)
        assert torch.equal(torch.cat([per_rank[r][step][1] for r in range(world)]), y1)
    assert block_ids(single.batches(2)[1][0]) == [6, 0, 1, 2, 3, 4]  # wraps around
    again = ranks[1].batches(n)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(again, per_rank[1], strict=True))
    assert single.full_epoch_batches() == 2


def test_bad_micro_batch_names_the_field():
    with pytest.raises(XparConfigError, match=r"train\.micro_batch_size=0"):
        TrainLoader(fake_blocks(3), rank=0, world_size=1, micro_batch_size=0, seed=0)
    with pytest.raises(ValueError):
        ValLoader(fake_blocks(3), rank=2, world_size=2, micro_batch_size=1)

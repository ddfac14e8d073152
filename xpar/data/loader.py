"""Rank sharding and a resumable position over packed blocks.

Train: the blocks form one endless stream. Epoch e visits every block once, in a
permutation seeded by (seed, e) (identity when shuffle=False). Each step takes the next
B * world_size blocks of the stream (a step may span an epoch boundary) and rank r keeps
rows [r*B, (r+1)*B). So a world_size=1 loader with micro batch B*W yields exactly the
concatenation of the W ranks' batches, whatever W is.

The position (epoch, index of the next block in that epoch's order) is the whole state:
it is JSON-able and does not depend on world size or batch size.

Validation: blocks in stored order; batch g is blocks [g*G, (g+1)*G) (mod the count) with
G = B * world_size, sharded across ranks the same way. Always the same list.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from xpar.errors import XparConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


def check_shard(rank: int, world_size: int, micro_batch_size: int) -> None:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise XparConfigError(
            f"train.micro_batch_size={micro_batch_size!r} is invalid: use an integer >= 1"
        )
    if micro_batch_size < 1:
        raise XparConfigError(
            f"train.micro_batch_size={micro_batch_size!r} is invalid: use an integer >= 1"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")


def _to_batch(rows: np.ndarray) -> Batch:
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainLoader:
    """Endless training batches (inputs, targets), each a [B, seq_len] LongTensor, for one rank."""

    def __init__(
        self,
        blocks: np.ndarray,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        check_shard(rank, world_size, micro_batch_size)
        if len(blocks) == 0:
            raise ValueError("TrainLoader needs at least one block")
        self.blocks = blocks
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1] - 1

    @property
    def global_batch_blocks(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def epoch_progress(self) -> float:
        """Epochs done so far as a float (for logging)."""
        return self.epoch + self.index / self.num_blocks

    def order(self, epoch: int) -> np.ndarray:
        """Block ids in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            if self.shuffle:
                # Seeding with [seed, epoch] gives distinct streams; seed + epoch would collide.
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.num_blocks)
            else:
                self._order = np.arange(self.num_blocks)
            self._order_epoch = epoch
        return self._order

    def _take(self, n: int) -> np.ndarray:
        """The next n block ids of the stream; advances the position."""
        out = []
        while n > 0:
            k = min(n, self.num_blocks - self.index)
            out.append(self.order(self.epoch)[self.index : self.index + k])
            self.index += k
            n -= k
            if self.index == self.num_blocks:
                self.epoch += 1
                self.index = 0
        return np.concatenate(out)

    def next_batch(self) -> Batch:
        ids = self._take(self.global_batch_blocks)
        b = self.micro_batch_size
        return _to_batch(self.blocks[ids[self.rank * b : (self.rank + 1) * b]])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        n = state.get("num_blocks", self.num_blocks)
        if n != self.num_blocks:
            warnings.warn(
                f"data position was saved over {n} train blocks but the corpus now has "
                f"{self.num_blocks}; the resumed order differs from the saved run",
                stacklevel=2,
            )
        if epoch < 0 or index < 0:
            raise ValueError(f"bad data position {state!r}")
        self.epoch = epoch + index // self.num_blocks
        self.index = index % self.num_blocks


class ValLoader:
    """A fixed list of validation batches, sharded across ranks like TrainLoader."""

    def __init__(
        self, blocks: np.ndarray, *, rank: int, world_size: int, micro_batch_size: int
    ) -> None:
        check_shard(rank, world_size, micro_batch_size)
        if len(blocks) == 0:
            raise ValueError("ValLoader needs at least one block")
        self.blocks = blocks
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def batches(self, n: int) -> list[Batch]:
        """The first n validation batches of this rank (wrapping around a small split)."""
        g = self.micro_batch_size * self.world_size
        start = self.rank * self.micro_batch_size
        out = []
        for step in range(n):
            ids = (np.arange(start, start + self.micro_batch_size) + step * g) % self.num_blocks
            out.append(_to_batch(self.blocks[ids]))
        return out

    def full_epoch_batches(self) -> int:
        """How many batches cover every validation block once."""
        g = self.micro_batch_size * self.world_size
        return -(-self.num_blocks // g)

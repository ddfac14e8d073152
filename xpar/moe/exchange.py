"""How routed rows are laid out for the expert-parallel exchange, chunk by chunk.

Two layouts, both cut along rows into `chunks` pieces so that each chunk holds, per
(destination rank, local expert), one contiguous slice of that block's rows:

- CountsExchange (moe.exchange=counts): the per-(rank, expert) counts travel first, in
  their own small exchange; then rows travel with uneven splits, no padding.
- PaddedExchange (moe.exchange=padded, capacity routing): every (rank, local expert)
  block has exactly `capacity` row slots, padding rows zero, so every split is known in
  advance; the counts travel in header rows at the front of chunk 0 (int32 bits in the
  rows' dtype). One exchange per chunk, no count exchange. Every rank of the EP group must
  route the same number of tokens (the same capacity): the header carries it, checked.

Both are pure index arithmetic (no communication), so one process can test them.
`choose_exchange` and `choose_comm_chunks` are the measured rules behind moe.exchange=auto
and moe.comm_chunks=0 (figures: xpar/bench/dispatch.py).

Legend: P EP ranks, e local experts, C capacity (row slots per (rank, expert) block),
A rows this rank sends (its kept assignments, sorted by expert), R rows a chunk delivers
to this rank's experts, H header rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.errors import XparDistributedError


def segment_index(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges [starts[i], starts[i] + lens[i]) for i in order (flattened)."""
    starts, lens = starts.reshape(-1), lens.reshape(-1)
    total = int(lens.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    first = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    return first + torch.arange(total, device=starts.device)


def chunk_part(counts: torch.Tensor, chunks: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, length) of chunk j of every block of `counts` rows: floor(c*j/n)..floor(c*(j+1)/n)."""
    lo = counts * j // chunks
    return lo, counts * (j + 1) // chunks - lo


@dataclass
class ChunkLayout:
    """One chunk on one side. Sender: the rows of rows_AD it carries (`rows`), where they sit
    in the send buffer (`slots`; None: packed in that order) and the buffer's rows per
    destination (`splits`). Receiver: the buffer's rows per source (`splits`) and, once the
    counts are known, the buffer rows the experts get, grouped by local expert (`rows`),
    with their counts (`counts_e`)."""

    splits: list[int]
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    counts_e: list[int] | None = None

    @property
    def size(self) -> int:
        return sum(self.splits)


def _expert_major_rows(base_Pe: torch.Tensor, lens_Pe: torch.Tensor) -> torch.Tensor:
    """Buffer rows of blocks (source p, expert i) starting at base_Pe, taken expert by expert."""
    return segment_index(base_Pe.t().contiguous(), lens_Pe.t().contiguous())


class CountsExchange:
    """Counts first, then rows with uneven splits. send_Pe / recv_Pe: rows this rank sends to
    (rank, local expert) / receives from (rank, own local expert); recv_Pe came from the
    count exchange."""

    kind = "counts"
    header_rows = 0

    def __init__(self, send_Pe: torch.Tensor, recv_Pe: torch.Tensor, chunks: int):
        self.send_Pe, self.recv_Pe, self.chunks = send_Pe.cpu(), recv_Pe.cpu(), chunks
        self._start_Pe = (
            torch.cumsum(self.send_Pe.reshape(-1), 0) - self.send_Pe.reshape(-1)
        ).view_as(self.send_Pe)

    def send(self, j: int) -> ChunkLayout:
        lo, n = chunk_part(self.send_Pe, self.chunks, j)
        return ChunkLayout(splits=n.sum(1).tolist(), rows=segment_index(self._start_Pe + lo, n))

    def recv_splits(self, j: int) -> list[int]:
        return chunk_part(self.recv_Pe, self.chunks, j)[1].sum(1).tolist()

    def recv(self, j: int) -> ChunkLayout:
        n = chunk_part(self.recv_Pe, self.chunks, j)[1]
        flat = n.reshape(-1)
        base = (torch.cumsum(flat, 0) - flat).view_as(n)
        return ChunkLayout(
            splits=n.sum(1).tolist(), rows=_expert_major_rows(base, n), counts_e=n.sum(0).tolist()
        )

    def padding_rows(self) -> int:
        return 0


def header_rows(num_local: int, d_model: int, elem_bytes: int) -> int:
    """Rows of the padded exchange's header: e counts and the token count as int32."""
    h = max(1, math.ceil(4 * (num_local + 1) / (d_model * elem_bytes)))
    while (h * d_model * elem_bytes) % 4:
        h += 1
    return h


class PaddedExchange:
    """Fixed capacity: every (rank, local expert) block is `capacity` slots, in every chunk
    j the slots floor(C*j/n)..floor(C*(j+1)/n) of each block; chunk 0 starts with H header
    rows per destination. send_Pe: rows this rank sends per (rank, local expert), each
    <= capacity; tokens: this rank's token count (every rank must have the same)."""

    kind = "padded"

    def __init__(
        self,
        send_Pe: torch.Tensor,
        capacity: int,
        chunks: int,
        d_model: int,
        elem_bytes: int,
        tokens: int,
    ):
        self.send_Pe, self.capacity, self.chunks = send_Pe.cpu(), capacity, chunks
        if int(self.send_Pe.max()) > capacity:
            raise XparDistributedError(
                f"moe.exchange=padded: an expert got {int(self.send_Pe.max())} rows, more than "
                f"its capacity {capacity}; this router does not bound its rows by the capacity "
                "factor: use moe.exchange=counts"
            )
        self.P, self.e = self.send_Pe.shape
        self.tokens = tokens
        self.header_rows = header_rows(self.e, d_model, elem_bytes)
        start = torch.cumsum(self.send_Pe.reshape(-1), 0) - self.send_Pe.reshape(-1)
        self._start_Pe = start.view_as(self.send_Pe)
        self.recv_Pe: torch.Tensor | None = None  # from chunk 0's header

    def _slots(self, j: int) -> tuple[int, int, int]:
        """(first slot of chunk j in each block, slots per block, header rows) of chunk j."""
        lo = self.capacity * j // self.chunks
        return lo, self.capacity * (j + 1) // self.chunks - lo, self.header_rows if j == 0 else 0

    def _block_base(self, j: int) -> torch.Tensor:
        """[P, e]: buffer row of each block's first slot in chunk j."""
        _, n, h = self._slots(j)
        p = torch.arange(self.P).unsqueeze(1)
        i = torch.arange(self.e).unsqueeze(0)
        return p * (h + self.e * n) + h + i * n

    def _real(self, counts_Pe: torch.Tensor, j: int) -> torch.Tensor:
        lo, n, _ = self._slots(j)
        return (counts_Pe - lo).clamp(0, n)

    def send(self, j: int) -> ChunkLayout:
        lo, n, h = self._slots(j)
        real = self._real(self.send_Pe, j)
        return ChunkLayout(
            splits=[h + self.e * n] * self.P,
            rows=segment_index(self._start_Pe + lo, real),
            slots=segment_index(self._block_base(j), real),
        )

    def recv_splits(self, j: int) -> list[int]:
        _, n, h = self._slots(j)
        return [h + self.e * n] * self.P

    def write_header(self, buf_0: torch.Tensor) -> None:
        """Put the counts and the token count in chunk 0's header rows (one block per rank)."""
        h, D = self.header_rows, buf_0.shape[1]
        ints = torch.zeros(self.P, h * D * buf_0.element_size() // 4, dtype=torch.int32)
        ints[:, : self.e] = self.send_Pe
        ints[:, self.e] = self.tokens
        bits = ints.to(buf_0.device).view(buf_0.dtype).view(self.P, h, D)
        buf_0.view(self.P, -1, D)[:, :h] = bits

    def read_header(self, recv_0: torch.Tensor) -> None:
        h, D = self.header_rows, recv_0.shape[1]
        ints = recv_0.view(self.P, -1, D)[:, :h].reshape(self.P, h * D).view(torch.int32).cpu()
        tokens = ints[:, self.e].tolist()
        if any(t != self.tokens for t in tokens):
            raise XparDistributedError(
                f"moe.exchange=padded needs every EP rank to route the same number of tokens; "
                f"ranks sent {tokens} (this rank {self.tokens}): use moe.exchange=counts"
            )
        self.recv_Pe = ints[:, : self.e].long()

    def recv(self, j: int) -> ChunkLayout:
        assert self.recv_Pe is not None, "read chunk 0's header first"
        real = self._real(self.recv_Pe, j)
        return ChunkLayout(
            splits=self.recv_splits(j),
            rows=_expert_major_rows(self._block_base(j), real),
            counts_e=real.sum(0).tolist(),
        )

    def padding_rows(self) -> int:
        """Padding rows this rank sends (to every rank, itself included), one call."""
        return self.P * self.e * self.capacity - int(self.send_Pe.sum())


# ------------------------------------------------------------------ measured rules


def choose_exchange(
    tokens: int,
    top_k: int,
    capacity: int | None,
    num_experts: int,
    d_model: int,
    elem_bytes: int,
    device: str,
) -> str:
    """moe.exchange=auto: padded when its padding costs less than the count exchange it
    saves, else counts. A rank pads at least E*C - K*T rows (all K*T kept), and padding
    travels four times (rows out and back, their gradients out and back) where the count
    exchange happens once (one small collective plus a host sync). Measured with
    `torchrun --nproc-per-node 2 -m xpar.bench.dispatch` (2 gloo ranks, 1 thread each, this
    2-core machine): a small all_to_all 0.16-0.20 ms at 0.9-1.2 GiB/s, so a count exchange
    costs what ~190 KiB of traffic does, and padded lost at every benchmark shape at
    cf=1.25 (0.13-1.1 MB of padding per call: 1.07-1.23x counts). CUDA: 4 MiB, an
    assumption (NVLink-class bandwidth against the host sync), not measured here."""
    if capacity is None:
        return "counts"
    pad_bytes = max(num_experts * capacity - top_k * tokens, 0) * d_model * elem_bytes
    saved = (192 if device == "cpu" else 4096) * 1024
    return "padded" if 4 * pad_bytes <= saved else "counts"


def choose_comm_chunks(rows: int, d_model: int, ep_size: int, device: str) -> int:
    """moe.comm_chunks=0: how many chunks the rows travel in. rows: the most rows one rank of
    the group sends (the same number on every rank). On gloo CPU the exchange and the
    experts share the same cores, so pipelining does not pay: with xpar/bench/dispatch.py
    (2 ranks) 2 / 4 chunks took 1.20-1.24x / 1.47-1.77x of one chunk on the three smaller
    shapes and 0.93x / 0.96x (noise level) on E=8 k=2 D=256 T=4096: 1. On CUDA (not
    measured here: one GPU) 2 chunks once a rank sends >= 8 MiB of bf16, 4 from 64 MiB."""
    if ep_size <= 1 or device == "cpu":
        return 1
    nbytes = rows * d_model * 2  # bf16
    if nbytes >= 64 * 2**20:
        return 4
    return 2 if nbytes >= 8 * 2**20 else 1

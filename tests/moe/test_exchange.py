"""moe.exchange: counts first then rows (counts), or one fixed-capacity padded buffer with
the counts in its header rows (padded).

One process simulates P ranks to check the layouts (every row reaches its expert, grouped
by local expert, in order, and comes back to its slot) for any chunk count; real gloo groups
(2 and 4 ranks) check that the padded exchange gives the counts exchange's outputs and
every gradient within 1e-6, counts its padding and header bytes exactly, refuses ranks
with different token counts, and that moe.exchange=auto switches to it once the ranks
have shown they agree. choose_exchange, the rule behind auto, is checked here.
"""

import math

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.moe import MoEConfig
from xpar.moe.exchange import (
    CountsExchange,
    PaddedExchange,
    choose_exchange,
    header_rows,
    segment_index,
)
from xpar.testing import run_distributed

# ----------------------------------------------------------------- layouts, one process


def test_segment_index():
    got = segment_index(torch.tensor([5, 0, 9]), torch.tensor([2, 0, 3]))
    assert got.tolist() == [5, 6, 9, 10, 11]
    assert segment_index(torch.tensor([3]), torch.tensor([0])).numel() == 0


def _rows(src, send_Pe):
    """rows_AD of rank src (sorted by expert): row (src, dest rank, expert, position)."""
    P, e = send_Pe.shape
    out = [[src, p, i, k] for p in range(P) for i in range(e) for k in range(int(send_Pe[p, i]))]
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def _simulate(counts_SPe, make, chunks):
    """Every rank's exchange of one call: what each rank's experts get, per chunk, and
    whether every row comes back to its own place."""
    S, P, e = counts_SPe.shape
    exs = [make(counts_SPe[s], counts_SPe[:, s], chunks) for s in range(S)]
    rows = [_rows(s, counts_SPe[s]) for s in range(S)]
    got = {d: [[] for _ in range(e)] for d in range(P)}
    back = [torch.full_like(r, -1.0) for r in rows]
    for j in range(chunks):
        sends = [ex.send(j) for ex in exs]
        bufs = []
        for s, (ex, lay) in enumerate(zip(exs, sends, strict=True)):
            buf = rows[s][lay.rows]
            if lay.slots is not None:
                buf = torch.zeros(lay.size, 4).index_copy_(0, lay.slots, buf)
            if ex.header_rows and j == 0:
                ex.write_header(buf)
            bufs.append(buf)
        returned = [torch.zeros(lay.size, 4) for lay in sends]
        for d, ex in enumerate(exs):
            # rank d receives, from every source s in order, s's segment for d
            starts = [sum(lay.splits[:d]) for lay in sends]
            parts = [bufs[s][starts[s] : starts[s] + sends[s].splits[d]] for s in range(S)]
            assert [p.shape[0] for p in parts] == ex.recv_splits(j)
            recv_buf = torch.cat(parts)
            if ex.header_rows and j == 0:
                ex.read_header(recv_buf)
            lay = ex.recv(j)
            x = recv_buf[lay.rows]
            for i, chunk in enumerate(x.split(lay.counts_e)):
                got[d][i].extend(chunk.tolist())
            # the experts return their rows unchanged, to the slots they came from
            back_buf = torch.zeros(recv_buf.shape).index_copy_(0, lay.rows, x)
            for s, piece in enumerate(back_buf.split(ex.recv_splits(j))):
                returned[s][starts[s] : starts[s] + piece.shape[0]] = piece
        for s, lay in enumerate(sends):
            ret = returned[s] if lay.slots is None else returned[s][lay.slots]
            back[s][lay.rows] = ret
    return got, rows, back


def _check_layout(counts_SPe, make, chunks):
    got, rows, back = _simulate(counts_SPe, make, chunks)
    S, P, e = counts_SPe.shape
    for d in range(P):
        for i in range(e):
            # expert i of rank d: from every source in rank order, rows of each in order
            want = [[s, d, i, k] for s in range(S) for k in range(int(counts_SPe[s, d, i]))]
            # chunks interleave sources; within one source the positions stay in order
            assert sorted(map(tuple, got[d][i])) == sorted(map(tuple, want))
            for s in range(S):
                ks = [int(r[3]) for r in got[d][i] if r[0] == s]
                assert ks == sorted(ks)
    for s in range(S):
        torch.testing.assert_close(back[s], rows[s], rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_counts_layout_delivers_every_row_and_brings_it_back(seed, chunks):
    g = torch.Generator().manual_seed(seed)
    P, e = 2 + seed % 3, 1 + seed % 3
    counts = torch.randint(0, 5, (P, P, e), generator=g)
    counts[0, :, 0] = 0  # an expert that gets no rows from rank 0
    _check_layout(counts, lambda s, r, n: CountsExchange(s, r, n), chunks)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_padded_layout_delivers_every_row_and_brings_it_back(seed, chunks):
    g = torch.Generator().manual_seed(seed)
    P, e, C = 2 + seed % 3, 1 + seed % 3, 4
    counts = torch.randint(0, C + 1, (P, P, e), generator=g)
    counts[0, :, 0] = 0
    counts[-1, -1, -1] = C  # a full block
    _check_layout(counts, lambda s, r, n: PaddedExchange(s, C, n, 4, 4, tokens=10), chunks)


@pytest.mark.parametrize(
    "dtype,d_model,e", [(torch.float32, 16, 4), (torch.bfloat16, 3, 7), (torch.float16, 2, 40)]
)
def test_header_holds_counts_beyond_the_dtypes_integers(dtype, d_model, e):
    """Counts travel as int32 bits, so bf16 rows carry counts > 256 exactly."""
    send_Pe = torch.tensor([[300 + i for i in range(e)], [70000 + i for i in range(e)]])
    ex = PaddedExchange(send_Pe, 70100, 1, d_model, dtype.itemsize, tokens=123457)
    h = ex.header_rows
    assert h == header_rows(e, d_model, dtype.itemsize)
    assert h * d_model * dtype.itemsize >= 4 * (e + 1)
    buf = torch.zeros(2 * (h + e * 70100), d_model, dtype=dtype)
    ex.write_header(buf)
    ex.read_header(buf)  # as if this rank received its own header from both ranks
    torch.testing.assert_close(ex.recv_Pe, send_Pe)


def test_header_refuses_ranks_with_other_token_counts():
    ex = PaddedExchange(torch.tensor([[1], [2]]), 4, 1, 8, 4, tokens=10)
    buf = torch.zeros(2 * (ex.header_rows + 4), 8)
    ex.write_header(buf)
    other = PaddedExchange(torch.tensor([[1], [2]]), 4, 1, 8, 4, tokens=11)
    with pytest.raises(RuntimeError, match="moe.exchange=padded.*same number of tokens"):
        other.read_header(buf)


def test_padded_refuses_more_rows_than_capacity():
    with pytest.raises(RuntimeError, match="more than its capacity 3.*moe.exchange=counts"):
        PaddedExchange(torch.tensor([[4], [0]]), 3, 1, 8, 4, tokens=10)


# ---------------------------------------------------------------------- rule, config


def test_choose_exchange():
    # dropless: no capacity, counts
    assert choose_exchange(4096, 2, None, 8, 256, 4, "cpu") == "counts"
    # little padding (cf 1.0 -> E*C == K*T): padded
    assert choose_exchange(512, 2, 128, 8, 256, 4, "cpu") == "padded"
    # cf 1.25 on the big shapes: megabytes of zeros, counts
    cap = math.ceil(1.25 * 2 * 4096 / 8)
    assert choose_exchange(4096, 2, cap, 8, 256, 4, "cpu") == "counts"
    # 48 KiB of padding (travelling 4 times) still beats one count exchange on CPU; 64 KiB not
    assert choose_exchange(512, 2, 134, 8, 256, 4, "cpu") == "padded"  # 48 rows * 1 KiB
    assert choose_exchange(512, 2, 136, 8, 256, 4, "cpu") == "counts"  # 64 rows
    assert choose_exchange(512, 2, 136, 8, 256, 4, "cuda") == "padded"


def test_padded_exchange_refuses_dropless_at_config_time():
    with pytest.raises(XparConfigError, match=r"moe.exchange='padded'.*capacity_factor"):
        MoEConfig(exchange="padded", capacity_factor=None)
    MoEConfig(exchange="padded", capacity_factor=1.0)


# ------------------------------------------------------------------ real gloo groups

PADDED_CASES = ["capacity_k2_swiglu", "expert_choice_shared", "soft_capacity"]


def _padded_vs_counts(rank, world, cases, chunk_counts):
    from test_comm_chunks import CASES, max_diffs, run_layer

    cases_kw = {**CASES, "soft_capacity": {**CASES["soft"], "capacity_factor": 1.0}}
    out = {}
    for name in cases:
        kw, seq = cases_kw[name], cases_kw[name].get("router") == "soft"
        base = run_layer({**kw, "comm_chunks": 1, "exchange": "counts"}, rank, "equal", seq)
        e, D = kw["num_experts"] // world, 16
        t0 = base[3]
        assert t0.pad_bytes_sent == 0 and t0.count_bytes_sent == (world - 1) * (e + 2) * 8
        for n in chunk_counts:
            got = run_layer({**kw, "comm_chunks": n, "exchange": "padded"}, rank, "equal", seq)
            t = got[3]
            assert (t.rows_sent, t.bytes_sent) == (t0.rows_sent, t0.bytes_sent), name
            if seq:  # soft: exactly B * slots_per_expert (2 * 1) slots per expert, no padding
                cap = 2
            else:
                cap = math.ceil(kw["capacity_factor"] * kw["top_k"] * 16 / kw["num_experts"])
            slots = (world - 1) * e * cap
            assert t.pad_bytes_sent == (slots - t.rows_sent) * D * 4, name
            assert t.count_bytes_sent == (world - 1) * header_rows(e, D, 4) * D * 4, name
            out[(name, n)] = max_diffs(base, got)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_padded_exchange_equals_counts_exchange(world):
    from test_comm_chunks import check

    check(run_distributed(_padded_vs_counts, world, PADDED_CASES, (1, 2, 3)), tol=1e-6)


def test_padded_exchange_equals_counts_exchange_two_ranks_one_case():
    from test_comm_chunks import check

    check(run_distributed(_padded_vs_counts, 2, ["capacity_k2_swiglu"], (2,)), tol=1e-6)


def _auto(rank, world, equal):
    from xpar.moe import MoELayer

    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=1.0))
    T = 12 if equal else 12 + rank
    seen = []
    for _ in range(3):
        layer(torch.randn(T, 16))
        t = layer.dispatcher.traffic
        seen.append((t.pad_bytes_sent, t.count_bytes_sent))
    return seen


@pytest.mark.slow
def test_auto_switches_to_padded_once_the_ranks_agree_on_tokens():
    counts_bytes = 1 * (2 + 2) * 8  # [e + 2] int64 to the other rank
    header = header_rows(2, 16, 4) * 16 * 4
    for seen in run_distributed(_auto, 2, True):
        # call 1: count exchange (learns that both ranks route 12 tokens); then padded
        assert seen[0] == (0, counts_bytes)
        assert seen[1][1] == counts_bytes + header and seen[2][1] == counts_bytes + 2 * header
    for seen in run_distributed(_auto, 2, False):
        assert seen[2] == (0, 3 * counts_bytes)  # different token counts: always counts


def _uneven_padded(rank, world):
    from xpar.moe import MoELayer

    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, d_ff=8, exchange="padded"))
    layer(torch.randn(12 + 8 * rank, 16))


@pytest.mark.slow
def test_padded_exchange_with_different_token_counts_fails():
    """The header check names the token counts (seen on gloo); a backend may fail first on
    the mismatched buffer sizes, or hang until its timeout: any of these, never garbage."""
    with pytest.raises((RuntimeError, TimeoutError)):
        run_distributed(_uneven_padded, 2, timeout=60, pg_timeout=20)

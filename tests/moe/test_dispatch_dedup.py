"""Deduplicated expert-parallel dispatch (moe.dedup_dispatch): a token travels once per
destination rank, is fanned out to that rank's experts there, and one weighted sum per
(token, rank) comes back.

The index helpers are checked against naive loops; the layer on real gloo groups (2 and 4
ranks) against one process holding every expert: outputs, the aux loss, input gradients,
expert, router and shared-expert gradients, within 1e-5, for token choice (dropless and
with capacity, DeepSeek-style group limits), expert choice (a token can reach several
experts of one rank), soft_mix (every token to every expert) and Soft MoE, with uneven,
empty and one-expert batches. Every rank also counts what the dispatcher must have sent
from its own plan: one row per (token, other rank), and an index and a weight per
assignment on another rank.
"""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.dispatch import (
    AllToAllDispatcher,
    DedupAllToAllDispatcher,
    LocalDispatcher,
    expert_major,
    make_dispatcher,
    received_row,
    unique_rows,
)
from xpar.testing import run_distributed

D, L, E, V = 16, 5, 8, 64

# ------------------------------------------------------------------- index helpers


@pytest.mark.parametrize("seed", range(6))
def test_unique_rows_match_a_naive_set_of_token_rank_pairs(seed):
    g = torch.Generator().manual_seed(seed)
    T, P = 3 + 4 * seed, 1 + seed % 4
    A = int(torch.randint(0, 3 * T, (), generator=g))
    dest_A = torch.randint(0, P, (A,), generator=g).sort().values  # grouped by rank
    token_A = torch.randint(0, T, (A,), generator=g)
    token_U, rows_P, row_A = unique_rows(token_A, dest_A, T, P)
    pairs = sorted({(int(r), int(t)) for r, t in zip(dest_A, token_A, strict=True)})
    assert token_U.tolist() == [t for _, t in pairs]
    assert rows_P.tolist() == [sum(1 for r, _ in pairs if r == p) for p in range(P)]
    for a in range(A):
        mine = [t for r, t in pairs if r == int(dest_A[a])]
        assert int(row_A[a]) == mine.index(int(token_A[a]))


def test_unique_rows_of_nothing():
    empty = torch.zeros(0, dtype=torch.long)
    token_U, rows_P, row_A = unique_rows(empty, empty, 0, 3)
    assert token_U.numel() == 0 and row_A.numel() == 0 and rows_P.tolist() == [0, 0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_received_row_and_expert_major_match_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    P, e = 2 + seed % 3, 1 + seed % 3
    counts_Pe = torch.randint(0, 4, (P, e), generator=g)
    rows_P = torch.randint(1, 5, (P,), generator=g)
    # Assignments arrive source by source, expert by expert, each naming a row of its source.
    src, exp, row = [], [], []
    for p in range(P):
        for i in range(e):
            for _ in range(int(counts_Pe[p, i])):
                src.append(p)
                exp.append(i)
                row.append(int(torch.randint(0, int(rows_P[p]), (), generator=g)))
    fan_R = received_row(torch.tensor(row, dtype=torch.int32), counts_Pe, rows_P)
    assert fan_R.tolist() == [r + int(rows_P[:s].sum()) for s, r in zip(src, row, strict=True)]
    perm_R = expert_major(counts_Pe)
    want = sorted(range(len(src)), key=lambda n: (exp[n], src[n], n))
    if e == 1:
        assert perm_R is None and want == list(range(len(src)))
    else:
        assert perm_R.tolist() == want


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [1, "true", None])
def test_dedup_dispatch_must_be_a_bool(bad):
    with pytest.raises(XparConfigError, match=r"moe\.dedup_dispatch=.* is invalid"):
        MoEConfig(dedup_dispatch=bad)


def test_one_process_has_nothing_to_deduplicate():
    assert not MoEConfig().dedup_dispatch
    assert isinstance(make_dispatcher(E, "local", dedup=True), LocalDispatcher)
    layer = MoELayer(D, MoEConfig(num_experts=E, d_ff=8, dedup_dispatch=True), ep_group="local")
    assert isinstance(layer.dispatcher, LocalDispatcher)


def test_deepseek_config_turns_dedup_on():
    from xpar.config.store import compose_config

    cfg = compose_config(["moe=deepseek"], world_size=4, cuda_available=False)
    assert cfg.moe.dedup_dispatch is True
    assert compose_config([], world_size=4, cuda_available=False).moe.dedup_dispatch is False


# ------------------------------------------------------------------ EP parity

DEEPSEEK = {"score_func": "sigmoid", "n_groups": 4, "topk_groups": 2, "route_scale": 1.5}
CASES = {
    "dropless_k2": dict(top_k=2, capacity_factor=None),
    "dropless_k4_swiglu": dict(top_k=4, capacity_factor=None, activation="swiglu"),
    "capacity_k2_probs": dict(top_k=2, capacity_factor=0.75),
    "capacity_k1_position": dict(top_k=1, capacity_factor=1.0, drop_policy="position"),
    "deepseek_shared": dict(
        top_k=3, capacity_factor=None, router_options=DEEPSEEK, shared_expert_d_ff=12
    ),
    "deepseek_one_group": dict(
        top_k=2, capacity_factor=None, router_options={**DEEPSEEK, "topk_groups": 1}
    ),
    "expert_choice": dict(router="expert_choice", top_k=1, capacity_factor=2.0),
    "soft_mix": dict(router="soft_mix", top_k=1, capacity_factor=None),
    "soft": dict(
        router="soft", top_k=1, capacity_factor=None, router_options={"slots_per_expert": 2}
    ),
}
PEAKED = ("dropless_k2", "capacity_k1_position", "capacity_k2_probs")  # one_expert mode


def _batch(rank, mode):
    g = torch.Generator().manual_seed(100 + rank)
    B = 0 if mode == "empty_all" or (mode == "empty_rank1" and rank == 1) else 1 + rank
    x = torch.randn(B, L, D, generator=g)
    if mode == "one_expert":
        x[..., 0] = 10.0
    return x, torch.randn(B, L, D, generator=g)


def _layers(kw, mode):
    cfg = MoEConfig(num_experts=E, d_ff=24, aux_loss_weight=0.1, **kw)
    layers = []
    for group, dedup in (("local", False), (None, True)):
        torch.manual_seed(7)
        layer = MoELayer(D, MoEConfig(**{**vars(cfg), "dedup_dispatch": dedup}), ep_group=group)
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.normal_(0, 0.5, generator=g)
            if mode == "one_expert":  # every token's first choice is the last expert
                layer.router.weight.zero_()
                layer.router.weight[E - 1, 0] = 5.0
        layers.append(layer)
    return layers


def _expected_traffic(ep, x, rank, world):
    """(rows, meta bytes) the dispatcher must have sent off-rank, from this rank's plan."""
    seq_len = x.shape[1]
    x_TD = x.detach().reshape(-1, D)
    plan = ep.router(x_TD, ep.cfg.capacity_factor_for(True), None, seq_len=seq_len)
    dest_A = plan.expert_idx_A // (E // world)
    off_A = dest_A != rank
    pairs = {(int(t), int(r)) for t, r in zip(plan.token_idx_A[off_A], dest_A[off_A], strict=True)}
    return len(pairs), int(off_A.sum()) * (4 + 4)


def _grad_errors(ep, ref, rank):
    import torch.distributed as dist

    errs = {}
    n = ep.experts.num_local
    for pname in ("w1", "w2", "w3"):
        got = getattr(ep.experts, pname)
        if got is not None:
            want = getattr(ref.experts, pname).grad[rank * n : (rank + 1) * n]
            errs[pname] = (got.grad - want).abs().max().item()
    mine, theirs = [ep.router], [ref.router]
    if ep.shared_expert is not None:
        mine, theirs = [*mine, ep.shared_expert], [*theirs, ref.shared_expert]
    for m, r in zip(mine, theirs, strict=True):
        for (pname, p), p_ref in zip(m.named_parameters(), r.parameters(), strict=True):
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)  # replicated parameters: the ranks' gradients add up
            errs[pname] = (g - p_ref.grad).abs().max().item()
    return errs


def _run_case(rank, world, kw, mode):
    ref, ep = _layers(kw, mode)
    assert isinstance(ep.dispatcher, DedupAllToAllDispatcher) and ep.ep_size == world
    x, cot = _batch(rank, mode)
    x.requires_grad_(True)
    y, aux = ep(x)
    ((y * cot).sum() + aux.loss).backward()
    errs, counts = {}, torch.zeros(E)
    for r in range(world):
        xr, cr = _batch(r, mode)
        xr.requires_grad_(True)
        yr, auxr = ref(xr)
        ((yr * cr).sum() + auxr.loss).backward()
        counts += auxr.tokens_per_expert
        if r == rank and x.numel():
            errs["y"] = (y - yr).abs().max().item()
            errs["x_grad"] = (x.grad - xr.grad).abs().max().item()
            errs["aux"] = (aux.loss - auxr.loss).abs().item()
    errs["tokens_per_expert"] = (aux.tokens_per_expert - counts).abs().max().item()
    errs.update(_grad_errors(ep, ref, rank))
    traffic = ep.dispatcher.traffic
    sent = (traffic.rows_sent, traffic.bytes_sent, traffic.meta_bytes_sent, traffic.calls)
    rows, meta = _expected_traffic(ep, x, rank, world) if x.numel() else (0, 0)
    return errs, sent, (rows, rows * D * 4, meta, 1)


def _parity(rank, world, cases, mode):
    return {name: _run_case(rank, world, CASES[name], mode) for name in cases}


def _check(results):
    for rank, per_case in enumerate(results):
        for case, (errs, sent, want) in per_case.items():
            assert len(errs) >= 4, f"rank {rank} {case}: {errs}"
            for what, err in errs.items():
                assert err <= 1e-5, f"rank {rank} {case}: {what} differs by {err:.3g}"
            assert sent == want, f"rank {rank} {case}: traffic {sent}, expected {want}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_dedup_dispatch_under_expert_parallel_equals_one_process(world):
    _check(run_distributed(_parity, world, list(CASES), "uneven", timeout=300))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["empty_rank1", "empty_all", "one_expert"])
def test_dedup_dispatch_degenerate_batches(mode):
    cases = list(PEAKED) if mode == "one_expert" else list(CASES)
    _check(run_distributed(_parity, 2, cases, mode, timeout=300))


def _dedup_vs_per_assignment(rank, world):
    """The same layer with dedup off and on: same numbers, fewer rows (top-4 of 8 experts
    on 2 ranks sends every token to one rank at least twice)."""
    out = []
    x = torch.randn(2 + rank, L, D, generator=torch.Generator().manual_seed(rank))
    for dedup in (False, True):
        torch.manual_seed(7)
        cfg = MoEConfig(num_experts=E, top_k=4, d_ff=24, capacity_factor=None)
        layer = MoELayer(D, MoEConfig(**{**vars(cfg), "dedup_dispatch": dedup}))
        y, _ = layer(x)
        kind = type(layer.dispatcher).__name__
        out.append((y.detach().tolist(), layer.dispatcher.traffic.rows_sent, kind))
    return out


@pytest.mark.slow
def test_dedup_gives_the_same_output_with_fewer_rows():
    for (y0, rows0, cls0), (y1, rows1, cls1) in run_distributed(_dedup_vs_per_assignment, 2):
        assert (cls0, cls1) == (AllToAllDispatcher.__name__, DedupAllToAllDispatcher.__name__)
        torch.testing.assert_close(torch.tensor(y1), torch.tensor(y0), atol=1e-6, rtol=1e-5)
        assert 0 < rows1 < rows0

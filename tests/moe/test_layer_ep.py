"""The MoE layer's expert-parallel dispatch on real gloo groups (2 and 4 ranks) vs one process.

Every rank also builds a one-process reference holding all experts and runs it
on every rank's tokens, so the comparison needs no gathering of results.
"""

import pytest
import torch

from xpar.moe import MoEConfig, MoELayer
from xpar.testing import run_distributed

D = 16
CASES = {
    "dropless_k2": dict(num_experts=8, top_k=2, capacity_factor=None),
    "capacity_k2_probs": dict(num_experts=8, top_k=2, capacity_factor=0.75),
    "capacity_k1_position": dict(
        num_experts=8, top_k=1, capacity_factor=1.0, drop_policy="position"
    ),
    "expert_choice_swiglu": dict(
        num_experts=8, router="expert_choice", top_k=1, capacity_factor=1.25, activation="swiglu"
    ),
    "shared_expert": dict(num_experts=8, top_k=2, capacity_factor=None, shared_expert_d_ff=12),
    "one_local_expert": dict(num_experts=4, top_k=2, capacity_factor=None),
    # moe.dedup_dispatch: a token once per rank (several of its experts share a rank).
    "dedup_dropless_k4": dict(num_experts=8, top_k=4, capacity_factor=None, dedup_dispatch=True),
    "dedup_one_local_expert": dict(
        num_experts=4, top_k=2, capacity_factor=0.75, dedup_dispatch=True
    ),  # one expert per rank on 4 ranks: no two rows of a token share a rank
    "dedup_expert_choice": dict(
        num_experts=8,
        router="expert_choice",
        top_k=1,
        capacity_factor=2.0,
        dedup_dispatch=True,
    ),
}


def tokens_for(rank, world, mode):
    if mode == "empty_all":
        return 0
    if mode == "empty_rank1" and rank == 1:
        return 0
    if mode in ("equal", "one_expert_equal"):
        return 16  # the padded exchange needs every rank to route the same token count
    return 13 + 7 * rank  # uneven token counts per rank


def make_input(rank, world, mode):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens_for(rank, world, mode), D, generator=g)
    if mode.startswith("one_expert"):
        x[:, 0] = 10.0
    return x


def make_layers(cfg_kw, ep_group, mode):
    cfg = MoEConfig(d_ff=24, **cfg_kw)
    layers = []
    for group in ("local", ep_group):
        torch.manual_seed(7)
        layer = MoELayer(D, cfg, ep_group=group)
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
            if mode.startswith("one_expert"):
                layer.router.weight.zero_()
                layer.router.weight[cfg.num_experts - 1, 0] = 5.0
        layers.append(layer)
    return layers


def _ep_parity(rank, world, cases, mode, overrides=None):
    """overrides: MoEConfig fields set on every case (moe.comm_chunks, moe.exchange)."""
    import torch.distributed as dist

    out = {}
    for name in cases:
        ref, ep = make_layers({**CASES[name], **(overrides or {})}, None, mode)
        e = ep.experts.num_local
        assert ep.ep_size == world
        # EP layer holds exactly its slice of the reference's experts.
        torch.testing.assert_close(ep.experts.w1, ref.experts.w1[rank * e : (rank + 1) * e])

        x = make_input(rank, world, mode).requires_grad_(True)
        cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + rank))
        y, aux = ep(x)
        ((y * cot).sum() + aux.loss).backward()
        router_grad = ep.router.weight.grad.clone()
        dist.all_reduce(router_grad)

        # Reference: every rank's tokens through one process holding all experts.
        errs = {}
        counts = torch.zeros(ep.cfg.num_experts)
        for r in range(world):
            xr = make_input(r, world, mode).requires_grad_(True)
            cr = torch.randn(xr.shape, generator=torch.Generator().manual_seed(200 + r))
            yr, auxr = ref(xr)
            ((yr * cr).sum() + auxr.loss).backward()
            counts += auxr.tokens_per_expert
            if r == rank:
                errs["y"] = (y - yr).abs().max().item() if y.numel() else 0.0
                errs["x_grad"] = (x.grad - xr.grad).abs().max().item() if x.numel() else 0.0
                errs["aux"] = (aux.loss - auxr.loss).abs().item()
        sl = slice(rank * e, (rank + 1) * e)
        for pname in ("w1", "w2", "w3"):
            p = getattr(ep.experts, pname)
            if p is not None:
                errs[pname] = (p.grad - getattr(ref.experts, pname).grad[sl]).abs().max().item()
        errs["router"] = (router_grad - ref.router.weight.grad).abs().max().item()
        if ep.shared_expert is not None:
            g = ep.shared_expert.w1.weight.grad.clone()
            dist.all_reduce(g)
            errs["shared"] = (g - ref.shared_expert.w1.weight.grad).abs().max().item()
        errs["tokens_per_expert"] = (aux.tokens_per_expert - counts).abs().max().item()
        out[name] = errs
    return out


def check(results, tol=1e-5):
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            for what, err in errs.items():
                assert err <= tol, f"rank {rank} case {case}: {what} differs by {err:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_one_process(world):
    cases = [c for c in CASES if world == 2 or c != "one_local_expert"]
    if world == 4:
        cases.append("one_local_expert")  # 4 experts over 4 ranks: one expert each
        cases = list(dict.fromkeys(cases))
    check(run_distributed(_ep_parity, world, cases, "normal"))


NOT_DEDUP = [c for c in CASES if not CASES[c].get("dedup_dispatch")]
CAPACITY = [c for c in NOT_DEDUP if CASES[c].get("capacity_factor") is not None]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_expert_parallel_in_chunks_matches_one_process(world, chunks):
    """moe.comm_chunks=n, counts exchange: uneven token counts per rank (chunk parts of
    different sizes, some empty)."""
    over = {"comm_chunks": chunks, "exchange": "counts"}
    check(run_distributed(_ep_parity, world, NOT_DEDUP, "normal", over))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("chunks", [1, 3])
def test_padded_exchange_matches_one_process(world, chunks):
    over = {"comm_chunks": chunks, "exchange": "padded"}
    check(run_distributed(_ep_parity, world, CAPACITY, "equal", over))


@pytest.mark.parametrize("mode", ["one_expert", "empty_rank1", "empty_all"])
def test_expert_parallel_degenerate_batches(mode):
    cases = (
        ["dropless_k2", "capacity_k2_probs"] if mode != "one_expert" else ["capacity_k1_position"]
    )
    check(run_distributed(_ep_parity, 2, cases, mode))


def _disagree(rank, world):
    cfg = MoEConfig(num_experts=8 if rank == 0 else 4, top_k=1, d_ff=8)
    layer = MoELayer(D, cfg)
    layer(torch.randn(5, D))


def test_ranks_that_disagree_fail_clearly():
    with pytest.raises(RuntimeError, match="disagree about the MoE layer"):
        run_distributed(_disagree, 2, timeout=60)


def _indivisible(rank, world):
    MoELayer(D, MoEConfig(num_experts=6, top_k=1, d_ff=8))


def test_experts_not_divisible_by_ep_size():
    with pytest.raises(RuntimeError, match=r"moe.num_experts=6 is not divisible.*4"):
        run_distributed(_indivisible, 4, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("exchange,chunks", [("padded", 2), ("counts", 3)])
def test_chunks_and_padding_when_one_expert_gets_every_row(exchange, chunks):
    """Every other expert has zero rows (in every chunk); one block is over capacity and
    drops, equal token counts per rank."""
    over = {"comm_chunks": chunks, "exchange": exchange}
    check(run_distributed(_ep_parity, 2, CAPACITY, "one_expert_equal", over))

"""Expert-parallel traffic under group-limited routing, and EP parity of the soft routers and
DeepSeek-style top-k, on real gloo ranks.

Traffic: 4 ranks, EP=4, n_groups=4, so the groups are the ranks; every rank routes the same
tokens with topk_groups 4, 2 and 1 and counts what it sends to other ranks. Two figures per
rank:
- `dispatcher`: layer.dispatcher.traffic.bytes_sent of the default dispatcher, one row per
  (token, expert) assignment on another rank;
- `per rank`: one row per (token, other rank) pair, computed from the plan: what the
  deduplicated dispatcher (moe.dedup_dispatch, DeepSeek-V3's node-limited dispatch: a token
  is sent once to each rank and fanned out there) sends.
Group limits bound the ranks a token reaches, so only the second figure falls with
topk_groups. The dedup tests then run the dedup dispatcher itself (E=16, 4 experts per rank,
so top-4 can use one group) and check that the bytes it counts are exactly the second
figure, fall as topk_groups falls and, at topk_groups=1, stay within tokens * D * 4.
"""

import pytest
import torch

from xpar.moe import MoEConfig, MoELayer
from xpar.testing import run_distributed

pytestmark = pytest.mark.slow

D, L, E, RANKS = 16, 8, 8, 4


def _traffic_layer(top_k, topk_groups, ep_group=None, dedup=False, num_experts=E, chunks=0):
    cfg = MoEConfig(
        comm_chunks=chunks,
        num_experts=num_experts,
        top_k=top_k,
        d_ff=16,
        capacity_factor=None,
        router_options={"n_groups": RANKS, "topk_groups": topk_groups},
        dedup_dispatch=dedup,
    )
    torch.manual_seed(7)
    layer = MoELayer(D, cfg, ep_group=ep_group)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
    return layer


def _traffic(rank, world, top_k, limits):
    """{topk_groups: (dispatcher bytes, per-rank bytes, max other ranks per token, tokens)}"""
    out = {}
    x = torch.randn(3 + rank, L, D, generator=torch.Generator().manual_seed(100 + rank))
    T = x.shape[0] * L
    for tg in limits:
        layer = _traffic_layer(top_k, tg)
        assert layer.dispatcher.traffic.bytes_sent == 0
        layer(x)
        plan = layer.router(x.reshape(T, D), None)
        dest_A = plan.expert_idx_A // (E // world)  # the rank holding each row's expert
        off_A = dest_A != rank
        pairs = {
            (int(t), int(r)) for t, r in zip(plan.token_idx_A[off_A], dest_A[off_A], strict=True)
        }
        per_token = [sum(1 for t2, _ in pairs if t2 == t) for t in range(T)]
        # The dispatcher counts every row it sends off-rank, 4 bytes per fp32 value.
        assert layer.dispatcher.traffic.bytes_sent == int(off_A.sum()) * D * 4
        assert layer.dispatcher.traffic.rows_sent == int(off_A.sum())
        # Beside the rows: the count exchange, [e + 2] int64 per other rank; no padding.
        assert layer.dispatcher.traffic.count_bytes_sent == (world - 1) * (E // world + 2) * 8
        assert layer.dispatcher.traffic.pad_bytes_sent == 0
        # The same rows in 3 pipelined chunks: the same counters.
        chunked = _traffic_layer(top_k, tg, chunks=3)
        chunked(x)
        assert chunked.dispatcher.traffic == layer.dispatcher.traffic
        out[tg] = (layer.dispatcher.traffic.bytes_sent, len(pairs) * D * 4, max(per_token), T)
    return out


def _print_table(top_k, results):
    print(f"\nbytes sent to other ranks, EP={RANKS}, E={E}, top_k={top_k}, D={D}, fp32")
    print("rank  tokens  topk_groups  dispatcher  per rank  max other ranks/token")
    for rank, per_tg in enumerate(results):
        for tg, (disp, dedup, most, T) in per_tg.items():
            print(f"{rank:>4}  {T:>6}  {tg:>11}  {disp:>10}  {dedup:>8}  {most:>21}")
    for tg in results[0]:
        disp = sum(r[tg][0] for r in results)
        dedup = sum(r[tg][1] for r in results)
        print(f" all  {sum(r[tg][3] for r in results):>6}  {tg:>11}  {disp:>10}  {dedup:>8}")


def test_group_limited_routing_bounds_the_ranks_each_token_reaches():
    results = run_distributed(_traffic, RANKS, 2, (4, 2, 1), timeout=300)
    _print_table(2, results)
    for rank, per_tg in enumerate(results):
        T = per_tg[1][3]
        # topk_groups=1: a token's two rows go to one rank, so at most one other rank ...
        assert per_tg[1][2] <= 1, f"rank {rank}"
        assert per_tg[1][1] <= T * D * 4
        # ... while with 2 or 4 groups some tokens reach two other ranks.
        assert per_tg[4][2] == 2 and per_tg[2][2] == 2, f"rank {rank}"
        # Per (token, rank) the traffic falls with the group limit.
        assert per_tg[1][1] < per_tg[2][1] and per_tg[1][1] < per_tg[4][1], f"rank {rank}"
    total = {tg: sum(r[tg][1] for r in results) for tg in (1, 2, 4)}
    assert total[1] < total[2] and total[1] < total[4]


def test_with_top_4_the_traffic_falls_with_the_group_limit():
    """top_k=4 (topk_groups >= 2 then: a group holds 2 experts) can reach every rank, so
    topk_groups 4 and 2 are distinct bounds: at most 3 and 2 other ranks per token."""
    results = run_distributed(_traffic, RANKS, 4, (4, 2), timeout=300)
    _print_table(4, results)
    for rank, per_tg in enumerate(results):
        assert per_tg[2][2] == 2 and per_tg[4][2] == 3, f"rank {rank}"
        assert per_tg[2][1] < per_tg[4][1], f"rank {rank}"
        assert per_tg[2][1] <= per_tg[2][3] * 2 * D * 4


def _dedup_traffic(rank, world, top_k, limits, num_experts):
    """{topk_groups: (bytes off, bytes on, meta bytes on, tokens)}: the same tokens through
    the default dispatcher and the dedup one."""
    x = torch.randn(3 + rank, L, D, generator=torch.Generator().manual_seed(100 + rank))
    T = x.shape[0] * L
    out = {}
    for tg in limits:
        sent = []
        for dedup in (False, True):
            layer = _traffic_layer(top_k, tg, dedup=dedup, num_experts=num_experts)
            y, _ = layer(x)
            sent.append((y.detach(), layer.dispatcher.traffic))
        (y_off, off), (y_on, on) = sent
        torch.testing.assert_close(y_on, y_off, atol=1e-6, rtol=1e-5)
        plan = layer.router(x.reshape(T, D), None)
        dest_A = plan.expert_idx_A // (num_experts // world)
        off_A = dest_A != rank
        pairs = {
            (int(t), int(r)) for t, r in zip(plan.token_idx_A[off_A], dest_A[off_A], strict=True)
        }
        # Dedup: one fp32 row per (token, other rank); an int32 index and an fp32 weight per
        # assignment on another rank. Default: one row per such assignment.
        assert (on.rows_sent, on.bytes_sent) == (len(pairs), len(pairs) * D * 4)
        assert on.meta_bytes_sent == int(off_A.sum()) * 8
        e = num_experts // world
        assert on.count_bytes_sent == (world - 1) * (e + 1) * 8 and on.pad_bytes_sent == 0
        assert off.bytes_sent == int(off_A.sum()) * D * 4 and off.meta_bytes_sent == 0
        out[tg] = (off.bytes_sent, on.bytes_sent, on.meta_bytes_sent, T)
    return out


def _print_dedup_table(top_k, num_experts, results):
    print(
        f"\nbytes sent to other ranks, EP={RANKS}, E={num_experts}, top_k={top_k}, D={D}, fp32: "
        "rows with dedup_dispatch off and on, and the index + weight bytes beside them (on)"
    )
    print("rank  tokens  topk_groups  dedup off  dedup on  on/off  meta (on)")
    rows = [(str(rank), per_tg) for rank, per_tg in enumerate(results)]
    total = {tg: tuple(sum(r[tg][i] for r in results) for i in range(4)) for tg in results[0]}
    for name, per_tg in [*rows, ("all", total)]:
        for tg, (off, on, meta, T) in per_tg.items():
            ratio = on / off if off else 0.0
            print(f"{name:>4}  {T:>6}  {tg:>11}  {off:>9}  {on:>8}  {ratio:>6.2f}  {meta:>9}")


def test_dedup_dispatch_traffic_falls_with_the_group_limit_at_top_4():
    results = run_distributed(_dedup_traffic, RANKS, 4, (4, 2, 1), 16, timeout=300)
    _print_dedup_table(4, 16, results)
    for rank, per_tg in enumerate(results):
        on = {tg: v[1] for tg, v in per_tg.items()}
        assert on[1] < on[2] < on[4], f"rank {rank}: {on}"
        # One group: every token's 4 experts on one rank, so at most one row per token.
        assert on[1] <= per_tg[1][3] * D * 4, f"rank {rank}"
        assert all(v[1] < v[0] for v in per_tg.values()), f"rank {rank}"


def test_dedup_dispatch_traffic_at_top_2():
    results = run_distributed(_dedup_traffic, RANKS, 2, (4, 1), E, timeout=300)
    _print_dedup_table(2, E, results)
    for rank, per_tg in enumerate(results):
        assert per_tg[1][1] < per_tg[4][1], f"rank {rank}"
        assert per_tg[1][1] <= per_tg[1][3] * D * 4, f"rank {rank}"


# ----------------------------------------------------------------------- EP parity

DEEPSEEK = {
    "score_func": "sigmoid",
    "n_groups": 4,
    "topk_groups": 2,
    "balance_loss": "sequence",
    "route_scale": 1.5,
    "bias_update_rate": 0.01,
}
PARITY = {
    "soft": dict(router="soft", top_k=1, router_options={"slots_per_expert": 2}),
    "soft_one_slot_swiglu": dict(router="soft", top_k=1, activation="swiglu"),
    "soft_mix": dict(router="soft_mix", top_k=1, shared_expert_d_ff=12),
    "topk_deepseek": dict(top_k=3, router_options=DEEPSEEK, shared_expert_d_ff=12),
    "topk_deepseek_capacity": dict(top_k=2, capacity_factor=0.75, router_options=DEEPSEEK),
}


def _parity_layers(kw, ep_group):
    cfg = MoEConfig(
        num_experts=E, d_ff=24, **{"capacity_factor": None, "aux_loss_weight": 0.1, **kw}
    )
    layers = []
    for group in ("local", ep_group):
        torch.manual_seed(7)
        layer = MoELayer(D, cfg, ep_group=group)
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.normal_(0, 0.5, generator=g)
            if hasattr(layer.router, "expert_bias_E"):
                layer.router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, E))
        layers.append(layer)
    return layers


def _batch(rank, empty_rank):
    g = torch.Generator().manual_seed(100 + rank)
    B = 0 if rank == empty_rank else 1 + rank  # uneven; one rank may have no sequences
    return torch.randn(B, 5, D, generator=g), torch.randn(B, 5, D, generator=g)


def _errors(ep, x, y, aux, ref, rank, world, empty_rank):
    import torch.distributed as dist

    errs = {}
    for r in range(world):
        xr, cr = _batch(r, empty_rank)
        xr.requires_grad_(True)
        yr, auxr = ref(xr)
        ((yr * cr).sum() + auxr.loss).backward()
        if r == rank and x.numel():
            errs["y"] = (y - yr).abs().max().item()
            errs["x_grad"] = (x.grad - xr.grad).abs().max().item()
            errs["aux"] = (aux.loss - auxr.loss).abs().item()
    n = ep.experts.num_local
    for pname in ("w1", "w2", "w3"):
        got = getattr(ep.experts, pname)
        if got is not None:
            want = getattr(ref.experts, pname).grad[rank * n : (rank + 1) * n]
            errs[pname] = (got.grad - want).abs().max().item()
    replicated = list(ep.router.named_parameters())
    if ep.shared_expert is not None:
        replicated += [(f"shared.{k}", v) for k, v in ep.shared_expert.named_parameters()]
    ref_params = list(ref.router.parameters())
    if ref.shared_expert is not None:
        ref_params += list(ref.shared_expert.parameters())
    for (pname, p), p_ref in zip(replicated, ref_params, strict=True):
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)  # replicated parameters: the ranks' gradients add up
        errs[pname] = (g - p_ref.grad).abs().max().item()
    return errs


def _parity(rank, world, cases, empty_rank):
    out = {}
    for name in cases:
        ref, ep = _parity_layers(PARITY[name], None)
        assert ep.ep_size == world
        x, cot = _batch(rank, empty_rank)
        x.requires_grad_(True)
        y, aux = ep(x)
        ((y * cot).sum() + aux.loss).backward()
        out[name] = _errors(ep, x, y, aux, ref, rank, world, empty_rank)
    return out


@pytest.mark.parametrize("world,empty_rank", [(4, -1), (2, -1), (2, 1)])
def test_soft_routers_and_deepseek_topk_under_expert_parallel_equal_one_process(world, empty_rank):
    from test_layer_ep import check

    results = run_distributed(_parity, world, list(PARITY), empty_rank, timeout=300)
    check(results, tol=1e-5)
    assert all(len(errs) >= 3 for per_case in results for errs in per_case.values())

"""Every registered router under expert parallelism (real gloo groups, 2 and 4 ranks) equals
one process holding every expert: outputs, input gradients, expert and router gradients.

The table below must name every registered router, so a new router cannot skip this test.
Every rank also builds the one-process layer and runs it on every rank's tokens, so nothing
is gathered. Inputs are [B, L, D] with token ids, so per-sequence and by-id routers see what
the model gives them.
"""

import pytest
import torch

from xpar.moe import MoEConfig, MoELayer
from xpar.moe.routers import router_names
from xpar.testing import run_distributed

pytestmark = pytest.mark.slow

D, L, V = 16, 5, 64
CONFIGS = {
    "topk": dict(top_k=2, capacity_factor=None),
    "expert_choice": dict(top_k=1, capacity_factor=1.25),
    "hash": dict(top_k=2, capacity_factor=None, router_options={"hash_kind": "random"}),
    "base": dict(top_k=1, capacity_factor=None),
    "soft": dict(top_k=1, capacity_factor=None, router_options={"slots_per_expert": 2}),
    "soft_mix": dict(top_k=1, capacity_factor=None),
}
# Options of a router that change its arithmetic get their own rows.
VARIANTS = {
    "topk_capacity": ("topk", dict(top_k=2, capacity_factor=0.75)),
    "topk_bias": (
        "topk",
        dict(top_k=2, capacity_factor=None, router_options={"bias_update_rate": 0.01}),
    ),
    "hash_balanced": (
        "hash",
        dict(top_k=1, capacity_factor=None, router_options={"hash_kind": "balanced"}),
    ),
}


def _cases():
    cases = {name: (name, kw) for name, kw in CONFIGS.items() if name in router_names()}
    cases.update({k: v for k, v in VARIANTS.items() if v[0] in router_names()})
    return cases


def test_the_table_names_every_registered_router():
    missing = set(router_names()) - set(CONFIGS)
    assert not missing, f"add {sorted(missing)} to CONFIGS: every router needs an EP parity row"


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    B = 2 + rank  # uneven token counts per rank
    x = torch.randn(B, L, D, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    return x, ids, torch.randn(B, L, D, generator=g)


def _layers(router, kw, ep_group):
    cfg = MoEConfig(num_experts=8, d_ff=24, router=router, **kw)
    layers = []
    counts_V = torch.arange(V, 0, -1).square()  # a skewed corpus for balanced tables
    for group in ("local", ep_group):
        torch.manual_seed(7)
        layer = MoELayer(D, cfg, ep_group=group, vocab_size=V)
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.normal_(0, 0.5, generator=g)
            if hasattr(layer.router, "expert_bias_E"):  # a bias that changes the choice
                layer.router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, 8))
        if layer.router.needs_token_counts:
            layer.router.fit_to_data(counts_V)
        layers.append(layer)
    return layers


def _run_case(rank, world, router, kw):
    import torch.distributed as dist

    ref, ep = _layers(router, kw, None)
    x, ids, cot = _inputs(rank)
    x.requires_grad_(True)
    y, aux = ep(x, ids)
    ((y * cot).sum() + aux.loss).backward()
    errs = {}
    for r in range(world):
        xr, idr, cr = _inputs(r)
        xr.requires_grad_(True)
        yr, auxr = ref(xr, idr)
        ((yr * cr).sum() + auxr.loss).backward()
        if r == rank:
            errs["y"] = (y - yr).abs().max().item()
            errs["x_grad"] = (x.grad - xr.grad).abs().max().item()
            errs["aux"] = (aux.loss - auxr.loss).abs().item()
    e = ep.experts.num_local
    sl = slice(rank * e, (rank + 1) * e)
    for pname in ("w1", "w2"):
        got, want = getattr(ep.experts, pname).grad, getattr(ref.experts, pname).grad[sl]
        errs[pname] = (got - want).abs().max().item()
    for (pname, p), p_ref in zip(
        ep.router.named_parameters(), ref.router.parameters(), strict=True
    ):
        g = p.grad.clone()
        dist.all_reduce(g)
        errs[f"router.{pname}"] = (g - p_ref.grad).abs().max().item()
    return errs


def _ep_parity(rank, world, cases):
    return {name: _run_case(rank, world, *cases[name]) for name in cases}


@pytest.mark.parametrize("world", [2, 4])
def test_every_router_under_expert_parallel_equals_one_process(world):
    cases = _cases()
    for rank, per_case in enumerate(run_distributed(_ep_parity, world, cases, timeout=300)):
        for case, errs in per_case.items():
            for what, err in errs.items():
                assert err <= 1e-5, f"rank {rank} {case}: {what} differs by {err:.3g}"


def _bias_after_updates(rank, world):
    import torch.distributed as dist

    _, ep = _layers("topk", VARIANTS["topk_bias"][1], None)
    for step in range(3):
        x, ids, _ = _inputs(rank + 10 * step)
        _, aux = ep(x, ids)
        # What the trainer does: the EP group's sum is in the report already (no expert-DP
        # replicas here), so every rank passes the same load.
        ep.router.after_optimizer_step(aux.tokens_per_expert)
    bias = ep.router.expert_bias_E.clone()
    everyone = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(everyone, bias)
    return [b.tolist() for b in everyone]


def test_aux_free_bias_is_identical_on_every_rank_after_updates():
    if "topk" not in router_names():
        pytest.skip("no topk router")
    seen = run_distributed(_bias_after_updates, 2, timeout=120)[0]
    assert seen[0] == seen[1]
    start = torch.linspace(-0.3, 0.3, 8).tolist()
    assert seen[0] != start, "three updates should have moved the bias"

"""Hash layers: routing by token id alone, through a random or a frequency-balanced table.

The router equals its naive token-by-token reference alone and inside MoELayer (forward and
every gradient); its table is a fixed function of the seed (random) or of the token counts
(balanced), lives in the state dict, and the balanced one evens the expected load.
"""

import copy

import pytest
import torch

from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.routers import get_router
from xpar.moe.routers.hash import balanced_table, random_table
from xpar.testing.moe_reference import naive_moe

V, D = 50, 12


def zipf_counts(vocab: int, seed: int = 0) -> torch.Tensor:
    """Counts ~ 1/rank with the ranks shuffled over the ids (as in a real vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    counts = (1e7 / torch.arange(1, vocab + 1, dtype=torch.float64)).round()
    return counts[torch.randperm(vocab, generator=g)].long()


def make(E=6, K=1, kind="random", seed=0, cf=None, policy="probs", vocab=V, fit=True):
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        d_ff=10,
        router="hash",
        capacity_factor=cf,
        drop_policy=policy,
        router_options={"hash_kind": kind, "seed": seed},
    )
    r = get_router("hash")(D, cfg, vocab_size=vocab)
    if fit and r.needs_token_counts:
        r.fit_to_data(zipf_counts(vocab, seed))
    return r


def load_of(table_VK, counts_V, E):
    K = table_VK.shape[1]
    flat = counts_V.double().repeat_interleave(K)
    return torch.zeros(E, dtype=torch.float64).index_add_(0, table_VK.reshape(-1), flat)


CASES = [
    (K, kind, cf, policy)
    for K in (1, 2)
    for kind in ("random", "balanced")
    for cf, policy in ((None, "probs"), (0.5, "probs"), (0.75, "position"))
]


@pytest.mark.parametrize("K,kind,cf,policy", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_plan_equals_naive_route(K, kind, cf, policy, seed):
    r = make(K=K, kind=kind, seed=seed, cf=cf, policy=policy)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(40, D, generator=g)
    ids = torch.randint(0, V, (40,), generator=g)
    plan = r(x, cf, ids)
    kept, lb = r.naive_route(x, cf, ids)
    got = sorted(zip(plan.token_idx_A.tolist(), plan.expert_idx_A.tolist(), strict=True))
    assert got == sorted((t, e) for t, e, _ in kept)
    assert torch.allclose(plan.weight_A, torch.full_like(plan.weight_A, 1.0 / K))
    # Every choice is the table's, before drops too.
    table = r.table_VK
    assert all(e in table[ids[t]].tolist() for t, e in got)
    want_load = torch.bincount(table[ids].reshape(-1), minlength=6).float()
    assert torch.equal(plan.tokens_per_expert_E, want_load)
    if cf == 0.5:
        assert plan.dropped_fraction.item() > 0, "the case should exercise dropping"
    assert lb.item() == plan.lb_loss.item() == plan.z_loss.item() == 0.0


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("kind", ["random", "balanced"])
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_layer_equals_naive_moe_values_and_gradients(K, kind, cf, seed):
    cfg = MoEConfig(
        num_experts=6,
        top_k=K,
        d_ff=10,
        router="hash",
        capacity_factor=cf,
        router_options={"hash_kind": kind, "seed": seed},
    )
    torch.manual_seed(seed)
    layer = MoELayer(D, cfg, vocab_size=V)
    if layer.router.needs_token_counts:
        layer.router.fit_to_data(zipf_counts(V, seed))
    ref = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 15, D, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (2, 15), generator=g)
    cot = torch.randn(2, 15, D, generator=g)
    y, aux = layer(x, ids)
    ((y * cot).sum() + aux.loss).backward()

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref, kept = naive_moe(ref, x_ref.reshape(-1, D), cf, ids.reshape(-1))
    ((y_ref.reshape(2, 15, D) * cot).sum() + aux_ref).backward()

    torch.testing.assert_close(y, y_ref.reshape(2, 15, D), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    real, naive = dict(layer.named_parameters()), dict(ref.named_parameters())
    assert sorted(real) == sorted(naive) and not any(n.startswith("router.") for n in real)
    for name, p in real.items():
        torch.testing.assert_close(p.grad, naive[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    assert aux.dropped_fraction.item() == pytest.approx(1 - len(kept) / (30 * K))
    if cf is not None:
        assert aux.dropped_fraction.item() > 0, "the case should exercise dropping"


@pytest.mark.parametrize("kind", ["random", "balanced"])
def test_routing_depends_on_token_ids_only(kind):
    r = make(K=2, kind=kind, cf=None)
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(5))
    plans = [r(torch.randn(64, D) * s, None, ids) for s in (1.0, 100.0, 1e-3)]
    for p in plans[1:]:
        assert torch.equal(p.token_idx_A, plans[0].token_idx_A)
        assert torch.equal(p.expert_idx_A, plans[0].expert_idx_A)
    # Any other layer built with the same seed (and counts) agrees; another seed does not.
    assert torch.equal(make(K=2, kind=kind).table_VK, r.table_VK)
    assert not torch.equal(make(K=2, kind=kind, seed=1).table_VK, r.table_VK)
    # Same ids, same experts, in any batch.
    t = ids[:8]
    e = r.table_VK[t]
    again = r(torch.randn(8, D), None, t)
    assert sorted(zip(again.token_idx_A.tolist(), again.expert_idx_A.tolist(), strict=True)) == (
        sorted((i, int(x)) for i in range(8) for x in e[i])
    )


@pytest.mark.parametrize("E,K", [(4, 1), (6, 2), (8, 3), (3, 3)])
def test_tables_give_each_token_distinct_experts(E, K):
    for kind in ("random", "balanced"):
        table = make(E=E, K=K, kind=kind, vocab=500).table_VK
        assert table.shape == (500, K) and table.dtype == torch.long
        assert int(table.min()) >= 0 and int(table.max()) < E
        assert all(len(set(row)) == K for row in table.tolist())


def test_random_table_is_seeded_not_global_rng():
    torch.manual_seed(0)
    a = random_table(100, 8, 2, seed=3)
    torch.manual_seed(1)
    torch.rand(10)
    b = random_table(100, 8, 2, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_table(100, 8, 2, seed=4))
    # The table does not touch the global RNG either.
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    random_table(100, 8, 2, seed=3)
    assert torch.equal(torch.rand(3), want)


def test_balanced_fit_by_hand():
    start = torch.tensor([[1], [1], [1], [1], [1]])
    # ids by count 5, 3, 3, 1 (ties by id); id 4 never occurs and keeps its row.
    got = balanced_table(torch.tensor([5, 3, 3, 1, 0]), start, num_experts=2)
    assert got.tolist() == [[0], [1], [1], [0], [1]]
    # K = 2 of 3 experts: id0 -> 0, 1 (loads 4 4 0); id1 -> 2, then 0 (ties by id):
    # loads 6 4 2; id2 -> 2, 1.
    got = balanced_table(torch.tensor([4.0, 2.0, 1.0]), torch.zeros(3, 2).long(), 3)
    assert got.tolist() == [[0, 1], [2, 0], [2, 1]]


def _naive_balanced(counts, start, E):
    """The greedy written out: a full scan of the loads for each id."""
    rows, load = start.tolist(), [0.0] * E
    ids = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    for v in ids:
        if counts[v] == 0:
            continue
        chosen = []
        for _ in range(len(rows[v])):
            e = min((e for e in range(E) if e not in chosen), key=lambda e: (load[e], e))
            chosen.append(e)
        for e in chosen:
            load[e] += counts[v]
        rows[v] = chosen
    return rows


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("E,K", [(4, 1), (7, 2), (5, 3)])
def test_balanced_fit_equals_the_naive_greedy(seed, E, K):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (80,), generator=g)  # many ties and zeros
    start = random_table(80, E, K, seed)
    got = balanced_table(counts, start, E)
    assert got.tolist() == _naive_balanced(counts.tolist(), start, E)


@pytest.mark.parametrize("E,K", [(8, 1), (16, 2)])
def test_balanced_table_evens_the_expected_load_of_a_zipf_corpus(E, K):
    # Figures (V=32000, counts ~ 1/rank): random max/mean load 1.45 (E=8, K=1) and 1.83
    # (E=16, K=2); balanced 1.0000 for both.
    vocab = 32000
    counts = zipf_counts(vocab)
    rand = make(E=E, K=K, kind="random", vocab=vocab)
    bal = make(E=E, K=K, kind="balanced", vocab=vocab, fit=False)
    assert torch.equal(bal.table_VK, rand.table_VK), "until fitted: the random table"
    bal.fit_to_data(counts)
    ratio = {}
    for name, r in (("random", rand), ("balanced", bal)):
        load = load_of(r.table_VK, counts, E)
        ratio[name] = float(load.max() / load.mean())
    assert ratio["balanced"] < 1.001 and ratio["random"] > 1.3, ratio
    # Fitting is a pure function of the counts (and the seed, for unseen ids).
    again = make(E=E, K=K, kind="balanced", vocab=vocab, fit=False)
    again.fit_to_data(counts)
    assert torch.equal(again.table_VK, bal.table_VK)


def test_table_is_in_the_state_dict_and_restored():
    r = make(K=2, kind="balanced")
    assert list(r.state_dict()) == ["table_VK"] and list(r.parameters()) == []
    fresh = make(K=2, kind="balanced", fit=False)
    assert not torch.equal(fresh.table_VK, r.table_VK)
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(fresh.table_VK, r.table_VK)
    # ... and inside a layer's (so a checkpoint's) state dict.
    layer = MoELayer(D, r.cfg, vocab_size=V)
    assert "router.table_VK" in layer.state_dict()


def test_contract_flags_losses_and_entropy():
    for K, kind in ((1, "random"), (2, "balanced")):
        r = make(K=K, kind=kind, fit=False)
        assert r.causal and r.needs_token_counts == (kind == "balanced")
        assert type(r).num_params(D, r.cfg) == 0 and type(r).experts_per_token(r.cfg) == K
        x = torch.randn(10, D, requires_grad=True)
        plan = r(x, None, torch.arange(10))
        assert plan.entropy.item() == pytest.approx(torch.log(torch.tensor(float(K))).item())
        (plan.lb_loss + plan.z_loss).backward()  # zero, and the graph is valid
        assert torch.count_nonzero(x.grad) == 0
        r.reset_parameters(0.1)  # a no-op
    # A random table ignores token counts.
    r = make(kind="random")
    before = r.table_VK.clone()
    r.fit_to_data(zipf_counts(V))
    assert torch.equal(r.table_VK, before)


def test_the_model_routes_by_its_input_ids():
    moe = MoEConfig(
        num_experts=4, top_k=1, d_ff=8, router="hash", router_options={"hash_kind": "balanced"}
    )
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    model = MoETransformer(cfg, moe)
    tables = [m.router.table_VK for m in model.modules() if isinstance(m, MoELayer)]
    assert len(tables) == 2
    tokens = torch.randint(0, 32, (2, 8))
    _, aux = model(tokens)
    want = torch.bincount(tables[0][tokens.reshape(-1), 0], minlength=4).float()
    assert torch.equal(aux[0].tokens_per_expert, want)


def test_bad_inputs_name_what_to_pass():
    r = make()
    with pytest.raises(ValueError, match=r"token_ids_T=None is invalid.*pass the input ids"):
        r(torch.randn(4, D), None)
    with pytest.raises(ValueError, match=r"token_ids_T=None"):
        r.naive_route(torch.randn(4, D), None)
    with pytest.raises(ValueError, match=r"token_ids_T has shape \(3,\), expected \(4,\)"):
        r(torch.randn(4, D), None, torch.arange(3))
    with pytest.raises(ValueError, match=r"vocab_size=0 is invalid.*vocab_size=V"):
        make(vocab=0)
    with pytest.raises(ValueError, match=r"vocab_size=0 is invalid"):
        MoELayer(D, MoEConfig(router="hash", top_k=1))  # the layer's default vocab_size
    b = make(kind="balanced", fit=False)
    with pytest.raises(ValueError, match=r"counts_V has shape \(49,\), expected \(50,\)"):
        b.fit_to_data(torch.ones(49))
    with pytest.raises(ValueError, match=r"counts_V must be finite counts >= 0"):
        b.fit_to_data(-torch.ones(V))


@pytest.mark.parametrize(
    "opts,msg",
    [
        (
            {"hash_kind": "bogus"},
            r"moe\.router_options\.hash_kind='bogus' is invalid: choose one of random, balanced",
        ),
        ({"seed": -1}, r"moe\.router_options\.seed=-1 is invalid: use an integer"),
        ({"seed": 1.5}, r"moe\.router_options\.seed=1\.5 is invalid"),
        ({"kind": "random"}, r"moe\.router_options\.kind is not an option.*hash_kind, seed"),
    ],
)
def test_bad_options_are_config_errors(opts, msg):
    with pytest.raises(XparConfigError, match=msg):
        MoEConfig(router="hash", router_options=opts)


def test_hydra_composes_moe_hash():
    cfg = compose_config(["moe=hash"], world_size=2, cuda_available=False)
    assert cfg.moe.router == "hash" and cfg.moe.is_causal and cfg.model.causal
    opts = cfg.moe.options()
    assert (opts.hash_kind, opts.seed, cfg.moe.top_k) == ("balanced", 0, 1)
    cfg = compose_config(
        ["moe=hash", "moe.top_k=2", "moe.router_options.hash_kind=random"],
        world_size=1,
        cuda_available=False,
    )
    assert cfg.moe.options().hash_kind == "random" and cfg.moe.top_k == 2
    with pytest.raises(XparConfigError, match=r"hash_kind='nope'"):
        compose_config(
            ["moe=hash", "moe.router_options.hash_kind=nope"], world_size=1, cuda_available=False
        )

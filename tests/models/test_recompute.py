"""moe.recompute (none, experts, block): the same loss, gradients, router state, traffic
counters and RNG stream, in one process and on 2 gloo EP ranks; and less memory kept."""

import pytest
import torch
import torch.nn.functional as F

from xpar.bench.memory import peak_bytes
from xpar.models.config import ModelConfig
from xpar.models.transformer import MoETransformer
from xpar.moe import MoEConfig
from xpar.testing import run_distributed

MODES = ("none", "experts", "block")
MODEL = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)
# Jitter (RNG in forward), drops, aux-loss-free bias (router buffers), a shared expert.
MOE = dict(
    num_experts=4,
    top_k=2,
    d_ff=24,
    activation="swiglu",
    capacity_factor=1.0,
    jitter_eps=0.1,
    shared_expert_d_ff=8,
    router_options={"bias_update_rate": 1e-2},
)


def _step(mode: str, ep_group=None, seed: int = 0, **moe) -> dict:
    """One training step: forward, backward, SGD, the routers' after-step update."""
    torch.manual_seed(0)
    moe_cfg = MoEConfig(**{**MOE, **moe}, recompute=mode)
    model = MoETransformer(ModelConfig(**MODEL), moe_cfg, ep_group)
    moe = [b.ffn for b in model.blocks if b.is_moe]
    calls = []
    for layer in moe:
        layer.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(100 + seed)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 12))
    logits, aux = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss = loss + sum(a.loss for a in aux)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    for layer, a in zip(moe, aux, strict=True):
        layer.router.after_optimizer_step(a.tokens_per_expert)
    return {
        "loss": loss.detach(),
        "grads": grads,
        "aux": [[a.lb_loss.detach(), a.tokens_per_expert, a.dropped_fraction] for a in aux],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "traffic": [vars(layer.dispatcher.traffic).copy() for layer in moe],
        "forwards": len(calls),  # MoE layer forwards, recomputes included
        "rng": torch.rand(4),  # the stream after the step: a redo must not move it
    }


def _assert_same(got: dict, want: dict, what: str) -> None:
    for key in ("loss", "rng"):
        assert torch.equal(got[key], want[key]), (what, key)
    for key in ("grads", "buffers", "params"):
        assert got[key].keys() == want[key].keys()
        for n in want[key]:
            assert torch.equal(got[key][n], want[key][n]), (what, key, n)
    for ga, wa in zip(got["aux"], want["aux"], strict=True):
        assert all(torch.equal(g, w) for g, w in zip(ga, wa, strict=True)), (what, "aux")
    assert got["traffic"] == want["traffic"], what


def test_recompute_modes_give_bitwise_the_same_step():
    runs = {mode: _step(mode, ep_group="local") for mode in MODES}
    assert runs["none"]["buffers"], "the aux-loss-free bias should be a router buffer"
    for mode in ("experts", "block"):
        _assert_same(runs[mode], runs["none"], mode)
    # block redoes both MoE layers' forward in backward; the others run it once.
    assert [runs[m]["forwards"] for m in MODES] == [2, 2, 4]


def _ep_modes(rank: int, world_size: int, comm_chunks: int) -> dict:
    # Compared on the rank: results travel back as plain numbers only.
    runs = {m: _step(m, None, rank, comm_chunks=comm_chunks) for m in MODES}
    for mode in ("experts", "block"):
        _assert_same(runs[mode], runs["none"], f"rank {rank} {mode}")
    return {
        "traffic": runs["none"]["traffic"],
        "forwards": [runs[m]["forwards"] for m in MODES],
        "loss": runs["none"]["loss"].item(),
    }


@pytest.mark.parametrize("comm_chunks", [1, 2])
def test_recompute_modes_give_bitwise_the_same_step_on_2_ep_ranks(comm_chunks):
    for r in run_distributed(_ep_modes, 2, comm_chunks):
        assert all(t["rows_sent"] > 0 and t["calls"] == 1 for t in r["traffic"])
        # each MoE layer redone once in backward, however many chunks its rows travel in
        assert r["forwards"] == [2, 2, 4]


def test_eval_and_no_grad_forward_do_not_checkpoint():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MODEL), MoEConfig(**MOE, recompute="block"))
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 12))
    with torch.no_grad():
        logits, aux = model(tokens)
    assert len(aux) == 2 and not logits.requires_grad


# Wide experts, few layers: what backward keeps is mostly the experts' hidden activations.
MEM_MODEL = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128)
MEM_MOE = dict(num_experts=4, top_k=2, d_ff=512, activation="swiglu", capacity_factor=None)


def _peak(mode: str) -> int:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MEM_MODEL), MoEConfig(**MEM_MOE, recompute=mode))
    tokens = torch.randint(0, 64, (4, 128))

    def step():
        logits, aux = model(tokens)
        (logits.float().square().mean() + sum(a.loss for a in aux)).backward()

    step()  # first-call allocations (grads) out of the measured step
    model.zero_grad(set_to_none=False)
    return peak_bytes(step)


def test_recompute_lowers_peak_memory():
    # Measured (deterministic on CPU): none 26.6 MB, experts 20.3 MB, block 17.9 MB.
    none, experts, block = (_peak(m) for m in MODES)
    assert block < experts < none, (none, experts, block)

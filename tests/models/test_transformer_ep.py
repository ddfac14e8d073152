"""The model under expert parallelism (2 gloo ranks) against a one-process reference."""

import torch

from xpar.models.config import ModelConfig
from xpar.models.transformer import MoETransformer
from xpar.moe import MoEConfig
from xpar.testing import run_distributed

MODEL = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)
MOE = dict(num_experts=4, top_k=2, d_ff=24, every=1, capacity_factor=None, shared_expert_d_ff=8)


def _ep_vs_local(rank: int, world_size: int) -> dict:
    model_cfg, moe_cfg = ModelConfig(**MODEL), MoEConfig(**MOE)
    torch.manual_seed(0)
    sharded = MoETransformer(model_cfg, moe_cfg)  # ep_group=None: the whole world
    torch.manual_seed(0)
    local = MoETransformer(model_cfg, moe_cfg, ep_group="local")
    layer = sharded.blocks[0].ffn
    assert layer.ep_size == world_size and local.blocks[0].ffn.ep_size == 1

    # Same RNG stream: replicated params equal, expert params are this rank's slice.
    full = dict(local.named_parameters())
    lo, hi = layer.experts.first, layer.experts.first + layer.experts.num_local
    for name, p in sharded.named_parameters():
        ref = full[name][lo:hi] if getattr(p, "xpar_expert", False) else full[name]
        torch.testing.assert_close(p, ref, rtol=0, atol=0, msg=name)

    # Different tokens per rank; each rank's EP output must equal its local reference.
    torch.manual_seed(100 + rank)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 12))
    got, aux = sharded(tokens)
    want, aux_ref = local(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()  # backward through the all-to-all must run
    return {"experts": (lo, hi), "n_aux": len(aux), "loss": got.square().mean().item()}


def test_ep_sharded_model_matches_local_reference():
    results = run_distributed(_ep_vs_local, 2)
    assert [r["experts"] for r in results] == [(0, 2), (2, 4)]
    assert all(r["n_aux"] == 2 for r in results)

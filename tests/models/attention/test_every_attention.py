"""Every registered attention variant inside the whole model, at the options of its
conf/attention/<name>.yaml (max_len at this test's sequence length; SMALL where a default
would not fit L = 64):

- decoder (the causal ones) and encoder (all): the MoE model runs forward and backward,
  finite, and a non-causal-only variant in the decoder is refused at config time;
- expert parallel: on 2 gloo ranks (experts sharded) the logits and the input-embedding
  gradient equal one process's within 1e-5;
- bf16 (the model cast to bf16 on CPU) runs and stays within bf16 rounding of fp32 (median
  error 1e-2 of the logits' scale; max 5e-2 unless the variant picks keys discretely);
- resume: two optimizer steps, the model and optimizer state saved and loaded into a fresh
  model (buffers included: random features, centroids, counters), then a third step on
  each: the loss and every weight bitwise the uninterrupted run's.

Each variant's own exactness test is in test_<name>.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.attention import attention_names, get_attention
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.testing import run_distributed

L, V = 64, 48
CONF = Path(__file__).resolve().parents[3] / "conf" / "attention"
# Options for L = 64 that keep each variant sparse (its defaults would cover all 64 keys).
SMALL: dict[str, dict] = {
    "linformer": {"proj_len": 16, "max_len": L},
    "sliding_window": {"window": 16},
    "strided": {"stride": 8},
    "topk": {"k": 16, "query_chunk": 16},
    "lsh": {"n_hashes": 2, "n_buckets": 4, "chunk_len": 16},
    "linear": {"chunk": 16},
    "performer": {"n_features": 32, "chunk": 16},
    "routing": {"n_clusters": 4, "window": 8},
    "sinkhorn": {"block": 16},
}


def options(name: str) -> dict:
    if name in SMALL:
        return dict(SMALL[name])
    path = CONF / f"{name}.yaml"
    if not path.is_file():
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path)).get("attention_options") or {}
    return {k: (L if v == "${model.max_seq_len}" else v) for k, v in raw.items()}


def _cfg(name: str, causal: bool) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=48,
        max_seq_len=L,
        causal=causal,
        attention=name,
        attention_options=options(name),
    )
    return model, MoEConfig(num_experts=4, top_k=2, d_ff=16, capacity_factor=None)


def _tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, L), generator=torch.Generator().manual_seed(seed))


DISCRETE = {"lsh", "routing", "topk"}  # variants whose choice of keys is discrete
CAUSAL = [n for n in attention_names() if get_attention(n).causal_ok]
ALL = attention_names()


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("name", ALL)
def test_every_variant_trains_in_the_model(name, causal):
    if causal and name not in CAUSAL:
        with pytest.raises(XparConfigError, match="model.causal"):
            _cfg(name, causal)
        return
    torch.manual_seed(0)
    model = MoETransformer(*_cfg(name, causal), ep_group="local").train()
    logits, aux = model(_tokens())
    assert logits.shape == (2, L, V) and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _ep_worker(rank: int, world: int, names: list[str]) -> dict:
    out = {}
    for name in names:
        model_cfg, moe_cfg = _cfg(name, name in CAUSAL)
        torch.manual_seed(0)
        sharded = MoETransformer(model_cfg, moe_cfg).train()
        torch.manual_seed(0)
        local = MoETransformer(model_cfg, moe_cfg, ep_group="local").train()
        tokens = _tokens(seed=10 + rank)
        res = []
        for m in (sharded, local):
            torch.manual_seed(3)  # the same draws for a variant's training-time randomness
            logits = m(tokens)[0]
            logits.square().mean().backward()
            res.append((logits.detach().numpy(), m.tok_emb.weight.grad.numpy().copy()))
        out[name] = res
    return out


def test_every_variant_under_expert_parallel_equals_one_process():
    for per_rank in run_distributed(_ep_worker, 2, ALL, timeout=600):
        for name, ((got, got_g), (want, want_g)) in per_rank.items():
            torch.testing.assert_close(
                torch.from_numpy(got), torch.from_numpy(want), atol=1e-5, rtol=1e-5, msg=name
            )
            # the embedding gradient sums over ranks' tokens only through the all-to-all
            torch.testing.assert_close(
                torch.from_numpy(got_g), torch.from_numpy(want_g), atol=1e-5, rtol=1e-5, msg=name
            )


@pytest.mark.parametrize("name", ALL)
def test_every_variant_runs_in_bf16(name):
    causal = name in CAUSAL
    torch.manual_seed(0)
    model = MoETransformer(*_cfg(name, causal), ep_group="local").eval()
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)[0]
        got = copy.deepcopy(model).to(torch.bfloat16)(tokens)[0]
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    scale = max(want.abs().max().item(), 1.0)
    diff = (got.float() - want).abs()
    # The median, not the max: where a variant picks keys discretely (hash buckets, clusters,
    # top-k) bf16 rounding may flip a pick for a few positions, which is not an error.
    assert diff.median().item() <= 1e-2 * scale, name
    if name not in DISCRETE:
        assert diff.max().item() <= 5e-2 * scale, name


def _step(model, opt, tokens) -> float:
    torch.manual_seed(7)  # training-time randomness, the same for both runs
    logits, aux = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", ALL)
def test_every_variant_resumes_bitwise(name):
    cfgs = _cfg(name, name in CAUSAL)
    torch.manual_seed(0)
    straight = MoETransformer(*cfgs, ep_group="local").train()
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    for s in range(2):
        _step(straight, opt, _tokens(seed=s))
    saved = copy.deepcopy((straight.state_dict(), opt.state_dict()))
    want = _step(straight, opt, _tokens(seed=2))

    torch.manual_seed(123)  # another init: everything must come from the saved state
    resumed = MoETransformer(*cfgs, ep_group="local").train()
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    got = _step(resumed, opt2, _tokens(seed=2))
    assert got == want, f"{name}: {got!r} vs {want!r}"
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {k}"

"""No router the decoder accepts lets a token see the future, checked on the whole model:
changing token t+1 changes no output at positions <= t, in training mode (where routing is
batch-dependent if it ever is). The encoder (model.causal=false) does see both ways.

Token choice runs dropless here: a capacity limit decides drops over the whole micro-batch
(a later token can take an earlier token's place), which is a documented batch effect of
capacity, not of the router.
"""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.moe.routers import get_router, router_names

V, L = 64, 10
# Options that change a causal router's arithmetic get their own rows.
OPTIONS = {
    "topk": [{}, {"bias_update_rate": 0.01}],
    "hash": [{"hash_kind": "random"}, {"hash_kind": "balanced"}],
}


def _model(router, options, causal=True):
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=4,
        top_k=2 if router in ("topk", "hash") else 1,
        d_ff=16,
        router=router,
        capacity_factor=None if router != "expert_choice" else 1.0,
        router_options=options,
    )
    cfg = ModelConfig(
        vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=L, causal=causal
    )
    model = MoETransformer(cfg, moe)
    for m in model.modules():
        if hasattr(m, "needs_token_counts") and m.needs_token_counts:
            m.fit_to_data(torch.arange(V, 0, -1).float())
    return model.train()


def _causal_cases():
    for name in router_names():
        if get_router(name).causal:
            for options in OPTIONS.get(name, [{}]):
                yield name, options


@pytest.mark.parametrize("router,options", list(_causal_cases()))
def test_changing_a_later_token_changes_no_earlier_output(router, options):
    model = _model(router, options)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, L), generator=g)
    base, _ = model(tokens)
    for t in range(L - 1):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + t) % V
        out, _ = model(changed)
        leak = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
        assert leak == 0.0, f"{router} {options}: position <= {t} moved by {leak:.3g}"
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 0, "the change should matter"


@pytest.mark.parametrize("router", [n for n in router_names() if not get_router(n).causal])
def test_non_causal_routers_train_in_the_encoder_only(router):
    model = _model(router, {}, causal=False)
    tokens = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    base, _ = model(tokens)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    out, _ = model(changed)
    assert (out[:, 0] - base[:, 0]).abs().max() > 0, "the encoder should see later tokens"
    with pytest.raises(XparConfigError, match="model.causal=false"):
        _model(router, {}, causal=True)

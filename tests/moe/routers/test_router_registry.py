"""The router registry: adding a router is one module plus one config file.

A router defined here (as a contributor would in xpar/moe/routers/<name>.py) is
registered and then used by everything that asks the registry: config validation and
its options, the cost report, the MoE layer and the model's init, the naive reference,
and Hydra composition with a conf/moe/<name>.yaml beside the others.
"""

import shutil
from dataclasses import dataclass

import pytest
import torch

from xpar.config.checks import bad
from xpar.config.store import CONFIG_DIR, compose_config
from xpar.errors import XparConfigError
from xpar.models import MoETransformer, model_cost
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.plan import RouterStats, plan_from_choices
from xpar.moe.routers import ROUTERS, LinearRouter, get_router, register, router_names
from xpar.registry import Registry
from xpar.testing.moe_reference import naive_moe


@dataclass
class _Options:
    offset: int = 0

    def validate(self, prefix: str) -> None:
        if not isinstance(self.offset, int) or self.offset < 0:
            raise bad(prefix, "offset", self.offset, "use an integer >= 0")


class HashRouter(LinearRouter):
    """Token id t goes to expert (t + offset) % E with weight 1 (a hash layer, Roller 2021)."""

    name = "test_hash"
    Options = _Options

    @classmethod
    def experts_per_token(cls, cfg, seq_len=0) -> float:
        return 1.0

    def forward(self, x_TD, capacity_factor, token_ids_T=None, seq_len=0):
        E = self.cfg.num_experts
        e_TK = ((token_ids_T + self.cfg.options().offset) % E).unsqueeze(1)
        w_TK = torch.ones(e_TK.shape, dtype=torch.float32)
        zero = x_TD.sum() * 0.0
        return plan_from_choices(
            e_TK,
            w_TK,
            num_experts=E,
            capacity_factor=capacity_factor,
            drop_policy=self.cfg.drop_policy,
            stats=RouterStats(lb_loss=zero, z_loss=zero, entropy=zero.detach()),
        )

    def naive_route(self, x_TD, capacity_factor, token_ids_T=None, seq_len=0):
        E, off = self.cfg.num_experts, self.cfg.options().offset
        kept = [(t, (int(i) + off) % E, torch.tensor(1.0)) for t, i in enumerate(token_ids_T)]
        return kept, x_TD.sum() * 0.0


@pytest.fixture
def hash_router():
    register(HashRouter)
    yield HashRouter
    ROUTERS._classes.pop(HashRouter.name)


def test_builtin_routers_are_registered():
    assert {"topk", "expert_choice"} <= set(router_names())
    assert get_router("topk").causal and not get_router("expert_choice").causal


def test_a_new_router_is_one_module_and_one_config_file(hash_router, tmp_path):
    cfg = MoEConfig(num_experts=4, top_k=1, d_ff=8, router="test_hash", capacity_factor=None)
    assert cfg.is_causal and cfg.options().offset == 0
    with pytest.raises(XparConfigError, match=r"moe\.router_options\.offset=-1 is invalid"):
        MoEConfig(router="test_hash", router_options={"offset": -1})
    with pytest.raises(XparConfigError, match=r"moe\.router_options\.ofset is not an option"):
        MoEConfig(router="test_hash", router_options={"ofset": 1})

    # The layer routes by the token ids the model passes, and equals the naive reference.
    layer = MoELayer(6, MoEConfig(**{**vars(cfg), "router_options": {"offset": 1}}))
    x, ids = torch.randn(10, 6), torch.arange(10)
    y, _ = layer(x, ids)
    y_ref, _, kept = naive_moe(layer, x, None, ids)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    assert {(t, e) for t, e in kept} == {(t, (t + 1) % 4) for t in range(10)}

    # The model builds it, inits it through the router's own reset_parameters, and the
    # cost report counts one expert per token.
    model_cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    model = MoETransformer(model_cfg, cfg, ep_group="local")
    logits, aux = model(torch.randint(0, 32, (2, 8)))
    assert logits.shape == (2, 8, 32) and len(aux) == 2
    assert model_cost(model_cfg, cfg, seq_len=8).experts_per_token == 1.0

    # Hydra: conf/moe/test_hash.yaml next to the shipped ones composes with moe=test_hash.
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "moe" / "test_hash.yaml").write_text(
        "defaults:\n  - schema\n  - _self_\n\nrouter: test_hash\ntop_k: 1\n"
        "router_options:\n  offset: 3\n"
    )
    xcfg = compose_config(
        ["moe=test_hash", "moe.router_options.offset=2"], conf, world_size=2, cuda_available=False
    )
    assert xcfg.moe.router == "test_hash" and xcfg.moe.options().offset == 2


def test_routers_without_options_refuse_any(tmp_path):
    with pytest.raises(XparConfigError, match=r"moe\.router_options\.x is not an option.*none"):
        MoEConfig(router="expert_choice", router_options={"x": 1})


def test_registry_imports_every_module_of_its_package(tmp_path):
    pkg = tmp_path / "xpar_test_variants"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text(
        "from xpar_test_variants import REG\n\n@REG.register\nclass One:\n    name = 'one'\n"
    )
    import sys

    reg = Registry("thing")
    sys.path.insert(0, str(tmp_path))
    try:
        import xpar_test_variants

        xpar_test_variants.REG = reg
        reg.load("xpar_test_variants", [str(pkg)])
    finally:
        sys.path.remove(str(tmp_path))
    assert reg.names() == ("one",)
    with pytest.raises(ValueError, match="two things are registered as 'one'"):
        reg.register(type("Other", (), {"name": "one"}))

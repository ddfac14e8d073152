"""train.compile=true: the non-MoE modules run under torch.compile, trained numbers match
eager, the state_dict is unchanged, and a compiler that cannot run is one line naming
train.compile (real subprocesses, real gloo ranks, real DeepSpeed engines)."""

import pytest

from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.testing import run_distributed
from xpar.testing.processes import run_python
from xpar.train.model_setup import compile_targets

BASE = [
    "experiment=tiny",
    "train.steps=4",
    "train.eval_every=100",
    "train.ckpt_every=100",
    "train.resume=never",
    "logger.wandb_mode=disabled",
]


def _tiny_model(**moe) -> MoETransformer:
    model_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                            max_seq_len=16)  # fmt: skip
    return MoETransformer(model_cfg, MoEConfig(num_experts=4, d_ff=32, every=2, **moe))


def test_targets_are_attention_dense_ffn_and_norms_never_the_moe_layer():
    from xpar.models.mlp import MLP
    from xpar.models.transformer import RMSNorm, SelfAttention

    model = _tiny_model(shared_expert_d_ff=16)
    targets = compile_targets(model)
    kinds = [type(m) for m in targets]
    # 2 blocks x (2 norms + attention) + the final norm + block 0's dense MLP
    assert kinds.count(SelfAttention) == 2 and kinds.count(RMSNorm) == 5, kinds
    assert kinds.count(MLP) == 1, "the shared expert stays eager inside its MoE layer"
    moe = model.blocks[1].ffn
    assert all(m is not moe and m not in list(moe.modules()) for m in targets)


def test_compiling_in_place_keeps_the_state_dict():
    model = _tiny_model()
    keys = list(model.state_dict())
    for m in compile_targets(model):
        m.compile()  # lazy: nothing is compiled until a forward
    assert list(model.state_dict()) == keys


def _losses(rank, world, runs):
    from xpar.config.store import compose_config
    from xpar.train.trainer import train

    return [train(compose_config(o, world_size=world)).losses for o in runs]


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tmp_path):
    eager = BASE + ["train.compile=false", f"train.out_dir={tmp_path}/eager"]
    compiled = BASE + ["train.compile=true", f"train.out_dir={tmp_path}/compiled"]
    a, b = run_distributed(_losses, 2, [eager, compiled], timeout=600)[0]
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-4, f"compiled losses differ by {worst:.3g}: {a} vs {b}"
    assert b[4] < b[1], "the compiled run should learn"


@pytest.mark.slow
def test_a_compiler_that_cannot_run_is_one_line_naming_train_compile(tmp_path):
    p = run_python(
        "-m", "xpar.train", *BASE, "train.compile=true", f"train.out_dir={tmp_path}/run",
        CXX=str(tmp_path / "no-such-compiler"),  # Inductor's C++ compiler on CPU
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),  # a cold cache: it must compile
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, p.stderr
    assert "train.compile=true" in errors[0] and "set train.compile=false" in errors[0]
    assert "Traceback" not in p.stderr

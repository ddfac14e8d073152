"""Hugging Face interop with the real transformers package: a Mixtral saved by
transformers imports into xpar with the same logits, an xpar checkpoint exports to a
directory transformers loads with the same logits, xpar -> HF -> xpar is bitwise, and
what Mixtral or xpar cannot express is refused naming the field."""

import json

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.interop import export, hf_import
from xpar.interop.checkpoint_io import write_checkpoint
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.train import saved_model

transformers = pytest.importorskip("transformers")

VOCAB = 61


def _hf_mixtral(tmp_path, **kw):
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kw.pop("num_key_value_heads", 2),
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        **kw,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    return model, d


def _tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


def _xpar_model(**moe_kw):
    model_cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        activation="swiglu",
    )
    moe = dict(num_experts=4, top_k=2, d_ff=24, activation="swiglu", capacity_factor=None)
    moe_cfg = MoEConfig(**{**moe, **moe_kw})
    torch.manual_seed(0)
    model = MoETransformer(model_cfg, moe_cfg, ep_group="local").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _save(model, directory, ep_size=1):
    cfgs = {
        "model": {
            "model": json.loads(json.dumps(model.model_cfg.__dict__)),
            "moe": json.loads(json.dumps(model.moe_cfg.__dict__)),
        },
        "tokenizer": {"spec": "byte", "fingerprint": "byte-v1", "vocab_size": 257},
    }
    return write_checkpoint(directory, model.state_dict(), cfgs, ep_size)


def _assert_same_logits(model, hf_model) -> None:
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv", [2, 4])
def test_a_mixtral_saved_by_transformers_imports_with_its_logits(tmp_path, kv):
    hf_model, d = _hf_mixtral(tmp_path, num_key_value_heads=kv)
    ckpt = hf_import.import_hf(d, tmp_path / "ckpt", ep_size=2)
    model, run = saved_model.build_model(ckpt, "test")
    assert run["model"]["model"]["n_kv_heads"] == (0 if kv == 4 else kv)
    _assert_same_logits(model, hf_model)


def test_an_xpar_checkpoint_exports_to_a_model_transformers_loads(tmp_path):
    model = _xpar_model()
    ckpt = _save(model, tmp_path / "ckpt", ep_size=2)
    export.export_hf(ckpt, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    _assert_same_logits(model, hf_model)


def test_xpar_to_hf_to_xpar_is_bitwise(tmp_path):
    model = _xpar_model()
    ckpt = _save(model, tmp_path / "ckpt")
    export.export_hf(ckpt, tmp_path / "hf")
    back = hf_import.import_hf(tmp_path / "hf", tmp_path / "back", ep_size=4)
    full = saved_model.full_state(back)
    mine = model.state_dict()
    assert sorted(full) == sorted(mine)
    for k, v in mine.items():
        assert torch.equal(full[k], v), k
    run = saved_model.saved_run(back, "test")
    assert run["model"]["model"]["n_kv_heads"] == 2 and run["model"]["moe"]["top_k"] == 2


def test_capacity_exports_with_a_warning_that_hf_is_dropless(tmp_path):
    ckpt = _save(_xpar_model(capacity_factor=1.25), tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="dropless"):
        export.export_hf(ckpt, tmp_path / "hf")


@pytest.mark.parametrize(
    "moe_kw, field",
    [
        (dict(router="hash"), "moe.router='hash'"),
        (dict(top_k=1), "moe.top_k=1"),
        (dict(renormalize=False), "moe.renormalize=False"),
        (dict(activation="gelu"), "moe.activation='gelu'"),
        (dict(shared_expert_d_ff=8), "moe.shared_expert_d_ff=8"),
        (dict(router_options={"score_func": "sigmoid"}), "score_func='sigmoid'"),
    ],
)
def test_what_mixtral_cannot_express_is_refused_by_name(tmp_path, moe_kw, field):
    ckpt = _save(_xpar_model(**moe_kw), tmp_path / "ckpt")
    with pytest.raises(XparConfigError, match=f"cannot be exported.*{field}".replace("(", r"\(")):
        export.export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_dense_blocks_and_encoders_are_refused():
    m = ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=2)
    with pytest.raises(XparConfigError, match="moe.every=2"):
        export.check_exportable(m, MoEConfig(activation="swiglu", every=2))
    enc = ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=2, causal=False)
    with pytest.raises(XparConfigError, match="model.causal=False"):
        export.check_exportable(enc, MoEConfig(activation="swiglu", capacity_factor=None))


def test_qwen2_moe_shared_expert_and_biases_are_refused_by_name(tmp_path):
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
    )
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path / "q2")
    with pytest.raises(XparConfigError) as e:
        hf_import.import_hf(tmp_path / "q2", tmp_path / "ckpt")
    assert "shared_expert_intermediate_size=32" in str(e.value)
    assert "shared_expert_gate" in str(e.value) and "qkv_bias=True" in str(e.value)


def test_qwen3_moe_is_refused_for_its_query_key_norms():
    hf = dict(
        model_type="qwen3_moe",
        hidden_size=32,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        vocab_size=8,
        num_hidden_layers=1,
    )
    with pytest.raises(XparConfigError, match="q_norm"):
        hf_import.configs_from_hf(hf, "test")


def test_rope_scaling_and_a_sliding_window_are_refused_by_name(tmp_path):
    _, d = _hf_mixtral(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for key, value, says in [
        (
            "rope_parameters",
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            "rope_parameters.rope_type='linear'",
        ),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling="),
        ("sliding_window", 16, "sliding_window=16"),
    ]:
        with pytest.raises(XparConfigError, match=says.replace("(", r"\(")):
            hf_import.configs_from_hf({**cfg, key: value}, "xpar import")


def test_export_and_import_help_through_the_console_script(capsys):
    from xpar.cli import main

    for command, says in (("export", "--format"), ("import", "--ep-size")):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert says in capsys.readouterr().out


def test_the_console_script_exports_and_imports(tmp_path, capsys):
    from xpar.cli import main

    model = _xpar_model()
    ckpt = _save(model, tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--ep-size", "2"])
    assert e.value.code == 0
    assert "train.init_from=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2

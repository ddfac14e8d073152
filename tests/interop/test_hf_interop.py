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
        vocab_size=kw.pop("vocab_size", VOCAB),
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


# ------------------------------------------------------------------ Qwen2-MoE


def _hf_qwen2_moe(tmp_path, **kw):
    """A Qwen2-MoE xpar can express: no shared expert (size 0) and no q/k/v biases. A wide
    init, so the logits and the routing are far from flat."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=0,
        qkv_bias=False,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        num_key_value_heads=kw.pop("num_key_value_heads", 2),
        **kw,
    )
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="zero-element"):  # the empty shared expert
        model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path / "q2"
    model.save_pretrained(d)
    return model, d


@pytest.mark.parametrize(
    "kv, sparse_step, norm_topk",
    [(2, 1, False), (4, 2, True)],  # 2: block 0 is a dense MLP, block 1 MoE
)
def test_a_qwen2_moe_saved_by_transformers_imports_with_its_logits(
    tmp_path, kv, sparse_step, norm_topk
):
    hf_model, d = _hf_qwen2_moe(
        tmp_path,
        num_key_value_heads=kv,
        decoder_sparse_step=sparse_step,
        norm_topk_prob=norm_topk,
    )
    ckpt = hf_import.import_hf(d, tmp_path / "ckpt", ep_size=2)
    model, run = saved_model.build_model(ckpt, "test")
    moe = run["model"]["moe"]
    assert (moe["every"], moe["renormalize"], moe["d_ff"]) == (sparse_step, norm_topk, 16)
    assert run["model"]["model"]["d_ff"] == 48  # the dense blocks' MLP
    tokens = _tokens()
    with torch.no_grad():
        theirs = hf_model(tokens).logits
    assert theirs.abs().max() > 1.0  # not a flat distribution that any mapping would match
    _assert_same_logits(model, hf_model)


def test_a_qwen2_moe_config_without_qkv_bias_means_biases(tmp_path):
    """transformers 4.x writes no qkv_bias field and its Qwen2-MoE always has the biases."""
    _, d = _hf_qwen2_moe(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["qkv_bias"]
    with pytest.raises(XparConfigError, match="qwen2_moe model cannot be imported.*qkv_bias=True"):
        hf_import.configs_from_hf(cfg, "xpar import")


def test_weights_the_mapping_does_not_read_are_refused_by_name(tmp_path):
    """A bias in the weights that config.json does not announce would be dropped silently."""
    from safetensors.torch import load_file, save_file

    _, d = _hf_qwen2_moe(tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    weights["model.layers.1.self_attn.q_proj.bias"] = torch.ones(32)
    save_file(weights, str(d / "model.safetensors"), {"format": "pt"})
    with pytest.raises(XparConfigError, match=r"weights hold model\.layers\.1\.self_attn\.q_proj"):
        hf_import.load_hf(d, "train.init_from")


# ------------------------------------------------------------------ export refusals


def test_attention_and_router_options_mixtral_lacks_are_refused_by_name():
    m = ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=2)
    moe = dict(activation="swiglu", capacity_factor=None)
    m.attention = "linear"  # a variant other than dense (set past validation: none exists yet)
    with pytest.raises(XparConfigError, match="model.attention='linear'"):
        export.check_exportable(m, MoEConfig(**moe))
    m = ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=2)
    for opts, says in [
        ({"n_groups": 2, "topk_groups": 1}, "n_groups=2"),
        ({"route_scale": 2.5}, "route_scale=2.5"),
        ({"bias_update_rate": 1e-3}, "bias_update_rate=0.001"),
    ]:
        with pytest.raises(XparConfigError, match=f"cannot be exported.*router_options.{says}"):
            export.check_exportable(m, MoEConfig(**moe, router_options=opts))
    enc = ModelConfig(vocab_size=8, d_model=16, n_heads=2, n_layers=2, causal=False)
    with pytest.raises(XparConfigError, match="moe.router='expert_choice'"):
        export.check_exportable(
            enc, MoEConfig(activation="swiglu", capacity_factor=1.0, router="expert_choice")
        )


def test_a_classifier_checkpoint_is_refused_by_export(tmp_path):
    from xpar.models.classifier import SequenceClassifier

    lm = _xpar_model()
    clf = SequenceClassifier(lm, num_classes=3, pad_id=VOCAB - 1)
    cfgs = {
        "model": {
            "model": json.loads(json.dumps(lm.model_cfg.__dict__)),
            "moe": json.loads(json.dumps(lm.moe_cfg.__dict__)),
        },
    }
    ckpt = write_checkpoint(tmp_path / "ckpt", clf.state_dict(), cfgs)
    with pytest.raises(XparConfigError, match=r"sequence classifier's \(task.kind=classify\)"):
        export.export_hf(ckpt, tmp_path / "hf")


# ------------------------------------------------------------------ the tokenizer


def _local_bpe(directory, special_tokens):
    """A byte-level BPE tokenizer.json trained here (as tests/data's tokenizer tests do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = ["def main(argv):\n    return argv[0] + 1\n", "import os\nprint(os.getcwd())\n"]
    tok.train_from_iterator(texts * 20, trainer=trainer)
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("has_eod", [True, False])
def test_export_copies_the_tokenizer_and_transformers_encodes_the_same_ids(tmp_path, has_eod):
    import warnings

    from xpar.data.tokenizer import build_tokenizer

    _local_bpe(tmp_path / "tok", ["<pad>", "<|endoftext|>"] if has_eod else ["<pad>"])
    with warnings.catch_warnings():  # without one, xpar adds <|endoftext|> (and says so)
        warnings.simplefilter("ignore")
        ours = build_tokenizer(str(tmp_path / "tok"))
    model = _xpar_model()
    model_cfg = dict(model.model_cfg.__dict__, vocab_size=320)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**model_cfg), model.moe_cfg, ep_group="local")
    record = {
        "model": {"model": model_cfg, "moe": json.loads(json.dumps(model.moe_cfg.__dict__))},
        "tokenizer": {
            "spec": str(tmp_path / "tok"),
            "fingerprint": ours.fingerprint,
            "vocab_size": ours.vocab_size,
        },
    }
    ckpt = write_checkpoint(tmp_path / "ckpt", model.state_dict(), record, ep_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export.export_hf(ckpt, tmp_path / "hf")
        back = hf_import.load_hf(tmp_path / "hf")[1]["tokenizer"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def main(argv):\n    print(os.getcwd())  # héllo, 世界\n"
    ids = ours.encode(text).tolist()
    assert len(ids) < len(text.encode())  # merges happened
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs(text)["input_ids"] == ids  # its defaults add no special tokens either
    assert theirs.decode(ids) == text
    # its end of text is xpar's end of document, the id the exported config stops at
    eos = json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    assert theirs.eos_token == ours.eod_token and theirs.eos_token_id == ours.eod_id == eos
    # importing the export keeps the tokenizer's identity (init_from compares it)
    assert back["fingerprint"] == ours.fingerprint and back["vocab_size"] == ours.vocab_size


def test_key_value_heads_that_do_not_divide_the_heads_are_refused_by_their_hf_name(tmp_path):
    _, d = _hf_qwen2_moe(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(XparConfigError, match="num_key_value_heads=3 .*num_attention_heads=4"):
        hf_import.configs_from_hf({**cfg, "num_key_value_heads": 3}, "xpar import")

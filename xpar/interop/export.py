"""`xpar export CHECKPOINT --format hf --out DIR`: a checkpoint (any EP layout) as a
Hugging Face Mixtral model directory that transformers loads (MixtralForCausalLM):
config.json, model.safetensors, generation_config.json, and the tokenizer files when the
run used a local Hugging Face tokenizer (tokenizer_config.json then names xpar's
end-of-document token as eos_token, so AutoTokenizer's eos id is config.json's).

The mapping (xpar -> Mixtral, per block i; HF Linear weights are [out, in]):
  tok_emb.weight                      model.embed_tokens.weight
  blocks.i.attn_norm.weight           model.layers.i.input_layernorm.weight
  blocks.i.attn.wqkv.weight rows      [q (H*K); k (N*K); v (N*K)] -> self_attn.q_proj/k_proj/v_proj
  blocks.i.attn.wo.weight             self_attn.o_proj.weight
  blocks.i.ffn_norm.weight            post_attention_layernorm.weight
  blocks.i.ffn.router.weight [E, D]   block_sparse_moe.gate.weight
  blocks.i.ffn.experts.w1 [E, D, F]   block_sparse_moe.experts.e.w1.weight = w1[e].T  (gate)
  blocks.i.ffn.experts.w3 [E, D, F]   block_sparse_moe.experts.e.w3.weight = w3[e].T  (up)
  blocks.i.ffn.experts.w2 [E, F, D]   block_sparse_moe.experts.e.w2.weight = w2[e].T  (down)
  norm.weight, lm_head.weight         model.norm.weight, lm_head.weight

The per-expert names are what transformers 5's save_pretrained writes (it fuses them into
gate_up_proj [E, 2F, D] / down_proj [E, D, F] on load) and what transformers 4 reads.
Both sides rotate pairs (j, j + K/2) (HF's rotate_half) with theta^(-2j/K), compute
RMSNorm in fp32, softmax the router logits over all experts, take the top k and
renormalise them. What Mixtral cannot express is refused, naming the field and value.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch

from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig

# Tokenizer files copied beside the model when the run used a local HF tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def check_exportable(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[str]:
    """Refuse (XparConfigError naming every field that Mixtral cannot express) or return
    warnings for settings that change how the exported model routes."""
    from xpar.models.config import moe_block_ids

    problems: list[str] = []
    if not model_cfg.causal:
        problems.append("model.causal=False (a bidirectional encoder): Mixtral is a causal decoder")
    if model_cfg.attention != "dense":
        problems.append(
            f"model.attention={model_cfg.attention!r}: Mixtral's attention is dense softmax "
            "attention (its sliding window aside)"
        )
    if moe_cfg.every != 1 or not moe_block_ids(model_cfg, moe_cfg):
        problems.append(
            f"moe.every={moe_cfg.every}: every Mixtral block is an MoE block (no dense "
            "blocks between them); export a model with moe.every=1"
        )
    if moe_cfg.activation != "swiglu":
        problems.append(
            f"moe.activation={moe_cfg.activation!r}: Mixtral's experts are silu-gated "
            "(swiglu); train with moe.activation=swiglu"
        )
    if moe_cfg.router != "topk":
        problems.append(
            f"moe.router={moe_cfg.router!r}: Mixtral routes by softmax top-k; only "
            "moe.router=topk exports"
        )
    else:
        problems += _topk_problems(moe_cfg)
    if moe_cfg.shared_expert_d_ff:
        problems.append(
            f"moe.shared_expert_d_ff={moe_cfg.shared_expert_d_ff}: Mixtral has no shared expert"
        )
    if problems:
        raise XparConfigError(
            "this checkpoint cannot be exported as a Hugging Face Mixtral model: "
            + "; ".join(problems)
        )
    notes = []
    for name in ("capacity_factor", "eval_capacity_factor"):
        cf = getattr(moe_cfg, name)
        if cf is not None:
            notes.append(
                f"moe.{name}={cf}: Hugging Face Mixtral routes dropless (no capacity), so the "
                "exported model keeps tokens this model would drop over capacity"
            )
    return notes


def _topk_problems(moe_cfg: MoEConfig) -> list[str]:
    opts = moe_cfg.options()
    out = []
    if moe_cfg.top_k < 2:
        out.append(
            f"moe.top_k={moe_cfg.top_k}: Mixtral renormalises the top-k weights, so one "
            "expert would get weight 1 instead of its softmax probability"
        )
    elif not moe_cfg.renormalize:
        out.append("moe.renormalize=False: Mixtral always renormalises the top-k weights")
    if opts.score_func != "softmax":
        out.append(f"moe.router_options.score_func={opts.score_func!r}: Mixtral uses softmax")
    if opts.n_groups != 1:
        out.append(f"moe.router_options.n_groups={opts.n_groups}: Mixtral has no group limit")
    if opts.route_scale != 1.0:
        out.append(f"moe.router_options.route_scale={opts.route_scale}: Mixtral has no scale")
    if opts.bias_update_rate:
        out.append(
            f"moe.router_options.bias_update_rate={opts.bias_update_rate}: the expert bias "
            "steers the choice of experts and Mixtral's router has no bias"
        )
    return out


def hf_config(model_cfg: ModelConfig, moe_cfg: MoEConfig, eos_id: int | None) -> dict:
    """config.json for MixtralForCausalLM (transformers 5 names; 4.x reads them too)."""
    import transformers

    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": moe_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "initializer_range": model_cfg.init_std,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_parameters": {"rope_theta": model_cfg.rope_theta, "rope_type": "default"},
        "rope_theta": model_cfg.rope_theta,  # transformers 4's name
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": moe_cfg.num_experts,
        "num_experts_per_tok": moe_cfg.top_k,
        "router_aux_loss_coef": moe_cfg.aux_loss_weight,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def hf_state(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig
) -> dict[str, torch.Tensor]:
    """Whole-bank xpar weights (xpar.train.saved_model.full_state) as Mixtral weights."""
    H, N, K = model_cfg.n_heads, model_cfg.kv_heads, model_cfg.head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"]}
    for i in range(model_cfg.n_layers):
        x, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[x + "attn.wqkv.weight"].split((H * K, N * K, N * K), dim=0)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = state[x + "attn.wo.weight"]
        out[h + "input_layernorm.weight"] = state[x + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = state[x + "ffn_norm.weight"]
        moe = h + "block_sparse_moe."
        out[moe + "gate.weight"] = state[x + "ffn.router.weight"]
        for w in ("w1", "w2", "w3"):
            bank = state[x + f"ffn.experts.{w}"]
            assert bank.shape[0] == moe_cfg.num_experts, "export needs whole expert banks"
            for e in range(moe_cfg.num_experts):
                out[moe + f"experts.{e}.{w}.weight"] = bank[e].t()
    out["model.norm.weight"] = state["norm.weight"]
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    # safetensors wants contiguous tensors that share no storage
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def export_hf(checkpoint: str | Path, out: str | Path, where: str = "checkpoint") -> list[str]:
    """Write `checkpoint` as a Mixtral directory at `out`; returns the warnings it issued."""
    from safetensors.torch import save_file

    from xpar.train import saved_model

    run = saved_model.saved_run(checkpoint, where)
    model_cfg, moe_cfg = saved_model.configs(run)
    notes = check_exportable(model_cfg, moe_cfg)
    state = saved_model.full_state(checkpoint, where)
    if "lm_head.weight" not in state:
        from xpar.models.classifier import PREFIX

        what = (
            "is a sequence classifier's (task.kind=classify): a class head, no language model head"
            if any(k.startswith(PREFIX) for k in state)
            else "holds no language model head"
        )
        raise XparConfigError(
            f"{where}={str(checkpoint)!r} {what}; MixtralForCausalLM needs one, so export a "
            "language model's checkpoint (task.kind=lm)"
        )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = run.get("tokenizer", {})
    eos_id = _copy_tokenizer(tok.get("spec"), out)
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg, moe_cfg, eos_id), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": None})
    )
    save_file(hf_state(state, model_cfg, moe_cfg), str(out / "model.safetensors"), {"format": "pt"})
    return notes


def _copy_tokenizer(spec: str | None, out: Path) -> int | None:
    """Copy a local HF tokenizer's files; the end-of-document id (the byte tokenizer's 256:
    it has no files, ids 0..255 are the UTF-8 bytes)."""
    if spec in (None, ""):
        return None
    from xpar.data.tokenizer import build_tokenizer

    if spec == "byte":
        return build_tokenizer("byte").eod_id
    src = Path(spec).expanduser()
    src_dir = src if src.is_dir() else src.parent
    if not (src_dir / "tokenizer.json").is_file():
        warnings.warn(
            f"data.tokenizer={spec!r} of this checkpoint is no longer there; the export has "
            "no tokenizer files (copy them beside config.json yourself)",
            stacklevel=3,
        )
        return None
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
    tok = build_tokenizer(str(src_dir))
    _name_eos(out / "tokenizer_config.json", tok.eod_token)
    return int(tok.eod_id)


def _name_eos(path: Path, eod_token: str) -> None:
    """Name xpar's end-of-document token as the eos token in tokenizer_config.json, so the
    tokenizer transformers loads ends text where the model learnt to (config.json's
    eos_token_id). A token xpar added (the source had none) is added by transformers too,
    at the same id: the first past the vocabulary."""
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    eos = cfg.get("eos_token")
    if (eos.get("content") if isinstance(eos, dict) else eos) == eod_token:
        return
    cfg["eos_token"] = eod_token
    path.write_text(json.dumps(cfg, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="xpar export",
        description="Write an xpar checkpoint (any expert-parallel size) as a Hugging Face "
        "Mixtral model directory (config.json, model.safetensors, tokenizer files).",
    )
    p.add_argument(
        "checkpoint", help="a step_* directory, a checkpoints/ directory or a run's out_dir"
    )
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (hf: Mixtral)")
    p.add_argument("--out", required=True, help="the directory to write")
    args = p.parse_args(argv)
    try:
        export_hf(args.checkpoint, args.out)
    except XparConfigError as e:
        print(f"xpar export: {e}", flush=True)
        return 2
    print(f"wrote {args.out} (MixtralForCausalLM)", flush=True)
    return 0

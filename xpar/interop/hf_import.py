"""`xpar import DIR --out CKPT_DIR [--ep-size N]`: a local Hugging Face MoE model directory
(Mixtral, or a Qwen2-MoE without a shared expert or biases) as an xpar checkpoint, which
xpar.train.saved_model.build_model and train.init_from read at any EP size; and
`train.init_from=hf:DIR`, the same conversion in memory.

Never downloads: DIR holds config.json and model.safetensors (or a sharded
model.safetensors.index.json). The weight mapping is xpar.interop.export's, read backwards;
expert weights are accepted per expert (experts.e.w1/w2/w3, as save_pretrained writes them)
or fused (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F], transformers 5's
module layout). Whatever xpar cannot compute the same way is refused, every such field of
config.json named with its value: rope scaling, a sliding window, attention or MLP biases,
a head_dim other than hidden_size / num_attention_heads, activations other than silu, a
shared expert (Qwen2-MoE), per-head query/key norms (Qwen3-MoE), dense layers at places
xpar's moe.every cannot put them. Qwen2-MoE has q/k/v biases unless config.json says
qkv_bias=false (a transformers 4.x config has no such field: its model has them). A weight
the mapping leaves unread (a bias no field announces) is refused by name too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_PREFIX = "hf:"


def read_config(directory: str | Path, where: str) -> dict:
    path = Path(directory).expanduser() / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise XparConfigError(
            f"{where}={str(directory)!r}: cannot read {path} ({e}); name a local Hugging Face "
            "model directory (config.json and model.safetensors; nothing is downloaded)"
        ) from e
    return cfg


def _rope_problems(hf: dict) -> tuple[float, list[str]]:
    out = []
    if hf.get("rope_scaling") is not None:
        out.append(f"rope_scaling={hf['rope_scaling']!r} (xpar's rotary has no scaling)")
    rope = hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        out.append(f"rope_parameters.rope_type={kind!r} (xpar's rotary is the default kind)")
    prf = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if prf != 1.0:
        out.append(f"partial_rotary_factor={prf} (xpar rotates every head dimension)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), out


def configs_from_hf(hf: dict, where: str) -> tuple[ModelConfig, MoEConfig]:  # noqa: C901
    """xpar's model and MoE configs for an HF config.json; refusals name its fields."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise XparConfigError(
            f"{where}: config.json has model_type={arch!r}; xpar imports {', '.join(ARCHS)}"
        )
    theta, problems = _rope_problems(hf)
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    N = int(hf.get("num_key_value_heads") or H)
    if hf.get("head_dim") not in (None, D // H) or D % H:
        problems.append(
            f"head_dim={hf.get('head_dim')} (xpar's head dim is hidden_size / "
            f"num_attention_heads = {D}/{H})"
        )
    if H % N:
        problems.append(
            f"num_key_value_heads={N} (it must divide num_attention_heads={H}: each key/value "
            "head serves a group of query heads)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (xpar's gated FFN is swiglu: silu)")
    # Qwen2-MoE has query/key/value biases unless qkv_bias=false says otherwise (the field
    # is transformers 5's; a 4.x config.json has none, and its model always has them).
    for name in ("attention_bias", "mlp_bias", "qkv_bias"):
        value = hf.get(name, name == "qkv_bias" and arch == "qwen2_moe")
        if value:
            problems.append(f"{name}={value!r} (xpar's projections have no biases)")
    if arch == "mixtral":
        if hf.get("sliding_window") is not None:
            problems.append(f"sliding_window={hf['sliding_window']} (xpar attends densely)")
        E, K, F = hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]
        renorm, every, dense_ff = True, 1, F
        if K < 2:
            problems.append(
                f"num_experts_per_tok={K}: Mixtral gives its one expert weight 1, xpar's top-1 "
                "weighs it by its probability (Switch)"
            )
    else:
        if hf.get("use_sliding_window", False):
            problems.append(f"use_sliding_window={hf['use_sliding_window']} (xpar attends densely)")
        if arch == "qwen3_moe":
            problems.append(
                "model_type='qwen3_moe': Qwen3-MoE normalises queries and keys per head "
                "(self_attn.q_norm, self_attn.k_norm) and xpar's attention has no q/k norm"
            )
        if arch == "qwen2_moe" and hf.get("shared_expert_intermediate_size", 0):
            problems.append(
                f"shared_expert_intermediate_size={hf['shared_expert_intermediate_size']}: "
                "Qwen2-MoE's shared expert is scaled by a learned sigmoid gate "
                "(shared_expert_gate), which xpar's shared expert does not have"
            )
        E, K, F = hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]
        renorm, every = bool(hf.get("norm_topk_prob", False)), int(hf.get("decoder_sparse_step", 1))
        dense_ff = int(hf.get("intermediate_size", F))
        if renorm and K < 2:
            problems.append(
                f"norm_topk_prob=True with num_experts_per_tok={K}: the one expert gets "
                "weight 1, xpar's top-1 weighs it by its probability"
            )
        if hf.get("mlp_only_layers"):
            problems.append(
                f"mlp_only_layers={hf['mlp_only_layers']}: xpar places dense blocks only by "
                "moe.every (every n-th block is MoE)"
            )
    if problems:
        raise XparConfigError(
            f"{where}: this {arch} model cannot be imported: " + "; ".join(problems)
        )
    model_cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=D,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=H,
        n_kv_heads=0 if N == H else N,
        d_ff=dense_ff,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        activation="swiglu",
    )
    moe_cfg = MoEConfig(
        num_experts=int(E),
        top_k=int(K),
        d_ff=int(F),
        router="topk",
        capacity_factor=None,  # Hugging Face routes dropless
        activation="swiglu",
        renormalize=renorm,
        every=every,
        aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)),
    )
    return model_cfg, moe_cfg


def read_weights(directory: str | Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = Path(directory).expanduser()
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise XparConfigError(
            f"{where}={str(directory)!r} has no model.safetensors (or its index); save the "
            "model with save_pretrained(safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(d / name)))
    return state


def _experts(hf: dict[str, torch.Tensor], moe: str, names: tuple[str, str, str], E: int):
    """(w1, w2, w3) banks [E, D, F], [E, F, D], [E, D, F] from per-expert or fused weights."""
    gate, down, up = names
    fused = hf.get(moe + "experts.gate_up_proj")
    if fused is not None:  # [E, 2F, D], [E, D, F]
        g, u = fused.chunk(2, dim=1)
        return g.transpose(1, 2), hf[moe + "experts.down_proj"].transpose(1, 2), u.transpose(1, 2)

    def bank(w: str) -> torch.Tensor:
        return torch.stack([hf[f"{moe}experts.{e}.{w}.weight"].t() for e in range(E)])

    return bank(gate), bank(down), bank(up)


class _Reads(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default=None):
        if key in self:
            return self[key]
        return default


def state_from_hf(
    hf: dict[str, torch.Tensor],
    arch: str,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    where: str = "xpar import",
) -> dict[str, torch.Tensor]:
    """HF weights as xpar's whole-bank state dict (fp32); a weight it leaves unread is
    refused by name."""
    from xpar.models.config import moe_block_ids

    hf = _Reads(hf)
    moe_ids = set(moe_block_ids(model_cfg, moe_cfg))
    out = {"tok_emb.weight": hf["model.embed_tokens.weight"]}
    for i in range(model_cfg.n_layers):
        x, h = f"blocks.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        out[x + "attn.wqkv.weight"] = torch.cat(
            [hf[attn + p + "_proj.weight"] for p in ("q", "k", "v")], dim=0
        )
        out[x + "attn.wo.weight"] = hf[attn + "o_proj.weight"]
        out[x + "attn_norm.weight"] = hf[h + "input_layernorm.weight"]
        out[x + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        if arch == "mixtral":
            moe, names = h + "block_sparse_moe.", ("w1", "w2", "w3")
            if moe + "gate.weight" not in hf:  # transformers 5's module names
                moe = h + "mlp."
        else:
            moe, names = h + "mlp.", ("gate_proj", "down_proj", "up_proj")
        if i in moe_ids:
            out[x + "ffn.router.weight"] = hf[moe + "gate.weight"]
            w1, w2, w3 = _experts(hf, moe, names, moe_cfg.num_experts)
            out[x + "ffn.experts.w1"], out[x + "ffn.experts.w2"] = w1, w2
            out[x + "ffn.experts.w3"] = w3
        else:  # a dense block (Qwen2-MoE's decoder_sparse_step)
            out[x + "ffn.w1.weight"] = hf[h + "mlp.gate_proj.weight"]
            out[x + "ffn.w3.weight"] = hf[h + "mlp.up_proj.weight"]
            out[x + "ffn.w2.weight"] = hf[h + "mlp.down_proj.weight"]
    out["norm.weight"] = hf["model.norm.weight"]
    out["lm_head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    _refuse_unused(hf, hf.read, where)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _refuse_unused(hf: dict[str, torch.Tensor], used: set[str], where: str) -> None:
    """A weight the mapping did not read is a computation xpar would leave out (a bias, a
    norm): refused by name. Exempt: empty tensors (a shared expert of size 0), the gate of
    such a shared expert (it scales zeros) and rotary frequency buffers (recomputed)."""
    left = sorted(
        k
        for k, t in hf.items()
        if k not in used
        and t.numel() > 0
        and not k.endswith(("shared_expert_gate.weight", "rotary_emb.inv_freq"))
    )
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise XparConfigError(
            f"{where}: the model's weights hold {', '.join(left[:3])}{more}, which xpar's "
            "model has no place for (no config.json field says so): dropping them would "
            "compute another model; import a model without them"
        )


def load_hf(directory: str | Path, where: str = "xpar import") -> tuple[dict, dict]:
    """(whole-bank xpar state, run record) of a local HF model directory."""
    hf_cfg = read_config(directory, where)
    model_cfg, moe_cfg = configs_from_hf(hf_cfg, where)
    weights = read_weights(directory, where)
    state = state_from_hf(weights, hf_cfg["model_type"], model_cfg, moe_cfg, where)
    record = {
        "model": {"model": dataclasses.asdict(model_cfg), "moe": dataclasses.asdict(moe_cfg)},
        "hf_source": {
            "directory": str(Path(directory).resolve()),
            "model_type": hf_cfg["model_type"],
        },
    }
    tok = Path(directory).expanduser() / "tokenizer.json"
    if tok.is_file():
        from xpar.data.tokenizer import build_tokenizer

        t = build_tokenizer(str(tok.parent.resolve()))
        record["tokenizer"] = {
            "spec": str(tok.parent.resolve()),
            "fingerprint": t.fingerprint,
            "vocab_size": t.vocab_size,
        }
    return state, record


def overrides(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[str]:
    """Hydra overrides that build this model in the trainer (for train.init_from)."""
    out = [
        f"model.{k}={v}"
        for k, v in dataclasses.asdict(model_cfg).items()
        if k != "attention_options"
    ]
    skip = {"router_options", "upcycle", "upcycle_noise"}  # how a run starts, not a shape
    out += [
        f"moe.{k}={'null' if v is None else v}"
        for k, v in dataclasses.asdict(moe_cfg).items()
        if k not in skip
    ]
    return out


def import_hf(directory: str | Path, out: str | Path, ep_size: int = 1) -> Path:
    from xpar.interop.checkpoint_io import write_checkpoint
    from xpar.moe.experts import local_experts

    state, record = load_hf(directory, "xpar import")
    local_experts(record["model"]["moe"]["num_experts"], ep_size, 0)  # refuses a non-divisor
    return write_checkpoint(out, state, record, ep_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="xpar import",
        description="Read a local Hugging Face MoE model (Mixtral; Qwen2-MoE without a shared "
        "expert or biases) into an xpar checkpoint that train.init_from and xpar "
        "generate/eval read at any expert-parallel size.",
    )
    p.add_argument(
        "directory", help="the Hugging Face model directory (config.json, *.safetensors)"
    )
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--ep-size", type=int, default=1, help="rank files to write (experts sliced)")
    args = p.parse_args(argv)
    try:
        d = import_hf(args.directory, args.out, args.ep_size)
    except XparConfigError as e:
        print(f"xpar import: {e}", flush=True)
        return 2
    from xpar.train.saved_model import configs, saved_run

    model_cfg, moe_cfg = configs(saved_run(d, "xpar import"))
    print(f"wrote {d}; to train from it: train.init_from={d} with", flush=True)
    print("  " + " ".join(overrides(model_cfg, moe_cfg)), flush=True)
    return 0

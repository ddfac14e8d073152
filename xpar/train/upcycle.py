"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model's start from a trained dense one.

Every expert of an MoE block starts as a copy of that block's dense FFN (w1_eDF = w1.T,
w3 likewise, w2_eFD = w2.T), optionally plus small noise; the routers keep their fresh
init; every other weight is the dense model's. With no noise and combine weights that sum
to 1 per token (top-k with renormalised weights, dropless) the upcycled model computes the
dense model's function exactly at step 0.

The noise is drawn for the whole bank from train.seed, so every expert-parallel layout
starts from the same experts.
"""

from __future__ import annotations

import torch

from xpar.errors import XparConfigError

WHERE = "moe.upcycle"
_FFN = ("w1", "w2", "w3")


def check_source(src_moe_ids: list[int], src_model: dict, moe, where: str) -> None:
    """Refuse a source that is not a dense model whose FFN an expert can copy; the source's
    model config is `src_model` (a run record's), `moe` this run's MoEConfig."""
    if src_moe_ids:
        raise XparConfigError(
            f"{WHERE}=true with {where}: that checkpoint already has MoE layers (blocks "
            f"{src_moe_ids}); upcycling starts from a dense model (moe=dense); set "
            "moe.upcycle=false to continue an MoE checkpoint's weights"
        )
    for mine, theirs in (("d_ff", "d_ff"), ("activation", "activation")):
        if getattr(moe, mine) != src_model[theirs]:
            raise XparConfigError(
                f"moe.{mine}={getattr(moe, mine)!r} with {WHERE}=true: each expert is a "
                f"copy of the dense FFN of {where}, whose model.{theirs} is "
                f"{src_model[theirs]!r}; set moe.{mine}={src_model[theirs]!r}"
            )
    if moe.shared_expert_d_ff:
        raise XparConfigError(
            f"moe.shared_expert_d_ff={moe.shared_expert_d_ff} with {WHERE}=true: the "
            "upcycled experts already compute the dense FFN, a shared expert would add a "
            "second one; set moe.shared_expert_d_ff=0"
        )


def upcycled_state(
    dense: dict[str, torch.Tensor],
    fresh: dict[str, torch.Tensor],
    moe_ids: list[int],
    num_experts: int,
    noise: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the MoE model's whole-bank state from the dense one's, the keys left at their fresh
    init). `fresh` is the MoE model's own state (its routers' init); expert banks come out
    whole (num_experts), for saved_model.sliced_state to cut."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    gen = torch.Generator().manual_seed(seed)
    for i in moe_ids:
        for w in _FFN:
            key = f"blocks.{i}.ffn.{w}.weight"
            if key not in dense:
                continue
            used.add(key)
            w_DF = dense[key].t()  # Linear keeps [out, in]; a bank row is [in, out]
            bank = w_DF.unsqueeze(0).repeat(num_experts, 1, 1)
            if noise > 0:
                eps = torch.randn(bank.shape, generator=gen, dtype=bank.dtype)
                bank = bank + noise * w_DF.std() * eps
            out[f"blocks.{i}.ffn.experts.{w}"] = bank.contiguous()
    for key, value in dense.items():
        if key not in used:
            out[key] = value
    kept_fresh = sorted(k for k in fresh if k not in out)
    for key in kept_fresh:
        out[key] = fresh[key]
    return out, kept_fresh

"""A frozen teacher for distillation (train.distill.teacher): any xpar checkpoint, MoE or
dense, saved with any expert-parallel size, rebuilt from the configs its checkpoint records
and sharded over this run's EP group like the student's own experts.

A checkpoint's rank file r holds the dense weights and EP slice r of every expert bank, so
the whole model is the dense weights of rank 0 plus the expert banks of ranks 0..ep_size-1
joined in rank order; this rank then keeps its own slice (xpar.moe.experts.local_experts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.moe.experts import GroupedExperts, local_experts

WHERE = "train.distill.teacher"


def saved_run(directory: str | Path, where: str = WHERE) -> dict:
    """The run record of a checkpoint (its model and moe configs, its tokenizer); a config
    error naming `where` when there is none. Cheap: config validation calls it. `directory`
    may be a step_* directory, a checkpoints/ directory or a run's out_dir (its latest)."""
    directory = checkpoint_dir(directory, where)
    path = directory / "client_state.json"
    try:
        run = json.loads(path.read_text())  # the run record sits at its top level
    except (OSError, ValueError) as e:
        raise XparConfigError(
            f"{where}={str(directory)!r}: cannot read {path.name} ({e}); name a checkpoint "
            "directory (a step_* directory under an xpar run's checkpoints/)"
        ) from e
    if not isinstance(run, dict) or "model" not in run.get("model", {}):
        raise XparConfigError(
            f"{where}={str(directory)!r}: the checkpoint records no model config (written by "
            "an older xpar); name a checkpoint of a run made by this version"
        )
    return run


def checkpoint_dir(value: str | Path, where: str = WHERE) -> Path:
    from xpar.train.resume import as_checkpoint

    return as_checkpoint(str(value), where)


def check_vocabulary(run: dict, tokenizer: dict, vocab_size: int, where: str = WHERE) -> None:
    """The teacher's logits are compared token by token with the student's: same tokenizer,
    same (padded) vocabulary."""
    theirs = run.get("tokenizer", {})
    v = run["model"]["model"]["vocab_size"]
    same_tok = theirs.get("fingerprint") == tokenizer.get("fingerprint")
    if not same_tok or (vocab_size and v != vocab_size):
        raise XparConfigError(
            f"{where}: the teacher's vocabulary (tokenizer {theirs.get('spec')!r}, "
            f"{theirs.get('vocab_size')} tokens, model vocab {v}) differs from this run's "
            f"(tokenizer {tokenizer.get('spec')!r}, {tokenizer.get('vocab_size')} tokens, "
            f"model vocab {vocab_size}); distil from a teacher trained on the same tokenizer "
            "(set data.tokenizer to the teacher's)"
        )


def full_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint with whole expert banks, whatever its EP size."""
    from xpar.parallel.deepspeed import XparEngine  # the classes a rank file may hold
    from xpar.train.checkpoint import _verified_load, rank_file

    directory = checkpoint_dir(directory)
    layout = json.loads((directory / "xpar_parallel.json").read_text())
    parts = [
        _verified_load(rank_file(directory, r), XparEngine.safe_globals())["module"]
        for r in range(int(layout["ep_size"]))
    ]
    state = dict(parts[0])
    for key in state:
        if _is_expert_bank(key) and len(parts) > 1:
            state[key] = torch.cat([p[key] for p in parts], dim=0)
    return state


def _is_expert_bank(key: str) -> bool:
    return ".experts.w" in key


def load_sliced(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole-bank weights into a model whose expert banks hold one EP slice."""
    model.load_state_dict(sliced_state(model, state))


def sliced_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (whole expert banks, the model's own key names) with every bank cut to the
    slice `model`'s experts hold."""
    mine = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            for w in ("w1", "w2", "w3"):
                key = f"{name}.{w}"
                if key in mine:
                    mine[key] = mine[key][module.ids.start : module.ids.stop]
    return mine


def build_teacher(directory: str | Path, groups: Any, run: dict, device: torch.device):
    """The frozen teacher in eval mode on `device`, its experts over this run's EP group."""
    cfgs = run["model"]
    model_cfg = ModelConfig(**cfgs["model"])
    moe_cfg = MoEConfig(**cfgs["moe"])
    ep = groups.ep_size
    if moe_cfg.every > 0 and moe_cfg.num_experts % ep:
        raise XparConfigError(
            f"{WHERE}: the teacher has moe.num_experts={moe_cfg.num_experts}, which this run's "
            f"expert-parallel size {ep} does not divide; its experts are sharded like the "
            "student's, so choose parallel.ep_size dividing it"
        )
    teacher = MoETransformer(model_cfg, moe_cfg, ep_group=groups.ep_group)
    # Sanity: the slice this rank will hold, in the layout's one rule.
    assert all(
        m.ids == local_experts(moe_cfg.num_experts, ep, groups.ep_rank)
        for m in teacher.modules()
        if isinstance(m, GroupedExperts)
    )
    load_sliced(teacher, full_state(directory))
    teacher.requires_grad_(False)
    return teacher.to(device).eval()

"""A saved model outside the run that made it: its run record, its whole weights whatever
its expert-parallel size, and the model rebuilt from them for any EP layout (one process
included). The distillation teacher, fine-tuning's init_from, generation, evaluation and
export all read checkpoints through here.

A checkpoint's rank file r holds the dense weights and EP slice r of every expert bank, so
the whole model is the dense weights of rank 0 plus the expert banks of ranks 0..ep_size-1
joined in rank order; a model then keeps its own slice (xpar.moe.experts.local_experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.moe.experts import GroupedExperts, local_experts


def checkpoint_dir(value: str | Path, where: str) -> Path:
    """A step_* directory, a checkpoints/ directory or a run's out_dir (its latest), as the
    step directory; a config error naming `where` otherwise."""
    from xpar.train.resume import as_checkpoint

    return as_checkpoint(str(value), where)


def saved_run(directory: str | Path, where: str) -> dict:
    """The run record of a checkpoint (its model and moe configs, its tokenizer); a config
    error naming `where` when there is none. Cheap: config validation calls it."""
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


def full_state(directory: str | Path, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint with whole expert banks, whatever its EP size."""
    from xpar.parallel.deepspeed import XparEngine  # the classes a rank file may hold
    from xpar.train.checkpoint import _verified_load, rank_file

    directory = checkpoint_dir(directory, where)
    layout = json.loads((directory / "xpar_parallel.json").read_text())
    parts = [
        _verified_load(rank_file(directory, r), XparEngine.safe_globals())["module"]
        for r in range(int(layout["ep_size"]))
    ]
    state = dict(parts[0])
    for key in state:
        if is_expert_bank(key) and len(parts) > 1:
            state[key] = torch.cat([p[key] for p in parts], dim=0)
    return state


def is_expert_bank(key: str) -> bool:
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


def configs(run: dict) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE configs a run record holds."""
    cfgs = run["model"]
    return ModelConfig(**cfgs["model"]), MoEConfig(**cfgs["moe"])


def build_model(
    directory: str | Path,
    where: str,
    *,
    ep_group=None,
    ep_size: int = 1,
    ep_rank: int = 0,
) -> tuple[MoETransformer, dict]:
    """(the model with the checkpoint's weights, in eval mode on CPU, the run record). With
    `ep_group` (ep_size ranks, this one ep_rank) its experts are this rank's slice; without,
    one process holds every expert."""
    run = saved_run(directory, where)
    model_cfg, moe_cfg = configs(run)
    if moe_cfg.every > 0 and moe_cfg.num_experts % ep_size:
        raise XparConfigError(
            f"{where}: the checkpoint has moe.num_experts={moe_cfg.num_experts}, which this "
            f"run's expert-parallel size {ep_size} does not divide; its experts are sharded "
            "over this run's EP group, so choose parallel.ep_size dividing it"
        )
    model = MoETransformer(model_cfg, moe_cfg, ep_group=ep_group if ep_size > 1 else "local")
    # Sanity: the slice this rank holds, in the layout's one rule.
    assert all(
        m.ids == local_experts(moe_cfg.num_experts, ep_size, ep_rank)
        for m in model.modules()
        if isinstance(m, GroupedExperts)
    )
    load_sliced(model, full_state(directory, where))
    return model.eval(), run

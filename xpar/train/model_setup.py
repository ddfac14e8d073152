"""The model's state at the start of a run, beyond its init: weights from train.init_from
(a classifier's backbone from an LM of any EP size), the distillation teacher, and the
routers' tables fitted to the corpus. The MoE layers are found once and passed around.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xpar.models.classifier import SequenceClassifier, describe_load, load_backbone_state
from xpar.moe import MoELayer
from xpar.train import checkpoint as ckpt
from xpar.train import saved_model, teacher
from xpar.train.resume_guard import check_resumable


def moe_layers(model) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def init_from(model, directory: Path, groups, record: dict) -> dict:
    """train.init_from: the whole model, or for a classifier the backbone (the head starts
    fresh), from a checkpoint of any EP size: its expert banks are joined whole and cut to
    the slice this rank holds. Call before the engine is built, so the optimizer (and ZeRO's
    fp32 master copy) starts from these weights."""
    where = "train.init_from"
    if not isinstance(model, SequenceClassifier):
        saved = ckpt.read_client_state(directory)
        state = saved_model.sliced_state(model, saved_model.full_state(directory, where))
        what = f"{where}={str(directory)!r}"
        # shapes and tokenizer must fit; other config changes are the point of a new run
        check_resumable(directory, state, model.state_dict(), saved, record, force=True, what=what)
        model.load_state_dict(state)
        return saved
    saved = saved_model.saved_run(directory, where)
    teacher.check_vocabulary(saved, record["tokenizer"], model.model_cfg.vocab_size, where)
    lm_state = saved_model.sliced_state(model.backbone, saved_model.full_state(directory, where))
    missing, unexpected = load_backbone_state(model, lm_state, where=where)
    if groups.rank == 0:
        print(describe_load(len(lm_state) - len(unexpected), missing, unexpected), flush=True)
    return saved


def teacher_for(cfg, groups, record: dict):
    """train.distill.teacher: the frozen teacher, its experts over this run's EP group."""
    d = cfg.train.distill
    if not d.enabled:
        return None
    saved = teacher.saved_run(d.teacher)
    teacher.check_vocabulary(saved, record["tokenizer"], record["model"]["model"]["vocab_size"])
    model = teacher.build_teacher(d.teacher, groups, groups.device)
    if groups.rank == 0:
        print(
            f"distilling from {d.teacher} (alpha {d.alpha}, temperature {d.temperature}): "
            f"{sum(p.numel() for p in model.parameters()):,} teacher parameters on this rank",
            flush=True,
        )
    return model


def fit_routers_to_data(layers: list, data, vocab: int, rank: int) -> None:
    """Routers that need the corpus (a hash table balanced by token frequency) get the
    training split's token counts, the same on every rank since every rank holds every
    block; their result lives in buffers, so a checkpoint carries it."""
    routers = [m.router for m in layers if m.router.needs_token_counts]
    if not routers:
        return
    counts_V = torch.from_numpy(np.bincount(data.train.blocks.reshape(-1), minlength=vocab))
    for router in routers:
        router.fit_to_data(counts_V)
    if rank == 0:
        print(
            f"routing: {len(routers)} {routers[0].name} router(s) fitted to the token counts "
            f"of the training split ({int(counts_V.sum())} tokens)",
            flush=True,
        )


def stateful_routers(layers: list) -> list:
    """Every layer's router when one keeps balance state (after_optimizer_step), else none."""
    routers = [m.router for m in layers]
    return routers if any(r.updates_after_step for r in routers) else []

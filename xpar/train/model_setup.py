"""The model's state at the start of a run, beyond its init: weights from train.init_from
(a classifier's backbone from an LM of any EP size), the distillation teacher, and the
routers' tables fitted to the corpus. The MoE layers are found once and passed around.
"""

from __future__ import annotations

import numpy as np
import torch

from xpar.models.classifier import SequenceClassifier, describe_load, load_backbone_state
from xpar.models.config import moe_block_ids
from xpar.moe import MoELayer
from xpar.train import init_source, saved_model, teacher, upcycle
from xpar.train.init_source import InitSource
from xpar.train.resume_guard import check_resumable


def moe_layers(model) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def init_from(model, source: InitSource, groups, record: dict, moe_cfg, seed: int) -> dict:
    """train.init_from: the whole model, or for a classifier the backbone (the head starts
    fresh), from a checkpoint of any EP size or a Hugging Face model: its expert banks are
    joined whole and cut to the slice this rank holds; with moe.upcycle the dense FFNs
    become the experts. Call before the engine is built, so the optimizer (and ZeRO's fp32
    master copy) starts from these weights."""
    where = "train.init_from"
    lm = model.backbone if isinstance(model, SequenceClassifier) else model
    state, saved = init_source.read(source)
    if moe_cfg.upcycle:
        state = _upcycled(lm, state, moe_cfg, seed, source, groups.rank)
    state = saved_model.sliced_state(lm, state)
    if lm is model:
        what = f"{where}={str(source)!r}"
        # shapes and tokenizer must fit; other config changes are the point of a new run
        check_resumable(
            source.path, state, model.state_dict(), saved, record, force=True, what=what
        )
        model.load_state_dict(state)
        return saved
    teacher.check_vocabulary(saved, record["tokenizer"], model.model_cfg.vocab_size, where)
    missing, unexpected = load_backbone_state(model, state, where=where)
    if groups.rank == 0:
        print(describe_load(len(state) - len(unexpected), missing, unexpected), flush=True)
    return saved


def _upcycled(lm, dense: dict, moe_cfg, seed: int, source, rank: int) -> dict:
    layers = moe_block_ids(lm.model_cfg, lm.moe_cfg)  # the model's own rule
    state, fresh = upcycle.upcycled_state(
        dense, lm.state_dict(), layers, moe_cfg.num_experts, moe_cfg.upcycle_noise, seed
    )
    if rank == 0:
        noise = f" plus {moe_cfg.upcycle_noise:g} x std noise" if moe_cfg.upcycle_noise else ""
        print(
            f"upcycled {source}: {len(layers)} MoE layer(s) of {moe_cfg.num_experts} experts, "
            f"each expert a copy of its block's dense FFN{noise}; {len(fresh)} tensor(s) "
            "start fresh (the routers)",
            flush=True,
        )
    return state


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

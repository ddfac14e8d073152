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


# --------------------------------------------------------------------------- train.compile

# What train.compile compiles: the modules with no collective and no data-dependent shape.
# The embedding and the LM head are single ops (nothing to fuse); the MoE layer's routing
# and all-to-all run eager (capacity and row counts change every step).
_COMPILED_KINDS = ("attention", "dense FFN", "norm")


def compile_targets(model) -> list:
    """The modules train.compile compiles: every self-attention, dense MLP and RMSNorm
    outside the MoE layers (a shared expert inside one stays eager with its layer)."""
    from xpar.models.mlp import MLP
    from xpar.models.transformer import RMSNorm, SelfAttention

    inside_moe = {id(m) for layer in moe_layers(model) for m in layer.modules()}
    return [
        m
        for m in model.modules()
        if isinstance(m, (SelfAttention, MLP, RMSNorm)) and id(m) not in inside_moe
    ]


def compile_model(model, device, rank: int) -> int:
    """train.compile=true: torch.compile the non-MoE modules in place (Module.compile, so the
    state_dict keys, the checkpoints and DeepSpeed's view of the params do not change).
    A compiler that cannot run here is an XparConfigError naming train.compile, found by a
    probe now rather than as a traceback in the first step. Returns the count compiled."""
    _probe_compiler(device)
    targets = compile_targets(model)
    for m in targets:
        m.compile()
    if rank == 0:
        print(
            f"train.compile=true: torch.compile on {len(targets)} modules "
            f"({', '.join(_COMPILED_KINDS)}); {len(moe_layers(model))} MoE layer(s) run eager; "
            "the first steps include the compilation",
            flush=True,
        )
    return len(targets)


def _probe_compiler(device) -> None:
    """Compile and run a tiny forward+backward on the device: the compiler toolchain
    (Inductor needs a C++ compiler on CPU, Triton on GPU) works or this names the fix."""
    from xpar.errors import XparConfigError

    def f(x):
        return torch.nn.functional.gelu(x * 2.0).sum()

    try:
        x = torch.ones(8, device=device, requires_grad=True)
        torch.compile(f)(x).backward()
    except Exception as e:  # whatever the backend raises: the user's fix is the same
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise XparConfigError(
            f"train.compile=true but torch.compile fails on this machine ({type(e).__name__}: "
            f"{why}); set train.compile=false"
        ) from e

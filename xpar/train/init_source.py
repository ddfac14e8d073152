"""Where a new run's weights come from (train.init_from): an xpar checkpoint of any EP size,
or `hf:DIR`, a local Hugging Face MoE model (Mixtral, Qwen2-MoE) converted in memory
(xpar.interop.hf_import); with moe.upcycle=true a dense xpar checkpoint whose FFN every
expert copies (xpar.train.upcycle).

Checked when the config is validated (before any process group): the source exists and,
for upcycling, fits; read once the model is built, as whole expert banks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from xpar.errors import XparConfigError

HF_PREFIX = "hf:"
WHERE = "train.init_from"


@dataclass(frozen=True)
class InitSource:
    path: Path  # an xpar step_* directory, or a Hugging Face model directory
    hf: bool = False

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.path}" if self.hf else str(self.path)


def split(value: str) -> tuple[str, bool]:
    """(the directory, whether it names a Hugging Face model)."""
    if value.startswith(HF_PREFIX):
        return os.path.expanduser(value[len(HF_PREFIX) :]), True
    return os.path.expanduser(value), False


def check_value(value: object) -> str | None:
    """Why train.init_from's value names no source (the fix included), or None."""
    if not isinstance(value, str):
        return "give a checkpoint directory, hf:<Hugging Face model directory>, or ''"
    if not value:
        return None
    path, hf = split(value)
    if hf and not os.path.isfile(os.path.join(path, "config.json")):
        return "hf:<dir> names a local Hugging Face model directory holding config.json"
    if not hf and not os.path.isdir(path):
        return (
            "give an existing checkpoint directory (its weights start a new run), "
            "hf:<Hugging Face model directory>, or ''"
        )
    return None


def resolve(value: str) -> InitSource:
    """The source train.init_from names (an xpar run's latest checkpoint for its out_dir)."""
    path, hf = split(value)
    if hf:
        return InitSource(Path(path).resolve(), hf=True)
    from xpar.train.resume import as_checkpoint

    return InitSource(as_checkpoint(value, WHERE))


def check_upcycle(init_from: str, model_cfg, moe_cfg) -> None:
    """moe.upcycle=true: a dense xpar checkpoint to upcycle, whose FFN fits the experts.
    Cheap (reads the run record only): config validation calls it."""
    from xpar.models.config import moe_block_ids
    from xpar.train import upcycle
    from xpar.train.saved_model import configs, saved_run

    if not init_from:
        raise XparConfigError(
            f"{upcycle.WHERE}=true without {WHERE}: upcycling copies a trained dense "
            f"model's FFN into every expert; set {WHERE}=<dense checkpoint> or "
            f"{upcycle.WHERE}=false"
        )
    if split(init_from)[1]:
        raise XparConfigError(
            f"{upcycle.WHERE}=true with {WHERE}={init_from!r}: upcycling starts from a dense "
            "xpar checkpoint, and Hugging Face import reads MoE models; name a dense xpar "
            f"checkpoint or set {upcycle.WHERE}=false"
        )
    if not moe_block_ids(model_cfg, moe_cfg):
        raise XparConfigError(
            f"{upcycle.WHERE}=true with moe.every=0: this model has no MoE layer to upcycle "
            "into; choose an MoE config (e.g. moe=topk) or set moe.upcycle=false"
        )
    where = f"{WHERE}={init_from!r}"
    run = saved_run(resolve(init_from).path, WHERE)
    src_model, src_moe = configs(run)
    upcycle.check_source(moe_block_ids(src_model, src_moe), run["model"]["model"], moe_cfg, where)


def read(source: InitSource) -> tuple[dict[str, torch.Tensor], dict]:
    """(every weight with whole expert banks, the source's run record: step, model and moe
    configs, tokenizer where known)."""
    if source.hf:
        from xpar.interop.hf_import import load_hf

        state, record = load_hf(source.path, f"{WHERE}={source}")
        return state, {"step": 0, **record}
    from xpar.train import checkpoint as ckpt
    from xpar.train.saved_model import full_state

    return full_state(source.path, WHERE), ckpt.read_client_state(source.path)


def describe(record: dict) -> str:
    """What the source was, for the start line: its step, or the Hugging Face model type."""
    hf = record.get("hf_source")
    if hf:
        return f"a Hugging Face {hf['model_type']} model"
    return f"its step {record['step']}"

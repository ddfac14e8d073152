"""Checkpoints for the generate/eval tests: experiment=tiny trained a few steps by the trainer
itself (one gloo rank) on the committed corpus, and its validation loss at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.fixtures import golden
from xpar.testing import run_distributed

STEPS = 4


@dataclass
class Trained:
    checkpoint: str
    val_loss: float  # the trainer's val/loss after the last step
    cache_dir: str
    val_files: list[str]  # the validation split's files (absolute)
    seq_len: int = 64  # experiment=tiny's
    micro_batch_size: int = 2
    eval_batches: int = 2


def _train(rank, world, overrides):
    from xpar.config.store import compose_config
    from xpar.train.trainer import train

    res = train(compose_config(overrides, world_size=world))
    return res.val_loss_after, res.checkpoint


def val_files() -> list[str]:
    from xpar.data import DataConfig, corpus

    c = corpus.discover_corpus(DataConfig(files=golden.CORPUS, val_fraction=0.16))
    return [f.path for f in c.files if f.relpath in set(c.val_files)]


def train_checkpoint(work: Path, cache_dir: Path, *extra: str) -> Trained:
    overrides = [
        "experiment=tiny",
        "data=files",
        *golden.data_overrides(cache_dir),
        f"train.out_dir={work}",
        f"train.steps={STEPS}",
        f"train.ckpt_every={STEPS}",
        "train.eval_every=100",
        "train.resume=never",
        "logger.wandb_mode=disabled",
        *extra,
    ]
    ((val_loss, ckpt),) = run_distributed(_train, 1, overrides, timeout=600)
    return Trained(ckpt, val_loss, str(cache_dir), val_files())

"""A frozen teacher for distillation (train.distill.teacher): any xpar checkpoint, MoE or
dense, saved with any expert-parallel size, rebuilt from the configs its checkpoint records
(xpar.train.saved_model) and sharded over this run's EP group like the student's own experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xpar.errors import XparConfigError
from xpar.train import saved_model

WHERE = "train.distill.teacher"


def saved_run(directory: str | Path, where: str = WHERE) -> dict:
    return saved_model.saved_run(directory, where)


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


def build_teacher(directory: str | Path, groups: Any, device: torch.device):
    """The frozen teacher in eval mode on `device`, its experts over this run's EP group."""
    teacher, _ = saved_model.build_model(
        directory, WHERE, ep_group=groups.ep_group, ep_size=groups.ep_size, ep_rank=groups.ep_rank
    )
    teacher.requires_grad_(False)
    return teacher.to(device).eval()

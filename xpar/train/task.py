"""What the model is trained on: the loss of one batch, in training and in validation.

    lm        causal decoder, next-token cross entropy (model.causal=true)
    mlm       bidirectional encoder, masked-LM cross entropy (model.causal=false)

A task turns a batch of the run's loaders into (loss, MoE reports) for the step, and into
per-batch metrics for validation (averaged over batches and ranks by xpar.train.evaluation;
"loss" is val/loss, any other key k is logged as val/k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from xpar.train.trainer import Run


class LMTask:
    """Next-token prediction: the loader's (inputs, targets shifted by one)."""

    name = "lm"

    def train_loss(self, run: Run, batch, micro: int) -> tuple[torch.Tensor, list]:
        x, y = (t.to(run.device) for t in batch)
        logits, auxes = run.engine(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), auxes

    def val_metrics(self, run: Run, batch) -> tuple[dict[str, float], list]:
        x, y = (t.to(run.device) for t in batch)
        logits, auxes = run.engine(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return {"loss": ce.item()}, auxes


def make_task(cfg, model_cfg, tokenizer) -> LMTask:
    return LMTask()

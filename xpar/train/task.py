"""What the model is trained on: the loss of one batch, in training and in validation.

    lm        the causal decoder: next-token cross entropy
    mlm       the encoder (model.causal=false, task.kind=lm): the masked LM, task.mask_rate
              of each sequence's positions chosen (80/10/10 mask/random/keep by default),
              the loss on those positions only; a row's mask is a function of (seed, step,
              micro-batch, its index in the global batch), so a resumed run masks exactly
              as an uninterrupted one, and any split of the rows over ranks alike
    classify  task.kind=classify: a mean-pooled head over the model's last hidden states
              (xpar.models.classifier), cross entropy over labels; val/accuracy

With train.distill.teacher, lm and mlm learn from a frozen teacher as well:
alpha * tau^2 * KL(teacher || student) + (1 - alpha) * CE on the same targets; the logged
train loss is that mixture, val/loss stays the student's own cross entropy.

A task turns a batch of the run's loaders into (loss, MoE reports) for the step, and into
per-batch metrics for validation (xpar.train.evaluation averages them over batches and
ranks, then `val_summary` turns the means into what is logged: "loss" is val/loss, any other
key k is val/k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from xpar.data.mlm import mask_id_for, mask_tokens, mlm_generator
from xpar.train.objective import (
    classify_loss,
    correct_count,
    distill_loss,
    lm_loss,
    mlm_loss,
)

if TYPE_CHECKING:
    from xpar.train.trainer import Run


class LMTask:
    """Next-token prediction: the loader's (inputs, targets shifted by one)."""

    name = "lm"

    def __init__(self, teacher: Any = None, distill: Any = None) -> None:
        self.teacher, self.distill = teacher, distill

    def inputs_targets(self, run: Run, batch, step: int, micro: int):
        return batch

    def train_loss(self, run: Run, batch, micro: int) -> tuple[torch.Tensor, list]:
        x, y = (t.to(run.device) for t in self.inputs_targets(run, batch, run.step, micro))
        logits, auxes = run.engine(x)
        if self.teacher is None:
            return self.loss(logits, y), auxes
        with torch.no_grad():
            teacher_logits, _ = self.teacher(x)
        d = self.distill
        loss = distill_loss(logits, teacher_logits, y, alpha=d.alpha, temperature=d.temperature)
        return loss, auxes

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, y)

    def prepare_val(self, run: Run, batches: list) -> list:
        return batches

    def val_metrics(self, run: Run, batch) -> tuple[dict[str, float], list]:
        x, y = (t.to(run.device) for t in batch)
        logits, auxes = run.engine(x)
        return {"loss": self.loss(logits, y).item()}, auxes

    def val_summary(self, means: dict[str, float]) -> dict[str, float]:
        return means


class MLMTask(LMTask):
    """The encoder's masked LM over the loader's sequences (its shifted targets unused)."""

    name = "mlm"

    def __init__(self, cfg, tokenizer_vocab: int, model_vocab: int, **kw) -> None:
        super().__init__(**kw)
        t = cfg.task
        self.seed = cfg.train.seed
        self.mask = dict(
            mask_id=mask_id_for(tokenizer_vocab, model_vocab),
            vocab_size=tokenizer_vocab,
            rate=t.mask_rate,
            p_mask=t.mask_token_share,
            p_random=t.mask_random,
        )

    def _masked(self, tokens_BL: torch.Tensor, step: int, micro: int, first_row: int):
        # One generator per row of the global batch, seeded by its index there: the masks do
        # not depend on how the rows are split over ranks (EP/DP parity holds for the MLM).
        rows = [
            mask_tokens(
                tokens_BL[i : i + 1],
                generator=mlm_generator(self.seed, step, micro, first_row + i),
                **self.mask,
            )
            for i in range(tokens_BL.shape[0])
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def inputs_targets(self, run: Run, batch, step: int, micro: int):
        first = run.groups.rank * batch[0].shape[0]
        return self._masked(batch[0], step, micro, first)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mlm_loss(logits, y)

    def prepare_val(self, run: Run, batches: list) -> list:
        # Fixed masks (step -1, the batch's index): every evaluation scores the same positions.
        return [
            self._masked(b[0], -1, i, run.groups.rank * b[0].shape[0])
            for i, b in enumerate(batches)
        ]


class ClassifyTask(LMTask):
    """Sequence classification: batches of (tokens_BL, labels_B)."""

    name = "classify"

    def train_loss(self, run: Run, batch, micro: int) -> tuple[torch.Tensor, list]:
        x, labels = (t.to(run.device) for t in batch)
        logits, auxes = run.engine(x)
        return classify_loss(logits, labels), auxes

    def val_metrics(self, run: Run, batch) -> tuple[dict[str, float], list]:
        x, labels = (t.to(run.device) for t in batch)
        logits, auxes = run.engine(x)
        hit, n = correct_count(logits.float(), labels)
        # Sums, so the split's accuracy is exact however rows fall into batches and ranks.
        metrics = {"loss_sum": classify_loss(logits, labels).item() * int(n)}
        return {**metrics, "correct": float(hit), "counted": float(n)}, auxes

    def val_summary(self, means: dict[str, float]) -> dict[str, float]:
        n = max(means["counted"], 1e-12)
        return {"loss": means["loss_sum"] / n, "accuracy": means["correct"] / n}


def make_task(cfg, model_cfg, tokenizer, teacher: Any = None) -> LMTask:
    kw = dict(teacher=teacher, distill=cfg.train.distill)
    if cfg.task.kind == "classify":
        return ClassifyTask()
    if not model_cfg.causal:
        return MLMTask(cfg, tokenizer.vocab_size, model_cfg.vocab_size, **kw)
    return LMTask(**kw)


# --------------------------------------------------------------------------- classify data


@dataclass
class ClassifyStats:
    """What the trainer's data line says about a classification run."""

    line: str
    cache_hit: bool = True
    build_s: float = 0.0

    def summary(self) -> str:
        return self.line


@dataclass
class ClassifyBundle:
    """The classification counterpart of xpar.data.build.DataBundle."""

    tokenizer: Any
    train: Any
    val: Any
    stats: ClassifyStats
    num_classes: int
    pad_id: int

    def val_batches(self, n: int) -> list:
        # The first n batches (train.eval_batches), at most the whole split, each row once.
        return self.val.batches(min(n, self.val.full_epoch_batches()), mask_repeats=True)


def build_classify_data(cfg, rank: int, world_size: int) -> ClassifyBundle:
    """The task's jsonl files (or the shipped stdlib_code task, built on first use into the
    data cache) tokenised with data.tokenizer; pads with the first id past its vocabulary."""
    import os

    from xpar.data import cache
    from xpar.data.classify import ClassifyLoader, ClassifyValLoader, load_classify_data
    from xpar.data.tokenizer import build_tokenizer

    t, d = cfg.task, cfg.data
    tokenizer = build_tokenizer(d.tokenizer)
    train_file, val_file, origin = t.train_file, t.val_file, "task.train_file"
    if t.shipped:
        from xpar.data.tasks.stdlib_code import ensure_task

        root = os.path.abspath(os.path.expanduser(d.cache_dir or cache.default_cache_dir()))
        directory, _ = ensure_task(root)
        train_file = os.path.join(directory, "train.jsonl")
        val_file = os.path.join(directory, "val.jsonl")
        origin = f"the shipped stdlib_code task ({directory})"
    pad_id = tokenizer.vocab_size
    data = load_classify_data(
        train_file,
        val_file,
        tokenizer,
        seq_len=d.seq_len,
        pad_id=pad_id,
        text_field=t.text_field,
        label_field=t.label_field,
    )
    # The files list rows by label; a fixed shuffle makes the first train.eval_batches
    # validation batches a sample of every class, not of the first one.
    _shuffle_rows(data.val, seed=0)
    shard = dict(rank=rank, world_size=world_size, micro_batch_size=cfg.train.micro_batch_size)
    return ClassifyBundle(
        tokenizer=tokenizer,
        train=ClassifyLoader(data.train, seed=cfg.train.seed, **shard),
        val=ClassifyValLoader(data.val, **shard),
        stats=ClassifyStats(f"{data.summary()}; from {origin}"),
        num_classes=data.num_classes,
        pad_id=pad_id,
    )


def _shuffle_rows(split, seed: int) -> None:
    import numpy as np

    order = np.random.default_rng(seed).permutation(split.num_rows)
    split.tokens_NL = split.tokens_NL[order]
    split.labels_N = split.labels_N[order]
    split.lengths_N = split.lengths_N[order]

"""TaskConfig (what the model is trained on) and DistillConfig (train.distill): typed
config nodes that validate themselves. Pure Python, no torch.

    task.kind=lm        the LM objective of the model: next-token prediction for a causal
                        decoder; for a bidirectional encoder (model.causal=false) the masked
                        LM: task.mask_rate of the positions chosen, of which task.mask_random
                        get a random token, task.mask_keep keep theirs and the rest become
                        the mask token (BERT's 15%, 80/10/10 by default)
    task.kind=classify  sequence classification from task.train_file / task.val_file (jsonl
                        with task.text_field and task.label_field); train_file="" is the
                        shipped stdlib_code task (xpar.data.tasks.stdlib_code), built on
                        demand into the data cache
    train.distill       teacher="" is off; else a checkpoint directory whose logits the
                        student learns from: alpha * tau^2 * KL(teacher || student at tau)
                        + (1 - alpha) * cross entropy (xpar.train.objective.distill_loss)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xpar.config.checks import bad, is_finite, need_choice, need_positive, need_str

TASK_KINDS = ("lm", "classify")


def _need_share(prefix: str, obj: object, name: str, fix: str) -> None:
    v = getattr(obj, name)
    if not is_finite(v) or not 0.0 <= v <= 1.0:
        raise bad(prefix, name, v, fix)


def _need_path(prefix: str, obj: object, name: str, fix: str) -> None:
    """A string: "" or an existing file."""
    v = getattr(obj, name)
    if not isinstance(v, str) or (v and not os.path.isfile(os.path.expanduser(v))):
        raise bad(prefix, name, v, fix)


@dataclass
class TaskConfig:
    """The task node: the objective, its masking, and the classification data."""

    kind: str = "lm"  # lm (next token, or masked LM for an encoder) | classify
    mask_rate: float = 0.15  # masked LM: share of the positions predicted
    mask_random: float = 0.1  # of those: share given a random token
    mask_keep: float = 0.1  # of those: share keeping their token (the rest: the mask token)
    train_file: str = ""  # classify: jsonl; "" = the shipped stdlib_code task
    val_file: str = ""  # classify: jsonl (required with train_file)
    text_field: str = "text"
    label_field: str = "label"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mask_token_share(self) -> float:
        """Of the chosen positions, the share replaced by the mask token."""
        return 1.0 - self.mask_random - self.mask_keep

    @property
    def shipped(self) -> bool:
        """Classification on the shipped stdlib_code task."""
        return self.kind == "classify" and not self.train_file

    def validate(self, prefix: str = "task") -> None:
        need_choice(prefix, self, "kind", TASK_KINDS)
        r = self.mask_rate
        if not is_finite(r) or not 0.0 < r <= 1.0:
            raise bad(prefix, "mask_rate", r, "use a share of the positions in (0, 1], e.g. 0.15")
        for name in ("mask_random", "mask_keep"):
            _need_share(prefix, self, name, "use a share of the masked positions in [0, 1]")
        if self.mask_random + self.mask_keep > 1.0:
            raise bad(
                prefix,
                "mask_keep",
                self.mask_keep,
                f"{prefix}.mask_random + {prefix}.mask_keep = "
                f"{self.mask_random + self.mask_keep:g} is "
                "over 1: together they are a share of the masked positions (BERT: 0.1 and 0.1, "
                "leaving 0.8 for the mask token)",
            )
        fix = "give an existing jsonl file, or '' for the shipped stdlib_code task"
        _need_path(prefix, self, "train_file", fix)
        _need_path(prefix, self, "val_file", "give an existing jsonl file (with task.train_file)")
        need_str(prefix, self, "text_field", "name the jsonl field holding the text")
        need_str(prefix, self, "label_field", "name the jsonl field holding the label")
        self._check_files(prefix)

    def _check_files(self, prefix: str) -> None:
        if self.kind != "classify":
            for name in ("train_file", "val_file"):
                if getattr(self, name):
                    raise bad(
                        prefix,
                        name,
                        getattr(self, name),
                        "only task.kind=classify reads it; set task.kind=classify or ''",
                    )
            return
        if self.train_file and not self.val_file:
            raise bad(
                prefix,
                "val_file",
                self.val_file,
                "task.train_file needs a validation file: give one (jsonl, same fields)",
            )
        if self.val_file and not self.train_file:
            raise bad(
                prefix,
                "train_file",
                self.train_file,
                "task.val_file needs its train file: give one, or clear both for the shipped "
                "stdlib_code task",
            )

    def notes(self, causal: bool) -> list[str]:
        """Settings this run ignores (for the config's warnings): the masking under a
        causal decoder's LM objective."""
        default = TaskConfig()
        changed = [
            n
            for n in ("mask_rate", "mask_random", "mask_keep")
            if getattr(self, n) != getattr(default, n)
        ]
        if causal and self.kind == "lm" and changed:
            return [
                f"task.{', task.'.join(changed)} set but ignored: model.causal=true trains on "
                "next-token prediction (masking is for the encoder, model.causal=false)"
            ]
        return []


@dataclass
class DistillConfig:
    """train.distill: a frozen teacher's soft targets mixed into the student's loss."""

    teacher: str = ""  # a checkpoint directory; "" = no distillation
    alpha: float = 0.5  # weight of the teacher's term (1 - alpha: the labels')
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by tau^2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def validate(self, prefix: str = "train.distill") -> None:
        t = self.teacher
        if not isinstance(t, str) or (t and not os.path.isdir(os.path.expanduser(t))):
            raise bad(
                prefix,
                "teacher",
                t,
                "give an existing checkpoint directory (a step_* directory of an xpar run), "
                "or '' for no distillation",
            )
        _need_share(
            prefix, self, "alpha", "use a weight in [0, 1] (1: the teacher only, 0: labels only)"
        )
        need_positive(prefix, self, "temperature", "use a temperature > 0, e.g. 1 or 2")

"""Loss functions of the training objectives: pure functions of logits and targets.

    lm_loss        next-token cross entropy (the decoder)
    mlm_loss       cross entropy over the masked positions only (the encoder)
    classify_loss  sequence classification cross entropy; accuracy, correct_count
    distill_loss   alpha * tau^2 * KL(teacher || student at tau) + (1 - alpha) * CE(student)

Everything is computed in float32 whatever the logits' dtype. Targets equal to IGNORE (-100)
count nowhere; a batch where every target is ignored gives a loss of 0 (with a gradient of
0), never NaN, except lm_loss, which keeps torch's mean exactly (the decoder's targets are
never ignored, and the golden loss curve stays bitwise).

Shape suffixes: B batch, L sequence, V vocab, C classes, N flattened positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss(logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the targets that are not IGNORE."""
    return F.cross_entropy(
        logits_BLV.float().flatten(0, -2), targets_BL.flatten(), ignore_index=IGNORE
    )


def _mean_ce(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed over the kept targets, divided by their count (at least 1)."""
    total = F.cross_entropy(logits_NV.float(), targets_N, ignore_index=IGNORE, reduction="sum")
    return total / (targets_N != IGNORE).sum().clamp(min=1)


def mlm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the masked positions (labels != IGNORE); 0 when none is.

    Takes any leading shape: [B, L, V] with [B, L], or logits gathered at the masked
    positions [N, V] with their labels [N]."""
    return _mean_ce(logits_BLV.flatten(0, -2), labels_BL.flatten())


def classify_loss(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the sequences whose label is not IGNORE; 0 when none is."""
    return _mean_ce(logits_BC, labels_B)


def correct_count(
    logits_BC: torch.Tensor, labels_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted): argmax hits and labels that are not IGNORE, as int64 scalars;
    sums of these over batches and ranks give the exact accuracy of a split."""
    kept_B = labels_B != IGNORE
    hit_B = (logits_BC.argmax(dim=-1) == labels_B) & kept_B
    return hit_B.sum(), kept_B.sum()


def accuracy(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Share of argmax hits over the labels that are not IGNORE (float32); 0 when none is."""
    hit, n = correct_count(logits_BC, labels_B)
    return hit.float() / n.clamp(min=1).float()


def distill_parts(
    student_NV: torch.Tensor,
    teacher_NV: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, ce) for distill_loss: kl = tau^2 * mean over kept tokens of
    KL(softmax(teacher/tau) || softmax(student/tau)); ce = mean CE of the student at tau=1.

    Any leading shape (flattened); the teacher is detached. A token is kept when its target
    is not IGNORE (the masked positions of an MLM batch, every position of an LM batch)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    v = student_NV.shape[-1]
    if teacher_NV.shape != student_NV.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_NV.shape)} and student logits "
            f"{tuple(student_NV.shape)} differ: distillation needs the same vocabulary"
        )
    s_NV = student_NV.float().reshape(-1, v)
    t_NV = teacher_NV.detach().float().reshape(-1, v)
    y_N = targets_N.reshape(-1)
    kept_N = (y_N != IGNORE).float()
    log_s_NV = F.log_softmax(s_NV / temperature, dim=-1)
    log_t_NV = F.log_softmax(t_NV / temperature, dim=-1)
    # KL(t || s) = sum_v t (log t - log s); log_target keeps 0 * log 0 out of it.
    kl_N = F.kl_div(log_s_NV, log_t_NV, log_target=True, reduction="none").sum(-1)
    kl = (kl_N * kept_N).sum() / kept_N.sum().clamp(min=1) * temperature**2
    return kl, _mean_ce(s_NV, y_N)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * kl + (1 - alpha) * ce, the two terms of distill_parts (Hinton et al., 2015:
    the tau^2 keeps the soft term's gradient scale independent of tau)."""
    kl, ce = distill_parts(student_logits, teacher_logits, targets, temperature=temperature)
    return alpha * kl + (1.0 - alpha) * ce

"""Sequence classification on a Transformer backbone: mean of the final hidden states over
the non-pad positions, then one linear head.

    clf = SequenceClassifier(MoETransformer(model_cfg, moe_cfg), num_classes=8, pad_id=p)
    logits_BC, aux_list = clf(tokens_BL)
    missing, unexpected = load_backbone_state(clf, lm_state_dict)   # train.init_from

The backbone keeps the plain LM's parameter names under "backbone." and drops its LM head
(the classifier never uses it, and an unused parameter would get no gradient), so an LM
checkpoint's weights load into it one to one; the LM head's weights are the one thing
skipped and the classifier head the one thing left fresh.

Pads are left out of the pooling, not out of attention: a causal backbone with pads at the
end gives logits that do not depend on the padding; a bidirectional one lets the non-pad
positions attend to pads (there is no attention mask), so its logits depend on how many.

Single-device code: no torch.distributed here.
Shape suffixes: B batch, L sequence, D model dim, C classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.models.transformer import MoETransformer

PREFIX = "backbone."
HEAD_KEYS = ("head.weight", "head.bias")
LM_HEAD = "lm_head."


def mean_pool(h_BLD: torch.Tensor, keep_BL: torch.Tensor) -> torch.Tensor:
    """Mean of h over the kept positions of each row, in float32; zeros for a row with none."""
    w_BL1 = keep_BL.unsqueeze(-1).float()
    return (h_BLD.float() * w_BL1).sum(1) / w_BL1.sum(1).clamp(min=1.0)


class SequenceClassifier(nn.Module):
    """forward(tokens_BL) -> (logits_BC, aux_list): aux_list as the backbone's (one MoEAux
    per MoE block); positions holding pad_id are left out of the mean."""

    def __init__(
        self,
        backbone: MoETransformer,
        num_classes: int,
        pad_id: int,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.backbone = backbone
        # Unused here; None keeps it out of parameters() and state_dict().
        self.backbone.lm_head = None
        self.pad_id = int(pad_id)
        self.num_classes = int(num_classes)
        d = backbone.model_cfg.d_model
        self.head = nn.Linear(d, num_classes)
        self.init_std = backbone.model_cfg.init_std if init_std is None else float(init_std)
        self.reset_head()

    @property
    def model_cfg(self):
        return self.backbone.model_cfg

    @property
    def moe_cfg(self):
        return self.backbone.moe_cfg

    @torch.no_grad()
    def reset_head(self) -> None:
        nn.init.normal_(self.head.weight, std=self.init_std)
        nn.init.zeros_(self.head.bias)

    def pooled(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(pooled_BD in float32, aux_list)."""
        h_BLD, aux_list = self.backbone.hidden(tokens_BL)
        return mean_pool(h_BLD, tokens_BL != self.pad_id), aux_list

    def forward(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, list]:
        pooled_BD, aux_list = self.pooled(tokens_BL)
        # Under autocast the head runs in the autocast dtype; outside it, in its own.
        return self.head(pooled_BD.to(self.head.weight.dtype)), aux_list


def load_backbone_state(
    classifier: SequenceClassifier,
    lm_state_dict: Mapping[str, torch.Tensor],
    *,
    where: str = "train.init_from",
) -> tuple[list[str], list[str]]:
    """Copy an LM's weights (MoETransformer.state_dict() names) into the backbone.

    Returns (missing, unexpected): the classifier keys left as they are (the fresh head) and
    the LM keys skipped (its LM head). Anything else that does not match (another depth,
    width or expert count) is a config error naming the first such key, under `where`.
    """
    own = classifier.state_dict()
    mapped = {PREFIX + k: v for k, v in lm_state_dict.items() if not k.startswith(LM_HEAD)}
    unexpected = sorted(k for k in lm_state_dict if k.startswith(LM_HEAD))
    extra = sorted(k for k in mapped if k not in own)
    absent = sorted(k for k in own if k.startswith(PREFIX) and k not in mapped)
    if extra or absent:
        what = (
            f"{extra[0][len(PREFIX) :]!r} has no place in"
            if extra
            else f"{absent[0]!r} is missing from"
        )
        raise XparConfigError(
            f"{where}: the checkpoint's weights do not fit the classifier's backbone: {what} "
            f"it ({len(extra)} extra, {len(absent)} missing); initialise from an LM with this "
            "run's model and moe configs"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise XparConfigError(
                f"{where}: {k[len(PREFIX) :]!r} has shape {tuple(v.shape)} in the checkpoint but "
                f"{tuple(own[k].shape)} in the classifier's backbone; initialise from an LM with "
                "this run's model and moe configs (and parallel.ep_size)"
            )
    result = classifier.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    missing = sorted(result.missing_keys)
    assert set(missing) <= set(HEAD_KEYS), missing
    return missing, unexpected


def describe_load(loaded: int, missing: list[str], unexpected: list[str]) -> str:
    """One line for the console after load_backbone_state."""
    skipped = ", ".join(unexpected) or "nothing"
    fresh = ", ".join(missing) or "nothing"
    return (
        f"classifier: {loaded} backbone tensors loaded; skipped {skipped} (the LM head); "
        f"fresh {fresh}"
    )

"""What generate and eval share: a checkpoint's model (any EP layout, one process) and the
tokenizer its run trained with, rebuilt from the run record (local files only)."""

from __future__ import annotations

import os

import torch

from xpar.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from xpar.errors import XparConfigError
from xpar.models import MoETransformer


def run_tokenizer(run: dict, override: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer the run record names (its data.tokenizer spec), or `override` (a moved
    copy of it); refused unless its content fingerprint is the recorded one."""
    rec = run.get("tokenizer")
    if not isinstance(rec, dict) or "spec" not in rec:
        raise XparConfigError(
            "checkpoint: the run record names no tokenizer (written by an older xpar); "
            "name a checkpoint of a run made by this version"
        )
    spec = override or rec["spec"]
    try:
        tok = build_tokenizer(spec)
    except XparConfigError as e:
        raise XparConfigError(
            f"--tokenizer={spec!r}: the checkpoint's tokenizer cannot be built ({e}); "
            "pass --tokenizer DIR naming a local copy of the run's tokenizer.json"
        ) from e
    want = rec.get("fingerprint")
    if want is not None and tok.fingerprint != want:
        raise XparConfigError(
            f"--tokenizer={spec!r} is not the tokenizer the run trained with (fingerprint "
            f"{tok.fingerprint}, recorded {want}); pass --tokenizer DIR naming the run's own "
            "tokenizer.json"
        )
    return tok


def check_language_model(state: dict[str, torch.Tensor], checkpoint: str) -> None:
    """Refuse a sequence classifier's weights (task.kind=classify): its backbone has no
    language model head, so it gives class logits, never next-token ones."""
    from xpar.models.classifier import HEAD_KEYS, PREFIX

    if any(k.startswith(PREFIX) for k in state) or any(k in state for k in HEAD_KEYS):
        raise XparConfigError(
            f"checkpoint={checkpoint!r} is a sequence classifier's (task.kind=classify): it "
            "has a class head and no language model head, so it cannot generate or score "
            "text; use a language model's checkpoint (task.kind=lm)"
        )


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise XparConfigError("--device=cuda is invalid: no CUDA device here; use --device cpu")
    return torch.device(name)


def load_checkpoint(
    checkpoint: str, device: torch.device, tokenizer: str | None = None
) -> tuple[MoETransformer, dict, ByteTokenizer | HFTokenizer]:
    """(the whole model on `device` in eval mode, the run record, its tokenizer); a
    classifier's checkpoint is refused."""
    from xpar.train import saved_model

    if not torch.cuda.is_available():
        # Reading a rank file imports DeepSpeed, whose accelerator probe would otherwise log
        # "Setting accelerator to CPU" onto stdout, into the generated text; the same choice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    where = "checkpoint"
    run = saved_model.saved_run(checkpoint, where)
    # One read of the weights, checked to be a language model's before the model is built.
    state = saved_model.full_state(checkpoint, where)
    check_language_model(state, checkpoint)
    model = MoETransformer(*saved_model.configs(run), ep_group="local")
    model.load_state_dict(state)
    model.eval()
    tok = run_tokenizer(run, tokenizer)
    if tok.vocab_size > model.model_cfg.vocab_size:
        raise XparConfigError(
            f"checkpoint: its tokenizer has {tok.vocab_size} ids but the model "
            f"model.vocab_size={model.model_cfg.vocab_size}; the checkpoint and tokenizer "
            "do not belong together"
        )
    return model.to(device), run, tok

"""`xpar generate CHECKPOINT --prompt TEXT`: sample a continuation from a causal decoder.

The prompt is read as the start of a document: it follows the end-of-document id, as every
document but the corpus's first does in training. With the KV cache (the default) the
prompt runs once (prefill) and each further token is one position through the model;
--no-cache recomputes the whole sequence for every token (the reference the cache is
tested against). Decoded text streams to stdout as tokens arrive; stderr gets one line
of tokens, seconds and tokens/s at the end. Generation stops at max-new-tokens or at the
end-of-document id (unless --ignore-eod).

Several prompts (--prompt and --prompt-file repeated, --prompt-lines FILE with one prompt a
line) run one at a time, in the order given, each from a fresh generator seeded by --seed:
a prompt's continuation is the one it gets alone. Nothing is batched.

MoE layers run dropless here (no capacity): with a capacity, which tokens an expert drops
depends on how many tokens share the forward, so the prompt's prefill, a one-token decode
step and a full recomputation would route differently.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from xpar.errors import XparConfigError
from xpar.models import MoETransformer


@contextlib.contextmanager
def dropless(model: torch.nn.Module) -> Iterator[None]:
    """Every MoE layer of `model` without capacity for the duration (then as it was)."""
    from xpar.moe import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    saved = [m.cfg for m in layers]
    for m in layers:
        m.cfg = dataclasses.replace(m.cfg, capacity_factor=None, eval_capacity_factor=None)
    try:
        yield
    finally:
        for m, cfg in zip(layers, saved, strict=True):
            m.cfg = cfg


def check_decoder(model: MoETransformer) -> None:
    if not model.model_cfg.causal:
        raise XparConfigError(
            "model.causal=False: this checkpoint is a bidirectional encoder (trained as a "
            "masked LM), which cannot generate text left to right; use a causal decoder's "
            "checkpoint (model.causal=true), or score text with xpar eval"
        )


def check_room(n_prompt: int, max_new_tokens: int, max_seq_len: int, which: str = "") -> None:
    if n_prompt + max_new_tokens > max_seq_len:
        raise XparConfigError(
            f"--max-new-tokens={max_new_tokens} with {which or 'a prompt'} of {n_prompt} tokens "
            f"exceeds model.max_seq_len={max_seq_len}; ask for at most "
            f"{max(max_seq_len - n_prompt, 0)} new tokens or shorten the prompt"
        )


def sample_next(
    logits_V: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """One id from last-position logits: greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k ids (0: all) and the smallest set reaching top_p mass (1: all)."""
    logits_V = logits_V.float().cpu()  # a CPU generator: the same draws on any device
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs_V.sort(descending=True)
        # Keep an id while the mass before it is below top_p (the first one always).
        drop = (p_sorted.cumsum(0) - p_sorted) >= top_p
        probs_V = probs_V.clone()
        probs_V[order[drop]] = 0.0
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate(  # noqa: PLR0913 -- the decoding knobs, keyword-only and named
    model: MoETransformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The new ids after `prompt_ids` (at most max_new_tokens; it stops after an id in
    stop_ids). vocab_size: sample only ids below it (the tokenizer's; the model's vocabulary
    may be padded past it). on_token(id) is called as each id is chosen."""
    check_decoder(model)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("generate needs at least one prompt id (e.g. the end-of-document id)")
    cfg = model.model_cfg
    check_room(len(prompt), max_new_tokens, cfg.max_seq_len)
    device = model.tok_emb.weight.device
    limit = vocab_size or cfg.vocab_size
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    was_training = model.training
    model.eval()
    try:
        with dropless(model):
            cache = model.new_cache(1, len(prompt) + max_new_tokens) if use_cache else None
            feed = prompt
            while True:
                logits, _ = model(torch.tensor([feed], device=device), cache)
                nxt = sample_next(
                    logits[0, -1, :limit],
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                )
                out.append(nxt)
                if on_token is not None:
                    on_token(nxt)
                if len(out) == max_new_tokens or nxt in stop_ids:
                    break
                # With the cache only the new token goes in; without, the whole sequence.
                feed = [nxt] if use_cache else prompt + out
    finally:
        model.train(was_training)
    return out


class TextStream:
    """Writes the decoded text of a growing id list as it grows. Decodes the whole list
    each time (a token's text can depend on its neighbours), and holds back a trailing
    U+FFFD: a UTF-8 character split over byte tokens is not finished yet."""

    def __init__(self, tokenizer, write: Callable[[str], object]) -> None:
        self.tok, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._show(text)

    def close(self) -> None:
        self._show(self.tok.decode(self.ids))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            self.write(text[len(self.shown) :])
        else:  # a decode that rewrote earlier text (rare): write only what is new
            self.write(text[len(os.path.commonprefix([text, self.shown])) :])
        self.shown = text


class _AddPrompt(argparse.Action):
    """--prompt, --prompt-file and --prompt-lines into one list of (flag, value), in the
    order given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), (option_string, values)])


def read_prompts(sources: list[tuple[str, str]]) -> list[str]:
    """The prompt texts of the command line's sources; no source: one empty prompt (the
    continuation of a document start)."""
    prompts: list[str] = []
    for flag, value in sources:
        if flag == "--prompt":
            prompts.append(value)
            continue
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if flag == "--prompt-file":
            prompts.append(text)
            continue
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise XparConfigError(
                f"--prompt-lines={value!r} holds no prompt (every line is blank); put one "
                "prompt on each line"
            )
        prompts += lines
    return prompts or [""]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xpar generate",
        description="Sample a continuation of a prompt from a causal decoder's checkpoint "
        "(any expert-parallel layout; one process). Several prompts run one at a time, in "
        "the order given (not batched), each seeded by --seed as if it ran alone; each "
        "prompt's text and continuation go to stdout followed by a newline.",
    )
    p.add_argument("checkpoint", help="a step_* directory, a checkpoints/ dir or a run's out_dir")
    kw = dict(dest="prompts", action=_AddPrompt, default=[])
    p.add_argument("--prompt", **kw, help="a prompt's text (repeat for several)")
    p.add_argument("--prompt-file", **kw, help="a file whose whole text is one prompt (repeatable)")
    p.add_argument(
        "--prompt-lines", **kw, help="a file with one prompt a line (blank lines skipped)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the sequence per token")
    p.add_argument("--ignore-eod", action="store_true", help="go on past end-of-document")
    p.add_argument(
        "--tokenizer", default=None, help="a local copy of the run's tokenizer (if it moved)"
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise XparConfigError(f"--max-new-tokens={args.max_new_tokens} is invalid: use >= 0")
    if not args.temperature >= 0:
        raise XparConfigError(
            f"--temperature={args.temperature} is invalid: use 0 (greedy) or a number > 0"
        )
    if args.top_k < 0:
        raise XparConfigError(f"--top-k={args.top_k} is invalid: use 0 (all ids) or k >= 1")
    if not 0 < args.top_p <= 1:
        raise XparConfigError(f"--top-p={args.top_p} is invalid: use a mass in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    from xpar.infer.common import load_checkpoint, pick_device

    args = parser().parse_args(argv)
    try:
        _check_args(args)
        prompts = read_prompts(args.prompts)
        model, _, tok = load_checkpoint(args.checkpoint, pick_device(args.device), args.tokenizer)
        check_decoder(model)
        all_ids = [[tok.eod_id, *(int(i) for i in tok.encode(p))] for p in prompts]
        for n, ids in enumerate(all_ids, 1):  # refuse before any text is written
            which = f"prompt {n} of {len(all_ids)}" if len(all_ids) > 1 else ""
            check_room(len(ids), args.max_new_tokens, model.model_cfg.max_seq_len, which)
        for n, (prompt, ids) in enumerate(zip(prompts, all_ids, strict=True), 1):
            label = f"prompt {n}/{len(prompts)}: " if len(prompts) > 1 else ""
            _generate_one(model, tok, prompt, ids, args, label)
    except (XparConfigError, OSError) as e:
        print(f"xpar generate: {e}", file=sys.stderr)
        return 2
    return 0


def _generate_one(model, tok, prompt: str, ids: list[int], args, label: str) -> None:
    """Stream one prompt's continuation to stdout; its speed line to stderr."""
    out = sys.stdout
    out.write(prompt)
    out.flush()
    stream = TextStream(tok, lambda s: (out.write(s), out.flush()))
    t0 = time.perf_counter()
    new = generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
        use_cache=not args.no_cache,
        vocab_size=tok.vocab_size,
        stop_ids=() if args.ignore_eod else (tok.eod_id,),
        on_token=stream.add,
    )
    seconds = time.perf_counter() - t0
    stream.close()
    out.write("\n")
    out.flush()
    cache = "no cache" if args.no_cache else "KV cache"
    print(
        f"{label}generated {len(new)} tokens in {seconds:.3f}s, "
        f"{len(new) / max(seconds, 1e-9):.1f} tokens/s (prompt {len(ids)} tokens, {cache}, "
        f"{args.device})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())

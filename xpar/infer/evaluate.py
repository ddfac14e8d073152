"""`xpar eval CHECKPOINT --data FILES...`: loss, perplexity and expert load of a checkpoint on
local text files, in one process or under torchrun (gloo on CPU, nccl on CUDA).

Every given file is scored, none held out: the files are read, tokenized (the run's own
tokenizer) and packed exactly as the trainer's data pipeline does (xpar.data: documents in
corpus order, each followed by the end-of-document id, blocks of seq_len + 1), so a run's
validation files at its seq_len give its validation loss. The token stream is cached under
the data cache (data.cache_dir's default) like the trainer's.

Batches of --batch-size blocks in stored order; batch g is scored by rank g % world. The
loss is the cross entropy summed over every scored token divided by their count (the
all-reduced sums), the same however the batches fall to ranks. The model runs as the
trainer validates it: eval mode, the MoE layers' eval capacity (moe.eval_capacity_factor).
The expert load is every MoE layer's tokens per expert over all scored tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

from xpar.errors import XparConfigError

EVAL_CACHE_VERSION = 1


def eval_blocks(files: list[str], tokenizer, seq_len: int, cache_dir: str = "") -> np.ndarray:
    """[N, seq_len + 1] blocks of every document of `files` (all of them, none held out),
    tokenized and packed as the trainer's pipeline does; the stream is cached (file lock)."""
    from xpar.data import cache, corpus, packing
    from xpar.data.config import DataConfig

    data_cfg = DataConfig(files=list(files), tokenizer="byte", seq_len=seq_len, max_files=0)
    root = os.path.abspath(os.path.expanduser(cache_dir or cache.default_cache_dir()))
    corp = corpus.discover_corpus(data_cfg, exclude_dir=root)
    # One split holding every file: the trainer's validation side, read the same way.
    corp = dataclasses.replace(corp, val_files=[f.relpath for f in corp.files])
    key = cache.cache_key(
        {
            "eval": EVAL_CACHE_VERSION,
            "corpus": corp.fingerprint(),
            "tokenizer": tokenizer.fingerprint,
        }
    )

    def build(tmp: str) -> dict:
        bad = corpus.not_text_files(corp)
        if bad:
            names = ", ".join(f"{rel!r} ({why})" for rel, why in bad[:3])
            raise XparConfigError(
                f"--data: {len(bad)} file(s) not text: {names}; give text, json or parquet files"
            )
        parts = corpus.load_split_datasets(corp, os.path.join(root, "hf"))
        path = os.path.join(tmp, "eval.bin")
        return packing.write_token_stream(
            corpus.iter_documents(parts["validation"]), tokenizer, path
        )

    directory, meta, _ = cache.build_or_load(os.path.join(root, "eval_tokens"), key, build)
    stream = packing.read_token_stream(
        os.path.join(directory, "eval.bin"), meta["dtype"], meta["tokens"]
    )
    blocks = packing.blocks_view(stream, seq_len)
    if len(blocks) == 0:
        raise XparConfigError(
            f"--seq-len={seq_len} leaves no block: --data holds {meta['tokens']} tokens, "
            "fewer than seq_len + 1; give more text or a shorter --seq-len"
        )
    return blocks


@dataclasses.dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int  # targets scored
    batches: int
    seq_len: int
    # Per MoE layer (block order): tokens per expert as fractions of the layer's assignments,
    # and max / mean of the counts (1.0 is perfectly even).
    expert_load: list[list[float]]
    max_over_mean: list[float]

    def lines(self) -> list[str]:
        out = [
            f"loss {self.loss:.6f}  perplexity {self.perplexity:.4f}  tokens {self.tokens:,}  "
            f"({self.batches} batches of seq_len {self.seq_len})"
        ]
        for i, (load, mm) in enumerate(zip(self.expert_load, self.max_over_mean, strict=True)):
            fr = " ".join(f"{x:.3f}" for x in load)
            out.append(f"moe layer {i}: max/mean {mm:.3f}  tokens per expert {fr}")
        return out


@torch.no_grad()
def score(
    model: torch.nn.Module,
    blocks: np.ndarray,
    batch_size: int,
    *,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """The loss over `blocks` (this rank's share; the sums all-reduced when world_size > 1)."""
    import torch.nn.functional as F

    from xpar.data.loader import _to_batch

    n_batches = math.ceil(len(blocks) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    model.eval()
    loss_sum, tokens = 0.0, 0
    load_LE = None
    for g in range(rank, n_batches, world_size):
        x, y = (t.to(device) for t in _to_batch(blocks[g * batch_size : (g + 1) * batch_size]))
        logits, auxes = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="sum")
        loss_sum += float(ce.double())
        tokens += y.numel()
        if auxes:
            now = torch.stack([a.tokens_per_expert.detach().double().cpu() for a in auxes])
            load_LE = now if load_LE is None else load_LE + now
    n_layers = sum(1 for b in getattr(model, "blocks", []) if getattr(b, "is_moe", False))
    E = model.moe_cfg.num_experts if n_layers else 0
    if load_LE is None:
        load_LE = torch.zeros(n_layers, E, dtype=torch.float64)
    values = torch.tensor(
        [loss_sum, float(tokens), *load_LE.reshape(-1).tolist()], dtype=torch.float64
    )
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    loss_sum, tokens = float(values[0]), int(values[1])
    load_LE = values[2:].view(n_layers, E)
    loss = loss_sum / max(tokens, 1)
    fractions = load_LE / load_LE.sum(dim=1, keepdim=True).clamp_min(1e-12)
    mm = load_LE.max(dim=1).values / load_LE.mean(dim=1).clamp_min(1e-12) if E else []
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        tokens=tokens,
        batches=n_batches,
        seq_len=int(blocks.shape[1] - 1),
        expert_load=fractions.tolist(),
        max_over_mean=[float(v) for v in mm],
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xpar eval",
        description="Loss, perplexity and expert load of a checkpoint on local text files "
        "(one process, or torchrun --nproc-per-node N -m xpar.infer.evaluate ...).",
    )
    p.add_argument("checkpoint", help="a step_* directory, a checkpoints/ dir or a run's out_dir")
    p.add_argument("--data", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: the run's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--max-batches", type=int, default=0, help="score at most this many (0: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--cache-dir", default="", help="token cache root (default: xpar's)")
    p.add_argument(
        "--tokenizer", default=None, help="a local copy of the run's tokenizer (if it moved)"
    )
    return p


def _dist_setup(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call made the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world, True


def main(argv: list[str] | None = None) -> int:
    from xpar.infer.common import load_checkpoint, pick_device

    args = parser().parse_args(argv)
    made = False
    try:
        for name in ("seq_len", "batch_size", "max_batches"):
            v, lo = getattr(args, name), 1 if name == "batch_size" else 0
            if v < lo:
                flag = "--" + name.replace("_", "-")
                raise XparConfigError(f"{flag}={v} is invalid: use an integer >= {lo}")
        device = pick_device(args.device)
        rank, world, made = _dist_setup(args.device)
        if args.device == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model, run, tok = load_checkpoint(args.checkpoint, device, args.tokenizer)
        if not model.model_cfg.causal:
            raise XparConfigError(
                "model.causal=False: this checkpoint is an encoder (masked LM); xpar eval "
                "scores next-token prediction, which needs a causal decoder"
            )
        seq_len = args.seq_len or int(run.get("training", {}).get("data", {}).get("seq_len", 0))
        if seq_len < 1:
            raise XparConfigError("--seq-len: the run records none; pass --seq-len N")
        if seq_len > model.model_cfg.max_seq_len:
            raise XparConfigError(
                f"--seq-len={seq_len} exceeds the model's model.max_seq_len="
                f"{model.model_cfg.max_seq_len}; use a shorter --seq-len"
            )
        blocks = eval_blocks(args.data, tok, seq_len, args.cache_dir)
        result = score(
            model,
            blocks,
            args.batch_size,
            max_batches=args.max_batches,
            rank=rank,
            world_size=world,
            device=device,
        )
    except (XparConfigError, OSError) as e:
        print(f"xpar eval: {e}", file=sys.stderr)
        return 2
    finally:
        if made:
            import torch.distributed as dist

            # Every rank past its last collective before any tears its group down: gloo can
            # abort a rank whose peer closed the connection first.
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        for line in result.lines():
            print(line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dataclasses.asdict(result), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

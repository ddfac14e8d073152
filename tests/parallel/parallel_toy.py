"""Toy expert-parallel model, its data, its single-process reference, and the rank batteries.

Shared by the tests here and tests/train/test_checkpoint.py.

Toy model: a dense part (embedding, gain, head) and an expert bank [E_local, D, D]
(+ a no-decay expert bias). Token t goes to expert t % E; each rank draws tokens
only for its own experts, so no all-to-all is needed and a single process holding
all experts and seeing all ranks' data computes the exact reference:
    loss = mean over ranks and micro steps of the rank losses.
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F
from torch import nn

V, D, E = 32, 8, 4  # vocab, model dim, experts
B, L = 2, 6  # micro batch, sequence length
LR, WD, CLIP = 0.05, 0.1, 0.3
STEPS = 3
TOL = 1e-5
EXPERT_NAMES = ("experts", "expert_bias")


class Toy(nn.Module):
    def __init__(self, first: int, n_local: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first, self.n_local = first, n_local
        self.embed = nn.Embedding(V, D)
        self.gain = nn.Parameter(torch.ones(D) + 0.1 * torch.randn(D, generator=g))
        self.head = nn.Linear(D, V)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, D, generator=g))
            self.head.weight.copy_(0.3 * torch.randn(V, D, generator=g))
            self.head.bias.copy_(0.1 * torch.randn(V, generator=g))
        bank = 0.5 * torch.randn(E, D, D, generator=g)  # all experts, then this rank's slice
        bias = 0.1 * torch.randn(E, D, generator=g)
        sl = slice(first, first + n_local)
        self.experts = nn.Parameter(bank[sl].clone())
        self.expert_bias = nn.Parameter(bias[sl].clone())
        self.experts.xpar_expert = True
        self.expert_bias.xpar_expert = True
        self.expert_bias.xpar_no_decay = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.gain
        e = tokens % E - self.first
        assert bool(((e >= 0) & (e < self.n_local)).all()), "token routed off this rank"
        h = x + torch.tanh(torch.einsum("bld,blde->ble", x, self.experts[e]) + self.expert_bias[e])
        logits = self.head(h)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))


def batch(rank: int, ep_size: int, step: int, micro: int) -> torch.Tensor:
    """This rank's tokens: only ids whose expert (id % E) is held by its EP rank."""
    n_local = E // ep_size
    first = (rank % ep_size) * n_local
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    base = torch.randint(0, V // E, (B, L), generator=g) * E
    return base + first + torch.randint(0, n_local, (B, L), generator=g)


def lr_lambda(step: int) -> float:
    return (step + 1) / 2 if step < 1 else 0.5 ** (step - 1)


def reference(world: int, ep_size: int, grad_accum: int, steps: int):
    """One process, all experts, all ranks' data. Returns model, per-step losses and norms."""
    from xpar.parallel.deepspeed import optimizer_param_groups

    torch.manual_seed(0)
    model = Toy(0, E)
    opt = torch.optim.AdamW(
        optimizer_param_groups(model, "ref", WD), lr=LR, betas=(0.9, 0.95), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        rank_losses = [0.0] * world
        for micro in range(grad_accum):
            for r in range(world):
                loss = model(batch(r, ep_size, step, micro))
                (loss / (world * grad_accum)).backward()
                rank_losses[r] += loss.item() / grad_accum
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        losses.append(rank_losses)
    return model, losses, norms


def build_engine(groups, stage: int, grad_accum: int, seed: int = 0, clip: float = CLIP):
    from xpar.parallel.deepspeed import initialize
    from xpar.parallel.ds_config import build_ds_config

    first = groups.ep_rank * (E // groups.ep_size)
    model = Toy(first, E // groups.ep_size, seed=seed)
    cfg = build_ds_config(
        zero_stage=stage, micro_batch_size=B, grad_accum=grad_accum, grad_clip=clip,
        precision="fp32",
    )  # fmt: skip
    return initialize(
        model, groups, ds_config=cfg, lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8,
        lr_lambda=lr_lambda,
    )  # fmt: skip


def train(engine, groups, steps: range, grad_accum: int):
    losses, norms = [], []
    for step in steps:
        total = 0.0
        for micro in range(grad_accum):
            loss = engine(batch(groups.rank, groups.ep_size, step, micro))
            engine.backward(loss)
            engine.step()
            total += loss.item() / grad_accum
        losses.append(total)
        norms.append(engine.grad_norm())
    return losses, norms


def param_diff(engine, ref: nn.Module, groups) -> dict[str, float]:
    """Max |engine param - reference param| per name (expert params: this rank's slice)."""
    ref_params = dict(ref.named_parameters())
    out = {}
    n_local = E // groups.ep_size
    sl = slice(groups.ep_rank * n_local, (groups.ep_rank + 1) * n_local)
    for name, p in engine.module.named_parameters():
        want = ref_params[name].detach()
        if name in EXPERT_NAMES:
            want = want[sl]
        out[name] = (p.detach() - want).abs().max().item()
    return out


def params_of(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def params_diff(engine, params: dict) -> float:
    return max((p - params[n]).abs().max().item() for n, p in params_of(engine).items())


# ------------------------------------------------------------------ batteries
# Each spawn of gloo ranks pays ~10 s of imports per process (torch._dynamo via torch.optim,
# DeepSpeed's Muon module via its ZeRO optimizer check), so a test file runs its multi-rank
# parts in one battery per world size and its tests assert on the results.


def battery(rank: int, world: int, parts: dict, grad_accum: int, root: str) -> dict:
    """Run each part (a module-level function) on EP=min(2, world); a failure is its traceback."""
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=min(2, world), backend="gloo")
    out = {}
    for name, fn in parts.items():
        try:
            out[name] = fn(rank, world, groups, grad_accum, root)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def part(results: list[dict], name: str) -> list:
    """One part's per-rank results; fails the test with the rank's traceback if it raised."""
    outs = [r[name] for r in results]
    for rank, o in enumerate(outs):
        assert "error" not in o, f"rank {rank} part {name} failed:\n{o['error']}"
    return outs

"""Hash layers (Roller et al. 2021): a token's experts are a fixed function of its token id.

A table `table_VK` maps each vocabulary id to K = moe.top_k distinct experts; every visit
has the combine weight 1/K. Nothing is learned (no parameters, no balance loss, no
z-loss), and a token's routing depends on its id alone, so the router is causal.

Tables (moe.router_options.hash_kind):
- `random` (the default: it needs nothing but the seed): each id gets K distinct experts
  drawn from a torch.Generator seeded with `seed`, never the global RNG, so every rank and
  every layer with the same seed builds the same table.
- `balanced` (what conf/moe/hash.yaml uses, the paper's best variant): starts as the random
  table and is fitted once, on a new run, to the training split's token counts
  (`fit_to_data`): ids in descending frequency (ties by id) each go to the K least-loaded
  distinct experts (load = summed frequency, ties by expert id), so the expected load is
  even. Ids that never occur in the split keep their random experts: they add no load, so
  the greedy rule would otherwise send all of them to the same experts. On resume the
  table comes from the checkpoint (it is a buffer).

Capacity and drops go through `plan_from_choices` like top-k; with equal weights the
`probs` drop policy keeps the earlier tokens. The entropy metric is that of the uniform
routing over K experts: ln K (0 for K = 1).

Legend: T tokens, V vocabulary, E experts, K experts per token.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from xpar.config.checks import bad, is_int, need_choice
from xpar.moe.plan import RouterStats, RoutingPlan, plan_from_choices
from xpar.moe.routers import NaiveRoute, Router, register

HASH_KINDS = ("random", "balanced")


@dataclass
class HashOptions:
    hash_kind: str = "random"  # random: drawn from `seed`; balanced: fitted to token counts
    seed: int = 0  # the random table's generator seed (the same on every rank and layer)

    def validate(self, prefix: str) -> None:
        need_choice(prefix, self, "hash_kind", HASH_KINDS)
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad(prefix, "seed", self.seed, "use an integer in [0, 2**63)")


def random_table(vocab_size: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """[V, K] long: K distinct experts per id, from a generator of its own."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, num_experts, generator=g).topk(k, dim=1).indices


def balanced_table(
    counts_V: torch.Tensor, start_VK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Greedy by frequency: each id that occurs, most frequent first (ties by id), goes to
    the K least-loaded distinct experts, least loaded first (ties by expert id); the ids that
    never occur keep their rows of start_VK."""
    rows = start_VK.tolist()
    K = start_VK.shape[1]
    counts = counts_V.double().tolist()
    heap = [(0.0, e) for e in range(num_experts)]  # (load, expert): already a heap
    for v in torch.argsort(-counts_V.double(), stable=True).tolist():
        c = counts[v]
        if c == 0:
            break  # the rest never occur
        least = [heapq.heappop(heap) for _ in range(K)]  # K distinct experts
        rows[v] = [e for _, e in least]
        for load, e in least:
            heapq.heappush(heap, (load + c, e))
    return torch.tensor(rows, dtype=torch.long).reshape(start_VK.shape)


@register
class HashRouter(Router):
    name = "hash"
    causal = True
    Options = HashOptions

    def __init__(self, d_model: int, cfg, vocab_size: int = 0) -> None:
        super().__init__(d_model, cfg, vocab_size)
        if not is_int(vocab_size) or vocab_size < 1:
            raise ValueError(
                f"hash router: vocab_size={vocab_size!r} is invalid: it routes by token id over "
                "the vocabulary; pass the model's vocabulary size, MoELayer(..., vocab_size=V)"
            )
        opts = cfg.options()
        self.hash_kind = opts.hash_kind
        self.vocab_size = vocab_size
        table = random_table(vocab_size, cfg.num_experts, cfg.top_k, opts.seed)
        # A buffer: in the state dict, so a checkpoint carries the (fitted) table.
        self.register_buffer("table_VK", table)

    # An instance property (the base class's is a class attribute): only balanced tables.
    @property
    def needs_token_counts(self) -> bool:
        return self.hash_kind == "balanced"

    def fit_to_data(self, counts_V: torch.Tensor) -> None:
        """Balanced tables only (a random table ignores the counts)."""
        if not self.needs_token_counts:
            return
        counts_V = torch.as_tensor(counts_V).detach().cpu()
        if counts_V.shape != (self.vocab_size,):
            raise ValueError(
                f"hash router: counts_V has shape {tuple(counts_V.shape)}, expected "
                f"({self.vocab_size},): one count per vocabulary id"
            )
        if not torch.isfinite(counts_V.double()).all() or (counts_V < 0).any():
            raise ValueError("hash router: counts_V must be finite counts >= 0")
        start_VK = random_table(
            self.vocab_size, self.cfg.num_experts, self.cfg.top_k, self.cfg.options().seed
        )
        fitted = balanced_table(counts_V, start_VK, self.cfg.num_experts)
        self.table_VK.copy_(fitted)

    @classmethod
    def num_params(cls, d_model: int, cfg) -> int:
        return 0

    def _ids(self, token_ids_T: torch.Tensor | None, T: int) -> torch.Tensor:
        if token_ids_T is None:
            raise ValueError(
                "hash router: token_ids_T=None is invalid: it routes by token id; pass the "
                "input ids, MoELayer(x, token_ids) (the model does)"
            )
        if token_ids_T.shape != (T,):
            raise ValueError(
                f"hash router: token_ids_T has shape {tuple(token_ids_T.shape)}, expected "
                f"({T},): one id per token of x_TD"
            )
        return token_ids_T.long()

    def _stats(self, x_TD: torch.Tensor) -> RouterStats:
        zero = x_TD.float().sum() * 0.0  # keeps the graph valid; nothing to learn
        ent = torch.full((), math.log(self.cfg.top_k), device=x_TD.device)
        return RouterStats(lb_loss=zero, z_loss=zero, entropy=ent)

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        ids_T = self._ids(token_ids_T, x_TD.shape[0])
        e_TK = self.table_VK[ids_T.to(self.table_VK.device)].to(x_TD.device)
        K = self.cfg.top_k
        w_TK = torch.full(e_TK.shape, 1.0 / K, dtype=torch.float32, device=x_TD.device)
        return plan_from_choices(
            e_TK,
            w_TK,
            num_experts=self.cfg.num_experts,
            capacity_factor=capacity_factor,
            drop_policy=self.cfg.drop_policy,
            stats=self._stats(x_TD),
        )

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        ids = self._ids(token_ids_T, x_TD.shape[0]).tolist()
        T, E, K = len(ids), self.cfg.num_experts, self.cfg.top_k
        table = self.table_VK.tolist()
        cap = math.inf if capacity_factor is None else math.ceil(capacity_factor * K * T / E)
        load, kept = [0] * E, []
        # Every first choice before any second one; equal weights: earlier tokens first.
        for k in range(K):
            for t in range(T):
                e = table[ids[t]][k]
                if load[e] < cap:
                    load[e] += 1
                    kept.append((t, e, torch.tensor(1.0 / K)))
        return kept, x_TD.float().sum() * 0.0

"""The router contract: what a gating algorithm declares so the rest of xpar never names it.

A router is an nn.Module registered under `name`. It declares whether it is causal (a
token's routing depends only on that token), its parameters and their init, how many
experts a token visits on average (for the cost report), its own config checks and
options, and a naive per-token reference the tests compare it with.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from xpar.moe.losses import router_entropy, z_loss
from xpar.moe.plan import RouterStats, RoutingPlan
from xpar.registry import NoOptions

if TYPE_CHECKING:
    from xpar.moe.config import MoEConfig

# A naive route: kept (token, expert, combine weight) triples and the unweighted balance loss.
NaiveRoute = tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor]


class Router(nn.Module):
    name: ClassVar[str]
    causal: ClassVar[bool] = True
    # The dataclass that moe.router_options is turned into (it validates itself).
    Options: ClassVar[type] = NoOptions

    # Whether the router needs the training corpus's token counts (`fit_to_data`) at the start
    # of a new run (a hash table balanced by frequency); its result must live in buffers.
    needs_token_counts: ClassVar[bool] = False

    def __init__(self, d_model: int, cfg: MoEConfig, vocab_size: int = 0):
        super().__init__()
        self.cfg = cfg

    def fit_to_data(self, counts_V: torch.Tensor) -> None:
        """Called once by the trainer on a new run (not on resume: the buffers come from the
        checkpoint) with the training split's token counts, identical on every rank."""

    def reset_parameters(self, std: float) -> None:
        """Re-draw this router's parameters (the model calls it in its init order)."""

    @property
    def updates_after_step(self) -> bool:
        """Whether this router keeps balance state that `after_optimizer_step` updates."""
        return False

    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        """Update balance state held outside the gradient (buffers, saved in the checkpoint)
        once per applied optimizer step. `load_E`: the step's assignments per expert summed
        over every rank and micro-batch, the same on every rank, so the state stays identical."""

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        """x_TD: the B*L tokens of this rank's micro-batch, sequence-major (seq_len = L, 0
        when the caller has no sequences), token_ids_T their input ids."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: MoEConfig, prefix: str) -> None:
        """Config checks that only this router needs (raise XparConfigError)."""

    @classmethod
    def experts_per_token(cls, cfg: MoEConfig, seq_len: int = 0) -> float:
        """Expert rows per token on average (the cost report); seq_len 0 = unknown."""
        return float(cfg.top_k)

    @classmethod
    def num_params(cls, d_model: int, cfg: MoEConfig) -> int:
        return 0

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        """The same routing written token by token, independently of forward (tests only)."""
        raise NotImplementedError

    def naive_z_loss(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The router z-loss token by token (tests only); routers without logits have none."""
        return x_TD.float().sum() * 0.0


class LinearRouter(Router):
    """Routers that score tokens with one linear map: logits_TE = x_TD @ weight_ED^T."""

    def __init__(self, d_model: int, cfg: MoEConfig, vocab_size: int = 0):
        super().__init__(d_model, cfg, vocab_size)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    @classmethod
    def num_params(cls, d_model: int, cfg: MoEConfig) -> int:
        return cfg.num_experts * d_model

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Scores in float32 whatever the activation dtype: softmax over E is sensitive.
        x_TD = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD @ self.weight.float().t()

    def naive_z_loss(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = x_TD.float() @ self.weight.float().t()
        T = x_TD.shape[0]
        return torch.stack([torch.logsumexp(logits_TE[t], 0) ** 2 for t in range(T)]).mean()

    def naive_probs(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_TE, probs_TE) without jitter, for the naive references."""
        logits_TE = x_TD.float() @ self.weight.float().t()
        return logits_TE, torch.softmax(logits_TE, dim=-1)


def stats_of(logits_TE: torch.Tensor, probs_TE: torch.Tensor, lb_loss: torch.Tensor) -> RouterStats:
    return RouterStats(lb_loss=lb_loss, z_loss=z_loss(logits_TE), entropy=router_entropy(probs_TE))

"""MoELayer = router + dispatcher + grouped experts (+ optional shared expert).

Soft routing: the experts' rows are slots, built per sequence with batched products from
the plan's [B, L, J] weights (never a [T, B*J] matrix) and ordered expert-major,
s = e*B*P + b*P + p, so each expert's B*P slots are contiguous.

Under expert parallel every router, soft routing included, runs with any moe.comm_chunks
and moe.exchange (soft routing's padded capacity is its exact S/E slots per expert); only
moe.dedup_dispatch refuses chunks and padding (MoELayer says so when built).

Legend: T tokens (B sequences of L), D model dim, E experts, P slots per expert per
sequence, J = E*P slots of one sequence, S = B*J slots of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.models.mlp import MLP
from xpar.moe.config import MoEConfig
from xpar.moe.dispatch import make_dispatcher, sum_over_all_ranks
from xpar.moe.experts import GroupedExperts, local_experts
from xpar.moe.losses import balance_loss_from_counts
from xpar.moe.plan import token_choice_capacity
from xpar.moe.routers import get_router


@dataclass
class MoEAux:
    """What one MoE layer reports. `loss` is already weighted: add it to the task loss."""

    loss: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # [E], over the EP group, before dropping
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor


def slot_inputs(dispatch_BLJ: torch.Tensor, x_TD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[S, D] slot inputs, expert-major: row e*B*P + b*P + p is sum_l d[b, l, e*P + p] x[b, l]."""
    B, L, J = dispatch_BLJ.shape
    D, P = x_TD.shape[1], J // num_experts
    d_BJL = dispatch_BLJ.transpose(1, 2).to(x_TD.dtype)
    u_BJD = torch.bmm(d_BJL, x_TD.reshape(B, L, D))
    return u_BJD.reshape(B, num_experts, P, D).transpose(0, 1).reshape(B * J, D)


def slot_outputs(combine_BLJ: torch.Tensor, y_SD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, D]: token (b, l) gets sum_j c[b, l, j] times slot j of sequence b (rows of y_SD
    expert-major, as `slot_inputs` makes them)."""
    B, L, J = combine_BLJ.shape
    D, P = y_SD.shape[1], J // num_experts
    y_BJD = y_SD.reshape(num_experts, B, P, D).transpose(0, 1).reshape(B, J, D)
    return torch.bmm(combine_BLJ.to(y_SD.dtype), y_BJD).reshape(B * L, D)


def _refuse_with_dedup(cfg: MoEConfig) -> None:
    """The dedup dispatcher exchanges counts first and sends its rows in one piece."""
    if cfg.comm_chunks > 1:
        raise XparConfigError(
            f"moe.comm_chunks={cfg.comm_chunks} is not supported with moe.dedup_dispatch=true "
            "(its rows travel in one piece); use moe.comm_chunks=1 or 0, or dedup_dispatch=false"
        )
    if cfg.exchange == "padded":
        raise XparConfigError(
            "moe.exchange=padded is not supported with moe.dedup_dispatch=true (it exchanges "
            "counts first); use moe.exchange=counts or auto, or dedup_dispatch=false"
        )


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, ep_group=None, vocab_size: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.d_model = d_model
        # vocab_size: for routers that route by token id (a hash table over the vocabulary).
        self.router = get_router(cfg.router)(d_model, cfg, vocab_size=vocab_size)
        self.dispatcher = make_dispatcher(cfg.num_experts, ep_group, cfg.dedup_dispatch)
        if cfg.dedup_dispatch and self.dispatcher.ep_size > 1:
            _refuse_with_dedup(cfg)
        self.experts = GroupedExperts(
            cfg.num_experts,
            d_model,
            cfg.d_ff,
            cfg.activation,
            ids=local_experts(cfg.num_experts, self.dispatcher.ep_size, self.dispatcher.ep_rank),
            gemm=cfg.expert_gemm,
            recompute=cfg.recompute == "experts",
        )
        # A dense expert every token goes through, next to the routed ones.
        self.shared_expert = (
            MLP(d_model, cfg.shared_expert_d_ff, cfg.activation)
            if cfg.shared_expert_d_ff > 0
            else None
        )

    @property
    def ep_size(self) -> int:
        return self.dispatcher.ep_size

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Router, then the expert banks, then the shared expert: the model's init order."""
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters(std, out_std)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """x [B, L, D] (or [T, D]); token_ids [B, L] (the input ids, for routers that route
        by them)."""
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        token_ids_T = token_ids.reshape(-1) if token_ids is not None else None
        seq_len = shape[-2] if x.dim() == 3 else 0
        cf = self.cfg.capacity_factor_for(self.training)
        plan = self.router(x_TD, cf, token_ids_T, seq_len=seq_len)
        rows_in = x_TD
        if plan.slot_dispatch_BLJ is not None:  # soft routing: the experts see slots
            rows_in = slot_inputs(plan.slot_dispatch_BLJ, x_TD, self.cfg.num_experts)
        self.dispatcher.check_agreement(rows_in)  # before any collective sized by the layer
        # The load report is a metric: reduce it in the background while experts compute.
        load = self.dispatcher.start_sum_over_group(plan.tokens_per_expert_E)
        y_TD = self.dispatcher.forward_experts(
            rows_in,
            plan,
            self.experts,
            chunks=self.cfg.comm_chunks,
            exchange=self.cfg.exchange,
            capacity=self._capacity(plan, cf),
            top_k=self.cfg.top_k,
        )
        if plan.slot_combine_BLJ is not None:
            y_TD = slot_outputs(plan.slot_combine_BLJ, y_TD, self.cfg.num_experts)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        lb_loss = self._balance_loss(plan)
        loss = self.cfg.aux_loss_weight * lb_loss + self.cfg.z_loss_weight * plan.z_loss
        aux = MoEAux(
            loss=loss,
            lb_loss=lb_loss,
            z_loss=plan.z_loss,
            tokens_per_expert=load.wait(),
            dropped_fraction=plan.dropped_fraction,
            router_entropy=plan.entropy,
        )
        return y_TD.reshape(shape), aux

    def _capacity(self, plan, cf: float | None) -> int | None:
        """Row slots per expert for the padded exchange, known before routing: soft routing
        gives every expert exactly S/E slots; with a capacity factor no router keeps more
        than min(T, ceil(cf * top_k * T / E)) rows per expert; dropless: None (counts)."""
        E = self.cfg.num_experts
        if plan.slot_dispatch_BLJ is not None:
            return plan.num_tokens // E
        if cf is None:
            return None
        T = plan.num_tokens
        return min(T, token_choice_capacity(cf, self.cfg.top_k, T, E))

    def _balance_loss(self, plan) -> torch.Tensor:
        """The router's balance loss; with moe.balance_scope=global (in training) its load
        f_i comes from the counts summed over every rank, so it does not depend on the rank
        count: the ranks' mean of E * sum f_i P_i is then the one-process loss."""
        if self.cfg.balance_scope != "global" or not self.training or plan.balance_counts_E is None:
            return plan.lb_loss
        counts_E = sum_over_all_ranks(plan.balance_counts_E)
        return balance_loss_from_counts(counts_E, plan.balance_probs_E)

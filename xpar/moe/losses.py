"""Router losses and routing statistics: pure functions, returned, never stored.

Legend: T tokens (B sequences of L when a loss is per sequence), E experts, K top-k.
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i.

    f_i is the fraction of the T*K assignments that chose expert i (before any drop),
    P_i the mean router probability of expert i. Uniform routing gives 1.0.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / expert_idx_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def balance_loss_from_counts(counts_E: torch.Tensor, probs_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i with f_i = counts_i / sum(counts): the Switch loss from load
    counts that may be summed over ranks (moe.balance_scope=global) and local mean scores."""
    f_E = counts_E.to(probs_E.dtype) / counts_E.sum().clamp_min(1).to(probs_E.dtype)
    return probs_E.shape[0] * torch.sum(f_E * probs_E)


def balance_terms(
    probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-wise (Switch) loss's terms: (assignments per expert [E] long, before any
    drop; mean score per expert [E], differentiable). `balance_loss_from_counts` of them is
    `load_balancing_loss` bit for bit; with T = 0 the mean scores are zeros, not NaN."""
    T, E = probs_TE.shape
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=E)
    P_E = probs_TE.mean(dim=0) if T else probs_TE.sum(dim=0) * 0.0
    return counts_E, P_E


def sequence_balance_loss(
    probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, mean over the B = T / L sequences of
    sum_i f_i P_i, with f_i = E / (K L) * (assignments of the sequence's tokens to i) and
    P_i the sequence's mean of probs_TE[:, i] (scores normalised over experts).

    Uniform routing gives 1.0, like the Switch loss; seq_len 0 treats the batch as one
    sequence, and then it equals `load_balancing_loss`."""
    T, E = probs_TE.shape
    K = expert_idx_TK.shape[1]
    if T == 0:
        return probs_TE.sum() * 0.0
    L = seq_len if seq_len > 0 else T
    assert T % L == 0, f"{T} tokens are not whole sequences of {L}"
    B = T // L
    counts_BE = probs_TE.new_zeros(B, E).scatter_add_(
        1, expert_idx_TK.reshape(B, L * K), probs_TE.new_ones(B, L * K)
    )
    f_BE = counts_BE * (E / (K * L))
    P_BE = probs_TE.reshape(B, L, E).mean(dim=1)
    return (f_BE * P_BE).sum(dim=1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) (ST-MoE); (ln E)^2 at zero logits."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing distribution; a metric, no grad."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    p = probs_TE.detach()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1).mean()

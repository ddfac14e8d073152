"""MoEConfig: what one MoE layer routes and computes; validates itself.

Router names, their causality, their own checks and options come from the router
registry (xpar.moe.routers); activations from xpar.activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from xpar.activations import ACTIVATIONS
from xpar.config.checks import bad, build_options, is_number, need_bool, need_choice, need_int
from xpar.moe.plan import DROP_POLICIES

BALANCE_SCOPES = ("micro_batch", "global")
# How the experts' GEMMs run: one per expert (loop), torch's grouped GEMM where the device
# has one (grouped), one batched GEMM over experts padded to the longest (padded), or picked
# by shape from the benchmark's measurements (auto).
EXPERT_GEMMS = ("auto", "loop", "grouped", "padded")
# How rows travel under expert parallel: counts first then rows (counts), a fixed-capacity
# padded buffer in one exchange (padded, capacity routing only), or picked per call by size.
EXCHANGES = ("auto", "counts", "padded")
# What backward recomputes instead of keeping: nothing, the expert MLPs, or the whole block.
RECOMPUTES = ("none", "experts", "block")


@dataclass
class MoEConfig:
    """One MoE layer.

    capacity_factor=None runs dropless (token choice only). eval_capacity_factor=None
    uses capacity_factor in eval as well. Capacity per expert for token choice is
    ceil(capacity_factor * top_k * T / num_experts) over this rank's T tokens.
    router_options: the fields of the chosen router's own Options dataclass.
    """

    num_experts: int = 8  # experts per MoE layer (sharded over the EP group)
    top_k: int = 2  # experts each token picks (token-choice routers)
    d_ff: int = 512  # width of each expert
    router: str = "topk"  # a registered router: topk, expert_choice, ...
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    drop_policy: str = "probs"  # over capacity: keep the top weights (probs) or earliest (position)
    aux_loss_weight: float = 1e-2  # weight of the load-balancing loss
    z_loss_weight: float = 1e-3  # weight of the router z-loss
    activation: str = "gelu"  # expert activation: gelu, relu, squared_relu, swiglu
    renormalize: bool = True  # top-k>1: weights renormalised over the chosen k
    jitter_eps: float = 0.0  # multiplicative input jitter of the router in training
    # Model-level placement: MoE replaces the FFN of every n-th block (0: dense model).
    every: int = 1
    # A dense expert every token goes through, beside the routed ones (0: none).
    shared_expert_d_ff: int = 0
    router_options: dict[str, Any] = field(default_factory=dict)
    # The batch-wise balance loss's load f_i: this rank's micro-batch, or summed over every
    # rank (one all-reduce of [E] counts per layer), so the loss does not depend on the
    # number of ranks.
    balance_scope: str = "micro_batch"
    # Expert parallel: send a token once per rank holding any of its experts, fanned out to
    # those experts there and summed there (weights travel along), instead of once per
    # (token, expert); saves traffic when a token picks several experts of one rank.
    dedup_dispatch: bool = False
    # Sparse upcycling: with train.init_from=<dense checkpoint>, every expert starts as a
    # copy of the dense FFN (plus upcycle_noise x its std of Gaussian noise), routers fresh.
    upcycle: bool = False
    upcycle_noise: float = 0.0
    # Performance (results identical to 1e-6 whatever is chosen; a checkpoint resumes under
    # other values). comm_chunks: the routed rows travel in this many chunks, pipelined with
    # the experts' compute (0: chosen by the benchmark's measurements, 1: no pipelining).
    comm_chunks: int = 0
    exchange: str = "auto"
    expert_gemm: str = "auto"
    recompute: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "moe") -> None:
        from xpar.moe.routers import get_router, router_names

        need_int(prefix, self, "num_experts", 1)
        need_int(prefix, self, "top_k", 1)
        if self.top_k > self.num_experts:
            raise bad(
                prefix,
                "top_k",
                self.top_k,
                f"top_k must be <= moe.num_experts={self.num_experts}; lower top_k or add experts",
            )
        need_int(prefix, self, "d_ff", 1)
        need_choice(prefix, self, "router", router_names())
        need_choice(prefix, self, "drop_policy", DROP_POLICIES)
        need_choice(prefix, self, "balance_scope", BALANCE_SCOPES)
        need_choice(prefix, self, "activation", ACTIVATIONS)
        need_bool(prefix, self, "dedup_dispatch")
        need_bool(prefix, self, "upcycle")
        need_int(prefix, self, "comm_chunks", 0, "use 0 (chosen by measurement) or n >= 1")
        need_choice(prefix, self, "exchange", EXCHANGES)
        need_choice(prefix, self, "expert_gemm", EXPERT_GEMMS)
        need_choice(prefix, self, "recompute", RECOMPUTES)
        for name in ("capacity_factor", "eval_capacity_factor"):
            cf = getattr(self, name)
            if cf is not None and (not is_number(cf) or not cf > 0 or math.isinf(cf)):
                raise bad(prefix, name, cf, "use a finite number > 0, or null for dropless")
        if self.exchange == "padded" and self.capacity_factor is None:
            raise bad(
                prefix,
                "exchange",
                self.exchange,
                "the padded exchange needs a capacity, and moe.capacity_factor=null is "
                "dropless; set a capacity_factor or use moe.exchange=counts or auto",
            )
        get_router(self.router).check(self, prefix)
        need_int(prefix, self, "every", 0, "use 0 (dense model) or n >= 1 (MoE every n-th block)")
        need_int(prefix, self, "shared_expert_d_ff", 0, "use 0 (none) or a width >= 1")
        for name in ("aux_loss_weight", "z_loss_weight", "jitter_eps", "upcycle_noise"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise bad(prefix, name, v, "use a number >= 0")
        self.options(prefix)

    def options(self, prefix: str = "moe") -> Any:
        """moe.router_options as the router's typed Options (unknown keys refused)."""
        from xpar.moe.routers import get_router

        return build_options(
            get_router(self.router).Options, self.router_options, f"{prefix}.router_options"
        )

    def capacity_factor_for(self, training: bool) -> float | None:
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    @property
    def is_causal(self) -> bool:
        """Whether a token's routing depends only on that token (safe in a causal decoder)."""
        from xpar.moe.routers import get_router

        return get_router(self.router).causal

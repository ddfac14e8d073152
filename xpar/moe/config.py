"""MoEConfig: what one MoE layer routes and computes; validates itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

from xpar.errors import XparConfigError

ROUTERS = ("topk", "expert_choice")
DROP_POLICIES = ("probs", "position")
ACTIVATIONS = ("gelu", "relu", "squared_relu", "swiglu")


@dataclass
class MoEConfig:
    """One MoE layer.

    capacity_factor=None runs dropless (token choice only). eval_capacity_factor=None
    uses capacity_factor in eval as well. Capacity per expert for token choice is
    ceil(capacity_factor * top_k * T / num_experts) over this rank's T tokens.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 1024
    router: str = "topk"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    drop_policy: str = "probs"
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    activation: str = "gelu"
    renormalize: bool = True
    jitter_eps: float = 0.0
    # Model-level placement: MoE replaces the FFN of every n-th block (0: dense model).
    every: int = 1
    # A dense expert every token goes through, beside the routed ones (0: none).
    shared_expert_d_ff: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "moe") -> None:
        def bad(field: str, value: object, fix: str) -> XparConfigError:
            return XparConfigError(f"{prefix}.{field}={value!r} is invalid: {fix}")

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise bad("num_experts", self.num_experts, "use an integer >= 1")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise bad("top_k", self.top_k, "use an integer >= 1")
        if self.top_k > self.num_experts:
            raise bad(
                "top_k",
                self.top_k,
                f"top_k must be <= moe.num_experts={self.num_experts}; lower top_k or add experts",
            )
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise bad("d_ff", self.d_ff, "use an integer >= 1")
        if self.router not in ROUTERS:
            raise bad("router", self.router, f"choose one of {', '.join(ROUTERS)}")
        if self.drop_policy not in DROP_POLICIES:
            raise bad("drop_policy", self.drop_policy, f"choose one of {', '.join(DROP_POLICIES)}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"choose one of {', '.join(ACTIVATIONS)}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            cf = getattr(self, name)
            if cf is not None and (not _is_number(cf) or not cf > 0 or math.isinf(cf)):
                raise bad(name, cf, "use a finite number > 0, or null for dropless")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise bad(
                "capacity_factor",
                None,
                "expert_choice needs a capacity (each expert takes capacity_factor*T/E tokens); "
                "set e.g. capacity_factor=1.0",
            )
        if not isinstance(self.every, int) or self.every < 0:
            raise bad("every", self.every, "use 0 (dense model) or n >= 1 (MoE every n-th block)")
        if not isinstance(self.shared_expert_d_ff, int) or self.shared_expert_d_ff < 0:
            raise bad("shared_expert_d_ff", self.shared_expert_d_ff, "use 0 (none) or a width >= 1")
        for name in ("aux_loss_weight", "z_loss_weight", "jitter_eps"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise bad(name, v, "use a number >= 0")

    def capacity_factor_for(self, training: bool) -> float | None:
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    @property
    def is_causal(self) -> bool:
        """Whether a token's routing depends only on that token (safe in a causal decoder)."""
        return self.router != "expert_choice"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

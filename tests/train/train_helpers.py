"""Helpers for the training tests."""

import torch


def moe_aux(counts, dropped, entropy, lb, z) -> dict:
    """What MoELayer returns as aux (tensors), as the trainer hands it on after reducing."""
    return {
        "tokens_per_expert": torch.tensor(counts, dtype=torch.float32),
        "dropped_fraction": torch.tensor(dropped),
        "router_entropy": torch.tensor(entropy),
        "lb_loss": torch.tensor(lb),
        "z_loss": torch.tensor(z),
    }

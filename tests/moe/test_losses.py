"""Router losses: pure functions with known values at uniform and collapsed routing."""

import math

import pytest
import torch

from xpar.moe.losses import load_balancing_loss, z_loss


def test_load_balancing_loss_is_one_under_uniform_routing():
    for E, K, T in [(4, 1, 16), (8, 2, 33), (5, 3, 7)]:
        probs = torch.full((T, E), 1.0 / E)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        assert load_balancing_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_penalises_collapse():
    E, T = 4, 32
    probs = torch.zeros(T, E)
    probs[:, 0] = 1.0
    idx = torch.zeros(T, 1, dtype=torch.long)
    assert load_balancing_loss(probs, idx).item() == pytest.approx(E)


def test_z_loss_at_zero_logits():
    for E in (2, 8, 64):
        assert z_loss(torch.zeros(10, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)

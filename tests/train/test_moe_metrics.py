"""MoE layer metrics: drop fraction, max/mean expert load, entropy, and a log step's keys."""

from __future__ import annotations

import pytest
import torch
from train_helpers import moe_aux

from xpar.train.moe_metrics import moe_layer_metrics, moe_step_metrics, to_float


def test_moe_layer_metrics_from_tensors_and_dicts():
    m = moe_layer_metrics(moe_aux([0.0, 2.0, 4.0, 2.0], 0.25, 1.5, 1.0, 0.5))
    assert m["max_load"] == 4.0 and m["mean_load"] == 2.0 and m["max_over_mean_load"] == 2.0
    assert m["dropped_fraction"] == 0.25 and m["router_entropy"] == 1.5
    assert m["tokens_per_expert"] == [0.0, 2.0, 4.0, 2.0]
    assert moe_layer_metrics({"tokens_per_expert": [0, 0]})["max_over_mean_load"] == 0.0


def test_step_metrics_keys_order_losses_and_histograms():
    layers = [
        moe_aux([10.0, 20.0, 30.0, 60.0], 0.125, 1.25, 1.5, 0.75),
        moe_aux([1.0, 1.0], 0.0, 0.5, 1.0, 0.25),
    ]
    m, hists = moe_step_metrics(layers)
    assert list(m) == [
        "moe/aux_loss",
        "moe/z_loss",
        *(f"moe/layer_0/{k}" for k in ("dropped_fraction", "max_load", "mean_load")),
        *(f"moe/layer_0/{k}" for k in ("max_over_mean_load", "router_entropy")),
        *(f"moe/layer_1/{k}" for k in ("dropped_fraction", "max_load", "mean_load")),
        *(f"moe/layer_1/{k}" for k in ("max_over_mean_load", "router_entropy")),
    ]
    assert m["moe/aux_loss"] == pytest.approx(1.25) and m["moe/z_loss"] == pytest.approx(0.5)
    assert m["moe/layer_0/max_over_mean_load"] == 2.0 and hists == {}
    # losses given by the caller win over the layers' own; histograms only when asked
    m, hists = moe_step_metrics(
        {3: layers[1]}, aux_loss=torch.tensor(2.0), z_loss=0.0, with_hist=True
    )
    assert m["moe/aux_loss"] == 2.0 and m["moe/z_loss"] == 0.0 and "moe/layer_3/max_load" in m
    assert hists == {"moe/layer_3/tokens_per_expert": [1.0, 1.0]}
    # a dense model: nothing
    assert moe_step_metrics(None) == ({}, {})
    assert to_float(None) is None and to_float(torch.tensor(0.5)) == 0.5

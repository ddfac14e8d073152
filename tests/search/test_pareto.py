"""The Pareto front on synthetic points; the search space's knobs and refusals."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from xpar.errors import XparConfigError
from xpar.search.pareto import dominates, front_table, pareto_front
from xpar.search.space import KNOBS, attention_choices, check_space

MIN_MAX = ("minimize", "maximize")


def test_front_of_loss_and_speed():
    # (val loss, tokens/s): 1 beats 0 on both; 2 and 3 trade off; 4 is a copy of 2;
    # 5 was not trained (inf loss) and is never on the front.
    pts = [
        (3.0, 100.0),
        (2.5, 150.0),
        (2.0, 120.0),
        (2.8, 400.0),
        (2.0, 120.0),
        (math.inf, 0.0),
    ]
    assert pareto_front(pts, MIN_MAX) == [1, 2, 3, 4]
    assert dominates(pts[1], pts[0], MIN_MAX)
    assert not dominates(pts[2], pts[4], MIN_MAX)  # equal points: neither dominates
    assert not dominates(pts[2], pts[3], MIN_MAX) and not dominates(pts[3], pts[2], MIN_MAX)


def test_directions_matter():
    pts = [(1.0, 1.0), (2.0, 2.0)]
    assert pareto_front(pts, ("minimize", "minimize")) == [0]
    assert pareto_front(pts, ("maximize", "maximize")) == [1]
    assert pareto_front(pts, MIN_MAX) == [0, 1]
    assert pareto_front([], MIN_MAX) == []
    with pytest.raises(ValueError, match="direction 'down'"):
        pareto_front(pts, ("down", "up"))


def test_front_matches_brute_force_on_random_points():
    rng = random.Random(0)
    for _ in range(50):
        pts = [
            (rng.choice([1.0, 2.0, 3.0, math.inf]), rng.choice([1.0, 2.0, 3.0])) for _ in range(12)
        ]
        front = set(pareto_front(pts, MIN_MAX))
        for i, p in enumerate(pts):
            beaten = any(
                q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts if math.isfinite(q[0])
            )
            assert (i in front) == (math.isfinite(p[0]) and not beaten), (pts, i)
        # everything off the front is dominated by something on it (or not trained)
        for i, p in enumerate(pts):
            if i not in front and math.isfinite(p[0]):
                assert any(dominates(pts[j], p, MIN_MAX) for j in front)


def test_front_table():
    text = front_table(
        [{"trial": 3, "val_loss": 2.34567, "tokens_per_s": 12345.6}],
        ["trial", "val_loss", "tokens_per_s"],
    )
    assert text.splitlines() == [
        "| trial | val_loss | tokens_per_s |",
        "|---|---|---|",
        "| 3 | 2.346 | 12,346 |",
    ]


def test_knobs_name_real_options_of_their_variants():
    """A knob names a field of its variant's options (variants registered in this checkout)."""
    from xpar.models.attention import attention_names, get_attention

    for variant, (knob, choices) in KNOBS.items():
        if variant not in attention_names():
            continue
        fields = {f.name for f in dataclasses.fields(get_attention(variant).Options)}
        assert knob in fields, (variant, knob, fields)
        assert get_attention(variant).causal_ok, variant
        assert len(set(choices)) == len(choices) > 1


def test_default_space_is_trainable():
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e .[search]"
    )
    from hydra import compose, initialize_config_dir

    from xpar.config.store import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=search"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "dense" in attention_choices(params)
    check_space(params)
    assert cfg.hydra.callbacks.search.flops_budget > 0


@pytest.mark.parametrize(
    "spec,match",
    [
        ("choice(dense, linformer)", "'linformer' cannot be causal"),
        ("choice(dense, nosuch)", "'nosuch' has no conf/attention/nosuch.yaml"),
    ],
)
def test_space_refuses_untrainable_attention(spec, match):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e .[search]"
    )
    with pytest.raises(XparConfigError, match=match):
        check_space({"attention": spec})


def test_attention_choices_grammar():
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e .[search]"
    )
    assert attention_choices({"attention": "choice(dense, topk)"}) == ["dense", "topk"]
    assert attention_choices({"attention": "dense"}) == ["dense"]
    assert attention_choices({}) == []

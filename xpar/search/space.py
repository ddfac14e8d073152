"""The search space beyond the flat `hydra.sweeper.params`: each attention variant's main knob.

The Optuna sweeper samples the flat parameters (conf/experiment/search.yaml). A knob belongs
to one variant only (top-k's k, a window's width), so it is suggested after the variant is
chosen, by `suggest_knobs` (the sweeper's `custom_search_space` hook), as the override
`model.attention_options.<knob>=<value>` on top of conf/attention/<name>.yaml. A variant
without an entry here (dense, linear) has no knob. The choices suit the search's sequences
of 64 tokens; a knob's name and choices stay fixed within a study (Optuna refuses a
parameter whose choices change).

`check_space` refuses, before any trial, an attention choice that has no config file or
cannot be causal: the search trains decoders, and a trial that fails to compose would end
the whole sweep.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from xpar.config.store import CONFIG_DIR
from xpar.errors import XparConfigError

# variant -> (its option in model.attention_options, the values tried)
KNOBS: dict[str, tuple[str, tuple[int, ...]]] = {
    "topk": ("k", (8, 16, 32)),
    "sliding_window": ("window", (8, 16, 32)),
    "performer": ("n_features", (16, 32, 64)),
    "lsh": ("n_buckets", (4, 8, 16)),
    "routing": ("n_clusters", (2, 4, 8)),
    "sinkhorn": ("block", (16, 32, 64)),
}


def knob_param(variant: str) -> str | None:
    """The override key of a variant's knob (None: it has none)."""
    knob = KNOBS.get(variant)
    return None if knob is None else f"model.attention_options.{knob[0]}"


def suggest_knobs(cfg: DictConfig, trial) -> None:
    """The sweeper's custom_search_space hook: the chosen variant's knob, if it has one."""
    variant = trial.params.get("attention")
    key = knob_param(variant) if variant is not None else None
    if key is not None:
        trial.suggest_categorical(key, list(KNOBS[variant][1]))


def attention_choices(params: Mapping[str, str]) -> list[str]:
    """The attention variants a sweep's params choose from (the override grammar's choice)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    spec = params.get("attention")
    if spec is None:
        return []
    space, fixed = create_params_from_overrides([f"attention={spec}"])
    if "attention" in fixed:
        return [str(fixed["attention"])]
    return [str(c) for c in space["attention"].choices]


def check_space(params: Mapping[str, str]) -> None:
    """Every attention choice has conf/attention/<name>.yaml and a causal implementation."""
    from xpar.models.attention import attention_names, get_attention

    for name in attention_choices(params):
        where = f"hydra.sweeper.params.attention: {name!r}"
        if not (CONFIG_DIR / "attention" / f"{name}.yaml").is_file():
            raise XparConfigError(
                f"{where} has no conf/attention/{name}.yaml; choose from the files there or add one"
            )
        if name not in attention_names():
            raise XparConfigError(f"{where} is not a registered attention; choose from "
                                  f"{', '.join(attention_names())}")  # fmt: skip
        if not get_attention(name).causal_ok:
            raise XparConfigError(
                f"{where} cannot be causal and the search trains decoders; remove it from "
                "the choice"
            )

"""A mistyped key, group option or top-level name is one line that names the closest spelling.

Composed through the real conf/ with xpar.config.store.compose_config, the way the trainer and
`python -m xpar.config.check` compose.
"""

import pytest

from xpar.config.store import compose_config
from xpar.errors import XparConfigError


def _options(group):
    from xpar.config.store import CONFIG_DIR

    names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    return ", ".join(names)


def _error(*overrides: str) -> str:
    with pytest.raises(XparConfigError) as ei:
        compose_config(list(overrides), world_size=2, cuda_available=False)
    msg = str(ei.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "override,expect",
    [
        ("train.stpes=20", "train.stpes is not a key of train; did you mean train.steps?"),
        # force-added past struct mode: refused after the merge, with the same words
        ("+train.stpes=20", "train.stpes is not a key of train; did you mean train.steps?"),
        ("model.d_modle=64", "model.d_modle is not a key of model; did you mean model.d_model?"),
        ("trian.steps=20", "trian is not a top-level key or config group; did you mean train?"),
        (
            "expriment=tiny",
            "expriment is not a top-level key or config group; did you mean experiment?",
        ),  # fmt: skip
        (
            "moe=topkk",
            "moe=topkk is not an option of moe (there is no moe/topkk.yaml); "
            "did you mean moe=topk? (options: " + _options("moe") + ")",
        ),  # fmt: skip
    ],
)
def test_a_typo_names_the_closest_spelling(override, expect):
    assert _error(override) == expect


def test_hydras_wording_is_gone():
    msg = _error("train.stpes=20")
    # Hydra's advice would be to append the typo as a new key
    assert "+train.stpes" not in msg and "append" not in msg and "HYDRA_FULL_ERROR" not in msg


def test_nothing_close_lists_what_there_is():
    keys = _error("model.zzz=1")
    assert keys.startswith("model.zzz is not a key of model; the keys of model are vocab_size, ")
    assert "d_model" in keys and "did you mean" not in keys
    root = _error("zzz=1")
    assert root.startswith("zzz is not a top-level key or config group; they are ")
    for name in ("experiment", "model", "moe", "train"):
        assert name in root
    option = _error("experiment=bigg")
    assert option == (
        "experiment=bigg is not an option of experiment (there is no experiment/bigg.yaml); "
        "the options of experiment are " + _options("experiment")
    )


def test_the_schema_is_not_offered_as_an_option():
    assert "schema" not in _error("model=huge")


def test_an_unparsable_override_says_how_to_write_one():
    msg = _error("train.steps")
    assert msg.startswith("the override 'train.steps' cannot be parsed (missing EQUAL")
    assert "write key=value" in msg and "https://" not in msg


def test_other_hydra_errors_are_one_line_too():
    assert _error("~train.steps").startswith("invalid configuration (overrides: ~train.steps): ")

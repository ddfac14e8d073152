"""One rule per fact: the dataclass defaults are the main job, and YAML carries only changes."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from xpar.config.schema import XparConfig
from xpar.config.store import CONFIG_DIR, GROUP_SCHEMAS, compose_config


def test_main_job_is_the_schema_defaults():
    # No overrides: what `bash launch/dev.sh train` runs, on its 2 ranks.
    assert compose_config([], world_size=2, cuda_available=False) == XparConfig()


def _group_files():
    for group in GROUP_SCHEMAS:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            yield group, path


@pytest.mark.parametrize("group, path", list(_group_files()), ids=lambda v: getattr(v, "name", v))
def test_group_files_carry_only_what_differs_from_the_defaults(group, path: Path):
    defaults = {f.name: f for f in dataclasses.fields(GROUP_SCHEMAS[group])}
    body = yaml.safe_load(path.read_text()) or {}
    body.pop("defaults", None)
    for key, value in body.items():
        f = defaults[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert value != default, f"{path.name}: {group}.{key}={value!r} repeats the schema default"

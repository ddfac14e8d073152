"""`python -m xpar.train --help`: xpar's groups, options and keys, not Hydra's generic page."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from xpar.config.schema import TrainConfig
from xpar.config.store import CONFIG_DIR, GROUP_SCHEMAS
from xpar.train.help import field_docs, help_text


def _help(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xpar.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def page() -> str:
    p = _help("--help")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return p.stdout


def test_help_lists_every_group_with_its_options_and_the_default(page):
    for group in [*GROUP_SCHEMAS, "experiment"]:
        assert re.search(rf"^  {group}:$", page, re.M), group
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            assert re.search(rf"^   [ *]{path.stem} +\S", page, re.M), (group, path.stem)
    assert re.search(r"^   \*topk +Token-choice top-2", page, re.M)
    assert re.search(r"^    tiny +A seconds-long smoke run", page, re.M)


def test_help_lists_every_key_with_its_default_and_what_the_schema_says(page):
    for f in dataclasses.fields(TrainConfig):
        assert re.search(rf"^  train\.{f.name}=\S+", page, re.M), f.name
    assert re.search(r"^  train\.verbose=false +let third-party libraries' messages", page, re.M)
    assert re.search(r"^  optim\.grad_clip=1\.0 +0 = off$", page, re.M)  # a field comment
    assert re.search(r"^  moe\.every=1 +Model-level placement", page, re.M)  # comment above
    assert re.search(r"^model: Decoder-only Transformer", page, re.M)  # the node's docstring


def test_help_is_not_hydras_page(page):
    assert "xpar_schema" not in page and "schema" not in page.split()
    assert "Powered by Hydra" not in page
    assert max(len(line) for line in page.splitlines()) <= 120


def test_only_rank_0_prints_the_help():
    p = _help("--help", RANK="1")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_hydra_help_is_still_hydras():
    p = _help("--hydra-help")
    assert p.returncode == 0 and "Hydra" in p.stdout


@dataclasses.dataclass
class _Documented:
    """A node.

    alpha=0 means off. beta: the second one,
    over two lines.
    """

    alpha: int = 0
    beta: int = 1
    gamma: int = 2  # the third
    # the fourth, above its line
    delta: int = 3
    epsilon: int = 4


def test_field_docs_reads_comments_and_docstring_entries():
    assert field_docs(_Documented) == {
        "alpha": "alpha=0 means off.",
        "beta": "the second one, over two lines.",
        "gamma": "the third",
        "delta": "the fourth, above its line",
    }


def test_help_text_in_process_matches(page):
    assert help_text() + "\n" == page

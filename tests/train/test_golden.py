"""Golden numbers: refactors keep the tiny run's loss curve bitwise, and old checkpoints resume.

The expected values were recorded by `python tests/fixtures/golden.py record` before the
structure refactor (issue 7). A CPU whose float kernels round differently in the last bits
gives its own exact curve from the same code: `other_machines` lists those, and a run must
match one of the recorded curves exactly. The checkpoint fixture under tests/fixtures/ckpt_v1 was
written by that code too, so resuming it proves a checkpoint from before any later config
field still loads and continues the same curve.
"""

import json

import pytest

from tests.fixtures import golden

pytestmark = pytest.mark.slow


def recorded(key: str) -> list[dict[int, float]]:
    """The curves recorded under `key`: the recorder's machine's, then other machines'."""
    rec = json.loads(golden.GOLDEN.read_text())
    tables = [rec] + rec.get("other_machines", [])
    return [{int(k): v for k, v in t[key].items()} for t in tables if key in t]


def test_tiny_losses_are_bitwise_the_recorded_ones(tmp_path):
    want = recorded("tiny_losses")
    got = golden.run_tiny(tmp_path)
    assert got in want, f"the experiment=tiny loss curve moved: {got} is none of {want}"


def test_checkpoint_written_before_the_refactor_resumes_on_the_same_curve(tmp_path):
    want = json.loads(golden.GOLDEN.read_text())["fixture_step3_loss"]
    got = golden.resume_fixture(tmp_path)
    assert sorted(got) == [3], got
    assert got[3] == want, f"resumed step 3 loss {got[3]!r}, recorded {want!r}"


def test_stdlib_tiny_losses_are_bitwise_the_recorded_ones(tmp_path):
    """`experiment=tiny` exactly as documented (the stdlib corpus depends on the Python)."""
    import platform

    rec = json.loads(golden.GOLDEN.read_text())
    if platform.python_version() != rec["stdlib_python"]:
        pytest.skip(
            f"recorded on Python {rec['stdlib_python']}, this is {platform.python_version()}"
        )
    golden.torchrun(tmp_path / "run", ["experiment=tiny", "logger.wandb_mode=disabled"])
    got = golden.losses(tmp_path / "run")
    assert got in recorded("stdlib_tiny_losses"), got

"""Golden numbers: refactors keep the tiny run's loss curve bitwise, and old checkpoints resume.

The expected values were recorded by `python tests/fixtures/golden.py record` before the
structure refactor (issue 7); the checkpoint fixture under tests/fixtures/ckpt_v1 was
written by that code too, so resuming it proves a checkpoint from before any later config
field still loads and continues the same curve.
"""

import json

import pytest

from tests.fixtures import golden

pytestmark = pytest.mark.slow


def test_tiny_losses_are_bitwise_the_recorded_ones(tmp_path):
    want = {int(k): v for k, v in json.loads(golden.GOLDEN.read_text())["tiny_losses"].items()}
    got = golden.run_tiny(tmp_path)
    assert got == want, f"the experiment=tiny loss curve moved: {got} vs {want}"


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
    want = {int(k): v for k, v in rec["stdlib_tiny_losses"].items()}
    golden.torchrun(tmp_path / "run", ["experiment=tiny", "logger.wandb_mode=disabled"])
    assert golden.losses(tmp_path / "run") == want

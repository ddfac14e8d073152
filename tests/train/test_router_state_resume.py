"""Balance state that lives outside the gradient resumes bitwise: the hash table fitted to
the corpus and the aux-loss-free bias are saved with the weights, so a killed and resumed
run continues the same loss curve as an uninterrupted one (2 ranks, experts sharded)."""

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import golden

pytestmark = pytest.mark.slow

COMMON = [
    "experiment=tiny",
    "train.steps=8",
    "train.ckpt_every=4",
    "train.eval_every=100",
    "logger.wandb_mode=disabled",
]


def _losses(out_dir):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def crash_and_resume(tmp_path: Path, overrides: list[str]) -> Path:
    """8 steps straight, and 8 steps killed after step 5 and resumed from step 4's
    checkpoint: the resumed steps' losses are bitwise the straight run's. The straight
    run's directory."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    golden.torchrun(straight, COMMON + overrides)
    p = golden.torchrun(
        broken, COMMON + overrides, env={"XPAR_TEST_CRASH_AFTER_STEP": "5"}, check=False
    )
    assert p.returncode != 0
    golden.torchrun(broken, COMMON + overrides + ["train.resume=auto"])
    want = dict(_losses(straight))
    got = _losses(broken)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert {s: v for s, v in got[5:]} == {s: want[s] for s in (5, 6, 7, 8)}
    return straight


@pytest.mark.parametrize(
    "router,buffer",
    [
        (["moe=hash"], "table_VK"),
        (["+moe.router_options.bias_update_rate=0.01"], "expert_bias_E"),
    ],
    ids=["hash_balanced", "aux_free_bias"],
)
def test_router_state_resumes_bitwise(tmp_path, router, buffer):
    straight = crash_and_resume(tmp_path, router)
    # The state is in the checkpoint, equal on both ranks, and not its initial value.
    step4 = straight / "checkpoints" / "step_00000004"
    states = [torch.load(f, weights_only=False)["module"] for f in sorted(step4.glob("rank*.pt"))]
    keys = [k for k in states[0] if k.endswith(buffer)]
    assert keys, f"no {buffer} saved"
    for k in keys:
        assert torch.equal(states[0][k], states[1][k])
    if buffer == "expert_bias_E":
        assert any(states[0][k].abs().sum() > 0 for k in keys), "the bias never moved"

"""Attention state that lives outside the gradient resumes bitwise inside the trainer: the
performer's random-feature draw counter (redrawn every 3 training calls here) and the
routing attention's k-means centroids are buffers in the checkpoint, so a run killed after
step 5 and resumed continues the loss curve of an uninterrupted one (2 ranks, experts
sharded)."""

import pytest
import torch

from tests.fixtures import golden
from tests.train.test_router_state_resume import COMMON, _losses

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "attention,buffer",
    [
        (["attention=performer", "model.attention_options.redraw_interval=3"], "train_calls"),
        (["attention=routing"], "centroids_HCK"),
    ],
    ids=["performer_redraws", "routing_centroids"],
)
def test_attention_state_resumes_bitwise(tmp_path, attention, buffer):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    golden.torchrun(straight, COMMON + attention)
    p = golden.torchrun(
        broken, COMMON + attention, env={"XPAR_TEST_CRASH_AFTER_STEP": "5"}, check=False
    )
    assert p.returncode != 0
    golden.torchrun(broken, COMMON + attention + ["train.resume=auto"])
    want = dict(_losses(straight))
    got = _losses(broken)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert {s: v for s, v in got[5:]} == {s: want[s] for s in (5, 6, 7, 8)}
    step4 = straight / "checkpoints" / "step_00000004"
    (state,) = [torch.load(f, weights_only=False)["module"] for f in step4.glob("rank00000.pt")]
    keys = [k for k in state if k.endswith(buffer)]
    assert keys, f"no {buffer} saved"

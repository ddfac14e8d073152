"""Attention state that lives outside the gradient resumes bitwise inside the trainer: the
performer's random-feature draw counter (redrawn every 3 training calls here) and the
routing attention's k-means centroids are buffers in the checkpoint, so a run killed after
step 5 and resumed continues the loss curve of an uninterrupted one (2 ranks, experts
sharded)."""

import pytest
import torch

from tests.train.test_router_state_resume import crash_and_resume

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
    straight = crash_and_resume(tmp_path, attention)
    step4 = straight / "checkpoints" / "step_00000004"
    (state,) = [torch.load(f, weights_only=False)["module"] for f in step4.glob("rank00000.pt")]
    assert [k for k in state if k.endswith(buffer)], f"no {buffer} saved"

"""The distillation teacher: any checkpoint's weights, whatever its EP size, rebuilt whole
and sliced for this run's EP layout; its vocabulary must be the student's."""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.train import saved_model, teacher
from xpar.train.checkpoint import rank_file


def _fixture():
    from pathlib import Path

    return Path(__file__).parents[1] / "fixtures" / "ckpt_v1" / "step_00000002"


def _model(run):
    cfgs = run["model"]
    moe = MoEConfig(**cfgs["moe"])
    return MoETransformer(ModelConfig(**cfgs["model"]), moe, ep_group="local"), moe


def test_full_state_joins_the_expert_slices_of_every_rank_file():
    d = _fixture()  # saved with ep_size=2 on 2 ranks
    parts = [torch.load(rank_file(d, r), weights_only=False)["module"] for r in (0, 1)]
    full = saved_model.full_state(d)
    run = teacher.saved_run(d)
    E = run["model"]["moe"]["num_experts"]
    for key, value in full.items():
        if ".experts.w" in key:
            assert value.shape[0] == E
            torch.testing.assert_close(
                value, torch.cat([parts[0][key], parts[1][key]]), rtol=0, atol=0
            )
        else:
            assert torch.equal(value, parts[0][key])


def test_one_process_teacher_holds_every_expert_bitwise():
    d = _fixture()
    run = teacher.saved_run(d)
    model, _ = _model(run)
    saved_model.load_sliced(model, saved_model.full_state(d))
    full = saved_model.full_state(d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_a_slice_for_another_layout_is_the_matching_rows():
    d = _fixture()
    run = teacher.saved_run(d)
    cfgs = run["model"]
    moe = MoEConfig(**cfgs["moe"])
    full = saved_model.full_state(d)
    # EP=4 rank 3 holds expert 3 of 4: build its banks by hand and load.
    from xpar.moe.experts import GroupedExperts

    bank = GroupedExperts(
        moe.num_experts, cfgs["model"]["d_model"], moe.d_ff, moe.activation, ids=range(3, 4)
    )
    holder = torch.nn.Module()
    holder.experts = bank
    state = {f"experts.{w}": full[f"blocks.0.ffn.experts.{w}"] for w in ("w1", "w2")}
    saved_model.load_sliced(holder, state)
    assert torch.equal(bank.w1, full["blocks.0.ffn.experts.w1"][3:4])


def test_a_teacher_with_another_vocabulary_is_refused():
    run = {
        "model": {"model": {"vocab_size": 320}},
        "tokenizer": {"spec": "byte", "fingerprint": "a"},
    }
    with pytest.raises(XparConfigError, match="train.distill.teacher.*vocabulary"):
        teacher.check_vocabulary(run, {"spec": "hf:x", "fingerprint": "b"}, 320)
    with pytest.raises(XparConfigError, match="model vocab 320"):
        teacher.check_vocabulary(run, {"spec": "byte", "fingerprint": "a"}, 384)
    teacher.check_vocabulary(run, {"spec": "byte", "fingerprint": "a"}, 320)


def test_a_directory_without_a_run_record_is_a_config_error(tmp_path):
    with pytest.raises(XparConfigError, match="is not a checkpoint"):
        teacher.saved_run(tmp_path)
    (tmp_path / "client_state.json").write_text('{"step": 3}')
    with pytest.raises(XparConfigError, match="records no model config"):
        teacher.saved_run(tmp_path)

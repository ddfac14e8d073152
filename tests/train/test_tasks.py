"""The tasks end to end on the real trainer: the encoder's masked LM under expert parallel
equals one process, fine-tuning from a pre-trained encoder, and distillation from a teacher
saved with another EP size."""

import pytest
import torch

from xpar.testing import run_distributed

pytestmark = pytest.mark.slow

BASE = [
    "experiment=tiny",
    "train.eval_every=100",
    "train.ckpt_every=100",
    "train.resume=never",
    "logger.wandb_mode=disabled",
]
ENCODER = ["model.causal=false", "moe.capacity_factor=null", "moe.balance_scope=global"]


def _train(rank, world, runs):
    from xpar.config.store import compose_config
    from xpar.train.trainer import train

    out = []
    for overrides in runs:
        res = train(compose_config(overrides, world_size=world))
        out.append((res.losses, res.val_loss_after, res.checkpoint))
    return out


def _same(a, b, tol):
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tol, f"curves differ by {worst:.3g}: {a} vs {b}"


def test_masked_lm_under_expert_parallel_equals_one_process(tmp_path):
    common = BASE + ENCODER + ["train.steps=4", "parallel.zero_stage=2"]
    ep = common + ["train.micro_batch_size=2", f"train.out_dir={tmp_path}/ep"]
    one = common + ["train.micro_batch_size=4", f"train.out_dir={tmp_path}/one"]
    ((ep_losses, ep_val, _),) = run_distributed(_train, 2, [ep], timeout=600)[0]
    ((one_losses, one_val, _),) = run_distributed(_train, 1, [one], timeout=600)[0]
    _same(ep_losses, one_losses, 1e-5)
    assert abs(ep_val - one_val) < 1e-5
    assert ep_losses[4] < ep_losses[1]


def test_fine_tuning_starts_from_the_encoder_and_reports_accuracy(tmp_path):
    pre = BASE + ENCODER + ["train.steps=6", f"train.out_dir={tmp_path}/pre"]
    ((_, _, ckpt),) = run_distributed(_train, 2, [pre], timeout=600)[0]
    tune = (
        BASE
        + ENCODER
        + [
            "task=classify",
            "train.steps=3",
            "train.eval_batches=4",
            f"train.init_from={ckpt}",
            f"train.out_dir={tmp_path}/tune",
        ]
    )
    # Saved at EP=2, fine-tuned in one process: the backbone is re-sliced.
    ((losses, val, _),) = run_distributed(_train, 1, [tune], timeout=600)[0]
    assert sorted(losses) == [1, 2, 3] and val == val
    from xpar.train.checkpoint import rank_file

    pre_state = torch.load(rank_file(ckpt, 0), weights_only=False)["module"]
    assert "lm_head.weight" in pre_state


def _teacher_val(rank, world, ckpt, overrides):
    """The teacher rebuilt in this process, scored on the run's validation batches."""
    from xpar.config.store import compose_config
    from xpar.data.build import build_data
    from xpar.parallel.groups import init_parallel
    from xpar.train import teacher
    from xpar.train.objective import lm_loss

    cfg = compose_config(overrides, world_size=world)
    data = build_data(
        cfg.data, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size
    )
    groups = init_parallel(1, "gloo", 60)
    model = teacher.build_teacher(ckpt, groups, torch.device("cpu"))
    batches = data.val_batches(cfg.train.eval_batches)
    with torch.no_grad():
        return sum(lm_loss(model(x)[0], y).item() for x, y in batches) / len(batches)


def test_a_teacher_saved_at_ep2_scores_like_its_own_run_in_one_process(tmp_path):
    # Dropless: capacity is per rank, so 2 ranks of B drop differently from one of 2B.
    tea = BASE + [
        "moe.capacity_factor=null",
        "train.steps=5",
        "train.micro_batch_size=4",
        f"train.out_dir={tmp_path}/t",
    ]
    ((_, tea_val, ckpt),) = run_distributed(_train, 2, [tea], timeout=600)[0]
    one = BASE + ["moe.capacity_factor=null", "train.micro_batch_size=8"]
    got = run_distributed(_teacher_val, 1, ckpt, one, timeout=600)[0]
    assert abs(got - tea_val) < 1e-5, (got, tea_val)

    # alpha=0 is the plain LM loss; alpha=1 learns from the teacher alone.
    dense = BASE + ["moe=dense", "train.steps=3", "train.micro_batch_size=4"]
    runs = [
        dense + [f"train.out_dir={tmp_path}/plain"],
        dense
        + [
            f"train.distill.teacher={ckpt}",
            "train.distill.alpha=0",
            f"train.out_dir={tmp_path}/a0",
        ],
        dense
        + [
            f"train.distill.teacher={ckpt}",
            "train.distill.alpha=1",
            f"train.out_dir={tmp_path}/a1",
        ],
    ]
    (plain, _, _), (a0, _, _), (a1, _, _) = run_distributed(_train, 2, runs, timeout=600)[0]
    _same(plain, a0, 1e-5)
    assert max(abs(plain[s] - a1[s]) for s in plain) > 1e-3

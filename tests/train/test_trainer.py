"""The trainer end to end on real gloo ranks, real DeepSpeed engines, real data.

Parity promises: expert parallel equals one process holding every expert; ZeRO
stages agree; a killed and resumed run continues the same loss curve exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import golden
from xpar.testing import run_distributed
from xpar.train.sinks.load_map import read_loads

pytestmark = pytest.mark.slow

BASE = [
    "experiment=tiny",
    "moe.capacity_factor=null",  # dropless: capacity is per rank, so EP=2 vs 1 differs otherwise
    # The balance loss's load summed over every rank: the same loss whatever the rank count.
    "moe.balance_scope=global",
    "moe.aux_loss_weight=0.01",
    "train.steps=5",
    "train.eval_every=100",
    "train.ckpt_every=100",
    "train.resume=never",
    "logger.wandb_mode=disabled",
]


def _train_losses(rank, world, runs):
    from xpar.config.store import compose_config
    from xpar.train.trainer import train

    out = []
    for overrides in runs:
        res = train(compose_config(overrides, world_size=world))
        out.append(res.losses)
    return out


def _assert_same_curve(a, b, tol):
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tol, f"loss curves differ by {worst:.3g}: {a} vs {b}"


def test_expert_parallel_zero2_equals_one_process(tmp_path):
    ep = BASE + [
        "parallel.zero_stage=2",
        "train.micro_batch_size=2",
        f"train.out_dir={tmp_path}/ep",
    ]
    one = BASE + [
        "parallel.zero_stage=2",
        "train.micro_batch_size=4",
        f"train.out_dir={tmp_path}/one",
    ]
    (ep_losses,) = run_distributed(_train_losses, 2, [ep], timeout=600)[0]
    (one_losses,) = run_distributed(_train_losses, 1, [one], timeout=600)[0]
    assert ep_losses[5] < ep_losses[1], "the run should learn something"
    _assert_same_curve(ep_losses, one_losses, 1e-5)


def test_global_balance_loss_makes_expert_parallel_equal_one_process(tmp_path):
    """moe.balance_scope=global: the balance loss's load is summed over every rank, so with a
    non-zero aux_loss_weight EP=2 still equals one process; the per-rank (micro_batch) loss
    does not, which shows the comparison can fail."""
    aux = [o for o in BASE if not o.startswith(("moe.aux_loss_weight", "moe.balance_scope"))]
    aux += ["moe.aux_loss_weight=0.05", "parallel.zero_stage=2"]

    def arms(tag, scope):
        return [
            aux
            + [
                f"moe.balance_scope={scope}",
                "train.micro_batch_size=2",
                f"train.out_dir={tmp_path}/{tag}_ep",
            ],
            aux
            + [
                f"moe.balance_scope={scope}",
                "train.micro_batch_size=4",
                f"train.out_dir={tmp_path}/{tag}_one",
            ],
        ]

    glob_ep, local_ep = run_distributed(
        _train_losses, 2, [arms("g", "global")[0], arms("l", "micro_batch")[0]], timeout=600
    )[0]
    glob_one, local_one = run_distributed(
        _train_losses, 1, [arms("g", "global")[1], arms("l", "micro_batch")[1]], timeout=600
    )[0]
    _assert_same_curve(glob_ep, glob_one, 1e-5)
    worst = max(abs(local_ep[s] - local_one[s]) for s in local_ep)
    assert worst > 1e-5, f"the per-rank balance loss should differ from one process ({worst:.3g})"


def test_zero_stages_agree(tmp_path):
    runs = [
        BASE + [f"parallel.zero_stage={z}", f"train.out_dir={tmp_path}/z{z}"] for z in (0, 1, 2)
    ]
    z0, z1, z2 = run_distributed(_train_losses, 2, runs, timeout=600)[0]
    _assert_same_curve(z0, z1, 1e-5)
    _assert_same_curve(z0, z2, 1e-5)


def _torchrun(out_dir, *overrides, env=None, check=True):
    return golden.torchrun(out_dir, ["experiment=tiny", *overrides], env=env, check=check)


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_killed_and_resumed_run_continues_the_same_loss_curve(tmp_path):
    common = ["train.steps=12", "train.ckpt_every=6", "train.eval_every=100"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _torchrun(straight, *common)
    # SIGKILL both ranks right after step 7 (the checkpoint of step 6 is complete).
    p = _torchrun(broken, *common, env={"XPAR_TEST_CRASH_AFTER_STEP": "7"}, check=False)
    assert p.returncode != 0
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    first = _losses(broken)
    assert max(first) == 7
    p = _torchrun(broken, *common, "train.resume=auto")
    assert "resumed from" in p.stdout and "at step 6" in p.stdout
    resumed = {}
    for line in (broken / "metrics.jsonl").read_text().splitlines()[len(first) :]:
        r = json.loads(line)
        resumed[r["step"]] = r["loss"]
    assert sorted(resumed) == list(range(7, 13))
    want = _losses(straight)
    # Bitwise on CPU with deterministic settings.
    assert [resumed[s] for s in range(7, 13)] == [want[s] for s in range(7, 13)]
    assert [first[s] for s in range(1, 8)] == [want[s] for s in range(1, 8)]
    # the expert-load picture covers both segments of the run
    steps, counts = read_loads(broken / "expert_load.jsonl")
    assert steps == read_loads(straight / "expert_load.jsonl")[0] and steps[-1] == 12
    assert (broken / "expert_load.png").exists()

    # The resumed run kept its W&B run: one run id across both segments, metrics on disk.
    from xpar.train.wandb_reader import read_offline_run

    run = read_offline_run(broken / "wandb")
    keys = set().union(*(row.keys() for row in run["history"]))
    for k in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "moe/aux_loss",
        "moe/z_loss",
        "moe/layer_0/dropped_fraction",
        "moe/layer_0/max_load",
        "moe/layer_0/mean_load",
        "moe/layer_0/router_entropy",
        "moe/layer_0/tokens_per_expert",
        "val/loss",
        "val/ppl",
    ):
        assert k in keys, f"{k} not logged"
    assert run["config"]["moe"]["num_experts"] == 4


def test_crash_while_saving_keeps_latest_on_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = _torchrun(
        out,
        "train.steps=6",
        "train.ckpt_every=3",
        "logger.wandb_mode=disabled",
        env={"XPAR_TEST_CRASH_BEFORE_PUBLISH": "6"},
        check=False,
    )
    assert p.returncode != 0
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert (ck / "step_00000006").is_dir()  # written but never published
    p = _torchrun(out, "train.steps=6", "train.ckpt_every=3", "logger.wandb_mode=disabled")
    assert "at step 3" in p.stdout
    assert (ck / "latest").read_text().strip() == "step_00000006"
    # A different model in the same directory is refused, not half-loaded.
    p = _torchrun(out, "train.steps=8", "moe.d_ff=32", "logger.wandb_mode=disabled", check=False)
    assert p.returncode != 0
    assert "different model (moe.d_ff: checkpoint 64, now 32)" in p.stderr


def test_config_error_is_reported_before_any_process_group(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "xpar.train",
        "experiment=tiny",
        "parallel.ep_size=3",
        f"train.out_dir={tmp_path}",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"},
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "xpar: config error: parallel.ep_size=3" in p.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_corpus_without_a_sequence_is_a_config_error_before_any_process_group(tmp_path):
    (tmp_path / "tiny.txt").write_text("too short\n")
    cmd = [
        sys.executable,
        "-m",
        "xpar.train",
        "experiment=tiny",
        "data=files",
        f"data.files=[{tmp_path / 'tiny.txt'}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.out_dir={tmp_path / 'out'}",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "WORLD_SIZE": "2",
            "RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "1",
        },
    )
    # WORLD_SIZE=2 with nobody else: reaching the rendezvous would hang or fail differently.
    assert p.returncode == 2, p.stderr[-2000:]
    assert "xpar: config error: data.seq_len=64 leaves no train block" in p.stderr

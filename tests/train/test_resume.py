"""Where a run starts (xpar.train.resume): the plan from the files in out_dir, and the trainer
acting on it end to end.

- plan: plain functions on a composed config and checkpoint files on disk, no process group.
- overwrite: 2 gloo ranks; rank 0 clears, rank 1 must not see an old file after the barrier.
- trainer (slow, torchrun on 2 ranks, the committed corpus): a time limit stops and saves, a
  rerun resumes, a finished run has nothing to do (exit 4, or 0 with noop_ok); a changed config
  is refused, MAY_DIFFER fields are not, the LR schedule keeps its length and force applies the
  config's lr; resume=never refuses an occupied out_dir and overwrite replaces the old run (a
  1-rank run after a 2-rank one leaves no stale rank file); init_from starts a new run from the
  weights, and a rerun of the same command resumes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.fixtures import golden
from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.testing import run_distributed
from xpar.train import checkpoint as ckpt
from xpar.train import resume
from xpar.train.init_source import InitSource
from xpar.train.schedule import make_lr_lambda

# ------------------------------------------------------------------ the plan


def _cfg(out, *overrides):
    return compose_config(
        ["experiment=tiny", f"train.out_dir={out}", *overrides], world_size=1, cuda_available=False
    )


def _checkpoint(out: Path, step: int, **shared) -> Path:
    """A published checkpoint of `step` under out/checkpoints (its client state only)."""
    root = out / "checkpoints"
    d = ckpt.step_dir(root, step)
    d.mkdir(parents=True)
    ckpt.write_client_state(d, {"step": step, **shared})
    ckpt.publish(root, step)
    return d


def test_nothing_to_resume_starts_fresh(tmp_path):
    start = resume.plan_start(_cfg(tmp_path / "new"))
    assert start == resume.Start(schedule_steps=6)


def test_a_finished_run_has_nothing_to_do_exit_4_or_0_with_noop_ok(tmp_path):
    d = _checkpoint(tmp_path, 6, schedule_steps=6)
    for steps in (6, 3):
        start = resume.plan_start(_cfg(tmp_path, f"train.steps={steps}"))
        assert start.resume == d and start.step == 6
        assert start.exit_code == resume.EXIT_NOTHING_TO_DO == 4
        assert start.finished.startswith(f"xpar: nothing to do: {d} is at step 6 and train.")
        assert "train.noop_ok=true exits 0" in start.finished and "\n" not in start.finished
    ok = resume.plan_start(_cfg(tmp_path, "train.noop_ok=true", "train.resume=force"))
    assert ok.finished and ok.exit_code == 0
    assert resume.plan_start(_cfg(tmp_path, "train.steps=7")).finished is None


def test_a_resume_keeps_the_saved_schedule_length_and_says_so(tmp_path):
    _checkpoint(tmp_path, 4, schedule_steps=6)
    start = resume.plan_start(_cfg(tmp_path, "train.steps=10"))
    assert (start.step, start.schedule_steps) == (4, 6)
    (note,) = start.notes
    assert "keeps the checkpoint's length of 6 steps (train.steps=10" in note
    assert "steps 7..10 hold optim.min_lr=0.0003" in note
    assert resume.plan_start(_cfg(tmp_path, "train.steps=6")).notes == ()


def test_a_checkpoint_from_before_the_schedule_was_recorded_uses_train_steps(tmp_path):
    _checkpoint(tmp_path, 2)  # like tests/fixtures/ckpt_v1
    start = resume.plan_start(_cfg(tmp_path, "train.steps=3"))
    assert (start.schedule_steps, start.notes) == (3, ())


def test_resume_never_refuses_an_out_dir_holding_a_run_unless_overwrite(tmp_path):
    _checkpoint(tmp_path, 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "wandb").mkdir()
    (tmp_path / ".hydra").mkdir()  # this launch's own: never the old run's
    with pytest.raises(XparConfigError) as e:
        resume.plan_start(_cfg(tmp_path, "train.resume=never"))
    msg = str(e.value)
    assert f"train.out_dir='{tmp_path}' holds a run (checkpoints, metrics.jsonl)" in msg
    assert "train.overwrite=true" in msg and "train.resume=auto to continue it" in msg
    start = resume.plan_start(_cfg(tmp_path, "train.resume=never", "train.overwrite=true"))
    assert start.resume is None and start.step == 0
    assert start.clear == tuple(tmp_path / n for n in ("checkpoints", "metrics.jsonl", "wandb"))


def test_auto_without_a_checkpoint_in_a_used_out_dir_is_refused_too(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before it saved
    with pytest.raises(XparConfigError, match="train.resume=auto found no checkpoint to continue"):
        resume.plan_start(_cfg(tmp_path))
    # partial step directories without `latest` count as a run as well
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "checkpoints" / "step_00000003").mkdir(parents=True)
    with pytest.raises(XparConfigError, match=r"holds a run \(checkpoints\)"):
        resume.plan_start(_cfg(tmp_path, "train.resume=never"))
    # an empty checkpoints/ (a run that failed before step 1) is not a run
    (tmp_path / "checkpoints" / "step_00000003").rmdir()
    assert resume.plan_start(_cfg(tmp_path)).clear == ()


def test_overwrite_with_a_checkpoint_to_resume_resumes_and_says_overwrite_is_unused(tmp_path):
    _checkpoint(tmp_path, 2)
    start = resume.plan_start(_cfg(tmp_path, "train.overwrite=true"))
    assert start.resume is not None and start.clear == ()
    assert any("train.overwrite=true is not used" in n for n in start.notes)


def test_init_from_is_a_fresh_start_unless_out_dir_has_a_checkpoint(tmp_path):
    src = _checkpoint(tmp_path / "src", 6)
    for value in (src, src.parent, tmp_path / "src"):  # step dir, checkpoints/, out_dir
        start = resume.plan_start(_cfg(tmp_path / "new", f"train.init_from={value}"))
        assert (start.init_from.path, start.resume, start.step) == (src, None, 0)
    own = _checkpoint(tmp_path / "new", 2)
    start = resume.plan_start(_cfg(tmp_path / "new", f"train.init_from={src}"))
    assert (start.resume, start.init_from) == (own, None)
    (note,) = start.notes
    assert f"train.init_from='{src}' is not used: resuming {own} at step 2" in note


def test_init_from_with_an_explicit_resume_dir_or_a_non_checkpoint_is_refused(tmp_path):
    src = _checkpoint(tmp_path / "src", 6)
    with pytest.raises(XparConfigError, match="both name a checkpoint"):
        resume.plan_start(_cfg(tmp_path / "new", f"train.init_from={src}", f"train.resume={src}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(XparConfigError, match=r"train.init_from='.*empty' is not a checkpoint"):
        resume.plan_start(_cfg(tmp_path / "new", f"train.init_from={tmp_path / 'empty'}"))
    assert resume.plan_start(_cfg(tmp_path / "new", f"train.resume={src}")).resume == src


def test_init_from_loads_a_checkpoint_of_another_expert_parallel_size():
    from types import SimpleNamespace

    from xpar.models import MoETransformer
    from xpar.train import model_setup, saved_model

    src = golden.CKPT_FIXTURE / "step_00000002"  # saved with ep_size=2
    run = saved_model.saved_run(src, "test")
    model = MoETransformer(*saved_model.configs(run), ep_group="local")  # one process, EP=1
    groups = SimpleNamespace(rank=0, ep_rank=0, ep_size=1)
    moe_cfg = saved_model.configs(run)[1]
    model_setup.init_from(model, InitSource(src), groups, run, moe_cfg, seed=0)
    whole = saved_model.full_state(src, "test")
    assert any(saved_model.is_expert_bank(k) for k in whole)
    for key, value in model.state_dict().items():
        assert torch.equal(value, whole[key]), key  # every expert, bitwise


def test_force_keeps_the_configs_hyperparameters_over_the_loaded_ones():
    f = make_lr_lambda(schedule="cosine", lr=1e-3, min_lr=3e-4, warmup_steps=0, total_steps=4)

    def build(lr, wd):
        w = torch.nn.Parameter(torch.zeros(2))
        w.grad = torch.ones(2)
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)

    old_opt, old_sched = build(3e-3, 0.1)
    for _ in range(4):
        old_opt.step()
        old_sched.step()
    opt, sched = build(1e-3, 0.0)  # this run's config
    with resume.config_hyperparameters(sched):
        opt.load_state_dict(old_opt.state_dict())
        sched.load_state_dict(old_sched.state_dict())
    g = opt.param_groups[0]
    assert (g["weight_decay"], sched.base_lrs, sched.last_epoch) == (0.0, [1e-3], 4)
    assert g["lr"] == sched.get_last_lr()[0] == pytest.approx(3e-4)  # min_lr, not 9e-4
    assert opt.state_dict()["state"][0]["step"] == 4  # the moments are the checkpoint's
    # nothing differs: nothing is touched
    same_opt, same_sched = build(3e-3, 0.1)
    with resume.config_hyperparameters(same_sched):
        same_opt.load_state_dict(old_opt.state_dict())
        same_sched.load_state_dict(old_sched.state_dict())
    assert same_opt.param_groups[0]["lr"] == old_opt.param_groups[0]["lr"]


def _clear(rank, world, out):
    out = Path(out)
    start = resume.plan_start(_cfg(out, "train.resume=never", "train.overwrite=true"))
    dist.barrier()  # every rank plans before rank 0 clears, as the trainer's ranks do
    resume.clear_old_run(start, rank)
    return sorted(p.name for p in out.iterdir())


def test_overwrite_moves_the_old_run_aside_and_deletes_it_before_any_rank_goes_on(tmp_path):
    _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step_00000002" / "rank00001.pt").write_text("stale")
    for name in ("metrics.jsonl", "config.yaml", "startup.json", "cli.log"):
        (tmp_path / name).write_text("old")
    (tmp_path / "wandb" / "run-1").mkdir(parents=True)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".xpar-overwritten-0badf00d" / "checkpoints").mkdir(parents=True)  # a crash
    seen = run_distributed(_clear, 2, str(tmp_path))
    assert seen == [[".hydra", "cli.log"]] * 2  # this launch's Hydra files stay


# ------------------------------------------------------------------ the trainer, end to end


def _base(tmp_path, *more) -> list[str]:
    return ["experiment=tiny", "data=files", *golden.data_overrides(tmp_path / "cache"), *more]


def _plain(out, overrides) -> subprocess.CompletedProcess:
    """`python -m xpar.train` without torchrun: its exit status is the trainer's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "xpar.train", f"train.out_dir={out}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _rows(out) -> dict[int, dict]:
    return {
        r["step"]: r
        for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    }


def _latest(out) -> str:
    return (Path(out) / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_time_limit_stops_and_saves_a_rerun_resumes_then_there_is_nothing_to_do(tmp_path):
    out, base = tmp_path / "run", _base(tmp_path, "logger.wandb_mode=disabled", "train.steps=4")
    p = golden.torchrun(out, [*base, "train.max_time_s=1e-9"])  # exit 0: the user's own limit
    assert "stopping at step 1 on train.max_time_s=1e-09" in p.stdout, p.stdout[-2000:]
    assert "requeue" not in p.stdout + p.stderr
    assert _latest(out) == "step_00000001" and sorted(_rows(out)) == [1]
    p = golden.torchrun(out, base)
    assert "at step 1" in p.stdout and sorted(_rows(out)) == [1, 2, 3, 4]

    before = (out / "metrics.jsonl").read_text()
    p = _plain(out, base)
    assert p.returncode == resume.EXIT_NOTHING_TO_DO, p.stderr[-2000:]
    (line,) = [x for x in p.stderr.splitlines() if "nothing to do" in x]
    assert line.startswith("xpar: nothing to do: ") and "step_00000004 is at step 4" in line
    assert "(exit 4;" in line
    p = _plain(out, [*base, "train.steps=3", "train.noop_ok=true"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "xpar: nothing to do: " in p.stderr and "(exit 0;" in p.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing was written


@pytest.mark.slow
def test_a_changed_config_is_refused_the_schedule_is_kept_and_force_applies_the_config(tmp_path):
    out, base = tmp_path / "run", _base(tmp_path, "logger.wandb_mode=disabled")
    golden.torchrun(out, [*base, "train.steps=4"])
    p = golden.torchrun(out, [*base, "train.steps=8", "optim.lr=1e-3"], check=False)
    assert p.returncode != 0
    assert "was written with a different config: optim.lr: checkpoint 0.003, now 0.001" in p.stderr
    assert "train.resume=force" in p.stderr
    assert _latest(out) == "step_00000004" and sorted(_rows(out)) == [1, 2, 3, 4]

    # what may differ (MAY_DIFFER) needs no force; the schedule is not re-stretched to 8
    p = golden.torchrun(out, [*base, "train.steps=8", "train.eval_every=2", "train.ckpt_every=8"])
    assert "keeps the checkpoint's length of 4 steps (train.steps=8" in p.stderr
    lr = {s: r["lr"] for s, r in _rows(out).items()}
    assert lr[3] > lr[4] == pytest.approx(3e-4)  # the cosine's end: optim.min_lr
    assert [lr[s] for s in range(5, 9)] == [lr[4]] * 4  # held, not back up to 1.65e-3

    p = golden.torchrun(out, [*base, "train.steps=10", "train.resume=force", "optim.lr=1e-3"])
    (line,) = [x for x in p.stderr.splitlines() if "train.resume=force: resuming" in x]
    assert "(optim.lr: checkpoint 0.003, now 0.001)" in line
    lr = {s: r["lr"] for s, r in _rows(out).items()}
    # min_lr again with the config's lr as the base: the checkpoint's 3e-3 would make it 9e-4
    assert lr[9] == lr[10] == pytest.approx(3e-4)


@pytest.mark.slow
def test_resume_never_refuses_a_used_out_dir_and_overwrite_replaces_the_old_run(
    tmp_path, wandb_home
):
    out, base = tmp_path / "run", _base(tmp_path, "train.steps=2")
    golden.torchrun(out, base)  # 2 ranks, W&B offline
    p = golden.torchrun(out, [*base, "train.resume=never"], check=False)
    assert p.returncode != 0
    assert "holds a run (checkpoints, metrics.jsonl)" in p.stderr
    assert "train.overwrite=true" in p.stderr
    assert _latest(out) == "step_00000002"

    over = [*base, "train.resume=never", "train.overwrite=true", "train.steps=3"]
    p = golden.torchrun(out, [*over, "parallel.ep_size=1"], nproc=1)
    assert "train.overwrite=true: deleted the old run in" in p.stdout
    names = sorted(p.name for p in (out / "checkpoints").rglob("*.pt"))
    # one process now: no stale rank00001.pt / universal00001.pt beside the new run
    assert names == ["rank00000.pt", "universal00000.pt"]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000003"]
    assert sorted(_rows(out)) == [1, 2, 3]
    assert not list(out.glob(".xpar-overwritten-*"))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_weights_and_a_rerun_resumes_it(tmp_path, wandb_home):
    src, new, base = tmp_path / "src", tmp_path / "new", _base(tmp_path)
    p = golden.torchrun(src, [*base, "train.steps=4"])
    src_val = p.stdout.split("val loss after: ")[1].split()[0]
    p = golden.torchrun(new, [*base, "train.steps=2", f"train.init_from={src}"])
    assert f"initialised from {src}/checkpoints/step_00000004 (its step 4)" in p.stdout
    assert f"val loss before: {src_val}" in p.stdout  # the source's weights, exactly
    rows, src_rows = _rows(new), _rows(src)
    assert sorted(rows) == [1, 2]
    assert rows[1]["lr"] == src_rows[1]["lr"]  # a fresh schedule: warmup again
    shared = ckpt.read_client_state(new / "checkpoints" / "step_00000002")
    src_shared = ckpt.read_client_state(src / "checkpoints" / "step_00000004")
    assert shared["tokens_seen"] == 2 * 2 * 2 * 64  # counted from 0
    assert shared["data"]["index"] < src_shared["data"]["index"]  # data from the start
    assert shared["wandb_run_id"] and shared["wandb_run_id"] != src_shared["wandb_run_id"]

    # the same command again (a requeue) continues its own checkpoint
    p = golden.torchrun(new, [*base, "train.steps=3", f"train.init_from={src}"])
    assert "is not used: resuming" in p.stderr and "at step 2" in p.stdout
    assert sorted(_rows(new)) == [1, 2, 3]
    assert (
        ckpt.read_client_state(new / "checkpoints" / "step_00000003")["wandb_run_id"]
        == (shared["wandb_run_id"])
    )

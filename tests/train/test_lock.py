"""The out_dir lock (xpar.train.lock): real processes and real lock files, no torchrun.

A live holder (another process) refuses with one line naming it; a SIGKILLed holder's lock
is taken over in one line; the stale rules for a lock from another machine, the same Slurm
job, a reused pid and an earlier torchrun restart; re-entrant in a process and released by
its owner only; not part of a run for resume; the launcher's check refuses a held out_dir.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from xpar.config.store import compose_config
from xpar.testing.processes import REPO, run_python
from xpar.train import lock, resume

HOLD = (
    "import sys, time; from xpar.train.lock import acquire; acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith(("TORCHELASTIC", "SLURM"))}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline() == "held\n"
    yield p
    p.kill()
    p.wait()


def _write(out, held: lock.Holder, age_s: float = 0.0):
    out.mkdir(parents=True, exist_ok=True)
    path = out / lock.LOCK_FILE
    path.write_text(held.dumps())
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_live_holder_refuses_and_a_killed_ones_lock_is_taken_over(tmp_path, holder, capsys):
    out = tmp_path / "run"
    with pytest.raises(lock.OutDirInUse) as e:
        lock.acquire(out)
    msg = str(e.value)
    assert msg.startswith(f"train.out_dir='{out}' is in use by another run (pid {holder.pid} on ")
    assert " since 20" in msg and "set a new train.out_dir" in msg and "\n" not in msg
    with pytest.raises(lock.OutDirInUse):
        lock.check_free(out)  # what the other ranks and the launcher's check do
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lock.acquire(out) as mine:
        err = capsys.readouterr().err
        assert err.startswith(
            f"xpar: took over the lock of a run that is gone (its process "
            f"{holder.pid} is gone; pid {holder.pid} on "
        )
        assert err.count("\n") == 1
        assert mine.owned() and lock.Holder.parse((out / lock.LOCK_FILE).read_text()).pid == (
            os.getpid()
        )
    assert not (out / lock.LOCK_FILE).exists()
    assert sorted(os.listdir(out)) == []  # no temp or guard file left


def test_reentrant_in_its_process_and_released_by_its_owner_only(tmp_path):
    a = lock.acquire(tmp_path)
    assert lock.acquire(tmp_path) is a and a.count == 2
    a.release()
    assert (tmp_path / lock.LOCK_FILE).exists()
    a.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()
    b = lock.acquire(tmp_path)
    other = dataclasses.replace(b.holder, token="someone-else")  # a run that took it over
    (tmp_path / lock.LOCK_FILE).write_text(other.dumps())
    b.release()
    assert lock.Holder.parse((tmp_path / lock.LOCK_FILE).read_text()).token == "someone-else"


def test_stale_rules(tmp_path, monkeypatch, capsys):
    me = lock.Holder.me("theirs")
    away = dataclasses.replace(me, host="elsewhere", pid=1, pid_start="1")
    fresh = _write(tmp_path / "a", away)
    with pytest.raises(lock.OutDirInUse, match=r"pid 1 on elsewhere since"):
        lock.acquire(fresh.parent)  # another host, refreshed lately: live
    old = _write(tmp_path / "b", away, age_s=lock.STALE_S + 10)
    lock.acquire(old.parent).release()
    assert "it was not refreshed for 3" in capsys.readouterr().err
    # a live pid on this machine that started at another time: the pid was reused
    reused = _write(tmp_path / "c", dataclasses.replace(me, pid=os.getppid(), pid_start="1"))
    lock.acquire(reused.parent).release()
    assert f"its process {os.getppid()} is gone" in capsys.readouterr().err
    live = _write(
        tmp_path / "d",
        dataclasses.replace(me, pid=os.getppid(), pid_start=lock.pid_start(os.getppid())),
    )
    with pytest.raises(lock.OutDirInUse):
        lock.acquire(live.parent)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    requeued = _write(tmp_path / "e", dataclasses.replace(away, slurm_job_id="77"))
    lock.acquire(requeued.parent).release()
    assert "Slurm job 77 was requeued" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_JOB_ID")
    for k, v in {"TORCHELASTIC_RUN_ID": "r1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    group = lock.Holder.me().group
    restarted = _write(tmp_path / "f", dataclasses.replace(away, group=group, restart=1))
    lock.check_free(restarted.parent)  # a rank of the restarted group: not refused
    lock.acquire(restarted.parent).release()
    assert "torchrun restarted the group (restart 1 -> 2)" in capsys.readouterr().err
    same_group = _write(tmp_path / "g", dataclasses.replace(away, group=group, restart=2))
    lock.check_free(same_group.parent)  # rank 0 of this very group holds it


def test_the_lock_is_not_part_of_a_run(tmp_path):
    with lock.acquire(tmp_path):
        assert resume.old_run_files(tmp_path) == []
        cfg = compose_config(
            ["experiment=tiny", f"train.out_dir={tmp_path}"], world_size=1, cuda_available=False
        )
        assert resume.plan_start(cfg).clear == ()


def test_the_launchers_check_refuses_a_held_out_dir(tmp_path, holder):
    p = run_python(
        "-m", "xpar.config.check", "experiment=tiny", f"train.out_dir={tmp_path / 'run'}"
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"xpar: config error: train.out_dir='{tmp_path / 'run'}' is in use")
    assert p.stderr.count("\n") == 1 and f"(pid {holder.pid} on " in p.stderr

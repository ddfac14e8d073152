"""Damaged checkpoints and failed saves: checksums, the fallback of train.resume=auto, pruning,
a full disk, kills while saving.

- files and plan: plain functions, no process group (the 4-rank fallback of the rank files,
  with real engines, is in tests/train/test_checkpoint.py's battery).
- a real full disk: a small tmpfs (root only; skipped where mount is not permitted).
- trainer (slow): torchrun on 2 ranks: a save that hits ENOSPC (XPAR_TEST_ENOSPC_AT_SAVE)
  fails the run and keeps `latest`; a truncated rank file in the newest checkpoint is
  refused when named, and train.resume=auto falls back to the previous one and trains on.
  Kills at random moments while saving: 20 of a world of one (tests/train/kill_during_save.py
  forks the real trainer), 2 of the real 2-rank job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures import golden
from tests.train.kill_during_save import latest_problem, pointer
from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.testing.processes import run_python
from xpar.train import checkpoint as ckpt
from xpar.train import faults, resume

FIXTURE_STEP = golden.CKPT_FIXTURE / "step_00000002"


def _cfg(out, *overrides):
    return compose_config(
        ["experiment=tiny", f"train.out_dir={out}", *overrides], world_size=1, cuda_available=False
    )


def _checkpoint(out: Path, step: int, **shared) -> Path:
    """A published checkpoint of `step` (a rank file, the layout and the client state, each
    with its checksum file), as the trainer's save lays it out."""
    root = out / "checkpoints"
    d = ckpt.step_dir(root, step)
    d.mkdir(parents=True)
    ckpt.write_checked(ckpt.rank_file(d, 0), lambda f: torch.save({"w": torch.ones(64)}, f))
    ckpt.write_checked(d / ckpt.LAYOUT_FILE, json.dumps({"format": ckpt.FORMAT}))
    ckpt.write_client_state(d, {"step": step, "schedule_steps": 6, **shared})
    ckpt.publish(root, step)
    return d


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------ checksums


def test_each_file_is_written_with_its_size_and_sha256_and_verified(tmp_path):
    d = _checkpoint(tmp_path, 2)
    for name in ("rank00000.pt", ckpt.CLIENT_STATE):
        record = json.loads(ckpt.sum_file(d / name).read_text())
        size, sha = ckpt.digest(d / name)
        assert record == {"file": name, "bytes": size, "sha256": sha}
        assert ckpt.file_problem(d / name) is None
    # hashed as written: the stream torch.save wrote is the file's bytes
    assert torch.equal(torch.load(d / "rank00000.pt", weights_only=True)["w"], torch.ones(64))
    assert ckpt.read_client_state(d) == {"step": 2, "schedule_steps": 6}
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temp


def test_a_checkpoint_from_before_the_checksums_is_read_without_them():
    assert not ckpt.has_checksums(FIXTURE_STEP)
    for f in FIXTURE_STEP.iterdir():
        assert ckpt.file_problem(f) is None
    assert ckpt.read_client_state(FIXTURE_STEP)["step"] == 2
    assert ckpt.sound(FIXTURE_STEP)


def test_truncated_changed_missing_files_are_named_with_what_was_expected(tmp_path):
    d = _checkpoint(tmp_path, 2)
    f = d / "rank00000.pt"
    size, sha = ckpt.digest(f)
    _flip(f)
    got = ckpt.file_problem(f)
    found = ckpt.digest(f)[1]
    assert got == (
        f"{f} has sha256 {found[:16]}..., expected {sha[:16]}... "
        "(its bytes changed after it was written)"
    )
    _truncate(f)
    assert ckpt.file_problem(f) == f"{f} is {size // 2} bytes, expected {size} (truncated)"
    assert ckpt.file_problem(f, deep=False) is not None and not ckpt.sound(d)
    ckpt.sum_file(f).write_text("{not json")
    assert "has an unreadable checksum file rank00000.pt.sum.json" in ckpt.file_problem(f)
    ckpt.sum_file(f).unlink()  # the others have theirs: this write did not finish
    assert ckpt.file_problem(f) == (
        f"{f} has no checksum file rank00000.pt.sum.json (its write did not finish)"
    )
    f.unlink()
    assert ckpt.file_problem(f) == f"{f} is missing"
    # client_state.json: checked, then parsed
    _flip(d / ckpt.CLIENT_STATE, at=0)
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"client_state.json has sha256 .* expected"):
        ckpt.read_client_state(d)


def test_a_torch_file_that_cannot_be_read_is_named(tmp_path):
    # an old checkpoint (no checksums): the damage shows when torch reads it
    d = tmp_path / "step_00000002"
    d.mkdir()
    f = d / "rank00000.pt"
    f.write_bytes(FIXTURE_STEP.joinpath("rank00000.pt").read_bytes()[:1000])
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        ckpt._verified_load(f, [])
    assert str(e.value).startswith(f"{f} cannot be read by torch.load (")
    assert "central directory" in str(e.value)


# ------------------------------------------------------------------ a failed write


@pytest.fixture
def enospc_at(monkeypatch):
    def inject(value: str) -> None:
        monkeypatch.setenv(faults.ENOSPC_AT_SAVE, value)
        faults.active.cache_clear()

    yield inject
    monkeypatch.delenv(faults.ENOSPC_AT_SAVE, raising=False)
    faults.active.cache_clear()


def _assert_failed_save(root: Path, d: Path, e: ckpt.CheckpointWriteError, kept: str) -> None:
    assert e.errno == errno.ENOSPC
    msg = str(e)
    assert f"could not write checkpoint file {d / 'rank00000.pt'}: ENOSPC (" in msg
    assert "`latest` still names the previous checkpoint" in msg and "free space" in msg
    assert pointer(root) == kept and latest_problem(root) is None
    assert list(root.rglob(".*.tmp-*")) == []  # no temp file left
    assert not ckpt.rank_file(d, 0).exists() and not ckpt.sum_file(ckpt.rank_file(d, 0)).exists()


def test_a_write_error_names_the_file_and_errno_and_keeps_latest(tmp_path, enospc_at):
    _checkpoint(tmp_path, 2)
    root, d = tmp_path / "checkpoints", tmp_path / "checkpoints" / "step_00000004"
    enospc_at("0:4")  # rank 0, step 4's save
    d.mkdir()
    state = {"w": torch.ones(64)}
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.write_checked(ckpt.rank_file(d, 0), lambda f: torch.save(state, f))
    _assert_failed_save(root, d, e.value, "step_00000002")
    assert "XPAR_TEST_ENOSPC_AT_SAVE" in str(e.value.__cause__)
    enospc_at("1:4")  # another rank's fault
    ckpt.write_checked(ckpt.rank_file(d, 0), lambda f: torch.save(state, f))


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (root only): skipped where mount is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_names_the_file_and_errno_through_torch_save(small_disk):
    # torch.save reports a failed write as a RuntimeError without the errno; the writer keeps it
    _checkpoint(small_disk, 2)
    root = small_disk / "checkpoints"
    d = root / "step_00000004"
    d.mkdir()
    big = {"w": torch.zeros(512 * 1024)}  # 2 MiB
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.write_checked(ckpt.rank_file(d, 0), lambda f: torch.save(big, f))
    _assert_failed_save(root, d, e.value, "step_00000002")


# ------------------------------------------------------------------ the plan: client_state.json


def test_auto_passes_over_a_damaged_client_state_for_the_previous_checkpoint(tmp_path):
    old = _checkpoint(tmp_path, 2, schedule_steps=5)
    new = _checkpoint(tmp_path, 4)
    _flip(new / ckpt.CLIENT_STATE, at=2)
    start = resume.plan_start(_cfg(tmp_path, "train.steps=5"))
    assert (start.resume, start.step, start.schedule_steps) == (old, 2, 5)  # the fallback's
    (line,) = start.damaged
    assert line.startswith(
        f"train.resume=auto: checkpoint step_00000004 is damaged: {new / ckpt.CLIENT_STATE} "
        "has sha256 "
    )
    assert line.endswith(f"(its bytes changed after it was written); resuming {old} instead")
    # not JSON at all (an old checkpoint without checksums, say): the same
    ckpt.sum_file(new / ckpt.CLIENT_STATE).unlink()
    for f in new.glob(f"*{ckpt.SUMS}"):
        f.unlink()
    (new / ckpt.CLIENT_STATE).write_text('{"step": 4, "da')
    (line,) = resume.plan_start(_cfg(tmp_path, "train.resume=force")).damaged
    assert "client_state.json cannot be read as JSON (" in line and f"resuming {old}" in line


def test_auto_passes_over_latest_naming_garbage(tmp_path):
    old = _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step_00000003").mkdir()  # partial: no client_state.json
    (tmp_path / "checkpoints" / ckpt.LATEST).write_bytes(b"\x00garbage\n")
    start = resume.plan_start(_cfg(tmp_path))
    assert start.resume == old
    (line,) = start.damaged
    assert "latest names '\\x00garbage', which is not a complete checkpoint" in line
    assert line.endswith(f"resuming {old} instead")
    (old / ckpt.CLIENT_STATE).unlink()  # nothing complete: refused as before
    with pytest.raises(XparConfigError, match="not a complete checkpoint; delete"):
        resume.plan_start(_cfg(tmp_path))


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file_and_does_not_fall_back(tmp_path):
    _checkpoint(tmp_path, 2)
    new = _checkpoint(tmp_path, 4)
    _truncate(new / ckpt.CLIENT_STATE)
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        resume.plan_start(_cfg(tmp_path, f"train.resume={new}"))
    msg = str(e.value)
    assert msg.startswith(f"train.resume='{new}': {new / ckpt.CLIENT_STATE} is ")
    assert "(truncated); the checkpoint is damaged: name an older one" in msg
    assert "train.resume=auto to resume the newest checkpoint that loads" in msg


def test_no_readable_checkpoint_is_a_clear_error_naming_each(tmp_path):
    for step in (2, 4):
        _truncate(_checkpoint(tmp_path, step) / ckpt.CLIENT_STATE)
    with pytest.raises(ckpt.DamagedCheckpoint) as e:
        resume.plan_start(_cfg(tmp_path))
    msg = str(e.value)
    assert "train.resume=auto: no checkpoint under " in msg and " can be resumed: " in msg
    assert "checkpoint step_00000004 is damaged" in msg and "step_00000002 is damaged" in msg
    assert msg.endswith("start over with train.resume=never train.overwrite=true")


# ------------------------------------------------------------------ pruning


def test_prune_keeps_latest_and_the_newest_sound_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 6):
        _checkpoint(tmp_path, step)
    (root / "step_00000005").mkdir()  # older than latest, never complete: a crashed save
    (root / "step_00000007").mkdir()  # newer than latest: the next save rewrites it
    _truncate(root / "step_00000004" / "rank00000.pt")  # damaged
    ckpt.publish(root, 6)
    doomed = ckpt.prune(root, keep=3)
    # 6 (latest), then 3 and 2: 5 is partial and 4 damaged, so they do not count as kept
    assert [p.name for p in doomed] == [f"step_0000000{s}" for s in (1, 4, 5)]
    names = sorted(p.name for p in root.glob("step_*"))
    assert names == ["step_00000002", "step_00000003", "step_00000006", "step_00000007"]
    _truncate(root / "step_00000006" / "rank00000.pt")
    assert ckpt.prune(root, keep=1) == [root / "step_00000002", root / "step_00000003"]
    assert ckpt.latest(root) == root / "step_00000006"  # never deleted, even damaged


# ------------------------------------------------------------------ the trainer, end to end


def _base(tmp_path, *more) -> list[str]:
    return [*golden.SMALL, *golden.data_overrides(tmp_path / "cache"), *more]


@pytest.mark.slow
def test_a_full_disk_then_a_truncated_rank_file_end_to_end(tmp_path):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    p = golden.torchrun(
        out,
        _base(tmp_path, "train.steps=6", "train.ckpt_every=2"),
        check=False,
        env={faults.ENOSPC_AT_SAVE: "6"},
    )
    assert p.returncode != 0
    (line, *_) = [x for x in p.stderr.splitlines() if "could not write checkpoint file" in x]
    assert f"{root}/step_00000006/rank0000" in line and ": ENOSPC (No space left" in line
    assert pointer(root) == "step_00000004" and latest_problem(root) is None
    assert list(out.rglob(".*.tmp-*")) == []

    step4 = root / "step_00000004"
    size = (step4 / "rank00001.pt").stat().st_size
    _truncate(step4 / "rank00001.pt")
    p = golden.torchrun(out, _base(tmp_path, f"train.resume={step4}"), check=False)
    assert p.returncode != 0
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("xpar: config error: ")]
    assert f"train.resume='{step4}': checkpoint step_00000004 is damaged (rank 1: " in line
    assert f"{step4}/rank00001.pt is {size // 2} bytes, expected {size} (truncated))" in line
    assert "name an older one" in line

    p = golden.torchrun(out, _base(tmp_path, "train.steps=6", "train.ckpt_every=2"))
    (line,) = [x for x in p.stderr.splitlines() if "is damaged" in x]
    assert line == (
        "xpar: warning: train.resume=auto: checkpoint step_00000004 is damaged (rank 1: "
        f"{step4}/rank00001.pt is {size // 2} bytes, expected {size} (truncated)); "
        f"resuming {root}/step_00000002 instead"
    )
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert pointer(root) == "step_00000006" and latest_problem(root) is None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-4:] == [3, 4, 5, 6]


@pytest.mark.slow
def test_twenty_kills_while_saving_always_leave_latest_loadable(tmp_path):
    p = run_python("tests/train/kill_during_save.py", str(tmp_path / "run"), "20", "0", timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.splitlines()[-1])
    assert report["kills"] == 20 and report["problems"] == [], report
    assert report["mid_save"] > 0, report  # some kills landed inside a save
    assert report["final_exit"] == 0 and report["final_resumed"], report


def _tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun starts each worker in its own session)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid] + [q for k in kids for q in _tree(int(k))]


@pytest.mark.slow
def test_killing_the_whole_2_rank_job_while_it_saves_leaves_latest_loadable(tmp_path):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = _base(tmp_path, "train.steps=100000", "train.ckpt_every=1")
    cmd = golden.torchrun_cmd(out, overrides)
    env = golden.launch_env()
    rng = random.Random(1)
    for _ in range(2):
        before = pointer(root)
        job = subprocess.Popen(
            cmd, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        t0 = time.monotonic()
        while pointer(root) == before and job.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.005)
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(rng.uniform(0.0, 0.2))
        for pid in _tree(job.pid):  # the launcher and both ranks, as a lost node
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
        job.stderr.close()
        assert latest_problem(root) is None
        assert len(list(root.glob("step_*/rank*.pt"))) >= 2

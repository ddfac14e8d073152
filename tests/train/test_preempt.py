"""PreemptionWatcher on real gloo ranks with real signals.

One rank (or a peer, or the batch script's flag file, or its clock past
train.max_time_s) raises the alarm; every rank must stop at the same step and only
the warning signal may requeue.
"""

import json
import os
import signal
import time

import pytest
import torch.distributed as dist

from xpar.testing import run_distributed
from xpar.train.preempt import EXIT_PREEMPTED, PreemptionWatcher, parse_signal

STEPS = 50


def _loop(watcher, rank, on_step):
    """Run a fake training loop; on_step(step) may send signals. Returns the stop step."""
    for step in range(STEPS):
        on_step(step)
        if watcher.should_stop(step):
            return step
        time.sleep(0.002)  # ranks drift apart a little, like real steps
    return None


def _self_signal(rank, world, sender, sig_name, at_step, check_every):
    sig = parse_signal(sig_name)
    with PreemptionWatcher(check_every=check_every) as w:

        def on_step(step):
            if rank == sender and step == at_step:
                os.kill(os.getpid(), sig)

        stop = _loop(w, rank, on_step)
        return stop, w.stopped_by.name if w.stopped_by else None, w.wants_requeue()


def _peer_signal(rank, world):
    """Rank 0 sends SIGUSR1 to the last rank's process, as `kill -USR1 pid` would."""
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    with PreemptionWatcher() as w:

        def on_step(step):
            if rank == 0 and step == 3:
                os.kill(pids[-1], signal.SIGUSR1)
            if step == 3:
                dist.barrier()  # the signal is pending in the target before it leaves the barrier

        stop = _loop(w, rank, on_step)
        return stop, w.received.name if w.received else None


def _flag_file(rank, world, flag, at_step):
    with PreemptionWatcher(flag_file=flag) as w:

        def on_step(step):
            if rank == 0 and step == at_step:
                open(flag, "w").close()

        return _loop(w, rank, on_step), w.stopped_by.name if w.stopped_by else None


def _time_limit(rank, world, late_rank, limit_s):
    """Step s happens at second s; only late_rank's limit falls inside the loop."""
    now = [0.0]
    with PreemptionWatcher(clock=lambda: now[0]) as w:
        w.limit_time(limit_s if rank == late_rank else 1000.0)
        stop = None
        for step in range(STEPS):
            now[0] = float(step)
            if w.should_stop(step):
                stop = step
                break
        name = w.stopped_by.name if w.stopped_by else None
        return stop, w.out_of_time, name, w.wants_requeue(), w.exit_code(), w.elapsed()


def _scenarios(rank, world, flag):
    """All multi-rank cases in one set of processes: spawning ranks costs seconds each."""
    return {
        "usr1_rank0": _self_signal(rank, world, 0, "USR1", 5, 1),
        "usr1_last": _self_signal(rank, world, world - 1, "USR1", 5, 1),
        "every_4": _self_signal(rank, world, world - 1, "SIGUSR1", 5, 4),
        "term": _self_signal(rank, world, 1, "TERM", 7, 1),
        "peer": _peer_signal(rank, world),
        "flag": _flag_file(rank, world, flag, 6),
        "time": _time_limit(rank, world, world - 1, 9.5),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    flag = str(tmp_path_factory.mktemp("preempt") / "preempt.flag")
    return run_distributed(_scenarios, 2, flag)


def per_rank(results, name):
    return [r[name] for r in results]


@pytest.mark.parametrize("case", ["usr1_rank0", "usr1_last"])
def test_signal_to_one_rank_stops_all_at_same_step(results, case):
    assert per_rank(results, case) == [(5, "SIGUSR1", True)] * 2


def test_check_every_k_rounds_the_stop_step_up(results):
    assert per_rank(results, "every_4") == [(8, "SIGUSR1", True)] * 2


def test_sigterm_stops_without_requeue(results):
    assert per_rank(results, "term") == [(7, "SIGTERM", False)] * 2


def test_signal_from_another_process(results):
    res = per_rank(results, "peer")
    stops = {r[0] for r in res}
    assert len(stops) == 1, res
    assert stops.pop() in (3, 4)  # delivery is asynchronous; agreement is what matters
    assert [r[1] for r in res] == [None, "SIGUSR1"]  # only the target saw it


def test_flag_file_counts_as_warning_signal(results):
    assert per_rank(results, "flag") == [(6, "SIGUSR1")] * 2


def test_time_limit_on_one_rank_stops_all_at_the_same_step_without_requeue(results):
    # the late rank is past 9.5 s at step 10; its peer's clock says nothing, it stops too
    stops = per_rank(results, "time")
    assert [r[:5] for r in stops] == [(10, True, None, False, 0)] * 2
    assert [r[5] for r in stops] == [10.0, 10.0]


def test_no_time_limit_by_default_or_with_zero(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    now = [0.0]
    with PreemptionWatcher(clock=lambda: now[0]) as w:
        w.limit_time(0)  # train.max_time_s=0: no limit
        now[0] = 1e9
        assert _loop(w, 0, lambda step: None) is None
        assert not w.out_of_time and w.exit_code() == 0 and not w.requeue_if_slurm()


def test_no_signal_runs_to_the_end_without_requeue(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with PreemptionWatcher() as w:
        assert _loop(w, 0, lambda step: None) is None
        assert not w.requeue_if_slurm()
        assert w.exit_code() == 0


def test_requeue_request_file_and_exit_codes(tmp_path, monkeypatch):
    req = tmp_path / "slurm" / "requeue.json"
    monkeypatch.setenv("XPAR_REQUEUE_FILE", str(req))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with PreemptionWatcher("USR2") as w:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert w.should_stop(11) and w.stop_step == 11
        assert not w.requeue_if_slurm()  # not under Slurm: nothing to requeue
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        assert w.requeue_if_slurm()
        assert json.loads(req.read_text()) == {"job_id": "4242", "step": 11, "signal": "SIGUSR2"}
        assert w.exit_code() == EXIT_PREEMPTED
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        assert w.exit_code() == 0  # torchrun would read 75 as a crash


def test_handlers_are_restored_and_second_sigterm_is_not_swallowed():
    before = signal.getsignal(signal.SIGUSR1)
    w = PreemptionWatcher()
    assert signal.getsignal(signal.SIGUSR1) == w._handle
    w.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before

    seen = []
    prev = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        w = PreemptionWatcher()
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.received == signal.SIGTERM and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # second one goes to the handler before us
        assert seen == [signal.SIGTERM]
        w.uninstall()
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_env_and_bad_values(monkeypatch):
    monkeypatch.setenv("XPAR_PREEMPT_SIGNAL", "12")
    with PreemptionWatcher() as w:
        assert w.warning_signal == signal.SIGUSR2
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("USR9")
    with pytest.raises(ValueError, match="check_every"):
        PreemptionWatcher(check_every=0, install=False)


@pytest.mark.slow
def test_a_warning_during_the_last_step_completes_the_run_without_a_requeue(tmp_path):
    from tests.fixtures import golden

    flag, request = tmp_path / "preempt.flag", tmp_path / "requeue.json"
    flag.touch()  # the warning came; with train.steps=1 the last step is the only one
    env = {"XPAR_PREEMPT_FLAG": str(flag), "XPAR_REQUEUE_FILE": str(request), "SLURM_JOB_ID": "7"}
    p = golden.torchrun(
        tmp_path / "run",
        golden.TINY + golden.data_overrides(tmp_path / "cache") + ["train.steps=1"],
        env=env,
    )
    assert "SIGUSR1 came during the last step: the run is complete, no requeue" in p.stdout
    assert not request.exists()  # a requeue would find nothing to do and fail the job

"""A rank's first fatal error reaches the console once, with its rank (xpar.train.fatal).

- fast: the `fatal` keys of a real TCPStore (the one torchrun's agent would host): the same
  error on every rank is said once in rank 0's words; a first rank that rank 0 does not
  answer says its own; rank 0's communication error after another rank's is a consequence;
  a crash of its own is re-raised with its traceback;
- slow (real torchrun, 2 ranks): a rank file that only rank 1 cannot load (a tensor of the
  wrong shape in the committed checkpoint's rank00001.pt): rank 1's message shows once, with
  "rank 1", rank 0 says why it stops, and gloo's "Connection closed by peer" is not shown.
"""

from __future__ import annotations

import datetime
import shutil

import pytest
import torch
import torch.distributed as dist

from tests.fixtures import golden
from xpar.errors import XparConfigError
from xpar.parallel.groups import free_port
from xpar.train import fatal

PEER_GONE = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")


@pytest.fixture
def job(monkeypatch):
    """A live job store, as torchrun's agent hosts it, and the env its workers see."""
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=5),
    )
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "TORCHELASTIC_RESTART_COUNT": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    yield store


def _exit(fn, *args, **kw) -> int:
    with pytest.raises(SystemExit) as e:
        fn(*args, **kw)
    return e.value.code


def test_the_same_config_error_on_every_rank_is_said_once(job, capsys):
    e = XparConfigError("train.out_dir='x' holds a run")
    fatal.Board(fatal.job_store(), 1).post(str(e), fatal.config_line(1, str(e)))  # rank 1 first
    assert _exit(fatal.config_error, e, rank=0) == 2
    assert capsys.readouterr().err == "xpar: config error: train.out_dir='x' holds a run\n"
    assert _exit(fatal.config_error, e, rank=1, handoff_s=0.0) == 2  # rank 0 said it
    assert capsys.readouterr().err == ""


def test_a_first_rank_that_rank_0_does_not_answer_says_its_own(job, capsys):
    e = XparConfigError("rank00001.pt does not fit")
    assert _exit(fatal.config_error, e, rank=1, handoff_s=0.2) == 2
    assert capsys.readouterr().err == "xpar: config error (rank 1): rank00001.pt does not fit\n"
    assert _exit(fatal.crash, PEER_GONE, rank=0, settle_s=0.0) == fatal.EXIT_CONSEQUENCE
    assert capsys.readouterr().err == f"{fatal.stop_line(0, 1)}\n"  # not rank 1's line again


def test_rank_0_says_the_first_ranks_error_then_why_it_stops(job, capsys):
    e = XparConfigError("rank00001.pt does not fit")
    # rank 1 posts and waits for rank 0; here rank 0 comes later, so model the post alone
    board = fatal.Board(fatal.job_store(), 1)
    board.post(str(e), fatal.config_line(1, str(e)))
    assert _exit(fatal.crash, PEER_GONE, rank=0, settle_s=0.0) == fatal.EXIT_CONSEQUENCE
    assert capsys.readouterr().err.splitlines() == [
        "xpar: config error (rank 1): rank00001.pt does not fit",
        "xpar: rank 0: stopping because rank 1 failed first (its error is above)",
    ]
    assert _exit(fatal.config_error, e, rank=1, handoff_s=0.0) == 2  # rank 0 said it
    assert capsys.readouterr().err == ""


def test_a_crash_of_its_own_is_reraised_and_a_consequence_is_quiet(job, capsys):
    fatal.crash(ValueError("a bug"), rank=1)  # returns: the entry point re-raises it
    assert capsys.readouterr().err == "xpar: rank 1 failed first; its traceback follows\n"
    assert _exit(fatal.crash, PEER_GONE, rank=2, settle_s=0.0) == fatal.EXIT_CONSEQUENCE
    assert capsys.readouterr().err == ""  # neither rank 0 nor the first: nothing to add
    assert fatal.is_consequence(PEER_GONE) and not fatal.is_consequence(ValueError("gloo?"))


def test_without_the_agent_store_a_config_error_ends_as_before(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert _exit(fatal.config_error, XparConfigError("bad"), rank=0) == 2
    assert capsys.readouterr().err == "xpar: config error: bad\n"


@pytest.mark.slow
def test_a_config_error_on_rank_1_only_is_shown_once_with_its_rank(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(golden.CKPT_FIXTURE, out / "checkpoints")
    rank1 = out / "checkpoints" / "step_00000002" / "rank00001.pt"
    state = torch.load(rank1, weights_only=False)
    state["module"]["blocks.0.ffn.experts.w1"] = state["module"]["blocks.0.ffn.experts.w1"][:1]
    torch.save(state, rank1)  # rank 0's file is sound: only rank 1 refuses, after the group
    overrides = golden.SMALL + golden.data_overrides(tmp_path / "cache") + ["train.steps=3"]
    p = golden.torchrun(out, overrides, check=False)
    console = p.stdout + p.stderr
    assert p.returncode != 0
    mine = "xpar: config error (rank 1): train.resume: the checkpoint "
    assert console.count("was written by a different model") == 1, console[-4000:]
    assert mine in console and "blocks.0.ffn.experts.w1 saved [1, 32, 32]" in console
    first, second = p.stderr.splitlines()[:2]  # the ranks' lines, before torchrun's report
    assert first.startswith(mine) and second == fatal.stop_line(0, 1), p.stderr[-4000:]
    assert "Connection closed by peer" not in console

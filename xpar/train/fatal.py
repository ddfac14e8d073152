"""A rank's first fatal error reaches the console once, with its rank.

Under torchrun a rank that failed alone (a rank file of the wrong layout) was never heard:
it waited before speaking (xpar.config.check.PEER_GRACE_S, for errors every rank shares),
rank 0 failed next on gloo's "Connection closed by peer", and torchrun stopped the rest and
named rank 0 as the root cause. Now a failing rank posts its error in the job's store
(xpar.parallel.store: torchrun's agent hosts it, so it outlives the ranks' process group):

    fatal            the rank that failed first (the first writer wins: compare_set)
    fatal/<r>        rank r's error, {"text": ..., "line": ...}
    fatal/<r>/shown  a claim: whoever adds 1 first prints rank r's line, so it is said once

Who speaks:
- rank 0 prints the first error: its own, or the first rank's line followed by
  "xpar: rank 0: stopping because rank R failed first (its error is above)";
- the first rank prints its own line when rank 0 has not within HANDOFF_S (rank 0 stuck in
  a collective, or gone); a crash (not a config error) prints its own traceback at once;
- a rank whose failure is a consequence (a communication error while another rank has
  posted within SETTLE_S) says nothing; the same config error on every rank (a refusal
  before the process group) is said once, in rank 0's words.
Without torchrun's agent store (a world of one, srun, a plain env:// launch) errors end as
before: xpar.config.check.exit_config_error, Hydra's traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch.distributed as dist

from xpar.config.check import EXIT_CONFIG_ERROR, exit_config_error, tell_torchrun
from xpar.config.store import current_rank
from xpar.errors import XparConfigError
from xpar.parallel.store import job_store

SETTLE_S = 5.0  # a communication error waits this long for the rank that caused it
HANDOFF_S = 3.0  # the first rank waits this long for rank 0 to print its error
EXIT_CONSEQUENCE = 1
# What a rank sees when a peer died or left: the peer's error is the one to show.
COMM_ERRORS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "timed out",
    "Timed out",
    "NCCL",
    "gloo",
)


def is_consequence(e: BaseException) -> bool:
    """Whether e looks like another rank's failure seen from here (a collective broke)."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in COMM_ERRORS)


class Board:
    """The `fatal` keys of the job's store, for one rank."""

    def __init__(self, store: dist.Store, rank: int) -> None:
        self.store, self.rank = store, rank

    @classmethod
    def connect(cls, rank: int) -> Board | None:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None  # the store would be rank 0's, gone with its process group
        try:
            store = job_store(timeout_s=3.0)
        except (RuntimeError, ValueError, OSError):
            return None
        return cls(store, rank) if store is not None else None

    def post(self, text: str, line: str) -> int:
        """Post this rank's error; returns the rank that failed first."""
        self.store.set(f"fatal/{self.rank}", json.dumps({"text": text, "line": line}))
        return int(self.store.compare_set("fatal", "", str(self.rank)))

    def winner(self) -> int | None:
        return int(self.store.get("fatal")) if self.store.check(["fatal"]) else None

    def error(self, rank: int) -> dict:
        return json.loads(self.store.get(f"fatal/{rank}"))

    def claim(self, rank: int) -> bool:
        """True for the one caller that is to print rank's line."""
        return self.store.add(f"fatal/{rank}/shown", 1) == 1

    def claimed(self, rank: int) -> bool:
        return self.store.check([f"fatal/{rank}/shown"])

    @staticmethod
    def wait(cond: Callable[[], bool], seconds: float) -> bool:
        # Polling: the store's own wait() logs two C++ warnings when it times out.
        end = time.monotonic() + seconds
        while not cond():
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def config_line(rank: int, text: str) -> str:
    return f"xpar: config error{'' if rank == 0 else f' (rank {rank})'}: {text}"


def stop_line(rank: int, first: int) -> str:
    return f"xpar: rank {rank}: stopping because rank {first} failed first (its error is above)"


def config_error(e: XparConfigError, rank: int | None = None, handoff_s: float = HANDOFF_S):
    """End this rank on a config error raised while training: said once, exit 2."""
    rank = current_rank() if rank is None else rank
    board = Board.connect(rank)
    if board is None:
        exit_config_error(e, rank=rank)
    try:
        _config_error(board, str(e), handoff_s)
    except RuntimeError:  # the store went away meanwhile (torchrun is stopping the job)
        _say(config_line(rank, str(e)))
    sys.exit(EXIT_CONFIG_ERROR)


def _config_error(board: Board, text: str, handoff_s: float) -> None:
    rank, line = board.rank, config_line(board.rank, text)
    first = board.post(text, line)
    said = f"xpar: config error (rank {first}), printed above"
    if rank == 0:
        theirs = board.error(first) if first != 0 else None
        if theirs is not None and theirs["text"] == text:
            if board.claim(first) and board.claim(0):  # the same error: once, in rank 0's words
                _say(line)
            tell_torchrun(said)
            return
        if theirs is not None and board.claim(first):
            _say(theirs["line"])
        if board.claim(0):
            _say(line)
        tell_torchrun(said)
        return
    if first != rank and board.error(first)["text"] == text:
        tell_torchrun(said)
        return  # the same error as the first rank's: it is said once
    if first == rank:
        board.wait(lambda: board.claimed(rank), handoff_s)  # rank 0 prints it, if it can
    if board.claim(rank):
        _say(line)
    tell_torchrun(f"xpar: config error (rank {rank}), printed above")


def crash(e: Exception, rank: int | None = None, settle_s: float = SETTLE_S) -> None:
    """A rank's other error: returns when it is this rank's to report (re-raise it, for its
    traceback); exits 1 quietly when it is the consequence of another rank's failure."""
    rank = current_rank() if rank is None else rank
    board = Board.connect(rank)
    if board is None:
        return
    try:
        first_hand = _crash(board, e, settle_s)
    except RuntimeError:
        return  # the store went away: the traceback it is
    if not first_hand:
        sys.exit(EXIT_CONSEQUENCE)


def _crash(board: Board, e: Exception, settle_s: float) -> bool:
    rank, consequence = board.rank, is_consequence(e)
    if consequence:
        board.wait(lambda: board.winner() is not None, settle_s)
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    first = board.post(text, f"xpar: rank {rank} failed: {text}")
    if first == rank or not consequence:
        board.claim(rank)
        _say(f"xpar: rank {rank} failed{' first' if first == rank else ''}; its traceback follows")
        return True
    if rank == 0:
        if board.claim(first):
            _say(board.error(first)["line"])
        _say(stop_line(0, first))
        tell_torchrun(stop_line(0, first))
    return False


def fail(e: Exception) -> None:
    """The entry point's except clause: a config error ends the process here; any other
    error returns when this rank is to re-raise it."""
    if isinstance(e, XparConfigError):
        config_error(e)
    crash(e)

"""The collective watchdog: a hung rank ends the job within parallel.timeout_s, with one line.

A rank that stops (SIGSTOP, a wedged node, a deadlock) leaves its peers blocked in the next
collective. gloo enforces the timeout only for groups created with it, DeepSpeed's own
groups may have another, and a stopped process ignores torchrun's SIGTERM, which torchrun
follows with SIGKILL only 30 s later (torch.distributed.elastic.multiprocessing.api,
`_close(death_sig, timeout=30)`). So every rank keeps a watch of its own:

- `with collective("all_to_all (MoE rows to experts)"):` around a blocking collective
  marks it (a clock read and a list append; nothing leaves the process). `with waiting_in(...)`
  marks a call that contains collectives xpar cannot name (DeepSpeed's backward and step):
  time spent there may be compute, so only a silent peer counts against it. Marks nest.
- A heartbeat thread writes this rank's heartbeat (host, pid, step, marks entered, the
  current mark) to the job store (xpar.parallel.store) every poll (1 s, less for a short
  timeout) and at each new step, and while this rank waits, reads its peers'. A stopped process's thread stops
  with it, so its heartbeat goes stale.
- A checker thread, never blocked by the store, fires when this rank has been in one
  `collective` for more than timeout_s, or in any mark while a peer's heartbeat has not
  changed for timeout_s, or in a mark for timeout_s while the store has not answered for
  as long (the rank that hosts it may be the hung one). A marked collective that raises
  (the backend's own timeout, or a peer gone because another rank's watchdog fired) ends
  the same way, as `with Watchdog(...)` exits.

Firing prints one line on stderr naming the collective, the step, this rank and the ranks
that did not arrive (no fresh heartbeat, or not yet at this collective) with their host,
pid and last step; the first rank to fire (a counter in the store) gives the details, the
others a short line. It SIGKILLs the non-arriving ranks on this machine (so the launcher
need not wait out its grace period) and exits with EXIT_COLLECTIVE_TIMEOUT.

Margin: a rank fires within timeout_s + one poll (<= 1 s) and exits a few ms later when the
store answers; within timeout_s + poll + 2.5 s when it does not (the line states the sum).
A peer's silence is timed by this rank's clock (its heartbeat counter stopped changing)
from the first read on, by the heartbeat's own timestamp before that: hosts' clocks must
agree to well under timeout_s, as NTP keeps them. On NCCL a collective returns before it
completes: the hang then shows in the first marked collective that waits for the result
(and torch's NCCL watchdog enforces the timeout of every group created with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from time import monotonic
from typing import TextIO

from xpar.parallel.store import job_store

EXIT_COLLECTIVE_TIMEOUT = 6  # 2 config error, 4 nothing to do, 7 unhealthy run, 75 preempted
PREFIX = "[xpar] collective timeout"
STORE_WAIT_S = 2.0  # how long the firing rank waits for the store (first-detector counter)

_active: Watchdog | None = None  # the running watchdog of this process, if any


class Collective:
    """A named mark; `with mark:` around the call. exact: the call is the collective
    itself (its duration counts); otherwise it only contains some (only a silent peer counts)."""

    __slots__ = ("exact", "name")

    def __init__(self, name: str, exact: bool = True) -> None:
        self.name, self.exact = name, exact

    def __enter__(self) -> Collective:
        wd = _active
        if wd is not None:
            wd.entered += 1
            wd.marks.append((self.name, monotonic(), self.exact, wd.entered))
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        wd = _active
        if wd is not None and wd.marks:
            mark = wd.marks.pop()
            if exc_type is not None and wd.failed is None:
                wd.failed = mark  # the innermost: it exits first


def collective(name: str) -> Collective:
    """Mark a blocking collective (all-to-all, all-reduce, barrier): its duration counts."""
    return Collective(name, exact=True)


def waiting_in(name: str) -> Collective:
    """Mark a call that contains collectives xpar cannot name (DeepSpeed's backward, step)."""
    return Collective(name, exact=False)


def note_step(step: int) -> None:
    """The training step, for the heartbeat (written at once) and the line."""
    wd = _active
    if wd is not None:
        wd.step = step
        wd.wake.set()


def _machine() -> str:
    """Processes with the same key can signal each other by pid: one kernel, one pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): tells a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass
class Seen:
    """A peer's last heartbeat and when this rank saw its counter last change."""

    info: dict
    since: float  # monotonic time of the first read that showed info["seq"]


@dataclass
class Missing:
    rank: int
    why: str
    info: dict | None
    killed: bool = False

    def describe(self) -> str:
        i = self.info
        where = f"host {i['host']}, pid {i['pid']}, step {i['step']}, " if i else ""
        return f"rank {self.rank} ({where}{self.why}{'; killed' if self.killed else ''})"


def not_arrived(
    me: int, world_size: int, entered: int, peers: dict[int, tuple[float, dict]], stale_s: float
) -> list[Missing]:
    """The ranks that did not reach the collective this rank entered as its `entered`-th mark.

    peers: rank -> (seconds its heartbeat has not changed, its heartbeat). A rank is missing
    when its heartbeat is older than stale_s or it has entered fewer marks than this rank.
    """
    out = []
    for r in range(world_size):
        if r == me:
            continue
        if r not in peers:
            out.append(Missing(r, "no heartbeat seen", None))
            continue
        age, info = peers[r]
        if age >= stale_s:
            out.append(Missing(r, f"no heartbeat for {age:.1f}s: stopped or hung", info))
        elif info["entered"] < entered:
            where = f"in {info['in']}" if info["in"] else "not in a collective"
            out.append(Missing(r, f"has not reached it, {where}", info))
    return out


class Watchdog:
    """Watch this rank's collectives; `with Watchdog(rank, world, timeout_s):` runs it."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        poll_s: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.1, timeout_s / 5))
        # detection within one poll, then at most the bounded store read of _fire
        self.margin_s = round(self.poll_s + STORE_WAIT_S + 0.5, 1)
        self.stale_s = 3 * self.poll_s  # a heartbeat this old at firing time: not arrived
        self.stream = stream
        self.marks: list[tuple[str, float, bool, int]] = []  # (name, since, exact, entered)
        self.entered = 0  # marks entered so far: ranks running the same code agree
        self.step = 0
        self.failed: tuple[str, float, bool, int] | None = None  # a mark left by an exception
        self.peers: dict[int, Seen] = {}  # replaced whole by the heartbeat thread
        self.read_at = monotonic()  # last store read that answered
        self._stop = threading.Event()
        self.wake = threading.Event()  # a new step: beat now
        self._firing = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._store = None  # the heartbeat thread's client
        self.has_store = "MASTER_ADDR" in os.environ  # else no heartbeats: durations only
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "machine": _machine(),
            "start": _start_time(os.getpid()),
        }

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """A collective that raised (the backend's own timeout, or a peer that exited when
        another rank's watchdog fired) ends the job the same way as the checker would."""
        if isinstance(exc, RuntimeError) and self.failed is not None:
            timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
            if timed_out or _bounded(lambda s: s.add("timeout/fired", 0)):
                self._fire(f"{self.failed[0]} failed: {_gist(exc)}", self.failed)
        self.stop()

    def start(self) -> None:
        """Write the first heartbeat (peers can name this rank from now on), start the threads."""
        global _active
        _active = self
        with contextlib.suppress(Exception):  # the heartbeat thread retries
            self._store = job_store(timeout_s=max(STORE_WAIT_S, self.poll_s))
            if self._store is not None:
                self._store.set(f"hb/{self.rank}", json.dumps(self._heartbeat(0)))
        for target, name in ((self._beat_loop, "heartbeat"), (self._check_loop, "checker")):
            t = threading.Thread(target=target, name=f"xpar-watchdog-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        self.wake.set()
        if self._threads:  # join the checker; the heartbeat thread may be in store I/O
            self._threads[-1].join(timeout=2 * self.poll_s)

    def current(self) -> tuple[str, float, bool, int] | None:
        try:
            return self.marks[-1]
        except IndexError:
            return None

    # -- the heartbeat thread: all store I/O but the firing rank's last read --------
    def _beat_loop(self) -> None:
        store, seq = self._store, 0
        while not self._stop.is_set():
            try:
                store = store or job_store(timeout_s=max(STORE_WAIT_S, self.poll_s))
                seq += 1
                if store is not None:
                    store.set(f"hb/{self.rank}", json.dumps(self._heartbeat(seq)))
                    mark = self.current()
                    if mark is not None and monotonic() - mark[1] >= self.poll_s:
                        self._observe(read_heartbeats(store, self.world_size, self.rank))
            except Exception:  # a store that failed once gets a new client next time
                store = None
            self.wake.wait(self.poll_s)
            self.wake.clear()
            self._stop.wait(0.05)  # at most 20 heartbeats a second

    def _heartbeat(self, seq: int) -> dict:
        mark = self.current()
        return {
            **self.me,
            "seq": seq,
            "time": time.time(),
            "step": self.step,
            "entered": self.entered,
            "in": mark[0] if mark else None,
        }

    def _observe(self, beats: dict[int, dict]) -> None:
        now, wall, peers = monotonic(), time.time(), dict(self.peers)
        for r, info in beats.items():
            if r not in peers:  # first sight: its age by its own clock, ours from now on
                peers[r] = Seen(info, now - max(0.0, wall - info["time"]))
            elif peers[r].info["seq"] != info["seq"]:
                peers[r] = Seen(info, now)
        self.peers, self.read_at = peers, now

    def _peer_ages(self) -> dict[int, tuple[float, dict]]:
        """rank -> (seconds its heartbeat counter has not changed, as of the last read, info)."""
        return {r: (self.read_at - s.since, s.info) for r, s in self.peers.items()}

    # -- the checker thread ------------------------------------------------------
    def _check_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            reason = self._verdict(monotonic())
            if reason is not None and not self._stop.is_set():
                self._fire(reason, self.current())

    def _verdict(self, now: float) -> str | None:
        mark = self.current()
        if mark is None:
            return None
        name, since, exact, _ = mark
        waited, t = now - since, self.timeout_s
        if exact and waited > t:
            return f"{name} has waited {waited:.1f}s (parallel.timeout_s={t:g})"
        silent = {r: a for r, (a, _) in self._peer_ages().items() if a > t}
        if silent:
            r, age = max(silent.items(), key=lambda kv: kv[1])
            return (
                f"in {name} for {waited:.1f}s, rank {r} sent no heartbeat for {age:.1f}s "
                f"(parallel.timeout_s={t:g})"
            )
        if self.has_store and waited > t and now - self.read_at > t:
            return f"in {name} for {waited:.1f}s (parallel.timeout_s={t:g})"
        return None

    # -- firing ----------------------------------------------------------------
    def _fire(self, reason: str, mark: tuple[str, float, bool, int] | None) -> None:
        """One line on stderr, SIGKILL the non-arriving ranks on this machine, exit."""
        if not self._firing.acquire(blocking=False):
            threading.Event().wait()  # the other thread is firing and will exit the process
        entered = mark[3] if mark else self.entered
        last = _bounded(
            lambda s: (s.add("timeout/fired", 1), read_heartbeats(s, self.world_size, self.rank))
        )
        missing, first = None, None
        if last is not None:
            first, beats = last
            self._observe(beats)
            missing = not_arrived(
                self.rank, self.world_size, entered, self._peer_ages(), self.stale_s
            )
            for m in missing:
                m.killed = self._kill_if_local(m.info)
        line = self._line(reason, missing, first)
        stream = self.stream or sys.stderr
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            stream.write(("\n" if stream.isatty() else "") + line + "\n")
            stream.flush()
        os._exit(EXIT_COLLECTIVE_TIMEOUT)

    def _kill_if_local(self, info: dict | None) -> bool:
        if info is None or info["machine"] != self.me["machine"] or info["pid"] == os.getpid():
            return False
        if not info["start"] or _start_time(info["pid"]) != info["start"]:
            return False  # gone, or the pid is another process now
        try:
            os.kill(info["pid"], signal.SIGKILL)  # a stopped process ignores SIGTERM
        except OSError:
            return False
        return True

    def _line(self, reason: str, missing: list[Missing] | None, first: int | None) -> str:
        me = f"rank {self.rank} (host {self.me['host']}, pid {self.me['pid']})"
        head = f"{PREFIX} on {me} at step {self.step}: {reason}"
        if missing is None and not self.has_store:
            who = "which ranks did not arrive is unknown (no job store: MASTER_ADDR is unset)"
        elif missing is None:
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            who = (
                f"which ranks did not arrive is unknown: the job store at {addr} does not "
                "answer (its host, rank 0 in a plain env:// launch, may be the hung one)"
            )
        elif not missing:
            who = "every peer's heartbeat is fresh and past this collective (a backend stall?)"
        elif first == 1:
            who = "did not arrive: " + ", ".join(m.describe() for m in missing)
        else:
            ranks = ", ".join(str(m.rank) for m in missing)
            who = f"did not arrive: rank(s) {ranks} (the first rank to time out gave details)"
        return (
            f"{head}; {who}; exit {EXIT_COLLECTIVE_TIMEOUT} "
            f"(ranks stop within parallel.timeout_s + {self.margin_s:g}s)"
        )


def read_heartbeats(store, world_size: int, me: int) -> dict[int, dict]:
    """Every other rank's last heartbeat that is in the store."""
    keys = [f"hb/{r}" for r in range(world_size) if r != me]
    # one round trip when every key is there (the usual case), else one per key
    present = keys if store.check(keys) else [k for k in keys if store.check([k])]
    values = store.multi_get(present) if present else []
    return {int(k[3:]): json.loads(v) for k, v in zip(present, values, strict=True)}


def _gist(exc: BaseException) -> str:
    """The backend's message without its source location, cut to one short sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[-1]
    return text.split(". ")[0][:120]


def _bounded(fn):
    """fn(a fresh client of the job store), or None when the store does not answer in time."""
    out: list = []

    def call() -> None:
        with contextlib.suppress(Exception):
            store = job_store(timeout_s=STORE_WAIT_S)
            if store is not None:
                out.append(fn(store))

    t = threading.Thread(target=call, name="xpar-watchdog-store", daemon=True)
    t.start()
    t.join(STORE_WAIT_S + 0.5)
    return out[0] if out else None

"""One run per out_dir: rank 0 holds `<out_dir>/.xpar.lock` while the run lives.

Two runs training into one folder interleave checkpoints and metrics; the second one
(a resume=auto rerun while the first still runs, an orphaned worker) must refuse
before it writes anything. Rank 0 takes the lock first thing (the entry point takes it
before Hydra writes .hydra/ and its log; train() again, re-entrantly, for direct
callers); the other ranks and the launcher's check only look at it (`check_free`).

The lock file is one JSON line naming its holder: host, pid and the pid's start time,
since when, SLURM_JOB_ID, the torchrun group and restart, and a random token. It is
created complete (written aside, then hard-linked into place: the link fails if the
lock exists), refreshed (its mtime) every REFRESH_S by a daemon thread, and removed by
its owner only, when the run ends cleanly or by an exception. A SIGKILLed owner
leaves it behind; the next run finds it stale and takes it over, in one line:

- same machine (host, boot and pid namespace): its pid is gone, or is another process
  now (the start time differs);
- same SLURM_JOB_ID: the job was requeued, its earlier incarnation is dead;
- same torchrun group at an earlier restart: torchrun restarts only dead groups;
- another machine: not refreshed for STALE_S.

A refusal is an XparConfigError (exit 2, like every start-up refusal: the command must
change, or wait), one line naming the holder and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xpar.config.store import current_rank
from xpar.errors import XparConfigError

LOCK_FILE = ".xpar.lock"
REFRESH_S = 30.0  # the holder touches the lock this often ...
STALE_S = 300.0  # ... and a lock from another machine untouched this long is stale


class OutDirInUse(XparConfigError):
    """train.out_dir is held by a live run."""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def pid_start(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat), "" if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether process `pid` lives (not a zombie; with `start`, not a reused pid)."""
    if Path("/proc/self/stat").exists():
        now = pid_start(pid)
        return bool(now) and (not start or now == start)  # a zombie or a reused pid: gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group(env) -> str:
    """This process's launch group: what every rank of one run shares (empty outside one)."""
    parts = [env.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    parts += [env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")]
    return "|".join(parts) if any(parts) else ""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says."""

    host: str
    boot: str  # /proc/sys/kernel/random/boot_id: a reboot frees every pid
    pid_ns: str  # a container on the same host sees other pids
    pid: int
    pid_start: str
    since: float
    slurm_job_id: str
    group: str
    restart: int
    token: str

    @classmethod
    def me(cls, token: str = "") -> Holder:
        env = os.environ
        try:
            ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            ns = ""
        return cls(
            host=socket.gethostname(),
            boot=_read("/proc/sys/kernel/random/boot_id"),
            pid_ns=ns,
            pid=os.getpid(),
            pid_start=pid_start(os.getpid()),
            since=time.time(),
            slurm_job_id=env.get("SLURM_JOB_ID", ""),
            group=_group(env),
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            token=token,
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host} since {when}{job}"

    def same_machine(self, other: Holder) -> bool:
        return (self.host, self.boot, self.pid_ns) == (other.host, other.boot, other.pid_ns)


def stale_reason(held: Holder | None, age_s: float, me: Holder) -> str | None:
    """Why the lock `held` (its file `age_s` old) belongs to a run that is gone; None: live."""
    if held is None:
        return f"an unreadable lock untouched for {age_s:.0f}s" if age_s > STALE_S else None
    if held.same_machine(me):
        if not pid_alive(held.pid, held.pid_start):
            return f"its process {held.pid} is gone"
        return None
    if held.slurm_job_id and held.slurm_job_id == me.slurm_job_id:
        return f"Slurm job {held.slurm_job_id} was requeued"
    run_id = held.group.split("|", 1)[0]
    if run_id not in ("", "none") and held.group == me.group and held.restart < me.restart:
        return f"torchrun restarted the group (restart {held.restart} -> {me.restart})"
    if age_s > STALE_S:
        return f"it was not refreshed for {age_s:.0f}s (its host refreshes it every {REFRESH_S:g}s)"
    return None


def _refusal(out_dir: Path, path: Path, held: Holder | None) -> OutDirInUse:
    who = held.describe() if held is not None else "an unknown run"
    return OutDirInUse(
        f"train.out_dir={str(out_dir)!r} is in use by another run ({who}; lock {path}); "
        "wait for it to end or stop it, or set a new train.out_dir (or logger.run_name); "
        f"a lock whose run is gone is taken over by itself (from another host after "
        f"{STALE_S / 60:g} minutes), or delete {path.name} if you are sure"
    )


def _look(path: Path) -> tuple[str, Holder | None, float] | None:
    """The lock's text, holder and age in seconds; None when there is no lock."""
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return text, Holder.parse(text), age


def check_free(out_dir: str | os.PathLike, env=None) -> None:
    """Raise OutDirInUse if a live run of another launch group holds out_dir (reads only)."""
    out = Path(out_dir).resolve()
    path = out / LOCK_FILE
    seen = _look(path)
    if seen is None:
        return
    _, held, age = seen
    mine = _group(os.environ if env is None else env)
    if held is not None and mine and held.group == mine:
        return  # this run's own rank 0
    if stale_reason(held, age, Holder.me()) is None:
        raise _refusal(out, path, held)


class OutDirLock:
    """A held lock: re-entrant in its process (the entry point and train() both take it)."""

    def __init__(self, out_dir: Path, holder: Holder) -> None:
        self.out_dir, self.holder = out_dir, holder
        self.path = out_dir / LOCK_FILE
        self.count = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="xpar-lock", daemon=True)
        self._thread.start()

    def owned(self) -> bool:
        seen = _look(self.path)
        return seen is not None and seen[1] is not None and seen[1].token == self.holder.token

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            if self.owned():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        self._stop.set()
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        if self.owned():  # never another run's lock (one that took over a paused run's)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> OutDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, OutDirLock] = {}


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock complete, atomically; False if one exists."""
    tmp = path.with_name(f"{LOCK_FILE}.tmp-{os.getpid()}")
    tmp.write_text(holder.dumps())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _break(path: Path, text: str) -> bool:
    """Remove a stale lock if it still reads `text`; one run at a time (a guard file)."""
    guard = path.with_name(f"{LOCK_FILE}.break")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > 60:  # a taker that died mid-way
                guard.unlink()
        return False
    try:
        if _look(path) is not None and path.read_text() == text:
            path.unlink()
        return True
    finally:
        guard.unlink()


def acquire(out_dir: str | os.PathLike) -> OutDirLock:
    """Take out_dir's lock for this process (again, if it holds it), or raise OutDirInUse."""
    out = Path(out_dir).resolve()
    path = out / LOCK_FILE
    held_here = _HELD.get(path)
    if held_here is not None and held_here.owned():
        held_here.count += 1
        return held_here
    out.mkdir(parents=True, exist_ok=True)
    me = Holder.me(secrets.token_hex(8))
    for _ in range(50):
        if _create(path, me):
            lock = _HELD[path] = OutDirLock(out, me)
            return lock
        seen = _look(path)
        if seen is None:
            continue  # released meanwhile
        text, held, age = seen
        why = stale_reason(held, age, me)
        if why is None:
            raise _refusal(out, path, held)
        if _break(path, text):
            who = held.describe() if held is not None else "unknown"
            print(
                f"xpar: took over the lock of a run that is gone ({why}; {who}): {path}",
                file=sys.stderr,
                flush=True,
            )
        else:
            time.sleep(0.1)  # another run is taking it over: see who won
    seen = _look(path)
    raise _refusal(out, path, seen[1] if seen is not None else None)


def hold(out_dir: str | os.PathLike, cleanup: contextlib.ExitStack) -> OutDirLock | None:
    """On rank 0: acquire, released by `cleanup` however the run ends. Other ranks: None."""
    if current_rank() != 0:
        return None
    lock = acquire(out_dir)
    cleanup.callback(lock.release)
    return lock

"""A real one-node Slurm cluster for the launch tests (munged, slurmctld, slurmd).

Needs root. Installs Debian's slurmctld, slurmd, slurm-client and munge when
they are missing. Everything else (config, state, logs, pid files) lives in
one directory, and clients find the config through $SLURM_CONF, so nothing
under /etc is changed except by the package install. Only daemons started
here are stopped here.

    python tests/launch/slurm_cluster.py up /tmp/xpar-slurm   # for debugging by hand
    python tests/launch/slurm_cluster.py down /tmp/xpar-slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from xpar.parallel.groups import free_port
from xpar.train.lock import pid_alive

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be set up here; the message says why (tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def ensure_installed() -> None:
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but still missing {missing}")


def node_hardware() -> str:
    """This machine as slurmd sees it: 'CPUs=2 Boards=1 ... RealMemory=24105'."""
    out = subprocess.run(
        [_which("slurmd"), "-C"], capture_output=True, text=True, check=True
    ).stdout
    fields = out.splitlines()[0].split()[1:]  # drop NodeName=...
    keep = []
    for f in fields:
        key, _, value = f.partition("=")
        if key == "RealMemory":  # leave the OS some room, or slurmd drains the node
            value = str(int(int(value) * 0.9))
        keep.append(f"{key}={value}")
    return " ".join(keep)


def write_config(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    # free ports, so a cluster left by someone else on this machine is no obstacle
    ctld_port, slurmd_port = free_port(), free_port()
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# written by tests/launch/slurm_cluster.py
ClusterName=xpartest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# no cgroups in a container: track processes by parent pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 {node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def slurm_env(root: Path) -> dict[str, str]:
    return dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _munge_ok() -> bool:
    munge, unmunge = _which("munge"), _which("unmunge")
    if not (munge and unmunge):
        return False
    p = subprocess.run(f"{munge} -n | {unmunge}", shell=True, capture_output=True)
    return p.returncode == 0


def start_munge(root: Path) -> int | None:
    """Start munged unless one answers already; returns the pid we started."""
    if _munge_ok():
        return None
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    pidfile = root / "run" / "munged.pid"
    # munged refuses to run as root; the Debian package made the munge user and key
    subprocess.run(
        ["runuser", "-u", "munge", "--", _which("munged"), "--force"],
        check=True,
        capture_output=True,
    )
    for _ in range(50):
        if _munge_ok():
            break
        time.sleep(0.1)
    else:
        raise SlurmUnavailable("munged did not come up")
    pid = _read_pid(Path("/run/munge/munged.pid"))
    if pid:
        pidfile.write_text(str(pid))
    return pid


def _logs(root: Path) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        p = root / "log" / name
        if p.exists():
            out.append(f"--- {name} (tail)\n" + "\n".join(p.read_text().splitlines()[-30:]))
    return "\n".join(out)


def node_state(root: Path) -> str:
    p = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], env=slurm_env(root), capture_output=True, text=True
    )
    return p.stdout.strip()


def up(root: Path, timeout: float = 60.0) -> dict[str, int]:
    """Start munged, slurmctld and slurmd; wait for the node to be idle; return their pids."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmctld/slurmd needs root")
    ensure_installed()
    root.mkdir(parents=True, exist_ok=True)
    down(root)  # daemons left over from an earlier run of ours
    for d in ("state", "spool"):
        shutil.rmtree(root / d, ignore_errors=True)
    conf = write_config(root)
    pids: dict[str, int] = {}
    munge_pid = start_munge(root)
    if munge_pid:
        pids["munged"] = munge_pid
    env = slurm_env(root)
    for daemon in ("slurmctld", "slurmd"):
        # -c: ignore saved state (fresh cluster); daemons fork into the background
        args = [_which(daemon), "-f", str(conf)]
        if daemon == "slurmctld":
            args.append("-c")
        p = subprocess.run(args, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SlurmUnavailable(f"{daemon} failed to start: {p.stderr}\n{_logs(root)}")
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = node_state(root)
        if state == "idle":
            break
        time.sleep(0.5)
    else:
        down(root)
        raise SlurmUnavailable(
            f"node not idle after {timeout:.0f}s (state {state!r})\n{_logs(root)}"
        )
    for daemon in ("slurmctld", "slurmd"):
        pid = _read_pid(root / "run" / f"{daemon}.pid")
        if pid:
            pids[daemon] = pid
    return pids


def down(root: Path) -> None:
    """Stop the daemons whose pid files this module wrote under root."""
    for name, pidfile in (
        ("slurmd", root / "run" / "slurmd.pid"),
        ("slurmctld", root / "run" / "slurmctld.pid"),
        ("munged", root / "run" / "munged.pid"),
    ):
        pid = _read_pid(pidfile)
        if pid is None or not pid_alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
        del name


if __name__ == "__main__":
    cmd, where = sys.argv[1], Path(sys.argv[2])
    if cmd == "up":
        print(up(where))
        print(f"export SLURM_CONF={where / 'slurm.conf'}")
    else:
        down(where)

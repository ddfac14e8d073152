"""Start-up benchmark: launch to the first training step of the tiny run, by phase.

    python -m xpar.bench startup [--runs 2] [--nproc 2] [--target-s 10] [OVERRIDE ...]

Launches `torchrun --standalone --nproc-per-node N -m xpar.train experiment=tiny` the way
a user does (the venv's torchrun, OMP_NUM_THREADS=1 as launch/dev.sh sets it), each run in
a fresh output folder, and reads back the phases rank 0 wrote to <out_dir>/startup.json
(xpar.train.phases). Printed per run: the launcher's share (launch to the rank's process
start), each phase, launch to the first step done, its ratio to the target, whether
anything was compiled, and the load average before the run: other work on the machine slows
every phase, so read the numbers with it.

Compiled: the runs get their own TORCH_EXTENSIONS_DIR (where DeepSpeed and torch JIT-build
C++ ops), so a build shows up as files written there; a second run must write none.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xpar.train.phases import STARTUP_FILE

TARGET_S = 10.0
PROG = "python -m xpar.bench startup"
# What a JIT build of a C++ op prints (DeepSpeed's op builder, torch.utils.cpp_extension).
COMPILE_PATTERNS = re.compile(
    r"built successfully|Building extension module|ninja|\bgcc\b|\bc\+\+ "
)
# Launcher variables that would make the run join someone else's process group.
_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


@dataclass
class StartupRun:
    """One launch: seconds from the launch, by phase."""

    launcher_s: float  # launch -> rank 0's process start (torchrun's own start-up)
    phases: dict[str, float]  # rank 0's phases, in order
    first_step_s: float  # launch -> rank 0's first step done
    total_s: float  # launch -> torchrun exited
    compiled: bool
    exit_code: int
    load: float  # 1-minute load average just before the launch
    output: str = field(default="", repr=False)


def torchrun_command(nproc: int) -> list[str]:
    """The venv's torchrun, as a user runs it (`python -m torch.distributed.run` without one)."""
    script = Path(sys.executable).with_name("torchrun")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def launch(
    out_dir: Path, nproc: int, overrides: Sequence[str], workdir: Path, ext_dir: Path
) -> StartupRun:
    """Run the tiny job once into out_dir and read its phases."""
    cmd = [
        *torchrun_command(nproc),
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "xpar.train",
        "experiment=tiny",
        f"train.out_dir={out_dir}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    ext_dir.mkdir(parents=True, exist_ok=True)
    before = _snapshot(ext_dir)
    load = os.getloadavg()[0]
    t_launch = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    t_end = time.time()
    run = read_run(
        out_dir / STARTUP_FILE, t_launch, t_end, proc.stdout + proc.stderr, proc.returncode, load
    )
    run.compiled = run.compiled or _snapshot(ext_dir) != before
    return run


def read_run(
    path: Path, t_launch: float, t_end: float, output: str, exit_code: int, load: float
) -> StartupRun:
    """A StartupRun from the trainer's startup.json and when the launch began and ended."""
    if not path.is_file():
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"the run wrote no {path} (exit {exit_code}); its output ends:\n{tail}")
    data = json.loads(path.read_text())
    return StartupRun(
        launcher_s=data["start"] - t_launch,
        phases=dict(data["phases"]),
        first_step_s=data["first_step_done"] - t_launch,
        total_s=t_end - t_launch,
        compiled=bool(COMPILE_PATTERNS.search(output)),
        exit_code=exit_code,
        load=load,
        output=output,
    )


def report(runs: Sequence[StartupRun], target_s: float, nproc: int) -> str:
    """The table: one column per run, phases in rank 0's order, the ratio to the target."""
    names = list(dict.fromkeys(n for r in runs for n in r.phases))
    head = f"{'':<22}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs)))

    def row(label: str, values: Sequence[str]) -> str:
        return f"{label:<22}" + "".join(f"{v:>10}" for v in values)

    lines = [
        f"start-up of experiment=tiny on {nproc} ranks (torchrun): seconds from the launch",
        head,
        row("load before (1 min)", [f"{r.load:.2f}" for r in runs]),
        row("launcher (torchrun)", [f"{r.launcher_s:.2f}" for r in runs]),
        *(row(f"  {n}", [f"{r.phases.get(n, 0.0):.2f}" for r in runs]) for n in names),
        row("first step done", [f"{r.first_step_s:.2f}" for r in runs]),
        row(f"  / target {target_s:g}s", [f"{r.first_step_s / target_s:.2f}" for r in runs]),
        row("whole run", [f"{r.total_s:.2f}" for r in runs]),
        row("compiled anything", ["yes" if r.compiled else "no" for r in runs]),
        row("exit code", [str(r.exit_code) for r in runs]),
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Time the tiny training run from launch to its first step, by phase "
        "(imports, config, data, process group, engine, W&B, first step), against a target.",
        epilog="Plain python, not under torchrun: it launches torchrun itself. Example:\n"
        f"  {PROG} --runs 3\n  {PROG} logger=none   (without W&B)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--runs", type=int, default=2, help="launches, one after the other (default 2)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per launch (default 2)")
    ap.add_argument(
        "--target-s",
        type=float,
        default=TARGET_S,
        help=f"seconds from launch to the first step to aim for (default {TARGET_S:g})",
    )
    ap.add_argument(
        "--out",
        default="",
        help="keep the runs' folders under this directory (default: a temporary one, removed)",
    )
    ap.add_argument(
        "--workdir",
        default="",
        help="directory to launch from; `-m xpar.train` finds a source tree there first "
        "(default: the output directory)",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides added after experiment=tiny, e.g. logger=none",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if "RANK" in os.environ:
        raise SystemExit(f"{PROG}: run it with plain python, not under torchrun (it launches it)")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xpar-startup-"))
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else root
    runs: list[StartupRun] = []
    try:
        for i in range(args.runs):
            out = root / f"run{i + 1}"
            runs.append(launch(out, args.nproc, args.overrides, workdir, root / "torch_extensions"))
            print(
                f"startup: run {i + 1}/{args.runs}: first step {runs[-1].first_step_s:.1f}s",
                flush=True,
            )
        print(report(runs, args.target_s, args.nproc), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    if any(r.exit_code for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

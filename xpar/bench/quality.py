"""Quality benchmark: suites of arms trained by the real trainer, each suite checking the
direction of a published result, as a table with its target and a PNG.

    python -m xpar.bench quality [--suite NAME[,NAME...]|all] [--quick] [--jobs 2] [--steps N]
        [--out DIR] [--reuse code|command|never] [OVERRIDE ...]

A suite (xpar/bench/quality_suites.py) is a few arms, each an experiment file under
conf/experiment/ plus overrides, and a function that turns the arms' curves into the
suite's figures, each compared with its target (met / not met). Every arm runs as its own
`python -m xpar.train` process (a world of one) into OUT/<arm>/, `--jobs` at a time with
`cpu_count // jobs` threads each; an arm that needs another arm's checkpoint (a teacher, a
pre-trained encoder) starts once that one has finished. Curves are read back from each
arm's offline W&B run. OVERRIDEs are Hydra overrides applied to every arm.

Arms are shared: suites that name the same arm (suite 1's MoE arm is suite 3's aux-loss arm
and suite 5's teacher) train it once. A finished arm is reused by a later call when its
command, thread count and the trainer's code (a hash of xpar/ outside xpar/bench and of
conf/) are unchanged: the trainer is deterministic, so training it again would give the
same numbers. --reuse command also takes runs made by other code (their figures may be
stale: say so when quoting them); --reuse never trains every arm again.

Written to OUT (default outputs/quality): <arm>/ (the run) and <arm>.log per arm, and per
suite <suite>.json (arms, curves, figures, targets) and <suite>.png. --quick trains tiny
models for a few steps: it checks the pipeline end to end (arms run, metrics come back,
tables, targets and plots are made), not the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import xpar
from xpar.train.wandb_reader import read_offline_run

DEFAULT_SUITE = "moe_vs_dense"
RECORD = "bench_arm.json"  # in an arm's run folder once it finished: what made it
REUSE = ("code", "command", "never")  # --reuse: what a finished run must share to stand in
# Launcher variables that would make a child join someone else's process group.
_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
)
# --quick: every arm becomes a tiny model trained for 4 steps (an arm may add its own).
QUICK = (
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "moe.d_ff=32",
    "moe.num_experts=4",
    "data.seq_len=32",
    "data.max_files=4",
    "train.micro_batch_size=2",
    "train.steps=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    "optim.warmup_steps=1",
    "logger.log_every=1",
)


# --------------------------------------------------------------------------- suites


@dataclass(frozen=True)
class Arm:
    """One training run: conf/experiment/<experiment>.yaml plus overrides.

    after: arms whose finished runs this one needs; late(dirs) gives the overrides that
    point at them (dirs: arm name -> its run folder), e.g. a teacher's checkpoint.
    """

    name: str  # its run folder under OUT, and its key when suites share it
    experiment: str
    overrides: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()  # added to QUICK for this arm in --quick
    after: tuple[str, ...] = ()
    late: Callable[[Mapping[str, Path]], Sequence[str]] | None = field(default=None, compare=False)


@dataclass
class Target:
    """One measured figure of a suite against its goal."""

    what: str
    value: float | None  # None: could not be measured (e.g. the target loss never reached)
    goal: str  # e.g. "<= 0.70"
    met: bool
    note: str = ""


@dataclass
class Mark:
    """A reference line on a suite's plot: horizontal (a loss) or vertical (a step)."""

    panel: str  # the metric of the panel, e.g. val/loss
    kind: str  # "h" or "v"
    value: float
    arm: str = ""  # drawn in that arm's colour; gray if ""


@dataclass
class Outcome:
    """What a suite's evaluate() makes of its arms: extra table columns and the targets."""

    columns: list[str]
    rows: dict[str, list[str]]  # arm name -> one cell per column
    targets: list[Target]
    marks: list[Mark] = field(default_factory=list)
    # derived curves to plot and save beside the logged val/* ones: arm -> key -> curve
    curves: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """Arms, how their figures are computed and judged, and what the plot shows.

    fair: groups of arms that must train on the same data, steps, schedule (train.*,
    data.*, optim.*, task.*), checked on the composed configs before anything runs;
    may_differ: dotted fields allowed to differ inside a group (e.g. optim.lr for arms at
    their own tuned lr). panels: (metric, axis label) per plot panel.
    """

    name: str
    title: str
    reference: str  # the published result whose direction the suite checks
    arms: tuple[Arm, ...]
    evaluate: Callable[[Mapping[str, ArmRun]], Outcome]
    fair: tuple[tuple[str, ...], ...] = ()
    may_differ: tuple[str, ...] = ()
    panels: tuple[tuple[str, str], ...] = (("val/loss", "validation loss (nats/token)"),)


# --------------------------------------------------------------------------- results


@dataclass
class ArmRun:
    """One arm's finished run, read back from its W&B run and log."""

    name: str
    experiment: str
    out_dir: str
    cmd: list[str]
    wall_s: float
    reused: bool
    model_summary: str  # the trainer's "model: params ..." line
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def series(self, key: str) -> dict[int, float]:
        """step -> value of a logged scalar (val/* at each eval, train/* and moe/* at each
        log step)."""
        out = {}
        for row in self.history:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[int(row["_step"])] = float(v)
        return out

    def final(self, key: str = "val/loss") -> float:
        """The value at the last step that logged it."""
        s = self.series(key)
        if not s:
            raise RuntimeError(f"{self.out_dir}: the W&B run holds no {key}")
        return s[max(s)]

    def params(self) -> str:
        return params_of(self.model_summary)

    def to_json(self) -> dict[str, Any]:
        evals = sorted({k for r in self.history for k in r if k.startswith("val/")})
        return {
            "name": self.name,
            "experiment": self.experiment,
            "out_dir": self.out_dir,
            "cmd": self.cmd,
            "wall_s": self.wall_s,
            "reused": self.reused,
            "model_summary": self.model_summary,
            "curves": {k: self.series(k) for k in evals},
        }


@dataclass
class SuiteResult:
    suite: str
    title: str
    reference: str
    quick: bool
    columns: list[str]
    rows: dict[str, list[str]]
    targets: list[Target]
    arms: dict[str, dict[str, Any]]
    met: bool  # every target met
    overrides: list[str]
    wall_s: float
    marks: list[Mark] = field(default_factory=list)
    plot: str | None = None


# --------------------------------------------------------------------------- pure helpers


def steps_to_reach(curve: Mapping[int, float], target: float) -> float | None:
    """First step at which `curve` (step -> loss) is <= target, linear between points.

    None if it never gets there. A curve that starts at or below the target reaches it
    at its first step.
    """
    points = sorted(curve.items())
    if not points:
        return None
    s0, l0 = points[0]
    if l0 <= target:
        return float(s0)
    for s1, l1 in points[1:]:
        if l1 <= target:
            return s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
        s0, l0 = s1, l1
    return None


def at_most(what: str, value: float | None, bound: float, digits: int = 3) -> Target:
    """A target `value <= bound`; an unmeasured value (None) is not met."""
    met = value is not None and math.isfinite(value) and value <= bound
    return Target(what, value, f"<= {bound:.{digits}g}", met)


def at_least(what: str, value: float | None, bound: float, digits: int = 3) -> Target:
    """A target `value >= bound`; an unmeasured value (None) is not met."""
    met = value is not None and math.isfinite(value) and value >= bound
    return Target(what, value, f">= {bound:.{digits}g}", met)


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_curves(curves: Mapping[str, Mapping[int, float]], what: str = "val loss") -> str:
    """Curves side by side (step -> value per arm), one row per step of any of them."""
    names = list(curves)
    widths = [max(len(n), 8) for n in names]
    head = "  step | " + " | ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    rows = [f"{what} per eval step", head, "-" * len(head)]
    steps = sorted({s for c in curves.values() for s in c})
    for s in steps:
        cells = [
            (f"{curves[n][s]:.4f}" if s in curves[n] else "-").rjust(w)
            for n, w in zip(names, widths, strict=True)
        ]
        rows.append(f"{s:>6} | " + " | ".join(cells))
    return "\n".join(rows)


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def params_of(model_summary: str) -> str:
    """'total / active' from the trainer's model line, e.g. '4.56M / 885.89K'."""
    m = re.search(r"params ([\d.]+\w*) total, ([\d.]+\w*) active", model_summary)
    return f"{m.group(1)} / {m.group(2)}" if m else "-"


def verdict(t: Target) -> str:
    return "met" if t.met else "NOT met"


def report(r: SuiteResult) -> str:
    """The printed summary of one suite: arms, curves, targets."""
    head = ["arm", "experiment", "params total / active", *r.columns, "wall s"]
    arm_rows = []
    for name, arm in r.arms.items():
        params = params_of(arm["model_summary"])
        wall = f"{arm['wall_s']:.0f}" + (" (reused)" if arm["reused"] else "")
        arm_rows.append([name, arm["experiment"], params, *r.rows.get(name, []), wall])
    curves = {n: a["curves"].get("val/loss", {}) for n, a in r.arms.items()}
    targets = [[t.what, fmt(t.value, 3), t.goal, verdict(t), t.note] for t in r.targets]
    lines = [
        f"== quality suite {r.suite}: {r.title}" + (" (--quick: not the figures)" * r.quick),
        f"after: {r.reference}",
        "",
        format_table(head, arm_rows),
        "",
        format_curves(curves),
        "",
        format_table(["target", "measured", "goal", "verdict", "note"], targets),
        f"suite {r.suite}: {'all targets met' if r.met else 'NOT all targets met'}; "
        f"{r.wall_s:.0f}s",
    ]
    if r.plot:
        lines.append(f"plot: {r.plot}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def write_plot(
    result: SuiteResult, panels: Sequence[tuple[str, str]], path: str | os.PathLike
) -> Path | None:
    """Each panel's metric per arm over steps, with the suite's reference lines, as a PNG.

    Returns the path, or None (after saying why) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "quality: matplotlib is not installed, no plot written "
            "(it is one of xpar's dependencies: reinstall xpar, then rerun)",
            flush=True,
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = {n: f"C{i}" for i, n in enumerate(result.arms)}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.4 * len(panels), 4.0), dpi=100, squeeze=False
    )
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        _draw_panel(ax, result, key, label, colors)
        for m in result.marks:
            if m.panel == key:
                line = ax.axhline if m.kind == "h" else ax.axvline
                line(m.value, color=colors.get(m.arm, "gray"), linestyle="--", linewidth=1)
    met = sum(t.met for t in result.targets)
    title = f"{result.suite}: {result.title} ({met}/{len(result.targets)} targets met)"
    title += " [--quick]" if result.quick else ""
    fig.suptitle(textwrap.fill(title, width=90 * len(panels)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_panel(ax, result: SuiteResult, key: str, label: str, colors: dict) -> None:
    values = []
    for name, arm in result.arms.items():
        curve = arm["curves"].get(key) or {}
        steps = sorted(curve)
        if steps:
            ys = [curve[s] for s in steps]
            ax.plot(steps, ys, marker="o", markersize=3, color=colors[name], label=name)
            values += [(s, v) for s, v in zip(steps, ys, strict=True)]
    # A loss's first evals sit far above the rest: start the y axis near the interesting part.
    later = [v for s, v in values if s > 0]
    if key.endswith("loss") and later:
        low, top = min(v for _, v in values), max(later)
        if top > low:
            ax.set_ylim(low - 0.05 * (top - low), top)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if values:
        ax.legend(loc="best", fontsize=8)


# --------------------------------------------------------------------------- reading runs


def read_val_curve(out_dir: str | os.PathLike) -> dict[int, float]:
    """step -> val/loss from the offline W&B run the trainer wrote under out_dir."""
    run = read_offline_run(out_dir)
    curve = {int(r["_step"]): float(r["val/loss"]) for r in run["history"] if "val/loss" in r}
    if not curve:
        raise RuntimeError(f"{out_dir}: the W&B run holds no val/loss (did training finish?)")
    return curve


def latest_checkpoint(out_dir: str | os.PathLike) -> Path:
    """The checkpoint directory a finished run's checkpoints/latest names."""
    root = Path(out_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except OSError as e:
        raise RuntimeError(f"{root}: no latest checkpoint ({e}); did the run finish?") from e
    return root / name


def code_fingerprint() -> str:
    """sha256 over the trainer's code and configs (xpar/ except xpar/bench, and conf/)."""
    from xpar.config.store import CONFIG_DIR

    pkg = Path(xpar.__file__).resolve().parent
    files = [p for p in pkg.rglob("*.py") if "bench" not in p.relative_to(pkg).parts[:1]]
    files += list(Path(CONFIG_DIR).rglob("*.yaml"))
    h = hashlib.sha256()
    for p in sorted(files):
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.name).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _last_step(metrics: Path) -> int:
    """The newest complete row's step in a metrics.jsonl being written (0 if none yet)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))  # log-step rows carry many fields
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a row cut in half by the writer or by the seek
    return 0


def _model_line(log: Path) -> str:
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("model: "):
            return line[len("model: ") :]
    return ""


# --------------------------------------------------------------------------- planning


def collect_arms(suites: Sequence[Suite]) -> list[Arm]:
    """Every arm of the suites once, in order; the same name must mean the same arm, and
    every arm an arm waits for must be among them."""
    arms: dict[str, Arm] = {}
    for s in suites:
        for a in s.arms:
            if a.name in arms and arms[a.name] != a:
                raise ValueError(
                    f"quality: suites define arm {a.name!r} twice, differently: "
                    f"{arms[a.name]} and {a}; give one of them another name"
                )
            arms.setdefault(a.name, a)
    for a in arms.values():
        missing = [n for n in a.after if n not in arms]
        if missing:
            raise ValueError(f"quality: arm {a.name!r} waits for {missing}, which no suite trains")
    return list(arms.values())


def unfair_fields(
    plain: Mapping[str, Mapping[str, Any]], may_differ: Sequence[str] = ()
) -> list[str]:
    """Dotted fields of train/data/optim/task that differ between the arms' plain configs
    (arm name -> to_plain_dict), ignoring train.out_dir and the may_differ fields (a field
    or a whole node, e.g. train.distill)."""
    skip = {"train.out_dir", *may_differ}
    flat = {
        n: _flatten({k: c.get(k) for k in ("train", "data", "optim", "task")})
        for n, c in plain.items()
    }
    keys = sorted({k for f in flat.values() for k in f})
    out = []
    for k in keys:
        if any(k == s or k.startswith(s + ".") for s in skip):
            continue
        if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1:
            out.append(k)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _compose_all(arms: Sequence[Arm], suites: Sequence[Suite], user: list[str]) -> dict:
    """Every arm composed up front (a config mistake fails in seconds, not after a run) and
    each suite's fairness groups checked; returns arm name -> its config."""
    from xpar.config.store import compose_config, to_plain_dict

    cfgs = {
        a.name: compose_config([f"experiment={a.experiment}", *a.overrides, *user], world_size=1)
        for a in arms
    }
    for s in suites:
        for group in s.fair:
            diff = unfair_fields({n: to_plain_dict(cfgs[n]) for n in group}, s.may_differ)
            if diff:
                raise ValueError(
                    f"quality: suite {s.name}'s arms {', '.join(group)} differ in "
                    f"{', '.join(diff)}; the comparison needs the same data, steps and "
                    "schedule (change their experiment files together)"
                )
    return cfgs


# --------------------------------------------------------------------------- running


def _child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    root = str(Path(xpar.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ArmRunner:
    """Trains arms as trainer processes, `jobs` at a time, an arm once the arms it waits for
    have finished; reuses a finished run whose record matches (see the module doc)."""

    def __init__(  # noqa: PLR0913 -- the runner's whole setup, named
        self,
        out: Path,
        user: list[str],
        steps: Mapping[str, int],
        jobs: int,
        reuse: str = "code",
        progress_every_s: float = 30.0,
    ):
        if reuse not in REUSE:
            raise ValueError(f"quality: reuse={reuse!r}; choose one of {', '.join(REUSE)}")
        self.out, self.user, self.steps, self.jobs = out, user, steps, max(1, jobs)
        self.reuse, self.progress_every_s = reuse, progress_every_s
        self.env = _child_env(max(1, (os.cpu_count() or 1) // self.jobs))
        self.code = code_fingerprint()
        self.t0 = time.perf_counter()
        self.running: dict[str, tuple[Arm, subprocess.Popen, float, list[str], dict]] = {}
        self.done: dict[str, ArmRun] = {}
        self.keys: dict[str, dict[str, str]] = {}  # arm -> {"code": key, "command": key}

    def run_all(self, arms: Sequence[Arm]) -> dict[str, ArmRun]:
        self.out.mkdir(parents=True, exist_ok=True)
        pending = list(arms)
        last_report = time.perf_counter()
        try:
            while pending or self.running:
                for arm in [a for a in pending if all(n in self.done for n in a.after)]:
                    if len(self.running) >= self.jobs:
                        break
                    pending.remove(arm)
                    self._start(arm)
                time.sleep(0.2 if self.running else 0)
                self._reap()
                if self.running and time.perf_counter() - last_report >= self.progress_every_s:
                    last_report = time.perf_counter()
                    self._report(last_report)
        finally:
            for _, proc, _, _, _ in self.running.values():
                proc.kill()
                proc.wait()
        return self.done

    def _command(self, arm: Arm) -> list[str]:
        late = list(arm.late({n: self.out / n for n in arm.after})) if arm.late else []
        return [
            sys.executable,
            "-m",
            "xpar.train",
            f"experiment={arm.experiment}",
            *arm.overrides,
            *self.user,
            *late,
            f"train.out_dir={self.out / arm.name}",
            "train.resume=never",
            "logger.wandb_mode=offline",
            "logger.progress_bar=never",
            f"train.ckpt_every={self.steps[arm.name]}",  # one checkpoint, at the end
        ]

    def _keys(self, arm: Arm, cmd: list[str]) -> dict[str, str]:
        """What makes the run, hashed: with the trainer's code ("code") and without it
        ("command"); both include the keys of the runs it started from."""
        keys = {}
        for kind in ("code", "command"):
            what = {
                "cmd": cmd,
                "threads": self.env["OMP_NUM_THREADS"],
                "code": self.code if kind == "code" else "",
                "after": [self.keys[n][kind] for n in arm.after],
            }
            keys[kind] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        return keys

    def _start(self, arm: Arm) -> None:
        cmd = self._command(arm)
        key = self.keys[arm.name] = self._keys(arm, cmd)
        arm_dir, log = self.out / arm.name, self.out / f"{arm.name}.log"
        if self.reuse != "never":
            reused = self._reuse(arm, key[self.reuse], cmd)
            if reused is not None:
                self.done[arm.name] = reused
                print(f"quality: {arm.name}: reusing the finished run in {arm_dir}", flush=True)
                return
        shutil.rmtree(arm_dir, ignore_errors=True)  # resume=never, and one W&B run
        with open(log, "w", encoding="utf-8") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        self.running[arm.name] = (arm, proc, time.perf_counter(), cmd, key)

    def _reuse(self, arm: Arm, key: str, cmd: list[str]) -> ArmRun | None:
        try:
            record = json.loads((self.out / arm.name / RECORD).read_text())
            if record["keys"][self.reuse] != key:
                return None
            return self._read(arm, cmd, float(record["wall_s"]), reused=True)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None  # no record, another command, or a run that cannot be read: retrain

    def _read(self, arm: Arm, cmd: list[str], wall_s: float, reused: bool) -> ArmRun:
        arm_dir = self.out / arm.name
        latest_checkpoint(arm_dir)  # a finished run has its final checkpoint
        history = read_offline_run(arm_dir)["history"]
        if not any("val/loss" in r for r in history):
            raise RuntimeError(f"{arm_dir}: the W&B run holds no val/loss (did it finish?)")
        return ArmRun(
            name=arm.name,
            experiment=arm.experiment,
            out_dir=str(arm_dir),
            cmd=cmd,
            wall_s=wall_s,
            reused=reused,
            model_summary=_model_line(self.out / f"{arm.name}.log"),
            history=history,
        )

    def _reap(self) -> None:
        for name, (arm, proc, started, cmd, key) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[name]
            log = self.out / f"{name}.log"
            if proc.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(
                    f"quality: the {name} run failed (exit {proc.returncode}); "
                    f"last lines of {log}:\n{tail}"
                )
            wall = time.perf_counter() - started
            self.done[name] = self._read(arm, cmd, wall, reused=False)
            record = {
                "keys": key,
                "cmd": cmd,
                "wall_s": wall,
                "threads": self.env["OMP_NUM_THREADS"],
            }
            (self.out / name / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            print(f"quality: {name} done in {wall:.0f}s", flush=True)

    def _report(self, now: float) -> None:
        where = ", ".join(
            f"{n} step {_last_step(self.out / n / 'metrics.jsonl')}/{self.steps[n]}"
            for n in self.running
        )
        print(f"quality: {where} ({now - self.t0:.0f}s)", flush=True)


def run_suites(  # noqa: PLR0913 -- the command line's options, named
    suites: Sequence[Suite],
    *,
    out: str | os.PathLike = "outputs/quality",
    overrides: Sequence[str] = (),
    steps: int | None = None,
    jobs: int = 2,
    quick: bool = False,
    reuse: str = "code",
    progress_every_s: float = 30.0,
) -> list[SuiteResult]:
    """Train every arm of the suites (each once), then judge each suite. See the module doc."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    # The order on each arm's command line (the last value of a key wins): QUICK, the arm's
    # own overrides (and its quick ones), then the caller's.
    user = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    common = list(QUICK) + user if quick else user
    arms = collect_arms(suites)
    if quick:
        arms = [replace(a, overrides=(*QUICK, *a.overrides, *a.quick), quick=()) for a in arms]
    cfgs = _compose_all(arms, suites, user)
    out.mkdir(parents=True, exist_ok=True)
    runner = ArmRunner(
        out, user, {n: c.train.steps for n, c in cfgs.items()}, jobs, reuse, progress_every_s
    )
    print(
        f"quality: suite(s) {', '.join(s.name for s in suites)}: {len(arms)} arm(s) "
        f"({', '.join(a.name for a in arms)}); {runner.jobs} at once, "
        f"{runner.env['OMP_NUM_THREADS']} thread(s) each; logs in {out}/<arm>.log",
        flush=True,
    )
    runs = runner.run_all(arms)
    results = []
    for s in suites:
        r = judge(s, runs, quick=quick, overrides=common)
        r.wall_s = time.perf_counter() - t0
        png = write_plot(r, s.panels, out / f"{s.name}.png")
        r.plot = str(png) if png else None
        (out / f"{s.name}.json").write_text(json.dumps(asdict(r), indent=2) + "\n")
        results.append(r)
    return results


def judge(
    suite: Suite, runs: Mapping[str, ArmRun], quick: bool = False, overrides: Sequence[str] = ()
) -> SuiteResult:
    """A suite's result from its arms' runs: the evaluate() table and targets."""
    mine = {a.name: runs[a.name] for a in suite.arms}
    o = suite.evaluate(mine)
    arms = {n: r.to_json() for n, r in mine.items()}
    for n, extra in o.curves.items():
        arms[n]["curves"].update(extra)
    return SuiteResult(
        suite=suite.name,
        title=suite.title,
        reference=suite.reference,
        quick=quick,
        columns=o.columns,
        rows=o.rows,
        targets=o.targets,
        arms=arms,
        met=all(t.met for t in o.targets),
        overrides=list(overrides),
        wall_s=0.0,
        marks=o.marks,
    )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    from xpar.bench.quality_suites import SUITES

    args = _parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun every rank would train every arm into the same folder.
        print(
            f"python -m xpar.bench quality starts its own trainer processes: run it once, "
            f"without torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']} here): "
            "python -m xpar.bench quality [options]",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    suites = list(SUITES.values()) if args.suite == ["all"] else [SUITES[n] for n in args.suite]
    results = run_suites(
        suites,
        out=args.out,
        overrides=args.overrides,
        steps=args.steps,
        jobs=args.jobs,
        quick=args.quick,
        reuse=args.reuse,
    )
    for r in results:
        print("\n" + report(r), flush=True)
    if len(results) > 1:
        met = [r.suite for r in results if r.met]
        print(f"\nquality: {len(met)}/{len(results)} suites met every target", flush=True)


def _suite_names(suites: Mapping[str, Suite]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return names
        bad = [n for n in names if n not in suites]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"{text!r}: no suite named {', '.join(bad) or '(none)'}; choose from "
                f"{', '.join(suites)}, or all"
            )
        return list(dict.fromkeys(names))

    return parse


def _parser() -> argparse.ArgumentParser:
    from xpar.bench.quality_suites import SUITES

    listed = "\n".join(f"  {s.name:<13} {s.title}" for s in SUITES.values())
    ap = argparse.ArgumentParser(
        prog="python -m xpar.bench quality",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quality suites: arms trained with the real trainer (one process each, a\n"
        "world of one), each suite the direction of a published result, printed as a table\n"
        "with its targets (met / not met) and written as OUT/<suite>.json and OUT/<suite>.png.",
        epilog=f"suites:\n{listed}\n\n"
        "Writes OUT/<arm>/ (the runs, reused while command and code are unchanged) and\n"
        "OUT/<arm>.log. Run it with plain python, not torchrun, e.g.\n"
        "  python -m xpar.bench quality --suite aux_free\n"
        "  python -m xpar.bench quality --suite all --quick",
    )
    ap.add_argument("--suite", default=[DEFAULT_SUITE], type=_suite_names(SUITES),
                    metavar="NAME[,NAME...]|all",
                    help="the suites to run, comma-separated, or all (default: "
                    f"{DEFAULT_SUITE})")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, 4 steps: checks the pipeline, not the figures "
                    "(CI)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of every arm (default: train.steps of its "
                    "yaml file)")  # fmt: skip
    ap.add_argument("--out", default="outputs/quality",
                    help="output folder (default: %(default)s)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="arms trained at once, each with its share of the CPU threads "
                    "(default: 2)")  # fmt: skip
    ap.add_argument("--reuse", default="code", choices=REUSE,
                    help="when a finished run in OUT stands for an arm: code = same command "
                    "and trainer code (default), command = same command, whatever the code "
                    "(figures may be stale), never = train every arm again")  # fmt: skip
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                    help="Hydra overrides applied to every arm, e.g. "
                    "train.eval_every=25")  # fmt: skip
    return ap

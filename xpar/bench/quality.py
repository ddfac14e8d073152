"""Quality benchmark: a dense and an MoE model with the same active parameters.

    python -m xpar.bench quality [--steps N] [--out DIR] [--jobs 2] [--plot PATH] [OVERRIDE ...]

Trains conf/experiment/quality_dense.yaml and quality_moe.yaml (same active params per
token, same data in the same order, same tokens per step, same lr schedule and steps)
with the real trainer, each as its own `python -m xpar.train` process (a world of one),
both at once by default (--jobs 2; each gets half the CPU threads). OVERRIDEs are Hydra
overrides applied to both arms (e.g. train.eval_every=25).

Validation loss every train.eval_every steps is read back from each arm's offline W&B
run. Printed: both curves (step -> dense, moe), the steps each arm needs to reach the
dense model's final validation loss (linear interpolation between eval points), and
moe_steps / dense_steps (the goal is <= 0.7). Written to DIR (default outputs/quality):
dense/ and moe/ (the runs; replaced on every call), quality.json and quality.png
(matplotlib, optional: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import xpar
from xpar.config.store import compose_config
from xpar.train.wandb_reader import read_offline_run

ARMS = {"dense": "quality_dense", "moe": "quality_moe"}
TARGET_RATIO = 0.7
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


@dataclass
class ArmResult:
    name: str
    experiment: str
    out_dir: str
    val_curve: dict[int, float]  # step -> validation loss
    wall_s: float
    model_summary: str = ""  # the trainer's "model: params ..." line


@dataclass
class QualityResult:
    dense: ArmResult
    moe: ArmResult
    steps: int
    tokens_per_step: int
    target_loss: float  # the dense model's final validation loss
    dense_steps: float | None
    moe_steps: float | None
    ratio: float | None  # moe_steps / dense_steps; None if the MoE never got there
    wall_s: float
    overrides: list[str] = field(default_factory=list)
    plot: str | None = None


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


def format_table(dense: Mapping[int, float], moe: Mapping[int, float]) -> str:
    """Both validation curves side by side, one row per eval step."""
    rows = ["  step | dense val loss | moe val loss", "------+----------------+-------------"]
    for s in sorted(set(dense) | set(moe)):
        d = f"{dense[s]:.4f}" if s in dense else "-"
        m = f"{moe[s]:.4f}" if s in moe else "-"
        rows.append(f"{s:>6} | {d:>14} | {m:>12}")
    return "\n".join(rows)


def write_plot(result: QualityResult, path: str | os.PathLike) -> Path | None:
    """Both curves, the target line and where each arm reaches it, as a small PNG.

    Returns the path, or None (after saying why) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "quality: matplotlib is not installed, no plot written "
            "(pip install matplotlib, then rerun)",
            flush=True,
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for arm, color in ((result.dense, "tab:blue"), (result.moe, "tab:orange")):
        steps = sorted(arm.val_curve)
        xs, ys = steps, [arm.val_curve[s] for s in steps]
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=arm.name)
    ax.axhline(result.target_loss, color="gray", linestyle="--", linewidth=1)
    for steps, color in ((result.dense_steps, "tab:blue"), (result.moe_steps, "tab:orange")):
        if steps is not None:
            ax.axvline(steps, color=color, linestyle=":", linewidth=1)
    # The first evals sit far above the rest; start the y axis near the interesting part.
    later = [v for a in (result.dense, result.moe) for s, v in a.val_curve.items() if s > 0]
    if later:
        top = max(later)
        low = min(v for a in (result.dense, result.moe) for v in a.val_curve.values())
        ax.set_ylim(low - 0.05 * (top - low), top)
    ratio = f"{result.ratio:.2f}" if result.ratio is not None else "not reached"
    ax.set_title(
        f"Validation loss, equal active params; moe/dense steps to dense final: {ratio}",
        fontsize=9,
    )
    ax.set_xlabel(f"step ({result.tokens_per_step} tokens each)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_val_curve(out_dir: str | os.PathLike) -> dict[int, float]:
    """step -> val/loss from the offline W&B run the trainer wrote under out_dir."""
    run = read_offline_run(out_dir)
    curve = {int(r["_step"]): float(r["val/loss"]) for r in run["history"] if "val/loss" in r}
    if not curve:
        raise RuntimeError(f"{out_dir}: the W&B run holds no val/loss (did training finish?)")
    return curve


def _child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    root = str(Path(xpar.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


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


def run_benchmark(
    *,
    steps: int | None = None,
    out: str | os.PathLike = "outputs/quality",
    overrides: Sequence[str] = (),
    jobs: int = 2,
    plot: str | os.PathLike | None = None,
    progress_every_s: float = 30.0,
) -> QualityResult:
    """Train both arms, read their validation curves back, compare. See the module doc."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    common = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    d = _compose_fair_arms(common)
    n_steps = d.train.steps
    tokens_per_step = d.train.micro_batch_size * d.train.grad_accum * d.data.seq_len
    jobs = max(1, min(int(jobs), len(ARMS)))
    env = _child_env(max(1, (os.cpu_count() or 1) // jobs))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"quality: dense vs MoE, {n_steps} steps x {tokens_per_step} tokens, eval every "
        f"{d.train.eval_every} steps on {d.train.eval_batches} batches; {jobs} job(s) at once, "
        f"{env['OMP_NUM_THREADS']} thread(s) each; logs in {out}/<arm>.log",
        flush=True,
    )
    runner = _ArmRunner(out, common, n_steps, env, t0)
    walls = runner.run_all(jobs, progress_every_s)
    result = _compare(out, walls, n_steps, tokens_per_step, common)
    png = write_plot(result, plot if plot is not None else out / "quality.png")
    result.plot = str(png) if png else None
    result.wall_s = time.perf_counter() - t0
    (out / "quality.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _compose_fair_arms(common: list[str]):
    """Both arms composed up front (a config mistake fails in a second, not after a run),
    and the fairness conditions checked on what will actually run; returns the dense arm."""
    cfgs = {
        name: compose_config([f"experiment={exp}", *common], world_size=1)
        for name, exp in ARMS.items()
    }
    d, m = cfgs["dense"], cfgs["moe"]
    if d.has_moe or not m.has_moe:
        raise ValueError("quality: experiment quality_dense must be dense and quality_moe MoE")
    for what in ("train", "data", "optim"):
        a, b = getattr(d, what), getattr(m, what)
        if what == "train":  # each arm has its own output folder
            a, b = replace(a, out_dir="x"), replace(b, out_dir="x")
        if a != b:
            raise ValueError(
                f"quality: the two arms differ in {what}.*; the comparison needs the same "
                "data, steps and lr schedule (change both experiment files together)"
            )
    return d


class _ArmRunner:
    """Runs the arms as trainer processes, `jobs` at a time, reporting progress."""

    def __init__(self, out: Path, common: list[str], n_steps: int, env: dict, t0: float):
        self.out, self.common, self.n_steps, self.env, self.t0 = out, common, n_steps, env, t0
        self.running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
        self.walls: dict[str, float] = {}

    def run_all(self, jobs: int, progress_every_s: float) -> dict[str, float]:
        pending = list(ARMS.items())
        last_report = time.perf_counter()
        try:
            while pending or self.running:
                while pending and len(self.running) < jobs:
                    self._launch(*pending.pop(0))
                time.sleep(0.5)
                self._reap()
                if self.running and time.perf_counter() - last_report >= progress_every_s:
                    last_report = time.perf_counter()
                    self._report(last_report)
        finally:
            for proc, _, _ in self.running.values():
                proc.kill()
                proc.wait()
        return self.walls

    def _launch(self, name: str, exp: str) -> None:
        arm_dir = self.out / name
        shutil.rmtree(arm_dir, ignore_errors=True)  # resume=never, and one W&B run
        cmd = [
            sys.executable,
            "-m",
            "xpar.train",
            f"experiment={exp}",
            *self.common,
            f"train.out_dir={arm_dir}",
            "train.resume=never",
            "logger.wandb_mode=offline",
            "logger.progress_bar=never",
            f"train.ckpt_every={self.n_steps}",  # one checkpoint, at the end
        ]
        log = self.out / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        self.running[name] = (proc, time.perf_counter(), log)

    def _reap(self) -> None:
        for name, (proc, started, log) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[name]
            self.walls[name] = time.perf_counter() - started
            if proc.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(
                    f"quality: the {name} run failed (exit {proc.returncode}); "
                    f"last lines of {log}:\n{tail}"
                )

    def _report(self, now: float) -> None:
        where = ", ".join(
            f"{n} step {_last_step(self.out / n / 'metrics.jsonl')}/{self.n_steps}"
            for n in self.running
        )
        print(f"quality: {where} ({now - self.t0:.0f}s)", flush=True)


def _compare(
    out: Path, walls: dict[str, float], n_steps: int, tokens_per_step: int, common: list[str]
) -> QualityResult:
    arms = {
        name: ArmResult(
            name=name,
            experiment=exp,
            out_dir=str(out / name),
            val_curve=read_val_curve(out / name),
            wall_s=walls[name],
            model_summary=_model_line(out / f"{name}.log"),
        )
        for name, exp in ARMS.items()
    }
    dense, moe = arms["dense"], arms["moe"]
    target = dense.val_curve[max(dense.val_curve)]
    dense_steps = steps_to_reach(dense.val_curve, target)
    moe_steps = steps_to_reach(moe.val_curve, target)
    ratio = moe_steps / dense_steps if moe_steps is not None and dense_steps else None
    return QualityResult(
        dense=dense,
        moe=moe,
        steps=n_steps,
        tokens_per_step=tokens_per_step,
        target_loss=target,
        dense_steps=dense_steps,
        moe_steps=moe_steps,
        ratio=ratio,
        wall_s=0.0,
        overrides=common,
    )


def report(r: QualityResult) -> str:
    """The printed summary: models, table, steps to the dense final loss, ratio, times."""
    lines = [
        f"dense: {r.dense.model_summary}",
        f"moe:   {r.moe.model_summary}",
        "",
        format_table(r.dense.val_curve, r.moe.val_curve),
        "",
        f"target: dense final validation loss {r.target_loss:.4f} (step {r.steps})",
        f"steps to reach it: dense {_fmt_steps(r.dense_steps)}, moe {_fmt_steps(r.moe_steps)}",
    ]
    if r.ratio is None:
        lines.append(f"ratio moe/dense: - (the MoE did not reach it in {r.steps} steps)")
    else:
        verdict = "met" if r.ratio <= TARGET_RATIO else "NOT met"
        lines.append(f"ratio moe/dense: {r.ratio:.3f} (goal <= {TARGET_RATIO}: {verdict})")
    lines.append(
        f"wall time: dense {r.dense.wall_s:.0f}s, moe {r.moe.wall_s:.0f}s, "
        f"benchmark {r.wall_s:.0f}s"
    )
    if r.plot:
        lines.append(f"plot: {r.plot}")
    return "\n".join(lines)


def _fmt_steps(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun every rank would train both arms into the same folder.
        print(
            f"python -m xpar.bench quality starts its own trainer processes: run it once, "
            f"without torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']} here): "
            "python -m xpar.bench quality [options]",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    r = run_benchmark(
        steps=args.steps, out=args.out, overrides=args.overrides, jobs=args.jobs, plot=args.plot
    )
    print(report(r), flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m xpar.bench quality",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dense vs MoE at equal active parameters: validation loss per step.\n"
        "Trains conf/experiment/quality_dense.yaml and quality_moe.yaml with the real trainer\n"
        "(one process each, a world of one), then prints both curves, the steps each arm needs\n"
        "to reach the dense model's final validation loss, and their ratio (goal: <= 0.7).",
        epilog="Writes OUT/dense/ and OUT/moe/ (the runs), OUT/quality.json and the plot.\n"
        "Run it with plain python, not torchrun, e.g.\n"
        "  python -m xpar.bench quality --steps 100 train.eval_every=25",
    )
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per arm (default: train.steps of the yaml files)")  # fmt: skip
    ap.add_argument("--out", default="outputs/quality",
                    help="output folder; its dense/ and moe/ are replaced (default: %(default)s)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="arms trained at once, each with its share of the CPU threads "
                    "(default: 2)")  # fmt: skip
    ap.add_argument("--plot", default=None,
                    help="PNG path for the curves; needs matplotlib (default: OUT/quality.png)")  # fmt: skip
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                    help="Hydra overrides applied to both arms, e.g. train.eval_every=25")  # fmt: skip
    return ap

"""Rank 0's console: one line per log step, a progress bar on a terminal, one-off messages.

On a terminal (or progress_bar="always") the bar sits on the last line and every message is
printed above it; elsewhere (a log file, Slurm output) only whole lines are written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = [
    "ConsoleSink",
    "config_text",
    "format_config",
    "format_duration",
    "format_summary",
    "format_train_line",
    "format_val_line",
    "format_warnings",
    "progress_bar",
]


def format_duration(seconds: float | None) -> str:
    """3725 -> "1h02m", 185 -> "3m05s", 42.3 -> "42s"; None/inf -> "?"."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _format_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def format_train_line(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
    """One console line from the logged metrics (keys as in W&B), e.g.

    step  10/200 | loss 4.1234 | lr 3.00e-03 | gnorm 0.532 | 12.3k tok/s | mfu 1.23% |
    drop 3.10% | load max/mean 1.42 | eta 3m05s

    (one line; fields with no value are left out: a dense model has no drop/load)."""
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    if metrics.get("train/loss") is not None:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if metrics.get("train/lr") is not None:
        parts.append(f"lr {metrics['train/lr']:.2e}")
    if metrics.get("train/grad_norm") is not None:
        parts.append(f"gnorm {metrics['train/grad_norm']:.3f}")
    if metrics.get("train/tokens_per_s") is not None:
        parts.append(f"{_format_rate(metrics['train/tokens_per_s'])} tok/s")
    if metrics.get("train/mfu") is not None:
        parts.append(f"mfu {100 * metrics['train/mfu']:.2f}%")
    drops = [v for k, v in metrics.items() if k.endswith("/dropped_fraction")]
    if drops:
        parts.append(f"drop {100 * sum(drops) / len(drops):.2f}%")
    loads = [v for k, v in metrics.items() if k.endswith("/max_over_mean_load")]
    if loads:
        parts.append(f"load max/mean {max(loads):.2f}")
    parts.append(f"eta {format_duration(metrics.get('eta_s'))}")
    return " | ".join(parts)


def format_val_line(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
    """`eval  40/200 | val loss 3.2100 | val ppl 24.78`"""
    width = len(str(total_steps))
    line = (
        f"eval {step:>{width}}/{total_steps} | val loss {metrics['val/loss']:.4f} | "
        f"val ppl {_ppl(metrics['val/ppl'])}"
    )
    if "val/accuracy" in metrics:
        line += f" | val acc {metrics['val/accuracy']:.2%}"
    if "val/max_vio" in metrics:
        line += f" | maxvio {metrics['val/max_vio']:.3f}"
    return line


def _ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3e}"  # a diverged run: not 300 digits


def progress_bar(step: int, total_steps: int, eta_s: float | None, width: int = 24) -> str:
    """`[#########---------------]  45/200  22% eta 1m02s`"""
    frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    filled = int(round(frac * width))
    w = len(str(total_steps))
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {step:>{w}}/{total_steps} "
        f"{100 * frac:3.0f}% eta {format_duration(eta_s)}"
    )


def format_summary(
    step: int,
    total_steps: int,
    elapsed_s: float,
    last: Mapping[str, Any],
    checkpoint_dir: str | os.PathLike | None,
    wandb_line: str,
) -> str:
    """Where the run ended: steps, time, last train/val loss, checkpoint, and the W&B line."""
    done = f"done: step {step}/{total_steps} in {format_duration(elapsed_s)}"
    if last.get("train/loss") is not None:
        done += f", train loss {last['train/loss']:.4f}"
    if last.get("val/loss") is not None:
        done += f", val loss {last['val/loss']:.4f}"
    lines = [done]
    if checkpoint_dir is not None:
        lines.append(f"checkpoint: {os.fspath(checkpoint_dir)}")
    lines.append(wandb_line)
    return "\n".join(lines)


def config_text(plain: Any) -> str:
    """The resolved config as YAML (JSON for what OmegaConf will not take)."""
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(plain)
    except Exception:  # something OmegaConf will not take: JSON is fine too
        return json.dumps(plain, indent=2, default=str) + "\n"


def format_config(plain: Any) -> str:
    """The resolved config for the console, under a heading."""
    return "resolved config:\n" + config_text(plain).rstrip("\n")


def format_warnings(lines: list[str], prefix: str) -> str:
    """The run's warnings again, at the end where they do not scroll away."""
    head = (
        f"{len(lines)} warning{'s' if len(lines) != 1 else ''} in this run (repeated from above):"
    )
    return "\n".join([head, *(prefix + line for line in lines)])


class ConsoleSink:
    """Lines and the progress bar on one stream. Build it on rank 0 only.

    progress: "always", "never" or "auto" (a bar when the stream is a terminal).
    eta: (step, now) -> seconds left, for the bar. stream None: sys.stdout at write time.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        progress: str,
        eta: Callable[[int, float], float | None],
        clock: Callable[[], float],
        stream: TextIO | None = None,
    ) -> None:
        self.total_steps = total_steps
        self._eta = eta
        self._clock = clock
        self._stream = stream
        self._printed: set[str] = set()
        self._bar_shown = False
        self._bar_last_draw = 0.0
        self._bar_step = 0
        self.use_bar = progress == "always" or (progress == "auto" and self._isatty())

    def _isatty(self) -> bool:
        stream = self._stream or sys.stdout
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(text)
        stream.flush()

    def tick(self, step: int) -> None:
        """Redraw the progress bar (at most 5x a second); nothing in plain-line mode."""
        if not self.use_bar:
            return
        now = self._clock()
        if now - self._bar_last_draw < 0.2 and step != self.total_steps:
            return
        self._draw_bar(step, now)

    def _draw_bar(self, step: int, now: float) -> None:
        self._bar_last_draw = now
        self._bar_step = step
        bar = progress_bar(step, self.total_steps, self._eta(step, now))
        self._write("\r" + bar + "\x1b[K")
        self._bar_shown = True

    def line(self, text: str, step: int | None = None, now: float | None = None) -> None:
        """One whole line; with a bar, above it (redrawn at `step`, or where it was)."""
        if not self.use_bar:
            self._write(text + "\n")
            return
        now = self._clock() if now is None else now
        # clear the bar, print the line above it, redraw the bar underneath
        self._write("\r\x1b[K" + text + "\n")
        if step is not None:
            self._draw_bar(step, now)
        elif self._bar_shown:
            self._draw_bar(self._bar_step, now)

    def print_once(self, tag: str, msg: str) -> None:
        """Print msg the first time `tag` is seen, never again."""
        if tag not in self._printed:
            self._printed.add(tag)
            self.line(msg)

    def close(self) -> None:
        """End the bar's line, so what follows starts on a fresh one."""
        if self._bar_shown:
            self._write("\n")
            self._bar_shown = False

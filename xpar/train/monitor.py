"""The training monitor: one object the trainer talks to, feeding the sinks on rank 0.

Every rank builds a `Monitor`; only rank 0 opens sinks (console, W&B, metrics.jsonl in
xpar.train.sinks), prints, imports wandb or writes files. The trainer reduces metrics across
ranks first and then calls `log_train` / `log_val` on all ranks at the same steps
(`should_log`), so the collectives stay in step. The config is made plain and redacted
(xpar.redact) before W&B, its file or the console sees it.

The console carries xpar's lines only: the config goes to `<run_dir>/config.yaml` (printed
with train.print_config=true) and W&B says nothing of its own (unless train.verbose=true).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from xpar.config.schema import LoggerConfig
from xpar.redact import redact, to_plain
from xpar.train.mfu import mfu
from xpar.train.mfu import peak_flops as detect_peak_flops
from xpar.train.moe_metrics import layer_loads, moe_step_metrics, to_float
from xpar.train.sinks.console import (
    ConsoleSink,
    config_text,
    format_config,
    format_summary,
    format_train_line,
    format_val_line,
    format_warnings,
)
from xpar.train.sinks.jsonl import METRICS_FILE, MetricsFileSink
from xpar.train.sinks.load_map import LoadMapSink
from xpar.train.sinks.wandb import WandbSink

__all__ = ["CONFIG_FILE", "Monitor"]

CONFIG_FILE = "config.yaml"  # the resolved, redacted config, in run_dir


# A dataclass: its fields are the run's settings, keyword-only after cfg.
@dataclasses.dataclass(eq=False, repr=False)
class Monitor:
    """Console + W&B + metrics.jsonl for one training run. Build it on every rank.

    Args:
        cfg: the logger config; None -> LoggerConfig() defaults.
        rank: global rank; only rank 0 prints and logs, the others do nothing.
        total_steps: the step the run ends at (for ETA and "step/total").
        run_dir: where W&B and metrics.jsonl go (`<run_dir>/wandb/...`); made by rank 0 only.
        config: the resolved config (plain dict, dataclass or OmegaConf node); redacted
            before W&B or the console sees it.
        run_id: a W&B run id to resume (from the checkpoint); None -> a new id.
        world_size: ranks in the job (tokens/s per device = global / world_size).
        flops_per_token: training FLOPs per token (fwd+bwd, active params); 0 -> no MFU.
        peak_flops: peak FLOP/s per device; None -> `xpar.train.mfu.peak_flops(device)`.
        device: the training device, for the peak.
        verbose: let W&B print its own lines; None -> the config's train.verbose.
        show_config: print_config() prints the config, not only its file; None -> the
            config's train.print_config.
        stream: where console output goes (default: sys.stdout at write time).
        clock: seconds, for tokens/s and ETA (tests pass their own).

    Trainer use:
        mon = Monitor(cfg.logger, rank=rank, total_steps=N, run_dir=out, config=plain,
                      run_id=ckpt_run_id, world_size=ws, flops_per_token=fpt)
        mon.print_config(plain)
        mon.start(step=start_step, tokens_seen=tokens)          # right before the loop
        for step in range(start_step + 1, N + 1):
            ...
            mon.tick(step)                                     # progress bar only
            if mon.should_log(step):                           # same answer on all ranks
                mon.log_train(step, loss=..., lr=..., grad_norm=..., tokens_seen=...,
                              moe_layers=[aux_0, aux_1, ...])  # rank-reduced values
            mon.write_metrics(row)                             # a metrics.jsonl line
        checkpoint meta["wandb_run_id"] = mon.run_id
        mon.print_summary(checkpoint_dir=...); mon.finish()
    """

    cfg: LoggerConfig | None = None
    _: dataclasses.KW_ONLY
    total_steps: int
    run_dir: str | os.PathLike
    rank: int = 0
    config: Any = None
    run_id: str | None = None
    world_size: int = 1
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    device: Any = None
    verbose: bool | None = None
    show_config: bool | None = None
    stream: TextIO | None = None
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self.cfg = self.cfg if self.cfg is not None else LoggerConfig()
        self.rank = int(self.rank)
        self.is_main = self.rank == 0
        self.total_steps = int(self.total_steps)
        self.run_dir = Path(self.run_dir)
        self.world_size = max(1, int(self.world_size))
        self.flops_per_token = float(self.flops_per_token)
        self.config = redact(to_plain(self.config)) if self.config is not None else {}
        if self.verbose is None:
            self.verbose = bool(self._train_flag("verbose"))
        if self.show_config is None:
            self.show_config = bool(self._train_flag("print_config"))
        self.wandb_dir: Path | None = None  # the offline run's folder once W&B is up
        self.wandb_url: str | None = None
        self._console: ConsoleSink | None = None
        self._wandb: WandbSink | None = None
        self._metrics: MetricsFileSink | None = None
        self._loads: LoadMapSink | None = None
        self.load_png: Path | None = None  # the expert-load heatmap, once finish() drew it
        self._finished = False
        self._last: dict[str, Any] = {}
        self.start(0, 0)
        if self.is_main:
            self._open_sinks()
            self.start(0, 0)  # W&B start-up is not training time

    def _open_sinks(self) -> None:
        if self.flops_per_token > 0 and self.peak_flops is None:
            self.peak_flops = detect_peak_flops(self.device)
        self._console = ConsoleSink(
            self.total_steps,
            progress=self.cfg.progress_bar,
            eta=self._eta,
            clock=self.clock,
            stream=self.stream,
        )
        self._metrics = MetricsFileSink(self.run_dir)
        self._loads = LoadMapSink(self.run_dir)
        if self.cfg.wandb_mode != "disabled":
            self._wandb = WandbSink(
                self.cfg,
                run_dir=self.run_dir,
                config=self.config,
                run_id=self.run_id,
                quiet=not self.verbose,
            )
            self.run_id = self._wandb.run_id
            self.wandb_dir, self.wandb_url = self._wandb.dir, self._wandb.url

    def _train_flag(self, name: str) -> Any:
        train = self.config.get("train") if isinstance(self.config, Mapping) else None
        return train.get(name) if isinstance(train, Mapping) else None

    @property
    def use_bar(self) -> bool:
        """Whether rank 0 draws a progress bar (a terminal, or progress_bar="always")."""
        return self._console is not None and self._console.use_bar

    @property
    def metrics_path(self) -> Path:
        """`<run_dir>/metrics.jsonl` (written by rank 0 only)."""
        return self.run_dir / METRICS_FILE

    # -- steps -------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        """True on log steps (every log_every, and the last step); the same on every rank."""
        return step % int(self.cfg.log_every) == 0 or step == self.total_steps

    def should_hist(self, step: int) -> bool:
        """True on the log step that first reaches or passes a multiple of hist_every."""
        every = int(self.cfg.hist_every)
        if every <= 0 or not self.should_log(step):
            return False
        log_every = int(self.cfg.log_every)
        prev_log = ((step - 1) // log_every) * log_every
        return step // every > prev_log // every

    def start(self, step: int = 0, tokens_seen: int = 0) -> None:
        """Anchor for tokens/s and ETA: call right before the loop (after resume/setup)."""
        now = self.clock()
        self._t_start = self._t_last = now
        self._step_start = self._step_last = int(step)
        self._tokens_last = int(tokens_seen)

    def _eta(self, step: int, now: float) -> float | None:
        done = step - self._step_start
        if done <= 0:
            return None
        return (now - self._t_start) / done * max(self.total_steps - step, 0)

    def tick(self, step: int) -> None:
        """Redraw the progress bar (at most 5x a second); nothing in plain-line mode."""
        if self._console is not None:
            self._console.tick(step)

    # -- logging -----------------------------------------------------------------------

    def log_train(
        self,
        step: int,
        *,
        loss: Any,
        lr: float | None = None,
        grad_norm: Any = None,
        tokens_seen: int | None = None,
        aux_loss: Any = None,
        z_loss: Any = None,
        moe_layers: Any = None,
    ) -> dict[str, Any]:
        """Log one training step (call on every rank at `should_log` steps).

        loss, grad_norm, aux_loss, z_loss: rank-reduced scalars (tensor or float).
        tokens_seen: global tokens processed so far (all ranks); tokens/s is measured
            between calls.
        aux_loss / z_loss: unweighted load-balance / router z-loss; if None they are the
            mean of the layers' `lb_loss` / `z_loss` where the layers carry them.
        moe_layers: a list (or {index: stats}) of MoEAux-like objects / dicts with
            tokens_per_expert, dropped_fraction, router_entropy.
        Returns the metrics dict logged to W&B (plus "eta_s"); {} on ranks other than 0.
        """
        if not self.is_main:
            return {}
        now = self.clock()
        m: dict[str, Any] = {"train/loss": to_float(loss)}
        if lr is not None:
            m["train/lr"] = float(lr)
        if grad_norm is not None:
            m["train/grad_norm"] = to_float(grad_norm)
        m.update(self._throughput(tokens_seen, now))
        moe, hists = moe_step_metrics(
            moe_layers, aux_loss=aux_loss, z_loss=z_loss, with_hist=self.should_hist(step)
        )
        m.update(moe)
        self._loads.record(step, layer_loads(moe_layers))
        if self._wandb is not None:
            self._wandb.log(m, step, hists)
        eta = self._eta(step, now)
        self._t_last, self._step_last = now, int(step)
        if tokens_seen is not None:
            self._tokens_last = int(tokens_seen)
        self._last.update(m)
        self._last["step"] = int(step)
        line = format_train_line(step, self.total_steps, {**m, "eta_s": eta})
        self._console.line(line, step, now)
        return {**m, "eta_s": eta}

    def _throughput(self, tokens_seen: int | None, now: float) -> dict[str, float]:
        # global tokens/s since the last log step, and MFU per device
        if tokens_seen is None or now <= self._t_last:
            return {}
        tokens_per_s = (int(tokens_seen) - self._tokens_last) / (now - self._t_last)
        out = {"train/tokens_per_s": float(tokens_per_s)}
        if self.flops_per_token > 0 and self.peak_flops:
            out["train/mfu"] = mfu(
                self.flops_per_token, tokens_per_s / self.world_size, self.peak_flops
            )
        return out

    def log_val(self, step: int, loss: Any, extra: Mapping[str, Any] | None = None) -> dict:
        """Log validation loss and perplexity (exp(loss)) at `step`; rank 0 only."""
        if not self.is_main:
            return {}
        value = to_float(loss)
        m = {"val/loss": value, "val/ppl": math.exp(min(value, 700.0))}
        if extra:
            m.update({k: to_float(v) for k, v in extra.items()})
        if self._wandb is not None:
            self._wandb.log(m, step)
        self._last.update(m)
        self._console.line(format_val_line(step, self.total_steps, m), step)
        return m

    def write_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one step's row to metrics.jsonl (rank 0; other ranks write nothing)."""
        if self._metrics is not None:
            self._metrics.write(row)

    # -- console -----------------------------------------------------------------------

    def print(self, msg: str) -> None:
        """Print a message on rank 0 (above the progress bar); nothing on other ranks."""
        if self.is_main:
            self._console.line(str(msg))

    def print_once(self, tag: str, msg: str) -> None:
        """Print msg on rank 0 the first time `tag` is seen, never again."""
        if self.is_main:
            self._console.print_once(tag, str(msg))

    @property
    def config_path(self) -> Path:
        """`<run_dir>/config.yaml` (written by rank 0 only, by print_config)."""
        return self.run_dir / CONFIG_FILE

    def print_config(self, config: Any = None) -> None:
        """Write the resolved config (redacted) to config.yaml once and say where; print it
        too when show_config."""
        if not self.is_main:
            return
        plain = self.config if config is None else redact(to_plain(config))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text(plain))
        if self.show_config:
            self.print_once("config", format_config(plain))
        else:
            self.print_once(
                "config", f"config: {self.config_path} (train.print_config=true prints it)"
            )

    def print_warnings(self, lines: list[str], prefix: str = "") -> None:
        """Repeat the run's warnings (one line each) at the end; nothing when there are none."""
        if self.is_main and lines:
            self.print_once("warnings", format_warnings(list(lines), prefix))

    def print_summary(self, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Print once where the run ended: steps, time, last losses, checkpoint, W&B run."""
        if not self.is_main:
            return
        step = self._last.get("step", self._step_last)
        wandb_line = self._wandb.describe() if self._wandb is not None else "wandb: disabled"
        elapsed = self.clock() - self._t_start
        text = format_summary(
            step, self.total_steps, elapsed, self._last, checkpoint_dir, wandb_line
        )
        self.print_once("summary", text)

    # -- end -----------------------------------------------------------------------------

    def finish(self, exit_code: int = 0) -> Path | None:
        """Close the W&B run (idempotent); return its folder on disk (None: no W&B here)."""
        if self._finished or not self.is_main:
            self._finished = True
            return self.wandb_dir
        self._finished = True
        self.load_png = self._draw_loads()
        self._console.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
        return self.wandb_dir

    def _draw_loads(self) -> Path | None:
        # A picture that cannot be drawn costs the run nothing: say so and go on.
        try:
            png = self._loads.render()
        except Exception as e:  # noqa: BLE001 - matplotlib's errors are many and all alike here
            self._console.line(f"expert load: no picture ({type(e).__name__}: {e})")
            return None
        if png is None:
            return None
        self._console.line(f"expert load: {png}")
        if self._wandb is not None:
            self._wandb.log_image("moe/expert_load", png, self._last.get("step", self._step_last))
        return png

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

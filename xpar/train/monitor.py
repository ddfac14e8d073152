"""Training monitor: console lines, a progress bar, W&B logging, MFU, and an offline-run reader.

Every rank builds a `Monitor`; only rank 0 prints, imports wandb or writes files. The
trainer reduces metrics across ranks first and then calls `log_train` / `log_val` on all
ranks at the same steps (`should_log`), so the collectives stay in step.

W&B is offline by default (no account, nothing leaves the machine): the run is written
under `<run_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb` and can be uploaded later
with `wandb sync`. The run id is exposed as `Monitor.run_id`; the trainer stores it in the
checkpoint and passes it back on resume (`resume="allow"`), so one W&B run spans restarts.
The config is converted to a plain dict and scrubbed of secrets before W&B or the console
sees it.

`read_offline_run` reads a `.wandb` file back (leveldb-log framing + wandb's own protobuf
`Record` messages); tests use it to check what was really written to disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
import sys
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from xpar.errors import XparConfigError
from xpar.redact import REDACTED, is_secret_key

__all__ = [
    "MonitorConfig",
    "Monitor",
    "PEAK_FLOPS_BF16",
    "format_duration",
    "format_train_line",
    "measure_matmul_flops",
    "mfu",
    "moe_layer_metrics",
    "peak_flops",
    "progress_bar",
    "read_offline_run",
    "scrub_secrets",
    "to_plain",
]

_WANDB_MODES = ("offline", "online", "disabled")
_BAR_MODES = ("auto", "always", "never")


@dataclasses.dataclass
class MonitorConfig:
    """The logger fields the monitor reads; any object with these attributes works
    (xpar.config.schema.LoggerConfig is one)."""

    wandb_mode: str = "offline"
    project: str = "xpar"
    entity: str = ""
    run_name: str = ""
    log_every: int = 10
    hist_every: int = 50
    progress_bar: str = "auto"


def _check_logger_cfg(cfg: Any) -> None:
    # LoggerConfig validates itself too; a duck-typed object may not, so check what we use.
    if cfg.wandb_mode not in _WANDB_MODES:
        raise XparConfigError(
            f"logger.wandb_mode={cfg.wandb_mode!r} is invalid: use one of {', '.join(_WANDB_MODES)}"
        )
    if cfg.progress_bar not in _BAR_MODES:
        raise XparConfigError(
            f"logger.progress_bar={cfg.progress_bar!r} is invalid: use one of "
            f"{', '.join(_BAR_MODES)}"
        )
    if int(cfg.log_every) < 1:
        raise XparConfigError(f"logger.log_every={cfg.log_every} is invalid: use a step count >= 1")
    if int(cfg.hist_every) < 0:
        raise XparConfigError(
            f"logger.hist_every={cfg.hist_every} is invalid: use a step count >= 1, or 0 for "
            "no expert-load histograms"
        )


# --------------------------------------------------------------------------------------
# Config: plain dict, secrets removed
# --------------------------------------------------------------------------------------

_SECRET_VALUE_RES = [
    # W&B API keys: 40 hex chars, optionally prefixed by a host label ("local-<40 hex>").
    # A 40-hex git sha in the config is redacted too: a small price for never leaking a key.
    re.compile(r"(?<![0-9A-Za-z])(?:[A-Za-z0-9_]+-)?[0-9a-fA-F]{40}(?![0-9A-Za-z])"),
    re.compile(r"(?<![0-9A-Za-z])hf_[A-Za-z0-9]{30,}"),  # Hugging Face tokens
]


def scrub_secrets(obj: Any) -> Any:
    """Copy of a plain config with secrets replaced by "<redacted>".

    A value goes when its key names a secret (a word key/token/secret/password/...) or
    when it looks like one (a W&B API key: 40 hex chars; a Hugging Face token)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v not in (None, "", {}, []):
                out[k] = REDACTED
            else:
                out[k] = scrub_secrets(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v) for v in obj)
    if isinstance(obj, str):
        for pattern in _SECRET_VALUE_RES:
            obj = pattern.sub(REDACTED, obj)
        return obj
    return obj


def to_plain(config: Any) -> Any:
    """Dataclass / OmegaConf node / mapping -> plain dicts, lists and scalars (None stays None)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {str(k): to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    return str(config)


# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 tensor-core peaks per device from the vendor datasheets.
# Matched as case-insensitive substrings of the device name, first hit wins, so the more
# specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 tensor cores; V100 has no bf16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]

PEAK_FLOPS_ENV = "XPAR_PEAK_FLOPS"


def _table_peak(name: str) -> float | None:
    low = name.lower()
    for pattern, flops in PEAK_FLOPS_BF16:
        if pattern.lower() in low:
            return flops
    return None


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(device: str = "cpu", n: int = 0, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of one n x n matmul (fp32 on CPU, bf16 on GPU).

    Cached per process: measured once, at startup. n=0 picks 1024 on CPU, 8192 on GPU."""
    import torch

    dev = torch.device(device)
    on_cpu = dev.type == "cpu"
    n = n or (1024 if on_cpu else 8192)
    dtype = torch.float32 if on_cpu else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dev, dtype)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dev, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)  # warm-up: allocator, kernel selection
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def peak_flops(device: Any = None) -> float:
    """Peak FLOP/s of one device, the denominator of MFU.

    In order: the env override XPAR_PEAK_FLOPS (e.g. "989e12"); for a GPU whose name is
    in PEAK_FLOPS_BF16, its dense bf16 datasheet peak; otherwise a measurement: the best
    rate of a large matmul on that device, taken once at startup (fp32 1024^3 on CPU,
    bf16 8192^3 on GPU). So CPU MFU reads as "fraction of what this CPU reaches on a big
    fp32 GEMM", not of a theoretical peak.

    device: None (the current CUDA device if there is one, else CPU), "cpu", "cuda",
    "cuda:1" or a torch.device."""
    env = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise XparConfigError(
                f"{PEAK_FLOPS_ENV}={env!r} is invalid: give peak FLOP/s per device as a "
                "positive number, e.g. 989e12"
            )
        return value
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        known = _table_peak(torch.cuda.get_device_name(dev))
        if known is not None:
            return known
    return measure_matmul_flops(str(dev))


_detect_peak_flops = peak_flops  # Monitor's `peak_flops` argument shadows the name


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over peak, per device.

    flops_per_token counts forward + backward (about 3x the forward FLOPs) for the *active*
    parameters only (top-k experts, not all of them)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return flops_per_token * tokens_per_s_per_device / peak_flops


# --------------------------------------------------------------------------------------
# MoE layer statistics
# --------------------------------------------------------------------------------------


def _get(stats: Any, name: str) -> Any:
    if isinstance(stats, Mapping):
        return stats.get(name)
    return getattr(stats, name, None)


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu()
    if hasattr(x, "item"):
        x = x.item()
    return float(x)


def _to_list(x: Any) -> list[float]:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu()
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [float(v) for v in x]


def moe_layer_metrics(stats: Any) -> dict[str, Any]:
    """Per-layer numbers from an MoEAux-like object or dict.

    Reads `tokens_per_expert` ([E] counts before dropping), `dropped_fraction` and
    `router_entropy` where present (tensors, numpy or floats). Returns dropped_fraction,
    max_load and mean_load (tokens per expert), max_over_mean_load (1.0 = perfect balance),
    router_entropy, and tokens_per_expert as a list."""
    out: dict[str, Any] = {}
    for name in ("dropped_fraction", "router_entropy", "lb_loss", "z_loss"):
        value = _to_float(_get(stats, name))
        if value is not None:
            out[name] = value
    counts = _get(stats, "tokens_per_expert")
    if counts is not None:
        counts = _to_list(counts)
        if counts:
            max_load = max(counts)
            mean_load = sum(counts) / len(counts)
            out["max_load"] = max_load
            out["mean_load"] = mean_load
            out["max_over_mean_load"] = max_load / mean_load if mean_load > 0 else 0.0
            out["tokens_per_expert"] = counts
    return out


def _layer_items(moe_layers: Any) -> list[tuple[int, Any]]:
    if moe_layers is None:
        return []
    if isinstance(moe_layers, Mapping):
        return sorted((int(i), s) for i, s in moe_layers.items())
    return list(enumerate(moe_layers))


# --------------------------------------------------------------------------------------
# Console formatting
# --------------------------------------------------------------------------------------


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


def progress_bar(step: int, total_steps: int, eta_s: float | None, width: int = 24) -> str:
    """`[#########---------------]  45/200  22% eta 1m02s`"""
    frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    filled = int(round(frac * width))
    w = len(str(total_steps))
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {step:>{w}}/{total_steps} "
        f"{100 * frac:3.0f}% eta {format_duration(eta_s)}"
    )


# --------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------


class Monitor:
    """Console + W&B logging for one training run. Build it on every rank.

    Args:
        cfg: LoggerConfig-like (wandb_mode, project, entity, run_name, log_every,
            hist_every, progress_bar); None -> MonitorConfig() defaults.
        rank: global rank; only rank 0 prints and logs, the others do nothing.
        total_steps: the step the run ends at (for ETA and "step/total").
        run_dir: where W&B writes (`<run_dir>/wandb/...`); created by rank 0 only.
        config: the resolved config (plain dict, dataclass or OmegaConf node); scrubbed of
            secrets before W&B or the console sees it.
        run_id: a W&B run id to resume (from the checkpoint); None -> a new id.
        world_size: ranks in the job (tokens/s per device = global / world_size).
        flops_per_token: training FLOPs per token (fwd+bwd, active params); 0 -> no MFU.
        peak_flops: peak FLOP/s per device; None -> `peak_flops(device)`, found once here.
        device: the training device, for `peak_flops`.
        stream: where console output goes (default: sys.stdout at write time).

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
        checkpoint meta["wandb_run_id"] = mon.run_id
        mon.print_summary(checkpoint_dir=...); mon.finish()
    """

    def __init__(
        self,
        cfg: Any = None,
        *,
        rank: int = 0,
        total_steps: int,
        run_dir: str | os.PathLike,
        config: Any = None,
        run_id: str | None = None,
        world_size: int = 1,
        flops_per_token: float = 0.0,
        peak_flops: float | None = None,
        device: Any = None,
        stream: TextIO | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else MonitorConfig()
        _check_logger_cfg(self.cfg)
        self.rank = int(rank)
        self.is_main = self.rank == 0
        self.total_steps = int(total_steps)
        self.run_dir = Path(run_dir)
        self.world_size = max(1, int(world_size))
        self.flops_per_token = float(flops_per_token)
        self.run_id = run_id
        self.wandb_dir: Path | None = None  # the offline run's folder once W&B is up
        self.wandb_url: str | None = None
        self.config = scrub_secrets(to_plain(config)) if config is not None else {}
        self._stream = stream
        self._run: Any = None
        self._finished = False
        self._printed: set[str] = set()
        self._bar_shown = False
        self._bar_last_draw = 0.0
        self._bar_step = 0
        self._last: dict[str, Any] = {}
        self.peak_flops = peak_flops
        self.use_bar = False
        self.start(0, 0)
        if not self.is_main:
            return
        if self.flops_per_token > 0 and self.peak_flops is None:
            self.peak_flops = _detect_peak_flops(device)
        self.use_bar = self.cfg.progress_bar == "always" or (
            self.cfg.progress_bar == "auto" and self._isatty()
        )
        if self.cfg.wandb_mode != "disabled":
            self._init_wandb(self.cfg.wandb_mode)
        self.start(0, 0)  # W&B start-up is not training time

    # -- W&B ---------------------------------------------------------------------------

    def _init_wandb(self, mode: str) -> None:
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=self.cfg.project or None,
            entity=self.cfg.entity or None,
            name=self.cfg.run_name or None,
            id=self.run_id,  # None: wandb makes one; we read it back below
            resume="allow",
            dir=str(self.run_dir),
            config=self.config,
            reinit="create_new",  # our own handle, no global run to clobber
        )
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # no network / no key: keep training, log offline
            if mode != "online":
                raise
            warnings.warn(
                f"logger.wandb_mode='online' failed ({type(exc).__name__}: {exc}); "
                "logging offline instead (upload later with `wandb sync`)",
                stacklevel=2,
            )
            self._run = wandb.init(mode="offline", **kwargs)
        self.run_id = self._run.id
        self.wandb_dir = Path(self._run.settings.sync_dir)
        if mode == "online":
            self.wandb_url = getattr(self._run, "url", None)

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
        now = time.perf_counter()
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
        if not self.is_main or not self.use_bar:
            return
        now = time.perf_counter()
        if now - self._bar_last_draw < 0.2 and step != self.total_steps:
            return
        self._draw_bar(step, now)

    def _draw_bar(self, step: int, now: float) -> None:
        self._bar_last_draw = now
        self._bar_step = step
        bar = progress_bar(step, self.total_steps, self._eta(step, now))
        self._write("\r" + bar + "\x1b[K")
        self._bar_shown = True

    # -- logging -----------------------------------------------------------------------

    def log_train(
        self,
        step: int,
        *,
        loss: Any,
        lr: float | None = None,
        grad_norm: Any = None,
        tokens_seen: int | None = None,
        tokens_per_s: float | None = None,
        aux_loss: Any = None,
        z_loss: Any = None,
        moe_layers: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log one training step (call on every rank at `should_log` steps).

        loss, grad_norm, aux_loss, z_loss: rank-reduced scalars (tensor or float).
        tokens_seen: global tokens processed so far (all ranks); tokens/s is measured
            between calls. Or pass tokens_per_s (global) directly.
        aux_loss / z_loss: unweighted load-balance / router z-loss; if None they are the
            mean of the layers' `lb_loss` / `z_loss` where the layers carry them.
        moe_layers: a list (or {index: stats}) of MoEAux-like objects / dicts with
            tokens_per_expert, dropped_fraction, router_entropy.
        extra: more metrics logged as given (full W&B key names).
        Returns the metrics dict logged to W&B (plus "eta_s"); {} on ranks other than 0.
        """
        if not self.is_main:
            return {}
        now = time.perf_counter()
        m: dict[str, Any] = {"train/loss": _to_float(loss)}
        if lr is not None:
            m["train/lr"] = float(lr)
        if grad_norm is not None:
            m["train/grad_norm"] = _to_float(grad_norm)
        if tokens_per_s is None and tokens_seen is not None and now > self._t_last:
            tokens_per_s = (int(tokens_seen) - self._tokens_last) / (now - self._t_last)
        if tokens_per_s is not None:
            m["train/tokens_per_s"] = float(tokens_per_s)
            if self.flops_per_token > 0 and self.peak_flops:
                m["train/mfu"] = mfu(
                    self.flops_per_token, tokens_per_s / self.world_size, self.peak_flops
                )
        layers = [(i, moe_layer_metrics(s)) for i, s in _layer_items(moe_layers)]
        if aux_loss is None:
            aux_loss = _mean([lm.get("lb_loss") for _, lm in layers])
        if z_loss is None:
            z_loss = _mean([lm.get("z_loss") for _, lm in layers])
        if aux_loss is not None:
            m["moe/aux_loss"] = _to_float(aux_loss)
        if z_loss is not None:
            m["moe/z_loss"] = _to_float(z_loss)
        hist = self.should_hist(step)
        hists: dict[str, list[float]] = {}
        for i, lm in layers:
            for name in (
                "dropped_fraction",
                "max_load",
                "mean_load",
                "max_over_mean_load",
                "router_entropy",
            ):
                if name in lm:
                    m[f"moe/layer_{i}/{name}"] = lm[name]
            if hist and "tokens_per_expert" in lm:
                hists[f"moe/layer_{i}/tokens_per_expert"] = lm["tokens_per_expert"]
        if extra:
            m.update({k: _to_float(v) for k, v in extra.items()})
        if self._run is not None:
            payload = dict(m)
            payload.update({k: self._histogram(v) for k, v in hists.items()})
            self._run.log(payload, step=int(step))
        eta = self._eta(step, now)
        self._t_last, self._step_last = now, int(step)
        if tokens_seen is not None:
            self._tokens_last = int(tokens_seen)
        self._last.update(m)
        self._last["step"] = int(step)
        self._emit_line(format_train_line(step, self.total_steps, {**m, "eta_s": eta}), step, now)
        return {**m, "eta_s": eta}

    @staticmethod
    def _histogram(counts: list[float]) -> Any:
        import numpy as np
        import wandb

        counts_e = np.asarray(counts, dtype=np.float64)
        if len(counts_e) <= 512:  # W&B's bin limit: one bin per expert, height = tokens
            return wandb.Histogram(np_histogram=(counts_e, np.arange(len(counts_e) + 1)))
        return wandb.Histogram(np_histogram=np.histogram(counts_e, bins=64))

    def log_val(self, step: int, loss: Any, extra: Mapping[str, Any] | None = None) -> dict:
        """Log validation loss and perplexity (exp(loss)) at `step`; rank 0 only."""
        if not self.is_main:
            return {}
        value = _to_float(loss)
        m = {"val/loss": value, "val/ppl": math.exp(min(value, 700.0))}
        if extra:
            m.update({k: _to_float(v) for k, v in extra.items()})
        if self._run is not None:
            self._run.log(dict(m), step=int(step))
        self._last.update(m)
        width = len(str(self.total_steps))
        line = (
            f"eval {step:>{width}}/{self.total_steps} | val loss {m['val/loss']:.4f} | "
            f"val ppl {m['val/ppl']:.2f}"
        )
        self._emit_line(line, step, time.perf_counter())
        return m

    # -- console -----------------------------------------------------------------------

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

    def _emit_line(self, line: str, step: int | None, now: float) -> None:
        if self.use_bar:
            # clear the bar, print the line above it, redraw the bar underneath
            self._write("\r\x1b[K" + line + "\n")
            if step is not None:
                self._draw_bar(step, now)
            elif self._bar_shown:
                self._draw_bar(self._bar_step, now)
        else:
            self._write(line + "\n")

    def print(self, msg: str) -> None:
        """Print a message on rank 0 (above the progress bar); nothing on other ranks."""
        if self.is_main:
            self._emit_line(str(msg), None, time.perf_counter())

    def print_once(self, tag: str, msg: str) -> None:
        """Print msg on rank 0 the first time `tag` is seen, never again."""
        if self.is_main and tag not in self._printed:
            self._printed.add(tag)
            self.print(msg)

    def print_config(self, config: Any = None) -> None:
        """Print the resolved config (secrets scrubbed) once, as YAML."""
        if not self.is_main:
            return
        plain = self.config if config is None else scrub_secrets(to_plain(config))
        try:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(plain)
        except Exception:  # something OmegaConf will not take: JSON is fine too
            text = json.dumps(plain, indent=2, default=str) + "\n"
        self.print_once("config", "resolved config:\n" + text.rstrip("\n"))

    def print_summary(self, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Print once where the run ended: steps, time, last losses, checkpoint, W&B run."""
        if not self.is_main:
            return
        lines = []
        step = self._last.get("step", self._step_last)
        elapsed = time.perf_counter() - self._t_start
        done = f"done: step {step}/{self.total_steps} in {format_duration(elapsed)}"
        if self._last.get("train/loss") is not None:
            done += f", train loss {self._last['train/loss']:.4f}"
        if self._last.get("val/loss") is not None:
            done += f", val loss {self._last['val/loss']:.4f}"
        lines.append(done)
        if checkpoint_dir is not None:
            lines.append(f"checkpoint: {os.fspath(checkpoint_dir)}")
        if self.wandb_url:
            lines.append(f"wandb run: {self.wandb_url} (files in {self.wandb_dir})")
        elif self.wandb_dir is not None:
            lines.append(
                f"wandb run: {self.wandb_dir} (offline, id {self.run_id}; upload with "
                f"`wandb sync {self.wandb_dir}`)"
            )
        else:
            lines.append("wandb: disabled")
        self.print_once("summary", "\n".join(lines))

    # -- end -----------------------------------------------------------------------------

    def finish(self, exit_code: int = 0) -> Path | None:
        """Close the W&B run (idempotent); return its folder on disk (None: no W&B here)."""
        if self._finished or not self.is_main:
            self._finished = True
            return self.wandb_dir
        self._finished = True
        if self._bar_shown:
            self._write("\n")
            self._bar_shown = False
        if self._run is not None:
            sync_file = Path(self._run.settings.sync_file)
            self._run.finish(exit_code=exit_code)
            self._run = None
            # wandb-core writes the .wandb file after finish() returns; wait for the
            # closing record so a reader (or a copy of run_dir) sees the whole run.
            if not _wait_for_exit_record(sync_file, timeout_s=60.0):
                warnings.warn(f"W&B run file {sync_file} still incomplete after 60s", stacklevel=2)
        return self.wandb_dir

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------
# Offline run reader
# --------------------------------------------------------------------------------------
# A .wandb file is a leveldb log: a 7-byte header (":W&B", uint16 magic 0xBEE1, uint8
# version 0), then 32 KiB blocks of chunks, each chunk = crc32 (zlib, seeded with the
# crc of the type byte), uint16 length, uint8 type (1 full, 2 first, 3 middle, 4 last),
# payload. A block tail shorter than a chunk header is zero padding. Payloads join into
# serialized wandb.proto Record messages.

_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_payloads(data: bytes, path: Path):
    if len(data) < 7 or data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B offline run file (bad header)")
    magic, version = struct.unpack("<HB", data[4:7])
    if magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: unknown W&B file magic {magic:#x} / version {version}")
    off, parts = 7, []
    while off + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - off % _BLOCK
        if left_in_block < _CHUNK_HEADER:
            off += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[off : off + _CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at a block's end
            off += left_in_block
            continue
        payload = data[off + _CHUNK_HEADER : off + _CHUNK_HEADER + length]
        if len(payload) < length:
            break  # a write cut short (crash): keep what was complete
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {off}")
        off += _CHUNK_HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        elif kind == _LAST:
            parts.append(payload)
            yield b"".join(parts)
            parts = []
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {off}")


def _set_nested(target: dict, item: Any, value: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        target = target.setdefault(k, {})
    target[path[-1]] = value


def _del_nested(target: dict, item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        target = target.get(k, {})
    target.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _read_one(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"run_id": None, "config": {}, "history": [], "summary": {}}
    start = 0.0
    for payload in _iter_payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["run_id"] = rec.run.run_id
            start = rec.run.start_time.seconds + rec.run.start_time.nanos * 1e-9
            for item in rec.run.config.update:
                _set_nested(run["config"], item, json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(run["config"], item, json.loads(item.value_json))
            for item in rec.config.remove:
                _del_nested(run["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set_nested(row, item, _history_value(item))
            run["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(run["summary"], item, json.loads(item.value_json))
            for item in rec.summary.remove:
                _del_nested(run["summary"], item)
    run["config"].pop("_wandb", None)
    run["start_time"] = start
    return run


def _has_exit_record(path: Path) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _iter_payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def _wait_for_exit_record(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    last_size = -1
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        # parse only once the size has settled: the file can be large after a long run
        if size == last_size and size > 7 and _has_exit_record(path):
            return True
        last_size = size
        time.sleep(0.05)
    return False


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read an offline W&B run back from disk.

    path: a .wandb file, an offline run folder, or any folder above (e.g. the trainer's
    run_dir): every .wandb file below it is read. Several files (a run resumed under the
    same id writes one folder per process) are put in start order and joined; they must
    share one run id.

    Returns {"run_id": str, "config": dict (W&B's own "_wandb" key left out),
    "history": [row, ...] (one dict per logged step, keys as logged, e.g. "train/loss",
    "_step"; a histogram is {"_type": "histogram", "values": [...], "bins": [...]}),
    "summary": dict, "files": [Path, ...]}.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file under {root}")
    runs = sorted(((_read_one(f), f) for f in files), key=lambda rf: (rf[0]["start_time"], rf[1]))
    # A segment killed before W&B flushed (SIGKILL, node loss) has no run record: skip it
    # when a later segment of the run exists, fail when nothing is readable.
    skipped = [f for r, f in runs if not r["run_id"]]
    runs = [(r, f) for r, f in runs if r["run_id"]]
    if not runs:
        raise ValueError(f"{skipped[0]}: no run record yet (run still starting, or file cut short)")
    ids = sorted({r["run_id"] for r, _ in runs})
    if len(ids) != 1:
        raise ValueError(f"{root} holds runs with different ids {ids}: pass one run's folder")
    out: dict[str, Any] = {"run_id": ids[0], "config": {}, "history": [], "summary": {}}
    for r, _ in runs:
        out["config"].update(r["config"])
        out["history"].extend(r["history"])
        out["summary"].update(r["summary"])
    out["files"] = [f for _, f in runs]
    out["skipped"] = skipped
    return out

"""Monitor: the facade the trainer uses, on real offline W&B runs read back from disk."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from train_helpers import moe_aux

from xpar.config.schema import LoggerConfig
from xpar.errors import XparConfigError
from xpar.redact import REDACTED
from xpar.testing import run_distributed
from xpar.train.monitor import Monitor
from xpar.train.wandb_reader import read_offline_run

# Fake secrets planted in configs / env: must never reach a file under the run dir.
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_ENV_KEY = "fedcba9876543210fedcba9876543210fedcba98"
FAKE_HF_TOKEN = "hf_" + "Ab3" * 12
FAKE_PASSWORD = "hunter2-not-a-real-password"


# Every test here writes W&B files to a throwaway home, never the network.
pytestmark = pytest.mark.usefixtures("wandb_home")


def _f32(x: float) -> float:
    # tensors are float32; the logged value is the float32 value widened
    return float(torch.tensor(x, dtype=torch.float32))


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


class _Clock:
    """A settable clock, so tokens/s between log steps is exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------------------
# A real offline run, read back from disk
# ----------------------------------------------------------------------------------------


PEAK, FPT, WORLD = 1e12, 6e6, 2
COUNTS = [[10.0, 20.0, 30.0, 60.0], [25.0, 25.0, 25.0, 25.0]]
CONFIG_WITH_SECRETS = {
    "model": {"d_model": 64, "n_layers": 2},
    "data": {"tokenizer": "byte", "url": f"https://example.invalid/?k={FAKE_WANDB_KEY}"},
    "logger": {"wandb_mode": "offline", "api_key": FAKE_WANDB_KEY},
    "hub": {"hf_token": FAKE_HF_TOKEN, "notes": FAKE_HF_TOKEN},
    "db": {"password": FAKE_PASSWORD},
    "train": {"steps": 4, "max_tokens": 123},
}


def _log_four_steps(run_dir: Path, out: io.StringIO) -> tuple[Monitor, dict[int, dict]]:
    cfg = LoggerConfig(log_every=2, hist_every=4, progress_bar="never")
    clock = _Clock()
    mon = Monitor(
        cfg,
        rank=0,
        total_steps=4,
        run_dir=run_dir,
        config=CONFIG_WITH_SECRETS,
        world_size=WORLD,
        flops_per_token=FPT,
        peak_flops=PEAK,
        stream=out,
        clock=clock,
    )
    assert mon.run_id and mon.wandb_dir is not None
    # log steps one second apart, so tokens/s = 1000 * step: 2000 by step 2, 4000 more by 4
    tokens_seen = {2: 2000, 4: 6000}
    logged = {}
    for step in range(1, 5):
        if not mon.should_log(step):
            continue
        clock.t = step / 2
        logged[step] = mon.log_train(
            step,
            loss=torch.tensor(4.0 - 0.5 * step),
            lr=1e-3 * step,
            grad_norm=torch.tensor(0.25 * step),
            tokens_seen=tokens_seen[step],
            moe_layers=[
                moe_aux(COUNTS[0], 0.125, 1.25, 1.5, 0.75),
                moe_aux(COUNTS[1], 0.0, 1.375, 1.0, 0.25),
            ],
        )
    mon.log_val(4, 2.0)
    return mon, logged


def _check_train_row(row: dict, step: int, logged: dict) -> None:
    assert row["train/loss"] == _f32(4.0 - 0.5 * step)
    assert row["train/lr"] == 1e-3 * step
    assert row["train/grad_norm"] == _f32(0.25 * step)
    assert row["train/tokens_per_s"] == 1000.0 * step
    assert row["train/mfu"] == pytest.approx(FPT * 1000.0 * step / WORLD / PEAK, rel=1e-12)
    assert row["moe/aux_loss"] == pytest.approx(1.25)  # mean of the layers' lb_loss
    assert row["moe/z_loss"] == pytest.approx(0.5)
    assert row["moe/layer_0/dropped_fraction"] == 0.125
    assert row["moe/layer_0/max_load"] == 60.0
    assert row["moe/layer_0/mean_load"] == 30.0
    assert row["moe/layer_0/max_over_mean_load"] == 2.0
    assert row["moe/layer_0/router_entropy"] == 1.25
    assert row["moe/layer_1/max_over_mean_load"] == 1.0
    assert row["moe/layer_1/dropped_fraction"] == 0.0
    # what log_train returned is what reached the disk
    for key, value in logged.items():
        if key != "eta_s":
            assert row[key] == pytest.approx(value, rel=1e-12), key


def _check_config_arrived_secrets_did_not(run: dict, run_dir: Path, text: str) -> None:
    c = run["config"]
    assert c["model"] == {"d_model": 64, "n_layers": 2}
    assert c["data"]["tokenizer"] == "byte"  # "token" inside a word is not a secret
    assert c["train"]["max_tokens"] == 123
    assert c["logger"]["api_key"] == REDACTED
    assert c["hub"] == {"hf_token": REDACTED, "notes": REDACTED}
    assert c["db"]["password"] == REDACTED
    assert c["data"]["url"] == REDACTED  # a string holding a key goes whole
    files = _all_bytes(run_dir)
    assert len(files) >= 3
    for secret in (FAKE_WANDB_KEY, FAKE_ENV_KEY, FAKE_HF_TOKEN, FAKE_PASSWORD):
        for path, data in files:
            assert secret.encode() not in data, f"{secret} leaked into {path}"
    # the console got one line per log step and never a secret
    assert len([ln for ln in text.splitlines() if ln.startswith("step ")]) == 2
    assert FAKE_WANDB_KEY not in text


def test_offline_run_logs_metrics_histograms_and_scrubbed_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_ENV_KEY)  # present in env, must not be written
    run_dir = tmp_path / "run"
    out = io.StringIO()
    mon, logged = _log_four_steps(run_dir, out)
    wandb_dir = mon.finish()
    assert wandb_dir is not None and wandb_dir.is_relative_to(run_dir)
    assert list(wandb_dir.glob("run-*.wandb"))

    run = read_offline_run(run_dir)
    assert run["run_id"] == mon.run_id
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [2, 4]
    for step in (2, 4):
        _check_train_row(rows[step], step, logged[step])
    # histogram only on the hist_every step: one bin per expert, height = its tokens
    assert "moe/layer_0/tokens_per_expert" not in rows[2]
    for i in (0, 1):
        hist = rows[4][f"moe/layer_{i}/tokens_per_expert"]
        assert hist["_type"] == "histogram"
        assert hist["values"] == COUNTS[i]
        assert hist["bins"] == [0, 1, 2, 3, 4]
    assert rows[4]["val/loss"] == 2.0
    assert rows[4]["val/ppl"] == pytest.approx(math.exp(2.0))
    # the expert-load heatmap, drawn at the end, next to metrics.jsonl and in W&B as an image
    assert mon.load_png == run_dir / "expert_load.png" and mon.load_png.exists()
    image = rows[4]["moe/expert_load"]
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert (wandb_dir / "files" / image["path"]).exists()
    assert run["summary"]["val/loss"] == 2.0
    _check_config_arrived_secrets_did_not(run, run_dir, out.getvalue())


def test_resume_keeps_the_run_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(log_every=1, hist_every=0, progress_bar="never")
    sink = io.StringIO()
    first = Monitor(cfg, total_steps=4, run_dir=run_dir, config={"seg": 1}, stream=sink)
    for step in (1, 2):
        first.log_train(step, loss=float(step))
    first.finish()
    run_id = first.run_id
    assert run_id

    # a restarted job passes the id it stored in the checkpoint
    second = Monitor(
        cfg, total_steps=4, run_dir=run_dir, config={"seg": 2}, run_id=run_id, stream=sink
    )
    assert second.run_id == run_id
    for step in (3, 4):
        second.log_train(step, loss=float(step))
    second_dir = second.finish()
    assert second_dir != first.wandb_dir

    run = read_offline_run(run_dir)  # both segments, in start order
    assert run["run_id"] == run_id
    assert len(run["files"]) == 2
    assert [r["_step"] for r in run["history"]] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in run["history"]] == [1.0, 2.0, 3.0, 4.0]
    assert run["config"]["seg"] == 2
    assert read_offline_run(second_dir)["history"][0]["_step"] == 3


# ----------------------------------------------------------------------------------------
# Ranks other than 0 are silent and write nothing
# ----------------------------------------------------------------------------------------


def test_nonzero_rank_creates_nothing_and_prints_nothing(tmp_path, capfd):
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(wandb_mode="offline", log_every=1, hist_every=1, progress_bar="always")
    mon = Monitor(
        cfg,
        rank=1,
        total_steps=2,
        run_dir=run_dir,
        config={"logger": {"api_key": FAKE_WANDB_KEY}},
        flops_per_token=1e6,  # would trigger a peak-FLOPs measurement on rank 0
    )
    mon.print_config()
    mon.start(0, 0)
    for step in (1, 2):
        mon.tick(step)
        assert mon.should_log(step)  # the schedule is the same on every rank
        assert (
            mon.log_train(step, loss=1.0, lr=1e-3, moe_layers=[moe_aux([1, 2], 0, 1, 1, 1)]) == {}
        )
    assert mon.log_val(2, 1.0) == {}
    mon.print("hello from rank 1")
    mon.print_summary(checkpoint_dir=tmp_path / "ckpt")
    assert mon.finish() is None
    assert mon.run_id is None and mon.peak_flops is None
    assert not run_dir.exists()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _two_rank_monitor(rank, world_size, run_dir):
    # real ranks: each builds the monitor the way the trainer does
    torch.set_num_threads(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        cfg = LoggerConfig(log_every=1, hist_every=1, progress_bar="never")
        mon = Monitor(cfg, rank=rank, total_steps=2, run_dir=run_dir, world_size=world_size)
        for step in (1, 2):
            loss = torch.tensor([float(rank + step)])
            torch.distributed.all_reduce(loss)  # rank-reduced before logging
            mon.log_train(step, loss=loss / world_size, moe_layers=[{"tokens_per_expert": [1, 3]}])
        mon.finish()
    return buf.getvalue(), mon.run_id


@pytest.mark.slow  # spawns two interpreters that import torch and start wandb (~15 s)
def test_two_real_ranks_only_rank0_logs(tmp_path):
    run_dir = tmp_path / "run"
    (out0, id0), (out1, id1) = run_distributed(_two_rank_monitor, 2, str(run_dir))
    assert out1 == "" and id1 is None
    assert "step 1/2 | loss 1.5000" in out0 and "step 2/2 | loss 2.5000" in out0
    assert len(list(run_dir.rglob("*.wandb"))) == 1
    run = read_offline_run(run_dir)
    assert run["run_id"] == id0
    assert [r["train/loss"] for r in run["history"]] == [1.5, 2.5]


# ----------------------------------------------------------------------------------------
# What the console shows through the monitor: plain lines vs the progress bar
# ----------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _drive(progress: str, stream, run_dir: Path) -> str:
    cfg = LoggerConfig(wandb_mode="disabled", log_every=2, hist_every=0, progress_bar=progress)
    mon = Monitor(cfg, total_steps=4, run_dir=run_dir, stream=stream, show_config=True)
    mon.print_config({"a": 1})
    mon.start(0, 0)
    for step in range(1, 5):
        mon.tick(step)
        if mon.should_log(step):
            mon.log_train(
                step,
                loss=1.0,
                lr=1e-3,
                grad_norm=1.0,
                tokens_seen=100 * step,
                moe_layers=[{"tokens_per_expert": [1.0, 3.0], "dropped_fraction": 0.5}],
            )
    mon.log_val(4, 1.0)
    mon.print_summary(checkpoint_dir="ckpt/step_4")
    assert mon.finish() is None  # W&B disabled: no run folder
    return stream.getvalue()


_LINE_RE = re.compile(
    r"^step [ \d]\d*/4 \| loss 1\.0000 \| lr 1\.00e-03 \| gnorm 1\.000 \| [\d.]+[kM]? tok/s \| "
    r"drop 50\.00% \| load max/mean 1\.50 \| eta (\?|\d+s|\d+m\d\ds)$"
)


def test_plain_lines_when_not_a_terminal(tmp_path):
    text = _drive("auto", io.StringIO(), tmp_path)  # StringIO is no tty -> plain lines
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == 2 and all(_LINE_RE.match(ln) for ln in step_lines), step_lines
    assert "eval 4/4 | val loss 1.0000 | val ppl 2.72" in lines
    assert lines[:2] == ["resolved config:", "a: 1"]
    assert "checkpoint: ckpt/step_4" in lines and "wandb: disabled" in lines
    never = _drive("never", _Tty(), tmp_path)  # a terminal, but the bar is switched off
    assert "\r" not in never and "\x1b" not in never


@pytest.mark.parametrize("progress, stream", [("always", io.StringIO), ("auto", _Tty)])
def test_progress_bar_on_a_terminal(progress, stream, tmp_path):
    text = _drive(progress, stream(), tmp_path)
    assert "\r" in text
    assert re.search(r"\r\[#{24}\] 4/4 100% eta \w+", text)
    # log lines still arrive whole, on their own line, above the bar
    lines = [seg for seg in re.split(r"[\r\n]", text.replace("\x1b[K", "")) if seg]
    assert sum(bool(_LINE_RE.match(seg)) for seg in lines) == 2
    assert text.endswith("\n")  # the bar is closed by finish()


def test_print_config_and_summary_print_once(tmp_path):
    out = io.StringIO()
    cfg = LoggerConfig(wandb_mode="disabled", progress_bar="never")
    config = {"secret": "x", "train": {"print_config": True}}
    mon = Monitor(cfg, total_steps=1, run_dir=tmp_path, stream=out, config=config)
    mon.print_config()
    mon.print_config()
    mon.print_summary()
    mon.print_summary()
    text = out.getvalue()
    assert text.count("resolved config:") == 1 and text.count("done: step") == 1
    assert f"secret: {REDACTED}\n" in text or f"secret: '{REDACTED}'\n" in text


def test_the_config_goes_to_a_file_and_one_line_says_where(tmp_path):
    out = io.StringIO()
    cfg = LoggerConfig(wandb_mode="disabled", progress_bar="never")
    config = {"secret": "x", "train": {"print_config": False, "steps": 3}}
    mon = Monitor(cfg, total_steps=1, run_dir=tmp_path / "run", stream=out, config=config)
    mon.print_config()
    path = tmp_path / "run" / "config.yaml"
    assert mon.config_path == path
    assert out.getvalue() == f"config: {path} (train.print_config=true prints it)\n"
    saved = path.read_text()
    assert "steps: 3" in saved and "secret: x" not in saved and REDACTED in saved
    # another rank writes nothing and prints nothing
    other = Monitor(cfg, rank=1, total_steps=1, run_dir=tmp_path / "r1", stream=out, config=config)
    other.print_config()
    assert not (tmp_path / "r1").exists()


def test_warnings_are_repeated_once_and_only_when_there_are_some(tmp_path):
    out = io.StringIO()
    cfg = LoggerConfig(wandb_mode="disabled", progress_bar="never")
    mon = Monitor(cfg, total_steps=1, run_dir=tmp_path, stream=out)
    mon.print_warnings([])
    assert out.getvalue() == ""
    mon.print_warnings(["a is odd", "b is odd"], prefix="xpar: warning: ")
    mon.print_warnings(["a is odd"], prefix="xpar: warning: ")
    assert out.getvalue() == (
        "2 warnings in this run (repeated from above):\n"
        "xpar: warning: a is odd\nxpar: warning: b is odd\n"
    )


def test_log_and_histogram_schedule():
    mon = Monitor(
        LoggerConfig(wandb_mode="disabled", log_every=10, hist_every=25),
        rank=3,
        total_steps=95,
        run_dir="unused",
    )
    logs = [s for s in range(1, 96) if mon.should_log(s)]
    assert logs == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    # the first log step at or past each multiple of 25
    assert [s for s in logs if mon.should_hist(s)] == [30, 50, 80]
    off = Monitor(LoggerConfig(wandb_mode="disabled", hist_every=0), total_steps=9, run_dir="x")
    assert not any(off.should_hist(s) for s in range(1, 10))


@pytest.mark.parametrize(
    "field, value",
    [("wandb_mode", "cloud"), ("progress_bar", "yes"), ("log_every", 0), ("hist_every", -1)],
)
def test_bad_logger_config_names_field(field, value):
    with pytest.raises(XparConfigError, match=f"logger.{field}="):
        Monitor(LoggerConfig(**{field: value}), total_steps=1, run_dir="unused")


def test_default_logger_config_when_none():
    mon = Monitor(None, rank=1, total_steps=20, run_dir="unused")
    assert mon.cfg == LoggerConfig()
    assert [s for s in range(1, 21) if mon.should_log(s)] == [10, 20]


def test_accepts_the_real_logger_config():
    out = io.StringIO()
    cfg = LoggerConfig(wandb_mode="disabled", log_every=1, progress_bar="never")
    mon = Monitor(cfg, total_steps=1, run_dir="unused", stream=out)
    assert mon.should_log(1)
    mon.log_train(1, loss=1.0)
    assert out.getvalue().startswith("step 1/1 | loss 1.0000")


def test_metrics_rows_go_to_run_dir_on_rank_0_only(tmp_path):
    cfg = LoggerConfig(wandb_mode="disabled", progress_bar="never")
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "lr": 1e-3}]
    for rank in (1, 0):
        with Monitor(cfg, rank=rank, total_steps=2, run_dir=tmp_path, stream=io.StringIO()) as mon:
            assert mon.metrics_path == tmp_path / "metrics.jsonl"
            for row in rows:
                mon.write_metrics(row)
        assert mon.metrics_path.exists() == (rank == 0)
    lines = mon.metrics_path.read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(row) for row in rows]

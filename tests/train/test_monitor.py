"""Monitor: real offline W&B runs read back from disk, console output, MFU, secrets."""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.testing import run_distributed
from xpar.train.monitor import (
    REDACTED,
    Monitor,
    MonitorConfig,
    _table_peak,
    format_duration,
    format_train_line,
    measure_matmul_flops,
    mfu,
    moe_layer_metrics,
    peak_flops,
    progress_bar,
    read_offline_run,
    scrub_secrets,
)

# Fake secrets planted in configs / env: must never reach a file under the run dir.
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_ENV_KEY = "fedcba9876543210fedcba9876543210fedcba98"
FAKE_HF_TOKEN = "hf_" + "Ab3" * 12
FAKE_PASSWORD = "hunter2-not-a-real-password"


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path_factory, monkeypatch):
    # Everything wandb writes outside the run dir goes to a throwaway place; no network.
    home = tmp_path_factory.mktemp("wandb_home")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    for var in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "XPAR_PEAK_FLOPS"):
        monkeypatch.delenv(var, raising=False)


def _aux(counts, dropped, entropy, lb, z):
    # what MoELayer returns as aux (tensors), reduced by the trainer
    return {
        "tokens_per_expert": torch.tensor(counts, dtype=torch.float32),
        "dropped_fraction": torch.tensor(dropped),
        "router_entropy": torch.tensor(entropy),
        "lb_loss": torch.tensor(lb),
        "z_loss": torch.tensor(z),
    }


def _f32(x: float) -> float:
    # tensors are float32; the logged value is the float32 value widened
    return float(torch.tensor(x, dtype=torch.float32))


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------------------
# A real offline run, read back from disk
# ----------------------------------------------------------------------------------------


def test_offline_run_logs_metrics_histograms_and_scrubbed_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_ENV_KEY)  # present in env, must not be written
    run_dir = tmp_path / "run"
    config = {
        "model": {"d_model": 64, "n_layers": 2},
        "data": {"tokenizer": "byte", "url": f"https://example.invalid/?k={FAKE_WANDB_KEY}"},
        "logger": {"wandb_mode": "offline", "api_key": FAKE_WANDB_KEY},
        "hub": {"hf_token": FAKE_HF_TOKEN, "notes": FAKE_HF_TOKEN},
        "db": {"password": FAKE_PASSWORD},
        "train": {"steps": 4, "max_tokens": 123},
    }
    cfg = MonitorConfig(log_every=2, hist_every=4, progress_bar="never")
    peak, fpt, world = 1e12, 6e6, 2
    counts = [[10.0, 20.0, 30.0, 60.0], [25.0, 25.0, 25.0, 25.0]]
    out = io.StringIO()
    mon = Monitor(
        cfg,
        rank=0,
        total_steps=4,
        run_dir=run_dir,
        config=config,
        world_size=world,
        flops_per_token=fpt,
        peak_flops=peak,
        stream=out,
    )
    assert mon.run_id and mon.wandb_dir is not None
    logged = {}
    for step in range(1, 5):
        if not mon.should_log(step):
            continue
        logged[step] = mon.log_train(
            step,
            loss=torch.tensor(4.0 - 0.5 * step),
            lr=1e-3 * step,
            grad_norm=torch.tensor(0.25 * step),
            tokens_per_s=1000.0 * step,
            moe_layers=[
                _aux(counts[0], 0.125, 1.25, 1.5, 0.75),
                _aux(counts[1], 0.0, 1.375, 1.0, 0.25),
            ],
        )
    mon.log_val(4, 2.0)
    wandb_dir = mon.finish()
    assert wandb_dir is not None and wandb_dir.is_relative_to(run_dir)
    assert list(wandb_dir.glob("run-*.wandb"))

    run = read_offline_run(run_dir)
    assert run["run_id"] == mon.run_id
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [2, 4]
    for step in (2, 4):
        row = rows[step]
        assert row["train/loss"] == _f32(4.0 - 0.5 * step)
        assert row["train/lr"] == 1e-3 * step
        assert row["train/grad_norm"] == _f32(0.25 * step)
        assert row["train/tokens_per_s"] == 1000.0 * step
        assert row["train/mfu"] == pytest.approx(fpt * 1000.0 * step / world / peak, rel=1e-12)
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
        for key, value in logged[step].items():
            if key != "eta_s":
                assert row[key] == pytest.approx(value, rel=1e-12), key
    # histogram only on the hist_every step: one bin per expert, height = its tokens
    assert "moe/layer_0/tokens_per_expert" not in rows[2]
    for i in (0, 1):
        hist = rows[4][f"moe/layer_{i}/tokens_per_expert"]
        assert hist["_type"] == "histogram"
        assert hist["values"] == counts[i]
        assert hist["bins"] == [0, 1, 2, 3, 4]
    assert rows[4]["val/loss"] == 2.0
    assert rows[4]["val/ppl"] == pytest.approx(math.exp(2.0))
    assert run["summary"]["val/loss"] == 2.0

    # config arrived, secrets did not
    c = run["config"]
    assert c["model"] == {"d_model": 64, "n_layers": 2}
    assert c["data"]["tokenizer"] == "byte"  # "token" inside a word is not a secret
    assert c["train"]["max_tokens"] == 123
    assert c["logger"]["api_key"] == REDACTED
    assert c["hub"] == {"hf_token": REDACTED, "notes": REDACTED}
    assert c["db"]["password"] == REDACTED
    assert c["data"]["url"] == f"https://example.invalid/?k={REDACTED}"
    files = _all_bytes(run_dir)
    assert len(files) >= 3
    for secret in (FAKE_WANDB_KEY, FAKE_ENV_KEY, FAKE_HF_TOKEN, FAKE_PASSWORD):
        for path, data in files:
            assert secret.encode() not in data, f"{secret} leaked into {path}"
    # the console got one line per log step and never a secret
    text = out.getvalue()
    assert len([ln for ln in text.splitlines() if ln.startswith("step ")]) == 2
    assert FAKE_WANDB_KEY not in text


def test_resume_keeps_the_run_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = MonitorConfig(log_every=1, hist_every=0, progress_bar="never")
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
    cfg = MonitorConfig(wandb_mode="offline", log_every=1, hist_every=1, progress_bar="always")
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
        assert mon.log_train(step, loss=1.0, lr=1e-3, moe_layers=[_aux([1, 2], 0, 1, 1, 1)]) == {}
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
        cfg = MonitorConfig(log_every=1, hist_every=1, progress_bar="never")
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
# Console: line format, progress bar vs plain lines
# ----------------------------------------------------------------------------------------


def test_console_line_format():
    metrics = {
        "train/loss": 4.12345,
        "train/lr": 3e-3,
        "train/grad_norm": 0.5321,
        "train/tokens_per_s": 12345.0,
        "train/mfu": 0.01234,
        "moe/layer_0/dropped_fraction": 0.02,
        "moe/layer_1/dropped_fraction": 0.04,
        "moe/layer_0/max_over_mean_load": 1.2,
        "moe/layer_1/max_over_mean_load": 1.42,
        "eta_s": 185.0,
    }
    assert format_train_line(10, 200, metrics) == (
        "step  10/200 | loss 4.1235 | lr 3.00e-03 | gnorm 0.532 | 12.3k tok/s | mfu 1.23% | "
        "drop 3.00% | load max/mean 1.42 | eta 3m05s"
    )
    # a dense model without MoE stats and no throughput yet
    assert format_train_line(1, 5, {"train/loss": 2.0}) == "step 1/5 | loss 2.0000 | eta ?"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _drive(progress: str, stream) -> str:
    cfg = MonitorConfig(wandb_mode="disabled", log_every=2, hist_every=0, progress_bar=progress)
    mon = Monitor(cfg, total_steps=4, run_dir="unused", stream=stream)
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


def test_plain_lines_when_not_a_terminal():
    text = _drive("auto", io.StringIO())  # StringIO is no tty -> plain lines
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == 2 and all(_LINE_RE.match(ln) for ln in step_lines), step_lines
    assert "eval 4/4 | val loss 1.0000 | val ppl 2.72" in lines
    assert lines[:2] == ["resolved config:", "a: 1"]
    assert "checkpoint: ckpt/step_4" in lines and "wandb: disabled" in lines
    never = _drive("never", _Tty())  # a terminal, but the bar is switched off
    assert "\r" not in never and "\x1b" not in never


@pytest.mark.parametrize("progress, stream", [("always", io.StringIO), ("auto", _Tty)])
def test_progress_bar_on_a_terminal(progress, stream):
    text = _drive(progress, stream())
    assert "\r" in text
    assert re.search(r"\r\[#{24}\] 4/4 100% eta \w+", text)
    # log lines still arrive whole, on their own line, above the bar
    lines = [seg for seg in re.split(r"[\r\n]", text.replace("\x1b[K", "")) if seg]
    assert sum(bool(_LINE_RE.match(seg)) for seg in lines) == 2
    assert text.endswith("\n")  # the bar is closed by finish()


def test_print_config_and_summary_print_once():
    out = io.StringIO()
    cfg = MonitorConfig(wandb_mode="disabled", progress_bar="never")
    mon = Monitor(cfg, total_steps=1, run_dir="unused", stream=out, config={"secret": "x"})
    mon.print_config()
    mon.print_config()
    mon.print_summary()
    mon.print_summary()
    text = out.getvalue()
    assert text.count("resolved config:") == 1 and text.count("done: step") == 1
    assert f"secret: {REDACTED}\n" in text or f"secret: '{REDACTED}'\n" in text


def test_progress_bar_and_duration_text():
    assert progress_bar(45, 200, 62.0) == "[#####-------------------]  45/200  22% eta 1m02s"
    assert progress_bar(0, 10, None) == "[------------------------]  0/10   0% eta ?"
    assert format_duration(3725) == "1h02m"
    assert format_duration(42.3) == "42s"
    assert format_duration(float("inf")) == "?"


def test_log_and_histogram_schedule():
    mon = Monitor(
        MonitorConfig(wandb_mode="disabled", log_every=10, hist_every=25),
        rank=3,
        total_steps=95,
        run_dir="unused",
    )
    logs = [s for s in range(1, 96) if mon.should_log(s)]
    assert logs == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    # the first log step at or past each multiple of 25
    assert [s for s in logs if mon.should_hist(s)] == [30, 50, 80]
    off = Monitor(MonitorConfig(wandb_mode="disabled", hist_every=0), total_steps=9, run_dir="x")
    assert not any(off.should_hist(s) for s in range(1, 10))


@pytest.mark.parametrize(
    "field, value",
    [("wandb_mode", "cloud"), ("progress_bar", "yes"), ("log_every", 0), ("hist_every", -1)],
)
def test_bad_logger_config_names_field(field, value):
    cfg = MonitorConfig(**{field: value})
    with pytest.raises(XparConfigError, match=f"logger.{field}="):
        Monitor(cfg, total_steps=1, run_dir="unused")


# ----------------------------------------------------------------------------------------
# Secrets, MoE stats, MFU
# ----------------------------------------------------------------------------------------


def test_scrub_secrets():
    cfg = {
        "WANDB_API_KEY": "abc",
        "apiKey": "abc",
        "hfToken": "abc",
        "client_secret": {"nested": 1},
        "tokenizer": "byte",
        "keep_checkpoints": 2,
        "max_tokens": 5,
        "token_key": "",  # empty: nothing to hide, left as is
        "list": [f"x {FAKE_WANDB_KEY} y", f"local-{FAKE_WANDB_KEY}", "a" * 39],
    }
    out = scrub_secrets(cfg)
    assert out["WANDB_API_KEY"] == out["apiKey"] == out["hfToken"] == REDACTED
    assert out["client_secret"] == REDACTED
    assert out["tokenizer"] == "byte" and out["keep_checkpoints"] == 2 and out["max_tokens"] == 5
    assert out["token_key"] == ""
    assert out["list"] == [f"x {REDACTED} y", REDACTED, "a" * 39]
    assert cfg["apiKey"] == "abc"  # a copy: the caller's config is untouched


def test_moe_layer_metrics_from_tensors_and_dicts():
    m = moe_layer_metrics(_aux([0.0, 2.0, 4.0, 2.0], 0.25, 1.5, 1.0, 0.5))
    assert m["max_load"] == 4.0 and m["mean_load"] == 2.0 and m["max_over_mean_load"] == 2.0
    assert m["dropped_fraction"] == 0.25 and m["router_entropy"] == 1.5
    assert m["tokens_per_expert"] == [0.0, 2.0, 4.0, 2.0]
    assert moe_layer_metrics({"tokens_per_expert": [0, 0]})["max_over_mean_load"] == 0.0


def test_mfu_and_peak_flops(monkeypatch):
    assert mfu(6e9, 1e4, 1e15) == pytest.approx(0.06)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
    assert _table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert _table_peak("NVIDIA H100 PCIe") == 756e12
    assert _table_peak("NVIDIA H200") == 989e12
    assert _table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert _table_peak("NVIDIA L40S") == 362e12 and _table_peak("NVIDIA L4") == 121e12
    assert _table_peak("Some Future GPU") is None
    monkeypatch.setenv("XPAR_PEAK_FLOPS", "123e12")
    assert peak_flops("cpu") == 123e12
    monkeypatch.setenv("XPAR_PEAK_FLOPS", "fast")
    with pytest.raises(XparConfigError, match="XPAR_PEAK_FLOPS"):
        peak_flops("cpu")
    # CPU: a measured fp32 matmul rate, plausible for any machine
    rate = measure_matmul_flops("cpu", n=256, repeats=2)
    assert 1e8 < rate < 1e14


# ----------------------------------------------------------------------------------------
# The reader on hand-built files: records spanning blocks, corruption, truncation
# ----------------------------------------------------------------------------------------


def _frame(records: list[bytes]) -> bytes:
    """Write payloads as a leveldb log (our own writer, to test the reader's framing)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for rec in records:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\0" * left
                continue
            take = min(left - 7, len(rec))
            last = take == len(rec)
            kind = (1 if last else 2) if first else (4 if last else 3)
            chunk, rec = rec[:take], rec[take:]
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            first = False
            if last:
                break
    return bytes(out)


def _records() -> list[bytes]:
    from wandb.proto import wandb_internal_pb2 as pb

    run = pb.Record()
    run.run.run_id = "handmade"
    item = run.run.config.update.add()
    item.key, item.value_json = "big", '"' + "x" * 70000 + '"'  # spans 3 blocks
    recs = [run.SerializeToString()]
    for step in range(3):
        h = pb.Record()
        i = h.history.item.add()
        i.nested_key.append("_step")
        i.value_json = str(step)
        i = h.history.item.add()
        i.nested_key.append("train/loss")
        i.number = 1.0 / (step + 1)  # typed value, not value_json
        recs.append(h.SerializeToString())
    return recs


def test_reader_handles_block_spanning_records_and_truncation(tmp_path):
    data = _frame(_records())
    path = tmp_path / "run-handmade.wandb"
    path.write_bytes(data)
    run = read_offline_run(path)
    assert run["run_id"] == "handmade"
    assert len(run["config"]["big"]) == 70000
    assert [r["train/loss"] for r in run["history"]] == [1.0, 0.5, 1.0 / 3]

    path.write_bytes(data[:-3])  # a crash mid-write: the last record is lost, no error
    assert len(read_offline_run(path)["history"]) == 2

    bad = bytearray(data)
    bad[-1] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        read_offline_run(path)
    path.write_bytes(_frame(_records()[1:]))  # history but no run record yet
    with pytest.raises(ValueError, match="no run record"):
        read_offline_run(path)
    path.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="header"):
        read_offline_run(path)
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "empty_dir_that_is_missing")


def test_accepts_the_real_logger_config():
    from xpar.config.schema import LoggerConfig

    out = io.StringIO()
    cfg = LoggerConfig(wandb_mode="disabled", log_every=1, progress_bar="never")
    mon = Monitor(cfg, total_steps=1, run_dir="unused", stream=out)
    assert mon.should_log(1)
    mon.log_train(1, loss=1.0)
    assert out.getvalue().startswith("step 1/1 | loss 1.0000")

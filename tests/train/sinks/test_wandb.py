"""W&B sink: real offline runs, read back from disk (no mocks, nothing leaves the machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xpar.config.schema import LoggerConfig
from xpar.train.sinks.wandb import WandbSink
from xpar.train.wandb_reader import has_exit_record, read_offline_run

# Every test here writes W&B files to a throwaway home, never the network.
pytestmark = pytest.mark.usefixtures("wandb_home")


def test_offline_run_scalars_histograms_and_exit_record(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(project="p", run_name="sink-test")
    sink = WandbSink(cfg, run_dir=run_dir, config={"model": {"d": 8}}, run_id=None)
    assert sink.run_id and sink.dir.is_relative_to(run_dir) and sink.url is None
    assert sink.describe() == (
        f"wandb run: {sink.dir} (offline, id {sink.run_id}; upload with `wandb sync {sink.dir}`)"
    )
    many = [float(i % 7) for i in range(600)]  # past W&B's 512-bin limit: 64 bins
    sink.log({"train/loss": 2.0}, step=1)
    sink.log({"train/loss": 1.5}, step=2, hists={"moe/layer_0/tokens_per_expert": [3.0, 1.0]})
    sink.log({"train/loss": 1.0}, step=3, hists={"moe/layer_1/tokens_per_expert": many})
    sink.finish()
    sink.finish()  # idempotent
    # finish() returns once the closing record is on disk: the file is complete
    (path,) = sink.dir.glob("run-*.wandb")
    assert has_exit_record(path)
    run = read_offline_run(run_dir)
    assert run["run_id"] == sink.run_id
    assert run["config"] == {"model": {"d": 8}}
    assert [r["train/loss"] for r in run["history"]] == [2.0, 1.5, 1.0]
    hist = run["history"][1]["moe/layer_0/tokens_per_expert"]
    assert hist["values"] == [3.0, 1.0] and hist["bins"] == [0, 1, 2]
    wide = run["history"][2]["moe/layer_1/tokens_per_expert"]
    assert len(wide["values"]) == 64 and sum(wide["values"]) == 600


def test_a_run_id_resumes_the_same_run(tmp_path):
    cfg = LoggerConfig()
    first = WandbSink(cfg, run_dir=tmp_path, config={"seg": 1}, run_id=None)
    first.log({"x": 1.0}, step=1)
    first.finish()
    second = WandbSink(cfg, run_dir=tmp_path, config={"seg": 2}, run_id=first.run_id)
    assert second.run_id == first.run_id and second.dir != first.dir
    second.log({"x": 2.0}, step=2)
    second.finish()
    run = read_offline_run(tmp_path)
    assert [r["x"] for r in run["history"]] == [1.0, 2.0] and run["config"]["seg"] == 2


# A fresh interpreter: wandb keeps the API key it saw first for the whole process.
_ONLINE = """
import json, warnings
from pathlib import Path
from xpar.config.schema import LoggerConfig
from xpar.train.sinks.wandb import WandbSink
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sink = WandbSink(LoggerConfig(wandb_mode="online"), run_dir=Path("run"), config={}, run_id=None)
sink.log({"x": 1.0}, step=1)
sink.finish()
print(json.dumps({"warnings": [str(w.message) for w in caught], "dir": str(sink.dir)}))
"""


def test_online_without_a_key_falls_back_to_offline(tmp_path, wandb_home):
    # no key anywhere W&B looks (env, netrc, settings under HOME), and a server that is not
    # there: wandb.init(mode="online") refuses and nothing leaves the machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(wandb_home),
        NETRC=str(wandb_home / "no-netrc"),
        WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_BASE_URL="http://127.0.0.1:9",
        PYTHONPATH=str(Path(__file__).resolve().parents[3]),
    )
    p = subprocess.run(
        [sys.executable, "-c", _ONLINE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert any("logging offline instead" in w for w in out["warnings"]), out
    assert Path(out["dir"]).name.startswith("offline-run-")
    assert read_offline_run(tmp_path / "run")["history"][0]["x"] == 1.0


def test_quiet_keeps_wandbs_own_lines_off_the_console(tmp_path):
    # a fresh process each: wandb reads WANDB_SILENT (the fixture's) once per process
    code = (
        "import sys; from pathlib import Path\n"
        "from xpar.config.schema import LoggerConfig\n"
        "from xpar.train.sinks.wandb import WandbSink\n"
        "quiet = sys.argv[1] == 'quiet'\n"
        "sink = WandbSink(LoggerConfig(project='p'), run_dir=Path(sys.argv[2]), config={},\n"
        "                 run_id=None, quiet=quiet)\n"
        "sink.log({'train/loss': 1.0}, step=1)\n"
        "sink.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    for mode in ("quiet", "loud"):
        p = subprocess.run(
            [sys.executable, "-c", code, mode, str(tmp_path / mode)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert p.returncode == 0, p.stderr
        text = p.stdout + p.stderr
        if mode == "quiet":
            assert "wandb:" not in text, text
        else:
            assert "wandb: Run summary:" in text  # what quiet keeps off: banner and summary


@pytest.mark.parametrize("secret_in_argv", [False, True])
def test_a_secret_on_the_command_line_is_not_in_the_wandb_files(
    tmp_path, monkeypatch, secret_in_argv
):
    secret = "hf_" + "Q" * 34
    arg = f"+parallel.deepspeed.comet.api_key={secret}" if secret_in_argv else "train.steps=3"
    monkeypatch.setattr(sys, "argv", ["xpar.train", arg])
    sink = WandbSink(LoggerConfig(project="p"), run_dir=tmp_path, config={}, run_id=None)
    sink.log({"train/loss": 1.0}, step=1)
    sink.finish()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert secret.encode() not in written
    # W&B's metadata (host, command line) is kept unless the command line holds a secret
    assert (b"train.steps=3" in written) is not secret_in_argv

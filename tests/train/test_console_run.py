"""What a real 2-rank `torchrun -m xpar.train experiment=tiny` prints, rank by rank.

torchrun's --redirects keeps each rank's stdout and stderr in its own file, so the tests see
who said what: rank 0 prints only xpar's lines (each of a known kind), rank 1 nothing, the
warning that matters comes once at start-up and again at the end, and train.verbose=true
brings the other libraries' lines back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WARMUP_WARNING = "xpar: warning: optim.warmup_steps=10 >= train.steps=6"

# Every line rank 0 may print by default, by kind.
LINE_KINDS = {
    "warning": r"xpar: warning: \S.*",
    "config file": r"config: /\S+/config\.yaml \(train\.print_config=true prints it\)",
    "model": r"model: params .*",
    "parallel": r"parallel: world=2 .*",
    "data": r"data: .*",
    "eval": r"eval +\d+/6 \| val loss .*",
    "val loss": r"val loss (before|after): \d.*",
    "step": r"step +\d+/6 \| loss .*",
    "start-up": r"start-up: imports \d+\.\ds, config .*; first step done \d+\.\ds after process start",
    "trained": r"trained steps 1\.\.6 in .*total wall time \d+\.\ds \(from process start\)",
    "done": r"done: step 6/6 .*",
    "checkpoint": r"checkpoint: /\S+",
    "wandb run": r"wandb run: /\S+ \(offline, .*",
    "metrics": r"metrics: /\S+metrics\.jsonl",
    "expert load": r"expert load: (/\S+expert_load\.png|no picture .*)",
    "warnings again": r"1 warning in this run \(repeated from above\):",
}


def _torchrun(tmp: Path, *overrides: str) -> dict[int, dict[str, str]]:
    """Run the tiny job on 2 ranks; {rank: {"stdout": ..., "stderr": ...}}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_DIR=str(tmp / "wandb_home"))
    env["TORCH_EXTENSIONS_DIR"] = str(tmp / "torch_extensions")  # where a JIT op build lands
    env["WANDB_CONFIG_DIR"] = env["WANDB_CACHE_DIR"] = str(tmp / "wandb_home")
    logs = tmp / "logs"
    cmd = [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone"],
        *["--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3"],
        *["-m", "xpar.train", "experiment=tiny", f"train.out_dir={tmp / 'out'}"],
        *overrides,
    ]
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = {}
    for rank in (0, 1):
        (rank_dir,) = logs.glob(f"*/attempt_0/{rank}")
        out[rank] = {s: (rank_dir / f"{s}.log").read_text() for s in ("stdout", "stderr")}
    return out


def _kind(line: str) -> str | None:
    kinds = [k for k, pattern in LINE_KINDS.items() if re.fullmatch(pattern, line)]
    assert len(kinds) <= 1, (line, kinds)
    return kinds[0] if kinds else None


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quiet")
    return tmp, _torchrun(tmp, "optim.warmup_steps=10")


def test_rank_0_prints_only_xpars_lines_and_rank_1_nothing(quiet_run):
    tmp, out = quiet_run
    assert out[1] == {"stdout": "", "stderr": ""}
    lines = (out[0]["stderr"] + out[0]["stdout"]).splitlines()
    unknown = [ln for ln in lines if _kind(ln) is None]
    assert not unknown, "lines of no known kind (third-party noise?):\n" + "\n".join(unknown)
    assert {_kind(ln) for ln in lines} == set(LINE_KINDS)
    assert sum(_kind(ln) == "start-up" for ln in lines) == 1
    assert sum(_kind(ln) == "step" for ln in lines) == 6


def test_the_warning_is_one_line_at_start_and_again_at_the_end(quiet_run):
    _, out = quiet_run
    assert out[0]["stderr"].splitlines() == [out[0]["stderr"].splitlines()[0]]
    assert out[0]["stderr"].startswith(WARMUP_WARNING)
    stdout = out[0]["stdout"].splitlines()
    assert stdout[-2] == "1 warning in this run (repeated from above):"
    assert stdout[-1] == out[0]["stderr"].strip()


def test_the_config_goes_to_a_file_not_the_console(quiet_run):
    tmp, out = quiet_run
    config = (tmp / "out" / "config.yaml").read_text()
    assert "warmup_steps: 10" in config and "print_config: false" in config
    assert "resolved config" not in out[0]["stdout"]
    assert (tmp / "out" / "startup.json").is_file()  # what the start-up benchmark reads


def test_nothing_is_compiled(quiet_run):
    tmp, _ = quiet_run
    # DeepSpeed's CPU comm backend JIT-built its shared-memory op here on every run
    ext = tmp / "torch_extensions"
    assert not ext.exists() or not any(ext.iterdir())


def test_verbose_brings_third_party_lines_back_and_print_config_prints_it(tmp_path):
    out = _torchrun(tmp_path, "train.verbose=true", "train.print_config=true")
    rank0 = out[0]["stdout"] + out[0]["stderr"]
    assert "Setting accelerator to CPU" in rank0  # DeepSpeed's logger
    assert "wandb: Run summary:" in rank0  # wandb's own summary
    assert "resolved config:\nmodel:\n" in out[0]["stdout"]
    assert "Setting accelerator to CPU" in out[1]["stdout"]  # every rank's, as DeepSpeed does

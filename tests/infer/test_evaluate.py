"""xpar eval: the trainer's validation loss from the run's validation files, the same figures
on 2 gloo ranks (torchrun) as in one process, the expert load, the CLI's errors."""

import json
import math
import subprocess
import sys

import pytest

from tests.fixtures import golden
from xpar.cli import main as xpar_main


def run_eval(ckpt, tmp_path, *extra, name="eval.json") -> dict:
    out = tmp_path / name
    argv = [
        "eval",
        ckpt.checkpoint,
        "--data",
        *ckpt.val_files,
        "--cache-dir",
        ckpt.cache_dir,
        "--json",
        str(out),
        *extra,
    ]
    with pytest.raises(SystemExit) as e:
        xpar_main(argv)
    assert e.value.code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("which", ["dense_ckpt", "moe_ckpt"])
def test_eval_loss_is_the_trainers_validation_loss(which, request, tmp_path, capsys):
    ckpt = request.getfixturevalue(which)
    # The trainer's val/loss: its first eval_batches batches of micro_batch_size blocks.
    got = run_eval(
        ckpt,
        tmp_path,
        "--seq-len",
        str(ckpt.seq_len),
        "--batch-size",
        str(ckpt.micro_batch_size),
        "--max-batches",
        str(ckpt.eval_batches),
    )
    assert abs(got["loss"] - ckpt.val_loss) <= 1e-6, (got["loss"], ckpt.val_loss)
    assert got["tokens"] == ckpt.eval_batches * ckpt.micro_batch_size * ckpt.seq_len
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    out = capsys.readouterr().out
    assert out.startswith(f"loss {got['loss']:.6f}  perplexity")


def test_expert_load_is_reported_per_moe_layer(moe_ckpt, dense_ckpt, tmp_path, capsys):
    got = run_eval(moe_ckpt, tmp_path)  # the run's seq_len (64) from its record, every block
    assert len(got["expert_load"]) == 2  # experiment=tiny: 2 blocks, MoE in each
    for load, mm in zip(got["expert_load"], got["max_over_mean"], strict=True):
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
        assert mm == pytest.approx(max(load) * 4) and mm >= 1.0
    out = capsys.readouterr().out
    assert "moe layer 1: max/mean" in out
    assert got["seq_len"] == 64 and got["tokens"] % 64 == 0
    dense = run_eval(dense_ckpt, tmp_path, name="dense.json")
    assert dense["expert_load"] == [] and dense["max_over_mean"] == []


def test_two_gloo_ranks_under_torchrun_equal_one_process(moe_ckpt, tmp_path):
    # Batch size 3 over an odd number of batches: the ranks score unequal shares.
    one = run_eval(moe_ckpt, tmp_path, "--batch-size", "3", name="one.json")
    assert one["batches"] % 2 == 1, one["batches"]
    two = tmp_path / "two.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "xpar.infer.evaluate",
        moe_ckpt.checkpoint,
        "--data",
        *moe_ckpt.val_files,
        "--cache-dir",
        moe_ckpt.cache_dir,
        "--batch-size",
        "3",
        "--json",
        str(two),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=golden.launch_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("loss ") == 1, p.stdout  # rank 0 prints
    got = json.loads(two.read_text())
    assert got["tokens"] == one["tokens"] and got["batches"] == one["batches"]
    assert got["loss"] == pytest.approx(one["loss"], abs=1e-9)
    for a, b in zip(got["expert_load"], one["expert_load"], strict=True):
        assert a == pytest.approx(b, abs=1e-12)


def test_eval_errors_name_the_flag(moe_ckpt, tmp_path, capsys):
    base = ["eval", moe_ckpt.checkpoint, "--data", *moe_ckpt.val_files]
    for extra, msg in (
        (["--seq-len", "4096"], "--seq-len=4096 exceeds"),
        (["--batch-size", "0"], "--batch-size=0 is invalid"),
        (["--tokenizer", str(tmp_path)], "--tokenizer="),
    ):
        with pytest.raises(SystemExit) as e:
            xpar_main(base + ["--cache-dir", moe_ckpt.cache_dir, *extra])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err

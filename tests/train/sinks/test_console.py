"""Console sink: the line format, the progress bar, and how lines and the bar share a terminal."""

from __future__ import annotations

import io

from xpar.train.sinks.console import (
    ConsoleSink,
    format_config,
    format_duration,
    format_summary,
    format_train_line,
    format_val_line,
    progress_bar,
)


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


def test_progress_bar_and_duration_text():
    assert progress_bar(45, 200, 62.0) == "[#####-------------------]  45/200  22% eta 1m02s"
    assert progress_bar(0, 10, None) == "[------------------------]  0/10   0% eta ?"
    assert format_duration(3725) == "1h02m"
    assert format_duration(42.3) == "42s"
    assert format_duration(float("inf")) == "?"


def test_val_summary_and_config_text():
    assert format_val_line(40, 200, {"val/loss": 3.21, "val/ppl": 24.7763}) == (
        "eval  40/200 | val loss 3.2100 | val ppl 24.78"
    )
    more = {"val/loss": 0.5, "val/ppl": 1.65, "val/accuracy": 0.8125, "val/max_vio": 0.0421}
    assert format_val_line(40, 200, more) == (
        "eval  40/200 | val loss 0.5000 | val ppl 1.65 | val acc 81.25% | maxvio 0.042"
    )
    last = {"train/loss": 1.5, "val/loss": 1.25}
    assert format_summary(7, 10, 185.0, last, "ckpt/step_7", "wandb: disabled") == (
        "done: step 7/10 in 3m05s, train loss 1.5000, val loss 1.2500\n"
        "checkpoint: ckpt/step_7\nwandb: disabled"
    )
    assert format_summary(0, 10, 1.0, {}, None, "wandb: disabled") == (
        "done: step 0/10 in 1s\nwandb: disabled"
    )
    assert format_config({"a": 1, "b": {"c": "x"}}) == "resolved config:\na: 1\nb:\n  c: x"


def _sink(progress: str, stream: io.StringIO, clock: list[float]) -> ConsoleSink:
    return ConsoleSink(
        10,
        progress=progress,
        eta=lambda step, now: 10.0 - step,
        clock=lambda: clock[0],
        stream=stream,
    )


def test_plain_lines_and_print_once():
    out = io.StringIO()
    sink = _sink("auto", out, [0.0])  # StringIO is no terminal: plain lines, no bar
    assert not sink.use_bar
    sink.tick(3)
    sink.line("step 3/10")
    sink.print_once("hello", "first")
    sink.print_once("hello", "second")
    sink.close()
    assert out.getvalue() == "step 3/10\nfirst\n"


def test_bar_is_redrawn_under_each_line_and_at_most_5x_a_second():
    out, clock = io.StringIO(), [1.0]
    sink = _sink("always", out, clock)
    assert sink.use_bar
    sink.tick(1)
    sink.tick(2)  # the same instant: not redrawn
    clock[0] = 1.5
    sink.tick(3)
    sink.line("a message")  # above the bar, which comes back at step 3
    sink.tick(10)  # the last step is always drawn
    sink.close()
    bar1, bar3, bar10 = (progress_bar(s, 10, 10.0 - s) for s in (1, 3, 10))
    assert out.getvalue() == (
        f"\r{bar1}\x1b[K\r{bar3}\x1b[K\r\x1b[Ka message\n\r{bar3}\x1b[K\r{bar10}\x1b[K\n"
    )

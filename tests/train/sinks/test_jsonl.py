"""metrics.jsonl sink: one json.dumps(row) line per write, appended, keys in their order."""

from __future__ import annotations

import json

from xpar.train.sinks.jsonl import METRICS_FILE, MetricsFileSink


def test_rows_are_appended_as_json_lines_in_key_order(tmp_path):
    sink = MetricsFileSink(tmp_path)
    assert sink.path == tmp_path / METRICS_FILE == tmp_path / "metrics.jsonl"
    assert not sink.path.exists()  # nothing until the first row
    rows = [
        {"step": 1, "loss": 4.25},
        {"step": 2, "loss": 3.5, "lr": 1e-3, "grad_norm": None, "train/loss": 3.5, "eta_s": 0.5},
    ]
    for row in rows:
        sink.write(row)
    assert sink.path.read_bytes() == b"".join((json.dumps(r) + "\n").encode() for r in rows)
    # a restarted run keeps appending to the same file (resume continues the curve)
    MetricsFileSink(tmp_path).write({"step": 3, "loss": 3.0})
    lines = sink.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert list(json.loads(lines[1])) == ["step", "loss", "lr", "grad_norm", "train/loss", "eta_s"]

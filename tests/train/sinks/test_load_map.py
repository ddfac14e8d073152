from __future__ import annotations

import numpy as np
from matplotlib import image as mpimg

from xpar.train.sinks.load_map import LoadMapSink, read_loads, render, shares


def test_records_every_log_step_and_a_resumed_step_keeps_its_last_line(tmp_path):
    sink = LoadMapSink(tmp_path)
    sink.record(2, [[4, 0, 0, 0], [1, 1, 1, 1]])
    sink.record(4, [[2, 2, 0, 0], [0, 0, 0, 4]])
    sink.record(4, [[1, 1, 1, 1], [0, 0, 0, 4]])  # the resumed run logs step 4 again
    sink.record(6, [])  # a dense model records nothing
    with open(sink.path, "a") as f:
        f.write('{"step": 8, "tokens_per')  # cut short by a crash
    steps, counts = read_loads(sink.path)
    assert steps == [2, 4]
    assert counts[1] == [[1, 1, 1, 1], [0, 0, 0, 4]]
    np.testing.assert_array_equal(shares(counts, 0), [[4, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(shares(counts, 1), [[1, 1, 1, 1], [0, 0, 0, 4]])


def test_draws_one_panel_per_layer_as_a_png(tmp_path):
    sink = LoadMapSink(tmp_path)
    for step in range(1, 11):
        sink.record(step, [[step, 10, 10, 10], [10, 10, 10, 10], [40, 0, 0, 0]])
    png = sink.render()
    assert png == tmp_path / "expert_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
    h, w = mpimg.imread(png).shape[:2]
    assert (w, h) == (800, int((1.2 + 1.6 * 3) * 100))  # three layers, three panels
    pixels = mpimg.imread(png)[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20  # a real picture, not a blank figure


def test_no_picture_without_moe_layers(tmp_path):
    assert LoadMapSink(tmp_path).render() is None
    assert render(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()

"""MFU: the formula, the datasheet table, the env override and the measured CPU peak."""

from __future__ import annotations

import pytest

from xpar.errors import XparConfigError
from xpar.train.mfu import _table_peak, measure_matmul_flops, mfu, peak_flops


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("XPAR_PEAK_FLOPS", raising=False)


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

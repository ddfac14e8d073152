"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture
def wandb_home(tmp_path_factory, monkeypatch):
    """Everything wandb writes outside the run dir goes to a throwaway place; no network."""
    home = tmp_path_factory.mktemp("wandb_home")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    for var in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "XPAR_PEAK_FLOPS"):
        monkeypatch.delenv(var, raising=False)
    return home

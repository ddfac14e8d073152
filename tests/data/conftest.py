"""Fixtures for the data pipeline tests."""

import pytest


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")

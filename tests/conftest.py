"""Shared fixtures. Test images are generated; real photographs come from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def image_helpers():
    from tokenlake.extract import testing

    return testing


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not (SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real photographs not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test may reach a hub; the datasets cache stays inside the test's temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture
def synthetic_run():
    """Factory of tiny runs with known contents: tokenlake.store.testing.synthetic_run(n_inputs=3, ...)."""
    from tokenlake.store.testing import synthetic_run

    return synthetic_run

"""Shared fixtures. Test images are generated; real photographs come from ../shared/data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"


def load_image_helpers():
    """tests/_images.py, importable under --import-mode=importlib."""
    name = "tokenlake_tests_images"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_images.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def image_helpers():
    return load_image_helpers()


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

"""Shared fixtures. Test images are generated; the tests on real photographs read the folder
that $TOKENLAKE_IMAGENET_SAMPLE names, by default the development machines' 500-image ImageNet
sample beside the checkout (../shared/data/imagenet-sample: JPEGs and a labels.csv), and are
skipped without it.

Tests never touch the user's caches: before anything imports huggingface_hub, datasets, timm or
torch (they read these variables once, at import), the Hugging Face and torch cache variables
point into a temporary folder made for this session and removed at its end, and the hubs are
offline. `test_caches.py` checks it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CACHE_ROOT = Path(tempfile.mkdtemp(prefix="tokenlake-test-caches-"))
CACHE_ENV = {
    "HF_HOME": CACHE_ROOT / "hf",
    "HF_HUB_CACHE": CACHE_ROOT / "hf" / "hub",
    "HUGGINGFACE_HUB_CACHE": CACHE_ROOT / "hf" / "hub",  # the older name of HF_HUB_CACHE
    "HF_DATASETS_CACHE": CACHE_ROOT / "hf" / "datasets",
    "HF_XET_CACHE": CACHE_ROOT / "hf" / "xet",
    "TORCH_HOME": CACHE_ROOT / "torch",
    "XDG_CACHE_HOME": CACHE_ROOT / "xdg",  # torch's fallback and other libraries' default
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update({k: str(v) for k, v in CACHE_ENV.items()})
os.environ.update(OFFLINE_ENV)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ENV = "TOKENLAKE_IMAGENET_SAMPLE"
DEV_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"  # tests only: users lack it


def pytest_unconfigure(config):
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """The session's folder that every Hugging Face and torch cache variable points into."""
    return CACHE_ROOT


@pytest.fixture(scope="session")
def image_helpers():
    from tokenlake.extract import testing

    return testing


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    sample = os.environ.get(SAMPLE_ENV) or str(DEV_SAMPLE)
    if not (Path(sample) / "labels.csv").is_file():
        pytest.skip(f"real photographs not found at {SAMPLE_ENV}={sample}")
    return Path(sample)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach a hub or a user cache, even after another test changed the variables."""
    for k, v in {**CACHE_ENV, **OFFLINE_ENV}.items():
        monkeypatch.setenv(k, str(v))

"""Tests never read or write the user's caches (tests/conftest.py): the Hugging Face and torch
libraries, as imported by the tests, resolve every cache into the session's temporary folder."""

from __future__ import annotations

import os
from pathlib import Path


def _inside(path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_library_caches_are_under_the_session_folder(cache_root):
    import datasets.config
    import huggingface_hub.constants as hub
    import torch.hub

    assert cache_root.name.startswith("tokenlake-test-caches-")
    for name, path in {"datasets": datasets.config.HF_DATASETS_CACHE,
                       "datasets modules": datasets.config.HF_MODULES_CACHE,
                       "hub": hub.HF_HUB_CACHE, "hub home": hub.HF_HOME,
                       "hub token": hub.HF_TOKEN_PATH, "torch hub": torch.hub.get_dir()}.items():
        assert _inside(path, cache_root), f"{name} cache {path} is outside {cache_root}"
    assert hub.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_environment_points_into_the_session_folder(cache_root):
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TORCH_HOME", "XDG_CACHE_HOME"):
        assert _inside(os.environ[var], cache_root), var
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"

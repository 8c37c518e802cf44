"""tokenlake.extract: the only code that runs a backbone. Images in, one run in the lake out.

Needs the `extract` extra (torch, torchvision, timm, datasets): `pip install 'tokenlake[extract]'`.
Names are imported on first use (PEP 562); reading one without the extra installed raises
ModuleNotFoundError naming the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (private module, attribute)
_EXPORTS = {
    "Adapter": ("_adapters", "Adapter"),
    "TokenLayout": ("_adapters", "TokenLayout"),
    "build_pixels": ("_api", "build_pixels"),
    "library_versions": ("_api", "library_versions"),
    "DecodedImage": ("_decode", "DecodedImage"),
    "ImageRejected": ("_decode", "ImageRejected"),
    "decode_image": ("_decode", "decode_image"),
    "extract": ("_job", "extract"),
    "ALIASES": ("_models", "ALIASES"),
    "ModelRequestError": ("_models", "ModelRequestError"),
    "ModelSpec": ("_models", "ModelSpec"),
    "all_aliases": ("_models", "all_aliases"),
    "create_backbone": ("_models", "create_backbone"),
    "meta_backbone": ("_models", "meta_backbone"),
    "resolve_model": ("_models", "resolve_model"),
    "resolve_weights": ("_models", "resolve_weights"),
    "ExtractRequest": ("_plan", "ExtractRequest"),
    "default_run_name": ("_plan", "default_run_name"),
    "plan": ("_plan", "plan"),
    "Family": ("_registry", "Family"),
    "family_of": ("_registry", "family_of"),
    "make_adapter": ("_registry", "make_adapter"),
    "model_families": ("_registry", "model_families"),
    "register_family": ("_registry", "register"),
    "Source": ("_sources", "Source"),
    "SourceError": ("_sources", "SourceError"),
    "SourceRecord": ("_sources", "SourceRecord"),
    "open_source": ("_sources", "open_source"),
    "draw_subset": ("_subsets", "draw_subset"),
    # input recipes and the pixel store
    "DataConfig": ("_preprocess", "DataConfig"),
    "data_config": ("_preprocess", "data_config"),
    "find_pixel_store": ("_pixelstore", "find_pixel_store"),
    "build_pixel_store": ("_pixelstore", "build_pixel_store"),
    "check_decoder": ("_tvdecode", "check_decoder"),
    "mlp_specs": ("_neuronstats", "mlp_specs"),
    # extraction as resumable work: what `tokenlake run` schedules, locally or on SLURM
    "extract_here": ("_job", "extract_here"),
    "commit_run": ("_job", "commit_run"),
    "ShardWork": ("_scale", "ShardWork"),
    "shard_groups": ("_scale", "shard_groups"),
    "SlurmOptions": ("_slurmopts", "SlurmOptions"),
    "slurm_options": ("_slurmopts", "slurm_options"),
    "ClusterStep": ("_cluster", "ClusterStep"),
    "Driver": ("_cluster", "Driver"),
    "check_scheduler": ("_cluster", "check_scheduler"),
    "run_recorded": ("_tasks", "run_recorded"),
    # the runner's records under LAKE/.tokenlake/jobs/ (no torch: `tokenlake status` reads them)
    "Submission": ("_records", "Submission"),
    "job_events": ("_records", "events"),
    "job_failure": ("_records", "failure"),
    "jobs_root": ("_records", "jobs_root"),
    "pid_alive": ("_records", "pid_alive"),
    "retries_used": ("_records", "retries_used"),
}
# what the `extract` extra installs (pyproject.toml), by import name
EXTRA_MODULES = ("torch", "torchvision", "timm", "datasets")

__all__ = [
    "ALIASES",
    "Adapter",
    "ClusterStep",
    "DataConfig",
    "DecodedImage",
    "Driver",
    "ExtractRequest",
    "Family",
    "ImageRejected",
    "ModelRequestError",
    "ModelSpec",
    "ShardWork",
    "SlurmOptions",
    "Source",
    "SourceError",
    "SourceRecord",
    "Submission",
    "TokenLayout",
    "all_aliases",
    "build_pixel_store",
    "build_pixels",
    "check_decoder",
    "check_scheduler",
    "commit_run",
    "create_backbone",
    "data_config",
    "decode_image",
    "default_run_name",
    "draw_subset",
    "extract",
    "extract_here",
    "family_of",
    "find_pixel_store",
    "job_events",
    "job_failure",
    "jobs_root",
    "library_versions",
    "make_adapter",
    "meta_backbone",
    "mlp_specs",
    "model_families",
    "open_source",
    "pid_alive",
    "plan",
    "register_family",
    "resolve_model",
    "resolve_weights",
    "retries_used",
    "run_recorded",
    "shard_groups",
    "slurm_options",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in EXTRA_MODULES:
            raise
        raise ModuleNotFoundError(
            f"tokenlake.extract needs the 'extract' extra ({err.name} is not installed): "
            "pip install 'tokenlake[extract]'", name=err.name) from err
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
    from tokenlake.extract._adapters import Adapter, TokenLayout
    from tokenlake.extract._api import build_pixels, library_versions
    from tokenlake.extract._decode import DecodedImage, ImageRejected, decode_image
    from tokenlake.extract._job import extract
    from tokenlake.extract._models import (
        ALIASES,
        ModelRequestError,
        ModelSpec,
        all_aliases,
        create_backbone,
        meta_backbone,
        resolve_model,
        resolve_weights,
    )
    from tokenlake.extract._plan import ExtractRequest, default_run_name, plan
    from tokenlake.extract._registry import Family, family_of, make_adapter, model_families
    from tokenlake.extract._registry import register as register_family
    from tokenlake.extract._sources import Source, SourceError, SourceRecord, open_source
    from tokenlake.extract._subsets import draw_subset

"""tokenlake.extract: the only code that runs a backbone. Images in, one run in the lake out."""

from tokenlake.extract._adapters import Adapter, TokenLayout
from tokenlake.extract._decode import DecodedImage, ImageRejected, decode_image
from tokenlake.extract._job import extract
from tokenlake.extract._models import (
    ALIASES,
    ModelRequestError,
    ModelSpec,
    create_backbone,
    resolve_model,
    resolve_weights,
)
from tokenlake.extract._plan import ExtractRequest, default_run_name, plan
from tokenlake.extract._registry import Family, family_of, make_adapter, model_families
from tokenlake.extract._registry import register as register_family
from tokenlake.extract._sources import Source, SourceError, SourceRecord, open_source
from tokenlake.extract._subsets import draw_subset

__all__ = [
    "ALIASES",
    "Adapter",
    "DecodedImage",
    "ExtractRequest",
    "Family",
    "ImageRejected",
    "ModelRequestError",
    "ModelSpec",
    "Source",
    "SourceError",
    "SourceRecord",
    "TokenLayout",
    "create_backbone",
    "decode_image",
    "default_run_name",
    "draw_subset",
    "extract",
    "family_of",
    "make_adapter",
    "model_families",
    "open_source",
    "plan",
    "register_family",
    "resolve_model",
    "resolve_weights",
]

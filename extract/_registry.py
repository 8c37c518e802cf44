"""Which model families tokenlake can extract from: one registry, filled by extract/families/.

A family is one adapter (extract/_adapters.py's contract) and the timm classes it serves, with a
predicate where one class covers several layouts (a ViT with an attention-pooling head is not read
like one without). Each module of extract/families/ registers its families when imported, so
adding a family is a new module there (or, from outside, one `register` call) plus its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokenlake.extract._adapters import Adapter

OPTIONS = ("blocks", "record_mlp", "ttreg")  # what a family may support beyond the basics


@dataclass(frozen=True)
class Family:
    name: str  # e.g. "vit", "eva", "swin"
    adapter: type[Adapter]
    classes: tuple[str, ...]  # timm model class names (type(model).__name__)
    description: str
    attention: str  # what tokens.attn holds for this family
    supports: frozenset[str] = frozenset()  # subset of OPTIONS
    # where one class covers several layouts: only models it accepts; checked before the
    # families without a predicate, so a specific family wins over a generic one
    predicate: Callable[[torch.nn.Module], bool] | None = None
    traps: str = ""  # what to know when extracting from it (docs/MODELS.md has the long form)
    # model aliases this family brings: (alias, "timm_name.tag", native resolution in px)
    aliases: tuple[tuple[str, str, int], ...] = ()
    extra: dict = field(default_factory=dict)  # anything a listing wants to show


_FAMILIES: dict[str, Family] = {}
_LOADED = False


def register(family: Family) -> Family:
    """Add (or replace, by name) a family; returns it, so it can decorate nothing else."""
    unknown = set(family.supports) - set(OPTIONS)
    if unknown:
        raise ValueError(f"family {family.name!r}: unknown options {sorted(unknown)}; known "
                         f"{OPTIONS}")
    if not issubclass(family.adapter, Adapter):
        raise TypeError(f"family {family.name!r}: adapter must subclass tokenlake's Adapter")
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    """Import every module of extract/families/ once: each registers its families."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("tokenlake.extract.families")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def model_families() -> list[Family]:
    _load()
    return sorted(_FAMILIES.values(), key=lambda f: f.name)


def family_of(model: torch.nn.Module) -> Family:
    """The family that extracts from `model`; ValueError naming the known ones otherwise."""
    name = type(model).__name__
    candidates = [f for f in model_families() if name in f.classes]
    for f in sorted(candidates, key=lambda f: f.predicate is None):
        if f.predicate is None or f.predicate(model):
            return f
    known = "; ".join(f"{f.name} ({', '.join(f.classes)})" for f in model_families())
    raise ValueError(
        f"tokenlake does not know how to extract tokens from a {name}. Known families: {known}. "
        "To add one, write an Adapter subclass (extract/_adapters.py says what it returns) and "
        "register it: a module in extract/families/ calling tokenlake.extract.register_family("
        "Family(...)) (see extract/families/vit.py), with a test that recomputes its numbers "
        "from the model's parameters (tests/test_adapters.py)")


FLAGS = {"blocks": "--blocks all", "record_mlp": "--record-mlp", "ttreg": "--test-time-registers"}


def supported_family(model: torch.nn.Module, *, blocks: bool = False, record_mlp: bool = False,
                     ttreg: bool = False) -> Family:
    """`model`'s family, after refusing by name the options it does not support."""
    family = family_of(model)
    asked = {"blocks": blocks, "record_mlp": record_mlp, "ttreg": ttreg}
    missing = [k for k, on in asked.items() if on and k not in family.supports]
    if missing:
        raise ValueError(
            f"{', '.join(FLAGS[k] for k in missing)}: not implemented for the {family.name} "
            f"family ({type(model).__name__}); `tokenlake models` lists what each family supports")
    return family


def make_adapter(model: torch.nn.Module, *, img_size: int, blocks: bool = False,
                 record_mlp=None, ttreg: list[tuple[int, int]] | None = None) -> Adapter:
    """The adapter of `model`'s family; options it does not support are refused by name."""
    family = supported_family(model, blocks=blocks, record_mlp=record_mlp is not None,
                              ttreg=ttreg is not None)
    opts: dict = {}
    if record_mlp is not None:
        opts["record_mlp"] = record_mlp
    if ttreg is not None:
        opts["ttreg"] = ttreg
    return family.adapter(model, img_size=img_size, blocks=blocks, **opts)

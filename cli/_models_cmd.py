"""`tokenlake models`: the model families tokenlake extracts from, and every alias with its layout.

Each alias's token layout comes from a weightless model on the meta device
(extract/_models.py `meta_backbone`) read by its family's adapter, so the listing is what an
extraction would see, without weights or a forward pass. The paper's aliases
(extract/_models.py `ALIASES`) belong to the family that extracts their model class; the others
are declared by their family (`Family.aliases`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from tokenlake.extract import Family, family_of, make_adapter, model_families
from tokenlake.extract._registry import FLAGS  # option -> its flag: command-line text only


@dataclass(frozen=True)
class AliasRow:
    alias: str
    timm_name: str  # without the tag
    tag: str  # the pretrained tag ("" when the name has none)
    img_size: int  # native resolution, px
    family: str | None  # the family that extracts the model (None: none does, see `error`)
    declared_by: str | None  # the family whose `aliases` list it; None for the paper's
    n_cls: int | None = None
    n_reg: int | None = None  # trained registers / storage tokens
    grid: tuple[int, int] | None = None
    error: str | None = None  # why the layout could not be read


def alias_rows(family: str | None = None) -> list[AliasRow]:
    """One row per alias (the paper's and every family's), layout from a meta-device model.
    family: skip the aliases other families declare (the paper's are always read: their family
    is known only from the model's class)."""
    from tokenlake.extract import ALIASES, all_aliases, meta_backbone

    declared = {a: f.name for f in model_families() for a, _, _ in f.aliases}
    rows = []
    for alias, spec in all_aliases().items():
        if family is not None and alias not in ALIASES and declared.get(alias) != family:
            continue
        name, _, tag = spec.timm_name.partition(".")
        base = {"alias": alias, "timm_name": name, "tag": tag, "img_size": spec.img_size,
                "declared_by": None if alias in ALIASES else declared.get(alias)}
        try:
            model = meta_backbone(spec, spec.img_size)
            fam = family_of(model)
            adapter = make_adapter(model, img_size=spec.img_size)
            adapter.close()
        except Exception as err:  # noqa: BLE001 - shown in the listing, row by row
            rows.append(AliasRow(**base, family=None, error=f"{type(err).__name__}: {err}"))
            continue
        lay = adapter.layout
        rows.append(AliasRow(**base, family=fam.name, n_cls=lay.n_cls, n_reg=lay.n_reg,
                             grid=lay.grid))
    return rows


def _options(fam: Family) -> str:
    return ", ".join(FLAGS[k] for k in FLAGS if k in fam.supports) or "none beyond the basics"


def _table(rows: list[AliasRow]) -> list[str]:
    head = ("alias", "timm name", "tag", "px", "CLS", "reg", "patches", "tokens")
    body = []
    for r in rows:
        if r.error is not None:
            body.append((r.alias, r.timm_name, r.tag or "-", str(r.img_size), "", "", "",
                         f"layout unavailable: {r.error[:80]}"))
            continue
        gh, gw = r.grid
        body.append((r.alias, r.timm_name, r.tag or "-", str(r.img_size), str(r.n_cls),
                     str(r.n_reg), f"{gh}x{gw}={gh * gw}", str(r.n_cls + r.n_reg + gh * gw)))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    right = {3, 4, 5, 7}  # numbers

    def line(cells) -> str:
        out = [c.rjust(w) if i in right and not c.startswith("layout") else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "    " + "  ".join(out).rstrip()

    return [line(head), *(line(b) for b in body)]


def describe(family: str | None = None) -> str:
    """The listing `tokenlake models [--family NAME]` prints."""
    families = model_families()
    if family is not None and family not in {f.name for f in families}:
        raise ValueError(f"--family {family!r}: no such family; known: "
                         f"{', '.join(f.name for f in families)}")
    rows = alias_rows(family)
    out: list[str] = []
    for fam in families:
        if family is not None and fam.name != family:
            continue
        mine = [r for r in rows if r.family == fam.name
                or (r.family is None and r.declared_by == fam.name)]
        out.append(f"{fam.name}: {fam.description}")
        for key, text in (("timm classes", ", ".join(fam.classes)),
                          ("selected by", "a predicate on the model (checked before the families "
                                          "without one)" if fam.predicate else "class"),
                          ("attention", fam.attention), ("options", _options(fam)),
                          ("traps", fam.traps or "-")):
            out.append(textwrap.fill(text, width=100, initial_indent=f"  {key + ':':<14}",
                                     subsequent_indent=" " * 16, break_on_hyphens=False))
        if mine:
            out.append(f"  aliases ({len(mine)}; CLS, reg = registers or storage tokens, from "
                       "the model at its native resolution):")
            out.extend(_table(mine))
        else:
            out.append("  aliases: none (any timm name of its classes works)")
        moved = [r.alias for r in mine if r.declared_by not in (None, fam.name)]
        if moved:
            out.append(f"  note: {', '.join(moved)} are declared by another family but extracted "
                       "by this one")
        out.append("")
    orphans = [r for r in rows if r.family is None and r.declared_by is None]
    if orphans and family is None:
        out.append("aliases no family extracts:")
        out.extend(_table(orphans))
        out.append("")
    out.append("Any timm name works as --model too (its family is found from the model class); "
               "docs/MODELS.md has the traps of each family.")
    return "\n".join(out)

"""Shared plumbing of the analysis jobs: which runs, their manifests, named queries, table output.

analyze/ reads the lake only through `tokenlake.store` (SQL, gathers, manifests); it never imports a
backbone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tokenlake import sql as tsql
from tokenlake.store import Lake, LakeError, export_documented, open_lake

# Known families, in the order figures list them. dinov3_*, eva02_*, radio_*, siglip_* and aimv2_*
# are the aliases of the later families (DINOv3 always has its 4 storage registers: no _reg4 twin).
FAMILIES = ("dinov2_reg4", "dinov2", "dino", "clip", "deit3", "pvt", "swinv2", "dinov3", "eva02",
            "radio", "siglip", "aimv2")


def family_of(model: str | None) -> str:
    """Model family from a model alias: dinov2_*_reg4 -> 'dinov2_reg4', dinov2_g -> 'dinov2',
    dinov3_l -> 'dinov3', ...; an unknown alias gives its first word (timm names included)."""
    m = (model or "unknown").lower()
    if m.startswith("dinov2") and m.endswith("_reg4"):
        return "dinov2_reg4"
    for f in FAMILIES[1:]:
        if m == f or m.startswith(f + "_"):
            return f
    return re.split(r"[_\-.]", m, maxsplit=1)[0]


@dataclass
class RunInfo:
    """What the analyses need to know about one complete run (from its manifest)."""

    run: str
    model: str
    random_weights: bool
    params: int | None
    img_size: int | None
    subset: str | None
    weights: str | None
    layout: dict[str, Any] = field(default_factory=dict)  # manifest['token_layout'] if present
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def label(self) -> str:
        px = f" @{self.img_size}px" if self.img_size else ""
        return f"{self.run}  [{self.model}{px}]"

    @property
    def hierarchical(self) -> bool:
        return self.layout.get("family") in ("swin", "pvt") or self.family in ("swinv2", "pvt")


def _field(m: dict[str, Any], key: str) -> Any:
    if key in m:
        return m[key]
    cfg = m.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else None


def as_lake(lake: str | Path | Lake) -> Lake:
    return lake if isinstance(lake, Lake) else open_lake(lake)


def run_info(lk: Lake, run: str) -> RunInfo:
    m = lk.manifest(run)
    rw = _field(m, "random_weights")
    params = _field(m, "params")
    return RunInfo(
        run=run,
        model=str(_field(m, "model") or run),
        random_weights=bool(rw) if rw is not None else False,
        params=int(params) if params is not None else None,
        img_size=_field(m, "img_size"),
        subset=_field(m, "subset"),
        weights=_field(m, "weights"),
        layout=dict(_field(m, "token_layout") or {}),
        manifest=m,
    )


def resolve_runs(lk: Lake, runs: list[str] | str | None) -> list[RunInfo]:
    """Complete runs to analyse: `runs` (list or comma string) or every complete run, sorted."""
    if isinstance(runs, str):
        runs = [r.strip() for r in runs.split(",") if r.strip()]
    if not runs:
        runs = [r["run"] for r in lk.runs()]
    if not runs:
        raise LakeError(f"no complete runs in {lk.path}: extract one first (`tokenlake extract`)")
    return [run_info(lk, r) for r in runs]  # manifest() raises UnknownRun with the known names


def query(lk: Lake, name: str, params: list[Any]) -> pa.Table:
    """Run the named query sql/queries/<name>.sql with positional parameters."""
    return lk.sql(tsql.query_text(name), params=params)


def thresholds(lk: Lake, infos: list[RunInfo], percentile: float) -> dict[str, float]:
    t = query(lk, "analysis_thresholds", [[i.run for i in infos], float(percentile)])
    return dict(zip(t.column("run").to_pylist(), t.column("threshold").to_pylist()))


def out_dir(lk: Lake, out: str | Path | None) -> Path:
    p = Path(out) if out is not None else lk.path / "analysis"
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_table(table: pa.Table, out: Path, name: str, *, meta: dict[str, Any]) -> dict[str, str]:
    """Write `name`.parquet (definitions in the schema metadata), `name`.csv and `name`.md."""
    export_documented(table, out, name, meta=meta)
    return {"parquet": str(out / f"{name}.parquet"), "csv": str(out / f"{name}.csv")}


def add_run_columns(table: pa.Table, infos: dict[str, RunInfo]) -> pa.Table:
    """Append model, family, params, random_weights columns by joining on `run`."""
    runs = table.column("run").to_pylist()
    get = lambda r, k: getattr(infos[r], k) if r in infos else None
    table = table.append_column("model", pa.array([get(r, "model") for r in runs], pa.string()))
    table = table.append_column("family", pa.array([get(r, "family") for r in runs], pa.string()))
    table = table.append_column("params", pa.array([get(r, "params") for r in runs], pa.int64()))
    return table.append_column(
        "random_weights", pa.array([get(r, "random_weights") for r in runs], pa.bool_())
    )


def command(job: str, lake: Path, out: Path, runs: list[RunInfo], percentile: float) -> str:
    names = ",".join(i.run for i in runs)
    pct = "" if percentile == 0.98 else f" --percentile {percentile}"
    return f"tokenlake analyze {job} --lake {lake} --runs {names} --out {out}{pct}"

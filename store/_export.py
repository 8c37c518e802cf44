"""Query results and analysis tables leaving the lake: Parquet, CSV and JSON for other tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("parquet", "csv", "json")


def export_table(table: pa.Table, path: str | Path | None, *, format: str) -> str | None:
    """Write `table` to `path` in `format`; with no path (csv, json) return the text instead."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "parquet":
        if path is None:
            raise ValueError("Parquet output needs a file path (--output FILE)")
        pq.write_table(table, path)
        return None
    if format == "csv":
        import polars as pl  # quotes only where needed, unlike pyarrow's csv writer

        text = pl.from_arrow(table).write_csv()
    else:
        text = json.dumps(table.to_pylist(), default=str, indent=1)
    if path is None:
        return text
    Path(path).write_text(text, encoding="utf-8")
    return None


def export_documented(table: pa.Table, out: Path, name: str, *, meta: dict[str, Any]) -> None:
    """`name`.parquet (definitions in its schema metadata), `name`.csv and a `name`.md note."""
    md = {b"tokenlake.analysis": json.dumps(meta, default=str).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **md})
    export_table(table, out / f"{name}.parquet", format="parquet")
    export_table(table, out / f"{name}.csv", format="csv")  # quoted only where needed
    lines = [f"# {name}", "", str(meta.get("description", "")).strip(), ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if k != "description"]
    lines += ["", "Columns: " + ", ".join(f"`{c}`" for c in table.column_names), ""]
    (out / f"{name}.md").write_text("\n".join(lines), encoding="utf-8")

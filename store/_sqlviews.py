"""The confined, read-only DuckDB connection with the lake's views."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenlake import sql as sqlpkg
from tokenlake.store._errors import ReadOnlyQuery
from tokenlake.store._neurons import neurons_view
from tokenlake.store._probes import probe_results_view
from tokenlake.store._schema import TABLE_SCHEMAS

if TYPE_CHECKING:  # imported by the functions that run SQL: writing a run never needs it
    import duckdb

_DUCK_TYPES = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int16(): "SMALLINT",
    pa.float32(): "FLOAT",
    pa.string(): "VARCHAR",
}
RUNS_COLUMNS = [
    ("run", "VARCHAR"),
    ("model", "VARCHAR"),
    ("timm_name", "VARCHAR"),
    ("img_size", "INTEGER"),
    ("subset", "VARCHAR"),
    ("policy", "VARCHAR"),
    ("weights", "VARCHAR"),
    ("random_weights", "BOOLEAN"),
    ("n_images", "BIGINT"),
    ("n_errors", "BIGINT"),
    ("n_tokens", "BIGINT"),
    ("threshold_run", "VARCHAR"),
]
RUN_TABLES = ("images", "tokens", "errors", "blocks")
_COMMENTS = re.compile(r"^\s*(--[^\n]*\n|/\*.*?\*/|\s)*", re.DOTALL)
_EXPLAIN = re.compile(r"^explain\s*(analy[sz]e\b\s*)?(\([^)]*\)\s*)?", re.IGNORECASE)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def manifest_field(m: dict[str, Any], key: str) -> Any:
    """Descriptive fields may sit at the manifest's top level or under 'config'."""
    if key in m:
        return m[key]
    cfg = m.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else None


def _runs_row(run: str, m: dict[str, Any]) -> list[Any]:
    g = lambda k: manifest_field(m, k)
    rw = g("random_weights")
    return [
        run,
        g("model"),
        g("timm_name"),
        g("img_size"),
        g("subset"),
        g("policy"),
        g("weights"),
        None if rw is None else bool(rw),
        m["n_images"],
        m["n_errors"],
        m["n_tokens"],
        g("outlier_ref") or run,
    ]


def _table_view(table: str, lake: Path, manifests: dict[str, dict[str, Any]]) -> str:
    schema = TABLE_SCHEMAS[table]
    parts = []
    for run, m in sorted(manifests.items()):
        files = [
            lake / "runs" / run / s["files"][table] for s in m["shards"] if table in s["files"]
        ]
        if files:
            cols = ", ".join(f'"{c}"' for c in schema.names)
            flist = ", ".join(_lit(str(f)) for f in files)
            parts.append(f"SELECT {_lit(run)}::VARCHAR AS run, {cols} FROM read_parquet([{flist}])")
    if not parts:
        cols = ", ".join(f'NULL::{_DUCK_TYPES[f.type]} AS "{f.name}"' for f in schema)
        parts.append(f"SELECT NULL::VARCHAR AS run, {cols} WHERE false")
    return f"CREATE VIEW {table} AS " + "\nUNION ALL\n".join(parts)


def connect(lake: Path, manifests: dict[str, dict[str, Any]]) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection: base views, the views of tokenlake.sql, then locked down."""
    import duckdb

    con = duckdb.connect(":memory:")
    cols = ", ".join(f"{n} {t}" for n, t in RUNS_COLUMNS)
    con.execute(f"CREATE TABLE runs ({cols})")
    rows = [_runs_row(r, m) for r, m in sorted(manifests.items())]
    if rows:
        con.executemany(f"INSERT INTO runs VALUES ({', '.join('?' * len(RUNS_COLUMNS))})", rows)
    for table in RUN_TABLES:
        con.execute(_table_view(table, lake, manifests))
    con.execute(probe_results_view(lake))
    con.execute(neurons_view(lake))
    for name in sqlpkg.view_names():
        con.execute(sqlpkg.view_text(name))
    # Order matters: allowed_directories must be set while external access is still enabled.
    con.execute(f"SET allowed_directories = [{_lit(str(lake) + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse anything but SELECT / EXPLAIN SELECT (EXPLAIN ANALYZE runs its statement)."""
    import duckdb

    read_only = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
    stmts = con.extract_statements(query)
    if len(stmts) != 1:
        raise ReadOnlyQuery(f"tokenlake sql takes exactly one statement, got {len(stmts)}")
    st = stmts[0]
    if st.type == duckdb.StatementType.EXPLAIN:
        body = _COMMENTS.sub("", query, count=1)
        inner = _EXPLAIN.sub("", body, count=1)
        if (
            inner == body
            or len(con.extract_statements(inner)) != 1
            or con.extract_statements(inner)[0].type != duckdb.StatementType.SELECT
        ):
            raise ReadOnlyQuery(
                "tokenlake sql is read-only: EXPLAIN is allowed on SELECT statements only"
            )
    elif st.type not in read_only:
        raise ReadOnlyQuery(
            f"tokenlake sql is read-only: {st.type.name} statements are refused; "
            f"only SELECT (and EXPLAIN SELECT) may run"
        )

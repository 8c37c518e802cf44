"""The confined, read-only DuckDB connection with the lake's views.

Nothing a query can reach can be written: every relation of the catalog is a view over Parquet
files that committed manifests list (or that probes/ and neurons/ hold) or over constants (`runs`),
so no INSERT, UPDATE or DELETE has a target; `check_read_only` refuses every statement but SELECT
(and EXPLAIN of one) and every data-modifying or COPY clause anywhere in its parse tree (a `WITH x
AS (DELETE ... RETURNING ...)`, a `WITH x AS (COPY ... TO ...)`); file access is confined to the
lake directory, DuckDB's temporary directory included, and the configuration is locked.

Each run's files are bound per run: the base views are a UNION ALL with one branch per run whose
`run` column is a constant, so DuckDB drops the branches a `WHERE run = ...` (or a join on such a
filter) excludes before reading anything. A damaged run (a file its manifest lists is missing, its
manifest cannot be read, or DuckDB cannot bind its files) gets a branch that raises an error naming
it and `tokenlake validate` when, and only when, a query reaches it; the other runs answer normally.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenlake import sql as sqlpkg
from tokenlake.store._errors import DamagedRun, ReadOnlyQuery
from tokenlake.store._neurons import neurons_select, neurons_sources, neurons_view
from tokenlake.store._probes import (
    probe_results_select,
    probe_results_sources,
    probe_results_view,
)
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
# per run: the patch-token norms its outlier threshold is the 98th percentile of (those of its
# threshold_run), labelled with the run, so that a filter on `run` reaches the threshold's scan
THRESHOLD_NORMS_COLUMNS = [("run", "VARCHAR"), ("threshold_run", "VARCHAR"), ("norm", "FLOAT")]
_COMMENTS = re.compile(r"^\s*(--[^\n]*\n|/\*.*?\*/|\s)*", re.DOTALL)
_EXPLAIN = re.compile(r"^explain\s*(analy[sz]e\b\s*)?(\([^)]*\)\s*)?", re.IGNORECASE)
_FILE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*\.parquet"
# the parse-tree nodes a read-only statement is made of (DuckDB's QueryNodeType); anything else
# (INSERT_QUERY_NODE, UPDATE_QUERY_NODE, DELETE_QUERY_NODE, COPY_QUERY_NODE, ...) is refused
_READ_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
DAMAGE_TAG = "tokenlake: "  # how the message of every error() branch starts (Lake.sql reads it)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def duck_path(path: str | Path) -> str:
    """`path` as DuckDB's file readers take it literally: they expand glob patterns (and a path
    with `[`, `*` or `?` that also matches another file silently reads that one), so each glob
    character is put in brackets, which match exactly that character."""
    return re.sub(r"[\[*?]", lambda m: f"[{m.group(0)}]", str(path))


def file_list_sql(folder: Path, names: list[str]) -> str:
    """A DuckDB list of the files folder/NAME, written compactly (one string of names, split at
    bind time: a list of literals costs DuckDB ~2.5x more to bind on every query). Names must match
    _FILE_NAME (no comma)."""
    prefix = _lit(duck_path(folder) + "/")
    return f"[{prefix} || f FOR f IN string_split({_lit(','.join(names))}, ',')]"


def paths_list_sql(paths: Iterable[Path]) -> str:
    """A DuckDB list of these files, each taken literally (for a handful of files)."""
    return "[" + ", ".join(_lit(duck_path(p)) for p in paths) + "]"


def error_branch(columns: Iterable[tuple[str, str]], message: str, *, run: str | None) -> str:
    """A SELECT with `columns` that raises `message` when a query reaches it: `run` (when given) is
    a constant, so a filter on another run drops the branch unread; every other column is the
    error itself, so no filter on them can be decided (and the branch dropped) before it runs."""
    e = f"error({_lit(message)})"
    cols = [f"{_lit(run)}::VARCHAR AS run" if n == "run" and run is not None
            else f'{e}::{t} AS "{n}"' for n, t in columns]
    return f"SELECT {', '.join(cols)} FROM range(1) WHERE {e} IS NULL"


def empty_select(columns: Iterable[tuple[str, str]]) -> str:
    return "SELECT " + ", ".join(f'NULL::{t} AS "{n}"' for n, t in columns) + " WHERE false"


def damage_message(lake: Path, run: str, problem: str, *, threshold_of: str | None = None) -> str:
    why = (f" (its patch-token norms set the outlier threshold of run {threshold_of!r})"
           if threshold_of else "")
    return (f"{DAMAGE_TAG}run {run!r} is damaged{why}: {problem}. Its rows cannot be read; queries "
            f"that do not reach it still answer. `tokenlake validate --lake {shlex.quote(str(lake))} "
            f"--runs {shlex.quote(run)}` "
            "checks every file of it.")


def damaged_run(message: str) -> DamagedRun:
    """The DamagedRun of a DuckDB error raised by a damaged run's branch (error_branch)."""
    text = message[message.index(DAMAGE_TAG):]
    m = re.search(r"\brun '([^']*)' is damaged|\bof run '([^']*)'|neurons/(.*?)\.parquet", text)
    return DamagedRun(text, run=next((g for g in m.groups() if g), None) if m else None)


def damaged_file(lake: Path, run: str | None, rel: str, message: str) -> DamagedRun:
    """The DamagedRun of a DuckDB error on a file a view reads (found by Views.lake_file)."""
    what = message.strip().splitlines()[0]
    if run is None:
        return DamagedRun(f"{DAMAGE_TAG}{rel} cannot be read ({what})", run=None)
    return DamagedRun(damage_message(lake, run, f"reading {rel} failed ({what})"), run=run)


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


def _sql_value(value: Any, typ: str, what: str) -> str:
    if value is None:
        return f"NULL::{typ}"
    if typ == "BOOLEAN":
        return "true" if value else "false"
    if typ in ("INTEGER", "BIGINT"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"manifest.json's {what} is {value!r}, not an integer")
        return f"{value}::{typ}"
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return f"{_lit(value)}::{typ}"


@dataclass
class RunFiles:
    """What the views read of one complete run: file names per table (within runs/RUN/TABLE/),
    its `runs` row, and why it is damaged (None: it is not)."""

    run: str
    manifest: dict[str, Any] | None
    files: dict[str, list[str]] = field(default_factory=dict)
    problem: str | None = None

    @property
    def threshold_run(self) -> str | None:
        if self.manifest is None:
            return None
        return manifest_field(self.manifest, "outlier_ref") or self.run


def scan_runs(lake: Path, manifests: Mapping[str, dict[str, Any] | str]) -> dict[str, RunFiles]:
    """Each complete run's files, checked against its folders (one listing per table folder, no
    per-file call): a run whose manifest is unreadable (`manifests[run]` is then the reason) or
    lists a file that is not there is damaged, with the reason."""
    out = {}
    for run, m in sorted(manifests.items()):
        if isinstance(m, str):
            out[run] = RunFiles(run, None, problem=m)
            continue
        rf = out[run] = RunFiles(run, m)
        try:
            _sql_row(run, m)
            if not isinstance(rf.threshold_run, str):
                raise TypeError(f"its outlier_ref {rf.threshold_run!r} is not a run name")
            for s in m["shards"]:
                for table, rel in s["files"].items():
                    if table in RUN_TABLES:
                        rf.files.setdefault(table, []).append(rel)
            for table, rels in rf.files.items():  # one regex over all of a table's names
                if not _file_names(table).fullmatch(",".join(rels)):
                    bad = next(r for r in rels if not _file_names(table).fullmatch(r))
                    raise ValueError(f"it lists {bad!r} as a {table} file, not "
                                     f"{table}/<name>.parquet")
                rf.files[table] = [r[len(table) + 1:] for r in rels]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            rf.manifest, rf.files = None, {}
            rf.problem = (f"its manifest.json cannot be read: {err}" if not isinstance(err, KeyError)
                          else f"its manifest.json lacks {err}")
            continue
        for table, names in rf.files.items():
            try:
                present = set(os.listdir(lake / "runs" / run / table))
            except OSError:
                present = set()
            missing = [n for n in names if n not in present]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                rf.problem = (f"runs/{run}/{table}/{missing[0]}{more}, which its manifest lists, "
                              "is missing")
                break
    return out


@functools.cache
def _file_names(table: str) -> re.Pattern[str]:
    """`table/<name>.parquet`, comma-separated (a manifest's files of one table, joined)."""
    one = f"{table}/{_FILE_NAME}"
    return re.compile(f"{one}(?:,{one})*")


def _sql_row(run: str, m: dict[str, Any]) -> str:
    values = _runs_row(run, m)
    return "SELECT " + ", ".join(
        f"{_sql_value(v, t, n)} AS {n}" for v, (n, t) in zip(values, RUNS_COLUMNS))


def _runs_view(lake: Path, runs: dict[str, RunFiles]) -> str:
    parts = []
    for run, rf in runs.items():
        if rf.manifest is None:
            parts.append(error_branch(RUNS_COLUMNS, damage_message(lake, run, rf.problem or "?"),
                                      run=run))
        else:
            parts.append(_sql_row(run, rf.manifest))
    return "CREATE OR REPLACE VIEW runs AS " + "\nUNION ALL\n".join(parts or
                                                                    [empty_select(RUNS_COLUMNS)])


def _table_columns(table: str) -> list[tuple[str, str]]:
    return [("run", "VARCHAR")] + [(f.name, _DUCK_TYPES[f.type]) for f in TABLE_SCHEMAS[table]]


def _table_view(table: str, lake: Path, runs: dict[str, RunFiles]) -> str:
    columns = _table_columns(table)
    cols = ", ".join(f'"{n}"' for n, _ in columns[1:])
    parts = []
    for run, rf in runs.items():
        if rf.problem is not None and (rf.manifest is None or rf.files.get(table)):
            parts.append(error_branch(columns, damage_message(lake, run, rf.problem), run=run))
        elif rf.files.get(table):
            files = file_list_sql(lake / "runs" / run / table, rf.files[table])
            parts.append(f"SELECT {_lit(run)}::VARCHAR AS run, {cols} FROM read_parquet({files})")
    return f"CREATE OR REPLACE VIEW {table} AS " + "\nUNION ALL\n".join(parts or
                                                                       [empty_select(columns)])


def _threshold_norms_view(lake: Path, runs: dict[str, RunFiles]) -> str:
    parts = []
    for run, rf in runs.items():
        ref = runs.get(rf.threshold_run or run)
        if rf.problem is not None:
            parts.append(error_branch(THRESHOLD_NORMS_COLUMNS,
                                      damage_message(lake, run, rf.problem), run=run))
        elif ref is None:
            continue  # its outlier_ref names no complete run: no threshold, as no outlier
        elif ref.problem is not None:
            parts.append(error_branch(THRESHOLD_NORMS_COLUMNS, damage_message(
                lake, ref.run, ref.problem, threshold_of=run), run=run))
        elif ref.files.get("tokens"):
            files = file_list_sql(lake / "runs" / ref.run / "tokens", ref.files["tokens"])
            parts.append(f"SELECT {_lit(run)}::VARCHAR AS run, {_lit(ref.run)}::VARCHAR AS "
                         f"threshold_run, norm FROM read_parquet({files}) WHERE kind = 'patch'")
    return "CREATE OR REPLACE VIEW threshold_norms AS " + "\nUNION ALL\n".join(
        parts or [empty_select(THRESHOLD_NORMS_COLUMNS)])


@dataclass
class Views:
    """An open connection and what its views read (Lake.sql uses it to tell a damaged file of the
    lake from any other error)."""

    con: duckdb.DuckDBPyConnection
    lake: Path
    runs: dict[str, RunFiles]
    other_files: set[str]  # probe results and neuron rankings the views read

    def lake_file(self, message: str) -> tuple[str | None, str] | None:
        """(run or None, the lake-relative path) of the first file in an error `message` that a
        view reads, or None when it names none."""
        for prefix in {str(self.lake) + "/", duck_path(self.lake) + "/"}:
            start = message.find(prefix)
            while start >= 0:
                rel = re.split(r"[\"'\s]", message[start + len(prefix):], maxsplit=1)[0]
                parts = rel.split("/")
                if len(parts) == 4 and parts[0] == "runs":
                    rf = self.runs.get(parts[1])
                    if rf is not None and parts[3] in rf.files.get(parts[2], ()):
                        return parts[1], rel
                if str(self.lake / rel) in self.other_files:
                    return None, rel
                start = message.find(prefix, start + 1)
        return None


def _bind_fails(con: duckdb.DuckDBPyConnection, select: str) -> str | None:
    import duckdb

    try:
        con.execute(f"DESCRIBE {select}")
    except duckdb.Error as err:
        return str(err).splitlines()[0]
    return None


def _find_unbindable(con: duckdb.DuckDBPyConnection, lake: Path, runs: dict[str, RunFiles],
                     probes: dict[str, list[Path]], neurons: list[Path],
                     broken: dict[str, str]) -> None:
    """After a base view failed to bind: bind each run's files (and each probe/neuron source) on
    their own; those that fail are damaged, with DuckDB's reason."""
    for run, rf in runs.items():
        if rf.problem is not None:
            continue
        for table, names in rf.files.items():
            cols = ", ".join(f'"{n}"' for n, _ in _table_columns(table)[1:])
            err = _bind_fails(con, f"SELECT {cols} FROM read_parquet("
                                   f"{file_list_sql(lake / 'runs' / run / table, names)})")
            if err is not None:
                rf.problem = f"DuckDB cannot read runs/{run}/{table}/: {err}"
                break
    for key, files in probes.items():
        if key not in broken:
            err = _bind_fails(con, probe_results_select(lake, {key: files}))
            if err is not None:
                broken[key] = err
    for f in neurons:
        if str(f) not in broken:
            err = _bind_fails(con, neurons_select(lake, [f]))
            if err is not None:
                broken[str(f)] = err


def connect(lake: Path, manifests: Mapping[str, dict[str, Any] | str]) -> Views:
    """A new in-memory connection: base views, the views of tokenlake.sql, then locked down.

    `manifests`: each complete run's manifest, or the reason it cannot be read."""
    import duckdb

    # DuckDB spills to its temporary directory and allows reading it whatever
    # allowed_directories says: it is put inside the lake (created only if a query spills, removed
    # when the connection closes), so nothing outside the lake becomes readable
    tmp = lake / f".tokenlake-sql-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    con = duckdb.connect(":memory:", config={
        "temp_directory": str(tmp), "autoinstall_known_extensions": False,
        "autoload_known_extensions": False})
    runs = scan_runs(lake, manifests)
    probes = probe_results_sources(lake)
    neurons = neurons_sources(lake)
    broken: dict[str, str] = {}  # probe-result folder or neuron file -> why it cannot be read
    # The views of tokenlake.sql are created over typed empty stand-ins of the base views (binding
    # a view binds what it reads: over the real ones that is every run's files again, per view),
    # then the base views replace the stand-ins; a view is bound afresh by every query using it.
    con.execute(_runs_view(lake, {}))
    for table in RUN_TABLES:
        con.execute(_table_view(table, lake, {}))
    con.execute(_threshold_norms_view(lake, {}))
    con.execute(probe_results_view(lake, {}))
    con.execute(neurons_view(lake, []))
    for name in sqlpkg.view_names():
        con.execute(sqlpkg.view_text(name))
    for attempt in range(2):
        try:
            con.execute(_runs_view(lake, runs))
            for table in RUN_TABLES:
                con.execute(_table_view(table, lake, runs))
            con.execute(_threshold_norms_view(lake, runs))
            con.execute(probe_results_view(lake, probes, broken))
            con.execute(neurons_view(lake, neurons, broken))
            break
        except duckdb.Error:
            if attempt:
                raise
            _find_unbindable(con, lake, runs, probes, neurons, broken)
    # Order matters: allowed_directories must be set while external access is still enabled.
    # DuckDB checks the path a reader is given (for the views: the lake's path with its glob
    # characters escaped) and then each file it expands to (the lake's literal path).
    allowed = sorted({str(lake) + "/", duck_path(lake) + "/"})
    con.execute(f"SET allowed_directories = [{', '.join(map(_lit, allowed))}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    files = {str(f) for fs in probes.values() for f in fs} | {str(f) for f in neurons}
    return Views(con, lake, runs, files)


def _node_types(tree: Any, out: set[str]) -> set[str]:
    if isinstance(tree, dict):
        t = tree.get("type")
        if isinstance(t, str) and t.endswith("_NODE"):
            out.add(t)
        for v in tree.values():
            _node_types(v, out)
    elif isinstance(tree, list):
        for v in tree:
            _node_types(v, out)
    return out


def _check_tree(con: duckdb.DuckDBPyConnection, text: str) -> None:
    """Refuse a statement whose parse tree holds anything but queries (DuckDB's own parser,
    serialised by json_serialize_sql: a DELETE, INSERT, UPDATE or COPY in a WITH clause or a
    subquery is a node of its own)."""
    got = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [text]).fetchone()[0])
    if got.get("error"):
        raise ReadOnlyQuery("tokenlake sql is read-only and could not check this statement "
                            f"({got.get('error_message')}); only SELECT (and EXPLAIN SELECT) "
                            "may run")
    bad = _node_types(got, set()) - _READ_NODES
    if bad:
        what = ", ".join(sorted(b.removesuffix("_NODE").removesuffix("_QUERY") for b in bad))
        raise ReadOnlyQuery(f"tokenlake sql is read-only: {what} inside a query is refused; "
                            "only SELECT (and EXPLAIN SELECT) may run")


def _kind(statement: Any) -> Any:
    try:
        return statement.type
    except ValueError:
        return None


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse anything but one SELECT / EXPLAIN SELECT (EXPLAIN ANALYZE runs its statement), and
    any data-modifying or COPY clause anywhere inside it."""
    import duckdb

    stmts = con.extract_statements(query)
    if len(stmts) != 1:
        raise ReadOnlyQuery(f"tokenlake sql takes exactly one statement, got {len(stmts)}")
    try:
        kind = stmts[0].type
    except ValueError:  # a statement type the Python API has no name for (UPDATE EXTENSIONS)
        raise ReadOnlyQuery("tokenlake sql is read-only: this kind of statement is refused; only "
                            "SELECT (and EXPLAIN SELECT) may run") from None
    text = query
    if kind == duckdb.StatementType.EXPLAIN:
        body = _COMMENTS.sub("", query, count=1)
        text = _EXPLAIN.sub("", body, count=1)
        if (
            text == body
            or len(con.extract_statements(text)) != 1
            or _kind(con.extract_statements(text)[0]) != duckdb.StatementType.SELECT
        ):
            raise ReadOnlyQuery(
                "tokenlake sql is read-only: EXPLAIN is allowed on SELECT statements only"
            )
    elif kind != duckdb.StatementType.SELECT:
        raise ReadOnlyQuery(
            f"tokenlake sql is read-only: {kind.name} statements are refused; "
            f"only SELECT (and EXPLAIN SELECT) may run"
        )
    _check_tree(con, text)

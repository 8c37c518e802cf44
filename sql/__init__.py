"""tokenlake.sql: the lake's SQL views and named queries, one statement per .sql file.

Views are created, in `view_names()` order, on the confined DuckDB connection of
`tokenlake.store.Lake` over the base views (BASE_VIEWS: runs, images, tokens, errors, blocks,
threshold_norms, probe_results, neurons; store/SCHEMA.md, "SQL"). A view that reads one run's rows
should reach the base views only through filters on `run` (or joins on it), so that DuckDB drops
the other runs' branches unread: a damaged run raises only where a query reaches it.

Each file opens with a comment header: `-- NAME: description`, then `Columns:` and
`Parameters:`. A named query's parameters are positional (`$1`, `$2`, ...) and named in its
header (`$1 runs VARCHAR[], $2 q DOUBLE (0.98 = top 2 %)`); `query_info(name)` reads them and
`bind_params(name, {"runs": [...], "q": 0.98})` orders values for `Lake.sql(text, params=...)`:

    lake.sql(query_text("norm_summary"), params=bind_params("norm_summary", runs=["r"], q=0.98))
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

__all__ = ["BASE_VIEWS", "Param", "SqlInfo", "bind_params", "query_info", "query_names",
           "query_text", "view_info", "view_names", "view_text"]

# Dependency order: each view may use the ones before it.
_VIEWS = ("thresholds", "thresholds_at", "outliers", "emergence", "cards")
# the views tokenlake.store makes over the lake's files (store/SCHEMA.md), under those above;
# threshold_norms: per run, the patch-token norms of its threshold run (run, threshold_run, norm)
BASE_VIEWS = ("runs", "images", "tokens", "errors", "blocks", "threshold_norms", "probe_results",
              "neurons")

_SCALARS = {"VARCHAR": str, "DOUBLE": float, "FLOAT": float, "INTEGER": int, "BIGINT": int,
            "SMALLINT": int, "BOOLEAN": None}
_PARAM = re.compile(r"\$(\d+)\s+([A-Za-z_]\w*)\s+([A-Z]+(?:\[\])?)(?:\s*\(([^()]*)\))?")
_SECTION = re.compile(r"\b(Columns|Parameters|Example|Bins|Per image|One row|Outliers?):")


@dataclass(frozen=True)
class Param:
    """One positional parameter of a named query: `$index name TYPE (note)`."""

    index: int
    name: str
    type: str  # a DuckDB type, `[]` for a list
    note: str = ""

    @property
    def is_list(self) -> bool:
        return self.type.endswith("[]")

    def parse(self, text: str) -> Any:
        """The value of a command-line `--param name=TEXT`: a list is comma-separated."""
        scalar = self.type.removesuffix("[]")
        kind = _SCALARS.get(scalar)
        if scalar not in _SCALARS:
            raise ValueError(f"parameter {self.name}: type {self.type} cannot be given as text")

        def one(item: str) -> Any:
            item = item.strip()
            if kind is None:  # BOOLEAN
                if item.lower() not in ("true", "false"):
                    raise ValueError(f"parameter {self.name} ({self.type}): {item!r} is not "
                                     "true or false")
                return item.lower() == "true"
            try:
                return kind(item)
            except ValueError:
                raise ValueError(f"parameter {self.name} ({self.type}): {item!r} is not a "
                                 f"{scalar}") from None

        if self.is_list:
            return [one(x) for x in text.split(",") if x.strip()]
        return one(text)

    def usage(self) -> str:
        return f"{self.name}={self.type}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class SqlInfo:
    """What a .sql file's header says: its description, and for a named query its parameters
    (for a view, `params` is empty and `param_text` says what a table macro takes)."""

    name: str
    kind: str  # "view" | "query"
    description: str
    params: tuple[Param, ...] = ()
    param_text: str = ""  # the header's Parameters text, verbatim ("none" when it takes none)


def _read(folder: str, name: str, known: list[str]) -> str:
    name = name.removesuffix(".sql")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known: {known}"
        raise ValueError(f"no {folder[:-1]} named {name!r} in tokenlake.sql{hint}")
    return files("tokenlake.sql").joinpath(folder, f"{name}.sql").read_text(encoding="utf-8")


def view_names() -> list[str]:
    """Names of the derived views, in creation order."""
    return list(_VIEWS)


def view_text(name: str) -> str:
    """The CREATE statement of one view (`sql/views/<name>.sql`)."""
    return _read("views", name, view_names())


def query_names() -> list[str]:
    """Names of the named queries in `sql/queries/`."""
    d = files("tokenlake.sql").joinpath("queries")
    return sorted(p.name.removesuffix(".sql") for p in d.iterdir() if p.name.endswith(".sql"))


def query_text(name: str) -> str:
    """The SELECT text of a named query (`sql/queries/<name>.sql`)."""
    return _read("queries", name, query_names())


def _header(text: str) -> str:
    """The leading comment block, one line of text."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(x for x in lines if x)


def _first_sentence(text: str) -> str:
    cut = _SECTION.search(text)
    text = text[:cut.start()] if cut else text
    match = re.search(r"[.?](\s|$)", text)
    return (text[:match.start() + 1] if match else text).strip()


def _info(name: str, kind: str, text: str) -> SqlInfo:
    head = _header(text)
    if not head.startswith(name):
        raise ValueError(f"sql/{kind}s/{name}.sql: its header must start with '-- {name}'")
    body = re.sub(r"^\w+(\(\w*\))?\s*:\s*", "", head)  # `thresholds_at(q): ...`
    description = _first_sentence(body)
    param_text, params = "", ()
    if "Parameters:" in head:
        param_text = head.split("Parameters:", 1)[1].strip()
        found = [Param(int(i), n, t, (note or "").strip())
                 for i, n, t, note in _PARAM.findall(param_text)]
        if kind == "query":
            names = {p.index: p.name for p in found}  # a note's `$1` reads as the name
            found = [Param(p.index, p.name, p.type, re.sub(
                r"\$(\d+)", lambda m: names.get(int(m.group(1)), m.group(0)), p.note))
                for p in found]
            params = tuple(sorted(found, key=lambda p: p.index))
            if [p.index for p in params] != list(range(1, len(params) + 1)):
                raise ValueError(f"sql/queries/{name}.sql: parameters must be $1..$n, got "
                                 f"{[p.index for p in params]}")
            if len({p.name for p in params}) != len(params):
                raise ValueError(f"sql/queries/{name}.sql: two parameters share a name")
            n_used = max((int(i) for i in re.findall(r"\$(\d+)", _statement(text))), default=0)
            if n_used != len(params):
                raise ValueError(f"sql/queries/{name}.sql uses ${n_used} but its header names "
                                 f"{len(params)} parameter(s)")
        param_text = re.split(r"(?<=[.)])\s+(?=[A-Z])", param_text, maxsplit=1)[0]
    elif kind == "query":
        raise ValueError(f"sql/queries/{name}.sql: its header has no 'Parameters:' line")
    return SqlInfo(name, kind, description, params, param_text.rstrip("."))


def _statement(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))


def query_info(name: str) -> SqlInfo:
    """A named query's description and named parameters, from its header."""
    return _info(name.removesuffix(".sql"), "query", query_text(name))


def view_info(name: str) -> SqlInfo:
    """A view's description (and, for the table macro thresholds_at, what it takes)."""
    return _info(name.removesuffix(".sql"), "view", view_text(name))


def bind_params(name: str, values: Mapping[str, Any] | None = None, /, **more: Any) -> list[Any]:
    """The positional parameters of named query `name` from their names, in `$1, $2...` order.
    Every parameter is required; an unknown name is an error naming the known ones."""
    given = {**(values or {}), **more}
    params = query_info(name).params
    known = [p.name for p in params]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"query {name} has no parameter {', '.join(unknown)}; it takes "
                         + (", ".join(p.usage() for p in params) if params else "none"))
    missing = [p for p in params if p.name not in given]
    if missing:
        raise ValueError(f"query {name} needs " + ", ".join(p.usage() for p in missing)
                         + " (--param NAME=VALUE; lists comma-separated)")
    return [given[p.name] for p in params]

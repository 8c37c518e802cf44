"""tokenlake.sql: the lake's SQL views and named queries, one statement per .sql file.

Views are created, in `view_names()` order, on the confined DuckDB connection of
`tokenlake.store.Lake` after the base views (runs, images, tokens, errors, blocks).
"""

from __future__ import annotations

import difflib
from importlib.resources import files

__all__ = ["query_names", "query_text", "view_names", "view_text"]

# Dependency order: each view may use the ones before it.
_VIEWS = ("thresholds", "thresholds_at", "outliers", "emergence", "cards")


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

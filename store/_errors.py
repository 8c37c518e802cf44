"""Exceptions raised by tokenlake.store."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ContractError",
    "DamagedRun",
    "LakeError",
    "ReadOnlyQuery",
    "RunConfigMismatch",
    "RunExists",
    "UnknownRun",
]


class LakeError(Exception):
    """Base class of every error tokenlake.store raises on purpose."""


class ContractError(LakeError, ValueError):
    """Data handed to the store breaks the lake contract (store/SCHEMA.md)."""


class RunConfigMismatch(LakeError):
    """A run directory exists with a different resolved config or layout."""


class RunExists(LakeError):
    """A run is already complete (has a manifest) and the new request does not match it."""


class UnknownRun(LakeError, LookupError):
    """No such run in the lake."""

    def __init__(self, run: str, known: Iterable[str], *, detail: str = "") -> None:
        known = sorted(known)
        close = difflib.get_close_matches(run, known, n=3, cutoff=0.5)
        msg = f"unknown run {run!r}"
        if detail:
            msg += f" ({detail})"
        if close:
            msg += f"; did you mean {', '.join(map(repr, close))}?"
        elif known:
            shown = ", ".join(map(repr, known[:10])) + (", ..." if len(known) > 10 else "")
            msg += f"; runs in this lake: {shown}"
        else:
            msg += "; this lake has no complete runs"
        super().__init__(msg)
        self.run = run


class DamagedRun(LakeError):
    """A query reached a run (or a probe result or ranking of one) whose files are missing or
    unreadable; `run` names it (None when unknown). Queries that do not reach it still answer."""

    def __init__(self, message: str, *, run: str | None = None) -> None:
        super().__init__(message)
        self.run = run


class ReadOnlyQuery(LakeError, PermissionError):
    """A statement other than SELECT/EXPLAIN was given to Lake.sql."""

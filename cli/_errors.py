"""Errors a user can cause, as one line: what `main` prints (exit 2) instead of a traceback.

A user error is one tokenlake raises on purpose (tokenlake.store's LakeError, the ValueErrors
that check requests, a bad image source), a file-system condition of the user's paths
(permission denied, disk full, name too long, not a directory...), a missing extra, or, for
`tokenlake sql`, DuckDB refusing the user's SQL. Anything else is a bug and keeps its traceback.
Standard library only: classifying an error must not import what the command did not.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys

# the extras of pyproject.toml, by the import names a command needs from them
EXTRAS = {
    "extract": ("torch", "torchvision", "timm", "datasets", "tqdm"),
    "probes": ("torch", "tqdm"),
    "demo": ("torch", "torchvision", "timm", "datasets", "tqdm", "skimage"),
}
# sub-command -> the extra it needs (the others read the lake: the base install has them all)
COMMAND_EXTRAS = {"subset": "extract", "extract": "extract", "pixels": "extract",
                  "models": "extract", "plan": "extract", "run": "extract",
                  "probe": "probes", "demo": "demo"}
# an import name -> the extra that installs it (for a ModuleNotFoundError met while running)
_MODULE_EXTRA = {"torch": "extract", "torchvision": "extract", "timm": "extract",
                 "datasets": "extract", "tqdm": "extract", "submitit": "extract",
                 "skimage": "demo"}

# OSErrors about the user's paths and disk; others (EIO, ...) keep their traceback
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                errno.ENAMETOOLONG, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ELOOP, errno.EFBIG, errno.ENOTEMPTY, errno.EXDEV, errno.ETXTBSY}
# exception classes tokenlake raises on purpose that are not ValueErrors, as (module, class):
# looked up only in modules already imported (an error cannot come from one that is not)
_OWN = (("tokenlake.store._errors", "LakeError"), ("tokenlake.extract._sources", "SourceError"),
        ("tokenlake.extract._cuda", "BatchTooLarge"))  # an out-of-memory first batch


class CommandError(Exception):
    """A user error found by the command line itself (its message is the line printed)."""


def missing_extra(command: str) -> str | None:
    """Why `command` cannot run on this install (its extra is missing), or None."""
    extra = COMMAND_EXTRAS.get(command)
    if extra is None:
        return None
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"this command needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'tokenlake[{extra}]'")


def os_error_line(err: OSError, path: object = None) -> str:
    """`PATH: reason` for an OSError, whichever library raised it (pyarrow's carry no path)."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    where = path if path is not None else err.filename
    if where is None:
        return reason
    line = f"{where}: {reason}"
    return line + (f" -> {err.filename2}" if err.filename2 else "")


def _one_line(text: str) -> str:
    """DuckDB's messages span lines (a caret under the error's position): keep the words."""
    lines = [x.strip() for x in str(text).splitlines()]
    keep = [x for x in lines if x and not set(x) <= {"^", " "}]
    return " ".join(keep)


def _own(err: BaseException) -> bool:
    if isinstance(err, (ValueError, CommandError)):
        return True
    for module, name in _OWN:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def _duckdb_error(err: BaseException) -> bool:
    duckdb = sys.modules.get("duckdb")
    return duckdb is not None and isinstance(err, duckdb.Error)


def user_error_line(err: BaseException, command: str) -> str | None:
    """The one line to print for a user error, or None when `err` is a bug."""
    if isinstance(err, ModuleNotFoundError):
        top = (err.name or "").partition(".")[0]
        extra = "probes" if command == "probe" and top in EXTRAS["probes"] else \
            _MODULE_EXTRA.get(top)
        if extra is None:
            return None
        return f"{top} is not installed: pip install 'tokenlake[{extra}]'"
    if isinstance(err, OSError) and not _own(err):
        if err.errno is None:  # raised on purpose with a message, not by the system
            return _one_line(str(err))
        return os_error_line(err) if err.errno in _USER_ERRNOS else None
    if _own(err):
        return _one_line(str(err))
    if command == "sql" and _duckdb_error(err):  # the user's SQL: a typo, a missing column
        return _one_line(str(err))
    return None

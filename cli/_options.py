"""What every sub-command's parser shares: the help format (defaults shown), `--lake` with its
TOKENLAKE_LAKE default, deprecated spellings, and the option values the parsers offer.

This module imports nothing beyond the standard library: building the whole parser (`--help`)
must not load a backbone library, nor the lake's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LAKE_ENV = "TOKENLAKE_LAKE"
# = tokenlake.extract._tvdecode.DECODERS and ._preprocess.PREPROCESS, which import torch;
# tests/test_cli.py holds them equal
DECODERS = ("pil", "torchvision")
PREPROCESS = ("model", "dinov2-eval")


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help unless the text already says its default or
    there is none to show (None, False: an unset option or a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (text is argparse.SUPPRESS or default is None or default is False
                or default is argparse.SUPPRESS or "default" in text.lower()
                or not action.option_strings):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-parsers (of any module's `register`) use HelpFormatter."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_lake(p: argparse.ArgumentParser, *, required: bool = True,
             help: str = "the lake's root directory") -> None:
    """`--lake DIR`, by default $TOKENLAKE_LAKE; required when neither is given (unless
    `required=False`: a command that works without a lake, or checks for it itself)."""
    env = os.environ.get(LAKE_ENV) or None
    if env:
        text = f"{help} (default: ${LAKE_ENV} = {env.replace('%', '%%')})"
    elif required:
        text = f"{help} (required unless ${LAKE_ENV} is set)"
    else:
        text = f"{help} (default: ${LAKE_ENV}, unset here)"
    p.add_argument("--lake", type=Path, default=Path(env) if env else None,
                   required=required and env is None, metavar="DIR", help=text)


def comma_list(text: str) -> list[str]:
    """`--runs a,b`: the names, without blanks."""
    return [x.strip() for x in text.split(",") if x.strip()]


class Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new option's dest, hidden from --help,
    and says on stderr which spelling to use instead."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs) -> None:
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"tokenlake: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(p: argparse.ArgumentParser, old: str, new: str, *, dest: str, **kwargs) -> None:
    """Keep `old` working as a hidden spelling of `new` (same dest)."""
    p.add_argument(old, dest=dest, action=Deprecated, new=new, default=argparse.SUPPRESS,
                   **kwargs)


class _LazyVersion(argparse.Action):
    """`--version`, read from the installed distribution only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print tokenlake's version and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import version

        print(f"tokenlake {version('tokenlake')}")
        parser.exit()


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action=_LazyVersion)

"""tokenlake.experiments: the experiment files (`*.toml` beside this file), shipped as package data.

The checkout's `experiments/` folder is the source of truth: it installs as this package, so
`pip install tokenlake` carries `paper.toml`, `beyond.toml` and `demo.toml`, and
`tokenlake plan paper` (or `plan experiments/paper.toml` from a checkout, or any path) finds them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["experiment_names", "experiment_path", "resolve_experiment"]

_SUFFIX = ".toml"


def experiment_names() -> list[str]:
    """The experiments shipped with tokenlake (file names without `.toml`), sorted."""
    return sorted(p.name.removesuffix(_SUFFIX) for p in files(__name__).iterdir()
                  if p.name.endswith(_SUFFIX))


def experiment_path(name: str) -> Path:
    """The file of a shipped experiment (`paper`, `beyond`, `demo`; `.toml` optional)."""
    stem = name.removesuffix(_SUFFIX)
    if stem not in experiment_names():
        raise ValueError(f"no experiment named {stem!r} ships with tokenlake; shipped: "
                         f"{', '.join(experiment_names())} (or give a path to a .toml file)")
    return Path(str(files(__name__).joinpath(stem + _SUFFIX)))  # package data, on disk


def resolve_experiment(arg: str | Path) -> Path:
    """What `tokenlake plan ARG` and `tokenlake run ARG` read.

    ARG is an existing file (any path), else a shipped experiment's name (`paper`), else
    `experiments/NAME.toml` written as in a checkout, which names the shipped copy when it is not
    a file where the command runs (an installed tokenlake, run from another folder). Anything
    else is an error naming the shipped experiments.
    """
    path = Path(arg)
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"{str(path)!r} is not a file: give an experiment file or the name of a "
                         f"shipped experiment ({', '.join(experiment_names())})")
    text = str(arg)
    stem = path.name.removesuffix(_SUFFIX)
    plain_name = len(path.parts) == 1
    checkout_spelling = path.parts[:-1] == ("experiments",) and path.suffix == _SUFFIX
    if (plain_name or checkout_spelling) and stem in experiment_names():
        return experiment_path(stem)
    raise ValueError(f"no experiment file {text!r}; experiments shipped with tokenlake: "
                     f"{', '.join(experiment_names())} (`tokenlake plan NAME`)")

"""The built wheel: what it ships (every file the command line reads), the extras it declares,
and the command line running from it outside the checkout. `.ci/run` installs it for real into
fresh virtual environments (read-only, then with the extras) and runs the demo."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACKBONES = {"torch", "torchvision", "timm", "datasets"}
# what a checkout holds beyond the package (copied for the build: the working tree stays clean)
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist",
                                     "__pycache__", ".pytest_cache", ".ruff_cache", "demo-out",
                                     "bench-out")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "tokenlake"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                           "--no-build-isolation", "--wheel-dir", str(out), str(src)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("tokenlake-*.whl")
    return path


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_the_wheel_ships_every_file_the_command_line_reads(wheel):
    names = _names(wheel)
    want = {f"tokenlake/experiments/{p.name}" for p in (REPO / "experiments").glob("*.toml")}
    want |= {f"tokenlake/sql/{p.relative_to(REPO / 'sql').as_posix()}"
             for p in (REPO / "sql").rglob("*.sql")}
    want |= {"tokenlake/analyze/reference.json", "tokenlake/store/SCHEMA.md",
             "tokenlake/probes/README.md", "tokenlake/experiments/__init__.py"}
    assert {"tokenlake/experiments/paper.toml", "tokenlake/experiments/demo.toml"} <= want
    assert want <= names, sorted(want - names)
    # only the namespaced package and its metadata: no generic top-level `store`, `sql`, ...
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenlake"}
    # every data file the packages open at run time is inside the wheel (package data)
    for module in REPO.glob("*/*.py"):
        for found in re.findall(r'files\("(tokenlake\.\w+)"\)\.joinpath\("([^"]+)"\)',
                                module.read_text()):
            path = f"{found[0].replace('.', '/')}/{found[1]}"  # a file, or a folder of them
            assert path in names or any(n.startswith(path + "/") for n in names), (module, found)


def _requirements(wheel: Path) -> dict[str | None, set[str]]:
    """extra (None: the base install) -> the distributions it requires."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(z.read(meta).decode())
    out: dict[str | None, set[str]] = {}
    for line in message.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        name = re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]+\])?", requirement.strip()).group(0)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        out.setdefault(extra.group(1) if extra else None, set()).add(name.lower())
    return out


def test_the_base_install_reads_lakes_and_the_extras_compute(wheel):
    req = _requirements(wheel)
    base = req[None]
    assert {"duckdb", "pyarrow", "polars", "zarr", "numpy", "matplotlib", "scipy",
            "scikit-learn"} <= base
    assert not base & BACKBONES, base & BACKBONES
    assert BACKBONES <= req["extract"]
    assert "torch" in req["probes"] and not {"timm", "datasets"} & req["probes"]
    assert {"tokenlake[extract]", "scikit-image"} <= req["demo"]
    assert req["all"] == {"tokenlake[demo,extract,probes]"}  # as the metadata sorts them


def _site_from(wheel: Path, root: Path, *, backbones: bool) -> list[Path]:
    """Site directories: the wheel unpacked (purelib), then this environment's site-packages
    without tokenlake itself (its editable install) and, unless `backbones`, without them."""
    unpacked = root / "wheel"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    deps = root / "deps"
    deps.mkdir()
    skip = re.compile(r"^(__editable__.*tokenlake.*|tokenlake[-_].*)$" if backbones else
                      r"^(__editable__.*tokenlake.*|tokenlake[-_].*|torch|torchvision|torchgen|"
                      r"functorch|timm|datasets|triton|nvidia)([-_.].*)?$", re.IGNORECASE)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not skip.match(entry.name):
            (deps / entry.name).symlink_to(entry)
    return [unpacked, deps]


def _cli(sites: list[Path], *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    prelude = "import site, sys\n" + "".join(f"site.addsitedir({str(s)!r})\n" for s in sites)
    code = prelude + ("import tokenlake.experiments as e, tokenlake.cli.main as m\n"
                      "print('FROM', e.__file__, file=sys.stderr)\n"
                      "sys.exit(m.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-I", "-S", "-c", code, *argv], check=False,
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_the_wheel_runs_outside_the_checkout(wheel, tmp_path):
    """plan by name and by the checkout's spelling, from a folder without experiments/, with
    every file read from the unpacked wheel."""
    sites = _site_from(wheel, tmp_path / "full", backbones=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    for spelling in ("beyond", "experiments/beyond.toml"):
        proc = _cli(sites, "plan", spelling, cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert f"FROM {sites[0] / 'tokenlake/experiments/__init__.py'}" in proc.stderr
        assert f"{sites[0] / 'tokenlake/experiments/beyond.toml'} (shipped" in proc.stderr
        assert "dinov3_s-" in proc.stdout


def test_the_read_only_wheel_lists_queries_and_refuses_extract(wheel, tmp_path):
    sites = _site_from(wheel, tmp_path / "ro", backbones=False)
    proc = _cli(sites, "sql", "--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "norm_summary" in proc.stdout
    proc = _cli(sites, "extract", "--lake", str(tmp_path), "--model", "pvt_b0", "--subset", "s",
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install 'tokenlake[extract]'" in proc.stderr

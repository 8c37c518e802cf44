"""The command line: what the read-only commands import, named queries, output files, flags,
defaults, TOKENLAKE_LAKE, --version, the extras' messages, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import textwrap
from importlib.metadata import version
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tokenlake.cli._options import LAKE_ENV
from tokenlake.cli.main import build_parser, main
from tokenlake.sql import BASE_VIEWS, query_info, query_names, query_text, view_names

BACKBONE_LIBRARIES = ("torch", "timm", "torchvision", "datasets")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    from tokenlake.store.testing import synthetic_run

    root = tmp_path_factory.mktemp("lake")
    synthetic_run(n_images=6, seed=1, blocks=3).write(root, "a")
    synthetic_run(n_images=6, seed=2, random_weights=True).write(root, "b")
    return root


def _run_python(code: str, *args: str, cwd: Path | None = None, env: dict | None = None,
                prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], check=False,
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


# -- what the read-only commands import -------------------------------------------------------

_PROBE_MODULES = textwrap.dedent("""
    import json, sys
    from tokenlake.cli.main import main
    try:
        rc = main(sys.argv[2:])
    except SystemExit as stop:  # --help
        rc = stop.code
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {banned!r}
                    and sys.modules[m] is not None)
    with open(sys.argv[1], "w") as handle:
        json.dump({{"rc": rc, "loaded": loaded}}, handle)
""").format(banned=set(BACKBONE_LIBRARIES))


@pytest.mark.parametrize("argv", [
    ["--help"], ["sql", "--help"], ["sql", "--list"], ["sql", "SELECT count(*) FROM tokens"],
    ["sql", "--query", "norm_summary", "--param", "runs=a,b", "--param", "q=0.98"],
    ["runs"], ["validate"], ["cards"], ["cards", "--format", "json"],
    ["analyze", "norms"], ["report"],
], ids=lambda a: " ".join(a))
def test_read_only_commands_import_no_backbone_library(argv, lake, tmp_path):
    """Each command in a fresh interpreter: none of torch, timm, torchvision, datasets is loaded."""
    result = tmp_path / "result.json"
    needs_lake = argv[0] not in ("--help",) and "--help" not in argv and "--list" not in argv
    extra = ["--lake", str(lake)] if needs_lake else []
    if argv[0] in ("analyze", "report"):
        extra += ["--out", str(tmp_path / "out")]
    proc = _run_python(_PROBE_MODULES, str(result), *argv, *extra)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(result.read_text())
    assert got["rc"] == 0, proc.stderr
    assert got["loaded"] == [], f"{argv} imported {got['loaded']}"


# a read-only install, simulated: this environment's site-packages without the backbone
# libraries and what ships with them (links to every other entry, .pth files included)
_BACKBONE_ENTRY = re.compile(r"^(torch|torchvision|torchgen|functorch|timm|datasets|triton|"
                             r"nvidia)([-_.].*)?$", re.IGNORECASE)


@pytest.fixture(scope="module")
def readonly_site(tmp_path_factory) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp_path_factory.mktemp("readonly-site")
    for entry in site.iterdir():
        if not _BACKBONE_ENTRY.match(entry.name):
            (out / entry.name).symlink_to(entry)
    return out


def _without_backbones(site: Path, *argv: str, code: str | None = None,
                       cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command line (or `code`) in an interpreter whose only site directory is `site`."""
    body = code or "from tokenlake.cli.main import main; sys.exit(main(sys.argv[1:]))"
    prelude = f"import site, sys; site.addsitedir({str(site)!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + body, *argv], check=False,
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_simulated_read_only_install_has_no_backbone_library(readonly_site):
    probe = (f"import importlib.util as u; print([m for m in {BACKBONE_LIBRARIES!r} "
             "if u.find_spec(m)])")
    proc = _without_backbones(readonly_site, code=probe)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.parametrize("argv, extra", [
    (["extract", "--model", "pvt_b0", "--subset", "s"], "extract"),
    (["subset", "--name", "s", "--data", "x"], "extract"),
    (["pixels", "--subset", "s", "--model", "pvt_b0"], "extract"),
    (["models"], "extract"),
    (["plan", "paper"], "extract"),
    (["probe", "position", "--run", "a"], "probes"),
    (["demo"], "demo"),
])
def test_a_command_without_its_extra_says_which_to_install(argv, extra, lake, tmp_path,
                                                           readonly_site):
    """Without torch, timm, torchvision and datasets (a read-only install), a command that needs
    them names its extra in one line and exits 2."""
    if argv[0] not in ("models", "plan", "demo"):
        argv = [*argv, "--lake", str(lake)]
    proc = _without_backbones(readonly_site, *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'tokenlake[{extra}]'" in lines[0]
    assert "torch" in lines[0] and "not installed" in lines[0]


def test_the_read_only_commands_run_without_the_backbone_libraries(lake, tmp_path,
                                                                   readonly_site):
    """With torch, timm, torchvision and datasets unimportable, reading the lake still works."""
    for argv in (["sql", "--lake", str(lake), "SELECT count(*) AS n FROM outliers"],
                 ["runs", "--lake", str(lake)], ["validate", "--lake", str(lake)],
                 ["cards", "--lake", str(lake)],
                 ["report", "--lake", str(lake), "--out", str(tmp_path / "r")]):
        proc = _without_backbones(readonly_site, *argv)
        assert proc.returncode == 0, (argv, proc.stderr)


def test_the_python_api_names_the_missing_extra(readonly_site):
    proc = _without_backbones(readonly_site,
                              code="import tokenlake.extract as e; e.ExtractRequest")
    assert proc.returncode == 1
    assert "tokenlake.extract needs the 'extract' extra" in proc.stderr
    assert "pip install 'tokenlake[extract]'" in proc.stderr


# -- sql: named queries, --list, --output -----------------------------------------------------


def test_named_query_with_named_parameters_equals_the_positional_query(lake, capsys):
    import duckdb  # noqa: F401 - the expected table, through the same Lake

    from tokenlake.store import open_lake

    assert main(["sql", "--lake", str(lake), "--query", "norm_summary", "--param", "runs=b,a",
                 "--param", "q=0.9", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = open_lake(lake).sql(query_text("norm_summary"), params=[["b", "a"], 0.9]).to_pylist()
    assert got == json.loads(json.dumps(want, default=str))
    assert [r["run"] for r in got] == ["a", "b"] and got[0]["threshold"] > 0


def _value(param) -> str:
    """A value of the parameter's type that makes the query run on the fixture lake."""
    by_type = {"VARCHAR[]": "a,b", "VARCHAR": "a", "BIGINT[]": "0,1", "DOUBLE[]": "30,30",
               "DOUBLE": "0.9", "INTEGER": "8", "BIGINT": "5"}
    return "30" if param.name == "threshold" else by_type[param.type]


@pytest.mark.parametrize("name", query_names())
def test_every_named_query_runs_by_parameter_names(name, lake, capsys):
    info = query_info(name)
    n_dollars = max([int(x) for x in re.findall(r"\$(\d+)", query_text(name))] or [0])
    assert [p.index for p in info.params] == list(range(1, n_dollars + 1))
    assert info.description and not info.description.startswith(name)
    argv = ["sql", "--lake", str(lake), "--query", name, "--format", "csv"]
    for p in info.params:
        argv += ["--param", f"{p.name}={_value(p)}"]
    assert main(argv) == 0, capsys.readouterr().err
    header = capsys.readouterr().out.splitlines()[0]
    assert header  # the csv header: the query's columns


@pytest.mark.parametrize("params, message", [
    ([], "needs runs=VARCHAR[], q=DOUBLE"),
    (["runs=a"], "needs q=DOUBLE"),
    (["runs=a", "q=0.9", "p=1"], "has no parameter p; it takes runs=VARCHAR[], q=DOUBLE"),
    (["runs=a", "q=abc"], "parameter q (DOUBLE): 'abc' is not a DOUBLE"),
    (["runs=a", "q"], "--param 'q': write NAME=VALUE"),
    (["runs=a", "runs=b", "q=1"], "--param runs is given twice"),
])
def test_named_query_parameter_errors(params, message, lake, capsys):
    argv = ["sql", "--lake", str(lake), "--query", "norm_summary"]
    for p in params:
        argv += ["--param", p]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_query_errors(lake, capsys):
    assert main(["sql", "--lake", str(lake), "--query", "norm_sumary"]) == 2
    assert "did you mean 'norm_summary'" in capsys.readouterr().err
    assert main(["sql", "--lake", str(lake), "SELECT 1", "--param", "q=1"]) == 2
    assert "--param goes with --query" in capsys.readouterr().err
    assert main(["sql", "--lake", str(lake)]) == 2
    assert "give exactly one of" in capsys.readouterr().err


def test_sql_list_needs_no_lake_and_documents_everything(capsys, monkeypatch):
    monkeypatch.delenv(LAKE_ENV, raising=False)
    assert main(["sql", "--list"]) == 0
    text = capsys.readouterr().out
    for name in [*view_names(), *query_names(), *BASE_VIEWS]:
        assert name in text
    for name in query_names():
        for p in query_info(name).params:
            assert f"--param {p.usage()}" in text
    assert "the outlier threshold of each chosen run at any percentile." in text


def test_base_views_are_the_lakes_own(lake):
    """BASE_VIEWS (what --list shows) are exactly the relations the store adds before the views
    of sql/views."""
    from tokenlake.store import open_lake

    con = open_lake(lake).connect()
    names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables")
             .fetchall()}
    macros = set(view_names()) - names  # thresholds_at is a table macro, not a view
    assert names == set(BASE_VIEWS) | (set(view_names()) - macros)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "parquet"])
def test_sql_output_is_honoured_for_every_format(fmt, lake, tmp_path, capsys):
    out = tmp_path / f"result.{fmt}"
    q = "SELECT run, count(*) AS n FROM tokens GROUP BY run ORDER BY run"
    assert main(["sql", "--lake", str(lake), q, "--format", fmt, "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""  # everything went to the file
    if fmt == "parquet":
        assert pq.read_table(out).to_pylist() == [{"run": "a", "n": 162}, {"run": "b", "n": 162}]
    elif fmt == "csv":
        assert list(csv.DictReader(io.StringIO(out.read_text()))) == [
            {"run": "a", "n": "162"}, {"run": "b", "n": "162"}]
    elif fmt == "json":
        assert json.loads(out.read_text()) == [{"run": "a", "n": 162}, {"run": "b", "n": 162}]
    else:
        text = out.read_text()
        assert "shape: (2, 2)" in text and "162" in text and "run" in text


def test_sql_list_and_cards_honour_output(lake, tmp_path, capsys):
    assert main(["sql", "--list", "--output", str(tmp_path / "list.txt")]) == 0
    assert "norm_summary" in (tmp_path / "list.txt").read_text()
    for fmt in ("table", "csv", "json", "parquet"):
        out = tmp_path / f"cards.{fmt}"
        assert main(["cards", "--lake", str(lake), "--format", fmt, "--output", str(out)]) == 0
        assert capsys.readouterr().out == ""
        if fmt == "parquet":
            assert pq.read_table(out).column("run").to_pylist() == ["a", "b"]
        elif fmt == "table":
            assert "images with ≥1 outlier" in out.read_text()
        else:
            assert "images_with_outliers" in out.read_text() or "n_images" in out.read_text()
    assert main(["cards", "--lake", str(lake), "--format", "parquet"]) == 2
    assert "--format parquet needs --output FILE" in capsys.readouterr().err


def test_deprecated_spellings_still_work_and_say_so(lake, capsys):
    assert main(["sql", "--lake", str(lake), "--query-name", "outlier_counts",
                 "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "--query-name is deprecated; use --query" in captured.err
    assert captured.out.startswith("run,")
    assert main(["validate", "--lake", str(lake), "--run", "a"]) == 0
    assert "--run is deprecated; use --runs" in capsys.readouterr().err
    args = build_parser().parse_args(["pixels", "--lake", "L", "--subset", "s", "--model", "m",
                                      "--workers", "3"])
    assert args.decode_workers == 3
    args = build_parser().parse_args(["demo", "--images", "9"])
    assert args.n == 9


def test_validate_takes_a_run_list(lake, capsys):
    assert main(["validate", "--lake", str(lake), "--runs", "a,b"]) == 0
    assert main(["validate", "--lake", str(lake), "--runs", "a,nope"]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err


# -- flags, defaults, --version, TOKENLAKE_LAKE ---------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options() -> list[tuple[str, argparse.Action]]:
    """(command, action) of every visible option of every sub-command."""
    out = []
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS and \
                    not isinstance(action, argparse._HelpAction):
                out.append((command, action))
    return out


def test_one_meaning_per_flag():
    """An option spelled the same in two commands takes the same kind of value; --out is always
    an output folder, --output a file, --runs a comma list, --workers extraction processes."""
    seen: dict[str, set] = {}
    for command, action in _options():
        for flag in action.option_strings:
            seen.setdefault(flag, set()).add((action.type, action.nargs, type(action).__name__))
            if flag == "--out":
                assert "folder" in action.help, (command, action.help)
            if flag == "--output":
                assert "file" in action.help.lower() and action.metavar == "FILE", command
            if flag == "--runs":
                assert "comma list" in action.help, command
            if flag == "--workers":
                assert command == "extract", command
            if flag == "--decode-workers":
                assert "decoding processes" in action.help, command
            if flag == "--lake":
                assert action.type is Path and action.metavar == "DIR", command
    differ = {flag: kinds for flag, kinds in seen.items() if len(kinds) > 1}
    assert differ == {}


def test_every_default_is_shown_in_help():
    parser = build_parser()
    for command, sub in _subparsers(parser).items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if (not action.option_strings or action.help is argparse.SUPPRESS
                    or action.default in (None, False, argparse.SUPPRESS)
                    or isinstance(action, argparse._HelpAction)):
                continue
            shown = (",".join(map(str, action.default))
                     if isinstance(action.default, (tuple, list)) else str(action.default))
            said = "default" in (action.help or "").lower()
            assert said or f"(default: {shown})" in text, (command, action.option_strings)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"tokenlake {version('tokenlake')}\n"


def test_tokenlake_lake_is_the_default_lake(lake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LAKE_ENV, str(lake))
    assert main(["runs"]) == 0
    assert "a  complete" in capsys.readouterr().out
    assert main(["sql", "SELECT count(DISTINCT run) AS n FROM runs", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n2\n"
    # --lake wins over the variable
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["runs", "--lake", str(empty)]) == 0
    assert "no runs in" in capsys.readouterr().out
    monkeypatch.delenv(LAKE_ENV)
    with pytest.raises(SystemExit) as stop:
        main(["runs"])
    assert stop.value.code == 2
    assert "--lake" in capsys.readouterr().err
    assert "required unless $TOKENLAKE_LAKE is set" in " ".join(
        _subparsers(build_parser())["runs"].format_help().split())


def test_constants_match_the_packages_they_mirror():
    from tokenlake.cli import _analyze_cmd, _options, _probe_cmd
    from tokenlake.extract._preprocess import PREPROCESS
    from tokenlake.extract._tvdecode import DECODERS
    from tokenlake.probes import PROBES
    from tokenlake.probes._cells import TARGETS
    from tokenlake.probes._data import TOKENS

    assert _options.DECODERS == DECODERS and _options.PREPROCESS == PREPROCESS
    assert _probe_cmd.TOKENS == TOKENS and _probe_cmd.TARGETS == TARGETS
    assert _probe_cmd.NAMES == PROBES and _analyze_cmd.JOB_NAMES == tuple(
        __import__("tokenlake.analyze", fromlist=["JOBS"]).JOBS)


@pytest.mark.parametrize("package", ["store", "extract", "analyze", "probes"])
def test_lazy_package_exports_are_complete(package):
    """Every name of a package's __all__ resolves, and __all__ lists every lazy export."""
    import importlib

    module = importlib.import_module(f"tokenlake.{package}")
    assert set(module.__all__) >= set(module._EXPORTS)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


# -- errors a user can cause: one line, exit 2 --------------------------------------------------


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tokenlake {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("query, message", [
    ("SELEC run FROM runs", "Parser Error: syntax error at or near \"SELEC\""),
    ("SELECT nrm FROM tokens", "Binder Error: Referenced column \"nrm\" not found"),
    ("SELECT * FROM tokenz", "Catalog Error: Table with name tokenz does not exist"),
    ("DROP VIEW tokens", "tokenlake sql is read-only"),
])
def test_sql_mistakes_are_one_line(query, message, lake, capsys):
    assert main(["sql", "--lake", str(lake), query]) == 2
    assert message in _one_error_line(capsys, "sql")


def test_a_name_too_long_is_one_line(lake, tmp_path, capsys):
    long = tmp_path / ("x" * 300 + ".csv")
    assert main(["sql", "--lake", str(lake), "SELECT 1", "--format", "csv",
                 "--output", str(long)]) == 2
    assert "File name too long" in _one_error_line(capsys, "sql")
    assert main(["runs", "--lake", str(tmp_path / ("y" * 300))]) == 2
    assert "File name too long" in _one_error_line(capsys, "runs")


def test_a_full_disk_is_one_line(lake, capsys):
    full = Path("/dev/full")  # every write fails with ENOSPC
    if not (full.exists() and stat.S_ISCHR(full.stat().st_mode)):
        pytest.skip("no /dev/full character device on this machine")
    assert main(["sql", "--lake", str(lake), "SELECT 1", "--format", "csv",
                 "--output", str(full)]) == 2
    line = _one_error_line(capsys, "sql")
    assert "cannot write /dev/full: No space left on device (the disk is full)" in line
    assert stat.S_ISCHR(full.stat().st_mode)  # the device is left as it was


@pytest.mark.parametrize("command", ["sql", "runs", "validate", "cards", "analyze", "report",
                                     "subset", "probe"])
def test_lake_pointing_at_a_file_is_one_line(command, tmp_path, capsys):
    path = tmp_path / "not-a-lake.txt"
    path.write_text("hello")
    argv = {"sql": ["sql", "SELECT 1"], "analyze": ["analyze", "norms"],
            "subset": ["subset", "--name", "s", "--data", "x"],
            "probe": ["probe", "position", "--run", "a"]}.get(command, [command])
    assert main([*argv, "--lake", str(path)]) == 2
    assert f"--lake {path} is a file, not a lake directory" in _one_error_line(capsys, command)


def test_out_pointing_at_a_file_is_one_line(lake, tmp_path, capsys):
    path = tmp_path / "file.txt"
    path.write_text("x")
    assert main(["analyze", "norms", "--lake", str(lake), "--out", str(path)]) == 2
    assert "--out names an output folder" in _one_error_line(capsys, "analyze")


def test_permission_denied_is_one_line(lake, tmp_path):
    """A folder the user may not write to, and a lake it may not read, in a process without
    root's power to ignore permissions (setpriv drops it when the tests run as root)."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    locked = tmp_path / "locked"
    locked.mkdir()
    hidden = tmp_path / "hidden-lake"
    shutil.copytree(lake, hidden)
    code = "import sys; from tokenlake.cli.main import main; sys.exit(main(sys.argv[1:]))"
    locked.chmod(0o555)
    (hidden / "runs").chmod(0o000)
    try:
        write = _run_python(code, "sql", "--lake", str(lake), "SELECT 1", "--format", "json",
                            "--output", str(locked / "out.json"), prefix=prefix)
        read = _run_python(code, "runs", "--lake", str(hidden), prefix=prefix)
    finally:
        locked.chmod(0o755)
        (hidden / "runs").chmod(0o755)
    assert write.returncode == 2, write.stderr
    assert write.stderr == f"tokenlake sql: error: cannot write {locked / 'out.json'}: " \
                           "Permission denied\n"
    assert read.returncode == 2, read.stderr
    assert read.stderr == f"tokenlake runs: error: {hidden / 'runs'}: Permission denied\n"


def test_a_bug_keeps_its_traceback(lake, monkeypatch):
    """Only user errors become one line: anything else still raises."""
    from tokenlake.cli import _commands

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(_commands, "runs", broken)
    with pytest.raises(KeyError):
        main(["runs", "--lake", str(lake)])


# -- plan and the shipped experiments ---------------------------------------------------------


def test_plan_takes_a_shipped_name_or_a_path(tmp_path, capsys, monkeypatch):
    from tokenlake.experiments import experiment_names, experiment_path, resolve_experiment

    assert set(experiment_names()) == {p.stem for p in (REPO / "experiments").glob("*.toml")}
    assert experiment_path("demo").read_bytes() == (REPO / "experiments/demo.toml").read_bytes()
    monkeypatch.chdir(tmp_path)  # no experiments/ folder here
    assert resolve_experiment("paper") == experiment_path("paper")
    assert resolve_experiment("experiments/paper.toml") == experiment_path("paper")
    own = tmp_path / "mine.toml"
    own.write_text((REPO / "experiments/demo.toml").read_text())
    assert resolve_experiment(str(own)) == own
    with pytest.raises(ValueError, match="shipped with tokenlake: beyond, demo, paper"):
        resolve_experiment("papers")
    # the demo's images are made by `tokenlake demo`; a file of its own runs names a folder
    own.write_text('[subsets.s]\ndata = "imgs"\n\n[[runs]]\nmodel = "pvt_b0"\nsubset = "s"\n'
                   'weights = "random"\n')
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "imgs" / "a" / f"{i}.png").write_bytes(b"")  # counted, never decoded
    assert main(["plan", str(own)]) == 0
    captured = capsys.readouterr()
    assert "pvt_b0-224-s-random" in captured.out and "shipped" not in captured.err
    assert main(["plan", "beyond"]) == 0
    captured = capsys.readouterr()
    assert "dinov3_s-" in captured.out
    assert f"experiment beyond: {experiment_path('beyond')} (shipped with tokenlake)" in \
        captured.err
    assert main(["plan", "nope.toml"]) == 2
    assert "no experiment file 'nope.toml'" in _one_error_line(capsys, "plan")


# -- extraction records library versions; a resume with others is refused unless allowed -------


@pytest.fixture
def extracted(tmp_path, image_helpers):
    """A complete random-weight run of 4 images, and how to run its extraction again."""
    root = tmp_path / "imgs"
    image_helpers.write_imagefolder(root, classes=("a",), per_class=4)
    lake = tmp_path / "lake"
    assert main(["subset", "--lake", str(lake), "--name", "tiny", "--data", str(root)]) == 0
    argv = ["extract", "--lake", str(lake), "--model", "dinov2_s_reg4", "--subset", "tiny",
            "--weights", "random", "--img-size", "56", "--batch-size", "4", "--decode-workers",
            "0", "--quiet", "--run", "r"]
    assert main(argv) == 0
    return lake, argv


def _begun_with(lake: Path, versions: dict | None) -> None:
    """Make run r a partial run begun with `versions` (None: before versions were recorded)."""
    run = lake / "runs" / "r"
    (run / "manifest.json").unlink()
    config = json.loads((run / "config.json").read_text())
    if versions is None:
        del config["versions"]
    else:
        config["versions"] = versions
    (run / "config.json").write_text(json.dumps(config))


def test_runs_record_versions_and_refuse_a_resume_with_others(extracted, capsys):
    from tokenlake.extract import library_versions
    from tokenlake.store import open_lake

    lake, argv = extracted
    now = library_versions()
    assert set(now) == {"torch", "timm", "tokenlake"} and now["tokenlake"] == version("tokenlake")
    manifest = open_lake(lake).manifest("r")
    assert manifest["config"]["versions"] == now and "version_change" not in manifest

    old = {**now, "timm": "0.9.0", "torch": "2.0.0"}
    _begun_with(lake, old)
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capsys, "extract")
    assert f"timm 0.9.0 -> {now['timm']}, torch 2.0.0 -> {now['torch']}" in line
    assert "tokenlake " not in line.split("was begun")[1]  # only the versions that differ
    assert "--allow-version-change" in line
    assert not (lake / "runs" / "r" / "manifest.json").exists()

    assert main([*argv, "--allow-version-change"]) == 0
    manifest = open_lake(lake).manifest("r")
    assert manifest["config"]["versions"] == old  # what the run was begun with
    assert manifest["versions"] == now  # what finished it
    change = manifest["version_change"]
    assert change["from"] == old and change["to"] == now
    assert change["shards_committed_before"] == 1
    # complete (begun with `old`, this process has `now`): nothing to resume, nothing refused
    assert main(argv) == 0
    assert open_lake(lake).manifest("r") == manifest


def test_a_run_begun_before_versions_were_recorded(extracted, capsys):
    from tokenlake.store import open_lake

    lake, argv = extracted
    _begun_with(lake, None)
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capsys, "extract")
    assert "begun by a tokenlake that did not record versions: timm unrecorded ->" in line
    assert main([*argv, "--allow-version-change"]) == 0
    manifest = open_lake(lake).manifest("r")
    assert "versions" not in manifest["config"] and manifest["version_change"]["from"] is None

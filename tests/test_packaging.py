"""The folders install as tokenlake.*, never as generic top-level modules (docs/DESIGN-NOTES.md,
"Packaging"). tests/test_install.py checks the built wheel."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

FOLDERS = ("extract", "store", "sql", "analyze", "probes", "cli", "experiments")


@pytest.mark.parametrize("name", FOLDERS)
def test_no_generic_top_level_module(name):
    assert importlib.util.find_spec(name) is None, f"'{name}' leaked into site-packages"


@pytest.mark.parametrize("name", FOLDERS)
def test_namespaced_package_imports(name):
    assert importlib.import_module(f"tokenlake.{name}") is not None


def test_sql_files_ship_as_package_data():
    from tokenlake.sql import query_names, query_text, view_names

    assert {"thresholds", "outliers"} <= set(view_names())
    assert all(query_text(name).strip() for name in query_names())


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("tokenlake") == "tokenlake.cli.main:entry"


def test_experiment_files_ship_as_package_data():
    from tokenlake.experiments import experiment_names, experiment_path

    assert {"paper", "beyond", "demo"} <= set(experiment_names())
    assert all(experiment_path(name).read_text().strip() for name in experiment_names())

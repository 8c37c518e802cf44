"""tokenlake.store: the lake on disk. The only code that knows the file formats (store/SCHEMA.md).

Names are imported on first use (PEP 562), so `import tokenlake.store` costs nothing until a name
is read: the command line starts without zarr or DuckDB when a command does not need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the private module that defines it
_EXPORTS = {
    "ContractError": "_errors",
    "DamagedRun": "_errors",
    "LakeError": "_errors",
    "ReadOnlyQuery": "_errors",
    "RunConfigMismatch": "_errors",
    "RunExists": "_errors",
    "UnknownRun": "_errors",
    "export_documented": "_export",
    "export_table": "_export",
    "Lake": "_lake",
    "open_lake": "_lake",
    "ArraySpec": "_layout",
    "RunLayout": "_layout",
    "read_neurons": "_neurons",
    "write_neurons": "_neurons",
    "PixelStore": "_pixels",
    "pixel_store_name": "_pixels",
    "probe_config_hash": "_probes",
    "probe_result_dir": "_probes",
    "read_probe_result": "_probes",
    "write_probe_result": "_probes",
    "SCHEMA_VERSION": "_schema",
    "TABLE_SCHEMAS": "_schema",
    "TOKEN_KINDS": "_schema",
    "read_subset": "_subsets",
    "subset_checksum": "_subsets",
    "table_checksum": "_subsets",
    "write_subset": "_subsets",
    "write_run": "_write_run",
    "RunWriter": "_writer",
    "shard_name": "_writer",
}

__all__ = [
    "SCHEMA_VERSION",
    "TABLE_SCHEMAS",
    "TOKEN_KINDS",
    "ArraySpec",
    "ContractError",
    "DamagedRun",
    "Lake",
    "LakeError",
    "PixelStore",
    "ReadOnlyQuery",
    "RunConfigMismatch",
    "RunExists",
    "RunLayout",
    "RunWriter",
    "UnknownRun",
    "export_documented",
    "export_table",
    "open_lake",
    "pixel_store_name",
    "probe_config_hash",
    "probe_result_dir",
    "read_neurons",
    "read_probe_result",
    "read_subset",
    "shard_name",
    "subset_checksum",
    "table_checksum",
    "write_neurons",
    "write_probe_result",
    "write_run",
    "write_subset",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
    from tokenlake.store._errors import (
        ContractError,
        DamagedRun,
        LakeError,
        ReadOnlyQuery,
        RunConfigMismatch,
        RunExists,
        UnknownRun,
    )
    from tokenlake.store._export import export_documented, export_table
    from tokenlake.store._lake import Lake, open_lake
    from tokenlake.store._layout import ArraySpec, RunLayout
    from tokenlake.store._neurons import read_neurons, write_neurons
    from tokenlake.store._pixels import PixelStore, pixel_store_name
    from tokenlake.store._probes import (
        probe_config_hash,
        probe_result_dir,
        read_probe_result,
        write_probe_result,
    )
    from tokenlake.store._schema import SCHEMA_VERSION, TABLE_SCHEMAS, TOKEN_KINDS
    from tokenlake.store._subsets import read_subset, subset_checksum, table_checksum, write_subset
    from tokenlake.store._write_run import write_run
    from tokenlake.store._writer import RunWriter, shard_name

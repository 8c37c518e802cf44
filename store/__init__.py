"""tokenlake.store: the lake on disk. The only code that knows the file formats (see SCHEMA.md)."""

from tokenlake.store._errors import (
    ContractError,
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

__all__ = [
    "SCHEMA_VERSION",
    "TABLE_SCHEMAS",
    "TOKEN_KINDS",
    "ArraySpec",
    "ContractError",
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

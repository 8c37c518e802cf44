"""Arrow schemas of the lake tables and the checks that hold written data to them."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tokenlake.store._errors import ContractError

SCHEMA_VERSION = 3  # 2: token kind 'ttreg'; 3: final_norm.json, q/k/v norms on every block, neuron
# statistics of --record-mlp runs. Older lakes read unchanged (SCHEMA.md, version policy).
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
TOKEN_KINDS = ("cls", "reg", "ttreg", "patch")


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=nl) for n, t, nl in fields])


# (name, type, nullable). Order is the on-disk column order.
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "images": _schema(
        ("image_id", pa.int64(), False),
        ("source_index", pa.int64(), False),
        ("source_id", pa.string(), False),
        ("label", pa.int64(), True),
        ("width", pa.int32(), False),
        ("height", pa.int32(), False),
        ("n_tokens", pa.int32(), False),
        ("max_patch_norm", pa.float32(), True),
        ("mean_patch_norm", pa.float32(), True),
    ),
    "tokens": _schema(
        ("image_id", pa.int64(), False),
        ("token", pa.int32(), False),
        ("kind", pa.string(), False),
        ("row", pa.int16(), True),
        ("col", pa.int16(), True),
        ("norm", pa.float32(), False),
        ("attn", pa.float32(), True),
        ("nbr_cos", pa.float32(), True),
        ("slot", pa.int64(), True),
    ),
    "errors": _schema(
        ("image_id", pa.int64(), False),
        ("source_index", pa.int64(), False),
        ("source_id", pa.string(), False),
        ("reason", pa.string(), False),
    ),
    "blocks": _schema(
        ("image_id", pa.int64(), False),
        ("token", pa.int32(), False),
        ("block", pa.int16(), False),
        ("norm", pa.float32(), False),
        ("q_norm", pa.float32(), True),
        ("k_norm", pa.float32(), True),
        ("v_norm", pa.float32(), True),
    ),
    "subset": _schema(
        ("source", pa.string(), False),
        ("split", pa.string(), True),
        ("source_index", pa.int64(), False),
        ("source_id", pa.string(), False),
        ("label", pa.int64(), True),
    ),
}

# Low-cardinality columns: dictionary pages shrink them a lot; everything else stays plain.
DICTIONARY_COLUMNS = ["kind", "row", "col", "block", "reason", "source", "split", "label"]


def _kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_null(t):
        return "null"
    return str(t)


def to_arrow(data: Any, what: str) -> pa.Table:
    """Accept a pyarrow Table, a polars DataFrame or anything with `to_arrow()`."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "to_arrow"):
        return data.to_arrow()
    raise ContractError(
        f"{what}: expected a pyarrow.Table or polars.DataFrame, got {type(data).__name__}"
    )


def conform(data: Any, table: str) -> pa.Table:
    """Return `data` as a Table with exactly the schema of `table`, or raise ContractError.

    Safe casts only: integer to integer (overflow raises), float to float32 (the contract
    stores fp32), any string flavour to string, an all-null column to any type.
    """
    schema = TABLE_SCHEMAS[table]
    t = to_arrow(data, table)
    have, want = t.column_names, schema.names
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if extra:
            parts.append(f"unexpected column(s) {extra}")
        raise ContractError(f"{table}: {'; '.join(parts)}; expected exactly {want}")
    cols = []
    for field in schema:
        col = t.column(field.name)
        src, dst = _kind(col.type), _kind(field.type)
        if src not in (dst, "null"):
            raise ContractError(
                f"{table}.{field.name}: has type {col.type}, expected {field.type} "
                f"(a {src} column cannot be cast losslessly to {dst})"
            )
        if col.type != field.type:
            try:
                cast = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ContractError(
                    f"{table}.{field.name}: cannot cast {col.type} to {field.type}: {e}"
                ) from None
            if (
                src == "float"
                and pc.any(pc.and_(pc.is_finite(col), pc.invert(pc.is_finite(cast)))).as_py()
            ):
                raise ContractError(f"{table}.{field.name}: values overflow {field.type}")
            col = cast
        if not field.nullable and col.null_count:
            raise ContractError(
                f"{table}.{field.name}: {col.null_count} null value(s) in a NOT NULL column"
            )
        cols.append(col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
    return pa.Table.from_arrays(cols, schema=schema)


def check_token_kinds(tokens: pa.Table) -> None:
    kinds = set(pc.unique(tokens.column("kind")).to_pylist())
    bad = sorted(kinds - set(TOKEN_KINDS))
    if bad:
        raise ContractError(f"tokens.kind: invalid value(s) {bad}; allowed: {list(TOKEN_KINDS)}")
    is_patch = pc.equal(tokens.column("kind"), "patch")
    for c in ("row", "col"):
        valid = pc.is_valid(tokens.column(c))
        if pc.any(pc.not_equal(valid, is_patch)).as_py():  # any() of no rows is False, all() is null
            raise ContractError(
                f"tokens.{c}: must be set for 'patch' tokens and NULL for prefix tokens "
                f"('cls'/'reg'/'ttreg')"
            )
    prefix_cos = pc.and_(pc.invert(is_patch), pc.is_valid(tokens.column("nbr_cos")))
    if pc.any(prefix_cos).as_py():
        raise ContractError("tokens.nbr_cos: must be NULL for prefix tokens ('cls'/'reg'/'ttreg')")

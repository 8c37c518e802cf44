"""Data that breaks the contract is refused with a message that says what and where."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tokenlake.store import (
    ArraySpec,
    ContractError,
    LakeError,
    RunWriter,
    read_subset,
    subset_checksum,
    table_checksum,
    write_run,
    write_subset,
)
from tokenlake.store.testing import tiny_run


def _set(t: pa.Table, name: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, values)


@pytest.fixture
def r():
    return tiny_run(n_images=4)


def test_wrong_column_type(tmp_path, r):
    bad = _set(r["tokens"], "token", r["tokens"].column("token").cast(pa.string()))
    with pytest.raises(ValueError, match=r"tokens\.token: has type string, expected int32"):
        write_run(tmp_path, "x", **{**r, "tokens": bad})


def test_missing_and_extra_columns(tmp_path, r):
    bad = r["images"].drop_columns(["label"]).append_column("extra", pa.array([1, 2, 3, 4]))
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['label'\]; unexpected column\(s\) \['extra'\]"
    ):
        write_run(tmp_path, "x", **{**r, "images": bad})


def test_lossless_casts_are_done(tmp_path, r):
    images = _set(r["images"], "width", r["images"].column("width").cast(pa.int64()))
    tokens = _set(r["tokens"], "image_id", r["tokens"].column("image_id").cast(pa.int32()))
    write_run(tmp_path, "x", **{**r, "images": images, "tokens": tokens})
    with pytest.raises(ValueError, match=r"images\.width: cannot cast int64 to int32"):
        write_run(tmp_path, "y", **{**r, "images": _set(images, "width", pa.array([2**40] * 4))})


def test_bad_kind(tmp_path, r):
    kind = pc.replace_substring(r["tokens"].column("kind"), "reg", "register")
    with pytest.raises(ValueError, match=r"tokens\.kind: invalid value\(s\) \['register'\]"):
        write_run(tmp_path, "x", **{**r, "tokens": _set(r["tokens"], "kind", kind)})


def test_slot_out_of_range(tmp_path, r):
    slot = pc.add(r["tokens"].column("slot"), 1)
    with pytest.raises(ValueError, match=r"tokens\.slot: out of range \[0, 84\)"):
        write_run(tmp_path, "x", **{**r, "tokens": _set(r["tokens"], "slot", slot)})


def test_wrong_array_dtype_and_shape(tmp_path, r):
    w = RunWriter(
        tmp_path,
        "w",
        config={},
        shard_size=4,
        n_shards=1,
        tokens_per_image=21,
        arrays={
            "tokens": ArraySpec(shape=(8,), dtype="float16", kind="token"),
            "cls_post": ArraySpec(shape=(8,), dtype="float32", kind="image"),
        },
    )
    args = {"images": r["images"], "tokens": r["tokens"], "errors": None}
    arrays = {
        "tokens": r["arrays"]["tokens"].astype(np.float32),
        "cls_post": r["arrays"]["cls_post"],
    }
    with pytest.raises(ValueError, match=r"arrays\['tokens'\]: dtype float32, expected float16"):
        w.write_shard(0, **args, arrays=arrays)
    arrays = {"tokens": r["arrays"]["tokens"], "cls_post": r["arrays"]["cls_post"][:3]}
    with pytest.raises(ValueError, match=r"arrays\['cls_post'\]: 3 rows but `images` has 4"):
        w.write_shard(0, **args, arrays=arrays)


def test_image_id_not_in_shard(tmp_path, r):
    w = RunWriter(
        tmp_path, "w", config={}, shard_size=4, n_shards=2, tokens_per_image=21, arrays={}
    )
    tokens = _set(r["tokens"], "slot", pa.nulls(len(r["tokens"]), pa.int64()))
    with pytest.raises(
        ValueError, match=r"images\.image_id: 4 id\(s\) outside shard s00001's range \[4, 8\)"
    ):
        w.write_shard(1, images=r["images"], tokens=tokens, errors=None, arrays={})


def test_tokens_must_match_images(tmp_path, r):
    tokens = r["tokens"].slice(0, 80)  # last image loses a token
    with pytest.raises(ContractError, match=r"image_id 3: n_tokens 21, but it has 17 token rows"):
        write_run(tmp_path, "x", **{**r, "tokens": tokens})
    with pytest.raises(ContractError, match="appear in both images and errors"):
        write_run(
            tmp_path,
            "y",
            **{
                **r,
                "errors": pa.table(
                    {"image_id": [1], "source_index": [1], "source_id": ["a"], "reason": ["b"]}
                ),
            },
        )


def test_subset_roundtrip_and_checksum(tmp_path):
    t = pa.table(
        {
            "source": ["imagenet"] * 3,
            "split": ["val", None, "val"],
            "source_index": pa.array([5, 1, 9], pa.int32()),
            "source_id": ["a", "b", "c"],
            "label": pa.array([1, None, 3], pa.int64()),
        }
    )
    write_subset(tmp_path, "val3", t)
    back = read_subset(tmp_path, "val3")
    assert back.column("source_index").type == pa.int64() and back.column("split").to_pylist() == [
        "val",
        None,
        "val",
    ]
    assert subset_checksum(tmp_path, "val3") == table_checksum(t)
    assert table_checksum(t.slice(0, 2)) != table_checksum(t)
    with pytest.raises(LakeError, match="did you mean 'val3'"):
        read_subset(tmp_path, "val4")

"""Fault injection: a damaged lake is detected or refused with a message naming the run, the shard
and `tokenlake validate`, and the undamaged runs of the same lake still answer.

Each test builds a lake of synthetic runs (store.testing), damages one run the way a disk, a
person or a killed process would, and checks the reading side: gather and image_array, validate
(full and --quick), write_subset, the writer's clean-up of temporary files, names, and the order
of the fsyncs that make a commit survive a power loss.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from filelock import FileLock

from tokenlake.cli.main import main
from tokenlake.store import (
    ArraySpec,
    ContractError,
    DamagedRun,
    LakeError,
    PixelStore,
    RunWriter,
    UnknownRun,
    open_lake,
    read_subset,
    table_checksum,
    write_run,
    write_subset,
)
from tokenlake.store._io import atomic_write, parquet_bytes
from tokenlake.store.testing import synthetic_run, tiny_run

SS = 4  # shard_size: 8 images make two shards


def _lake(root: Path, *damaged: str, **kw) -> tuple:
    """A lake with the run 'good' and the given runs, each tiny_run(8 images) in two shards."""
    runs = {}
    for k, name in enumerate(("good", *damaged)):
        runs[name] = tiny_run(n_images=8, seed=k, **kw)
        write_run(root, name, shard_size=SS, **runs[name])
    return open_lake(root), runs


def _marker(root: Path, run: str, shard: int) -> dict:
    return json.loads((root / "runs" / run / "shards" / f"s{shard:05d}.json").read_text())


def _chunk(root: Path, run: str, array: str, chunk: int) -> Path:
    lay = open_lake(root).layout(run).arrays[array]
    return root / "runs" / run / "arrays.zarr" / array / "c" / str(chunk) / "/".join(
        ["0"] * len(lay.shape))


def _slots(lk, run: str) -> np.ndarray:
    t = lk.sql(f"SELECT slot FROM tokens WHERE run = '{run}' ORDER BY image_id, token")
    return t.column("slot").to_numpy()


def _assert_good_answers(lk, runs) -> None:
    """The undamaged run 'good' reads exactly what was written and validates clean."""
    src = runs["good"]
    emb, pix = lk.gather("good", _slots(lk, "good"), pixels=True)
    np.testing.assert_array_equal(emb, src["arrays"]["tokens"])
    np.testing.assert_array_equal(pix, src["arrays"]["pixels"])
    ids = src["images"].column("image_id").to_numpy()
    np.testing.assert_array_equal(lk.image_array("good", "cls_post", ids),
                                  src["arrays"]["cls_post"])
    assert lk.validate("good") == [] and lk.validate("good", quick=True) == []


# -- 1. a missing array chunk --------------------------------------------------------------------


@pytest.mark.parametrize("array, kind", [("tokens", "token"), ("pixels", "token"),
                                         ("cls_post", "image")])
def test_a_missing_chunk_is_an_error_not_zeros(tmp_path, array, kind, capsys):
    lk, runs = _lake(tmp_path, "bad")
    chunk = _marker(tmp_path, "bad", 1)["arrays"][array]["chunks"][0]
    _chunk(tmp_path, "bad", array, chunk).unlink()
    lk = open_lake(tmp_path)
    if kind == "token":
        slots = _slots(lk, "bad")
        cap = lk.layout("bad").slot_capacity
        lk.gather("bad", slots[slots < cap], pixels=True)  # shard 0 is whole: still read

        def read():
            return lk.gather("bad", slots, pixels=array == "pixels")
    else:
        lk.image_array("bad", array, [0, 1])

        def read():
            return lk.image_array("bad", array, [5])
    with pytest.raises(DamagedRun, match=(
            rf"run 'bad', shard s00001: chunk {chunk} of array '{array}' "
            rf"\(arrays.zarr/{array}/c/{chunk}/0.*\) is missing, though the shard's commit "
            rf"marker lists it.*`tokenlake validate --lake {tmp_path.resolve()} --runs bad`")):
        read()
    for quick in (False, True):
        (problem,) = lk.validate("bad", quick=quick)
        assert problem == f"bad/s00001: chunk {chunk} of array '{array}' is missing"
    assert main(["validate", "--lake", str(tmp_path), "--quick"]) == 1
    assert "bad/s00001: chunk" in capsys.readouterr().out
    _assert_good_answers(lk, runs)


def test_a_truncated_chunk_is_an_error(tmp_path):
    lk, runs = _lake(tmp_path, "bad")
    path = _chunk(tmp_path, "bad", "tokens", 0)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LakeError, match=r"run 'bad', shard s00000: chunk 0 of array 'tokens' .* "
                                        r"has 100 bytes, a whole chunk has 1024.*tokenlake validate"):
        open_lake(tmp_path).gather("bad", [0])
    assert "has 100 bytes" in lk.validate("bad", quick=True)[0]
    _assert_good_answers(lk, runs)


def test_maps_fail_instead_of_drawing_black(tmp_path):
    from tokenlake import analyze

    root = tmp_path / "lake"
    write_run(root, "same", shard_size=SS, **synthetic_run())
    marker = _marker(root, "same", 0)
    for c in marker["arrays"]["pixels"]["chunks"]:
        _chunk(root, "same", "pixels", c).unlink()
    with pytest.raises(LakeError, match=r"run 'same', shard s00000: chunk \d+ of array 'pixels'"):
        analyze.maps(open_lake(root), out=tmp_path / "out", images="img0.jpg")


def test_chunks_no_marker_lists_read_as_zero_whatever_lies_there(tmp_path):
    """Shard 1 holds only errored inputs: it writes no chunk. A stray file where its chunk would
    be (an aborted attempt, another tool) is not part of the lake and is not read."""
    r = tiny_run(n_images=4, error_ids=(4, 5, 6, 7))
    write_run(tmp_path, "e", shard_size=SS, **r)
    lk = open_lake(tmp_path)
    mk = _marker(tmp_path, "e", 1)
    assert all(a["chunks"] == [] for a in mk["arrays"].values())
    cap = lk.layout("e").slot_capacity
    for array, chunk in (("cls_post", 1), ("tokens", cap // 64)):
        path = _chunk(tmp_path, "e", array, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff" * len(_chunk(tmp_path, "e", array, 0).read_bytes()))
    assert not lk.image_array("e", "cls_post", [4, 5, 6, 7]).any()
    assert not lk.gather("e", [cap, cap + 1]).any()
    # rows of listed chunks that the shard did not use (padding) read as the zeros written there
    assert not lk.gather("e", [cap - 1]).any()
    assert lk.validate("e") == []


def test_a_marker_that_disagrees_with_the_manifest_stops_gather(tmp_path):
    lk, runs = _lake(tmp_path, "bad")
    p = tmp_path / "runs" / "bad" / "shards" / "s00001.json"
    mk = json.loads(p.read_text())
    mk["arrays"]["tokens"]["chunks"] = mk["arrays"]["tokens"]["chunks"][:1]  # hide a chunk
    p.write_text(json.dumps(mk))
    lk = open_lake(tmp_path)
    with pytest.raises(LakeError, match=r"run 'bad', shard s00001: its commit marker "
                                        r"shards/s00001.json does not match the hash the run's "
                                        r"manifest records.*tokenlake validate"):
        lk.gather("bad", _slots(lk, "bad"))
    assert "bad/s00001: marker changed since the manifest was written" in lk.validate("bad")
    _assert_good_answers(lk, runs)


# -- 2. a flipped byte in a Parquet file ---------------------------------------------------------


def _flip_in_column(path: Path, column: str) -> None:
    """Flip the last byte of `column`'s first column chunk: inside its (compressed) data page."""
    col = pq.ParquetFile(path).metadata.row_group(0).column(
        pq.read_schema(path).get_field_index(column))
    at = col.data_page_offset + col.total_compressed_size - 1
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_parquet_byte_is_caught_by_page_checksums_and_validate(tmp_path):
    lk, runs = _lake(tmp_path, "bad")
    f = tmp_path / "runs" / "bad" / "tokens" / "s00000.parquet"
    _flip_in_column(f, "norm")
    # every table is written with page checksums: a reader that verifies them refuses the page
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(f, page_checksum_verification=True)
    problems = lk.validate("bad")
    assert problems == [("bad/s00000: tokens/s00000.parquet does not match its checksum in the "
                        "marker")]
    assert lk.validate("bad", quick=True) == []  # same size: --quick does not hash (documented)
    _assert_good_answers(lk, runs)


def test_writing_stays_deterministic_with_page_checksums(tmp_path):
    r = tiny_run(n_images=8)
    for lake in ("a", "b"):
        write_run(tmp_path / lake, "x", shard_size=SS, **r)
    for table in ("images", "tokens", "errors"):
        for shard in ("s00000", "s00001"):
            a, b = (tmp_path / lake / "runs" / "x" / table / f"{shard}.parquet"
                    for lake in ("a", "b"))
            assert a.read_bytes() == b.read_bytes()
    assert pq.read_table(a, page_checksum_verification=True).num_rows == 0  # no errors: empty


# -- 3. a tampered manifest ----------------------------------------------------------------------


def _other_files(m):
    m["shards"][1]["files"]["tokens"] = "tokens/s00000.parquet"  # SQL would count shard 0 twice


def _counts(m):
    m["shards"][0]["n_images"] += 1
    m["n_images"] += 1


def _totals(m):
    m["n_tokens"] -= 21


def _fewer_shards(m):
    m["shards"] = m["shards"][:1]


def _escape(m):
    m["shards"][0]["files"]["images"] = "../good/images/s00000.parquet"


@pytest.mark.parametrize("tamper, why", [
    (_other_files, "bad/s00001: manifest lists files"),
    (_counts, "bad/s00000: manifest's n_images differ from the marker's"),
    (_totals, "bad: manifest.json totals n_tokens 147 differ from the markers' sums 168"),
    (_fewer_shards, "bad: manifest.json lists 1 shards, but n_shards is 2"),
    (_escape, "bad/s00000: manifest lists files"),
])
@pytest.mark.parametrize("quick", [False, True])
def test_a_tampered_manifest_fails_validate(tmp_path, tamper, why, quick, capsys):
    lk, runs = _lake(tmp_path, "bad")
    p = tmp_path / "runs" / "bad" / "manifest.json"
    m = json.loads(p.read_text())
    tamper(m)
    p.write_text(json.dumps(m))
    lk = open_lake(tmp_path)
    problems = lk.validate("bad", quick=quick)
    assert any(x.startswith(why) for x in problems), problems
    argv = ["validate", "--lake", str(tmp_path), *(["--quick"] if quick else [])]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert why in out and not any(line.startswith("good") for line in out.splitlines())
    _assert_good_answers(lk, runs)


def test_a_marker_that_lies_about_its_files_fails_validate(tmp_path):
    lk, runs = _lake(tmp_path, "bad")
    for name in ("manifest.json", "shards/s00001.json"):
        p = tmp_path / "runs" / "bad" / name
        text = p.read_text().replace("tokens/s00001.parquet", "tokens/s00000.parquet")
        p.write_text(text)
    problems = open_lake(tmp_path).validate("bad", quick=True)
    assert ("bad/s00001: marker names 'tokens/s00000.parquet' for table tokens, expected "
            "tokens/s00001.parquet") in problems
    _assert_good_answers(lk, runs)


# -- 4. subsets are write-once -------------------------------------------------------------------


def _subset(n: int, first: int = 0) -> pa.Table:
    return pa.table({"source": ["imagefolder:x"] * n, "split": pa.array([None] * n, pa.string()),
                     "source_index": list(range(first, first + n)),
                     "source_id": [f"img{i}.jpg" for i in range(first, first + n)],
                     "label": [0] * n})


def test_a_subset_is_written_once(tmp_path):
    p = write_subset(tmp_path, "s", _subset(4))
    before = p.stat()
    assert write_subset(tmp_path, "s", _subset(4)) == p  # the same rows: a no-op
    after = p.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(LakeError, match=r"subset 's' already exists with other rows .*write-once: "
                                        r"runs made from it record its checksum.*another --name"):
        write_subset(tmp_path, "s", _subset(4, first=1))
    assert table_checksum(read_subset(tmp_path, "s")) == table_checksum(_subset(4))
    assert not list((tmp_path / "subsets").glob("*.tmp-*"))


def test_validate_checks_the_subset_a_run_recorded(tmp_path):
    write_subset(tmp_path, "planted", _subset(8))
    rec = {"name": "planted", "checksum": table_checksum(_subset(8)), "n": 8}
    r = tiny_run(n_images=8, manifest_extra={"subset_info": rec})
    write_run(tmp_path, "x", shard_size=SS, **r)
    lk = open_lake(tmp_path)
    assert lk.validate("x") == []
    # rewritten behind the store's back (write_subset refuses it): the run's image_ids no
    # longer name the subset's rows
    atomic_write(tmp_path / "subsets" / "planted.parquet", parquet_bytes(_subset(8, first=3)))
    (problem,) = lk.validate("x")
    assert problem.startswith("x: subset 'planted' changed since the run recorded its checksum")
    assert lk.validate("x", quick=True) == []  # --quick does not read the subset's rows
    (tmp_path / "subsets" / "planted.parquet").unlink()
    for quick in (False, True):
        assert lk.validate("x", quick=quick) == [
            "x: its subset 'planted' (subsets/planted.parquet) is missing"]


def test_adhoc_subsets_of_two_folders_with_one_name_do_not_collide(tmp_path, image_helpers):
    from tokenlake.cli._commands import _adhoc_subset
    from tokenlake.cli._errors import CommandError

    lake = tmp_path / "lake"
    names = []
    for parent, n in (("a", 2), ("b", 3)):
        folder = tmp_path / parent / "imgs"
        image_helpers.write_flat_folder(folder, n=n)
        args = argparse.Namespace(data=str(folder), split=None, limit=2, lake=lake)
        names.append(_adhoc_subset(args))
        assert _adhoc_subset(args) == names[-1]  # again: the same subset, a no-op
    a, b = names
    assert a != b and a.startswith("imgs-first2-") and b.startswith("imgs-first2-")
    ids = [read_subset(lake, n).column("source_id").to_pylist() for n in names]
    assert all(len(x) == 2 for x in ids)
    # the same folder under another limit is another subset too
    args = argparse.Namespace(data=str(tmp_path / "a" / "imgs"), split=None, limit=1, lake=lake)
    assert _adhoc_subset(args) not in names
    # a folder whose first images changed is refused, not redrawn under the runs that used it
    first = read_subset(lake, a).column("source_id")[0].as_py()
    (tmp_path / "a" / "imgs" / first).unlink()
    args = argparse.Namespace(data=str(tmp_path / "a" / "imgs"), split=None, limit=2, lake=lake)
    with pytest.raises(CommandError, match=rf"--data .*: its first 2 images changed since subset "
                                           rf"'{a}' was drawn.*tokenlake subset --lake"):
        _adhoc_subset(args)
    assert read_subset(lake, a).column("source_id")[0].as_py() == first


# -- 5. validate on an empty or non-lake folder --------------------------------------------------


@pytest.mark.parametrize("content, what", [
    ({}, "an empty folder"),
    ({"notes.txt": "hello"}, "not a lake (no runs/ or subsets/ folder)"),
])
def test_validate_on_an_empty_or_non_lake_folder_says_so(tmp_path, content, what, capsys):
    for name, text in content.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(LakeError, match=rf"nothing to validate in .*: {re.escape(what)}"):
        open_lake(tmp_path).validate()
    assert main(["validate", "--lake", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert what in err and "is --lake right?" in err
    write_subset(tmp_path, "s", _subset(2))  # a lake holding only a subset: no run to check
    assert main(["validate", "--lake", str(tmp_path)]) == 2
    assert "a lake without runs" in capsys.readouterr().err


# -- 6. leftovers of killed writers --------------------------------------------------------------


def _temp(path: Path, pid: int = 999_999) -> Path:
    """A temporary file as atomic_write names them, left by a writer killed before its rename."""
    t = path.with_name(f"{path.name}.tmp-{pid}-{os.urandom(16).hex()}")
    t.parent.mkdir(parents=True, exist_ok=True)
    t.write_bytes(b"\0" * 64)
    return t


def _specs(r) -> dict:
    return {n: ArraySpec(shape=a.shape[1:], dtype=a.dtype.name,
                         kind="token" if n in ("tokens", "pixels") else "image")
            for n, a in r["arrays"].items()}


def _shard_args(r, i):
    import pyarrow.compute as pc

    im = pc.equal(pc.divide(r["images"].column("image_id"), SS), i)
    tokens = r["tokens"].filter(pc.equal(pc.divide(r["tokens"].column("image_id"), SS), i))
    slot = tokens.column("slot").to_numpy()
    tokens = tokens.set_column(8, "slot", pa.array(slot - slot.min(), pa.int64()))
    keep = np.asarray(im)
    arrays = {n: (a[slot] if n in ("tokens", "pixels") else a[keep])
              for n, a in r["arrays"].items()}
    return {"images": r["images"].filter(im), "tokens": tokens, "errors": None, "arrays": arrays}


def test_resuming_sweeps_the_temp_files_no_live_writer_owns(tmp_path):
    r = tiny_run(n_images=12)

    def new():
        return RunWriter(tmp_path, "k", config=r["manifest"], shard_size=SS, n_shards=3,
                         tokens_per_image=21, arrays=_specs(r))

    def chunk(shard):  # the shard's first tokens chunk (2 per shard)
        return _chunk(tmp_path, "k", "tokens", 2 * shard)

    w = new()
    w.write_shard(0, **_shard_args(r, 0))
    run = w.dir
    (run / "arrays.zarr" / "tokens" / "c" / "2").mkdir(parents=True, exist_ok=True)
    killed = [_temp(run / "tokens" / "s00001.parquet"), _temp(run / "shards" / "s00001.json"),
              _temp(chunk(1)), _temp(_chunk(tmp_path, "k", "cls_post", 1))]  # shard 1, uncommitted
    committed = [_temp(run / "images" / "s00000.parquet"), _temp(chunk(0))]  # shard 0's, an
    # older tokenlake's leftovers
    live = [_temp(run / "tokens" / "s00002.parquet", pid=os.getpid()), _temp(chunk(2))]
    own = [_temp(run / "manifest.json"), _temp(run / "config.json")]
    foreign = run / "tokens" / "notes.tmp-draft"  # not a name atomic_write makes: left alone
    foreign.write_text("x")

    w = new()  # a resumed writer: the run's own temporary files go, under run.lock
    assert not any(p.exists() for p in own)
    with w.claim(1) as todo:  # the shard's lock: no live writer owns its temporary files
        assert todo and not any(p.exists() for p in killed)
        w.write_shard(1, **_shard_args(r, 1))
    assert all(p.exists() for p in committed + live)
    holder = FileLock(str(run / "shards" / "s00002.lock"))
    with holder:  # a live writer of shard 2 (another process, or another thread)
        gone = set(w.sweep_temp())
        assert gone == set(committed) and all(p.exists() for p in live)
    w.write_shard(2, **_shard_args(r, 2))  # under its lock, shard 2's writer sweeps its own
    assert not any(p.exists() for p in live)
    w.commit(r["manifest"])
    assert foreign.exists()
    left = [p for p in run.rglob("*") if ".tmp-" in p.name and p != foreign]
    assert left == []
    assert open_lake(tmp_path).validate("k") == []


def test_commit_sweeps_what_a_killed_run_left(tmp_path):
    """A run whose writer was killed mid-shard and that another process finished: the commit
    (or a rerun of the finished run) deletes the leftovers of its committed shards."""
    r = tiny_run(n_images=8)
    write_run(tmp_path, "k", shard_size=SS, **r)
    run = tmp_path / "runs" / "k"
    left = [_temp(run / "tokens" / "s00001.parquet"), _temp(_chunk(tmp_path, "k", "pixels", 3)),
            _temp(run / "shards" / "s00000.json")]
    write_run(tmp_path, "k", shard_size=SS, **r)  # rerun of a complete run: commit is a no-op
    assert not any(p.exists() for p in left)


def test_building_a_pixel_store_sweeps_its_temp_files(tmp_path):
    store = PixelStore(tmp_path, "px")
    recipe = {"n": 3, "shard_size": 2, "img_size": 4, "subset": "s", "decoder": "pil"}
    store.create(recipe)

    def meta(lo, n):
        return pa.table({"position": list(range(lo, lo + n)), "width": [4] * n,
                         "height": [4] * n, "reason": pa.array([None] * n, pa.string()),
                         "decoder": ["pil"] * n})

    store.write_shard(0, pixels=np.ones((2, 4, 4, 3), np.uint8), meta=meta(0, 2))
    shards = store.dir / "shards"
    old = [_temp(shards / "s00000.npy"), _temp(shards / "s00000.parquet"),
           _temp(store.dir / "recipe.json")]
    killed = [_temp(shards / "s00001.npy"), _temp(shards / "s00001.json")]
    PixelStore(tmp_path, "px").create(recipe)  # a build starts again
    assert not any(p.exists() for p in old) and all(p.exists() for p in killed)
    store.write_shard(1, pixels=np.ones((1, 4, 4, 3), np.uint8), meta=meta(2, 1))
    assert not any(p.exists() for p in killed)
    assert store.is_complete() and store.validate() == []
    (shards / "s00001.npy").write_bytes(b"")  # a shard whose data a crash lost
    with pytest.raises(LakeError, match=r"pixel store 'px', shard s00001: s00001.npy has 0 bytes"):
        PixelStore(tmp_path, "px").read(2)


# -- 7. names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["run\n", "run\r", "ru n", "-run", ".run", "run/x", ""])
def test_names_must_match_whole(tmp_path, name):
    r = tiny_run(n_images=2)
    with pytest.raises(ContractError, match="invalid run name"):
        write_run(tmp_path, name, **r)
    with pytest.raises(ContractError, match="invalid subset name"):
        write_subset(tmp_path, name, _subset(2))
    with pytest.raises(ContractError, match="invalid array name"):
        RunWriter(tmp_path, "ok", config={}, shard_size=2, n_shards=1, tokens_per_image=0,
                  arrays={name: ArraySpec(shape=(2,), dtype="float32", kind="image")})
    assert not (tmp_path / "runs").exists() and not (tmp_path / "subsets").exists()
    write_run(tmp_path, "run", **r)
    lk = open_lake(tmp_path)
    with pytest.raises(UnknownRun):
        lk.manifest(name)
    with pytest.raises(UnknownRun):
        lk.gather(name, [0])
    assert lk.run_config(name) is None


# -- 8. power-loss safety: the order of fsyncs ---------------------------------------------------


def test_every_commit_is_durable_before_the_next_step(tmp_path, monkeypatch):
    from tokenlake.store import _io

    events: list[tuple[str, Path]] = []
    real_replace, real_fsync_dir = os.replace, _io.fsync_dir

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("rename", Path(dst)))

    def fsync_dir(path):
        real_fsync_dir(path)
        events.append(("fsync", Path(path)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(_io, "fsync_dir", fsync_dir)
    write_run(tmp_path, "p", shard_size=SS, **tiny_run(n_images=8))
    run = tmp_path.resolve() / "runs" / "p"

    def synced_between(folder: Path, lo: int, hi: int) -> bool:
        return ("fsync", folder) in events[lo:hi]

    renames = [(k, p) for k, (e, p) in enumerate(events) if e == "rename"]
    markers = [(k, p) for k, p in renames if p.parent == run / "shards"]
    assert len(markers) == 2
    for k, marker in markers:
        mk = json.loads(marker.read_text())
        expect = {run / f["name"] for f in mk["files"].values()}
        for name, a in mk["arrays"].items():
            expect |= {_chunk(tmp_path, "p", name, c).resolve() for c in a["chunks"]}
        done = {p: j for j, p in renames if p in expect}
        assert set(done) == expect and max(done.values()) < k
        for p, j in done.items():
            # the file's folder after its rename, and the folder holding a new chunk folder,
            # are durable before the marker is written
            assert synced_between(p.parent, j, k), p
            if "arrays.zarr" in p.parts:
                assert synced_between(p.parent.parent, 0, k), p
        assert synced_between(run / "shards", k, len(events))  # then the marker itself
    (manifest,) = [k for k, p in renames if p == run / "manifest.json"]
    assert manifest > max(k for k, _ in markers)
    assert synced_between(run, manifest, len(events))

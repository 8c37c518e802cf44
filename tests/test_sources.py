"""open_source and draw_subset over image folders, saved datasets and (faked) hub datasets."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest

from tokenlake.extract import testing as images
from tokenlake.extract._decode import ImageRejected, decode_image
from tokenlake.extract._sources import Source, SourceError, open_source
from tokenlake.extract._subsets import SUBSET_SCHEMA, draw_subset


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    return root, images.write_imagefolder(root)


def _outcome(data):
    try:
        out = decode_image(data)
        return ("ok", out.width, out.height)
    except ImageRejected as e:
        return ("rejected", e.reason)


def _check_all_records(src: Source, expected: dict) -> None:
    recs = list(src.records(range(src.num_rows)))
    assert [r.source_id for r in recs] == sorted(expected)  # sorted, every input present
    for r in recs:
        cls, outcome = expected[r.source_id]
        assert isinstance(r.data, str) and Path(r.data).is_file()
        assert r.label == (None if cls is None else src.label_names.index(cls))
        got = _outcome(r.data)
        assert got[0] == outcome[0] and (
            got[1:] == outcome[1:] if got[0] == "ok" else got[1].startswith(outcome[1])
        )


def test_imagefolder_classes_bad_files_and_order(folder, cache):
    root, expected = folder
    src = open_source(str(root), cache_dir=cache)
    assert src.num_rows == len(expected) == 15
    assert src.label_names == ["cat", "dog", "zebra"]
    assert src.split is None and src.spec == str(root)
    _check_all_records(src, expected)
    ids = [r.source_id for r in src.records(range(src.num_rows))]
    assert "README.txt" not in ids and "zebra/notes.md" not in ids  # not inputs
    assert {"cat/broken_truncated.jpg", "cat/broken_empty.png", "cat/broken_text.JPEG"} <= set(ids)


def test_records_in_given_order_and_record(folder, cache):
    src = open_source(str(folder[0]), cache_dir=cache)
    order = [7, 0, 14, 7, 3]
    assert [r.source_index for r in src.records(order)] == order
    assert src.record(14) == next(iter(src.records([14])))
    assert src.ids_and_labels(order) == (
        [src.record(i).source_id for i in order],
        [src.record(i).label for i in order],
    )
    with pytest.raises(IndexError, match="out of range"):
        src.record(15)


def test_flat_folder_has_no_labels(tmp_path, cache):
    expected = images.write_flat_folder(tmp_path / "flat")
    src = open_source(str(tmp_path / "flat"), cache_dir=cache)
    assert src.label_names is None and src.num_rows == len(expected)
    _check_all_records(src, expected)


def test_split_keywords_in_names_do_not_drop_files(tmp_path, cache):
    # datasets alone turns cat/test_1.jpg into a "test" split and drops the other files
    root = tmp_path / "kw"
    for rel in ["cat/a.jpg", "cat/test_1.jpg", "dog/val_b.jpg", "dog/c.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        images.write_rgb_jpeg(root / Path(rel).parent, Path(rel).name)
    src = open_source(str(root), cache_dir=cache)
    recs = list(src.records(range(src.num_rows)))
    assert [r.source_id for r in recs] == [
        "cat/a.jpg",
        "cat/test_1.jpg",
        "dog/c.jpg",
        "dog/val_b.jpg",
    ]
    assert [r.label for r in recs] == [0, 0, 1, 1]


def test_split_subfolders(tmp_path, cache):
    root = tmp_path / "splits"
    for split in ["train", "val"]:
        for cls in ["a", "b"]:
            (root / split / cls).mkdir(parents=True)
            images.write_rgb_jpeg(root / split / cls, f"{split}{cls}.jpg")
    with pytest.raises(SourceError, match="choose one with --split"):
        open_source(str(root), cache_dir=cache)
    src = open_source(str(root), split="val", cache_dir=cache)
    assert src.split == "val" and src.label_names == ["a", "b"]
    assert [r.source_id for r in src.records([0, 1])] == ["a/vala.jpg", "b/valb.jpg"]
    with pytest.raises(SourceError, match="without a sub-folder 'test'"):
        open_source(str(root), split="test", cache_dir=cache)


def _image_dataset(tmp_path, n=6):
    d = tmp_path / "raw"
    d.mkdir()
    paths = [
        str(images.write_rgb_jpeg(d, f"p{i}.jpg", width=10 + i, height=8, seed=i))
        for i in range(n - 2)
    ]
    paths.append(str(images.write_truncated_jpeg(d, "bad.jpg")))
    paths.append(str(images.write_empty(d, "empty.jpg")))
    feats = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["x", "y"]),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"img": paths, "label": [i % 2 for i in range(n)], "caption": ["c"] * n}, features=feats
    )


def test_saved_dataset(tmp_path):
    ds = _image_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    spec = str(tmp_path / "saved")
    src = open_source(spec)
    assert src.num_rows == 6 and src.label_names == ["x", "y"] and src.image_column == "img"
    recs = list(src.records(range(6)))
    assert all(isinstance(r.data, bytes) for r in recs)  # save_to_disk embeds the files
    assert [r.label for r in recs] == [0, 1, 0, 1, 0, 1]
    assert recs[2].source_id == f"{spec}:None:2"
    assert [_outcome(r.data)[0] for r in recs] == ["ok"] * 4 + ["rejected"] * 2
    assert _outcome(recs[1].data) == ("ok", 11, 8)
    assert _outcome(recs[4].data) == ("rejected", "truncated")
    assert _outcome(recs[5].data) == ("rejected", "empty file")


def test_saved_dataset_dict_splits(tmp_path):
    ds = _image_dataset(tmp_path)
    dd = datasets.DatasetDict({"train": ds.select(range(4)), "test": ds.select([4, 5, 0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match=r"has splits \['train', 'test'\]"):
        open_source(str(tmp_path / "dd"))
    src = open_source(str(tmp_path / "dd"), split="test")
    assert src.num_rows == 3 and src.split == "test"
    assert src.record(2).source_id == f"{tmp_path / 'dd'}:test:2"
    with pytest.raises(SourceError, match="no split 'validation'"):
        open_source(str(tmp_path / "dd"), split="validation")


def test_no_image_column(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "txt"))
    with pytest.raises(SourceError, match="has no image column"):
        open_source(str(tmp_path / "txt"))


def test_int_label_column_without_classlabel(tmp_path):
    ds = _image_dataset(tmp_path).remove_columns("label").add_column("label", [3, -1, 5, 0, 1, 2])
    ds.save_to_disk(str(tmp_path / "s"))
    src = open_source(str(tmp_path / "s"))
    assert src.label_names is None
    assert [r.label for r in src.records(range(3))] == [3, None, 5]  # -1 means unlabelled


@pytest.mark.parametrize("spec", ["./no/such/dir", "/definitely/not/here", "a/b/c"])
def test_missing_path_error(spec):
    with pytest.raises(SourceError, match="no such directory") as exc:
        open_source(spec)
    assert "hub dataset name" in str(exc.value)


def test_hub_name_calls_load_dataset(tmp_path, monkeypatch):
    ds = _image_dataset(tmp_path)
    calls = []

    def fake(name, *, split=None, cache_dir=None):
        calls.append((name, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake)
    src = open_source("ILSVRC/imagenet-1k", split="validation")
    assert calls == [("ILSVRC/imagenet-1k", "validation")]
    assert src.num_rows == 6 and src.label_names == ["x", "y"]
    assert src.record(3).source_id == "ILSVRC/imagenet-1k:validation:3"


def test_hub_failure_is_explained(monkeypatch):
    def fake(name, *, split=None, cache_dir=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(SourceError, match="logged in") as exc:
        open_source("ILSVRC/imagenet-1k", split="validation")
    assert "offline" in str(exc.value) and isinstance(exc.value.__cause__, ConnectionError)


def test_directory_without_images(tmp_path, cache):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("nothing here")
    # datasets reads README.txt as a text dataset; either way the error names the problem
    with pytest.raises(SourceError, match="no image column|no image files"):
        open_source(str(tmp_path / "docs"), cache_dir=cache)


def test_local_parquet_repo_goes_through_load_dataset(tmp_path, cache):
    # the same datasets.load_dataset(spec, split=...) call the hub path makes, run for real
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    _image_dataset(tmp_path).to_parquet(str(repo / "train-00000-of-00001.parquet"))
    src = open_source(str(tmp_path / "repo"), split="train", cache_dir=cache)
    assert src.num_rows == 6 and src.image_column == "img"
    assert _outcome(src.record(0).data) == ("ok", 10, 8)


def test_real_imagenet_sample_folder(cache, imagenet_sample):
    src = open_source(str(imagenet_sample), cache_dir=cache)
    assert src.num_rows == 500 and src.label_names is None  # flat folder; labels.csv is no input
    ids = [r.source_id for r in src.records(range(src.num_rows))]
    assert ids == sorted(ids) and all(i.endswith(".JPEG") for i in ids)
    for r in src.records(range(0, 500, 25)):
        assert decode_image(r.data).image.mode == "RGB"


# --- draw_subset ---------------------------------------------------------------------------


@pytest.fixture
def src(folder, cache):
    return open_source(str(folder[0]), cache_dir=cache)


def test_draw_subset_seeded_sample(src):
    t = draw_subset(src, n=5, seed=42)
    assert t.schema == SUBSET_SCHEMA
    idx = t.column("source_index").to_pylist()
    assert idx == np.random.default_rng(42).permutation(15)[:5].tolist()  # drawn order, not sorted
    assert len(set(idx)) == 5
    assert t.equals(draw_subset(src, n=5, seed=42))
    assert not t.equals(draw_subset(src, n=5, seed=43))
    recs = list(src.records(idx))
    assert t.column("source_id").to_pylist() == [r.source_id for r in recs]
    assert t.column("label").to_pylist() == [r.label for r in recs]
    assert set(t.column("source").to_pylist()) == {src.spec}


def test_draw_subset_prefix_property_and_limit(src):
    # a bigger draw with the same seed starts with the smaller one: keep-if-outlier walks it in order
    small = draw_subset(src, n=4, seed=7).column("source_index").to_pylist()
    full = draw_subset(src, n=15, seed=7).column("source_index").to_pylist()
    assert full[:4] == small and sorted(full) == list(range(15))
    assert draw_subset(src, n=15, seed=7, limit=4).column("source_index").to_pylist() == small


def test_draw_subset_all_and_errors(src):
    t = draw_subset(src, n=None)
    assert t.column("source_index").to_pylist() == list(range(15))
    assert t.column("split").null_count == 15
    assert draw_subset(src, n=None, limit=3).num_rows == 3
    assert draw_subset(src, n=0).num_rows == 0
    with pytest.raises(ValueError, match="only 15 rows"):
        draw_subset(src, n=16)


def test_draw_subset_labels_null_for_flat_folder(tmp_path, cache):
    images.write_flat_folder(tmp_path / "flat")
    t = draw_subset(open_source(str(tmp_path / "flat"), cache_dir=cache), n=3, seed=1)
    assert t.column("label").null_count == 3 and t.column("label").type == pa.int64()


# --- image folders without datasets --------------------------------------------------------


def _layouts(tmp_path: Path) -> dict[str, Path]:
    """Folder layouts whose listing rules differ: classes, flat, mixed depths, one class, hidden
    and special entries, double extensions, split-like names, a symlinked file."""
    out = {}
    root = tmp_path / "classes"
    images.write_imagefolder(root)
    out["classes"] = root
    flat = tmp_path / "flat"
    images.write_flat_folder(flat)
    out["flat"] = flat
    mixed = tmp_path / "mixed"
    for rel in ("a.png", "cat/b.png", "cat/deep/c.png", "dog/d.PNG", ".hidden/e.png",
                "__special__/f.png", "cat/.g.png", "cat/h.jpg.gz", "dog/test_1.png",
                "README.md", "labels.csv"):
        p = mixed / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (mixed / "dog" / "link.png").symlink_to(mixed / "a.png")
    out["mixed"] = mixed
    one = tmp_path / "one"
    for rel in ("only/a.png", "only/b.jpeg"):
        (one / rel).parent.mkdir(parents=True, exist_ok=True)
        (one / rel).write_bytes(b"x")
    out["one"] = one
    same = tmp_path / "same_depth"
    for rel in ("x/a/1.png", "x/b/2.png", "y/a/3.png", "y/c/4.JPG", "y/c/5.txt"):
        (same / rel).parent.mkdir(parents=True, exist_ok=True)
        (same / rel).write_bytes(b"x")
    out["same_depth"] = same
    return out


def test_folder_listing_matches_datasets_imagefolder(tmp_path, cache):
    """extract/_folder.py lists the files, order and labels datasets' imagefolder gives."""
    from tokenlake.extract._folder import FolderSource
    from tokenlake.extract._sources import _open_image_folder_with_datasets

    for name, root in _layouts(tmp_path / "layouts").items():
        ours = open_source(str(root), cache_dir=cache)
        assert isinstance(ours, FolderSource), name
        theirs = _open_image_folder_with_datasets(root.resolve(), spec=str(root), split=None,
                                                  cache_dir=cache)
        assert ours.num_rows == theirs.num_rows, name
        assert ours.label_names == theirs.label_names, name
        a = list(ours.records(range(ours.num_rows)))
        b = list(theirs.records(range(theirs.num_rows)))
        assert [(r.source_id, r.label) for r in a] == [(r.source_id, r.label) for r in b], name
        assert [Path(r.data).resolve() for r in a] == [Path(r.data).resolve() for r in b], name


def test_folder_extensions_are_datasets_image_extensions():
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    from tokenlake.extract._folder import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == {e.lower() for e in ImageFolder.EXTENSIONS}


def test_folders_with_metadata_or_archives_go_through_datasets(tmp_path, cache):
    root = tmp_path / "meta"
    images.write_flat_folder(root)
    (root / "metadata.csv").write_text("file_name,caption\n" + "".join(
        f"{p.name},a photo\n" for p in sorted(root.iterdir()) if p.suffix != ".csv"))
    src = open_source(str(root), cache_dir=cache)
    assert isinstance(src, Source) and src.num_rows > 0  # datasets read it (with its metadata)


def test_an_image_folder_extraction_never_imports_datasets(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "imgs"
    images.write_flat_folder(root, n=3)
    code = ("import sys\nfrom tokenlake.extract._sources import open_source\n"
            f"s = open_source({str(root)!r})\nlist(s.records(range(s.num_rows)))\n"
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_entries_named_like_images_that_are_not_files_become_errors(tmp_path):
    """datasets skips dangling symlinks, FIFOs and folders named like images without a word;
    they are inputs here, each recorded in the run's errors with its reason."""
    import os

    from tokenlake.cli.main import main
    from tokenlake.store import open_lake

    root = tmp_path / "imgs"
    images.write_flat_folder(root, n=3)
    (root / "gone.jpg").symlink_to(root / "never-was.jpg")
    os.mkfifo(root / "pipe.png")
    (root / "album.jpg").mkdir()
    (root / "album.jpg" / "inside.png").write_bytes(b"")  # listed, and rejected on its own
    src = open_source(str(root))
    ids = [r.source_id for r in src.records(range(src.num_rows))]
    assert {"gone.jpg", "pipe.png", "album.jpg", "album.jpg/inside.png"} <= set(ids)
    lake = tmp_path / "lake"
    assert main(["extract", "--lake", str(lake), "--data", str(root), "--model", "pvt_b0",
                 "--img-size", "64", "--weights", "random", "--decode-workers", "0",
                 "--quiet"]) == 0
    errors = {r["source_id"]: r["reason"] for r in open_lake(lake).sql(
        "SELECT source_id, reason FROM errors").to_pylist()}
    assert errors["gone.jpg"].startswith("dangling symlink")
    assert errors["pipe.png"].startswith("not a regular file (FIFO)")
    assert errors["album.jpg"].startswith("a directory, not an image file")
    assert errors["album.jpg/inside.png"].startswith("empty file")

"""Where images come from: a Hugging Face dataset, a local image folder, or a saved dataset.

``open_source(data, split=...)`` resolves ``data`` in this order:

1. a directory written by ``Dataset.save_to_disk`` (``state.json`` + ``dataset_info.json``) or
   ``DatasetDict.save_to_disk`` (``dataset_dict.json``): ``datasets.load_from_disk``;
2. a directory holding image files: listed directly by extract/_folder.py, with the files, order
   and labels ``datasets.load_dataset("imagefolder", ...)`` gives, without importing datasets
   (folders with metadata files or ``.zip`` archives go to datasets itself);
3. any other directory (e.g. a cloned hub repo of Parquet files), or a name that is not a local
   path (``ILSVRC/imagenet-1k``): ``datasets.load_dataset(data, split=split)``.

The image column is always cast to ``Image(decode=False)``: rows give bytes or a path, and each
image is decoded (and, if bad, rejected) on its own by ``decode_image`` - with ``decode=True`` one
unreadable file raises in the middle of iteration.

Image folders (facts checked against datasets 5.2):

- Inputs are files whose extension is one of datasets' image extensions (case-insensitive);
  anything else (README.txt, labels.csv, notes.md) is not an input and is not listed. Hidden
  files/dirs (leading ".") and ``__*`` dirs are skipped by datasets. A file with an image
  extension but broken content IS listed and is rejected later by ``decode_image``.
- Labels: datasets adds a ``label`` ClassLabel (names sorted) only when the images sit at one
  depth in more than one parent folder. A flat folder, a folder with a single class sub-folder,
  or images at mixed depths give no label column: label None.
- datasets infers splits from file/dir names containing train/val/test/dev/eval, and then
  silently drops files outside the inferred splits (``cat/test_1.jpg`` becomes the only file of a
  "test" split and every other image vanishes; on the 500-photo ImageNet sample folder only
  ``n02917067_bullet_train.JPEG`` survives). We therefore pass ``data_files={split: "**"}``:
  every image under the folder is one split. For split folders (``root/train``, ``root/val``)
  pass ``split="val"`` and the sub-folder ``root/val`` is used as the image folder.
- Row order is sorted by the path relative to the image folder (POSIX separators, Python string
  order). datasets already returns glob order, which is sorted; we sort again so the order, and
  so every seeded subset, does not hang on a datasets/fsspec detail.
- source_id is that relative path, stable across machines. Other sources have no stable path,
  so their source_id is ``f"{spec}:{split}:{index}"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenlake.extract._folder import FolderSource, has_images, list_folder

__all__ = ["Source", "SourceError", "SourceRecord", "open_source"]

_SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
_SAVED_DICT_FILE = "dataset_dict.json"
_LABEL_NAMES = ("label", "labels", "class")
# top-level folder names that mean "this folder holds splits, not classes"
_SPLIT_DIR_NAMES = {"train", "training", "val", "valid", "validation", "dev", "test", "testing"}
_BATCH = 256  # rows fetched per datasets call in records()


class SourceError(Exception):
    """The --data/--split arguments do not name a usable image source."""


@dataclass(frozen=True)
class SourceRecord:
    source_index: int
    source_id: str
    label: int | None
    data: bytes | str  # encoded image bytes, or a file path


class Source:
    """An opened image source: a datasets.Dataset with its image column undecoded."""

    def __init__(
        self,
        *,
        spec: str,
        split: str | None,
        dataset: Any,
        image_column: str,
        label_column: str | None,
        label_names: list[str] | None,
        root: Path | None = None,
    ) -> None:
        self.spec = spec
        self.split = split
        self.num_rows: int = dataset.num_rows
        self.label_names = label_names
        self.image_column = image_column
        self.label_column = label_column
        self._root = root  # image-folder root: source_id is relative to it
        cols = [image_column] + ([label_column] if label_column else [])
        self._ds = dataset.select_columns(cols)

    def __repr__(self) -> str:
        return (
            f"Source(spec={self.spec!r}, split={self.split!r}, num_rows={self.num_rows}, "
            f"labels={len(self.label_names) if self.label_names else None})"
        )

    def record(self, index: int) -> SourceRecord:
        return next(self.records([index]))

    def records(self, indices: Sequence[int]) -> Iterator[SourceRecord]:
        """Yield the records at ``indices``, in that order (repeats allowed)."""
        idx = [int(i) for i in indices]
        self._check_range(idx)
        for start in range(0, len(idx), _BATCH):
            chunk = idx[start : start + _BATCH]
            batch = self._ds[chunk]
            images = batch[self.image_column]
            labels = batch[self.label_column] if self.label_column else [None] * len(chunk)
            for i, item, label in zip(chunk, images, labels):
                yield self._make_record(i, item, label)

    def ids_and_labels(self, indices: Sequence[int]) -> tuple[list[str], list[int | None]]:
        """source_id and label at ``indices`` without reading image bytes (cheap for big subsets)."""
        if self._root is not None:  # image folder: the column holds paths only
            recs = list(self.records(indices))
            return [r.source_id for r in recs], [r.label for r in recs]
        idx = [int(i) for i in indices]
        self._check_range(idx)
        ids = [f"{self.spec}:{self.split}:{i}" for i in idx]
        if not self.label_column:
            return ids, [None] * len(idx)
        labels_ds = self._ds.select_columns([self.label_column])
        labels: list[int | None] = []
        for start in range(0, len(idx), 65_536):
            for v in labels_ds[idx[start : start + 65_536]][self.label_column]:
                labels.append(None if v is None or int(v) < 0 else int(v))
        return ids, labels

    def _check_range(self, idx: list[int]) -> None:
        bad = [i for i in idx if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(
                f"source index {bad[0]} out of range: {self.spec!r} (split {self.split!r}) has "
                f"{self.num_rows} rows"
            )

    def _make_record(self, index: int, item: dict | None, label: Any) -> SourceRecord:
        item = item or {}  # a null cell: empty bytes, so decode_image rejects it as "empty file"
        # bytes win over path: embedded datasets keep only the original file name as path
        data: bytes | str = (
            item["bytes"] if item.get("bytes") is not None else (item.get("path") or b"")
        )
        if self._root is not None and isinstance(data, str):
            source_id = Path(item["path"]).relative_to(self._root).as_posix()
        else:
            source_id = f"{self.spec}:{self.split}:{index}"
        # ClassLabel uses -1 for "no label" (e.g. ImageNet's test split)
        lab = None if label is None or int(label) < 0 else int(label)
        return SourceRecord(source_index=index, source_id=source_id, label=lab, data=data)


def open_source(data: str, *, split: str | None = None, cache_dir: str | None = None) -> Source:
    """Open ``data`` (hub name, image folder or saved dataset) at ``split``.

    ``split=None`` takes the only split there is, and errors if there are several.
    ``cache_dir`` is passed to ``datasets.load_dataset`` (its Arrow cache).
    """
    spec = str(data)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / _SAVED_DICT_FILE).is_file() or all(
            (path / f).is_file() for f in _SAVED_DATASET_FILES
        ):
            ds, split = _load_saved(path, spec=spec, split=split)
            return _make_source(ds, spec=spec, split=split)
        if _has_image_files(path):
            return _open_image_folder(path, spec=spec, split=split, cache_dir=cache_dir)
        # a local dataset repo or script dir: same call as for the hub
    elif path.exists():
        raise SourceError(
            f"--data {spec!r} is a file; give a directory, a saved dataset or a hub name"
        )
    elif _looks_like_local_path(spec):
        raise SourceError(
            f"--data {spec!r}: no such directory ({path.resolve()} does not exist). Give an image "
            "folder, a directory written by save_to_disk, or a hub dataset name such as "
            "'ILSVRC/imagenet-1k'."
        )
    import datasets  # heavy (with pandas, scipy): only for sources that need it

    try:
        loaded = datasets.load_dataset(spec, split=split, cache_dir=cache_dir)
    except Exception as e:
        if path.is_dir():
            raise SourceError(
                f"--data {spec!r} (split {split!r}) is a directory with no image files and no "
                f"save_to_disk files, and datasets.load_dataset could not read it either: "
                f"{type(e).__name__}: {e}"
            ) from e
        raise SourceError(
            f"--data {spec!r} (split {split!r}): not a local directory, and datasets.load_dataset "
            f"failed: {type(e).__name__}: {e}. Tried: local directory {path.resolve()} (absent), "
            "then the Hugging Face hub. For a hub dataset check the name and split, that you are "
            "online (HF_HUB_OFFLINE unset) and logged in (`hf auth login`) for gated datasets "
            "such as ILSVRC/imagenet-1k; for local data give an existing directory."
        ) from e
    ds, split = _pick_split(loaded, spec=spec, split=split)
    return _make_source(ds, spec=spec, split=split)


def image_folder_root(data: str, split: str | None = None) -> Path | None:
    """The directory an image folder's source_ids are relative to, found as `open_source` finds
    it but without indexing the files; None when `data` is not a local image folder."""
    path = Path(str(data)).expanduser()
    if not path.is_dir() or (path / _SAVED_DICT_FILE).is_file() or all(
            (path / f).is_file() for f in _SAVED_DATASET_FILES) or not _has_image_files(path):
        return None
    root = path / split if split is not None and (path / split).is_dir() else path
    return root.resolve()


def _looks_like_local_path(spec: str) -> bool:
    # hub names are "name" or "org/name"; anything else that does not exist is a mistyped path
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or spec.endswith("/")
        or os.sep != "/"
        and os.sep in spec
    )


def _has_image_files(path: Path) -> bool:
    return has_images(path)


def _load_saved(path: Path, *, spec: str, split: str | None) -> tuple[Any, str | None]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SourceError(
            f"--data {spec!r} looks like a dataset saved with save_to_disk but could not be "
            f"loaded: {type(e).__name__}: {e}"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, spec=spec, split=split)
    saved_split = str(loaded.split) if loaded.split is not None else None
    if split is not None and saved_split is not None and split != saved_split:
        raise SourceError(
            f"--data {spec!r} is a single saved split {saved_split!r}, not {split!r}; "
            f"drop --split or pass --split {saved_split}"
        )
    return loaded, split if split is not None else saved_split


def _pick_split(loaded: Any, *, spec: str, split: str | None) -> tuple[Any, str | None]:
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, dict)):
        return loaded, split
    names = list(loaded.keys())
    if split is None:
        if len(names) == 1:
            return loaded[names[0]], names[0]
        raise SourceError(f"--data {spec!r} has splits {names}; choose one with --split")
    if split not in loaded:
        raise SourceError(f"--data {spec!r} has no split {split!r}; it has {names}")
    return loaded[split], split


def _open_image_folder(
    path: Path, *, spec: str, split: str | None, cache_dir: str | None
) -> Source | FolderSource:
    root = path
    subdirs = sorted(
        d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))
    )
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_DIR_NAMES]
    if split is not None and (path / split).is_dir():
        root = path / split
    elif split is not None and split != "train":
        raise SourceError(
            f"--data {spec!r} is an image folder without a sub-folder {split!r} "
            f"(sub-folders: {subdirs[:10]}); drop --split to use the whole folder"
        )
    elif split is None and split_dirs:
        raise SourceError(
            f"--data {spec!r} has split sub-folders {split_dirs}; choose one with --split "
            "(otherwise they would be read as class labels)"
        )
    root = root.resolve()
    listing = list_folder(root)
    if listing is not None:  # the same files, order and labels as datasets', without datasets
        return FolderSource(spec=spec, split=split, listing=listing)
    return _open_image_folder_with_datasets(root, spec=spec, split=split, cache_dir=cache_dir)


def _open_image_folder_with_datasets(root: Path, *, spec: str, split: str | None,
                                     cache_dir: str | None) -> Source:
    """A folder with metadata files or archives: datasets' imagefolder reads those formats."""
    import datasets
    import pyarrow.compute as pc

    split_name = split if split is not None else "train"
    try:
        ds = datasets.load_dataset(
            "imagefolder",
            data_dir=str(root),
            data_files={split_name: "**"},
            split=split_name,
            cache_dir=cache_dir,
        )
    except Exception as e:
        raise SourceError(
            f"--data {spec!r}: datasets could not read the image folder {root}: {type(e).__name__}: {e}"
        ) from e
    ds = ds.cast_column("image", datasets.Image(decode=False))
    rel = [
        Path(p).relative_to(root).as_posix()
        for p in pc.struct_field(ds.data.column("image"), "path").to_pylist()
    ]
    order = np.argsort(np.array(rel, dtype=object), kind="stable")
    if (order != np.arange(len(rel))).any():
        ds = ds.select(order)
    return _make_source(ds, spec=spec, split=split, root=root)


def _make_source(ds: Any, *, spec: str, split: str | None, root: Path | None = None) -> Source:
    import datasets

    image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        kinds = {c: type(f).__name__ for c, f in ds.features.items()}
        raise SourceError(
            f"--data {spec!r} (split {split!r}) has no image column: columns {kinds}. "
            "An image column has the datasets.Image feature; cast a column with "
            "ds.cast_column(name, datasets.Image()) before saving."
        )
    image_col = image_cols[0]
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    label_col, label_names = _find_label(ds.features)
    return Source(
        spec=spec,
        split=split,
        dataset=ds,
        image_column=image_col,
        label_column=label_col,
        label_names=label_names,
        root=root,
    )


def _find_label(features: Any) -> tuple[str | None, list[str] | None]:
    import datasets

    class_labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if class_labels:
        # several ClassLabel columns: prefer the conventional name
        col = next((c for c in class_labels if c in _LABEL_NAMES), class_labels[0])
        return col, list(features[col].names)
    for c in _LABEL_NAMES:
        f = features.get(c)
        if isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint")):
            return c, None
    return None, None

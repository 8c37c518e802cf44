"""Local image folders listed directly, as Hugging Face `datasets`' imagefolder lists them.

An extraction from a folder of photos should not pay for importing `datasets` (with pandas and
scipy, ~0.5 s on the development machine) and indexing the files through it. This module lists
the same files, in the same order, with the same labels as
``datasets.load_dataset("imagefolder", data_dir=root, data_files={split: "**"})`` (datasets 5.2,
`FolderBasedBuilder`; tests/test_sources.py holds the two equal on every layout it tries):

* files under ``root`` at any depth, skipping hidden files and directories (leading ".") and
  special directories (leading "__"), symlinks to files included;
* an input is a file whose extension, or second extension ("a.jpg.gz"), lower-cased, is one of
  `IMAGE_EXTENSIONS`;
* labels, ClassLabel names sorted, exist only when the images whose last extension is an image
  one sit at one depth and in more than one parent folder (a flat folder, a single class folder
  or mixed depths have none); the label is the parent folder's name.

Folders holding a metadata file (``metadata.csv/jsonl/parquet``, which datasets reads into
columns) or ``.zip`` archives (which it extracts) are not listed here: `open_source` sends them
to datasets, which knows those formats.

One deliberate difference: entries named like images that are not regular files — dangling
symlinks, FIFOs, sockets, directories called ``x.jpg`` — are inputs here, where datasets skips
them without a word; decoding rejects each with its reason, so it lands in the run's ``errors``
table as every other unusable input does (a FIFO is never opened). They take no part in
inferring labels (as in datasets); inside a class folder they get its label.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# datasets 5.2 packaged_modules/imagefolder/imagefolder.py IMAGE_EXTENSIONS (a test compares)
IMAGE_EXTENSIONS = frozenset({
    ".blp", ".bmp", ".dib", ".bufr", ".cur", ".pcx", ".dcx", ".dds", ".ps", ".eps", ".fit",
    ".fits", ".fli", ".flc", ".ftc", ".ftu", ".gbr", ".gif", ".grib", ".png", ".apng", ".jp2",
    ".j2k", ".jpc", ".jpf", ".jpx", ".j2c", ".icns", ".ico", ".im", ".iim", ".tif", ".tiff",
    ".jfif", ".jpe", ".jpg", ".jpeg", ".mpg", ".mpeg", ".msp", ".pcd", ".pxr", ".pbm", ".pgm",
    ".ppm", ".pnm", ".psd", ".bw", ".rgb", ".rgba", ".sgi", ".ras", ".tga", ".icb", ".vda",
    ".vst", ".webp", ".wmf", ".emf", ".xbm", ".xpm",
})
METADATA_FILENAMES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})


@dataclass(frozen=True)
class FolderListing:
    root: Path
    paths: list[str]  # POSIX paths relative to root, sorted
    labels: list[int | None] | None  # per path, an index into label_names
    label_names: list[str] | None


def _is_input(name: str) -> bool:
    stem, ext = os.path.splitext(name)
    return ext.lower() in IMAGE_EXTENSIONS or os.path.splitext(stem)[1].lower() in IMAGE_EXTENSIONS


def walk(root: Path) -> Iterator[tuple[str, str, bool]]:
    """(relative POSIX path, name, is a regular file) of every visible entry under `root`:
    files (symlinks to files included), other non-directory entries (dangling symlinks, FIFOs,
    sockets) and directories named like images, which are also descended into."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        rel_dir = os.path.relpath(dirpath, root)
        odd_dirs = [d for d in dirnames if _is_input(d)]
        for name in [*filenames, *odd_dirs]:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
            yield rel, name, os.path.isfile(os.path.join(dirpath, name))


def has_images(root: Path) -> bool:
    return any(_is_input(name) for _, name, _ in walk(root))


def list_folder(root: Path) -> FolderListing | None:
    """The folder's inputs and labels, or None when datasets must read it (metadata, archives)."""
    paths, parents, depths = [], set(), set()
    for rel, name, regular in walk(root):
        if regular and (name in METADATA_FILENAMES
                        or os.path.splitext(name)[1].lower() == ".zip"):
            return None
        if not _is_input(name):
            continue
        paths.append(rel)
        if regular and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            # datasets counts the segments of the whole path and names the parent folder
            parents.add(os.path.basename(os.path.dirname(os.path.join(str(root), rel))))
            depths.add(rel.count("/"))
    paths.sort()
    if len(parents) > 1 and len(depths) == 1:
        names = sorted(parents)
        index = {n: k for k, n in enumerate(names)}
        labels = [index.get(os.path.basename(os.path.dirname(os.path.join(str(root), p))))
                  for p in paths]
        return FolderListing(root, paths, labels, names)
    return FolderListing(root, paths, None, None)


class FolderSource:
    """An image folder listed by `list_folder`: the Source interface, without datasets."""

    def __init__(self, *, spec: str, split: str | None, listing: FolderListing) -> None:
        self.spec, self.split, self._l = spec, split, listing
        self.num_rows = len(listing.paths)
        self.label_names = listing.label_names

    def __repr__(self) -> str:
        return (f"Source(spec={self.spec!r}, split={self.split!r}, num_rows={self.num_rows}, "
                f"labels={len(self.label_names) if self.label_names else None})")

    def record(self, index: int):
        return next(self.records([index]))

    def records(self, indices: Sequence[int]):
        from tokenlake.extract._sources import SourceRecord

        ids, labels = self.ids_and_labels(indices)
        root = self._l.root
        for i, rel, label in zip(indices, ids, labels):
            yield SourceRecord(source_index=int(i), source_id=rel, label=label,
                               data=str(root / rel))

    def ids_and_labels(self, indices: Sequence[int]) -> tuple[list[str], list[int | None]]:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(f"source index {bad[0]} out of range: {self.spec!r} (split "
                             f"{self.split!r}) has {self.num_rows} rows")
        labels = self._l.labels
        return ([self._l.paths[i] for i in idx],
                [labels[i] if labels is not None else None for i in idx])

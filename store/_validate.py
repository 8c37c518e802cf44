"""Lake.validate: re-check committed shards against their markers, and markers, manifest and subset
against each other (store/SCHEMA.md, "Reading and validating").

Full: every Parquet file and listed chunk is re-hashed against its marker, Parquet page checksums
are verified while the ids are read back, and a complete run's recorded subset checksum is
recomputed from the subset file. Quick (`tokenlake validate --quick`): the same minus every hash
of data: files and chunks exist with the sizes the markers give, Parquet footers give the
markers' row counts, and markers, manifest and final_norm.json agree (those are small files).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from tokenlake.store._errors import LakeError
from tokenlake.store._io import read_parquet, sha256_file
from tokenlake.store._layout import SHARD_NAME, RunLayout, shard_name

if TYPE_CHECKING:
    from tokenlake.store._lake import Lake

REQUIRED_TABLES = ("images", "tokens", "errors")
OPTIONAL_TABLES = ("blocks",)
COUNTS = ("n_images", "n_errors", "n_tokens", "n_slots", "n_rejected")
TABLE_COUNT = {"images": "n_images", "errors": "n_errors", "tokens": "n_tokens"}


def validate_run(lake: Lake, run: str, *, quick: bool = False) -> list[str]:
    d = lake.path / "runs" / run
    try:
        layout = lake.layout(run)
    except (LakeError, OSError, ValueError, KeyError, TypeError) as e:
        return [f"{run}: cannot read the run's layout (arrays.zarr/zarr.json): {e}"]
    problems: list[str] = []
    markers: dict[int, dict[str, Any]] = {}
    raw_markers: dict[int, bytes] = {}
    for p in sorted((d / "shards").glob("s*.json")):
        if not SHARD_NAME.fullmatch(p.stem):
            continue
        i = int(p.stem[1:])
        try:
            raw_markers[i] = p.read_bytes()
            mk = json.loads(raw_markers[i])
        except (OSError, ValueError) as e:
            problems.append(f"{run}/{p.stem}: commit marker cannot be read: {e}")
            continue
        if isinstance(mk, dict):
            markers[i] = mk
        else:
            problems.append(f"{run}/{p.stem}: commit marker is not a JSON object")
    manifest = None
    if (d / "manifest.json").exists():
        try:
            manifest = lake.manifest(run)
            if not isinstance(manifest, dict):
                raise TypeError("not a JSON object")
        except (LakeError, OSError, ValueError, TypeError, AttributeError) as e:
            problems.append(f"{run}: manifest.json cannot be read: {e}")
            manifest = None
    n_shards = _manifest_n_shards(manifest, layout)
    for i, mk in sorted(markers.items()):
        where = f"{run}/{shard_name(i)}"
        try:
            problems += _check_shard(lake, run, layout, i, mk, where,
                                     last=n_shards is not None and i == n_shards - 1, quick=quick)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LakeError) as e:
            problems.append(f"{where}: {type(e).__name__}: {e}")
    if manifest is not None:
        try:
            problems += _check_manifest(lake, run, layout, manifest, markers, raw_markers,
                                        quick=quick)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LakeError) as e:
            problems.append(f"{run}: manifest.json is malformed ({type(e).__name__}: {e})")
    return problems


def _manifest_n_shards(manifest: dict[str, Any] | None, layout: RunLayout) -> int | None:
    # a run may end early (keep-if-outlier stops at its quota): its last shard is then short
    if manifest is None:
        return layout.n_shards
    n = manifest.get("n_shards")
    return n if isinstance(n, int) and 0 < n <= layout.n_shards else None


def _check_marker(run: str, layout: RunLayout, i: int, mk: dict[str, Any], where: str
                  ) -> list[str]:
    """The marker against the run and the contract: names, ranges, counts, chunk lists."""
    sname = shard_name(i)
    problems = []
    if i >= layout.n_shards:
        return [(f"{where}: commit marker of a shard the run's layout does not have "
                f"({layout.n_shards} shards)")]
    for key, want in (("run", run), ("shard", sname), ("index", i)):
        if mk.get(key) != want:
            problems.append(f"{where}: marker says {key} {mk.get(key)!r}, expected {want!r}")
    files = mk.get("files")
    if not isinstance(files, dict):
        return [*problems, f"{where}: marker has no files"]
    for t in REQUIRED_TABLES:
        if t not in files:
            problems.append(f"{where}: marker lists no {t} table")
    for t, f in files.items():
        if t not in REQUIRED_TABLES + OPTIONAL_TABLES:
            problems.append(f"{where}: marker lists an unknown table {t!r}")
        elif f.get("name") != f"{t}/{sname}.parquet":
            problems.append(f"{where}: marker names {f.get('name')!r} for table {t}, expected "
                            f"{t}/{sname}.parquet")
        elif t in TABLE_COUNT and mk.get(TABLE_COUNT[t]) != f.get("n_rows"):
            problems.append(f"{where}: marker says {TABLE_COUNT[t]} {mk.get(TABLE_COUNT[t])} "
                            f"but {t} has {f.get('n_rows')} rows")
    for name, a in (mk.get("arrays") or {}).items():
        if name not in layout.arrays:
            problems.append(f"{where}: marker lists array {name!r}, which the run does not have")
            continue
        own = layout.shard_chunks(name, i)
        chunks = a.get("chunks", [])
        if any(c not in own for c in chunks) or chunks != sorted(set(chunks)):
            problems.append(f"{where}: marker lists chunks of array {name!r} outside the shard's "
                            f"chunks {own.start}..{own.stop - 1} (or out of order)")
    return problems


def _check_shard(
    lake: Lake, run: str, layout: RunLayout, i: int, mk: dict[str, Any], where: str, *,
    last: bool, quick: bool
) -> list[str]:
    d = lake.path / "runs" / run
    problems = _check_marker(run, layout, i, mk, where)
    if problems:
        return problems  # a marker that lies: what it lists would only mislead
    for f in mk["files"].values():
        p = d / f["name"]
        if not p.exists():
            problems.append(f"{where}: {f['name']} is missing")
            continue
        size = p.stat().st_size
        if size != f["bytes"]:
            problems.append(f"{where}: {f['name']} has {size} bytes, its marker says "
                            f"{f['bytes']}")
            continue
        if not quick and sha256_file(p) != f["sha256"]:
            problems.append(f"{where}: {f['name']} does not match its checksum in the marker")
            continue
        try:
            n = pq.ParquetFile(p).metadata.num_rows
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            problems.append(f"{where}: {f['name']} is not a readable Parquet file: {e}")
            continue
        if n != f["n_rows"]:
            problems.append(f"{where}: {f['name']} has {n} rows, marker says {f['n_rows']}")
    for name, a in mk["arrays"].items():
        cf = lake._files(run, name, a["kind"])
        want = int(np.prod(cf.chunk_shape)) * cf.dtype.itemsize
        h = hashlib.sha256()
        for c in a["chunks"]:
            p = cf.path(c)
            if not p.exists():
                problems.append(f"{where}: chunk {c} of array {name!r} is missing")
                break
            if p.stat().st_size != want:
                problems.append(f"{where}: chunk {c} of array {name!r} has {p.stat().st_size} "
                                f"bytes, a whole chunk has {want}")
                break
            if not quick:
                h.update(p.read_bytes())
        else:
            if not quick and h.hexdigest() != a["sha256"]:
                problems.append(
                    f"{where}: array {name!r} chunks do not match their checksum in the marker"
                )
    if problems or quick:
        return problems  # id checks below would only repeat them
    ss = layout.shard_size
    lo, hi = i * ss, (i + 1) * ss
    ids = {
        t: read_parquet(d / mk["files"][t]["name"], columns=["image_id"]).column(0).to_numpy()
        for t in ("images", "errors")
    }
    for t, x in ids.items():
        if x.size and (x.min() < lo or x.max() >= hi):
            problems.append(f"{where}: {t}.image_id outside the shard's range [{lo}, {hi})")
        if np.unique(x).size != x.size:
            problems.append(f"{where}: duplicate {t}.image_id")
    if np.intersect1d(ids["images"], ids["errors"]).size:
        problems.append(f"{where}: image_ids in both images and errors")
    covered = ids["images"].size + ids["errors"].size + mk.get("n_rejected", 0)
    if covered > ss or (not last and covered != ss):
        problems.append(
            f"{where}: images + errors + rejected = {covered}, expected "
            f"{'at most ' if last else ''}{ss} (shard_size)"
        )
    tok = read_parquet(d / mk["files"]["tokens"]["name"], columns=["image_id", "slot"])
    if not np.isin(tok.column("image_id").to_numpy(), ids["images"]).all():
        problems.append(f"{where}: tokens reference image_ids not in images")
    slots = tok.column("slot").drop_null().to_numpy()
    s_lo, s_hi = mk["slot_range"]
    if slots.size and (slots.min() < s_lo or slots.max() >= s_hi):
        problems.append(f"{where}: tokens.slot outside the shard's slot range [{s_lo}, {s_hi})")
    return problems


def _check_manifest(lake: Lake, run: str, layout: RunLayout, m: dict[str, Any],
                    markers: dict[int, dict[str, Any]], raw_markers: dict[int, bytes], *,
                    quick: bool) -> list[str]:
    """The manifest (what the SQL views read their file lists from) against the markers."""
    d = lake.path / "runs" / run
    problems = []
    bad = lambda what: problems.append(f"{run}: manifest.json {what}")
    if m.get("run") != run:
        bad(f"names run {m.get('run')!r}")
    n_shards = m.get("n_shards")
    if not isinstance(n_shards, int) or not 0 < n_shards <= layout.n_shards:
        bad(f"has n_shards {n_shards!r}; the run's layout has {layout.n_shards}")
        return problems
    if m.get("shard_size") != layout.shard_size:
        bad(f"has shard_size {m.get('shard_size')!r}; the layout has {layout.shard_size}")
    if m.get("layout") != layout.to_json():
        bad("records another layout than arrays.zarr's")
    missing = sorted(set(range(n_shards)) - set(markers) - set(raw_markers))
    if missing:
        problems.append(f"{run}: manifest exists but shard(s) "
                        f"{[shard_name(i) for i in missing[:10]]} have no commit marker")
    shards = m.get("shards")
    if not isinstance(shards, list) or len(shards) != n_shards:
        bad(f"lists {len(shards) if isinstance(shards, list) else 'no'} shards, but n_shards is "
            f"{n_shards}")
        shards = shards if isinstance(shards, list) else []
    totals = dict.fromkeys(COUNTS, 0)
    nbytes = 0
    for k in range(n_shards):
        mk = markers.get(k)
        if mk is None:
            continue
        try:
            nbytes += _compare_shard(run, layout, k, mk, raw_markers[k], shards, totals, problems)
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            problems.append(f"{run}/{shard_name(k)}: marker is malformed ({type(e).__name__}: "
                            f"{e})")
    if not missing and len(markers) >= n_shards:
        differ = [key for key in COUNTS if m.get(key) != totals[key]]
        if differ:
            bad(f"totals {', '.join(f'{key} {m.get(key)!r}' for key in differ)} differ from the "
                f"markers' sums {', '.join(f'{totals[key]}' for key in differ)}")
        if m.get("bytes") != nbytes:
            bad(f"says {m.get('bytes')!r} bytes, the markers {nbytes}")
    fn = m.get("final_norm")
    if fn is not None:
        p = d / fn["file"]
        if not p.exists():
            problems.append(f"{run}: {fn['file']} is missing")
        elif sha256_file(p) != fn["sha256"]:
            problems.append(f"{run}: {fn['file']} changed since the manifest was written")
    problems += _check_subset(lake, run, m, quick=quick)
    return problems


def _compare_shard(run: str, layout: RunLayout, k: int, mk: dict[str, Any], raw: bytes,
                   shards: list[Any], totals: dict[str, int], problems: list[str]) -> int:
    """Shard k's manifest entry against its marker; adds the marker's counts to `totals` and
    returns the bytes it accounts for (as build_manifest counts them)."""
    for key in COUNTS:
        totals[key] += mk.get(key, 0)
    nbytes = sum(f["bytes"] for f in mk["files"].values())
    for name, a in (mk.get("arrays") or {}).items():
        if name in layout.arrays:
            lay = layout.arrays[name]
            row_bytes = int(np.prod(lay.shape)) * np.dtype(lay.dtype).itemsize
            nbytes += len(a["chunks"]) * lay.chunk_rows * row_bytes
    if k >= len(shards):
        return nbytes
    s, where = shards[k], f"{run}/{shard_name(k)}"
    if not isinstance(s, dict):
        problems.append(f"{where}: manifest's entry is not an object")
        return nbytes
    if s.get("shard") != shard_name(k) or s.get("index") != k:
        problems.append(f"{where}: manifest's entry {k} names shard {s.get('shard')!r} "
                        f"(index {s.get('index')!r})")
    if hashlib.sha256(raw).hexdigest() != s.get("marker_sha256"):
        problems.append(f"{where}: marker changed since the manifest was written")
    differ = [key for key in COUNTS if s.get(key) != mk.get(key)]
    if differ:
        problems.append(f"{where}: manifest's {', '.join(differ)} differ from the marker's")
    want_files = {t: f["name"] for t, f in mk["files"].items()}
    if s.get("files") != want_files:
        problems.append(f"{where}: manifest lists files {s.get('files')!r}, the marker "
                        f"{want_files!r} (the SQL views read the manifest's)")
    return nbytes


def recorded_subset(m: dict[str, Any]) -> tuple[str, str] | None:
    """(subset name, content checksum) a run's manifest records, or None: extraction records
    `subset_info: {name, checksum, ...}` (and config.subset); write_run callers may do the same."""
    for rec in (m.get("subset_info"), (m.get("config") or {}).get("subset")
                if isinstance(m.get("config"), dict) else None):
        if isinstance(rec, dict) and isinstance(rec.get("name"), str) and rec.get("checksum"):
            return rec["name"], rec["checksum"]
    return None


def _check_subset(lake: Lake, run: str, m: dict[str, Any], *, quick: bool) -> list[str]:
    from tokenlake.store._subsets import subset_checksum, subset_path

    rec = recorded_subset(m)
    if rec is None:
        return []
    name, checksum = rec
    try:
        path = subset_path(lake.path, name)
    except LakeError as e:
        return [f"{run}: records subset {name!r}: {e}"]
    if not path.exists():
        return [f"{run}: its subset {name!r} ({path.relative_to(lake.path)}) is missing"]
    if quick:
        return []
    try:
        got = subset_checksum(lake.path, name)
    except (LakeError, OSError, ValueError) as e:
        return [f"{run}: its subset {name!r} cannot be read: {e}"]
    if got != checksum:
        return [(f"{run}: subset {name!r} changed since the run recorded its checksum "
                f"({checksum[:12]}…, now {got[:12]}…): the run's image_ids no longer name the "
                "subset's rows")]
    return []

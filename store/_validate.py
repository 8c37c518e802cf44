"""Lake.validate: re-check committed shards against their markers and the contract."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from tokenlake.store._errors import LakeError
from tokenlake.store._io import sha256_file

if TYPE_CHECKING:
    from tokenlake.store._lake import Lake


def validate_run(lake: Lake, run: str) -> list[str]:
    d = lake.path / "runs" / run
    try:
        layout = lake.layout(run)
        markers = lake.markers(run)
    except (LakeError, OSError, ValueError, KeyError) as e:
        return [f"{run}: cannot read run layout or markers: {e}"]
    problems = []
    # a run may end early (keep-if-outlier stops at its quota): its last shard is then short
    n_shards = (lake.manifest(run)["n_shards"] if (d / "manifest.json").exists()
                else layout.n_shards)
    for i, mk in sorted(markers.items()):
        where = f"{run}/{mk.get('shard', i)}"
        try:
            problems += _check_shard(lake, run, layout, i, mk, where, last=i == n_shards - 1)
        except (OSError, ValueError, KeyError, LakeError) as e:
            problems.append(f"{where}: {type(e).__name__}: {e}")
    mpath = d / "manifest.json"
    if mpath.exists():
        m = lake.manifest(run)
        missing = sorted(set(range(m.get("n_shards", layout.n_shards))) - set(markers))
        if missing:
            problems.append(
                f"{run}: manifest exists but shard(s) {missing[:10]} have no commit marker"
            )
        for s in m.get("shards", []):
            p = d / "shards" / f"{s['shard']}.json"
            if p.exists() and sha256_file(p) != s.get("marker_sha256"):
                problems.append(
                    f"{run}/{s['shard']}: marker changed since the manifest was written"
                )
        fn = m.get("final_norm")
        if fn is not None:
            p = d / fn["file"]
            if not p.exists():
                problems.append(f"{run}: {fn['file']} is missing")
            elif sha256_file(p) != fn["sha256"]:
                problems.append(f"{run}: {fn['file']} changed since the manifest was written")
    return problems


def _check_shard(
    lake: Lake, run: str, layout: Any, i: int, mk: dict[str, Any], where: str, *, last: bool
) -> list[str]:
    d = lake.path / "runs" / run
    problems = []
    for f in mk["files"].values():
        p = d / f["name"]
        if not p.exists():
            problems.append(f"{where}: {f['name']} is missing")
            continue
        if p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            problems.append(f"{where}: {f['name']} does not match its checksum in the marker")
            continue
        n = pq.ParquetFile(p).metadata.num_rows
        if n != f["n_rows"]:
            problems.append(f"{where}: {f['name']} has {n} rows, marker says {f['n_rows']}")
    for name, a in mk["arrays"].items():
        cf = lake._files(run, name, a["kind"])
        h = hashlib.sha256()
        for c in a["chunks"]:
            p = cf.path(c)
            if not p.exists():
                problems.append(f"{where}: chunk {c} of array {name!r} is missing")
                break
            h.update(p.read_bytes())
        else:
            if h.hexdigest() != a["sha256"]:
                problems.append(
                    f"{where}: array {name!r} chunks do not match their checksum in the marker"
                )
    if problems:
        return problems  # id checks below would only repeat them
    ss = layout.shard_size
    lo, hi = i * ss, (i + 1) * ss
    ids = {
        t: pq.read_table(d / mk["files"][t]["name"], columns=["image_id"]).column(0).to_numpy()
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
    tok = pq.read_table(d / mk["files"]["tokens"]["name"], columns=["image_id", "slot"])
    if not np.isin(tok.column("image_id").to_numpy(), ids["images"]).all():
        problems.append(f"{where}: tokens reference image_ids not in images")
    slots = tok.column("slot").drop_null().to_numpy()
    s_lo, s_hi = mk["slot_range"]
    if slots.size and (slots.min() < s_lo or slots.max() >= s_hi):
        problems.append(f"{where}: tokens.slot outside the shard's slot range [{s_lo}, {s_hi})")
    return problems

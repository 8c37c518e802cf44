"""A run killed with SIGKILL and rerun ends identical to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np

from tokenlake.cli.main import main
from tokenlake.store import open_lake

RUN = "dinov2_s_reg4-56-tiny-random"


def _extract_args(lake) -> list[str]:
    return ["extract", "--lake", str(lake), "--model", "dinov2_s_reg4", "--subset", "tiny",
            "--weights", "random", "--img-size", "56", "--batch-size", "1", "--shard-size", "1",
            "--decode-workers", "0", "--quiet"]


def _snapshot(lake) -> dict:
    db = open_lake(lake)
    out = {}
    for table, key in (("images", "image_id"), ("tokens", "image_id, token"),
                       ("errors", "image_id")):
        out[table] = db.sql(f"SELECT * EXCLUDE (run) FROM {table} ORDER BY {key}")
    slots = out["tokens"].column("slot").to_numpy(zero_copy_only=False)
    out["emb"], out["pix"] = db.gather(RUN, slots[~np.isnan(slots)].astype(np.int64), pixels=True)
    ids = out["images"].column("image_id").to_numpy()
    out["cls"] = db.image_array(RUN, "cls_post", ids)
    out["reg"] = db.image_array(RUN, "registers_post", ids)
    return out


def test_killed_run_resumes_to_an_identical_lake(tmp_path, image_helpers):
    root = tmp_path / "imgs"
    image_helpers.write_imagefolder(root, per_class=4)
    lakes = tmp_path / "killed", tmp_path / "clean"
    for lake in lakes:
        assert main(["subset", "--lake", str(lake), "--name", "tiny", "--data", str(root)]) == 0

    code = "import sys; from tokenlake.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *_extract_args(lakes[0])])
    markers = lakes[0] / "runs" / RUN / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # harmless if it already exited; the assert below catches that
    proc.wait()
    assert not (lakes[0] / "runs" / RUN / "manifest.json").exists(), "run finished before the kill"
    assert open_lake(lakes[0]).runs(include_incomplete=True)[0]["status"] == "partial"

    assert main(_extract_args(lakes[0])) == 0
    assert main(_extract_args(lakes[1])) == 0
    killed, clean = _snapshot(lakes[0]), _snapshot(lakes[1])
    for name in ("images", "tokens", "errors"):
        assert killed[name].equals(clean[name]), name
    for name in ("emb", "pix", "cls", "reg"):
        np.testing.assert_array_equal(killed[name], clean[name])
    ids = killed["images"].column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert main(["validate", "--lake", str(lakes[0])]) == 0
    # whatever the kill left half-written (`*.tmp-<pid>-<id>`), the resume swept
    assert not [p for p in (lakes[0] / "runs").rglob("*.tmp-*")]

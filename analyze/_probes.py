"""Paper Tables 1-5 from the lake's probe results, beside the paper's numbers.

One row per committed probe result (Tables 1-3) or per DINOv2 size (Tables 4-5), each with its
result's configuration (tokens before/after the final norm, the held-out test run) and whether the
verdicts use it (`use`: "" = yes, else why not; decided by the caller, see analyze/_verdicts.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from tokenlake.analyze._common import RunInfo
from tokenlake.store import Lake, LakeError, probe_result_dir, read_probe_result

# run's manifest['model'] alias -> the paper's row name
PAPER_ROWS = {"dinov2_s": "DINOv2-S", "deit3_m": "DeiT3-M", "clip_b": "OpenCLIP-B",
              "dinov2_g": "DINOv2-G", "swinv2_s": "Swin-S", "pvt_b2": "PVT-b2"}
DINOV2_SIZES = {"s": "Small", "b": "Base", "l": "Large", "g": "Giant"}
T1, T2, T3, T4, T5 = ("table1_position", "table2_reconstruction", "table3_classification",
                      "table4_dinov2_linear_heads", "table5_register_heads")

# How each paper table is found in probe_results (the names tokenlake.probes writes):
# (table key, title, probe name, {paper column: (token_group, metric)}).
TABLES = [
    (T1, "Table 1 — position prediction", "position",
     {"top1_normal": ("normal", "top1"), "top1_outlier": ("outlier", "top1"),
      "dist_normal": ("normal", "dist"), "dist_outlier": ("outlier", "dist"),
      "baseline": ("grid", "baseline_dist")}),
    (T2, "Table 2 — pixel reconstruction", "reconstruct",
     {"l2_normal": ("normal", "l2"), "l2_outlier": ("outlier", "l2")}),
    (T3, "Table 3 — classification from one token", "classify",
     {"cls": ("cls", "top1"), "normal": ("normal", "top1"), "outlier": ("outlier", "top1")}),
]
ACC_METRICS = {"top1"}
Use = Callable[[str, "ProbeResult"], str]  # (table key, result) -> "" (counted) or why not


@dataclass
class ProbeResult:
    """One committed probe result: its view rows and its result.json (config, choices)."""

    run: str
    probe: str
    config_hash: str
    created: str
    values: dict[tuple[str, str], float] = field(default_factory=dict)  # (group, metric) -> value
    config: dict[str, Any] | None = None  # None: result.json without a config (cannot be judged)
    choices: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> str:
        # results written before probes could read post-norm tokens used the stored (pre) ones
        return str((self.config or {}).get("tokens") or "pre")

    @property
    def test_run(self) -> str | None:
        return (self.config or {}).get("test_run")

    @property
    def test_images(self) -> int | None:
        test = self.choices.get("test")
        return test.get("n_images") if isinstance(test, dict) else None

    @property
    def order(self) -> tuple[str, str]:
        return self.created, self.config_hash


def reference() -> dict[str, Any]:
    """The paper's Tables 1-5 (package data copy of paper/reference.json)."""
    return json.loads(files("tokenlake.analyze").joinpath("reference.json").read_text("utf-8"))


def probe_rows(lk: Lake) -> tuple[list[dict] | None, str]:
    """Rows of the probe_results view, or (None, why) when the view is absent or empty."""
    has = lk.sql("SELECT count(*) AS n FROM information_schema.tables "
                 "WHERE table_name = 'probe_results'").column("n")[0].as_py()
    if not has:
        return None, "missing: the lake has no probe_results view yet; run `tokenlake probe …`"
    rows = lk.sql("SELECT * FROM probe_results ORDER BY run, probe, config_hash").to_pylist()
    if not rows:
        return None, "missing: probe_results has no rows; run `tokenlake probe …`"
    return rows, ""


def probe_results(lk: Lake) -> tuple[list[ProbeResult] | None, str]:
    """Every committed result with its configuration (read_probe_result), or (None, why)."""
    rows, why = probe_rows(lk)
    if rows is None:
        return None, why
    got: dict[tuple[str, str, str], ProbeResult] = {}
    for r in rows:
        k = (r["run"], r["probe"], r["config_hash"])
        if k not in got:
            got[k] = ProbeResult(*k, created=str(r["created"]))
        got[k].values[r["token_group"], r["metric"]] = r["value"]
    for (run, probe, h), res in got.items():
        full = read_probe_result(lk.path, run, probe, h)
        if full is None:  # the view only lists committed directories, which hold result.json
            raise LakeError(f"probe result {probe_result_dir(lk.path, run, probe, h)} has rows "
                            "but no result.json; the lake is damaged: rerun the probe with --force")
        res.config = full.get("config") if isinstance(full.get("config"), dict) else None
        res.choices = full.get("choices") if isinstance(full.get("choices"), dict) else {}
    return list(got.values()), ""


def paper_tables(lk: Lake, *, infos: dict[str, RunInfo], use: Use) -> list[dict[str, Any]]:
    """One dict per paper table: key, title, columns, extra_columns, rows, missing.

    A row: run, paper_row, extra (values of extra_columns), ours, paper, diff, use ("" = the
    verdicts count it, else why not; None = no verdict reads this table). infos: the runs shown.
    Among results the verdicts could count, only the newest of a model (and token kind) is counted:
    a re-run supersedes, it does not add evidence.
    """
    ref = reference()
    results, why = probe_results(lk)
    results = sorted((r for r in results or [] if r.run in infos), key=lambda r: (r.run, r.order))
    out = []
    for key, title, probe, cols in TABLES:
        t = {"key": key, "title": title, "columns": ref[key]["columns"], "rows": [],
             "extra_columns": ["tokens", "test run (images)"] if key == T3 else ["tokens"],
             "missing": why}
        for r in (r for r in results if r.probe == probe):
            alias = infos[r.run].model
            paper = PAPER_ROWS.get(alias)
            # runs of models the paper did not probe are still shown, without reference numbers
            known = paper is not None and paper in ref[key]
            paper_vals = ref[key][paper] if known else [None] * len(t["columns"])
            ours = [r.values.get(cols[c]) if c in cols else None for c in t["columns"]]
            if all(v is None for v in ours):
                continue
            extra = [r.tokens]
            if key == T3:
                extra.append(f"{r.test_run} ({r.test_images if r.test_images is not None else '?'})"
                             if r.test_run else "none (the training run's own images)")
            t["rows"].append({"run": r.run, "paper_row": paper if known else f"{alias} (not in the paper)",
                              "model": alias, "result": r, "extra": extra, "ours": ours,
                              "paper": paper_vals, "diff": _diff(ours, paper_vals), "use": use(key, r)})
        _supersede(t["rows"], lambda row: (row["model"], row["result"].tokens))
        if not why:
            t["missing"] = "" if t["rows"] else (
                f"missing: probe_results has no rows for {title.split(' — ')[1]}; run `tokenlake probe …`")
        out.append(t)
    out.append(_table4(results, why, infos, ref, use))
    out.append(_table5(results, why, infos, ref))
    return out


def _diff(ours: list, paper: list) -> list:
    return [None if o is None or p is None else o - p for o, p in zip(ours, paper)]


def _supersede(rows: list[dict], key: Callable[[dict], Any]) -> None:
    """Among counted rows with the same key, keep the newest result; mark the others."""
    newest: dict[Any, dict] = {}
    for row in rows:
        if row["use"] == "":
            k = key(row)
            if k not in newest or row["result"].order > newest[k]["result"].order:
                newest[k] = row
    for row in rows:
        k = key(row) if row["use"] == "" else None
        if row["use"] == "" and newest[k] is not row:
            n = newest[k]["result"]
            row["use"] = f"superseded by the newer result {n.config_hash} of {n.run} ({n.created})"


def _dinov2_size(alias: str) -> tuple[str | None, bool]:
    parts = alias.split("_")
    if len(parts) >= 2 and parts[0] == "dinov2" and parts[1] in DINOV2_SIZES:
        return DINOV2_SIZES[parts[1]], alias.endswith("_reg4")
    return None, False


def _table4(results, why, infos, ref, use: Use) -> dict[str, Any]:
    """Table 4: rows = sizes, columns without/with registers (probe `heads`, metric top-1).

    Counted results of one size and subset form one row (the pair the verdict compares); every
    result the verdicts do not count is a row of its own with the reason."""
    cols = ref[T4]["columns"]
    t = {"key": T4, "title": "Table 4 — DINOv2 linear heads (top-1 %)", "columns": cols,
         "extra_columns": ["subset"], "rows": [], "missing": why}
    cand = []
    for r in (r for r in results if r.probe == "heads"):
        size, reg = _dinov2_size(infos[r.run].model)
        value = next((v for (g, m), v in r.values.items() if m in ACC_METRICS), None)
        if size is None or value is None:
            continue
        cand.append({"size": size, "reg": reg, "subset": str(infos[r.run].subset), "value": value,
                     "result": r, "use": use(T4, r)})
    _supersede(cand, lambda c: (c["size"], c["reg"], c["subset"]))
    pairs: dict[tuple[str, str], dict[bool, dict]] = {}
    for c in cand:
        if c["use"] == "":
            pairs.setdefault((c["size"], c["subset"]), {})[c["reg"]] = c
    for (size, subset), cells in sorted(pairs.items()):
        ours = [cells[reg]["value"] if reg in cells else None for reg in (False, True)]
        runs = [cells[reg]["result"].run if reg in cells else None for reg in (False, True)]
        t["rows"].append({"run": ",".join(r for r in runs if r), "runs": runs, "paper_row": size,
                          "extra": [subset], "ours": ours, "paper": ref[T4][size],
                          "diff": _diff(ours, ref[T4][size]), "use": ""})
    for c in (c for c in cand if c["use"] != ""):
        ours = [None, c["value"]] if c["reg"] else [c["value"], None]
        t["rows"].append({"run": c["result"].run, "runs": None, "paper_row": c["size"],
                          "extra": [c["subset"]], "ours": ours, "paper": ref[T4][c["size"]],
                          "diff": _diff(ours, ref[T4][c["size"]]), "use": c["use"]})
    if not why:
        t["missing"] = "" if t["rows"] else \
            "missing: no `heads` rows for DINOv2 runs in probe_results; run `tokenlake probe …`"
    return t


def _table5(results, why, infos, ref) -> dict[str, Any]:
    """Table 5: rows = head inputs (token_group), columns = sizes (probe `registers`, reg4 runs).
    No verdict reads it; the newest result fills a cell."""
    t = {"key": T5, "title": "Table 5 — linear heads on CLS / patch mean / registers (top-1 %)",
         "columns": ref[T5]["columns"], "extra_columns": [], "rows": [], "missing": why}
    cells: dict[tuple[str, str], tuple[str, float]] = {}
    for r in sorted((r for r in results if r.probe == "registers"), key=lambda r: r.order):
        size, reg = _dinov2_size(infos[r.run].model)
        if size is None or not reg:
            continue
        for (group, metric), v in r.values.items():
            if metric in ACC_METRICS:
                cells[group, size] = (r.run, v)
    for paper_row, paper_vals in ref[T5].items():
        if paper_row == "columns":
            continue
        ours = [cells.get((paper_row, c), (None, None))[1] for c in t["columns"]]
        if any(v is not None for v in ours):
            runs = sorted({cells[paper_row, c][0] for c in t["columns"] if (paper_row, c) in cells})
            t["rows"].append({"run": ",".join(runs), "paper_row": paper_row, "extra": [],
                              "ours": ours, "paper": paper_vals, "diff": _diff(ours, paper_vals),
                              "use": None})
    if not why:
        t["missing"] = "" if t["rows"] else \
            "missing: no `registers` rows for DINOv2 runs in probe_results; run `tokenlake probe …`"
    return t

"""Paper Tables 1-5 from the lake's `probe_results` view, beside the paper's numbers."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from tokenlake.store import Lake

# run's manifest['model'] alias -> the paper's row name
PAPER_ROWS = {"dinov2_s": "DINOv2-S", "deit3_m": "DeiT3-M", "clip_b": "OpenCLIP-B",
              "dinov2_g": "DINOv2-G", "swinv2_s": "Swin-S", "pvt_b2": "PVT-b2"}
DINOV2_SIZES = {"s": "Small", "b": "Base", "l": "Large", "g": "Giant"}

# How each paper table is found in probe_results (the names tokenlake.probes writes):
# (table key, title, probe names, {paper column: (token_group values, metric values)}).
TABLES = [
    ("table1_position", "Table 1 — position prediction", ("position",),
     {"top1_normal": (("normal",), ("top1",)), "top1_outlier": (("outlier",), ("top1",)),
      "dist_normal": (("normal",), ("dist",)), "dist_outlier": (("outlier",), ("dist",)),
      "baseline": (("grid",), ("baseline_dist",))}),
    ("table2_reconstruction", "Table 2 — pixel reconstruction", ("reconstruct",),
     {"l2_normal": (("normal",), ("l2",)), "l2_outlier": (("outlier",), ("l2",))}),
    ("table3_classification", "Table 3 — classification from one token", ("classify",),
     {"cls": (("cls",), ("top1",)), "normal": (("normal",), ("top1",)),
      "outlier": (("outlier",), ("top1",))}),
]
ACC_METRICS = {"top1"}


def reference() -> dict[str, Any]:
    """The paper's Tables 1-5 (package data copy of paper/reference.json)."""
    return json.loads(files("tokenlake.analyze").joinpath("reference.json").read_text("utf-8"))


def probe_rows(lk: Lake) -> tuple[list[dict] | None, str]:
    """Rows of the probe_results view, or (None, why) when the view is absent or empty."""
    has = lk.sql("SELECT count(*) AS n FROM information_schema.tables "
                 "WHERE table_name = 'probe_results'").column("n")[0].as_py()
    if not has:
        return None, "missing: the lake has no probe_results view yet; run `tokenlake probe …`"
    rows = lk.sql("SELECT * FROM probe_results").to_pylist()
    if not rows:
        return None, "missing: probe_results has no rows; run `tokenlake probe …`"
    return rows, ""


def _pct(metric: str, v: float | None) -> float | None:
    """tokenlake.probes stores accuracies in percent already; the value passes through."""
    del metric
    return v


def paper_tables(lk: Lake, models: dict[str, str]) -> list[dict[str, Any]]:
    """One dict per paper table: title, columns, rows [(paper row, ours, paper, diff)], missing.

    models: run -> manifest model alias. Tables 4-5 (DINOv2 linear/register heads) map runs by
    alias dinov2_{s,b,l,g}[_reg4]; probe names 'linear_head' and 'register_head'.
    """
    ref = reference()
    rows, why = probe_rows(lk)
    out = []
    for key, title, probes, cols in TABLES:
        t = {"key": key, "title": title, "columns": ref[key]["columns"], "rows": [], "missing": why}
        if rows is not None:
            for run, alias in sorted(models.items()):
                paper = PAPER_ROWS.get(alias)
                # runs of models the paper did not probe are still shown, without reference numbers
                known = paper is not None and paper in ref[key]
                paper_vals = ref[key][paper] if known else [None] * len(ref[key]["columns"])
                paper = paper if known else f"{alias} (not in the paper)"
                ours = []
                for c in ref[key]["columns"]:
                    if c not in cols:
                        ours.append(None)
                        continue
                    groups, metrics = cols[c]
                    vals = [(r["metric"], r["value"]) for r in rows if r["run"] == run
                            and r["probe"] in probes and r["token_group"] in groups
                            and r["metric"] in metrics]
                    ours.append(_pct(*vals[-1]) if vals else None)
                if any(v is not None for v in ours):
                    t["rows"].append({"run": run, "paper_row": paper, "ours": ours,
                                      "paper": paper_vals,
                                      "diff": [None if o is None or p is None else o - p
                                               for o, p in zip(ours, paper_vals)]})
            if not t["rows"]:
                t["missing"] = (f"missing: probe_results has no rows for {title.split(' — ')[1]}; "
                                f"run `tokenlake probe …`")
            else:
                t["missing"] = ""
        out.append(t)
    out.append(_dinov2_table(rows, why, models, ref, "table4_dinov2_linear_heads",
                             "Table 4 — DINOv2 linear heads (top-1 %)", ("heads",)))
    out.append(_dinov2_table(rows, why, models, ref, "table5_register_heads",
                             "Table 5 — linear heads on CLS / patch mean / registers (top-1 %)",
                             ("registers",)))
    return out


def _dinov2_size(alias: str) -> tuple[str | None, bool]:
    parts = alias.split("_")
    if len(parts) >= 2 and parts[0] == "dinov2" and parts[1] in DINOV2_SIZES:
        return DINOV2_SIZES[parts[1]], alias.endswith("_reg4")
    return None, False


def _dinov2_table(rows, why, models, ref, key, title, probe) -> dict[str, Any]:
    """Table 4: rows = sizes, columns without/with registers (probe `linear_head`, metric top-1).
    Table 5: rows = head inputs (token_group), columns = sizes (probe `register_head`, reg4 runs)."""
    t = {"key": key, "title": title, "columns": ref[key]["columns"], "rows": [], "missing": why}
    if rows is None:
        return t
    got = [r for r in rows if r["probe"] in probe and r["metric"] in ACC_METRICS]
    cells: dict[tuple[str, str], tuple[str, float]] = {}
    for r in got:
        size, reg = _dinov2_size(models.get(r["run"], ""))
        if size is None:
            continue
        if key == "table4_dinov2_linear_heads":
            cells[size, "with_registers" if reg else "without_registers"] = (r["run"], _pct(r["metric"], r["value"]))
        elif reg:
            cells[r["token_group"], size] = (r["run"], _pct(r["metric"], r["value"]))
    for paper_row, paper_vals in ref[key].items():
        if paper_row == "columns":
            continue
        ours = [cells.get((paper_row, c), (None, None))[1] for c in ref[key]["columns"]]
        if any(v is not None for v in ours):
            runs = sorted({cells[(paper_row, c)][0] for c in ref[key]["columns"] if (paper_row, c) in cells})
            t["rows"].append({"run": ",".join(runs), "paper_row": paper_row, "ours": ours,
                              "paper": paper_vals,
                              "diff": [None if o is None else o - p for o, p in zip(ours, paper_vals)]})
    t["missing"] = "" if t["rows"] else f"missing: no `{probe[0]}` rows for DINOv2 runs in probe_results; run `tokenlake probe …`"
    return t

"""The outlier card: per run, one row that answers "does this model have artifacts, where, and how
bad" (`tokenlake cards`, the report's "Outlier cards" section).

The numbers are the SQL view `cards` (sql/views/cards.sql, where each is defined); this module adds
the model family and parameter count from the manifests, formats the cards side by side, and draws
the one-page comparison of every model against its parameter count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake.analyze._common import FAMILIES, RunInfo, as_lake, out_dir, resolve_runs, save_table

DESCRIPTION = (
    "Outlier card per run (sql/views/cards.sql). Outliers: patch tokens whose norm (before the "
    "final norm) exceeds the run's threshold, the 98th percentile of its threshold run's patch "
    "norms. image_share: images with >= 1 outlier / images; outliers_per_affected_image: outliers "
    "/ images with >= 1; max_median_ratio: max / median patch norm; bc_log: Sarle's bimodality "
    "coefficient of ln(norm) (> 5/9 suggests two modes); separated_share: patch tokens more than 6 "
    "robust sigma above the median ln(norm); emergence_block: first block whose median output norm "
    "at the final outlier patches exceeds the threshold (runs with --blocks all; emergence_depth = "
    "(block + 1) / blocks); attn_agreement: claim 1's pooled top-k agreement (sum over images of "
    "|k most-attended patches ∩ its k outliers| / sum k); low_info_share: claim 3's P(nbr_cos > the "
    "run's 90th percentile | outlier), low_info_ratio: that / P(same | normal patch); top_neurons: "
    "the 3 best register neurons of the ranking of neuron_run (the run's own, else a run of the same "
    "model and weights). family and params come from the manifests."
)

# (column, label) of the side-by-side card, top to bottom; `_cell` formats each.
FIELDS = (
    ("model", "model"),
    ("family", "family"),
    ("params", "parameters"),
    ("img_size", "resolution (px)"),
    ("subset", "subset"),
    ("weights", "weights"),
    ("threshold", "outlier threshold (98th pct)"),
    ("image_share", "images with ≥1 outlier"),
    ("outliers_per_affected_image", "outliers per affected image"),
    ("max_median_ratio", "max / median patch norm"),
    ("bc_log", "bimodality BC(ln norm)"),
    ("separated_share", "separated share (>6 robust σ)"),
    ("emergence_block", "emergence block"),
    ("attn_agreement", "attention–norm agreement"),
    ("low_info_share", "outliers in low-info areas"),
    ("low_info_ratio", "low-info ratio outlier/normal"),
    ("top_neurons", "top register neurons"),
    ("neuron_method", "neuron ranking"),
)
RANDOM_MARK = "RANDOM WEIGHTS"

# Panels of the comparison figure: (column, y label, y scale, reference line or None).
PANELS = (
    ("max_median_ratio", "max / median patch norm", "log", None),
    ("outliers_per_affected_image", "outliers per image with ≥ 1 outlier", "linear", None),
    ("image_share", "share of images with ≥ 1 outlier", "linear", None),
    ("emergence_depth", "emergence block (fraction of depth)", "linear", None),
    ("attn_agreement", "attention–norm top-k agreement (claim 1)", "linear", None),
    ("low_info_share", "P(low-info | outlier) (claim 3)", "linear",
     (0.1, "0.1 = any patch's chance")),
)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "8", "d", "H")


def card_table(lake: Any, *, runs: list[str] | str | None = None) -> pa.Table:
    """The `cards` view's rows for `runs` (default every complete run), in that order, with
    `family` and `params` (from the manifests) after `model`."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    if {i.run for i in infos} == {r["run"] for r in lk.runs()}:
        t = lk.sql("SELECT * FROM cards")
    else:  # the filter reaches every per-run branch: the other runs are never read
        t = lk.sql("SELECT * FROM cards WHERE list_contains(?, run)",
                   params=[[i.run for i in infos]])
        order = {i.run: k for k, i in enumerate(infos)}
        t = t.take(sorted(range(t.num_rows), key=lambda k: order[t.column("run")[k].as_py()]))
    return _with_manifest_columns(t, infos)


def _with_manifest_columns(t: pa.Table, infos: list[RunInfo]) -> pa.Table:
    # columns made by polars, not pa.array: pyarrow's first pa.array imports pandas when it is
    # installed (~0.2 s of `tokenlake cards`, bench/bench_cli.py)
    import polars as pl

    pos = {r: k for k, r in enumerate(t.column("run").to_pylist())}
    t = t.take(pl.Series([pos[i.run] for i in infos], dtype=pl.Int64).to_arrow())
    at = t.column_names.index("model") + 1
    extra = pl.DataFrame({"family": [i.family for i in infos], "params": [i.params for i in infos]},
                         schema={"family": pl.String, "params": pl.Int64}).to_arrow()
    t = t.add_column(at, "family", extra.column("family").cast(pa.string()))
    return t.add_column(at + 1, "params", extra.column("params"))


def _num(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _cell(col: str, r: dict[str, Any]) -> str:
    """One card field of run row `r`, as shown in the terminal and the report."""
    v = r.get(col)
    if col == "params":
        return _params(v)
    if col == "weights":
        return RANDOM_MARK if r["random_weights"] else str(v or "—")
    if col == "threshold":
        ref = r["threshold_run"]
        return _num(v, 4) + ("" if ref in (None, r["run"]) else f" (of {ref})")
    if col == "image_share":
        if v is None:
            return "—"
        return f"{_pct(v)} ({r['n_images_with_outliers']:,} of {r['n_images']:,})"
    if col == "emergence_block":
        if r["n_blocks"] is None:
            return "— (no blocks table)"
        if v is None:
            return f"— (no block's median above the threshold, {r['n_blocks']} blocks)"
        return f"{v} (blocks 0–{r['n_blocks'] - 1}; {100 * r['emergence_depth']:.0f} % of depth)"
    if col == "attn_agreement":
        return "—" if v is None else f"{v:.3f} ({r['attn_hits']:,} of {r['n_outliers']:,})"
    if col in ("low_info_share", "separated_share"):
        return _pct(v)
    if col == "top_neurons":
        if v is None:
            return "— (no ranking)"
        return v + ("" if r["neuron_run"] == r["run"] else f" (from {r['neuron_run']})")
    if col == "neuron_method":
        if v is None:
            return "—"
        return (f"{v}, detect b{r['neuron_detect_block']}, candidates ≤ "
                f"b{r['neuron_highest_block']}")
    if isinstance(v, float):
        return _num(v)
    if v is None:
        return "—"
    return f"{v:,}" if isinstance(v, int) else str(v)


def run_header(r: dict[str, Any]) -> str:
    return r["run"] + (f" [{RANDOM_MARK}]" if r["random_weights"] else "")


def side_by_side(t: pa.Table) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per card field, one column per run (RANDOM WEIGHTS in the header
    of random-weight runs and in their weights field)."""
    rows = t.to_pylist()
    head = ["field", *(run_header(r) for r in rows)]
    return head, [[label, *(_cell(col, r) for r in rows)] for col, label in FIELDS]


def per_run(t: pa.Table) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per run, one column per card field (the report's table)."""
    rows = t.to_pylist()
    head = ["run", *(label for _, label in FIELDS)]
    return head, [[run_header(r), *(_cell(col, r) for col, _ in FIELDS)] for r in rows]


def cards(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
          canonical: set[str] | None = None) -> dict[str, Any]:
    """Cards of `runs` (default every complete run): cards.parquet/.csv and cards.png (every run
    against its parameter count; `canonical` runs filled, the others hollow, when given)."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    t = card_table(lk, runs=[i.run for i in infos])
    paths = save_table(t, out, "cards", meta={"description": DESCRIPTION, "percentile": 0.98,
                                              "view": "cards (sql/views/cards.sql)"})
    fig = out / "cards.png"
    draw(t, infos, fig, canonical=canonical)
    cmd = f"tokenlake cards --lake {lk.path} --runs {','.join(i.run for i in infos)} --format csv"
    return {"table": paths, "figure": str(fig), "cards": t, "rows": t.to_pylist(), "command": cmd}


def _family_style(families: list[str]) -> dict[str, tuple[str, Any]]:
    """family -> (marker, colour): the known families in FAMILIES order, then the others."""
    from tokenlake.analyze import _plot  # matplotlib, for figures only

    order = [f for f in FAMILIES if f in families] + sorted(set(families) - set(FAMILIES))
    cmap = _plot.plt.get_cmap("tab20")
    return {f: (MARKERS[k % len(MARKERS)], cmap((2 * k) % 20 + (k // 10) % 2))
            for k, f in enumerate(order)}


def draw(t: pa.Table, infos: list[RunInfo], path: Path, *, canonical: set[str] | None) -> None:
    """One page: each card number (PANELS) against the parameter count, log x; one marker shape
    (and colour) per family; hollow = not the model's canonical run (when `canonical` is given);
    random-weight runs ringed and labelled in red. Runs without a parameter count are listed."""
    from matplotlib.lines import Line2D

    from tokenlake.analyze import _plot  # matplotlib, for figures only

    rows = t.to_pylist()
    placed = [r for r in rows if r["params"]]
    style = _family_style(sorted({r["family"] for r in placed}))
    no_params = [r["run"] for r in rows if not r["params"]]
    millions = [r["params"] / 1e6 for r in placed] or [1.0]
    xlim = (min(millions) / 2, max(max(millions) * 2, 500.0))
    with _plot.style():
        fig, axes = _plot.plt.subplots(2, 3, figsize=(16.0, 9.0), squeeze=False)
        for ax, (col, label, yscale, ref) in zip(axes.ravel(), PANELS):
            drawn = 0
            for r in placed:
                y = r[col]
                if y is None or not np.isfinite(y) or (yscale == "log" and y <= 0):
                    continue
                marker, colour = style[r["family"]]
                x = r["params"] / 1e6
                filled = canonical is None or r["run"] in canonical
                ax.scatter([x], [y], marker=marker, s=46, zorder=3, linewidths=1.2,
                           facecolors=colour if filled else "none", edgecolors=colour)
                if r["random_weights"]:
                    ax.scatter([x], [y], marker="o", s=190, zorder=2, facecolors="none",
                               edgecolors=_plot.RANDOM, linewidths=1.6)
                name = r["model"] + (" RANDOM" if r["random_weights"] else "")
                ax.annotate(name, (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points",
                            color=_plot.RANDOM if r["random_weights"] else "#333333")
                drawn += 1
            missing = len(placed) - drawn
            if ref is not None:
                ax.axhline(ref[0], color="grey", ls=":", lw=1)
                ax.text(1.0, ref[0], ref[1] + " ", transform=ax.get_yaxis_transform(), fontsize=7,
                        color="grey", ha="right", va="bottom")
            ax.axvline(300, color="grey", ls="--", lw=0.8)
            ax.text(300, 1.0, " 300M", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="grey", va="top")
            ax.set_xscale("log")
            ax.set_xlim(*xlim)  # one x range on every panel, the 300M line included
            ax.set_yscale(yscale)
            if yscale == "log":
                from matplotlib.ticker import FormatStrFormatter, NullFormatter

                lo, hi = ax.get_ylim()
                if hi / lo < 10:  # under a decade a log axis has no labelled tick at all
                    ax.set_yticks(np.geomspace(lo, hi, 5)[1:-1])
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            elif col != "outliers_per_affected_image":
                ax.set_ylim(-0.04, 1.08)
            ax.set_xlabel("parameters (millions, log scale)")
            ax.set_ylabel(label)
            why = ("without a blocks table (--blocks all)" if col == "emergence_depth"
                   else "without a value")
            ax.set_title(label + (f"\n{missing} run(s) {why} not drawn" if missing else ""))
            if not drawn:
                ax.text(0.5, 0.5, "no run to draw", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
        handles = [Line2D([], [], ls="", marker=m, color=c, markersize=7, label=f)
                   for f, (m, c) in style.items()]
        if canonical is not None:
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none",
                                  color="#555555", markersize=7,
                                  label="hollow: not its model's canonical run"))
        if any(r["random_weights"] for r in rows):
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none",
                                  color=_plot.RANDOM, markersize=11, label="red ring: RANDOM WEIGHTS"))
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.018),
                   ncol=min(len(handles), 8), frameon=False, title="family (marker shape)",
                   fontsize=8)
        if no_params:
            fig.text(0.5, 0.0, "no parameter count in the manifest, not drawn: "
                     + ", ".join(no_params), fontsize=7, color="#555555", ha="center",
                     va="bottom")
        _plot.suptitle(fig, "Outlier cards — every model against its parameter count", infos)
        room = 0.62 if any(i.random_weights for i in infos) else 0.38
        fig.tight_layout(rect=(0, 0.1, 1, 1 - room / fig.get_figheight()))
        _plot.save(fig, path)

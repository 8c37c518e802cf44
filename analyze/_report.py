"""`tokenlake report`: every figure and table, the paper's tables, verdicts and provenance, in a
static report.html (figures embedded as base64 PNG) and its report.md twin."""

from __future__ import annotations

import base64
import html
import math
import traceback
from pathlib import Path
from typing import Any

from tokenlake.analyze._artifacts import artifacts
from tokenlake.analyze._blocks import blocks
from tokenlake.analyze._common import RunInfo, as_lake, resolve_runs
from tokenlake.analyze._maps import maps
from tokenlake.analyze._neighbours import neighbours
from tokenlake.analyze._norms import norms
from tokenlake.analyze._probes import paper_tables
from tokenlake.analyze._size import size

HOLDS, FAILS, NODATA = "holds", "does not hold", "not enough data"
# Verdict rules (documented in the report):
CLAIM1_JACCARD = 0.5  # claim 1 holds for a run if overall Jaccard(top attn, top norm) >= 0.5
CLAIM3_RATIO = 1.5  # claim 3 holds if P(low|outlier)/P(low|normal) > 1.5 and median cos higher
DISAGREE = "Claim 1 — where attention and norm disagree"
REGISTERS = "Registers — none vs trained vs test-time"
REG_COLS = ["registers", "run", "k", "median", "max", "max_median_ratio", "outliers_own",
            "above_base", "jaccard", "precision", "recall", "base_run", "mean_rel_l2", "max_rel_l2"]
REG_CAPTION = ("Patch-token norms of the same images without registers, with trained registers "
               "(dinov2_*_reg4) and with test-time registers (--test-time-registers RUN:K). "
               "outliers_own: above the run's own 98th percentile (2 % by construction); above_base: "
               "above the no-register run's threshold (comparable across runs); jaccard/precision/"
               "recall: the artifacts job; mean_rel_l2/max_rel_l2: relative L2 change of the patch "
               "tokens against base_run (same model without the extra token; with K = 0 the change "
               "made through attention alone).")
MIN_OUTLIERS = 3  # fewer outlier tokens in a run: not enough data


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _claim1(res) -> dict:
    if res is None:
        return {"verdict": NODATA, "rule": "", "runs": {}}
    per = {}
    for run, r in res["runs"].items():
        if r["jaccard"] is None or (r["n_norm"] or 0) < MIN_OUTLIERS:
            v = NODATA
        else:
            v = HOLDS if r["jaccard"] >= CLAIM1_JACCARD else FAILS
        per[run] = {"verdict": v, "numbers": f"Jaccard {_fmt(r['jaccard'])}, precision "
                    f"{_fmt(r['precision'])}, recall {_fmt(r['recall'])} ({r['n_both']} shared of "
                    f"{r['n_norm']} top-norm / {r['n_attn']} top-attention patches)"}
    return {"rule": f"holds for a run if the overall Jaccard of its top-attention and top-norm "
                    f"patch tokens is >= {CLAIM1_JACCARD}", "runs": per, "verdict": _overall(per)}


def _claim3(res) -> dict:
    if res is None:
        return {"verdict": NODATA, "rule": "", "runs": {}}
    per = {}
    for run, r in res["runs"].items():
        if (r["n_outlier"] or 0) < MIN_OUTLIERS or r["ratio"] is None:
            v = NODATA
        else:
            ok = r["ratio"] > CLAIM3_RATIO and (r["median_cos_outlier"] or -9) > (r["median_cos_normal"] or 9)
            v = HOLDS if ok else FAILS
        per[run] = {"verdict": v, "numbers": f"ratio {_fmt(r['ratio'])}, median nbr_cos outlier "
                    f"{_fmt(r['median_cos_outlier'])} vs normal {_fmt(r['median_cos_normal'])} "
                    f"({r['n_outlier']} outliers)"}
    return {"rule": f"holds for a run if P(low-info|outlier)/P(low-info|normal) > {CLAIM3_RATIO} "
                    f"and the outliers' median nbr_cos exceeds the normal patches'",
            "runs": per, "verdict": _overall(per)}


def _claim2(res, infos: dict[str, RunInfo]) -> dict:
    rule = ("per family with >= 2 sizes (pretrained runs with a parameter count): holds if the "
            "max/median patch-norm ratio rises with size (Spearman rho > 0); the claim holds "
            "overall if it holds in every such family")
    if res is None:
        return {"verdict": NODATA, "rule": rule, "runs": {}}
    fams: dict[str, list] = {}
    for r in res["rows"]:
        if r["params"] and not r["random_weights"] and r["max_median_ratio"] is not None:
            fams.setdefault(r["family"], []).append((r["params"], r["max_median_ratio"], r["model"]))
    per = {}
    for f, pts in sorted(fams.items()):
        sizes = sorted({p[0] for p in pts})
        if len(sizes) < 2:
            per[f] = {"verdict": NODATA, "numbers": f"one size only ({pts[0][2]})"}
            continue
        from scipy.stats import spearmanr

        rho = float(spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic)
        per[f] = {"verdict": HOLDS if rho > 0 else FAILS,
                  "numbers": f"rho {rho:.2f} over " + ", ".join(
                      f"{m} ({p / 1e6:.0f}M): {v:.2f}" for p, v, m in sorted(pts))}
    small = [r["model"] for r in res["rows"] if r["params"] and r["params"] < 300e6
             and not r["random_weights"] and (r["bc_log"] or 0) > 5 / 9]
    out = {"rule": rule, "runs": per, "verdict": _overall(per)}
    if small:
        out["note"] = ("bimodal norm distributions (BC(log) > 5/9) also in models under 300M "
                       "parameters: " + ", ".join(small))
    if not fams:
        out["note"] = "no pretrained run has a parameter count ('params' in its manifest)"
    return out


def _claim_probes(tables: list[dict], keys: tuple[str, ...], name: str) -> dict:
    have = [t for t in tables if t["key"] in keys and t["rows"]]
    if not have:
        return {"verdict": NODATA, "rule": f"needs {name} from probe_results (missing)", "runs": {}}
    per = {}
    for t in have:
        for r in t["rows"]:
            ours = dict(zip(t["columns"], r["ours"]))
            if t["key"] == "table1_position" and None not in (ours["top1_normal"], ours["top1_outlier"]):
                per[f"{r['run']} (position)"] = {
                    "verdict": HOLDS if ours["top1_outlier"] < ours["top1_normal"] else FAILS,
                    "numbers": f"top-1 normal {_fmt(ours['top1_normal'])} vs outlier {_fmt(ours['top1_outlier'])}"}
            if t["key"] == "table2_reconstruction" and None not in ours.values():
                per[f"{r['run']} (reconstruction)"] = {
                    "verdict": HOLDS if ours["l2_outlier"] > ours["l2_normal"] else FAILS,
                    "numbers": f"L2 normal {_fmt(ours['l2_normal'])} vs outlier {_fmt(ours['l2_outlier'])}"}
            if t["key"] == "table3_classification" and None not in (ours["normal"], ours["outlier"]):
                per[f"{r['run']} (global info)"] = {
                    "verdict": HOLDS if ours["outlier"] > ours["normal"] else FAILS,
                    "numbers": f"top-1 normal {_fmt(ours['normal'])} vs outlier {_fmt(ours['outlier'])}"}
            if t["key"] == "table4_dinov2_linear_heads" and None not in r["ours"]:
                per[f"{r['paper_row']} (registers)"] = {
                    "verdict": HOLDS if r["ours"][1] >= r["ours"][0] - 0.5 else FAILS,
                    "numbers": f"without {_fmt(r['ours'][0])} vs with registers {_fmt(r['ours'][1])}"}
    rules = {"claim4": "holds per run/task if outlier tokens are worse at position (top-1) and "
                       "reconstruction (L2) and better at classification than normal tokens",
             "claim5": "holds per size if the linear head with registers is within 0.5 points of, "
                       "or better than, the one without (performance part only)"}
    return {"verdict": _overall(per), "rule": rules.get(name, ""), "runs": per}


def _claim5_lake(norm_res, infos: dict[str, RunInfo]) -> dict:
    """Artifact part of claim 5 from the lake: dinov2_X_reg4 vs dinov2_X max/median norm ratio."""
    if norm_res is None:
        return {}
    by_model = {infos[r].model: (r, s) for r, s in norm_res["runs"].items() if not infos[r].random_weights}
    per = {}
    for m, (run, s) in by_model.items():
        if m.startswith("dinov2_") and m.endswith("_reg4") and m[:-5] in by_model:
            base = by_model[m[:-5]][1]
            per[f"{m} vs {m[:-5]}"] = {
                "verdict": HOLDS if s["max_median_ratio"] < base["max_median_ratio"] else FAILS,
                "numbers": f"max/median norm {s['max_median_ratio']:.2f} with registers vs "
                           f"{base['max_median_ratio']:.2f} without"}
    return per


def _overall(per: dict) -> str:
    vs = [p["verdict"] for p in per.values() if p["verdict"] != NODATA]
    if not vs:
        return NODATA
    if all(v == HOLDS for v in vs):
        return HOLDS
    if all(v == FAILS for v in vs):
        return FAILS
    return f"mixed: holds for {vs.count(HOLDS)} of {len(vs)}"


JOBS = (("maps", "Feature and attention maps", maps),
        ("norms", "Token-norm distributions (Fig. 4, 7, 12; appendix C)", norms),
        ("size", "Claim 2 — outliers vs model size", size),
        ("neighbours", "Claim 3 — neighbour similarity (Fig. 3, 10)", neighbours),
        ("artifacts", "Claim 1 — attention vs norm artifacts", artifacts),
        ("blocks", "Appendix A — per-block and q/k/v maps", blocks))

CAPTIONS = {
    "maps": "Per run (rows) and image (column groups): the input reassembled from the stored patch "
            "pixels, the L2 norm of each patch token before the final norm, and the attention map "
            "(ViT: CLS attention; Swin/PVT: received attention). Every map has its own colour "
            "scale; red outlines mark outliers (norm above the run's threshold).",
    "norms": "Histogram of token norms on log-spaced bins per token kind, log counts; the dashed "
             "line is the outlier threshold.",
    "size": "Prominence of high-norm tokens against parameter count, one line per model family.",
    "neighbours": "Density of the mean cosine similarity of each patch with its 4-neighbours after "
                  "the patch embedding, outlier vs normal patches; the dashed line is the "
                  "low-information cutoff.",
    "artifacts": "Overlap of the top-attention and top-norm patch tokens per run, and the "
                 "distribution of the per-image Jaccard index.",
    "artifacts_disagree": "Images where attention and norm artifacts disagree most: red outlines = "
                          "top-norm patches, white dashes = top-attention patches.",
    "blocks": "Norm of every block's output (selected blocks) and the last block's q/k/v norms.",
}


def report(lake: Any, *, out: str | Path | None = None, runs: list[str] | str | None = None,
           percentile: float = 0.98) -> dict[str, Any]:
    """Run every analysis job into OUT/ and write OUT/report.html (self-contained) and
    OUT/report.md. Returns paths, verdicts and what is missing."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = Path(out) if out is not None else lk.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    figdir = out / "analysis"
    results, missing = {}, []
    for key, _title, fn in JOBS:
        try:
            results[key] = fn(lk, runs=[i.run for i in infos], out=figdir, percentile=percentile)
        except Exception as err:  # noqa: BLE001 — a job that cannot run is reported as missing, not drawn
            results[key] = None
            missing.append(f"{key}: {type(err).__name__}: {err}")
            traceback.print_exc()
    try:  # no / trained / test-time registers (analyze/_neurons.py)
        from tokenlake.analyze._neurons import registers

        art = results.get("artifacts")
        results["registers"] = registers(lk, runs=[i.run for i in infos], out=figdir,
                                         artifact_rows=art["runs"] if art else {})
        missing += [f"registers: {m}" for m in results["registers"]["missing"]]
    except Exception as err:  # noqa: BLE001 — reported as missing, like the jobs
        results["registers"] = None
        missing.append(f"registers: {type(err).__name__}: {err}")
        traceback.print_exc()
    imap = {i.run: i for i in infos}
    if results.get("blocks"):
        for run, why in results["blocks"]["missing"].items():
            missing.append(f"blocks for run {run}: {why}")
    tables = paper_tables(lk, {i.run: i.model for i in infos})
    for t in tables:
        if t["missing"]:
            missing.append(f"{t['title']}: {t['missing']}")
    claims = {
        "Claim 1 — artifacts are high-norm outlier tokens": _claim1(results.get("artifacts")),
        "Claim 2 — large models (>300M) grow high-norm tokens": _claim2(results.get("size"), imap),
        "Claim 3 — high-norm tokens sit in redundant areas": _claim3(results.get("neighbours")),
        "Claim 4 — high-norm tokens lose local, hold global information":
            _claim_probes(tables, ("table1_position", "table2_reconstruction",
                                   "table3_classification"), "claim4"),
        "Claim 5 — registers remove artifacts, keep performance":
            _claim_probes(tables, ("table4_dinov2_linear_heads",), "claim5"),
    }
    c5 = _claim5_lake(results.get("norms"), imap)
    if c5:
        k = "Claim 5 — registers remove artifacts, keep performance"
        claims[k]["runs"].update(c5)
        claims[k]["verdict"] = _overall(claims[k]["runs"])
        claims[k]["rule"] += "; artifact part: the reg4 run's max/median patch-norm ratio is below the run without registers"
    doc = _Doc(lk, infos, results, tables, claims, missing, out, percentile)
    (out / "report.html").write_text(doc.html(), encoding="utf-8")
    (out / "report.md").write_text(doc.md(), encoding="utf-8")
    return {"html": str(out / "report.html"), "md": str(out / "report.md"),
            "claims": {k: v["verdict"] for k, v in claims.items()}, "missing": missing,
            "results": results}


class _Doc:
    """Builds the report twice from the same sections: HTML (base64 figures) and Markdown."""

    def __init__(self, lk, infos, results, tables, claims, missing, out: Path, percentile):
        self.lk, self.infos, self.results, self.tables = lk, infos, results, tables
        self.claims, self.missing, self.out, self.percentile = claims, missing, out, percentile

    # -- content ---------------------------------------------------------------------------------
    def _figures(self) -> list[tuple[str, str, str, str]]:
        """(section key, title, png path, caption) for every figure written."""
        figs = []
        for key, title, _fn in JOBS:
            r = self.results.get(key)
            if not r:
                continue
            if key == "blocks":
                for run, p in r["figures"].items():
                    figs.append((key, f"{title}: {run}", p, CAPTIONS["blocks"]))
                continue
            figs.append((key, title, r["figure"], CAPTIONS[key]))
            if key == "artifacts":
                figs.append((key, DISAGREE,
                             r["disagree_figure"], CAPTIONS["artifacts_disagree"]))
        return figs

    def _provenance(self) -> list[list[str]]:
        rows = []
        for i in self.infos:
            m = i.manifest
            v = m.get("versions") or {}
            rows.append([i.run, i.model, str(m.get("timm_name", "—")),
                         "RANDOM WEIGHTS" if i.random_weights else str(i.weights or "—"),
                         _fmt(i.params), _fmt(i.img_size), str(i.subset or "—"),
                         str(m.get("policy", "—")), _fmt(m.get("n_images")), _fmt(m.get("n_tokens")),
                         ", ".join(f"{k} {x}" for k, x in v.items()) or "—"])
        return rows

    def _commands(self) -> list[str]:
        cmds = [r["command"] for r in self.results.values() if r and "command" in r]
        return cmds + [f"tokenlake report --lake {self.lk.path} --out {self.out}"]

    # -- HTML ------------------------------------------------------------------------------------
    def html(self) -> str:
        e = html.escape
        toc, body = [], []

        def section(anchor: str, title: str, content: str) -> None:
            toc.append(f'<li><a href="#{anchor}">{e(title)}</a></li>')
            body.append(f'<section id="{anchor}"><h2>{e(title)}</h2>{content}</section>')

        def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
            h = "".join(f"<th>{e(x)}</th>" for x in head)
            b = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'

        rnd = [i.run for i in self.infos if i.random_weights]
        banner = (f'<div class="banner">RANDOM WEIGHTS: {e(", ".join(rnd))} — these runs describe '
                  f'untrained networks; their numbers say nothing about the paper\'s models.</div>'
                  if rnd else "")
        # verdicts
        v = []
        for claim, c in self.claims.items():
            cls = {HOLDS: "ok", FAILS: "bad", NODATA: "na"}.get(c["verdict"], "mixed")
            rows = [[k, p["verdict"], p["numbers"]] for k, p in c["runs"].items()]
            v.append(f'<h3>{e(claim)} <span class="v {cls}">{e(c["verdict"])}</span></h3>'
                     f'<p class="rule">Rule: {e(c["rule"])}</p>'
                     + (f'<p class="note">{e(c["note"])}</p>' if c.get("note") else "")
                     + (table(["run / family", "verdict", "numbers"], rows) if rows else ""))
        section("verdicts", "Verdicts on the paper's claims", "".join(v))
        for k, (key, title, path, cap) in enumerate(self._figures()):
            data = base64.b64encode(Path(path).read_bytes()).decode()
            r = self.results[key]
            tbl = r.get("table")
            links = f' Data: <code>{e(Path(tbl["parquet"]).name)}</code>, <code>{e(Path(tbl["csv"]).name)}</code> in <code>{e(str(Path(tbl["csv"]).parent))}</code>.' if tbl else ""
            section(f"fig{k}", title,
                    f'<figure><img src="data:image/png;base64,{data}" alt="{e(title)}">'
                    f'<figcaption><b>Figure {k + 1}.</b> {e(cap)}{links}</figcaption></figure>'
                    + (self._job_table_html(key, table) if title != DISAGREE else ""))
        for t in self.tables:
            if t["rows"]:
                head = ["run", "paper row"] + [f"{c} (ours / paper / Δ)" for c in t["columns"]]
                rows = [[r["run"], r["paper_row"]] + [
                    f"{_fmt(o)} / {_fmt(p)} / {_fmt(d)}" for o, p, d in
                    zip(r["ours"], r["paper"], r["diff"])] for r in t["rows"]]
                content = table(head, rows)
            else:
                content = f'<p class="missing">{e(t["missing"])}</p>'
            section(t["key"], t["title"], content)
        reg = self.results.get("registers")
        if reg and (reg["rows"] or reg["missing"]):
            content = ""
            if reg["figure"]:
                data = base64.b64encode(Path(reg["figure"]).read_bytes()).decode()
                content += (f'<figure><img src="data:image/png;base64,{data}" alt="{e(REGISTERS)}">'
                            f'<figcaption>{e(REG_CAPTION)}</figcaption></figure>')
            for g in dict.fromkeys(r["group"] for r in reg["rows"]):
                content += f"<h3>{e(g)}</h3>" + table(REG_COLS, [
                    [_fmt(r[c]) for c in REG_COLS] for r in reg["rows"] if r["group"] == g])
            if reg["missing"]:
                content += '<p class="missing">Missing runs:</p><ul>' + "".join(
                    f"<li>{e(m)}</li>" for m in reg["missing"]) + "</ul>"
            section("registers", REGISTERS, content)
        section("provenance", "Provenance",
                table(["run", "model", "timm name", "weights", "params", "px", "subset", "policy",
                       "images", "tokens", "versions"], self._provenance())
                + "<h3>Commands that rebuild each part</h3><pre>"
                + e("\n".join(self._commands())) + "</pre>"
                + f"<p>Outlier threshold: the {self.percentile * 100:g}th percentile of the patch-token "
                  "norms of each run's threshold run (manifest <code>outlier_ref</code>, else the run).</p>")
        section("missing", "Missing pieces",
                "<ul>" + "".join(f"<li>{e(m)}</li>" for m in self.missing) + "</ul>"
                if self.missing else "<p>Nothing missing.</p>")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>tokenlake report</title>"
                f"<style>{CSS}</style></head><body>{banner}<h1>tokenlake report</h1>"
                f"<p class='sub'>Lake <code>{e(str(self.lk.path))}</code> · {len(self.infos)} runs · "
                f"reproducing <i>Do All Vision Transformers Need Registers?</i></p>"
                f"<nav><h2>Contents</h2><ol>{''.join(toc)}</ol></nav>{''.join(body)}</body></html>")

    def _job_table_html(self, key: str, table) -> str:
        rows = self._job_rows(key)
        return table(rows[0], rows[1:]) if rows else ""

    def _job_rows(self, key: str) -> list[list[str]] | None:
        r = self.results.get(key)
        if not r:
            return None
        if key == "norms":
            cols = ["threshold", "outlier_share", "image_share", "outliers_per_image",
                    "max_median_ratio", "bc_log", "bc", "gmm_ashman_d"]
            return [["run", *cols]] + [[run, *(_fmt(s[c]) for c in cols)] for run, s in r["runs"].items()]
        if key == "neighbours":
            cols = ["low_info_cutoff", "n_outlier", "p_low_outlier", "p_low_normal", "ratio",
                    "median_cos_outlier", "median_cos_normal"]
            return [["run", *cols]] + [[run, *(_fmt(s[c]) for c in cols)] for run, s in r["runs"].items()]
        if key == "artifacts":
            cols = ["n_norm", "n_attn", "n_both", "precision", "recall", "jaccard", "mean_image_jaccard"]
            return [["run", *cols]] + [[run, *(_fmt(s[c]) for c in cols)] for run, s in r["runs"].items()]
        if key == "size":
            cols = ["model", "family", "params", "max_median_ratio", "bc_log", "outliers_per_affected_image"]
            return [["run", *cols]] + [[s["run"], *(_fmt(s[c]) for c in cols)] for s in r["rows"]]
        return None

    # -- Markdown --------------------------------------------------------------------------------
    def md(self) -> str:
        def table(rows: list[list[str]]) -> str:
            esc = lambda x: str(x).replace("|", "\\|")
            lines = ["| " + " | ".join(map(esc, rows[0])) + " |",
                     "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows[1:]]
            return "\n".join(lines)

        L = ["# tokenlake report", ""]
        rnd = [i.run for i in self.infos if i.random_weights]
        if rnd:
            L += [(f"> **RANDOM WEIGHTS: {', '.join(rnd)}** — these runs describe untrained "
                  "networks; their numbers say nothing about the paper's models."), ""]
        L += [f"Lake `{self.lk.path}` · {len(self.infos)} runs", "", "## Verdicts on the paper's claims", ""]
        for claim, c in self.claims.items():
            L += [f"### {claim}: **{c['verdict']}**", "", f"Rule: {c['rule']}", ""]
            if c.get("note"):
                L += [c["note"], ""]
            if c["runs"]:
                L += [table([["run / family", "verdict", "numbers"]] +
                            [[k, p["verdict"], p["numbers"]] for k, p in c["runs"].items()]), ""]
        for k, (key, title, path, cap) in enumerate(self._figures()):
            rel = Path(path).relative_to(self.out) if Path(path).is_relative_to(self.out) else Path(path)
            L += [f"## {title}", "", f"![{title}]({rel.as_posix()})", "", f"*Figure {k + 1}.* {cap}", ""]
            rows = self._job_rows(key)
            if rows and title != DISAGREE:
                L += [table(rows), ""]
        for t in self.tables:
            L += [f"## {t['title']}", ""]
            if t["rows"]:
                L += [table([["run", "paper row"] + [f"{c} (ours / paper / Δ)" for c in t["columns"]]] +
                            [[r["run"], r["paper_row"]] + [f"{_fmt(o)} / {_fmt(p)} / {_fmt(d)}"
                             for o, p, d in zip(r["ours"], r["paper"], r["diff"])] for r in t["rows"]]), ""]
            else:
                L += [t["missing"], ""]
        reg = self.results.get("registers")
        if reg and (reg["rows"] or reg["missing"]):
            L += [f"## {REGISTERS}", ""]
            if reg["figure"]:
                fig = Path(reg["figure"])
                rel = fig.relative_to(self.out) if fig.is_relative_to(self.out) else fig
                L += [f"![{REGISTERS}]({rel.as_posix()})", "", REG_CAPTION, ""]
            for g in dict.fromkeys(r["group"] for r in reg["rows"]):
                L += [f"### {g}", "", table([REG_COLS] + [[_fmt(r[c]) for c in REG_COLS]
                                                          for r in reg["rows"] if r["group"] == g]), ""]
            if reg["missing"]:
                L += ["Missing runs:", ""] + [f"- {m}" for m in reg["missing"]] + [""]
        L += ["## Provenance", "", table([["run", "model", "timm name", "weights", "params", "px",
                                           "subset", "policy", "images", "tokens", "versions"]]
                                         + self._provenance()), "",
              "Commands that rebuild each part:", "", "```", *self._commands(), "```", "",
              "## Missing pieces", ""]
        L += [f"- {m}" for m in self.missing] or ["Nothing missing."]
        return "\n".join(L) + "\n"


CSS = """
body{font:15px/1.5 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:0 auto;
padding:0 24px 60px;color:#222}
h1{margin-top:28px}h2{border-bottom:2px solid #eee;padding-bottom:4px;margin-top:40px}
.sub{color:#666}.banner{background:#d62728;color:#fff;font-weight:bold;padding:12px 18px;
font-size:18px;position:sticky;top:0;z-index:9;border-radius:0 0 6px 6px}
nav{background:#f7f7f9;border:1px solid #e3e3e8;border-radius:6px;padding:4px 18px}
nav h2{border:0;margin:10px 0 0;font-size:16px}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #ddd;border-radius:4px}
figcaption{color:#555;font-size:13px;margin-top:4px}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f6}td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.v{font-size:13px;padding:2px 8px;border-radius:10px;margin-left:8px;vertical-align:middle}
.v.ok{background:#d9f2dc;color:#17612a}.v.bad{background:#fadbd8;color:#8a1c12}
.v.na{background:#eee;color:#555}.v.mixed{background:#fff1c9;color:#7a5a00}
.rule{color:#555;font-size:13px;margin:0}.missing{color:#8a1c12;font-weight:bold}
.note{color:#7a5a00;font-size:13px}
pre{background:#f6f8fa;padding:10px;border-radius:4px;overflow-x:auto;font-size:12px}
"""

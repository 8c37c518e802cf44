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
from tokenlake.analyze._cards import cards, per_run
from tokenlake.analyze._common import RunInfo, as_lake, resolve_runs
from tokenlake.analyze._maps import maps
from tokenlake.analyze._neighbours import neighbours
from tokenlake.analyze._norms import norms
from tokenlake.analyze._probes import T3, T4, paper_tables
from tokenlake.analyze._roles import DEFAULT_SUBSET, TIE_BREAK, Role, no_subset_note, select_roles
from tokenlake.analyze._size import size
from tokenlake.analyze._verdicts import (
    FAILS,
    HOLDS,
    NA,
    NODATA,
    RANDOM,
    judge,
    probe_use,
    topk_agreement,
)

DISAGREE = "Claim 1 — where attention and norm disagree"
REGISTERS = "Registers — none vs trained vs test-time"
ROLES = "Runs and their role in the verdicts"
CARDS = "Outlier cards"
CARDS_INTRO = (
    "Per run: does the model have artifacts, where, and how bad (`tokenlake cards`; definitions "
    "in sql/views/cards.sql, the `cards` view). Outliers: patch tokens above the 98th percentile of "
    "the threshold run's patch norms (the cards keep the paper's top 2 % whatever --percentile "
    "says). Emergence block: the first block whose median output norm at the final outlier "
    "patches exceeds the threshold, for runs "
    "extracted with --blocks all. Attention–norm agreement: claim 1's pooled top-k agreement. "
    "Low-info areas: claim 3's P(nbr_cos above the run's 90th percentile | outlier), 10 % for a "
    "patch chosen at random. Top register neurons: the best 3 of the run's ranking (`tokenlake "
    "neurons`), or of a run of the same model and weights, as named. Every run is carded; random-"
    "weight runs are flagged and are never evidence.")
CARDS_CAPTION = (
    "Card numbers of every run against its parameter count (log scale): one marker shape and "
    "colour per model family; filled markers are the canonical run of each model (the run the "
    "verdicts read), hollow ones the other runs (other resolutions, subsets, interventions); a red "
    "ring marks random weights. Emergence is drawn as (block + 1) / blocks: 1 = the last block. "
    "Runs without a parameter count, or without the number a panel shows, are listed, not drawn.")
REG_COLS = ["registers", "run", "k", "median", "max", "max_median_ratio", "outliers_own",
            "above_base", "jaccard", "precision", "recall", "base_run", "mean_rel_l2", "max_rel_l2"]
REG_CAPTION = ("Patch-token norms of the same images without registers, with trained registers "
               "(dinov2_*_reg4) and with test-time registers (--test-time-registers RUN:K). "
               "outliers_own: above the run's own 98th percentile (2 % by construction); above_base: "
               "above the no-register run's threshold (comparable across runs); jaccard/precision/"
               "recall: the artifacts job; mean_rel_l2/max_rel_l2: relative L2 change of the patch "
               "tokens against base_run (same model without the extra token; with K = 0 the change "
               "made through attention alone).")


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _selection_text(subset: str, explicit: bool) -> str:
    if explicit:
        return ("Runs chosen with --runs are used as they are: every one of them speaks in the "
                "verdicts (no canonical selection). Random-weight runs still never hold or fail.")
    return (f"Each model speaks through one canonical run: on the canonical subset {subset!r} "
            "(--subset), at the model's native resolution (manifest native_img_size), over every "
            "image (not a keep-if-outlier selection; policy all, summary or sample, which all keep "
            "every token's norm, attention and neighbour cosine), without intervention (no "
            "test-time registers, no --record-mlp, the model's own preprocessing). Tie-break: "
            f"{TIE_BREAK}. Figures and tables show every run; random-weight runs are never "
            "evidence. Probe tables count: Tables 1-2, the canonical run's results; Table 3, "
            "results tested on held-out images (--test-run); Table 4, runs preprocessed with "
            "'dinov2-eval'; the newest result per model and token kind.")


def _role_rows(infos: list[RunInfo], roles: dict[str, Role], tables: list[dict]) -> list[list[str]]:
    """[run, model, weights, role] per run: canonical for which claims, or left out and why."""
    counted: dict[str, list[str]] = {}
    for t in tables:
        for row in (r for r in t["rows"] if r.get("use") == ""):
            if t["key"] == T3:
                counted.setdefault(row["run"], []).append(
                    f"claim 4 (Table 3, tested on {row['result'].test_run})")
            elif t["key"] == T4:
                for run in (r for r in row["runs"] if r):
                    counted.setdefault(run, []).append("claim 5 (Table 4 performance)")
    out = []
    for i in infos:
        role = roles[i.run]
        if role.canonical:
            claims = "1, 2, 3, 4 (Tables 1-2)" + (", 5 (artifacts)" if i.model.startswith("dinov2_")
                                                  else "")
            text = f"canonical for claims {claims}" + (" (given with --runs)" if role.explicit else "")
        else:
            text = f"left out of claims 1-3, 4 (Tables 1-2), 5 (artifacts): {role.why}"
        if i.run in counted:
            text += "; counted in " + ", ".join(dict.fromkeys(counted[i.run]))
        if i.random_weights:
            text += " — random weights: shown, not evidence"
        out.append([i.run, i.model, "RANDOM" if i.random_weights else str(i.weights or "—"), text])
    return out


def _use_text(use: str | None, random: bool) -> str:
    if use is None:
        return "—"
    if use:
        return f"no: {use}"
    return "yes (random weights: not evidence)" if random else "yes"


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
    "blocks": "Per image, four rows: the norm of each block's output, then the norms of the "
              "block's queries, keys and values (all heads), for selected blocks (appendix A).",
}


def report(lake: Any, *, out: str | Path | None = None, runs: list[str] | str | None = None,
           percentile: float = 0.98, subset: str = DEFAULT_SUBSET) -> dict[str, Any]:
    """Run every analysis job into OUT/ and write OUT/report.html (self-contained) and
    OUT/report.md. Figures show every run (or `runs`); verdicts read one canonical run per model
    on `subset` (analyze/_roles.py), or exactly `runs` when given. Returns paths, verdicts, each
    run's role and what is missing."""
    lk = as_lake(lake)
    explicit = bool([r for r in runs.split(",") if r.strip()] if isinstance(runs, str) else runs)
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
    roles = select_roles(infos, subset=subset, explicit=explicit)
    canon = [r for r, role in roles.items() if role.canonical]
    try:  # the outlier cards (analyze/_cards.py): every run, canonical ones filled in the figure
        results["cards"] = cards(lk, runs=[i.run for i in infos], out=figdir, canonical=set(canon))
    except Exception as err:  # noqa: BLE001 — reported as missing, like the jobs
        results["cards"] = None
        missing.append(f"cards: {type(err).__name__}: {err}")
        traceback.print_exc()
    topk: dict | None = {}
    if canon:
        try:
            topk = topk_agreement(lk, runs=canon, percentile=percentile, out=figdir)
        except Exception as err:  # noqa: BLE001 — claim 1 then says why it has no data
            topk = None
            missing.append(f"claim 1 top-k agreement: {type(err).__name__}: {err}")
            traceback.print_exc()
    tables = paper_tables(lk, infos=imap, use=probe_use(roles=roles, infos=imap))
    for t in tables:
        if t["missing"]:
            missing.append(f"{t['title']}: {t['missing']}")
    note = None if explicit else no_subset_note(infos, subset=subset)
    claims = judge(results=results, topk=topk, tables=tables, roles=roles, infos=imap,
                   subset_note=note)
    cmd = (f"tokenlake report --lake {lk.path} --out {out}"
           + (f" --subset {subset}" if subset != DEFAULT_SUBSET else "")
           + (f" --runs {','.join(i.run for i in infos)}" if explicit else "")
           + (f" --percentile {percentile}" if percentile != 0.98 else ""))
    doc = _Doc(lk, infos, results, tables, claims, missing, out, percentile, command=cmd,
               roles=_role_rows(infos, roles, tables), selection=_selection_text(subset, explicit))
    (out / "report.html").write_text(doc.html(), encoding="utf-8")
    (out / "report.md").write_text(doc.md(), encoding="utf-8")
    return {"html": str(out / "report.html"), "md": str(out / "report.md"),
            "claims": {k: v["verdict"] for k, v in claims.items()}, "verdicts": claims,
            "roles": {r: role for r, role in roles.items()}, "missing": missing,
            "results": results, "tables": tables}


class _Doc:
    """Builds the report twice from the same sections: HTML (base64 figures) and Markdown."""

    def __init__(self, lk, infos, results, tables, claims, missing, out: Path, percentile, *,
                 roles: list[list[str]], selection: str, command: str):
        self.lk, self.infos, self.results, self.tables = lk, infos, results, tables
        self.claims, self.missing, self.out, self.percentile = claims, missing, out, percentile
        self.roles, self.selection, self.command = roles, selection, command
        self.random = {i.run for i in infos if i.random_weights}

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

    def _paper_rows(self, t: dict) -> list[list[str]]:
        """[head, *rows] of a paper table: ours / paper / Δ per column, the result's settings
        (tokens, test run) and whether the verdicts count it."""
        head = (["run", "paper row", *t["extra_columns"]]
                + [f"{c} (ours / paper / Δ)" for c in t["columns"]] + ["in the verdict"])
        rows = [[r["run"], r["paper_row"], *r["extra"]]
                + [f"{_fmt(o)} / {_fmt(p)} / {_fmt(d)}" for o, p, d in
                   zip(r["ours"], r["paper"], r["diff"])]
                + [_use_text(r["use"], any(x in self.random for x in r["run"].split(",")))]
                for r in t["rows"]]
        return [head, *rows]

    def _commands(self) -> list[str]:
        cmds = [r["command"] for r in self.results.values() if r and "command" in r]
        return [*cmds, self.command]

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
        v = [f'<p class="rule">{e(self.selection)} Every run\'s role: <a href="#roles">{e(ROLES)}</a>.</p>']
        for claim, c in self.claims.items():
            cls = {HOLDS: "ok", FAILS: "bad", NODATA: "na", NA: "na", RANDOM: "rnd"}.get(
                c["verdict"], "mixed")
            rows = [[k, p["verdict"], p["numbers"]] for k, p in c["runs"].items()]
            v.append(f'<h3>{e(claim)} <span class="v {cls}">{e(c["verdict"])}</span></h3>'
                     f'<p class="rule">Rule: {e(c["rule"])}</p>'
                     + (f'<p class="note">{e(c["note"])}</p>' if c.get("note") else "")
                     + (table(["run / family", "verdict", "numbers"], rows, "text") if rows else ""))
        section("verdicts", "Verdicts on the paper's claims", "".join(v))
        section("roles", ROLES, f'<p class="rule">{e(self.selection)}</p>'
                + table(["run", "model", "weights", "role in the verdicts"], self.roles, "text"))
        crd = self.results.get("cards")
        if crd:
            head, rows = per_run(crd["cards"])
            data = base64.b64encode(Path(crd["figure"]).read_bytes()).decode()
            section("cards", CARDS, f'<p class="rule">{e(CARDS_INTRO)}</p>'
                    + f'<div class="wide">{table(head, rows, "text")}</div>'
                    + f'<figure><img src="data:image/png;base64,{data}" alt="{e(CARDS)}">'
                    f'<figcaption>{e(CARDS_CAPTION)} Data: <code>cards.parquet</code>, '
                    f'<code>cards.csv</code> in <code>{e(str(Path(crd["figure"]).parent))}</code>.'
                    '</figcaption></figure>')
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
                head, *rows = self._paper_rows(t)
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
        L += [f"Lake `{self.lk.path}` · {len(self.infos)} runs", "", "## Verdicts on the paper's claims", "",
              self.selection + f" Every run's role: {ROLES}, below.", ""]
        for claim, c in self.claims.items():
            L += [f"### {claim}: **{c['verdict']}**", "", f"Rule: {c['rule']}", ""]
            if c.get("note"):
                L += [c["note"], ""]
            if c["runs"]:
                L += [table([["run / family", "verdict", "numbers"]] +
                            [[k, p["verdict"], p["numbers"]] for k, p in c["runs"].items()]), ""]
        L += [f"## {ROLES}", "", self.selection, "",
              table([["run", "model", "weights", "role in the verdicts"], *self.roles]), ""]
        crd = self.results.get("cards")
        if crd:
            head, rows = per_run(crd["cards"])
            fig = Path(crd["figure"])
            rel = fig.relative_to(self.out) if fig.is_relative_to(self.out) else fig
            L += [f"## {CARDS}", "", CARDS_INTRO, "", table([head, *rows]), "",
                  f"![{CARDS}]({rel.as_posix()})", "", CARDS_CAPTION, ""]
        for k, (key, title, path, cap) in enumerate(self._figures()):
            rel = Path(path).relative_to(self.out) if Path(path).is_relative_to(self.out) else Path(path)
            L += [f"## {title}", "", f"![{title}]({rel.as_posix()})", "", f"*Figure {k + 1}.* {cap}", ""]
            rows = self._job_rows(key)
            if rows and title != DISAGREE:
                L += [table(rows), ""]
        for t in self.tables:
            L += [f"## {t['title']}", ""]
            if t["rows"]:
                L += [table(self._paper_rows(t)), ""]
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
table.text td,table.text th{text-align:left}
th{background:#f3f3f6}td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.v{font-size:13px;padding:2px 8px;border-radius:10px;margin-left:8px;vertical-align:middle}
.v.ok{background:#d9f2dc;color:#17612a}.v.bad{background:#fadbd8;color:#8a1c12}
.v.na{background:#eee;color:#555}.v.mixed{background:#fff1c9;color:#7a5a00}
.v.rnd{background:#d62728;color:#fff}
.rule{color:#555;font-size:13px;margin:0}.missing{color:#8a1c12;font-weight:bold}
.note{color:#7a5a00;font-size:13px}
.wide{overflow-x:auto}
pre{background:#f6f8fa;padding:10px;border-radius:4px;overflow-x:auto;font-size:12px}
"""

"""`tokenlake report`: every figure and table, the paper's tables, verdicts and provenance.

The report is written once, in Markdown (report.md, figures linked as files under OUT/analysis),
and report.html is that Markdown rendered by Python-Markdown (tables, fenced code, heading ids),
then dressed by one tree pass (`_dress`): figures embedded as base64 PNG (a self-contained file),
the sticky RANDOM WEIGHTS banner, a table of contents of the sections, verdict badges, and CSS.

Missing data and bugs are told apart: a part whose computation raises tokenlake's own "cannot
compute" error (`tokenlake.store.LakeError`: no such run, nothing to compute from, ...) or whose
job reports what it lacks (no blocks table, no probe results, ...) is listed under "Missing
pieces"; any other exception is a bug: the rest of the report is still written, the traceback is
shown under "Errors", and `report()` returns it in `errors` (`tokenlake report` then exits 1).
"""

from __future__ import annotations

import base64
import math
import re
import sys
import traceback
import xml.etree.ElementTree as etree
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

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
from tokenlake.store import LakeError

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


class _Parts:
    """Runs each part of the report and sorts what goes wrong: missing data or a bug."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.errors: list[dict[str, str]] = []

    def attempt(self, part: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except LakeError as err:  # tokenlake's "cannot compute": the data is not there
            self.missing.append(f"{part}: {type(err).__name__}: {err}")
            return default
        except Exception as err:  # noqa: BLE001 — anything else is a bug: shown, never hidden
            tb = traceback.format_exc()
            self.errors.append({"part": part, "error": f"{type(err).__name__}: {err}",
                                "traceback": tb})
            print(f"tokenlake report: {part} failed with a bug (listed under Errors):\n{tb}",
                  file=sys.stderr)
            return default


def report(lake: Any, *, out: str | Path | None = None, runs: list[str] | str | None = None,
           percentile: float = 0.98, subset: str = DEFAULT_SUBSET) -> dict[str, Any]:
    """Run every analysis job into OUT/ and write OUT/report.md and OUT/report.html (the same
    document rendered, self-contained). Figures show every run (or `runs`); verdicts read one
    canonical run per model on `subset` (analyze/_roles.py), or exactly `runs` when given.

    Returns paths, verdicts, each run's role, `missing` (what the lake lacks, one line each) and
    `errors` (parts that raised anything other than a LakeError: bugs, with their tracebacks;
    the report is written without them and says so)."""
    if not 0 < percentile < 1:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    lk = as_lake(lake)
    explicit = bool([r for r in runs.split(",") if r.strip()] if isinstance(runs, str) else runs)
    infos = resolve_runs(lk, runs)
    out = Path(out) if out is not None else lk.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    figdir = out / "analysis"
    names = [i.run for i in infos]
    parts = _Parts()
    results: dict[str, Any] = {}
    for key, _title, fn in JOBS:
        results[key] = parts.attempt(key, lambda fn=fn: fn(lk, runs=names, out=figdir,
                                                           percentile=percentile))

    def _registers():  # no / trained / test-time registers (analyze/_neurons.py)
        from tokenlake.analyze._neurons import registers

        art = results.get("artifacts")
        return registers(lk, runs=names, out=figdir, artifact_rows=art["runs"] if art else {})

    results["registers"] = parts.attempt("registers", _registers)
    if results["registers"]:
        parts.missing += [f"registers: {m}" for m in results["registers"]["missing"]]
    imap = {i.run: i for i in infos}
    if results.get("blocks"):
        for run, why in results["blocks"]["missing"].items():
            parts.missing.append(f"blocks for run {run}: {why}")
    roles = select_roles(infos, subset=subset, explicit=explicit)
    canon = [r for r, role in roles.items() if role.canonical]
    # the outlier cards (analyze/_cards.py): every run, canonical ones filled in the figure
    results["cards"] = parts.attempt("cards", lambda: cards(lk, runs=names, out=figdir,
                                                             canonical=set(canon)))
    topk: dict | None = {}
    if canon:  # None: claim 1 then says why it has no data
        topk = parts.attempt("claim 1 top-k agreement", lambda: topk_agreement(
            lk, runs=canon, percentile=percentile, out=figdir))
    tables = parts.attempt("paper tables", lambda: paper_tables(
        lk, infos=imap, use=probe_use(roles=roles, infos=imap)), default=[])
    for t in tables:
        if t["missing"]:
            parts.missing.append(f"{t['title']}: {t['missing']}")
    note = None if explicit else no_subset_note(infos, subset=subset)
    claims = parts.attempt("verdicts", lambda: judge(
        results=results, topk=topk, tables=tables, roles=roles, infos=imap, subset_note=note),
        default={})
    cmd = (f"tokenlake report --lake {lk.path} --out {out}"
           + (f" --subset {subset}" if subset != DEFAULT_SUBSET else "")
           + (f" --runs {','.join(names)}" if explicit else "")
           + (f" --percentile {percentile}" if percentile != 0.98 else ""))
    doc = _Doc(lk, infos, results, tables, claims, parts, out, percentile, command=cmd,
               roles=_role_rows(infos, roles, tables), selection=_selection_text(subset, explicit))
    text = doc.markdown()
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.html").write_text(render_html(text, base=out), encoding="utf-8")
    return {"html": str(out / "report.html"), "md": str(out / "report.md"),
            "claims": {k: v["verdict"] for k, v in claims.items()}, "verdicts": claims,
            "roles": {r: role for r, role in roles.items()}, "missing": parts.missing,
            "errors": parts.errors, "results": results, "tables": tables}


# -- Markdown: the one source ---------------------------------------------------------------------
_CODE_SPAN = re.compile(r"(`[^`\n]+`)")
_MD_CHARS = re.compile(r"([\\*#])")
_LINK = re.compile(r"\](?=[(\[:])")  # [text](url), [text][ref], [ref]: url; a lone [x] is text
_EMPH_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # intraword _ is plain text
_HTML_START = re.compile(r"<(?=[A-Za-z/!?$])")
_ENTITY = re.compile(r"&(?=#?\w+;)")
_BLOCK_START = re.compile(r"^(\s*)([>+=-]|\d+[.)])")
_NUMERIC = re.compile(r"^(—|[−+-]?[\d,]*\.?\d+(e[+-]?\d+)?( ?%)?)( / (—|[−+-]?[\d,]*\.?\d+(e[+-]?\d+)?))*$")


def _md(text: Any, *, block: bool = False, cell: bool = False) -> str:
    """Text (run names, numbers, messages, tokenlake's own sentences) as Markdown that renders as
    itself; `code spans` are kept as code. One line; block=True also escapes a leading list,
    quote or heading marker (text that starts a paragraph or list item), cell=True the pipes
    (text in a table cell)."""
    parts = _CODE_SPAN.split(" ".join(str(text).split()))
    for k in range(0, len(parts), 2):
        p = _LINK.sub(r"\\]", _MD_CHARS.sub(r"\\\1", parts[k]))
        p = p.replace("|", "\\|") if cell else p
        p = _EMPH_UNDERSCORE.sub(r"\\_", p)
        parts[k] = _HTML_START.sub("&lt;", _ENTITY.sub("&amp;", p))
    s = "".join(parts)
    return _BLOCK_START.sub(r"\1\\\2", s) if block else s


def _code(text: Any) -> str:
    """`text` as one inline code span."""
    s = " ".join(str(text).split())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _fence(text: str, info: str = "") -> list[str]:
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return [fence + info, *text.rstrip("\n").split("\n"), fence]


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; a column whose every cell is a number (or n / n / n, or —) is
    right-aligned, any other left-aligned."""
    cells = [[_md(c, cell=True) for c in r] for r in rows]
    align = []
    for j in range(len(head)):
        col = [str(r[j]).strip() for r in rows if str(r[j]).strip()]
        numeric = bool(col) and all(_NUMERIC.match(c) for c in col) and any(c != "—" for c in col)
        align.append("---:" if numeric else ":---")
    lines = ["| " + " | ".join(_md(h, cell=True) for h in head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def _link(path: Path, base: Path) -> str:
    """A figure's Markdown link target: relative to the report's folder where it lies inside."""
    p = path.relative_to(base) if path.is_relative_to(base) else path
    return quote(p.as_posix())


def _anchor(title: str) -> str:
    """The id Python-Markdown's toc extension (and GitHub) give the heading `title`."""
    from markdown.extensions.toc import slugify

    return slugify(title, "-")


class _Doc:
    """The report as one Markdown document, built from the results."""

    def __init__(self, lk, infos, results, tables, claims, parts: _Parts, out: Path, percentile,
                 *, roles: list[list[str]], selection: str, command: str):
        self.lk, self.infos, self.results, self.tables = lk, infos, results, tables
        self.claims, self.out, self.percentile = claims, out, percentile
        self.missing, self.errors = parts.missing, parts.errors
        self.roles, self.selection, self.command = roles, selection, command
        self.random = {i.run for i in infos if i.random_weights}
        self.n_fig = 0

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

    def _figure(self, title: str, path: str | Path, caption: str, data: dict | None = None
                ) -> list[str]:
        """An image and its caption paragraph (*Figure n.* ...), which the HTML turns into a
        <figure> with a <figcaption>; `data`: the table files beside it."""
        self.n_fig += 1
        links = ""
        if data:
            links = (f" Data: {_code(Path(data['parquet']).name)}, {_code(Path(data['csv']).name)}"
                     f" in {_code(Path(data['csv']).parent)}.")
        return [f"![{_md(title)}]({_link(Path(path), self.out)})", "",
                f"*Figure {self.n_fig}.* {_md(caption)}{links}", ""]

    # -- the document ----------------------------------------------------------------------------
    def markdown(self) -> str:
        L: list[str] = []
        rnd = [i.run for i in self.infos if i.random_weights]
        if rnd:  # first, so that the HTML's banner stays on top of the page
            L += [(f"> **RANDOM WEIGHTS: {_md(', '.join(rnd))}** — these runs describe "
                   "untrained networks; their numbers say nothing about the paper's models."), ""]
        L += ["# tokenlake report", "",
              (f"Lake {_code(self.lk.path)} · {len(self.infos)} runs · reproducing *Do All "
               "Vision Transformers Need Registers?*"), ""]
        if self.errors:
            L += ["## Errors", "",
                  (f"{len(self.errors)} part(s) of the report failed with an unexpected "
                   "exception: a bug in tokenlake, not missing data. Everything else below "
                   "stands; what depends on these parts is marked as having no data. `tokenlake "
                   "report` exits with status 1. The tracebacks:"), ""]
            for e in self.errors:
                L += [f"### {_md(e['part'])}: {_md(e['error'])}", "", *_fence(e["traceback"], "text"),
                      ""]
        L += ["## Verdicts on the paper's claims", "",
              f"{_md(self.selection)} Every run's role: [{ROLES}](#{_anchor(ROLES)}).", ""]
        for claim, c in self.claims.items():
            L += [f"### {_md(claim)}: **{_md(c['verdict'])}**", "", f"Rule: {_md(c['rule'])}", ""]
            if c.get("note"):
                L += [f"Note: {_md(c['note'])}", ""]
            if c["runs"]:
                L += [_table(["run / family", "verdict", "numbers"],
                             [[k, p["verdict"], p["numbers"]] for k, p in c["runs"].items()]), ""]
        if not self.claims:
            L += ["No verdict: the verdicts failed (Errors, above).", ""]
        L += [f"## {ROLES}", "", _md(self.selection, block=True), "",
              _table(["run", "model", "weights", "role in the verdicts"], self.roles), ""]
        crd = self.results.get("cards")
        if crd:
            head, rows = per_run(crd["cards"])
            L += [f"## {CARDS}", "", _md(CARDS_INTRO, block=True), "", _table(head, rows), "",
                  *self._figure(CARDS, crd["figure"], CARDS_CAPTION, data={
                      "parquet": Path(crd["figure"]).with_name("cards.parquet"),
                      "csv": Path(crd["figure"]).with_name("cards.csv")})]
        for key, title, path, cap in self._figures():
            r = self.results[key]
            L += [f"## {_md(title)}", "",
                  *self._figure(title, path, cap, data=r.get("table") if title != DISAGREE else None)]
            rows = self._job_rows(key)
            if rows and title != DISAGREE:
                L += [_table(rows[0], rows[1:]), ""]
        for t in self.tables:
            L += [f"## {_md(t['title'])}", ""]
            if t["rows"]:
                head, *rows = self._paper_rows(t)
                L += [_table(head, rows), ""]
            else:
                L += [_md(t["missing"], block=True), ""]
        reg = self.results.get("registers")
        if reg and (reg["rows"] or reg["missing"]):
            L += [f"## {REGISTERS}", ""]
            if reg["figure"]:
                L += self._figure(REGISTERS, reg["figure"], REG_CAPTION, data=reg.get("table"))
            for g in dict.fromkeys(r["group"] for r in reg["rows"]):
                L += [f"### {_md(g)}", "", _table(REG_COLS, [[_fmt(r[c]) for c in REG_COLS]
                                                            for r in reg["rows"] if r["group"] == g]), ""]
            if reg["missing"]:
                L += ["Missing runs:", ""] + [f"- {_md(m)}" for m in reg["missing"]] + [""]
        L += ["## Provenance", "",
              _table(["run", "model", "timm name", "weights", "params", "px", "subset", "policy",
                      "images", "tokens", "versions"], self._provenance()), "",
              "Commands that rebuild each part:", "", *_fence("\n".join(self._commands())), "",
              (f"Outlier threshold: the {self.percentile * 100:g}th percentile of the "
               "patch-token norms of each run's threshold run (manifest `outlier_ref`, else the "
               "run)."), "",
              "## Missing pieces", ""]
        L += [f"- {_md(m)}" for m in self.missing] or ["Nothing missing."]
        return "\n".join(L) + "\n"


# -- HTML: the Markdown rendered --------------------------------------------------------------------
BADGES = {HOLDS: "ok", FAILS: "bad", NODATA: "na", NA: "na", RANDOM: "rnd"}
# paragraphs styled by how they start (the Markdown says "Rule: ..." in words)
PARAGRAPH_CLASSES = (("Rule:", "rule"), ("Note:", "note"), ("missing:", "missing"),
                     ("Missing runs:", "missing"))


def render_html(text: str, *, base: Path) -> str:
    """The report's Markdown as one self-contained HTML page: Python-Markdown (tables, fenced
    code, the toc extension's heading ids), then `_dress`. Figures are read from `base` (the
    folder of report.md, which links them)."""
    import markdown
    from markdown.extensions import Extension
    from markdown.extensions.toc import TocExtension
    from markdown.treeprocessors import Treeprocessor

    class Dress(Treeprocessor):
        def run(self, root: etree.Element) -> None:
            _dress(root, base)

    class DressExtension(Extension):
        def extendMarkdown(self, md):
            md.treeprocessors.register(Dress(md), "tokenlake-dress", 4)  # after toc's ids (5)

    body = markdown.markdown(text, output_format="html",
                             extensions=["tables", "fenced_code", TocExtension(), DressExtension()])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>tokenlake report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def _dress(root: etree.Element, base: Path) -> None:
    """The rendered Markdown's tree, made the report page: every image embedded as base64; the
    quote that starts with RANDOM WEIGHTS a sticky banner; the line under the title its subtitle;
    a verdict in bold at the end of a heading a badge; the Errors section red; an image paragraph and its caption
    paragraph (*Figure n.* ...) a <figure>; Rule:/Note:/missing paragraphs styled; tables in a
    scrolling box; a table of contents of the sections before the first."""
    for img in root.iter("img"):
        src = unquote(img.get("src", ""))
        path = Path(src) if Path(src).is_absolute() else base / src
        if not path.is_file():
            raise FileNotFoundError(f"report: figure {src!r} not found at {path}")
        img.set("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
    kids = list(root)
    section = None
    for k, el in enumerate(kids):
        section = el.get("id") if el.tag == "h2" else section
        if el.tag == "h3" and section == "errors":
            el.set("class", "error")
        text = (el.text or "").lstrip()
        first = el[0] if len(el) else None
        nxt = kids[k + 1] if k + 1 < len(kids) else None
        if (el.tag == "blockquote" and first is not None and len(first)
                and first[0].tag == "strong" and (first[0].text or "").startswith("RANDOM WEIGHTS")):
            el.tag, el.attrib = "div", {"class": "banner"}
        elif el.tag == "h1" and nxt is not None and nxt.tag == "p":
            nxt.set("class", "sub")
        elif el.tag in ("h2", "h3") and len(el) and el[-1].tag == "strong" and not (
                el[-1].tail or "").strip():
            v = el[-1].text or ""
            cls = BADGES.get(v, "mixed" if v.startswith("mixed") else None)
            if cls:
                el[-1].tag, el[-1].attrib = "span", {"class": f"v {cls}"}
        elif (el.tag == "p" and not text and len(el) == 1 and first.tag == "img"
              and not (first.tail or "").strip()):
            el.tag = "figure"
            if (nxt is not None and nxt.tag == "p" and not (nxt.text or "").strip() and len(nxt)
                    and nxt[0].tag == "em" and (nxt[0].text or "").startswith("Figure")):
                nxt.tag = "figcaption"
                root.remove(nxt)
                el.append(nxt)
        elif el.tag == "p":
            for prefix, cls in PARAGRAPH_CLASSES:
                if text.startswith(prefix):
                    el.set("class", cls)
        elif el.tag == "table":
            wrap = etree.Element("div", {"class": "wide"})
            root.insert(list(root).index(el), wrap)
            root.remove(el)
            wrap.append(el)
    sections = [el for el in root if el.tag == "h2"]
    if sections:
        nav = etree.Element("nav")
        etree.SubElement(nav, "p", {"class": "toc"}).text = "Contents"
        ol = etree.SubElement(nav, "ol")
        for h in sections:
            a = etree.SubElement(etree.SubElement(ol, "li"), "a", {"href": f"#{h.get('id')}"})
            a.text = "".join(h.itertext())
        root.insert(list(root).index(sections[0]), nav)


CSS = """
body{font:15px/1.5 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:0 auto;
padding:0 24px 60px;color:#222}
h1{margin-top:28px}h2{border-bottom:2px solid #eee;padding-bottom:4px;margin-top:40px}
.sub{color:#666}.banner{background:#d62728;color:#fff;font-weight:bold;padding:12px 18px;
font-size:18px;position:sticky;top:0;z-index:9;border-radius:0 0 6px 6px}
.banner p{margin:0}
nav{background:#f7f7f9;border:1px solid #e3e3e8;border-radius:6px;padding:4px 18px}
nav .toc{font-weight:bold;font-size:16px;margin:10px 0 0}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #ddd;border-radius:4px}
figcaption{color:#555;font-size:13px;margin-top:4px}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f6}
tbody tr:nth-child(even){background:#fafafa}
.v{font-size:13px;padding:2px 8px;border-radius:10px;margin-left:8px;vertical-align:middle}
.v.ok{background:#d9f2dc;color:#17612a}.v.bad{background:#fadbd8;color:#8a1c12}
.v.na{background:#eee;color:#555}.v.mixed{background:#fff1c9;color:#7a5a00}
.v.rnd{background:#d62728;color:#fff}
.rule{color:#555;font-size:13px;margin:0}.missing{color:#8a1c12;font-weight:bold}
.note{color:#7a5a00;font-size:13px}
.wide{overflow-x:auto}
#errors,h3.error{color:#8a1c12}
pre{background:#f6f8fa;padding:10px;border-radius:4px;overflow-x:auto;font-size:12px}
code{background:#f3f3f6;border-radius:3px;padding:0 3px;font-size:90%}pre code{background:none;padding:0}
"""

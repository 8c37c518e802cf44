"""Verdicts on the paper's five claims, from the canonical runs only (analyze/_roles.py).

Every verdict is a rule on numbers the lake holds; the rule is printed beside it in the report.
Random-weight runs are shown in every figure and table but are never evidence: their entries read
"random weights: not evidence", and a claim whose only evidence they are gets that verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenlake.analyze._common import RunInfo, query, save_table
from tokenlake.analyze._probes import T1, T2, T3, T4, ProbeResult
from tokenlake.analyze._roles import Role, exclusions, run_config

HOLDS, FAILS, NODATA = "holds", "does not hold", "not enough data"
RANDOM, NA = "random weights: not evidence", "not applicable"
C1 = "Claim 1 — artifacts are high-norm outlier tokens"
C2 = "Claim 2 — large models (>300M) grow high-norm tokens"
C3 = "Claim 3 — high-norm tokens sit in redundant areas"
C4 = "Claim 4 — high-norm tokens lose local, hold global information"
C5 = "Claim 5 — registers remove artifacts, keep performance"

MIN_OUTLIERS = 3  # fewer outlier tokens in a run: not enough data
CLAIM1_AGREEMENT = 0.5  # share of a run's outliers that are among its images' top-k attention
BIMODAL_BC = 5 / 9  # Sarle's BC of a uniform distribution; above it suggests two modes
# ...or a high-norm group apart from the bulk: >= 1 % of patch tokens (half the top 2 %) beyond 6
# robust sigma of ln(norm) (norm_summary.sql separated_share). BC alone needs a 2 % group ~10 sigma
# away; heavy unimodal tails put well under 1 % there (tests/test_analyze_sql.py).
SEPARATED_SHARE = 0.01
CLAIM3_RATIO = 1.5  # P(low-info | outlier) / P(low-info | normal)
# Claim 5: "does not degrade performance" within 0.5 top-1 points. The paper's own differences are
# +0.38 to +0.68 points; 0.5 points is ~3 binomial standard errors of a top-1 near 85 % on the
# 50,000 validation images (sqrt(0.85 * 0.15 / 50000) = 0.16 points), so a smaller drop is noise.
PERF_TOLERANCE = 0.5


def entry(verdict: str, numbers: str) -> dict[str, str]:
    return {"verdict": verdict, "numbers": numbers}


def overall(per: dict[str, dict]) -> str:
    """holds / does not hold / mixed over the pretrained evidence; random weights only when they
    are all there is; not applicable when every entry is; else not enough data."""
    vs = [p["verdict"] for p in per.values()]
    ev = [v for v in vs if v in (HOLDS, FAILS)]
    if ev:
        if all(v == HOLDS for v in ev):
            return HOLDS
        if all(v == FAILS for v in ev):
            return FAILS
        return f"mixed: holds for {ev.count(HOLDS)} of {len(ev)}"
    if RANDOM in vs:
        return RANDOM
    if vs and all(v == NA for v in vs):
        return NA
    return NODATA


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _claim(rule: str, per: dict, note: str | None = None) -> dict[str, Any]:
    out = {"rule": rule, "runs": per, "verdict": overall(per)}
    if note:
        out["note"] = note
    return out


# -- claim 1 -----------------------------------------------------------------------------------
# Paper, claim 1: "Tokens with exceptionally high L2 norm (top 2%) correspond to artifacts in
# attention and feature maps." Section 4.1: "We observe cases where artifacts appear in attention
# maps without corresponding to high-norm tokens in feature maps". Appendix C / Fig. 7: "besides
# PVT-b0 all norm distributions are bimodal which is a sign of underlying artifacts".
CLAIM1_RULE = (
    f"per run, N = an image's norm outliers (patch norm above the run's outlier threshold: the "
    f"--percentile quantile, default the 98th, of its threshold run's patch norms, as in the "
    f"`outliers` view), k = |N|, A_k = its k most-attended patches (ties: lower token first); agreement = Σ|A_k ∩ N| / Σ|N| over "
    f"images with ≥ 1 outlier; holds if agreement ≥ {CLAIM1_AGREEMENT}. Not applicable when the run "
    f"has no outlier population: the bimodality coefficient of ln(patch norm) is ≤ 5/9 (the paper "
    f"reads bimodal norm distributions as the sign of artifacts, appendix C / Fig. 7) and fewer "
    f"than {SEPARATED_SHARE:.0%} of its patch tokens lie more than 6 robust standard deviations "
    f"above the median ln(norm) (a high-norm group too small to move BC). Jaccard of the "
    f"fixed top-2 % attention and norm patches is shown as a secondary number. Per image: "
    f"analysis/claim1_topk.csv"
)


def topk_agreement(lk, *, runs: list[str], percentile: float, out: Path) -> dict[str, dict]:
    """run -> {agreement, n_hit, k, n_attn, n_images}: claim 1's primary number, pooled over the
    images with >= 1 outlier (sql/queries/attn_topk_agreement.sql); per image in claim1_topk.*."""
    per = query(lk, "attn_topk_agreement", [runs, float(percentile)])
    save_table(per, out, "claim1_topk", meta={
        "description": "Claim 1 per image: k = the image's norm outliers, n_hit = how many of them "
                       "are among its k most-attended patches (ties: lower token first). "
                       + CLAIM1_RULE, "percentile": percentile})
    agg: dict[str, dict] = {}
    for r in per.to_pylist():
        a = agg.setdefault(r["run"], {"n_hit": 0, "k": 0, "n_attn": 0, "n_images": 0})
        a["n_hit"] += r["n_hit"]
        a["k"] += r["k"]
        a["n_attn"] += r["n_attn"]
        a["n_images"] += 1
    for a in agg.values():
        a["agreement"] = a["n_hit"] / a["k"]
    return agg


def claim1(*, runs: list[str], infos: dict[str, RunInfo], topk: dict | None, norms: dict | None,
           artifacts: dict | None) -> dict[str, Any]:
    per = {}
    for run in runs:
        t, s = (topk or {}).get(run), (norms or {}).get(run)
        a = (artifacts or {}).get(run) or {}
        bc = s.get("bc_log") if s else None
        sep = s.get("separated_share") if s else None
        parts = [f"top-k agreement {_fmt(t['agreement'])} ({t['n_hit']} of {t['k']} outliers "
                 f"over {t['n_images']} images)" if t else "no image with an outlier",
                 f"BC(ln norm) {_fmt(bc)}, separated share {_fmt(sep)}",
                 f"secondary: Jaccard(top-2 % attention, top-2 % norm) {_fmt(a.get('jaccard'))}"]
        if infos[run].random_weights:
            v = RANDOM
        elif topk is None or norms is None:
            v, parts = NODATA, parts + ["the norms job or the top-k query failed (see Errors or Missing pieces)"]
        elif bc is None or sep is None:
            v = NODATA
        elif bc <= BIMODAL_BC and sep < SEPARATED_SHARE:
            why = f"no outlier population (BC ≤ 5/9, separated share < {SEPARATED_SHARE:.0%})"
            v, parts = NA, [*parts, why]
        elif t is None or t["k"] < MIN_OUTLIERS or t["n_attn"] == 0:
            v = NODATA
        else:
            v = HOLDS if t["agreement"] >= CLAIM1_AGREEMENT else FAILS
        per[run] = entry(v, "; ".join(parts))
    return _claim(CLAIM1_RULE, per)


# -- claim 2 -----------------------------------------------------------------------------------
# Paper, claim 2: "As model size increases, high-norm tokens become more prominent". Compared within
# one family at one resolution on one subset: the same model at 800 px has other norms.
CLAIM2_RULE = (
    "per (family, resolution, subset) group of canonical pretrained runs with a parameter count and "
    "≥ 2 sizes: holds if the max/median patch-norm ratio rises with size (Spearman rho > 0); the "
    "claim holds overall if it holds in every such group"
)


def claim2(*, runs: list[str], infos: dict[str, RunInfo], size_rows: list[dict] | None) -> dict:
    if size_rows is None:
        return _claim(CLAIM2_RULE, {}, "the size job failed (see Errors or Missing pieces)")
    rows = [r for r in size_rows if r["run"] in runs]
    groups: dict[tuple, list] = {}
    per, no_params = {}, []
    for r in rows:
        i = infos[r["run"]]
        if i.random_weights:
            per[f"{r['run']} ({i.model})"] = entry(RANDOM, f"max/median {_fmt(r['max_median_ratio'])}")
        elif not r["params"]:
            no_params.append(r["run"])
        elif r["max_median_ratio"] is not None:
            groups.setdefault((i.family, i.img_size, i.subset), []).append(
                (r["params"], r["max_median_ratio"], i.model))
    from scipy.stats import spearmanr

    for (fam, px, subset), pts in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        key = f"{fam} @{px} px, {subset}"
        if len({p[0] for p in pts}) < 2:
            per[key] = entry(NODATA, f"one size only ({pts[0][2]})")
            continue
        rho = float(spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic)
        per[key] = entry(HOLDS if rho > 0 else FAILS, f"rho {rho:.2f} over " + ", ".join(
            f"{m} ({p / 1e6:.0f}M): {v:.2f}" for p, v, m in sorted(pts)))
    small = [r["model"] for r in rows if r["params"] and r["params"] < 300e6
             and not infos[r["run"]].random_weights and (r["bc_log"] or 0) > BIMODAL_BC]
    notes = []
    if small:
        notes.append("bimodal norm distributions (BC(log) > 5/9) also in models under 300M "
                     "parameters: " + ", ".join(small))
    if no_params:
        notes.append("no parameter count ('params' in the manifest): " + ", ".join(no_params))
    return _claim(CLAIM2_RULE, per, "; ".join(notes) or None)


# -- claim 3 -----------------------------------------------------------------------------------
# Paper, Section 4.1: "Artifact patches are approximately 2.5 times more likely than normal patches
# to reside in low-information areas".
CLAIM3_RULE = (f"holds for a run if P(low-info|outlier)/P(low-info|normal) > {CLAIM3_RATIO} and the "
               "outliers' median nbr_cos exceeds the normal patches'")


def claim3(*, runs: list[str], infos: dict[str, RunInfo], neighbours: dict | None) -> dict:
    if neighbours is None:
        return _claim(CLAIM3_RULE, {}, "the neighbours job failed (see Errors or Missing pieces)")
    per = {}
    for run in runs:
        r = neighbours.get(run)
        if r is None:
            per[run] = entry(NODATA, "no neighbour statistics")
            continue
        numbers = (f"ratio {_fmt(r['ratio'])}, median nbr_cos outlier "
                   f"{_fmt(r['median_cos_outlier'])} vs normal {_fmt(r['median_cos_normal'])} "
                   f"({r['n_outlier']} outliers)")
        if infos[run].random_weights:
            v = RANDOM
        elif (r["n_outlier"] or 0) < MIN_OUTLIERS or r["ratio"] is None:
            v = NODATA
        else:
            ok = r["ratio"] > CLAIM3_RATIO and (r["median_cos_outlier"] or -9) > (
                r["median_cos_normal"] or 9)
            v = HOLDS if ok else FAILS
        per[run] = entry(v, numbers)
    return _claim(CLAIM3_RULE, per)


# -- claim 4 (probes) --------------------------------------------------------------------------
# Paper, Section 4.1: "normal tokens exhibit superior performance to outlier tokens in both pixel
# reconstruction and position prediction tasks in terms of L2 error and Top-1 accuracy
# respectively"; "if high-norm outliers encode global information, their classification accuracy
# should surpass that of normal patches."
CLAIM4_RULE = (
    "per counted probe result: holds if outlier tokens are worse than normal tokens at position "
    "(top-1, Table 1) and reconstruction (L2, Table 2), and better at classification (top-1, "
    "Table 3). Tables 1-2 count the results of each model's canonical run; Table 3 only results "
    "tested on held-out images (--test-run); the newest result per model and token kind"
)


def probe_use(*, roles: dict[str, Role], infos: dict[str, RunInfo]):
    """(table key, result) -> "" when the verdicts count the result, else why not.

    Tables 1-2: the model's canonical run. Table 3: tested on another run's images (--test-run);
    the training and test runs may be keep-if-outlier selections on any subset (the paper trains
    on 200k training images with an outlier) but otherwise canonical. Table 4: runs preprocessed
    with 'dinov2-eval', whose resolution is the recipe's 224 px, without intervention or
    selection. Runs given with --runs are used as they are."""
    explicit = any(r.explicit for r in roles.values())

    def not_canonical(run: str, *, keep: tuple[str, ...]) -> str:
        if explicit:
            return ""
        if run not in infos:
            return f"run {run!r} is not a complete run of the lake"
        why = exclusions(infos[run], subset=None)
        return "; ".join(v for k, v in why.items() if k in keep)

    def use(key: str, r: ProbeResult) -> str:
        if r.config is None:
            return "result.json has no config (written by an older tokenlake); rerun the probe"
        if key in (T1, T2):
            role = roles[r.run]
            return "" if role.canonical else f"not the model's canonical run: {role.why}"
        if key == T3:
            if not r.test_run or r.test_run == r.run:
                return "tested on the training run's own images"
            for what, run in (("training", r.run), ("test", r.test_run)):
                why = not_canonical(run, keep=("native", "policy", "intervention", "preprocess"))
                if why:
                    return f"{what} run {run} is not canonical for Table 3: {why}"
            return ""
        if key == T4:
            pre = run_config(infos[r.run]).get("preprocess", "model")
            if pre != "dinov2-eval":
                return (f"run preprocessed with {pre!r}, not 'dinov2-eval' (the official DINOv2 "
                        "evaluation recipe the pretrained heads expect)")
            why = not_canonical(r.run, keep=("selection", "intervention"))
            return f"not canonical for Table 4: {why}" if why else ""
        return ""

    return use


def claim4(*, tables: list[dict], infos: dict[str, RunInfo], note: str | None) -> dict:
    per = {}
    for t in (t for t in tables if t["key"] in (T1, T2, T3)):
        for row in (r for r in t["rows"] if r["use"] == ""):
            ours, r = dict(zip(t["columns"], row["ours"])), row["result"]
            if t["key"] == T1 and None not in (ours["top1_normal"], ours["top1_outlier"]):
                key, ok = "position", ours["top1_outlier"] < ours["top1_normal"]
                numbers = f"top-1 normal {_fmt(ours['top1_normal'])} vs outlier {_fmt(ours['top1_outlier'])}"
            elif t["key"] == T2 and None not in (ours["l2_normal"], ours["l2_outlier"]):
                key, ok = "reconstruction", ours["l2_outlier"] > ours["l2_normal"]
                numbers = f"L2 normal {_fmt(ours['l2_normal'])} vs outlier {_fmt(ours['l2_outlier'])}"
            elif t["key"] == T3 and None not in (ours["normal"], ours["outlier"]):
                key, ok = f"global info, tested on {r.test_run}", ours["outlier"] > ours["normal"]
                numbers = f"top-1 normal {_fmt(ours['normal'])} vs outlier {_fmt(ours['outlier'])}"
            else:
                continue
            rnd = any(infos[x].random_weights for x in (r.run, r.test_run) if x in infos)
            per[f"{r.run} ({key}, {r.tokens} tokens)"] = entry(
                RANDOM if rnd else HOLDS if ok else FAILS, numbers)
    if not per:
        none = "no counted Table 1-3 result (see the tables' 'in the verdict' column)"
        note = "; ".join(x for x in (note, none) if x)
    return _claim(CLAIM4_RULE, per, note)


# -- claim 5 -----------------------------------------------------------------------------------
# Paper, claim 5: "This prevents artifacts from appearing in feature maps" and "the addition of
# registers does not degrade performance and occasionally improves it"; Section 4.1: "models with
# registers consistently perform marginally better".
CLAIM5_RULE = (
    f"artifact part: the canonical dinov2_X_reg4 run's max/median patch-norm ratio is below the "
    f"canonical dinov2_X run's (same resolution and subset); performance part (Table 4, "
    f"dinov2-eval runs): with − without registers ≥ −{PERF_TOLERANCE} top-1 points (a drop within "
    f"the tolerance is 'does not degrade')"
)


def claim5(*, runs: list[str], infos: dict[str, RunInfo], norms: dict | None,
           tables: list[dict], note: str | None) -> dict:
    per = {}
    by = [infos[r] for r in runs]
    for reg in (i for i in by if i.model.startswith("dinov2_") and i.model.endswith("_reg4")):
        for base in (i for i in by if i.model == reg.model[:-5] and i.img_size == reg.img_size
                     and i.subset == reg.subset):
            s, b = (norms or {}).get(reg.run), (norms or {}).get(base.run)
            key = f"{reg.run} vs {base.run} (artifacts)"
            if s is None or b is None or None in (s["max_median_ratio"], b["max_median_ratio"]):
                per[key] = entry(NODATA, "no norm statistics (the norms job failed?)")
                continue
            numbers = (f"max/median norm {s['max_median_ratio']:.2f} with registers vs "
                       f"{b['max_median_ratio']:.2f} without")
            v = RANDOM if reg.random_weights or base.random_weights else (
                HOLDS if s["max_median_ratio"] < b["max_median_ratio"] else FAILS)
            per[key] = entry(v, numbers)
    t4 = next(t for t in tables if t["key"] == T4)
    for row in (r for r in t4["rows"] if r["use"] == ""):
        without, with_ = row["ours"]
        key = f"{row['paper_row']} on {row['extra'][0]} (performance)"
        if without is None or with_ is None:
            per[key] = entry(NODATA, "only one of the pair has a counted result: "
                                     f"{','.join(r for r in row['runs'] if r)}")
            continue
        d = with_ - without
        sign = f"{d:+.2f}".replace("-", "−")  # the typographic minus of the tolerance beside it
        numbers = (f"with − without = {sign} points (tolerance −{PERF_TOLERANCE}): "
                   f"{_fmt(with_)} with vs {_fmt(without)} without ({row['run']})")
        rnd = any(infos[r].random_weights for r in row["runs"])
        per[key] = entry(RANDOM if rnd else HOLDS if d >= -PERF_TOLERANCE else FAILS, numbers)
    if not per:
        none = ("no canonical dinov2_X_reg4 / dinov2_X pair and no counted Table 4 pair (see the "
                "table's 'in the verdict' column)")
        note = "; ".join(x for x in (note, none) if x)
    return _claim(CLAIM5_RULE, per, note)


def judge(*, results: dict, topk: dict | None, tables: list[dict], roles: dict[str, Role],
          infos: dict[str, RunInfo], subset_note: str | None) -> dict[str, dict]:
    """Every claim's verdict from the canonical runs (and the counted probe results)."""
    runs = [r for r, role in roles.items() if role.canonical]

    def get(job: str, part: str):  # a failed job is None: its claims then say so
        return results[job][part] if results.get(job) else None

    return {
        C1: _noted(claim1(runs=runs, infos=infos, topk=topk, norms=get("norms", "runs"),
                          artifacts=get("artifacts", "runs")), subset_note),
        C2: _noted(claim2(runs=runs, infos=infos, size_rows=get("size", "rows")), subset_note),
        C3: _noted(claim3(runs=runs, infos=infos, neighbours=get("neighbours", "runs")),
                   subset_note),
        C4: claim4(tables=tables, infos=infos, note=subset_note),
        C5: claim5(runs=runs, infos=infos, norms=get("norms", "runs"), tables=tables,
                   note=subset_note),
    }


def _noted(claim: dict, note: str | None) -> dict:
    if note:
        claim["note"] = "; ".join(x for x in (note, claim.get("note")) if x)
    return claim

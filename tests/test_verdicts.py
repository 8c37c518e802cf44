"""Verdicts from the runs that test each claim, never from random weights (analyze/_roles.py,
analyze/_verdicts.py, sql/queries/attn_topk_agreement.sql)."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pytest

from tokenlake import analyze
from tokenlake import sql as tsql
from tokenlake.analyze import _verdicts as V
from tokenlake.analyze._common import RunInfo, run_info
from tokenlake.analyze._probes import T1, T3, T4, paper_tables
from tokenlake.analyze._roles import NATIVE_UNKNOWN, select_roles
from tokenlake.store import open_lake, write_run
from tokenlake.store.testing import (
    OUTLIER_CELLS,
    synthetic_probe_result,
    synthetic_run,
    tiny_run,
)

VAL = "val5k"
N_PRE = 2  # synthetic runs: cls + one register


def add(root, name, **kw):
    kw.setdefault("subset", VAL)
    write_run(root, name, **synthetic_run(**kw))


def value(v: float) -> dict:
    return {("normal", "top1"): v}


# -- the lake every end-to-end test shares ------------------------------------------------------
# Base: the runs that test the claims. Then runs that must not move a verdict, each built so that
# it would move one if it were counted (attention elsewhere, reversed sizes, failing probes).
G = {"model": "dinov2_g", "params": 1_100_000_000}
EXTRA = {
    "a-g-random": {**G, "random_weights": True, "attention": "elsewhere", "seed": 6},
    "g-800": {**G, "grid": 8, "native_img_size": 20, "attention": "elsewhere",
              "outlier_norm": 30.0, "seed": 7},
    "s-800": {"model": "dinov2_s", "params": 22_000_000, "grid": 8, "native_img_size": 20,
              "seed": 8},
    "g-tt": {**G, "attention": "elsewhere", "seed": 9,
             "config": {"test_time_registers": {"source": "g-mlp", "k": 1}}},
    "g-mlp": {**G, "attention": "elsewhere", "seed": 10,
              "config": {"record_mlp": {"array": "mlp_acts"}}},
    "g-keep": {**G, "attention": "elsewhere", "seed": 11, "subset": "trainpool",
               "config": {"keep_if_outlier": True}},
    "s-eval": {"model": "dinov2_s", "params": 22_000_000, "attention": "elsewhere", "seed": 12,
               "subset": "val50k", "config": {"preprocess": "dinov2-eval"}},
    "a-clip-summary": {"model": "clip_b", "params": 86_000_000, "policy": "summary", "seed": 13},
    "g-old": {**G, "attention": "elsewhere", "seed": 14, "native_img_size": False},
}
WHY = {"a-g-random": "another run of dinov2_g is canonical: g",
       "g-800": "32 px, not the model's native 20 px", "s-800": "32 px, not the model's native 20 px",
       "g-tt": "intervention: test-time registers", "g-mlp": "--record-mlp",
       "g-keep": "keep-if-outlier selection", "s-eval": "preprocess 'dinov2-eval'",
       "a-clip-summary": "another run of clip_b is canonical: c", "g-old": NATIVE_UNKNOWN}


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    add(root, "g", model="dinov2_g", params=1_100_000_000)  # attention on the outliers
    add(root, "c", model="clip_b", params=86_000_000, attention="elsewhere", seed=2)
    add(root, "s", model="dinov2_s", params=22_000_000, outlier_norm=60.0, seed=1)
    add(root, "sr", model="dinov2_s_reg4", params=22_000_000, outlier_norm=30.0, seed=3)
    add(root, "flat", model="deit3_s", params=22_000_000, norms="gaussian", outlier_cells=(),
        seed=5)
    synthetic_probe_result(root, "g", "position", config={"tokens": "post"},
                         values={("normal", "top1"): 45.0, ("outlier", "top1"): 7.0})
    synthetic_probe_result(root, "g", "reconstruct",
                         values={("normal", "l2"): 300.0, ("outlier", "l2"): 900.0})
    out = tmp_path_factory.mktemp("report")
    base = analyze.report(root, out=out / "base")
    for name, kw in EXTRA.items():
        add(root, name, **kw)
    for run in ("g-800", "a-g-random"):  # failing probes on runs that are not canonical
        synthetic_probe_result(root, run, "position",
                             values={("normal", "top1"): 5.0, ("outlier", "top1"): 50.0})
    synthetic_probe_result(root, "g-keep", "classify",  # no --test-run: its own images
                         values={("normal", "top1"): 70.0, ("outlier", "top1"): 50.0})
    synthetic_probe_result(root, "s", "heads", values={("image", "top1"): 80.0})
    full = analyze.report(root, out=out / "full")
    return root, out, base, full


def test_base_lake_verdicts(lakes):
    _, _, base, _ = lakes
    c = base["claims"]
    # g: attention on its outliers (holds); c: elsewhere (fails); s, sr, flat: no outlier population
    assert c[V.C1] == "mixed: holds for 1 of 2"
    per = base["verdicts"][V.C1]["runs"]
    assert per["flat"]["verdict"] == V.NA and per["s"]["verdict"] == V.NA
    assert c[V.C2] == V.HOLDS and c[V.C4] == V.HOLDS and c[V.C5] == V.HOLDS


def test_showcase_random_and_intervention_runs_change_no_verdict(lakes):
    _, _, base, full = lakes
    assert full["verdicts"] == base["verdicts"]  # every verdict, entry and number


def test_report_lists_left_out_runs_with_reasons(lakes):
    _, out, _, full = lakes
    roles = full["roles"]
    for run, why in WHY.items():
        assert not roles[run].canonical and why in roles[run].why, run
    assert "subset 'trainpool', not the canonical subset 'val5k'" in roles["g-keep"].why
    assert all(roles[r].canonical for r in ("g", "c", "s", "sr", "flat"))
    md = (out / "full" / "report.md").read_text()
    roles_md = md.split("## Runs and their role in the verdicts")[1].split("\n## ")[0]
    assert "| g-800 | dinov2_g | pretrained | left out of claims 1-3" in roles_md
    assert "| g | dinov2_g | pretrained | canonical for claims 1, 2, 3, 4 (Tables 1-2), 5" in roles_md
    assert f"| g-old | dinov2_g | pretrained | left out of claims 1-3, 4 (Tables 1-2), 5 (artifacts): {NATIVE_UNKNOWN} |" in roles_md
    html = (out / "full" / "report.html").read_text()
    assert '<h2 id="runs-and-their-role-in-the-verdicts">Runs and their role in the verdicts</h2>' \
        in html and '<a href="#runs-and-their-role-in-the-verdicts">' in html


def test_probe_results_left_out_with_their_reason(lakes):
    _, out, _, full = lakes
    t = {x["key"]: x for x in full["tables"]}
    use = {r["run"]: r["use"] for r in t[T1]["rows"]}
    assert use["g"] == "" and use["g-800"].startswith("not the model's canonical run: 32 px")
    assert use["a-g-random"].startswith("not the model's canonical run: another run")
    assert [r["use"] for r in t[T3]["rows"]] == ["tested on the training run's own images"]
    assert "not 'dinov2-eval'" in t[T4]["rows"][0]["use"]
    md = (out / "full" / "report.md").read_text()
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| tokens |" in table1 and "in the verdict |" in table1
    assert "| g | DINOv2-G | post |" in table1 and "| yes |" in table1
    assert "no: not the model's canonical run" in table1


def test_claim1_topk_agreement_on_planted_runs(lakes):
    _, _, base, _ = lakes
    per = base["verdicts"][V.C1]["runs"]
    assert per["g"]["verdict"] == V.HOLDS and "top-k agreement 1 (3 of 3 outliers" in per["g"]["numbers"]
    # c: the attention peak sits in image 1, so image 0's top-3 attention is its uniform noise
    p = synthetic_run(model="clip_b", params=86_000_000, attention="elsewhere", seed=2)
    tok = p["tokens"].to_pandas()
    img0 = tok[(tok.image_id == 0) & (tok.kind == "patch")]
    top3 = img0.sort_values(["attn", "token"], ascending=[False, True]).token[:3]
    outl = {N_PRE + r * 5 + c for r, c in OUTLIER_CELLS}
    hits = len(outl & set(top3))
    assert hits < 2 and per["c"]["verdict"] == V.FAILS
    assert f"top-k agreement {hits / 3:.3g} ({hits} of 3 outliers over 1 images)" in per["c"]["numbers"]
    assert "secondary: Jaccard" in per["c"]["numbers"]
    assert "no outlier population (BC ≤ 5/9, separated share < 1%)" in per["flat"]["numbers"]


def test_runs_override_uses_runs_as_given_and_claim2_groups_by_resolution(lakes, tmp_path):
    root, _, _, _ = lakes
    res = analyze.report(root, out=tmp_path, runs="g,s,g-800,s-800,a-g-random")
    assert all(r.canonical and r.explicit for r in res["roles"].values())
    c2 = res["verdicts"][V.C2]["runs"]
    # 20 px: g (1.1B) far more extreme than s (22M); 32 px: the reverse (g-800 norm 30, s-800 1000)
    assert c2["dinov2 @20 px, val5k"]["verdict"] == V.HOLDS
    assert c2["dinov2 @32 px, val5k"]["verdict"] == V.FAILS
    assert c2["a-g-random (dinov2_g)"]["verdict"] == V.RANDOM
    assert res["verdicts"][V.C1]["runs"]["a-g-random"]["verdict"] == V.RANDOM
    assert "used as they are" in (tmp_path / "report.md").read_text()


# -- random weights only ------------------------------------------------------------------------
def test_random_only_lake_is_never_evidence(tmp_path):
    root = tmp_path / "lake"
    kw = {"random_weights": True}
    add(root, "rg", model="dinov2_g", params=1_100_000_000, **kw)
    add(root, "rs", model="dinov2_s", params=22_000_000, outlier_norm=60.0, seed=1, **kw)
    add(root, "rsr", model="dinov2_s_reg4", params=22_000_000, outlier_norm=30.0, seed=2, **kw)
    for name, model in (("rs-eval", "dinov2_s"), ("rsr-eval", "dinov2_s_reg4")):
        add(root, name, model=model, subset="val50k", config={"preprocess": "dinov2-eval"},
            n_images=2, **kw)
    synthetic_probe_result(root, "rg", "position",
                         values={("normal", "top1"): 45.0, ("outlier", "top1"): 7.0})
    synthetic_probe_result(root, "rg", "classify", config={"test_run": "rs"},
                         values={("normal", "top1"): 50.0, ("outlier", "top1"): 68.0})
    synthetic_probe_result(root, "rs-eval", "heads", values={("image", "top1"): 81.0})
    synthetic_probe_result(root, "rsr-eval", "heads", values={("image", "top1"): 82.0})
    res = analyze.report(root, out=tmp_path / "r")
    assert res["claims"] == {c: V.RANDOM for c in (V.C1, V.C2, V.C3, V.C4, V.C5)}
    for claim in res["verdicts"].values():
        assert {e["verdict"] for e in claim["runs"].values()} <= {V.RANDOM, V.NA, V.NODATA}
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'class="v rnd">random weights: not evidence' in html
    assert "yes (random weights: not evidence)" in html  # the probe tables say so too

    # no run on the canonical subset: every verdict says so and names --subset (CLI option)
    from tokenlake.cli import _analyze_cmd

    parser = argparse.ArgumentParser()
    _analyze_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--lake", str(root), "--out", str(tmp_path / "n"),
                              "--subset", "val1k"])
    assert args.func(args) == 0
    md = (tmp_path / "n" / "report.md").read_text()
    assert "no run is on the canonical subset 'val1k'" in md and "pass --subset NAME" in md
    assert f"### {V.C1}: **{V.NODATA}**" in md and f"### {V.C3}: **{V.NODATA}**" in md


# -- rules, one at a time -------------------------------------------------------------------------
def test_overall_counts_pretrained_evidence_only():
    e = lambda *vs: {str(k): V.entry(v, "") for k, v in enumerate(vs)}
    assert V.overall(e()) == V.NODATA
    assert V.overall(e(V.RANDOM, V.NODATA)) == V.RANDOM
    assert V.overall(e(V.HOLDS, V.RANDOM, V.RANDOM)) == V.HOLDS
    assert V.overall(e(V.HOLDS, V.FAILS, V.RANDOM, V.NA)) == "mixed: holds for 1 of 2"
    assert V.overall(e(V.NA, V.NA)) == V.NA and V.overall(e(V.NA, V.NODATA)) == V.NODATA


def _info(run, model="dinov2_g", *, rw=False, px=518, native=518, subset=VAL, policy="all",
          config=None):
    m = {"model": model, "img_size": px, "subset": subset, "policy": policy,
         "random_weights": rw, "config": config or {}}
    if native is not None:
        m["native_img_size"] = native
    return RunInfo(run, model, rw, None, px, subset, "random" if rw else "pretrained", {}, m)


def test_canonical_tie_break_pretrained_then_policy_then_name():
    infos = [_info("a-random", rw=True), _info("z-summary", policy="summary"),
             _info("y-sample", policy="sample"), _info("b-all2"), _info("c-all")]
    roles = select_roles(infos, subset=VAL, explicit=False)
    assert [r for r, x in roles.items() if x.canonical] == ["b-all2"]
    assert "canonical: b-all2 (tie-break: pretrained before random" in roles["a-random"].why
    roles = select_roles(infos[:3], subset=VAL, explicit=False)
    assert roles["z-summary"].canonical  # summary before sample, pretrained before random
    roles = select_roles([_info("r", rw=True)], subset=VAL, explicit=False)
    assert roles["r"].canonical  # random weights alone still speak, as "not evidence"


def test_every_exclusion_is_named():
    cases = {
        _info("sub", subset="showcase").run: "subset 'showcase', not the canonical subset 'val5k'",
        _info("px", px=798).run: "798 px, not the model's native 518 px",
        _info("old", native=None).run: NATIVE_UNKNOWN,
        _info("keep", config={"keep_if_outlier": True}).run: "keep-if-outlier",
        _info("pol", policy="prefix").run: "policy 'prefix'",
        _info("tt", config={"test_time_registers": {"k": 0}}).run: "test-time registers",
        _info("mlp", config={"record_mlp": {"array": "mlp_acts"}}).run: "--record-mlp",
        _info("pre", config={"preprocess": "dinov2-eval"}).run: "preprocess 'dinov2-eval'",
    }
    infos = [_info("sub", subset="showcase"), _info("px", px=798), _info("old", native=None),
             _info("keep", config={"keep_if_outlier": True}), _info("pol", policy="prefix"),
             _info("tt", config={"test_time_registers": {"k": 0}}),
             _info("mlp", config={"record_mlp": {"array": "mlp_acts"}}),
             _info("pre", config={"preprocess": "dinov2-eval"})]
    roles = select_roles(infos, subset=VAL, explicit=False)
    for run, why in cases.items():
        assert not roles[run].canonical and why in roles[run].why, run
    assert select_roles(infos, subset=VAL, explicit=True)["px"].canonical


def test_claim2_groups_by_family_resolution_and_subset():
    infos = {i.run: i for i in (_info("s518", "dinov2_s"), _info("g518"),
                                _info("s800", "dinov2_s", px=800), _info("g800", px=800))}
    rows = [{"run": r, "model": infos[r].model, "params": p, "max_median_ratio": v, "bc_log": 0.9}
            for r, p, v in (("s518", 22e6, 2.0), ("g518", 1.1e9, 9.0), ("s800", 22e6, 8.0),
                            ("g800", 1.1e9, 3.0))]
    c2 = V.claim2(runs=list(infos), infos=infos, size_rows=rows)
    assert c2["runs"]["dinov2 @518 px, val5k"]["verdict"] == V.HOLDS
    assert c2["runs"]["dinov2 @800 px, val5k"]["verdict"] == V.FAILS
    assert c2["verdict"] == "mixed: holds for 1 of 2"


# -- probe tables: what counts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    small = {"n_images": 2, "grid": 3, "outlier_cells": ((1, 1),)}
    add(root, "g", model="dinov2_g", **small)
    add(root, "g-800", model="dinov2_g", native_img_size=6, grid=4, n_images=2,
        outlier_cells=((1, 1),))
    add(root, "g-keep", model="dinov2_g", subset="trainpool", config={"keep_if_outlier": True},
        **small)
    heads = {"Small": ("s", 81.15, 81.65), "Base": ("b", 84.33, 83.90),
             "Large": ("l", 86.12, 85.50)}
    for (k, without, with_) in heads.values():
        for suffix, v in (("", without), ("_reg4", with_)):
            run = f"dinov2_{k}{suffix}-eval"
            add(root, run, model=f"dinov2_{k}{suffix}", subset="val50k",
                config={"preprocess": "dinov2-eval"}, **small)
            synthetic_probe_result(root, run, "heads", values={("image", "top1"): v})
    add(root, "dinov2_g-own", model="dinov2_g", subset="val50k", **small)
    synthetic_probe_result(root, "dinov2_g-own", "heads", values={("image", "top1"): 80.0})
    add(root, "dinov2_s_reg4-tt", model="dinov2_s_reg4", subset="val50k",
        config={"preprocess": "dinov2-eval", "test_time_registers": {"k": 1}}, **small)
    synthetic_probe_result(root, "dinov2_s_reg4-tt", "heads", values={("image", "top1"): 99.0})
    add(root, "g-tt", model="dinov2_g", subset="trainpool",
        config={"keep_if_outlier": True, "test_time_registers": {"k": 1}}, **small)
    synthetic_probe_result(root, "g", "position",  # an older result: no "tokens" in its config
                         values={("normal", "top1"): 45.0, ("outlier", "top1"): 7.0})
    synthetic_probe_result(root, "g-800", "position",
                         values={("normal", "top1"): 5.0, ("outlier", "top1"): 50.0})
    fail = {("normal", "top1"): 70.0, ("outlier", "top1"): 50.0}
    test_g = {"choices": {"test": {"run": "g", "n_images": 2}}}
    h = {"own": synthetic_probe_result(root, "g-keep", "classify", values=fail),
         "old": synthetic_probe_result(root, "g-keep", "classify", values=fail, **test_g,
                                     config={"test_run": "g", "tokens": "post", "lr": 1}),
         "tt": synthetic_probe_result(root, "g-tt", "classify", values=fail, **test_g,
                                    config={"test_run": "g"}),
         "test800": synthetic_probe_result(root, "g-keep", "classify", values=fail,
                                         config={"test_run": "g-800"}),
         "new": synthetic_probe_result(root, "g-keep", "classify", **test_g,
                                     config={"test_run": "g", "tokens": "post"},
                                     values={("normal", "top1"): 50.0, ("outlier", "top1"): 68.0})}
    lk = open_lake(root)
    infos = {r["run"]: run_info(lk, r["run"]) for r in lk.runs()}
    roles = select_roles(list(infos.values()), subset=VAL, explicit=False)
    tables = paper_tables(lk, infos=infos, use=V.probe_use(roles=roles, infos=infos))
    return {t["key"]: t for t in tables}, infos, h


def test_claim4_counts_canonical_and_held_out_results_only(probe_lake):
    tables, infos, h = probe_lake
    t1 = {r["run"]: r for r in tables[T1]["rows"]}
    assert t1["g"]["extra"] == ["pre"] and t1["g"]["use"] == ""  # absent "tokens" = pre
    assert t1["g-800"]["use"].startswith("not the model's canonical run")
    assert tables[T3]["extra_columns"] == ["tokens", "test run (images)"]
    t3 = {r["result"].config_hash: r for r in tables[T3]["rows"]}
    assert t3[h["new"]]["use"] == "" and t3[h["new"]]["extra"] == ["post", "g (2)"]
    assert t3[h["old"]]["use"].startswith(f"superseded by the newer result {h['new']} of g-keep")
    assert t3[h["own"]]["use"] == "tested on the training run's own images"
    assert t3[h["own"]]["extra"] == ["pre", "none (the training run's own images)"]
    assert t3[h["tt"]]["use"] == ("training run g-tt is not canonical for Table 3: intervention: "
                                  "test-time registers")
    assert t3[h["test800"]]["use"] == ("test run g-800 is not canonical for Table 3: 16 px, not "
                                       "the model's native 6 px")
    c4 = V.claim4(tables=list(tables.values()), infos=infos, note=None)
    assert c4["runs"] == {
        "g (position, pre tokens)": V.entry(V.HOLDS, "top-1 normal 45 vs outlier 7"),
        "g-keep (global info, tested on g, post tokens)": V.entry(
            V.HOLDS, "top-1 normal 50 vs outlier 68")}


def test_claim5_performance_sign_and_tolerance(probe_lake):
    tables, infos, _ = probe_lake
    c5 = V.claim5(runs=[], infos=infos, norms=None, tables=list(tables.values()), note=None)
    per = c5["runs"]
    assert per["Small on val50k (performance)"]["verdict"] == V.HOLDS
    assert "with − without = +0.50 points (tolerance −0.5)" in per["Small on val50k (performance)"]["numbers"]
    # a drop within the tolerance does not degrade; a larger one does
    assert per["Base on val50k (performance)"]["verdict"] == V.HOLDS
    assert "with − without = −0.43 points" in per["Base on val50k (performance)"]["numbers"]
    assert per["Large on val50k (performance)"]["verdict"] == V.FAILS
    assert "with − without = −0.62 points" in per["Large on val50k (performance)"]["numbers"]
    assert c5["verdict"] == "mixed: holds for 2 of 3"
    own = [r for r in tables[T4]["rows"] if r["run"] == "dinov2_g-own"]
    assert len(own) == 1 and "not 'dinov2-eval'" in own[0]["use"]
    tt = [r for r in tables[T4]["rows"] if r["run"] == "dinov2_s_reg4-tt"]
    assert tt[0]["use"] == "not canonical for Table 4: intervention: test-time registers"
    assert not any(k.startswith("Giant") for k in per)


# -- the SQL query --------------------------------------------------------------------------------
def test_attn_topk_agreement_query_against_numpy(tmp_path):
    text = tsql.query_text("attn_topk_agreement")
    assert text.startswith("-- attn_topk_agreement:") and "Parameters:" in text and "Columns:" in text
    r = tiny_run(n_images=6, seed=3)
    t = r["tokens"]
    img = t.column("image_id").to_numpy()
    tok = t.column("token").to_numpy()
    patch = t.column("kind").to_numpy(zero_copy_only=False) == "patch"
    norm = t.column("norm").to_numpy().astype(float)
    out = patch & (norm > np.percentile(norm[patch], 90))
    # images 0-2: attention follows the norm (hits); 3-5: noise (misses); one decimal: many ties
    attn = np.round(np.where(img < 3, norm / norm.max(), t.column("attn").to_numpy()), 1)
    attn = np.minimum(attn, 0.8)
    # image 1 (k >= 2): its last outlier ties at 0.9 with a normal patch of a lower token; the
    # lower token wins, so exactly one outlier misses the top k
    o1 = np.flatnonzero(out & (img == 1))
    low = np.flatnonzero(patch & ~out & (img == 1))[0]
    assert len(o1) >= 2 and tok[low] < tok[o1[-1]]
    attn[o1] = 0.95
    attn[[o1[-1], low]] = 0.9
    null = np.zeros(len(attn), bool)
    null[np.flatnonzero(patch & ~out)[::7]] = True  # a NULL attn is never among the top k
    null[low] = False  # the tie above needs both values
    r["tokens"] = t.set_column(t.schema.get_field_index("attn"), "attn",
                               pa.array(attn, pa.float32(), mask=null))
    write_run(tmp_path, "a", **r)
    got = open_lake(tmp_path).sql(text, params=[["a"], 0.9]).to_pylist()
    df = r["tokens"].to_pandas()
    p = df[df.kind == "patch"]
    thr = np.percentile(p.norm.to_numpy(float), 90)
    want = []
    for img, g in p.groupby("image_id"):
        out = set(g.token[g.norm.astype(float) > thr])
        if not out:
            continue
        ranked = g[g.attn.notna()].sort_values(["attn", "token"], ascending=[False, True])
        hit = len(out & set(ranked.token[:len(out)]))
        want.append({"image_id": img, "k": len(out), "n_hit": hit, "n_attn": int(g.attn.notna().sum())})
    assert [{k: x[k] for k in ("image_id", "k", "n_hit", "n_attn")} for x in got] == want
    by = {w["image_id"]: w for w in want}
    assert by[1]["n_hit"] == by[1]["k"] - 1 == len(o1) - 1  # the tie went to the lower token
    assert any(w["n_hit"] == w["k"] for w in want) and any(w["n_hit"] == 0 for w in want)
    for x in got:
        assert x["agreement"] == pytest.approx(x["n_hit"] / x["k"])
        assert x["norm_threshold"] == pytest.approx(thr)

"""The outlier card (sql/views/cards.sql, sql/views/emergence.sql, analyze/_cards.py,
`tokenlake cards`, the report's "Outlier cards" section), against numpy on planted lakes."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from tokenlake import analyze
from tokenlake import sql as tsql
from tokenlake.analyze._cards import FIELDS, card_table
from tokenlake.analyze._common import family_of
from tokenlake.analyze._neurons import detection_block, emergence
from tokenlake.cli.main import main
from tokenlake.store import open_lake, write_neurons, write_run
from tokenlake.store.testing import synthetic_run, tiny_run

EMERGE_AT, DEPTH = 3, 6


def _noisy(seed: int, **kw) -> dict:
    """A synthetic run whose attention follows the norm only partly (hits and misses), with tied
    and NULL attention values, so the top-k agreement is neither 0 nor 1, and a tie at the top
    decided by the token order (outliers by the run's own threshold)."""
    r = tiny_run(n_reg=1, grid=6, seed=seed, **kw)
    t = r["tokens"]
    rng = np.random.default_rng(seed)
    norm = t.column("norm").to_numpy().astype(np.float64)
    attn = np.round((norm + rng.normal(0, 15, norm.size)) / 200, 2).astype(np.float32)  # ties
    null = rng.random(norm.size) < 0.05
    # an image with one outlier, whose attention ties with a normal patch's at the top: the lower
    # token (the normal patch) wins the tie, so the image counts no hit
    patch = t.column("kind").to_numpy(zero_copy_only=False) == "patch"
    img = t.column("image_id").to_numpy()
    out = patch & (norm > np.percentile(norm[patch], 98))
    i = next(i for i in np.unique(img) if out[img == i].sum() == 1)
    o, n = np.flatnonzero(out & (img == i))[0], np.flatnonzero(patch & (img == i))[0]
    assert n < o
    attn[[o, n]], null[[o, n]] = 0.99, False
    r["tokens"] = t.set_column(t.schema.get_field_index("attn"), "attn",
                               pa.array(attn, pa.float32(), mask=null))
    return r


def _ranking(run: str, rows: list[tuple[int | None, int, int, float]]) -> pa.Table:
    """A neurons table for `run`: rows of (rank, block, neuron, score)."""
    n = len(rows)
    rank, block, neuron, score = zip(*rows)
    return pa.table({
        "run": [run] * n, "method": ["jiang"] * n, "detect_block": [2] * n,
        "highest_block": [2] * n, "sparsity_filter": [True] * n,
        "rank": pa.array(rank, pa.int32()), "block": pa.array(block, pa.int16()),
        "neuron": pa.array(neuron, pa.int32()), "score": list(score),
        "mean_abs_outlier": [1.0] * n, "mean_abs_normal": [0.1] * n, "outlier_share": [0.5] * n,
        "sparse_share": [1.0] * n, "n_images": [1] * n, "n_outlier": [3] * n,
        "n_normal": [100] * n})


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    runs = {
        "noisy": _noisy(7, n_images=11, error_ids=(4,)),
        "noisy-ref": _noisy(8, n_images=9),  # outliers by noisy's threshold
        "emerge": synthetic_run(blocks=DEPTH, emerge_at=EMERGE_AT, seed=1),
        "twin": synthetic_run(seed=2, outlier_norm=80.0),  # same model and weights, no ranking
        "flat-random": synthetic_run(model="deit3_s", random_weights=True, norms="gaussian",
                                   outlier_cells=(), attention="elsewhere", seed=3),
    }
    runs["noisy-ref"]["manifest"]["outlier_ref"] = "noisy"
    for name, r in runs.items():
        write_run(root, name, shard_size=5, **r)
    write_neurons(root, "emerge", _ranking("emerge", [
        (1, 2, 7, 9.0), (2, 1, 3, 8.0), (3, 2, 0, 7.5), (4, 0, 5, 7.0), (None, 4, 1, 99.0)]))
    return root, runs


def _frames(r: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    return r["tokens"].to_pandas(), (r["blocks"].to_pandas() if "blocks" in r else None)


def _want(r: dict, ref: dict) -> dict:
    """Every card number of run `r` (threshold from run `ref`), computed here with numpy."""
    t, blocks = _frames(r)
    p = t[t.kind == "patch"].copy()
    rt = ref["tokens"].to_pandas()
    thr = np.percentile(rt.loc[rt.kind == "patch", "norm"].to_numpy(np.float64), 98)
    x = p.norm.to_numpy(np.float64)
    out = x > thr
    p["out"] = out
    lx = np.log(x[x > 0])
    g, k, n = stats.skew(lx, bias=False), stats.kurtosis(lx, bias=False), lx.size
    cut = np.median(lx) + 6 * 1.4826 * np.median(np.abs(lx - np.median(lx)))
    hits = 0
    for _, img in p.groupby("image_id"):
        kk = int(img.out.sum())
        # A_k: highest attn first, ties by lower token, NULL attention last (never counted)
        top = img.sort_values(["attn", "token"], ascending=[False, True], na_position="last")
        top = top.head(kk)
        hits += int((top.out & top.attn.notna()).sum())
    c = p.nbr_cos.to_numpy(np.float64)
    low = c > np.percentile(c, 90)
    want = {
        "threshold": thr, "n_outliers": int(out.sum()), "n_images": p.image_id.nunique(),
        "n_images_with_outliers": p[out].image_id.nunique(),
        "max_median_ratio": x.max() / np.median(x),
        "bc_log": (g ** 2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))),
        "separated_share": float(np.mean(lx > cut)), "attn_hits": hits,
        "low_info_share": low[out].mean() if out.any() else None,
        "low_info_ratio": low[out].mean() / low[~out].mean() if out.any() else None,
    }
    want["image_share"] = want["n_images_with_outliers"] / want["n_images"]
    want["outliers_per_affected_image"] = (want["n_outliers"] / want["n_images_with_outliers"]
                                           if out.any() else None)
    want["attn_agreement"] = hits / out.sum() if out.any() else None
    want["medians"], want["emergence_block"] = None, None
    if blocks is not None:
        key = p.loc[out, ["image_id", "token"]]
        at = blocks.merge(key, on=["image_id", "token"])
        want["medians"] = at.groupby("block").norm.apply(
            lambda v: np.median(v.to_numpy(np.float64))).to_numpy()
        above = np.flatnonzero(want["medians"] > thr)
        want["emergence_block"] = int(above[0]) if above.size else None
        want["n_blocks"] = blocks.block.nunique()
    return want


def _same(a: dict, b: dict) -> None:
    """Equal records; floats to 1e-12 (DuckDB's parallel sums run in any order)."""
    assert a.keys() == b.keys()
    for c, v in a.items():
        assert v == (pytest.approx(b[c], rel=1e-12) if isinstance(v, float) else b[c]), c


def _approx(v):
    return None if v is None else pytest.approx(v, rel=1e-9)


def test_card_numbers_match_numpy(lake):
    root, runs = lake
    got = {r["run"]: r for r in open_lake(root).sql("SELECT * FROM cards").to_pylist()}
    assert sorted(got) == sorted(runs)  # one row per complete run
    for name, r in runs.items():
        ref = runs[r["manifest"].get("outlier_ref", name)]
        want, card = _want(r, ref), got[name]
        for col in ("threshold", "image_share", "outliers_per_affected_image", "max_median_ratio",
                    "bc_log", "separated_share", "attn_agreement", "low_info_share",
                    "low_info_ratio"):
            assert card[col] == _approx(want[col]), (name, col)
        for col in ("n_outliers", "n_images", "n_images_with_outliers", "attn_hits"):
            assert card[col] == want[col], (name, col)
        assert card["emergence_block"] == want["emergence_block"], name
    # not vacuous: the noisy runs' agreement is strictly between 0 and 1, noisy-ref's threshold is
    # noisy's, the planted runs' attention sits on (emerge) or away from (flat) their outliers
    assert 0 < got["noisy"]["attn_agreement"] < 1 and got["noisy-ref"]["threshold_run"] == "noisy"
    assert got["noisy-ref"]["threshold"] == got["noisy"]["threshold"]
    assert got["emerge"]["attn_agreement"] == 1 and got["emerge"]["low_info_share"] == 1
    assert got["flat-random"]["random_weights"] and got["flat-random"]["bc_log"] < 5 / 9


def test_card_numbers_are_the_named_queries(lake):
    """The fields taken from claim 1's, claim 3's and the norm summary's queries are theirs."""
    root, runs = lake
    lk = open_lake(root)
    names = sorted(runs)
    card = {r["run"]: r for r in lk.sql("SELECT * FROM cards").to_pylist()}
    q = lambda name, *p: {r["run"]: r for r in lk.sql(tsql.query_text(name),
                                                       params=[names, *p]).to_pylist()}
    norms, nb = q("norm_summary", 0.98), q("neighbour_stats", 0.98, 0.9)
    topk = lk.sql(tsql.query_text("attn_topk_agreement"), params=[names, 0.98]).to_pylist()
    for run in names:
        for col in ("threshold", "n_outliers", "image_share", "outliers_per_affected_image",
                    "max_median_ratio", "bc_log", "separated_share"):
            assert card[run][col] == _approx(norms[run][col]), (run, col)
        assert card[run]["low_info_share"] == _approx(nb[run]["p_low_outlier"])
        assert card[run]["low_info_ratio"] == _approx(nb[run]["ratio"])
        mine = [r for r in topk if r["run"] == run]
        assert card[run]["attn_hits"] == sum(r["n_hit"] for r in mine)
        if mine:
            assert card[run]["attn_agreement"] == _approx(
                sum(r["n_hit"] for r in mine) / sum(r["k"] for r in mine))


def test_emergence_is_the_first_block_whose_median_exceeds_the_threshold(lake):
    root, runs = lake
    lk = open_lake(root)
    want = _want(runs["emerge"], runs["emerge"])
    rows = lk.sql("SELECT * FROM emergence WHERE run = 'emerge' ORDER BY block").to_pylist()
    assert [r["block"] for r in rows] == list(range(DEPTH))
    assert [r["median_norm"] for r in rows] == pytest.approx(want["medians"], rel=1e-12)
    # one of the three outliers is already there at EMERGE_AT - 1: the median waits for most
    assert want["emergence_block"] == EMERGE_AT
    assert {r["emergence_block"] for r in rows} == {EMERGE_AT}
    assert [r["above"] for r in rows] == [b >= EMERGE_AT for b in range(DEPTH)]
    assert {(r["n_blocks"], r["n_outliers"]) for r in rows} == {(DEPTH, 3)}
    card = lk.sql("SELECT * FROM cards WHERE run = 'emerge'").to_pylist()[0]
    assert (card["emergence_block"], card["n_blocks"]) == (EMERGE_AT, DEPTH)
    assert card["emergence_depth"] == pytest.approx((EMERGE_AT + 1) / DEPTH)
    # tokenlake neurons' default detection block is the same view's
    assert detection_block(lk, "emerge") == EMERGE_AT
    e = emergence(lk, "emerge")
    assert e["medians"] == pytest.approx(want["medians"]) and e["n_blocks"] == DEPTH
    # no blocks table: no emergence rows, NULL on the card, and neurons refuses to guess
    assert lk.sql("SELECT count(*) FROM emergence WHERE run = 'twin'").column(0)[0].as_py() == 0
    twin = lk.sql("SELECT * FROM cards WHERE run = 'twin'").to_pylist()[0]
    assert twin["emergence_block"] is None and twin["n_blocks"] is None
    with pytest.raises(ValueError, match="no outlier patch token or no per-block norms"):
        detection_block(lk, "twin")


def test_emergence_needs_the_median_strictly_above(tmp_path):
    """2401 patches: the 98th percentile is exactly the 2353rd smallest norm (a float32), so a
    block whose median at the outliers equals it is not above; the next block is."""
    r = synthetic_run(n_images=1, grid=49, n_reg=0, blocks=1, seed=4)
    t = r["tokens"].to_pandas()
    x = t.loc[t.kind == "patch", "norm"].to_numpy(np.float64)
    thr = np.percentile(x, 98)
    assert thr == float(np.float32(thr)) and (x > thr).sum() == 48
    out = (t.kind == "patch").to_numpy() & (t.norm.to_numpy(np.float64) > thr)
    parts = []
    for b, at_out in enumerate((10.0, thr, np.nextafter(np.float32(thr), np.float32(np.inf)))):
        norm = np.where(out, at_out, 5.0).astype(np.float32)
        parts.append(pa.table({"image_id": t.image_id.to_numpy(), "block": np.full(len(t), b, np.int16),
                               "token": t.token.to_numpy(np.int32), "norm": norm,
                               "q_norm": pa.nulls(len(t), pa.float32()),
                               "k_norm": pa.nulls(len(t), pa.float32()),
                               "v_norm": pa.nulls(len(t), pa.float32())}))
    r["blocks"] = pa.concat_tables(parts).sort_by([("image_id", "ascending"),
                                                   ("block", "ascending"), ("token", "ascending")])
    write_run(tmp_path, "edge", **r)
    lk = open_lake(tmp_path)
    rows = lk.sql("SELECT * FROM emergence ORDER BY block").to_pylist()
    assert rows[0]["threshold"] == thr and rows[1]["median_norm"] == thr
    assert [r["above"] for r in rows] == [False, False, True]
    assert rows[0]["emergence_block"] == 2 and detection_block(lk, "edge") == 2


def test_neuron_columns_from_a_written_ranking(lake):
    root, _ = lake
    got = {r["run"]: r for r in open_lake(root).sql("SELECT * FROM cards").to_pylist()}
    own = got["emerge"]
    assert own["neuron_run"] == "emerge" and own["top_neurons"] == "b2:n7, b1:n3, b2:n0"
    assert (own["neuron_method"], own["neuron_detect_block"], own["neuron_highest_block"]) == (
        "jiang", 2, 2)
    twin = got["twin"]  # same model and weights: the model's ranking, named
    assert twin["neuron_run"] == "emerge" and twin["top_neurons"] == own["top_neurons"]
    for run in ("noisy", "flat-random"):  # other models
        assert got[run]["neuron_run"] is None and got[run]["top_neurons"] is None


def test_own_ranking_before_another_runs(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path, name, **synthetic_run(seed=5))
    write_neurons(tmp_path, "a", _ranking("a", [(1, 0, 1, 2.0)]))
    write_neurons(tmp_path, "b", _ranking("b", [(1, 3, 9, 2.0)]))
    got = {r["run"]: r for r in open_lake(tmp_path).sql("SELECT * FROM cards").to_pylist()}
    assert (got["a"]["neuron_run"], got["a"]["top_neurons"]) == ("a", "b0:n1")
    assert (got["b"]["neuron_run"], got["b"]["top_neurons"]) == ("b", "b3:n9")


def test_card_table_adds_family_and_params_in_the_asked_order(lake):
    root, runs = lake
    t = card_table(root, runs="twin,noisy")
    assert t.column("run").to_pylist() == ["twin", "noisy"]
    assert t.column("family").to_pylist() == ["dinov2", "toy"]
    assert t.column("params").to_pylist() == [22_000_000, None]
    assert t.column_names.index("family") == t.column_names.index("model") + 1
    full = card_table(root)
    assert full.num_rows == len(runs)
    one = card_table(root, runs=["noisy"]).to_pylist()[0]  # queried alone (`run = ?`)
    _same(one, full.to_pylist()[full.column("run").to_pylist().index("noisy")])


def test_family_of_the_later_families():
    got = [family_of(m) for m in ("dinov3_l", "dinov3_7b", "eva02_b", "radio_h", "siglip_so400m",
                                  "aimv2_l", "dinov2_l_reg4", "dinov2_l", "dino_b16")]
    assert got == ["dinov3", "dinov3", "eva02", "radio", "siglip", "aimv2", "dinov2_reg4",
                   "dinov2", "dino"]


def test_cli_side_by_side(lake, capsys):
    root, _ = lake
    assert main(["cards", "--lake", str(root), "--runs", "emerge,flat-random,twin"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("│")]  # the table's rows
    header = lines[0]
    assert header.split("┆")[0].strip("│ ") == "field"
    assert header.index("emerge") < header.index("flat-random [RANDOM WEIGHTS]") < header.index(
        "twin")
    for _, label in FIELDS:
        assert sum(label in line for line in lines) == 1, label
    row = lambda label: next(line for line in lines if label in line)
    assert "3 (blocks 0–5; 67 % of depth)" in row("emergence block")
    assert "— (no blocks table)" in row("emergence block")
    assert row("weights").count("RANDOM WEIGHTS") == 1
    assert "b2:n7, b1:n3, b2:n0 (from emerge)" in row("top register neurons")
    assert "16.7 % (1 of 6)" in row("images with ≥1 outlier")
    assert "1.000 (3 of 3)" in row("attention–norm agreement")
    assert "[RANDOM WEIGHTS] runs used untrained networks" in text


def test_cli_csv_and_json_are_the_typed_records(lake, capsys, tmp_path):
    root, _ = lake
    want = card_table(root, runs="noisy,emerge").to_pylist()
    assert main(["cards", "--lake", str(root), "--runs", "noisy,emerge", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["noisy", "emerge"]
    assert float(rows[0]["attn_agreement"]) == pytest.approx(want[0]["attn_agreement"])
    assert rows[1]["emergence_block"] == str(EMERGE_AT) and rows[0]["emergence_block"] == ""
    out = tmp_path / "cards.json"
    assert main(["cards", "--lake", str(root), "--runs", "noisy,emerge", "--format", "json",
                 "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    for g, w in zip(got, json.loads(json.dumps(want, default=str)), strict=True):
        _same(g, w)
    assert got[1]["family"] == "dinov2" and got[1]["params"] == 22_000_000


def test_cli_errors_exit_2(lake, capsys, tmp_path):
    root, _ = lake
    assert main(["cards", "--lake", str(root), "--runs", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["cards", "--lake", str(root), "--output", str(tmp_path)]) == 2  # a folder
    assert f"cannot write {tmp_path}: Is a directory" in capsys.readouterr().err
    assert main(["cards", "--lake", str(tmp_path / "missing")]) == 2
    assert "no lake at" in capsys.readouterr().err


def test_report_section_and_figure(lake, tmp_path):
    root, _ = lake
    res = analyze.report(root, out=tmp_path, runs="emerge,twin,flat-random")
    assert not [m for m in res["missing"] if m.startswith("cards")]
    png = tmp_path / "analysis" / "cards.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (tmp_path / "analysis" / "cards.csv").exists()
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Outlier cards")[1].split("\n## ")[0]
    assert "](analysis/cards.png)" in section
    assert "| flat-random [RANDOM WEIGHTS] | deit3_s | deit3 | 22.0M |" in section
    assert "| emerge | dinov2_s | dinov2 | 22.0M |" in section and "b2:n7, b1:n3, b2:n0" in section
    html = (tmp_path / "report.html").read_text()
    cards_html = html.split('<h2 id="outlier-cards">')[1].split("<h2")[0]
    assert "data:image/png;base64," in cards_html and "Outlier cards" in html
    assert "tokenlake cards --lake" in md  # the command that rebuilds it

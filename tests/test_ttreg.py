"""Register neurons found from the lake (--record-mlp, `tokenlake neurons`) and test-time registers
(--test-time-registers RUN:K), on a random-weight DINOv2-S (random weights throughout) with planted
neurons: three *writers* in block WB that create the high-norm outliers, a *reader* in a later block
that fires where the norm is already high, and a *dense* neuron active everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenlake import analyze
from tokenlake.analyze._neurons import detection_block
from tokenlake.cli.main import main
from tokenlake.extract import create_backbone, make_adapter, resolve_model, resolve_weights
from tokenlake.extract._preprocess import DataConfig, normalise
from tokenlake.extract._ttreg import TTRegister, parse_ttreg
from tokenlake.extract.testing import write_blob_folder
from tokenlake.store import LakeError, open_lake, read_neurons

REPO = Path(__file__).resolve().parents[1]
DEPTH, HIDDEN, NP = 12, 1536, 16  # dinov2_s at 56 px: 12 blocks x 1536 neurons, 4 x 4 patches
WB, WRITERS = 5, (101, 202, 303)  # writer block and neurons: together they write the outliers
DB, DENSE = 2, 404  # a neuron active at every token, writing nothing
RB, READER = 9, 505  # a neuron after WB that fires where the norm is already high, writing nothing
N_IMAGES = 20
FP16_NEAR_HALF = 2.0 ** -13  # fp16 rounds values near 0.5 by at most half of 2^-12
COMMON = ["--img-size", "56", "--shard-size", "32", "--decode-workers", "0", "--quiet"]


def _extract(lake, weights, run, *extra, batch=4) -> int:
    return main(["extract", "--lake", str(lake), "--model", "dinov2_s", "--subset", "tiny",
                 "--weights", str(weights), "--run", run, "--batch-size", str(batch), *COMMON,
                 *extra])


def _inputs(db, run) -> torch.Tensor:
    """The normalised inputs the model saw, reassembled from the run's stored patch pixels."""
    t = db.sql(f"SELECT image_id, slot FROM tokens WHERE run = '{run}' AND kind = 'patch' "
               "ORDER BY image_id, token").to_pandas()
    _, cells = db.gather(run, t.slot.to_numpy(), pixels=True)
    n = cells.shape[0] // 16
    pixels = cells.reshape(n, 4, 4, 14, 14, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 56, 56, 3)
    dc = db.manifest(run)["data_config"]
    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()})
    return normalise(torch.from_numpy(np.ascontiguousarray(pixels)), cfg)


def _seen(model, x: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Block `block` over x, at the patch tokens: its input's norm [N], its MLP input z [N, D] and
    its MLP hidden activation h [N, H] (the fc2 input)."""
    seen: dict[str, torch.Tensor] = {}
    blk = model.blocks[block]
    hooks = [blk.register_forward_pre_hook(lambda _m, a: seen.setdefault("res", a[0])),
             blk.mlp.fc1.register_forward_pre_hook(lambda _m, a: seen.setdefault("z", a[0])),
             blk.mlp.fc2.register_forward_pre_hook(lambda _m, a: seen.setdefault("h", a[0]))]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    flat = {k: v[:, 1:].reshape(-1, v.shape[-1]) for k, v in seen.items()}
    return {"norm": flat["res"].norm(dim=-1), "z": flat["z"], "h": flat["h"]}


def _plant(model, x: torch.Tensor, clean_max: float, thr: float) -> None:
    """Writers: fc1 rows read the first principal direction of block WB's MLP input and fire on the
    patches above the widest gap of that projection (between its 75th and 97th percentiles), so no
    patch sits in GELU's negative lobe; their fc2 columns together write a vector of up to 30x the
    largest clean patch norm. Dense: act = 3x the writers' mean at outliers, at every token. Reader:
    reads the direction in which outlier patches (block-RB input norm > thr) differ from the rest
    and fires there at 4x the writers' mean. Dense and reader write nothing (fc2 columns zero)."""
    mlp = model.blocks[WB].mlp
    z = _seen(model, x, WB)["z"]
    w = torch.linalg.svd(z - z.mean(0), full_matrices=False).Vh[0]
    proj = z @ w
    if proj.max() - proj.quantile(0.75) < proj.quantile(0.25) - proj.min():
        w, proj = -w, -proj
    s = proj.sort().values
    lo, hi = int(0.75 * s.numel()), int(0.97 * s.numel())
    k = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    beta, gap = (s[k] + s[k + 1]) / 2, s[k + 1] - s[k]
    gain = 16 / gap  # the nearest patches on either side sit 8 away: GELU ~ 0 or ~ identity
    v = torch.randn(model.embed_dim, generator=torch.Generator().manual_seed(3))
    top = gain * (proj.max() - beta)
    gamma = model.blocks[WB].ls2.gamma
    with torch.no_grad():
        for i, n in enumerate(WRITERS):  # gains 1, 0.9, 0.8: distinct scores, a third each
            g = gain * (1 - 0.1 * i)
            mlp.fc1.weight[n], mlp.fc1.bias[n] = g * w, -g * beta
            mlp.fc2.weight[:, n] = v / v.norm() * 10 * clean_max / (top * (1 - 0.1 * i)) / gamma
    at_rb = _seen(model, x, RB)
    outl = at_rb["norm"] > thr
    writers = _seen(model, x, WB)["h"][outl][:, list(WRITERS)].abs().mean(0).max()
    with torch.no_grad():
        dense = model.blocks[DB].mlp
        dense.fc1.weight[DENSE], dense.fc1.bias[DENSE] = 0, 3 * writers
        dense.fc2.weight[:, DENSE] = 0
        u = at_rb["z"][outl].mean(0) - at_rb["z"][~outl].mean(0)
        p = at_rb["z"] @ (u / u.norm())
        beta_r = p[~outl].max()
        g_r = 4 * writers / (p[outl] - beta_r).clamp(min=0).mean()
        reader = model.blocks[RB].mlp
        reader.fc1.weight[READER], reader.fc1.bias[READER] = g_r * u / u.norm(), -g_r * beta_r
        reader.fc2.weight[:, READER] = 0


def _patch_norms(db, run) -> np.ndarray:
    return db.sql(f"SELECT norm FROM tokens WHERE run = '{run}' AND kind = 'patch'").column(0).to_numpy()


def _neurons(path, *options) -> tuple:
    """Rank planted's neurons with `options`; the ranking (a DataFrame) and its metadata."""
    assert main(["neurons", "--lake", str(path), "--run", "planted", "--top", "5", *options]) == 0
    table, meta = read_neurons(path, "planted")
    return table.to_pandas(), meta


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = write_blob_folder(tmp_path_factory.mktemp("imgs"), n=N_IMAGES, side=56, blob=14)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    assert _extract(path, "random", "clean") == 0
    db = open_lake(path)
    thr = db.sql("SELECT threshold FROM thresholds WHERE run = 'clean'").column(0)[0].as_py()
    model = create_backbone(resolve_model("dinov2_s"), weights=resolve_weights("random"), img_size=56)
    _plant(model, _inputs(db, "clean"), float(_patch_norms(db, "clean").max()), thr)
    weights = tmp_path_factory.mktemp("w") / "planted.pth"
    torch.save(model.state_dict(), weights)
    # outliers: patch norms above the clean model's 98th percentile, at every block
    assert _extract(path, weights, "planted", "--record-mlp", "--mlp-acts",
                    "--outlier-ref", "clean") == 0
    rankings = {"contrast": _neurons(path, "--method", "contrast")}
    assert _extract(path, weights, "tt-contrast", "--test-time-registers", "planted:3",
                    batch=16) == 0
    rankings["no-limit"] = _neurons(path, "--highest-block", "-1")
    rankings["no-filter"] = _neurons(path, "--sparsity-filter", "off")
    rankings["default"] = _neurons(path)  # the ranking the runs below use
    assert _extract(path, weights, "tt3-b16", "--test-time-registers", "planted:3", batch=16) == 0
    assert _extract(path, weights, "tt3-b1", "--test-time-registers", "planted:3", batch=1) == 0
    assert _extract(path, weights, "tt0", "--test-time-registers", "planted:0", batch=16) == 0
    return path, weights, rankings


def _top(ranking, k: int) -> list[tuple[int, int]]:
    frame = ranking[0].dropna(subset=["rank"]).sort_values("rank")
    return list(zip(frame.block.head(k), frame.neuron.head(k)))


def _row(ranking, block: int, neuron: int) -> dict:
    frame = ranking[0]
    return frame[(frame.block == block) & (frame.neuron == neuron)].iloc[0].to_dict()


def test_writers_make_the_outliers_and_rank_first(lake):
    path, _, rankings = lake
    db = open_lake(path)
    clean, planted = _patch_norms(db, "clean"), _patch_norms(db, "planted")
    assert planted.max() > 10 * clean.max()  # the plant works: huge outliers
    frame, meta = rankings["default"]
    assert (meta["method"], meta["detect_block"], meta["highest_block"]) == ("jiang", WB, WB)
    assert meta["sparsity_filter"] and meta["sparsity_frac_threshold"] == 0.5
    assert meta["sparsity_activation_threshold"] == 0.5 and meta["threshold_run"] == "clean"
    assert _top(rankings["default"], 3) == [(WB, n) for n in WRITERS]
    assert len(frame) == DEPTH * HIDDEN and frame["rank"].notna().sum() == (WB + 1) * HIDDEN
    assert (frame.method == "jiang").all() and (frame.detect_block == WB).all()
    reader = _row(rankings["default"], RB, READER)
    assert np.isnan(reader["rank"]) and reader["score"] > 3 * _row(rankings["default"], WB,
                                                                   WRITERS[0])["score"]
    assert _row(rankings["default"], DB, DENSE)["score"] == 0  # dense: fails the test everywhere
    assert db.sql("SELECT count(*) FROM neurons").column(0)[0].as_py() == DEPTH * HIDDEN
    assert (path / "analysis" / "neurons_planted.png").stat().st_size > 0
    acts = db.image_array("planted", "mlp_acts", [0])  # raw activations, on request only
    assert acts.shape == (1, DEPTH, HIDDEN, NP) and acts.dtype == np.float16


def test_detection_block_is_where_the_outlier_norms_first_appear(lake):
    """The default detection block is the `emergence` view's block (its rule is tested on planted
    blocks tables in tests/test_cards.py)."""
    path, _, rankings = lake
    db = open_lake(path)
    assert detection_block(db, "planted") == WB
    with pytest.raises(ValueError, match="no outlier patch token or no per-block norms"):
        detection_block(db, "clean")  # no blocks table
    meta = rankings["default"][1]
    medians = np.array(meta["median_norm_at_final_outliers"])
    assert medians.shape == (DEPTH,) and (medians[:WB] <= meta["threshold"]).all()
    assert medians[WB] > meta["threshold"] and meta["detect_block_rule"].startswith("first block")
    # the medians are those of the blocks table at the run's `outliers` (final outlier patches)
    got = db.sql("SELECT median(b.norm) FROM blocks b JOIN outliers o USING (run, image_id, token) "
                 f"WHERE b.run = 'planted' AND b.block = {WB}").column(0)[0].as_py()
    assert got == pytest.approx(medians[WB], rel=1e-6)


def _stored(db, name, ids):
    return db.image_array("planted", name, ids)


def test_statistics_match_the_raw_activations(lake):
    """The per-image statistics accumulated on the device, against the same run's raw activations
    (fp16) and blocks table, computed here independently."""
    path, _, _ = lake
    db = open_lake(path)
    ids = db.sql("SELECT image_id FROM images WHERE run = 'planted' ORDER BY image_id").column(0)
    ids = ids.to_numpy()
    a = _stored(db, "mlp_acts", ids).astype(np.float64)  # [N, L, H, Np]
    norms = db.sql("SELECT norm FROM blocks WHERE run = 'planted' AND token >= 1 "
                   "ORDER BY image_id, block, token").column(0).to_numpy()
    thr = db.manifest("planted")["config"]["threshold"]
    mask = norms.reshape(len(ids), DEPTH, NP).astype(np.float64) > thr  # [N, Ld, Np]
    count = mask.sum(-1)
    np.testing.assert_array_equal(_stored(db, "mlp_n_outlier", ids), count)
    per_image = db.sql("SELECT image_id, count(*) AS n FROM outliers WHERE run = 'planted' "
                       "GROUP BY image_id").to_pandas().set_index("image_id").n
    np.testing.assert_array_equal(count[:, -1], per_image.reindex(ids, fill_value=0).to_numpy())
    absa = np.abs(a)
    mean = np.einsum("ndp,nlhp->ndlh", mask, absa) / np.maximum(count, 1)[:, :, None, None]
    np.testing.assert_allclose(_stored(db, "mlp_abs_outlier", ids), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(_stored(db, "mlp_abs_sum", ids), absa.sum(-1), rtol=1e-3, atol=1e-4)
    scale = 1e-3 * absa.sum(-1) + 1e-4  # signed sums: fp16 rounding of each term
    assert (np.abs(_stored(db, "mlp_sum", ids) - a.sum(-1)) <= scale).all()
    final = np.einsum("np,nlhp->nlh", mask[:, -1], a)
    assert (np.abs(_stored(db, "mlp_sum_final", ids) - final) <= scale).all()
    below = (a < 0.5).sum(-1)
    near = (np.abs(a - 0.5) <= FP16_NEAR_HALF).sum(-1)  # where fp16 rounding can cross 0.5
    assert (np.abs(_stored(db, "mlp_n_below", ids) - below) <= near).all()
    assert (mean[:, WB, WB, list(WRITERS)] > 1).any()  # not vacuous: the writers are in there


def _their_scores(acts: np.ndarray, norms: np.ndarray, thr: float, detect: int) -> np.ndarray:
    """find_register_neurons (shared/algorithms.py, apply_sparsity_filter=True) written out on our
    arrays, one image at a time: acts [N, L, H, Np], norms [N, L, Np] -> scores [L, H]."""
    scores = []
    for a, n in zip(acts, norms):
        register_locations = np.flatnonzero(n[detect] > thr)
        if len(register_locations) == 0:
            continue
        image = np.zeros(a.shape[:2])
        for layer in range(a.shape[0]):
            act_layer = a[layer].T  # [seq_len, num_neurons]
            register_values = np.abs(act_layer[register_locations])
            sparse = (act_layer < 0.5).sum(0) >= 0.5 * act_layer.shape[0]
            if not sparse.any():
                continue
            image[layer] = register_values.mean(0) * sparse
        scores.append(image)
    return np.mean(scores, 0)


def test_default_ranking_is_their_algorithm(lake):
    path, _, rankings = lake
    db = open_lake(path)
    ids = db.sql("SELECT image_id FROM images WHERE run = 'planted' ORDER BY image_id").column(0)
    ids = ids.to_numpy()
    acts = _stored(db, "mlp_acts", ids).astype(np.float64)
    norms = db.sql("SELECT norm FROM blocks WHERE run = 'planted' AND token >= 1 "
                   "ORDER BY image_id, block, token").column(0).to_numpy().reshape(len(ids),
                                                                                    DEPTH, NP)
    theirs = _their_scores(acts, norms, db.manifest("planted")["config"]["threshold"], WB)
    frame = rankings["default"][0].sort_values(["block", "neuron"])
    ours = frame.score.to_numpy().reshape(DEPTH, HIDDEN)
    # the raw activations are fp16: a value within its rounding of 0.5 can flip a sparsity flag
    exact = ~(np.abs(acts - 0.5) <= FP16_NEAR_HALF).any((0, 3))  # [L, H]
    assert exact.mean() > 0.95
    np.testing.assert_allclose(ours[exact], theirs[exact], rtol=2e-3, atol=1e-3)
    order = np.argsort(-theirs.ravel(), kind="stable")  # theirs, then filter_layers(highest)
    kept = [(b, n) for b, n in zip(*np.unravel_index(order, theirs.shape)) if b <= WB]
    assert _top(rankings["default"], 3) == kept[:3]


def test_moving_the_writers_brings_the_norms_back(lake):
    path, _, _ = lake
    db = open_lake(path)
    clean, moved = _patch_norms(db, "clean"), _patch_norms(db, "tt3-b16")
    assert moved.max() < 1.5 * clean.max()  # back in the normal range
    # the outlier's magnitude now sits on the extra token
    reg = db.sql("SELECT max(norm) FROM tokens WHERE run = 'tt3-b16' AND kind = 'ttreg'").column(0)
    assert reg[0].as_py() > 10 * clean.max()
    cfg = db.manifest("tt3-b16")["config"]["test_time_registers"]
    assert cfg["source_run"] == "planted" and cfg["k"] == 3
    assert cfg["neurons"] == [[WB, n] for n in WRITERS]
    assert (cfg["ranking"]["method"], cfg["ranking"]["detect_block"]) == ("jiang", WB)


def test_contrast_or_no_layer_limit_picks_the_reader_and_leaves_the_outliers(lake):
    """The failure the layer limit fixes: a neuron after the outliers appear only reads them."""
    path, _, rankings = lake
    assert _top(rankings["contrast"], 1) == [(RB, READER)]
    assert _top(rankings["no-limit"], 1) == [(RB, READER)]
    assert rankings["contrast"][1]["detect_block"] == DEPTH - 1
    assert rankings["contrast"][1]["highest_block"] == DEPTH - 1
    assert rankings["no-limit"][1]["highest_block"] == DEPTH - 1
    db = open_lake(path)
    cfg = db.manifest("tt-contrast")["config"]["test_time_registers"]
    assert [RB, READER] in cfg["neurons"] and cfg["ranking"]["method"] == "contrast"
    assert _patch_norms(db, "tt-contrast").max() > 3 * _patch_norms(db, "clean").max()


def test_sparsity_filter_is_what_keeps_the_dense_neuron_out(lake):
    _, _, rankings = lake
    assert _top(rankings["no-filter"], 1) == [(DB, DENSE)]
    assert not rankings["no-filter"][1]["sparsity_filter"]
    assert _row(rankings["default"], DB, DENSE)["sparse_share"] == 0
    assert _row(rankings["default"], WB, WRITERS[0])["sparse_share"] > 0


def test_extra_token_is_a_prefix_and_patches_keep_their_positions(lake):
    path, _, _ = lake
    db = open_lake(path)
    q = "SELECT token, kind, \"row\", col FROM tokens WHERE run = '{}' AND image_id = 0 ORDER BY token"
    tt = db.sql(q.format("tt3-b16")).to_pylist()
    plain = db.sql(q.format("planted")).to_pylist()
    assert [r["kind"] for r in tt[:3]] == ["cls", "ttreg", "patch"] and len(tt) == len(plain) + 1
    assert tt[1]["row"] is None and tt[1]["col"] is None
    assert [(r["row"], r["col"]) for r in tt[2:]] == [(r["row"], r["col"]) for r in plain[1:]]
    n = db.sql("SELECT n_tokens FROM images WHERE run = 'tt3-b16' LIMIT 1").column(0)[0].as_py()
    assert n == 18
    # K = 0: the zero token without a position embedding; patches change only through attention
    got = db.sql("SELECT t.norm AS a, p.norm AS b FROM tokens t JOIN tokens p USING (image_id, "
                 "\"row\", col) WHERE t.run = 'tt0' AND p.run = 'planted' AND t.kind = 'patch' "
                 "AND p.kind = 'patch'").to_pandas()
    assert len(got) == N_IMAGES * 16
    np.testing.assert_allclose(got.a, got.b, rtol=1e-3)


def test_batch_size_1_and_16_give_the_same_tokens(lake):
    path, _, _ = lake
    db = open_lake(path)
    q = "SELECT norm, attn, slot FROM tokens WHERE run = '{}' ORDER BY image_id, token"
    a, b = db.sql(q.format("tt3-b1")).to_pandas(), db.sql(q.format("tt3-b16")).to_pandas()
    np.testing.assert_allclose(a.norm, b.norm, rtol=1e-5)
    np.testing.assert_allclose(a.attn, b.attn, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db.gather("tt3-b1", a.slot.to_numpy()).astype(np.float32),
                               db.gather("tt3-b16", b.slot.to_numpy()).astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_hooks_are_batch_independent_and_close_restores_the_model():
    torch.manual_seed(0)
    model = create_backbone(resolve_model("dinov2_s_reg4"), weights=resolve_weights("random"),
                            img_size=56)
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        before = model.forward_features(x)
        adapter = make_adapter(model, img_size=56, ttreg=[(2, 5), (2, 9), (7, 100)])
        assert model.num_prefix_tokens == 6 and adapter.layout.n_prefix == 6
        assert adapter.layout.n_reg == 4 and adapter.layout.n_ttreg == 1
        full = adapter(x)
        single = [adapter(x[i:i + 1]) for i in range(5)]
        adapter.close()
        after = model.forward_features(x)
    for key in ("tokens", "norm", "attn", "registers_post", "cls_post"):
        torch.testing.assert_close(torch.cat([s[key] for s in single]), full[key])
    assert full["registers_post"].shape == (5, 4, 384)  # trained registers only, not the ttreg
    assert model.num_prefix_tokens == 5 and "_pos_embed" not in vars(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_moved_activation_is_the_patch_max_and_patches_are_zeroed():
    torch.manual_seed(0)
    model = create_backbone(resolve_model("dinov2_s"), weights=resolve_weights("random"), img_size=56)
    x = torch.randn(3, 3, 56, 56)
    seen = {}
    fc2 = model.blocks[4].mlp.fc2
    orig = {}
    h0 = fc2.register_forward_pre_hook(lambda _m, a: orig.setdefault("h", a[0].clone()))
    ttr = TTRegister(model, [(4, 11)])
    h1 = fc2.register_forward_pre_hook(lambda _m, a: seen.setdefault("h", a[0]))
    with torch.no_grad():
        model.forward_features(x)
    for h in (h0, h1):
        h.remove()
    ttr.close()
    got, src = seen["h"], orig["h"]  # [B, 1 + 1 + 16, H]
    assert got.shape[1] == 18
    torch.testing.assert_close(got[:, 1, 11], src[:, 2:, 11].amax(1))  # per image max over patches
    assert not got[:, 2:, 11].any()
    torch.testing.assert_close(got[:, :, 12], src[:, :, 12])  # other neurons untouched
    torch.testing.assert_close(got[:, 0, 11], src[:, 0, 11])  # CLS untouched


def test_no_option_run_is_plain_forward_intermediates(lake):
    """The plain run's stored embeddings are the fp16 of timm's own forward_intermediates."""
    path, _, _ = lake
    db = open_lake(path)
    cfg = db.manifest("clean")["config"]
    assert "record_mlp" not in cfg and "test_time_registers" not in cfg
    assert "mlp_acts" not in db.layout("clean").arrays
    model = create_backbone(resolve_model("dinov2_s"), weights=resolve_weights("random"), img_size=56)
    x = _inputs(db, "clean")
    with torch.no_grad():
        spatial, prefix = model.forward_intermediates(x, indices=[11], norm=False,
                                                      intermediates_only=True,
                                                      return_prefix_tokens=True)[0]
    ref = torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], 1).reshape(-1, 384)
    t = db.sql("SELECT slot, norm FROM tokens WHERE run = 'clean' ORDER BY image_id, token").to_pandas()
    np.testing.assert_array_equal(db.gather("clean", t.slot.to_numpy()), ref.half().numpy())
    np.testing.assert_allclose(t.norm, ref.norm(dim=-1).numpy(), rtol=1e-6)


def test_requests_that_cannot_work_are_refused(lake, capsys):
    path, weights, _ = lake
    assert parse_ttreg("a:b:3") == ("a:b", 3)
    with pytest.raises(ValueError, match="RUN:K"):
        parse_ttreg("planted")

    def refused(code: int, why: str) -> None:
        assert code == 2 and why in capsys.readouterr().err

    # neurons of another network; a run without a ranking; more neurons than candidates
    refused(_extract(path, "random", "x1", "--test-time-registers", "planted:1"), "other weights")
    refused(_extract(path, weights, "x2", "--test-time-registers", "tt0:1"), "no neuron ranking")
    refused(_extract(path, weights, "x3", "--test-time-registers", "planted:9300"),
            f"ranks {(WB + 1) * HIDDEN} neurons")
    # statistics need a threshold; raw activations need the statistics; families that have them
    refused(_extract(path, weights, "x4", "--record-mlp"), "--record-mlp needs --outlier-ref")
    refused(_extract(path, weights, "x5", "--mlp-acts"), "--mlp-acts goes with --record-mlp")
    refused(main(["extract", "--lake", str(path), "--model", "pvt_b0", "--subset", "tiny",
                  "--weights", "random", "--record-mlp", "--outlier-ref", "clean",
                  "--decode-workers", "0", "--quiet"]), "--record-mlp: not implemented for the pvt")
    neurons = ["neurons", "--lake", str(path), "--run"]
    refused(main([*neurons, "clean"]), "no register-neuron statistics")
    refused(main([*neurons, "planted", "--detect-block", "12"]), "outside this model's blocks")
    refused(main([*neurons, "planted", "--method", "contrast", "--detect-block", "3"]),
            "no --detect-block")


def test_schema_v1_lake_stays_readable_and_v4_is_refused(lake, tmp_path):
    import shutil

    path, _, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(path / "subsets", copy / "subsets")
    shutil.copytree(path / "runs" / "clean", copy / "runs" / "clean")
    man = copy / "runs" / "clean" / "manifest.json"
    m = json.loads(man.read_text())
    assert m["schema_version"] == 3
    man.write_text(json.dumps({**m, "schema_version": 1}))
    db = open_lake(copy)
    assert db.sql("SELECT count(*) FROM tokens").column(0)[0].as_py() == N_IMAGES * 17
    man.write_text(json.dumps({**m, "schema_version": 4}))
    with pytest.raises(LakeError, match="schema_version 4"):  # where a query reaches the run
        open_lake(copy).sql("SELECT count(*) FROM tokens")


def test_a_v2_ranking_file_reads_with_null_v3_columns(lake, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    path, _, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(path / "subsets", copy / "subsets")
    shutil.copytree(path / "runs" / "clean", copy / "runs" / "clean")
    shutil.copytree(path / "neurons", copy / "neurons")  # planted's v3 ranking
    v2 = pa.table({"run": ["clean"], "rank": pa.array([1], pa.int32()),
                   "block": pa.array([3], pa.int16()), "neuron": pa.array([7], pa.int32()),
                   "score": [2.5], "mean_outlier": [3.0], "mean_normal": [0.5],
                   "outlier_share": [0.9], "n_outlier": [4], "n_normal": [100]})
    pq.write_table(v2, copy / "neurons" / "clean.parquet")
    got = open_lake(copy).sql("SELECT run, method, score, sparse_share FROM neurons "
                              "WHERE rank = 1 ORDER BY run").to_pylist()
    assert got[0] == {"run": "clean", "method": None, "score": 2.5, "sparse_share": None}
    assert got[1]["run"] == "planted" and got[1]["method"] == "jiang"


def test_report_compares_register_runs_and_shows_the_k0_change(lake, tmp_path):
    path, _, _ = lake
    res = analyze.report(path, out=tmp_path / "report")
    reg = res["results"]["registers"]
    rows = {r["run"]: r for r in reg["rows"]}
    assert rows["planted"]["registers"] == "none" and rows["tt0"]["registers"] == "test-time"
    assert rows["tt0"]["k"] == 0 and rows["tt0"]["base_run"] == "planted"
    k0 = rows["tt0"]["mean_rel_l2"]
    assert k0 is not None and 0 <= k0 < 0.05  # the zero token alone barely moves the patches
    assert rows["tt3-b16"]["mean_rel_l2"] > 0.1  # the outlier patches change completely
    assert rows["tt3-b16"]["above_base"] < rows["planted"]["outliers_own"]
    assert any("trained registers (dinov2_s_reg4)" in m for m in reg["missing"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Registers — none vs trained vs test-time" in html and "Missing runs" in html

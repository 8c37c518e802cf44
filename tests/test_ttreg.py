"""Register neurons found from the lake (--record-mlp, `tokenlake neurons`) and test-time registers
(--test-time-registers RUN:K), on a random-weight DINOv2-S with one planted register neuron."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlake import analyze
from tokenlake.cli.main import main
from tokenlake.extract import create_backbone, make_adapter, resolve_model, resolve_weights
from tokenlake.extract._preprocess import DataConfig, normalise
from tokenlake.extract._ttreg import TTRegister, parse_ttreg
from tokenlake.store import LakeError, open_lake

REPO = Path(__file__).resolve().parents[1]
BLOCK, NEURON = 8, 77  # the planted register neuron (12 blocks x 1536 neurons)
N_IMAGES = 20
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


def _plant(model, x: torch.Tensor, clean_max: float) -> None:
    """Make neuron NEURON of block BLOCK a register neuron: its fc1 row reads the first principal
    direction of the MLP input over these images' patches and fires on ~15 % of them; its fc2
    column writes a vector 30x the largest clean patch norm into the residual stream."""
    seen = {}
    mlp = model.blocks[BLOCK].mlp
    handle = mlp.fc1.register_forward_pre_hook(lambda _m, a: seen.setdefault("in", a[0]))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    z = seen["in"][:, 1:].reshape(-1, model.embed_dim)
    w = torch.linalg.svd(z - z.mean(0), full_matrices=False).Vh[0]
    proj = z @ w
    if proj.max() - proj.quantile(0.85) < proj.quantile(0.15) - proj.min():
        w, proj = -w, -proj
    beta = proj.quantile(0.85)
    gain = 10 / (proj.max() - beta)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(model.embed_dim, generator=g)
    with torch.no_grad():
        mlp.fc1.weight[NEURON] = gain * w
        mlp.fc1.bias[NEURON] = -gain * beta
        mlp.fc2.weight[:, NEURON] = v / v.norm() * 30 * clean_max / model.blocks[BLOCK].ls2.gamma


def _patch_norms(db, run) -> np.ndarray:
    return db.sql(f"SELECT norm FROM tokens WHERE run = '{run}' AND kind = 'patch'").column(0).to_numpy()


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        # smooth background with a few bright/dark blobs: patches differ from each other
        base = rng.integers(60, 200, (1, 1, 3)) + rng.normal(0, 25, (56, 56, 3))
        for _ in range(3):
            r, c = rng.integers(0, 42, 2)
            base[r:r + 14, c:c + 14] = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    assert _extract(path, "random", "clean") == 0
    db = open_lake(path)
    x = _inputs(db, "clean")
    model = create_backbone(resolve_model("dinov2_s"), weights=resolve_weights("random"), img_size=56)
    _plant(model, x, float(_patch_norms(db, "clean").max()))
    weights = tmp_path_factory.mktemp("w") / "planted.pth"
    torch.save(model.state_dict(), weights)
    assert _extract(path, weights, "planted", "--record-mlp") == 0
    assert main(["neurons", "--lake", str(path), "--run", "planted", "--top", "5"]) == 0
    assert _extract(path, weights, "tt1-b16", "--test-time-registers", "planted:1", batch=16) == 0
    assert _extract(path, weights, "tt1-b1", "--test-time-registers", "planted:1", batch=1) == 0
    assert _extract(path, weights, "tt0", "--test-time-registers", "planted:0", batch=16) == 0
    return path, weights


def test_planted_neuron_makes_outliers_and_is_ranked_first(lake):
    path, _ = lake
    db = open_lake(path)
    clean, planted = _patch_norms(db, "clean"), _patch_norms(db, "planted")
    assert planted.max() > 10 * clean.max()  # the plant works: huge outliers
    top = db.sql("SELECT rank, block, neuron, score, outlier_share FROM neurons "
                 "WHERE run = 'planted' ORDER BY rank LIMIT 2").to_pylist()
    assert (top[0]["rank"], top[0]["block"], top[0]["neuron"]) == (1, BLOCK, NEURON)
    assert top[0]["score"] > 3 * top[1]["score"] and top[0]["outlier_share"] > 0.3
    assert db.sql("SELECT count(*) FROM neurons").column(0)[0].as_py() == 12 * 1536
    assert (path / "analysis" / "neurons_planted.png").stat().st_size > 0
    # what the ranking was computed from: the fc2 input at every patch token
    acts = db.image_array("planted", "mlp_acts", [0])
    assert acts.shape == (1, 12, 1536, 16) and acts.dtype == np.float16


def test_test_time_register_removes_the_planted_outliers(lake):
    path, _ = lake
    db = open_lake(path)
    clean, moved = _patch_norms(db, "clean"), _patch_norms(db, "tt1-b16")
    assert moved.max() < 1.5 * clean.max()  # back in the normal range
    # the outlier's magnitude now sits on the extra token
    reg = db.sql("SELECT max(norm) FROM tokens WHERE run = 'tt1-b16' AND kind = 'ttreg'").column(0)
    assert reg[0].as_py() > 10 * clean.max()
    cfg = db.manifest("tt1-b16")["config"]["test_time_registers"]
    assert cfg["source_run"] == "planted" and cfg["k"] == 1 and cfg["neurons"] == [[BLOCK, NEURON]]


def test_extra_token_is_a_prefix_and_patches_keep_their_positions(lake):
    path, _ = lake
    db = open_lake(path)
    q = "SELECT token, kind, \"row\", col FROM tokens WHERE run = '{}' AND image_id = 0 ORDER BY token"
    tt = db.sql(q.format("tt1-b16")).to_pylist()
    plain = db.sql(q.format("planted")).to_pylist()
    assert [r["kind"] for r in tt[:3]] == ["cls", "ttreg", "patch"] and len(tt) == len(plain) + 1
    assert tt[1]["row"] is None and tt[1]["col"] is None
    assert [(r["row"], r["col"]) for r in tt[2:]] == [(r["row"], r["col"]) for r in plain[1:]]
    n = db.sql("SELECT n_tokens FROM images WHERE run = 'tt1-b16' LIMIT 1").column(0)[0].as_py()
    assert n == 18
    # K = 0: the zero token without a position embedding; patches change only through attention
    got = db.sql("SELECT t.norm AS a, p.norm AS b FROM tokens t JOIN tokens p USING (image_id, "
                 "\"row\", col) WHERE t.run = 'tt0' AND p.run = 'planted' AND t.kind = 'patch' "
                 "AND p.kind = 'patch'").to_pandas()
    assert len(got) == N_IMAGES * 16
    np.testing.assert_allclose(got.a, got.b, rtol=1e-3)


def test_batch_size_1_and_16_give_the_same_tokens(lake):
    path, _ = lake
    db = open_lake(path)
    q = "SELECT norm, attn, slot FROM tokens WHERE run = '{}' ORDER BY image_id, token"
    a, b = db.sql(q.format("tt1-b1")).to_pandas(), db.sql(q.format("tt1-b16")).to_pandas()
    np.testing.assert_allclose(a.norm, b.norm, rtol=1e-5)
    np.testing.assert_allclose(a.attn, b.attn, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db.gather("tt1-b1", a.slot.to_numpy()).astype(np.float32),
                               db.gather("tt1-b16", b.slot.to_numpy()).astype(np.float32),
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


def _head_adapters():
    """extract/_adapters.py as committed (git HEAD), loaded as a separate module."""
    try:
        text = subprocess.run(["git", "show", "HEAD:extract/_adapters.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git checkout: cannot load the committed adapter")
    name = "tokenlake_head_adapters"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(text, "HEAD:extract/_adapters.py", "exec"), module.__dict__)  # noqa: S102
    return module


@pytest.mark.parametrize("alias", ["dinov2_s_reg4", "deit3_s"])
def test_no_option_is_bit_for_bit_the_committed_adapter(alias):
    head = _head_adapters()
    px = 56 if "dinov2" in alias else 64
    model = create_backbone(resolve_model(alias), weights=resolve_weights("random"), img_size=px)
    x = torch.randn(3, 3, px, px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        new = make_adapter(model, img_size=px, blocks=True)
        assert len(new.hooks.handles) == 3 + 12 and new.ttreg is None
        assert "_pos_embed" not in vars(model)
        got = new(x)
        new.close()
        old = head.make_adapter(model, img_size=px, blocks=True)
        ref = old(x)
        old.close()
    assert set(got) == set(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert new.layout.n_prefix == old.layout.n_prefix and new.layout.n_ttreg == 0


def test_no_option_run_is_plain_forward_intermediates(lake):
    """The plain run's stored embeddings are the fp16 of timm's own forward_intermediates."""
    path, _ = lake
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


def test_requests_that_cannot_work_are_refused(lake, tmp_path):
    path, weights = lake
    assert parse_ttreg("a:b:3") == ("a:b", 3)
    with pytest.raises(ValueError, match="RUN:K"):
        parse_ttreg("planted")
    # neurons of another network; a run without a ranking; a hierarchical model
    assert _extract(path, "random", "x1", "--test-time-registers", "planted:1") == 2
    assert _extract(path, weights, "x2", "--test-time-registers", "tt0:1") == 2
    assert main(["extract", "--lake", str(path), "--model", "pvt_b0", "--subset", "tiny",
                 "--weights", "random", "--record-mlp", "--decode-workers", "0", "--quiet"]) == 2
    assert main(["neurons", "--lake", str(path), "--run", "clean"]) == 2  # no --record-mlp


def test_schema_v1_lake_stays_readable_and_v3_is_refused(lake, tmp_path):
    import shutil

    path, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(path / "subsets", copy / "subsets")
    shutil.copytree(path / "runs" / "clean", copy / "runs" / "clean")
    man = copy / "runs" / "clean" / "manifest.json"
    m = json.loads(man.read_text())
    assert m["schema_version"] == 2
    man.write_text(json.dumps({**m, "schema_version": 1}))
    db = open_lake(copy)
    assert db.sql("SELECT count(*) FROM tokens").column(0)[0].as_py() == N_IMAGES * 17
    man.write_text(json.dumps({**m, "schema_version": 3}))
    with pytest.raises(LakeError, match="schema_version 3"):
        open_lake(copy).sql("SELECT 1")


def test_report_compares_register_runs_and_shows_the_k0_change(lake, tmp_path):
    path, _ = lake
    res = analyze.report(path, out=tmp_path / "report")
    reg = res["results"]["registers"]
    rows = {r["run"]: r for r in reg["rows"]}
    assert rows["planted"]["registers"] == "none" and rows["tt0"]["registers"] == "test-time"
    assert rows["tt0"]["k"] == 0 and rows["tt0"]["base_run"] == "planted"
    k0 = rows["tt0"]["mean_rel_l2"]
    assert k0 is not None and 0 <= k0 < 0.05  # the zero token alone barely moves the patches
    assert rows["tt1-b16"]["mean_rel_l2"] > 0.1  # the outlier patches change completely
    assert rows["tt1-b16"]["above_base"] < rows["planted"]["outliers_own"]
    assert any("trained registers (dinov2_s_reg4)" in m for m in reg["missing"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Registers — none vs trained vs test-time" in html and "Missing runs" in html

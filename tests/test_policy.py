"""The sample policy's draw: what it keeps, that it is uniform, and that batching cannot change it."""

import numpy as np

from tokenlake.extract._policy import TokenPolicy

POLICY = TokenPolicy("sample", threshold=10.0, normals_per_image=4, seed=7)


def _norms(n_images: int, n_tokens: int = 1 + 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 9, (n_images, n_tokens)).astype(np.float32)


def test_keeps_every_prefix_and_outlier_token_and_k_normals():
    norm = _norms(50)
    norm[:, 5] = 50.0  # an outlier patch in every image
    norm[3, 1:] = 20.0  # image 3: all patches are outliers, so no normal can be drawn
    mask = POLICY.mask(norm, n_prefix=1, image_ids=np.arange(50))
    assert mask[:, 0].all() and mask[:, 5].all()
    normals = mask[:, 1:] & (norm[:, 1:] <= POLICY.threshold)
    assert (np.delete(normals.sum(1), 3) == 4).all()
    assert mask[3].all()


def test_fewer_normals_than_k_keeps_them_all():
    norm = np.full((1, 1 + 16), 50.0, np.float32)
    norm[0, [2, 9]] = 1.0
    mask = POLICY.mask(norm, n_prefix=1, image_ids=np.array([11]))
    assert mask.all()


def test_draw_is_uniform_over_normal_patches():
    norm = _norms(8000)
    mask = POLICY.mask(norm, n_prefix=1, image_ids=np.arange(8000))
    share = mask[:, 1:].mean(0)  # each of 16 patches is drawn 4 times in 16
    assert np.abs(share - 0.25).max() < 0.03, share


def test_draw_depends_on_image_id_and_seed_not_on_batching():
    norm = _norms(64, seed=3)
    ids = np.arange(1000, 1064)
    whole = POLICY.mask(norm, n_prefix=1, image_ids=ids)
    parts = np.concatenate([POLICY.mask(norm[i:i + 5], n_prefix=1, image_ids=ids[i:i + 5])
                            for i in range(0, 64, 5)])
    np.testing.assert_array_equal(whole, parts)
    other_seed = TokenPolicy("sample", threshold=10.0, normals_per_image=4, seed=8)
    assert (other_seed.mask(norm, n_prefix=1, image_ids=ids) != whole).any()
    assert (POLICY.mask(norm, n_prefix=1, image_ids=ids + 1) != whole).any()

"""The synthetic benchmark (synthetic/): each forgery family leaves the artifact it claims (checked with pixel
masks, a Laplacian and an FFT), self-blends follow SBI's recipe (masks against a brute-force
convex hull, blend ratios, pairs), generation is deterministic, and the protocols' splits are
disjoint, hold out what they say and share what they say."""
import numpy as np
import pytest
import torch

import data
from synthetic import faces, forgeries

SIZE = 96  # small frames keep the whole file fast


def _face(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    ident, scene = faces.random_identity(rng), faces.random_scene(rng)
    return faces.render_face(ident, scene, scene.pose, size), scene, rng


def _laplacian_energy(gray, region):  # 4-neighbour Laplacian, written out
    lap = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float((lap[region[1:-1, 1:-1]] ** 2).mean())


# ----------------------------------------------------------------------------- forgery families

@pytest.mark.parametrize("seed", range(6))
def test_self_blend_differs_from_its_real_only_inside_the_mask_at_an_sbi_ratio(seed):
    face, _, _ = _face(seed)
    sb = forgeries.self_blend(face, np.random.default_rng(seed), strength=1.0)
    outside, inside = sb.mask == 0, sb.mask > 0.2
    assert outside.mean() > 0.3 and inside.any()
    np.testing.assert_array_equal(sb.fake[outside], sb.real[outside])  # bit for bit
    assert np.abs(sb.fake - sb.real)[inside].mean() > 1e-3
    assert min(abs(sb.mask.max() - r) for r in (.25, .5, .75, 1)) < 1e-5  # the mask peaks at the blend ratio


def test_hull_mask_is_the_convex_hull_of_its_points():
    """Against a brute-force test: a pixel centre is inside the hull iff it lies on the inner side
    of every edge of scipy's hull (away from the edges; the polygon fill rounds there)."""
    from scipy.spatial import ConvexHull
    rng = np.random.default_rng(0)
    pts = rng.uniform(10, 54, (12, 2))
    mask = forgeries.hull_mask(pts, 64)
    hull = pts[ConvexHull(pts).vertices]  # counter-clockwise
    edges = np.roll(hull, -1, 0) - hull
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    rel = np.stack([xx, yy], -1)[:, :, None, :] - hull  # (H, W, vertices, 2)
    cross = edges[:, 0] * rel[..., 1] - edges[:, 1] * rel[..., 0]  # (H, W, vertices), > 0 inside
    dist = cross / np.linalg.norm(edges, axis=1)
    inside, outside = (dist > 1).all(-1), (dist < -1).any(-1)
    assert inside.sum() > 300
    assert (mask[inside] == 1).all() and (mask[outside] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_sbi_mask_is_a_soft_hull_whose_maximum_is_one(seed):
    face, _, _ = _face(seed)
    m = forgeries.sbi_mask(face, np.random.default_rng(seed))
    assert m.dtype == np.float32 and m.min() >= 0 and abs(m.max() - 1) < 1e-6
    assert ((m > 0) & (m < 1)).mean() > 0.01  # a blurred ramp, not a hard edge


def test_feather_scale_is_one_at_the_old_mean_and_halves_every_three_quarters():
    assert forgeries.feather_scale(.75) == 1 and forgeries.feather_scale(1.5) == .5
    assert forgeries.feather_scale(4.5) == 2 ** -5


@pytest.mark.parametrize("seed", range(4))
def test_faceswap_changes_colour_statistics_inside_the_mask(seed):
    face, scene, rng = _face(seed)
    donor = faces.render_face(faces.random_identity(rng), scene, face.pose, SIZE).image
    fake, mask = forgeries.forge_faceswap(face, donor, np.random.default_rng(seed), strength=1.0)
    np.testing.assert_array_equal(fake[mask == 0], face.image[mask == 0])
    inside = mask > 0.9
    assert np.abs(fake[inside].mean(0) - face.image[inside].mean(0)).max() > 0.02  # mean colour moved


@pytest.mark.parametrize("seed", range(4))
def test_partial_resynthesis_has_less_high_frequency_energy_in_its_region(seed):
    face, _, _ = _face(seed)
    fake, mask = forgeries.forge_partial(face, face.image, np.random.default_rng(seed), strength=1.0)
    region = mask > 0.99
    assert region.sum() > 50
    assert _laplacian_energy(fake.mean(-1), region) < 0.3 * _laplacian_energy(face.image.mean(-1), region)
    np.testing.assert_array_equal(fake[mask == 0], face.image[mask == 0])


def test_upsample_adds_a_spectral_peak_at_nyquist():
    window = np.outer(np.hanning(SIZE), np.hanning(SIZE))  # removes the FFT's wrap-around edges

    def power(img):
        gray = img.mean(-1)
        return np.abs(np.fft.fft2((gray - gray.mean()) * window)) ** 2

    def near(p, k):  # energy around (k, 0) and (0, k): a vertical and a horizontal period N / k
        return p[k - 2:k + 3, :3].sum() + p[k - 2:k + 3, -2:].sum() + p[:3, k - 2:k + 3].sum() + p[-2:, k - 2:k + 3].sum()

    half_nyquist_ratios = []
    for seed in range(8):
        face, _, _ = _face(seed)
        fake, _ = forgeries.forge_upsample(face, np.random.default_rng(seed), strength=1.0)
        p_fake, p_face = power(fake), power(face.image)
        assert near(p_fake, SIZE // 2) > 20 * near(p_face, SIZE // 2)
        half_nyquist_ratios.append(near(p_fake, SIZE // 4) / near(p_face, SIZE // 4))
    assert max(half_nyquist_ratios) > 3  # the two-step decoders also peak at half-Nyquist


# ----------------------------------------------------------------------------- synthetic data set

def _synthetic(**kw):
    args = dict(methods=forgeries.FORGERY_METHODS, num_videos=10, frames_per_video=3, image_size=SIZE, seed=7)
    return forgeries.SyntheticForgeries(**{**args, **kw})


def test_synthetic_same_seed_and_index_give_identical_tensors():
    a, b = _synthetic(), _synthetic()
    for i in (0, 4, 17, 29):
        torch.testing.assert_close(a[i]["image"], b[i]["image"], rtol=0, atol=0)
        torch.testing.assert_close(a[i]["image"], a[i]["image"], rtol=0, atol=0)
    assert not torch.equal(a[0]["image"], a[1]["image"])  # next frame of the same video
    assert not torch.equal(a[0]["image"], a[3]["image"])  # another video
    assert not torch.equal(a[0]["image"], _synthetic(seed=8)[0]["image"])


def test_synthetic_frames_of_a_video_are_close_and_other_videos_are_not():
    ds = _synthetic(methods=["selfblend"], real_fraction=1.0)
    frames = [np.asarray(ds.image(i), dtype=np.float32) for i in range(9)]  # 3 videos x 3 frames
    same = np.mean([np.abs(frames[v * 3] - frames[v * 3 + 1]).mean() for v in range(3)])
    other = np.mean([np.abs(frames[v * 3] - frames[(v + 1) % 3 * 3]).mean() for v in range(3)])
    assert same < 0.5 * other


def test_synthetic_labels_methods_and_video_ids():
    ds = _synthetic(num_videos=12, frames_per_video=2)
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 24 and sum(x["label"] for x in items) == 12  # real_fraction 0.5, exactly
    for x in items:
        assert x["label"] == int(x["method"] != "real")
        assert x["image"].shape == (3, SIZE, SIZE) and x["image"].dtype == torch.float32
    videos = [x["video"] for x in items]
    assert all(videos[2 * v] == videos[2 * v + 1] for v in range(12)) and len(set(videos)) == 12
    fake_methods = [x["method"] for x in items[::2] if x["label"] == 1]
    assert fake_methods == list(forgeries.FORGERY_METHODS) + list(forgeries.FORGERY_METHODS[:2])  # cycles
    assert [x["source"] for x in items[:2]] == ["synthetic:7/0", "synthetic:7/1"]


def test_cross_method_splits_are_disjoint_and_hold_out_methods():
    splits = forgeries.synthetic_splits(protocol="cross_method", image_size=SIZE, seed=3, train_videos=8,
                                        test_videos=6, frames_per_video=2)
    videos = {name: {s.video for s in ds.samples} for name, ds in splits.items()}
    for a in videos:
        for b in videos:
            assert a == b or not videos[a] & videos[b], (a, b)
    methods = {name: {s.method for s in ds.samples} - {"real"} for name, ds in splits.items()}
    assert methods["train"] == methods["val"] == methods["in_domain"] == set(forgeries.TRAIN_METHODS)
    assert methods["cross_method"] == set(forgeries.HELD_OUT_METHODS)
    assert not set(forgeries.TRAIN_METHODS) & set(forgeries.HELD_OUT_METHODS)
    assert not torch.equal(splits["train"][0]["image"], splits["in_domain"][0]["image"])  # other identities


def test_sbi_protocol_trains_on_pairs_and_tests_each_family_against_shared_reals():
    splits = forgeries.synthetic_splits(image_size=SIZE, seed=3, train_videos=3, test_videos=5, frames_per_video=2,
                                        test_real_videos=4)
    train = splits.pop("train")
    assert isinstance(train, forgeries.SelfBlendPairs) and train.group_size == 2 and len(train) == 3 * 2 * 2
    assert [s.label for s in train.samples] == [0, 1] * 6
    assert {s.method for s in splits["val"].samples} == {"real", "selfblend"}
    families = {k: v for k, v in splits.items() if k != "val"}
    assert list(families) == ["selfblend", "faceswap", "partial", "upsample"]
    reals = None
    for name, ds in families.items():
        samples = [ds.dataset.samples[i] for i in ds.indices]
        assert {s.method for s in samples} == {"real", name}
        fake_videos = {s.video for s in samples if s.label}
        real_videos = {s.video for s in samples if not s.label}
        assert len(fake_videos) == 5 and len(real_videos) == 4
        assert reals is None or real_videos == reals  # the same real videos in every family's set
        reals = real_videos
        assert not real_videos & {s.video for s in train.samples}
    ds = families["partial"]
    item = ds[next(j for j, i in enumerate(ds.indices) if ds.dataset.samples[i].label)]
    assert item["method"] == "partial" and item["label"] == 1


def test_self_blend_pairs_share_the_frame_and_differ_only_in_the_blend():
    pairs = forgeries.SelfBlendPairs(num_videos=2, frames_per_video=2, image_size=SIZE, seed=5, strength=4.0)
    changed = []
    for k in range(4):
        real, fake = (np.asarray(pairs.image(2 * k + j), dtype=np.float32) for j in (0, 1))
        diff = np.abs(real - fake).max(-1)
        assert diff.max() > 0
        changed.append((diff > 2).mean())
    assert np.median(changed) > 0.01 and max(changed) < 0.7  # a blended region, not the whole frame
    first = np.asarray(pairs.image(1))
    pairs.set_epoch(1)
    assert not np.array_equal(np.asarray(pairs.image(1)), first)  # a new blend every epoch


def test_self_blend_pairs_give_their_blend_masks_on_request():
    """With masks (ForAda's boundary): the real image's is zero, the self-blend's the mask it was blended through
    (the frames differ where it is on), prerendered to within 1/255, stacked by the collation; not with augment."""
    pairs = forgeries.SelfBlendPairs(num_videos=2, frames_per_video=1, image_size=SIZE, seed=5, masks=True)
    assert "mask" not in forgeries.SelfBlendPairs(num_videos=1, frames_per_video=1, image_size=SIZE, seed=5)[0]
    masks = [pairs[i]["mask"].numpy() for i in range(4)]
    assert not masks[0].any() and not masks[2].any() and masks[1].max() > 0.2 and masks[1].shape == (SIZE, SIZE)
    real, fake = (np.asarray(pairs.image(j), dtype=np.float32) for j in (0, 1))
    changed = np.abs(real - fake).max(-1) > 8  # away from JPEG's faint spread: inside the mask
    assert changed.any() and (masks[1][changed] > 0).mean() > 0.95
    forgeries.prerender([pairs], workers=1)
    np.testing.assert_allclose(pairs[1]["mask"].numpy(), masks[1], atol=0.5 / 255)
    assert data.collate([pairs[0], pairs[1]])["mask"].shape == (2, SIZE, SIZE)
    with pytest.raises(ValueError, match="augment"):
        forgeries.SelfBlendPairs(num_videos=1, frames_per_video=1, image_size=SIZE, seed=5, masks=True,
                                 augment=data.Augment())


def test_prerender_keeps_exactly_the_frames_the_data_sets_draw():
    splits = forgeries.synthetic_splits(image_size=64, seed=2, train_videos=2, test_videos=2, frames_per_video=2)
    direct = {name: [np.asarray(ds.dataset.image(ds.indices[i]) if hasattr(ds, "indices") else ds.image(i))
                     for i in range(len(ds))] for name, ds in splits.items()}
    assert forgeries.prerender(splits.values(), workers=2) == 8 + 4 + (2 + 4 * 2) * 2  # the shared set once
    for name, ds in splits.items():
        for i, want in enumerate(direct[name]):
            got = ds.dataset.image(ds.indices[i]) if hasattr(ds, "indices") else ds.image(i)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_synthetic_default_collate_and_workers_agree_with_direct_indexing():
    ds = _synthetic(num_videos=4, frames_per_video=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0]["label"].tolist() == [ds.samples[i].label for i in range(4)]
    assert batches[1]["video"] == [ds.samples[i].video for i in range(4, 8)]
    torch.testing.assert_close(batches[1]["image"][3], ds[7]["image"], rtol=0, atol=0)


def test_synthetic_augmentation_is_reproducible_and_changes_with_the_epoch():
    ds = _synthetic(augment=data.Augment())
    first = ds[5]["image"]
    torch.testing.assert_close(ds[5]["image"], first, rtol=0, atol=0)
    changed = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        changed.append(not torch.equal(ds[5]["image"], first))
    assert any(changed)
    ds.set_epoch(0)
    torch.testing.assert_close(ds[5]["image"], first, rtol=0, atol=0)


def test_synthetic_rejects_unknown_methods():
    with pytest.raises(ValueError, match="nosuchmethod"):
        _synthetic(methods=["faceswap", "nosuchmethod"])




def test_a_frame_drawn_unforged_is_the_real_frame_under_the_forgery():
    ds = forgeries.SyntheticForgeries(methods=["faceswap"], num_videos=4, frames_per_video=2, image_size=SIZE, seed=4)
    for i, s in enumerate(ds.samples):
        forged, pristine = (np.asarray(ds.image(i, forged=f), dtype=np.float32) for f in (True, False))
        if s.label == 0:
            np.testing.assert_array_equal(forged, pristine)
        else:  # the camera (noise, JPEG) is the same draw: only the swapped region and its JPEG blocks differ
            changed = np.abs(forged - pristine).max(-1) > 12
            assert 0.02 < changed.mean() < 0.6

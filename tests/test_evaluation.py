"""evaluation.py: the metrics against hand computations; test sets that share their frames, run once."""
import contextlib

import numpy as np
import pytest
import torch

import synthetic
from dfdhr import DFDHR, make_config
import evaluation
from evaluation import compute_metrics, evaluate, evaluate_sets
from routing import num_kept


def test_metrics_against_hand_computation():
    probs = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2]
    labels = [0, 0, 1, 1, 1, 0]
    videos = ["r1", "r1", "f1", "f1", "f2", "r2"]
    m = compute_metrics(probs, labels, videos)
    # Frame AUC: of the 9 (fake, real) pairs, the fake scores higher in all but (0.35 vs 0.4).
    assert m["frame_auc"] == pytest.approx(8 / 9)
    # Video AUC over mean probabilities: r1 0.25, r2 0.2, f1 0.575, f2 0.7 -> perfectly ranked.
    assert m["video_auc"] == pytest.approx(1.0) and m["videos"] == 4
    assert m["acc"] == pytest.approx(5 / 6)  # 0.35 is the one fake below 0.5
    # EER: flagging scores >= 0.4 as fake misses one fake of three (0.35) and flags one real of
    # three (0.4): false positive rate = miss rate = 1/3.
    assert m["eer"] == pytest.approx(1 / 3)
    # AP: ranked 0.8 f, 0.7 f, 0.4 r, 0.35 f, 0.2 r, 0.1 r -> precision at the fakes 1, 1, 3/4.
    assert m["ap"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_one_class_test_set_says_so():
    m = compute_metrics([0.2, 0.9], [1, 1], ["a", "b"])
    assert m["frame_auc"] is None and m["video_auc"] is None and "only one class (fake)" in m["note"]
    assert m["acc"] == 0.5


def test_family_test_sets_evaluated_together_score_as_each_alone():
    torch.manual_seed(0)
    model = DFDHR(make_config("small", width=64, heads=1, layers=4, first_routed_layer=2, embed_dim=64,
                              adapter_rank=8, judge_hidden=8, view_size=32, image_size=64))
    sets = synthetic.synthetic_splits(image_size=64, seed=0, train_videos=0, test_videos=3, frames_per_video=1)
    sets = {k: v for k, v in sets.items() if k not in ("train", "val")}
    kw = dict(batch=5, autocast=contextlib.nullcontext, workers=0)
    together = evaluate_sets(model, sets, **kw)
    for name, ds in sets.items():
        alone = evaluate(model, ds, **kw)
        a, b = together[name]["scores"], alone["scores"]  # other batch compositions: float rounding only
        assert a["label"] == b["label"] and a["method"] == b["method"]
        np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-6)
        assert together[name]["exit_layers"] == alone["exit_layers"]
        assert together[name]["video_auc"] == pytest.approx(alone["video_auc"])
        np.testing.assert_allclose(together[name]["gate_weights"]["fake"], alone["gate_weights"]["fake"])


def delong_se(scores, labels):
    """DeLong's standard error of the AUC (DeLong, DeLong & Clarke-Pearson 1988), by its definition:
    the variances of the fakes' and the reals' placement values."""
    fake, real = scores[labels == 1], scores[labels == 0]
    psi = (fake[:, None] > real[None, :]) + 0.5 * (fake[:, None] == real[None, :])  # (fakes, reals)
    return np.sqrt(psi.mean(1).var(ddof=1) / len(fake) + psi.mean(0).var(ddof=1) / len(real))


def test_video_auc_interval_is_a_stratified_bootstrap_as_scipy_draws_it():
    """The interval against scipy.stats.bootstrap resampling real and fake apart (percentile, the
    statistic sklearn's AUC), and against the width of DeLong's normal interval."""
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    fake, real = rng.normal(1.2, 1, 100), rng.normal(0, 1, 100)  # an AUC near 0.8, 100 videos a class
    scores, labels = np.r_[fake, real], np.r_[np.ones(100), np.zeros(100)]
    ours = evaluation.auc_interval(scores, labels)
    ref = bootstrap((fake, real), lambda f, r: roc_auc_score(np.r_[np.ones(len(f)), np.zeros(len(r))], np.r_[f, r]),
                    paired=False, vectorized=False, n_resamples=600, method="percentile", rng=7).confidence_interval
    np.testing.assert_allclose(ours, [ref.low, ref.high], atol=0.015)  # 600 resamples: Monte-Carlo error
    auc = roc_auc_score(labels, scores)
    assert ours[0] < auc < ours[1]
    assert ours[1] - ours[0] == pytest.approx(2 * 1.96 * delong_se(scores, labels), rel=0.15)


def test_compute_metrics_gives_the_video_auc_its_interval():
    rng = np.random.default_rng(2)
    probs, labels = rng.random(40), np.repeat([0, 1], 20)
    videos = [f"v{i // 2}" for i in range(40)]  # two frames a video
    m = compute_metrics(probs, labels, videos)
    per_video = probs.reshape(20, 2).mean(1)
    assert m["video_auc_interval"] == evaluation.auc_interval(per_video, labels[::2])
    assert m["video_auc_interval"][0] <= m["video_auc"] <= m["video_auc_interval"][1]


def test_gate_difference_names_the_expert_that_differs_and_no_other():
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 200)
    gates = rng.dirichlet(np.ones(4) * 50, size=400)  # (frames, E)
    gates[labels == 1, 2] += 0.03  # expert #3 (1-based) weighs more on fakes
    videos = [f"v{i // 4}" for i in range(400)]
    d = evaluation.gate_difference(gates, labels, videos)
    by_video = gates.reshape(100, 4, 4).mean(1)
    point = by_video[50:].mean(0) - by_video[:50].mean(0)
    np.testing.assert_allclose(d["fake_minus_real"], point, atol=1e-5)
    assert d["separating_expert"] == 3
    low, high = np.array(d["interval"])
    assert low[2] > 0 and all(low[e] < 0 < high[e] for e in (0, 1, 3))


def test_forged_patches_and_kept_counts_against_a_loop_over_patches(small):
    rng = np.random.default_rng(4)
    S, g = small.image_size, small.view_size // small.patch_size  # 128 px frames, 8 x 8 patches a view
    changed = np.zeros((S, S), dtype=bool)
    changed[20:70, 30:100] = True  # a block, over several patches of the original and three split images
    forged = evaluation.forged_patches(changed, small)
    for v in range(5):  # the original image's patch is 16 frame pixels a side, a split image's 8
        side, (top, left) = (S // g, (0, 0)) if v == 0 else (S // (2 * g), divmod(v - 1, 2))
        for p in range(g * g):
            r, c = divmod(p, g)
            y, x = top * S // 2 + r * side, left * S // 2 + c * side
            assert forged[v, p] == (changed[y:y + side, x:x + side].mean() >= 0.25)
    kept = np.stack([np.stack([np.sort(rng.choice(g * g + 1, 48, replace=False)) for _ in range(5)])
                     for _ in range(4)])  # (R, V, n̂) token indices, CLS (0) among them
    kept[3, 2] = -1  # that view had exited by the last routed layer
    counts = evaluation.kept_counts(kept, forged)
    for r in range(4):
        for v in range(5):
            patches = set((kept[r, v][kept[r, v] >= 1] - 1).tolist())
            expected = [sum(p in patches for p in range(g * g) if forged[v, p]), forged[v].sum(),
                        sum(p in patches for p in range(g * g) if not forged[v, p]), (~forged[v]).sum()]
            assert counts[r, v].tolist() == (expected if (r, v) != (3, 2) else [0, 0, 0, 0])


def test_token_recall_is_the_shares_written_out_and_none_where_no_view_ran(small):
    """Per routed layer and branch: forged kept / forged seen, other kept / other seen and their ratio,
    summed over frames and views; a layer that every view had left before has no share (not 0)."""
    counts = np.zeros((2, 4, 5, 4), dtype=int)  # (F, R, V, [forged kept, forged, other kept, other])
    counts[0, :, 0] = [3, 4, 30, 60]  # the original image of frame 0, in every routed layer
    counts[1, :2, 0] = [1, 4, 50, 60]  # frame 1's original image left after two routed layers
    counts[:, :3, 1:] = [2, 2, 10, 40]  # the split images ran three routed layers
    tr = evaluation.token_recall(counts, small)
    assert tr["original"]["forged_kept"] == [0.5, 0.5, 0.75, 0.75]  # (3 + 1) / 8, then 3 / 4
    assert tr["original"]["other_kept"] == [round(80 / 120, 4)] * 2 + [0.5, 0.5]
    assert tr["original"]["ratio"] == [round(0.5 / round(80 / 120, 4), 3)] * 2 + [1.5, 1.5]
    assert tr["split"]["forged_kept"] == [1.0, 1.0, 1.0, None] and tr["split"]["ratio"] == [4.0, 4.0, 4.0, None]
    assert tr["chance"] == round(num_kept(small.num_tokens, small.keep_ratio) / small.num_tokens, 4)


def test_changed_is_where_the_frame_differs_from_its_unforged_draw():
    """A synthetic test frame's forged region against the two draws compared directly, prerendered or not."""
    ds = synthetic.SyntheticForgeries(methods=("partial", "faceswap"), num_videos=4, frames_per_video=1,
                                      image_size=64, seed=3)
    for i, s in enumerate(ds.samples):
        diff = np.abs(np.asarray(ds.image(i), dtype=float) - np.asarray(ds.image(i, forged=False), dtype=float))
        assert np.array_equal(ds.changed(i), diff.mean(-1) > synthetic.forgeries.CHANGED)
        assert ds.changed(i).any() == (s.label == 1)
    before = [ds.changed(i) for i in range(len(ds))]
    synthetic.prerender([ds], workers=1)
    assert all(np.array_equal(a, ds.changed(i)) for i, a in enumerate(before))

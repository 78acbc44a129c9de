"""evaluation.py: the metrics against hand computations; test sets that share their frames, run once."""
import contextlib

import numpy as np
import pytest
import torch

import synthetic
from dfdhr import DFDHR, make_config
from evaluation import compute_metrics, evaluate, evaluate_sets


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

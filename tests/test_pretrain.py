"""synthetic/pretrain.py and synthetic/probe.py: the committed backbone is the file its record describes and loads as
the small preset's; a toy pretraining writes weights load_clip reads back exactly; CLIP's loss
and the probe's ridge regression against independent computations."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfdhr import PRESETS, SMALL_BACKBONE
from synthetic import pretrain, probe
from vit import load_clip


def test_committed_backbone_matches_its_record_and_the_small_preset():
    path = Path(SMALL_BACKBONE)
    record = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size == record["bytes"] <= 10 * 2 ** 20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    model, c = load_clip(path), PRESETS["small"]
    assert (model.width, len(model.blocks), model.heads, model.patch_size, model.image_size, model.output_dim) == \
        (c.width, c.layers, c.heads, c.patch_size, c.view_size, c.embed_dim) == \
        (record["width"], record["layers"], record["heads"], record["patch"], record["view"], record["width"])


def test_toy_pretraining_writes_weights_that_load_clip_reads_back(tmp_path):
    out = pretrain.main(["--toy", f"--out={tmp_path / 'toy.pt'}"])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and record["final"]["step"] == 3
    model = load_clip(out)
    assert (model.width, len(model.blocks), model.heads, model.image_size) == (64, 2, 1, 32)
    sd = torch.load(out, weights_only=True)
    assert all(k.startswith("visual.") and v.dtype == torch.float32 for k, v in sd.items())


def test_clip_loss_against_a_loop_over_images_and_captions():
    """Symmetric InfoNCE where views with the same caption are positives of each other."""
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    captions = [[1, 2], [3], [2, 1], [4], [5]]  # 0 and 2 are the same bag of words
    scale = torch.tensor(2.0).log()
    loss, acc = pretrain.clip_loss(img, txt, captions, scale)
    logits = 2.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    same = [[sorted(a) == sorted(b) for b in captions] for a in captions]
    want = 0.0
    for i in range(5):
        pos = [j for j in range(5) if same[i][j]]
        want -= sum(logits[i, j] - torch.logsumexp(logits[i], 0) for j in pos) / len(pos) / 5 / 2
        want -= sum(logits[j, i] - torch.logsumexp(logits[:, i], 0) for j in pos) / len(pos) / 5 / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    hits = [same[i][int(logits[i].argmax())] for i in range(5)]
    assert acc.item() == pytest.approx(np.mean(hits))


def test_views_are_the_detectors_whole_image_and_crops():
    x = torch.randn(2, 3, 16, 16)
    v = pretrain.views(x, 8)
    assert v.shape == (10, 3, 8, 8)
    torch.testing.assert_close(v[2 + 1 * 4 + 3], x[1, :, 8:, 8:])  # sample 1, bottom-right crop
    torch.testing.assert_close(v[0], F.interpolate(x[:1], size=8, mode="bicubic")[0])


def test_region_words_read_the_maps_of_each_quarter():
    S = 8
    maps = dict(sigma=np.zeros((S, S), np.float32), res=np.ones((S, S), np.float32),
                noise=np.full((S, S), .006, np.float32), gain=np.ones((S, S, 3), np.float32))
    maps["sigma"][4:, 4:] = 2.0  # bottom-right: blur level 3 of BLUR_LEVELS
    maps["gain"][:4, 4:] = [1.2, 1.07, 0.88]  # top-right: a warm cast, strong (> .12)
    words = pretrain.region_words(maps, (0, 0, S))
    assert words[:4] == ["r0_blur0", "r0_res0", "r0_noise0", "r0_cast_none"]
    assert "r1_cast_warm2" in words and "r3_blur3" in words and "r2_blur0" in words


def test_probe_ridge_is_sklearns_ridge():
    """The dual form (XXᵀ + λI)⁻¹(y − ½) gives the same predictions as primal ridge."""
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(0)
    X, y, Xt = rng.normal(size=(30, 50)), rng.integers(0, 2, 30).astype(float), rng.normal(size=(7, 50))
    alpha = probe.ridge(X @ X.T, y, 3.0)
    want = Ridge(alpha=3.0, fit_intercept=False).fit(X, y - .5).predict(Xt)
    np.testing.assert_allclose(Xt @ (X.T @ alpha), want, rtol=1e-8, atol=1e-10)

"""Linear probe of a frozen backbone: do its features carry the forgery cues? Vets a pretraining
variant in about a minute, before any detector run.

    python -m synthetic.probe                            # weights/small_clip.pt against a random ViT
    python -m synthetic.probe --weights=a.pt,b.pt,random --strength=1

Frames of the synthetic benchmark (identities of their own, never the detector's) are rendered
once and cached in `cache_dir`. Features per layer (after ln_pre, after block 1, ..., after
block L) of the detector's two views, the original image (dfdhr.original_image) and the split
images (dfdhr.split_images, averaged): the CLS token and the mean and standard deviation of the patch
tokens. A linear classifier (ridge regression on the labels, its regularisation picked on a
2-fold split of the training videos) is fitted on a training split and scored by video AUC on
new videos:
  - "F": trained on real vs family F, tested on real vs F;
  - "sbi->F": trained on real vs selfblend, tested on real vs F (the detector's protocol).
Each cell reports the best single layer's AUC and that of all layers together.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

import cli
import data
import synthetic
from dfdhr import PRESETS, SMALL_BACKBONE, original_image, split_images
from evaluation import compute_metrics
from vit import VisionTransformer, load_clip


@dataclass(frozen=True)
class Options:
    weights: str = f"{SMALL_BACKBONE},random"  # comma-separated: CLIP checkpoints, or random[:seed] (the small ViT)
    strength: float = synthetic.STRENGTH  # the forgeries' strength (train.py's synthetic_strength)
    frames_per_video: int = 4
    cache_dir: str = "out/probe_cache"
    out: str = ""                 # also write the results as JSON here


def frames(split, *, strength, fpv, cache_dir, size=128):
    """(images (N, S, S, 3) uint8, labels, videos, methods) of one split, cached on disk: train
    200 real + 200 fake videos, test 100 real + 100 per family."""
    n_real, n_fake = (200, 200) if split == "train" else (100, 400)
    ds = synthetic.SyntheticForgeries(methods=synthetic.FORGERY_METHODS, num_videos=n_real + n_fake,
                                      frames_per_video=fpv, image_size=size, seed=9001 if split == "train" else 9002,
                                      real_fraction=n_real / (n_real + n_fake), strength=strength)
    meta = [np.array([getattr(s, k) for s in ds.samples]) for k in ("label", "video", "method")]
    path = Path(cache_dir) / f"probe_{split}_s{strength:g}_f{fpv}_{size}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic.prerender([ds])
        np.save(path, ds._cache)
    return np.load(path), *meta


def to_input(images):  # (N, S, S, 3) uint8 -> (N, 3, S, S), CLIP-normalised
    x = torch.from_numpy(images).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(data._MEAN)[:, None, None]) / torch.tensor(data._STD)[:, None, None]


@torch.no_grad()
def features(model, images, batch=128):
    """(N, L + 1, 6·D): per layer [whole CLS, patch mean, patch std, the same of the crops]."""
    out = []
    for i in range(0, len(images), batch):
        x = to_input(images[i:i + batch])
        per_view = []
        for views, n in ((original_image(x, model.image_size), 1), (split_images(x), 4)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hs = torch.stack(model.hidden_states(views), 1).float()  # (B·n, L+1, N, D)
            f = torch.cat([hs[:, :, 0], hs[:, :, 1:].mean(2), hs[:, :, 1:].std(2)], -1)  # (B·n, L+1, 3D)
            per_view.append(f.view(len(x), n, *f.shape[1:]).mean(1))
        out.append(torch.cat(per_view, -1))
    return torch.cat(out).numpy()


def video_auc(scores, labels, videos):
    return compute_metrics(scores, labels, videos)["video_auc"]


def ridge(gram, y, lam):
    """Dual ridge regression on the labels: weights on the training rows, (XXᵀ + λI)⁻¹ (y − ½)."""
    return np.linalg.solve(gram + lam * np.eye(len(gram)), y - .5)


def fit_score(Xtr, ytr, vtr, Xte, yte, vte, grid=(.01, .1, 1, 10)):
    """Video AUC on the test rows of the ridge classifier fitted on the training rows
    (standardised features), λ chosen by a 2-fold split of the training videos."""
    sc = StandardScaler().fit(Xtr)
    Xtr, Xte = sc.transform(Xtr), sc.transform(Xte)
    gram = Xtr @ Xtr.T
    scale = float(np.mean(np.diag(gram)))
    videos = np.unique(vtr)
    fold = np.isin(vtr, videos[np.random.default_rng(0).permutation(len(videos))[:len(videos) // 2]])

    def cv(lam):
        return np.mean([video_auc(gram[np.ix_(b, a)] @ ridge(gram[np.ix_(a, a)], ytr[a], lam * scale), ytr[b], vtr[b])
                        for a, b in ((fold, ~fold), (~fold, fold))])
    lam = max(grid, key=cv)
    return video_auc(Xte @ (Xtr.T @ ridge(gram, ytr, lam * scale)), yte, vte)


def probe(model, train, test):
    """{cell: {best_layer, best, all, per_layer}} for the cells F and sbi->F of every family."""
    ftr, fte = features(model, train[0]), features(model, test[0])
    _, ytr, vtr, mtr = train
    _, yte, vte, mte = test
    res = {}
    families = synthetic.FORGERY_METHODS
    for name, trained_on, fam in [(f, f, f) for f in families] + [(f"sbi->{f}", "selfblend", f) for f in families]:
        itr, ite = np.isin(mtr, ("real", trained_on)), np.isin(mte, ("real", fam))
        per_layer = [fit_score(ftr[itr, k], ytr[itr], vtr[itr], fte[ite, k], yte[ite], vte[ite])
                     for k in range(ftr.shape[1])]
        every = fit_score(ftr[itr].reshape(itr.sum(), -1), ytr[itr], vtr[itr],
                          fte[ite].reshape(ite.sum(), -1), yte[ite], vte[ite])
        best = int(np.argmax(per_layer))
        res[name] = dict(best_layer=best, best=round(per_layer[best], 3), all=round(every, 3),
                         per_layer=[round(a, 3) for a in per_layer])
    return res


def load(spec):
    if spec.startswith("random"):  # random[:seed]: the small preset's ViT, randomly initialised
        torch.manual_seed(int(spec.partition(":")[2] or 0))
        c = PRESETS["small"]
        return VisionTransformer(image_size=c.view_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                                 heads=c.heads, output_dim=c.embed_dim)
    return load_clip(spec)


def main(argv):
    o = Options(**cli.parse(argv, Options)[0])
    torch.set_num_threads(2)
    t = time.time()
    train = frames("train", strength=o.strength, fpv=o.frames_per_video, cache_dir=o.cache_dir)
    test = frames("test", strength=o.strength, fpv=o.frames_per_video, cache_dir=o.cache_dir)
    print(f"data: {len(train[0])} training / {len(test[0])} test frames ({time.time() - t:.0f} s)", flush=True)
    results = {}
    for spec in o.weights.split(","):
        t = time.time()
        results[spec] = r = probe(load(spec).eval(), train, test)
        print(f"\n{spec} ({time.time() - t:.0f} s): video AUC, best layer / all layers")
        for name, c in r.items():
            print(f"  {name:<16} {c['best']:.3f} (layer {c['best_layer']}) / {c['all']:.3f}")
    if o.out:
        Path(o.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

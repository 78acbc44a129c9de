"""Pretrain the small preset's backbone as a CLIP image tower on real (never forged) renders.

    python -m synthetic.pretrain                        # weights/small_clip.pt, as committed (README gives the time)
    python -m synthetic.pretrain --toy --out=/tmp/t.pt  # a few steps at a toy size (seconds)

The paper freezes a pretrained CLIP; no CLIP weights exist for a CPU-sized ViT, so this script
makes one the way CLIP was made, at toy scale: an image tower (vit.VisionTransformer, OpenAI's
layout and head width 64) and a small text tower trained with CLIP's symmetric InfoNCE loss on
(image, caption) pairs. The images are faces of faces.py, never forged, photographed with the
natural variation a photo collection has, and that needs local low-level sensitivity: depth of field
(a sharp face on a blurred backdrop, the reverse, a tilted focal plane), light coloured
differently across the image, noise that varies across the image, resolution loss, JPEG. A
caption is a bag of attribute words: who (skin, hair), pose and expression, light, backdrop,
and for each 2x2 region of the view its blur, resolution, noise and colour cast. The views are
the detector's: the original image, the face resized to the backbone's input (dfdhr.original_image),
and the split images, its four quadrants (dfdhr.split_images).

Each base render is photographed twice in a batch, so two captions of one face differ only in
their low-level words: the image tower has to see them to pick the right caption.

Output: the image tower's fp32 state dict with OpenAI's `visual.` keys, which `vit.load_clip`
reads (heads = width // 64), and beside it a .json with the options, size, sha256 and time.
"""
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

import cli
import data
from dfdhr import SMALL_BACKBONE, original_image, split_images
from synthetic import faces
from vit import VisionTransformer, load_clip


@dataclass(frozen=True)
class Options:
    out: str = SMALL_BACKBONE
    steps: int = 1500
    pool: int = 12000        # clean base renders, drawn once
    bases: int = 32          # base renders per batch, each photographed `variants` times
    variants: int = 2        # a batch has bases · variants images, hence 5x as many views
    lr: float = 1e-3         # AdamW, linear warm-up then cosine decay
    weight_decay: float = 0.05
    warmup: int = 100
    width: int = 128         # the small preset's backbone (dfdhr.PRESETS["small"])
    layers: int = 8
    patch: int = 8
    view: int = 64           # the backbone's input; the renders are twice that (the detector's input)
    seed: int = 0
    workers: int = 1         # processes that photograph while the main one trains
    threads: int = 2
    dtype: str = "bf16"      # "bf16" (autocast) or "fp32"
    log_interval: int = 25
    toy: bool = False        # a few steps at a toy size


TOY = dict(steps=3, pool=16, bases=4, width=64, layers=2, view=32, patch=8, warmup=1, workers=0, log_interval=1)

# ----------------------------------------------------------------------------- vocabulary
BLUR_LEVELS = (0., .6, 1.2, 2., 3.)  # Gaussian sigma in pixels at 128 px
NOISE_LEVELS = (.006, .02, .045)     # noise std (of [0, 1] intensities): low, mid, high
CASTS = ("none", "warm", "cool", "green", "magenta", "bright", "dark")
CAST_RGB = {"warm": (1, .35, -.6), "cool": (-.6, .1, 1), "green": (-.4, 1, -.4), "magenta": (1, -.7, .9),
            "bright": (1, 1, 1), "dark": (-1, -1, -1)}
RESOLUTIONS = (1., 1.5, 2., 3.)      # factors of a down-up resampling of the whole picture
VIEWS = ("whole", "q0", "q1", "q2", "q3")


def vocabulary():
    words = [f"view_{v}" for v in VIEWS]
    words += [f"skin{k}" for k in range(3)] + [f"hair{k}" for k in range(6)] + [f"style{k}" for k in range(3)]
    words += [f"yaw{k}" for k in range(3)] + [f"roll{k}" for k in range(3)] + ["mouth_open", "smile", "blink"]
    words += [f"light{k}" for k in range(3)] + [f"backdrop{k}" for k in range(8)]
    words += [f"dof_{m}" for m in ("flat", "bokeh", "reverse", "tilt")]
    words += [f"person_blur{k}" for k in range(5)] + [f"backdrop_blur{k}" for k in range(5)]
    words += [f"res{k}" for k in range(len(RESOLUTIONS))] + [f"jpeg{k}" for k in range(3)]
    for r in range(4):  # the view's 2x2 regions
        words += [f"r{r}_blur{k}" for k in range(5)] + [f"r{r}_noise{k}" for k in range(3)]
        words += [f"r{r}_res{k}" for k in range(3)]
        words += [f"r{r}_cast_none"] + [f"r{r}_cast_{c}{k}" for c in CASTS[1:] for k in (1, 2)]
    return {w: i for i, w in enumerate(words)}


VOCAB = vocabulary()


# ----------------------------------------------------------------------------- base renders

def _render_one(args):
    seed, index, size = args
    rng = np.random.default_rng((seed, index))
    ident, scene = faces.random_identity(rng), faces.random_scene(rng)
    pose = faces.jitter_pose(scene.pose, rng)
    face = faces.render_face(ident, scene, pose, size)
    hue = np.argmax(scene.backdrop[:2].mean(0))  # dominant channel of the backdrop
    lum = scene.backdrop[:2].mean()
    words = [f"skin{min(2, int((ident.skin.mean() - .25) / .22))}",
             f"hair{int(np.argmin(np.abs(faces.HAIR - ident.hair).sum(1)))}",
             f"style{ident.hair_style}", f"yaw{int(np.digitize(pose.yaw, (-.15, .15)))}",
             f"roll{int(np.digitize(pose.roll, (-.07, .07)))}", f"light{int(np.digitize(scene.light[0], (-.25, .25)))}",
             f"backdrop{hue + 3 * int(lum > .5) if lum > .3 else 6 + int(lum > .15)}"]
    words += ["mouth_open"] * (pose.mouth_open > .15) + ["smile"] * (pose.smile > .3) + ["blink"] * (pose.eye_open < .3)
    img = np.clip(face.image * 255 + .5, 0, 255).astype(np.uint8)
    fg = np.clip(face.fg * 255 + .5, 0, 255).astype(np.uint8)
    return img, fg, words


def render_pool(n, *, size, seed, workers=2):
    """n clean renders (no camera): images (n, S, S, 3) uint8, person masks (n, S, S) uint8, and
    their semantic caption words."""
    args = [(seed, i, size) for i in range(n)]
    if workers > 1:
        with Pool(workers) as pool:
            out = pool.map(_render_one, args, chunksize=64)
    else:
        out = list(map(_render_one, args))
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), [o[2] for o in out]


# ----------------------------------------------------------------------------- photo effects

def _ramp(size, rng):
    """A linear ramp in [0, 1] over the image along a random direction."""
    t = (np.arange(size, dtype=np.float32) + .5) / size
    x, y = np.meshgrid(t, t)
    a = rng.uniform(0, 2 * np.pi)
    r = np.cos(a) * (x - .5) + np.sin(a) * (y - .5)
    return ((r - r.min()) / (r.max() - r.min())).astype(np.float32)


def _blob(size, rng):
    """A soft round spot in [0, 1] at a random place."""
    t = (np.arange(size, dtype=np.float32) + .5) / size
    x, y = np.meshgrid(t, t)
    cx, cy, r = rng.uniform(.1, .9), rng.uniform(.1, .9), rng.uniform(.2, .45)
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)).astype(np.float32)


def _downup(img, factor, down=Image.BILINEAR):
    size = img.shape[0]
    small = faces.resize(np.clip(img, 0, 1).astype(np.float32), max(8, round(size / factor)), down)
    return faces.resize(small, size, Image.BILINEAR)


def photograph(base, fg, rng):
    """Natural photo effects on a clean render (S, S, 3) uint8 with person mask fg (S, S):
    returns the photo (S, S, 3) uint8, per-pixel maps {sigma: blur, res: resolution factor,
    noise: noise std, gain: colour gain (S, S, 3)} and the caption words of the whole photo."""
    S = base.shape[0]
    k = S / 128
    img = base.astype(np.float32) / 255
    fg = ndimage.gaussian_filter(fg.astype(np.float32) / 255, 1.5 * k)
    # depth of field: a blur level per pixel, rendered by blending a stack of blurred copies
    mode = rng.choice(["flat", "bokeh", "reverse", "tilt"], p=[.25, .35, .15, .25])
    words = [f"dof_{mode}"]
    if mode == "flat":
        level = np.full((S, S), float(rng.choice(3, p=[.6, .3, .1])), np.float32)
    elif mode in ("bokeh", "reverse"):
        person, back = (rng.integers(0, 2), rng.integers(2, 5)) if mode == "bokeh" else \
            (rng.integers(2, 4), rng.integers(0, 2))
        level = fg * person + (1 - fg) * back
        words += [f"person_blur{person}", f"backdrop_blur{back}"]
    else:
        a, b = rng.choice(5, 2, replace=False)
        level = a + (b - a) * _ramp(S, rng)
    level = np.clip(level, 0, len(BLUR_LEVELS) - 1).astype(np.float32)
    lo, hi = int(np.floor(level.min())), int(np.ceil(level.max()))
    stack = np.stack([ndimage.gaussian_filter(img, (BLUR_LEVELS[lv] * k,) * 2 + (0,)) if lv else img
                      for lv in range(lo, hi + 1)])  # (levels, S, S, C)
    if hi > lo:  # linear interpolation between adjacent blur levels
        low = np.clip(np.floor(level).astype(int), lo, hi - 1) - lo  # (S, S)
        frac = (level - lo - low)[..., None]
        rows, cols = np.indices((S, S))
        img = stack[low, rows, cols] * (1 - frac) + stack[low + 1, rows, cols] * frac
    else:
        img = stack[0]
    sigma = np.interp(level, np.arange(5), BLUR_LEVELS).astype(np.float32)
    # light: a colour gradient or a coloured spot (a multiplicative gain)
    cast_kind = rng.choice(["none", "gradient", "spot"], p=[.3, .35, .35])
    gain = np.ones((S, S, 3), np.float32)
    if cast_kind != "none":
        colour = CASTS[1 + rng.integers(len(CASTS) - 1)]
        shape = _ramp(S, rng) if cast_kind == "gradient" else _blob(S, rng)
        gain = 1 + rng.uniform(.1, .3) * shape[..., None] * np.float32(CAST_RGB[colour])
        img = img * gain
    # noise: uniform, along a gradient, or signal-dependent (shot noise)
    n0 = NOISE_LEVELS[rng.integers(3)]
    noise_kind = rng.choice(["uniform", "gradient", "shot"], p=[.4, .3, .3])
    if noise_kind == "uniform":
        nstd = np.full((S, S), n0, np.float32)
    elif noise_kind == "gradient":
        nstd = n0 * (.3 + 2.2 * _ramp(S, rng))
    else:
        nstd = n0 * 1.6 * np.sqrt(np.clip(img.mean(-1), .02, 1))
    img = img + nstd[..., None] * rng.standard_normal(img.shape, dtype=np.float32)
    # resolution loss of the whole picture, then JPEG
    r = int(rng.choice(len(RESOLUTIONS), p=[.7, .1, .1, .1]))
    res = np.full((S, S), RESOLUTIONS[r], np.float32)
    if r:
        img = _downup(img, RESOLUTIONS[r])
        sigma = np.sqrt(sigma ** 2 + (.5 * RESOLUTIONS[r]) ** 2)
    q = int(rng.integers(30, 96))
    words += [f"res{r}", f"jpeg{int(np.digitize(q, (50, 75)))}"]
    pil = data._jpeg(Image.fromarray(np.clip(img * 255 + .5, 0, 255).astype(np.uint8)), q)
    return np.asarray(pil), dict(sigma=sigma, res=res, noise=nstd, gain=gain), words


def region_words(maps, box):
    """Low-level words of the 2x2 regions of the view `box` = (top, left, side) of the image."""
    top, left, side = box
    h = side // 2
    words = []
    for r in range(4):
        y, x = top + (r // 2) * h, left + (r % 2) * h
        sl = (slice(y, y + h), slice(x, x + h))
        s = float(maps["sigma"][sl].mean())
        words.append(f"r{r}_blur{int(np.argmin(np.abs(np.float32(BLUR_LEVELS) - s)))}")
        words.append(f"r{r}_res{int(np.digitize(float(maps['res'][sl].mean()), (1.25, 2.)))}")
        words.append(f"r{r}_noise{int(np.digitize(float(maps['noise'][sl].mean()), (.012, .032)))}")
        g = maps["gain"][sl].mean((0, 1)) - 1  # (3,)
        size = np.abs(g).max()
        if size < .04:
            words.append(f"r{r}_cast_none")
        else:  # the colour it is closest to, weak or strong
            colour = max(CAST_RGB, key=lambda c: float(np.dot(g, CAST_RGB[c]) / np.linalg.norm(CAST_RGB[c])))
            words.append(f"r{r}_cast_{colour}{1 + int(size > .12)}")
    return words


class PhotoBatches(torch.utils.data.IterableDataset):
    """Endless batches: `bases` base renders of the pool, each photographed `variants` times.
    Yields images (B, 3, S, S), CLIP-normalised, and one caption (a list of word ids) per view,
    in the order of `views`: the whole image of every photo, then the four crops of each."""

    def __init__(self, pool, fgs, words, *, bases, variants, seed):
        super().__init__()
        self.pool, self.fgs, self.words = pool, fgs, words
        self.bases, self.variants, self.seed = bases, variants, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng((self.seed, info.id if info is not None else 0))
        S = self.pool.shape[1]
        while True:
            images, whole, crops = [], [], []
            for i in rng.choice(len(self.pool), self.bases, replace=False):
                sem = self.words[i]
                for _ in range(self.variants):
                    img, maps, photo_words = photograph(self.pool[i], self.fgs[i], rng)
                    images.append(data.to_input(Image.fromarray(img), S))
                    whole.append(["view_whole"] + sem + photo_words + region_words(maps, (0, 0, S)))
                    for q in range(4):  # split_images' order: row-major
                        box = ((q // 2) * (S // 2), (q % 2) * (S // 2), S // 2)
                        crops.append([f"view_q{q}"] + sem[:3] + photo_words[-2:] + region_words(maps, box))
            yield torch.stack(images), [[VOCAB[w] for w in c] for c in whole + crops]


def views(x, size):
    """The detector's views of (B, 3, 2v, 2v): (5B, 3, v, v), the whole images, then the crops."""
    return torch.cat([original_image(x, size), split_images(x)])


# ----------------------------------------------------------------------------- the two towers

class BagOfWordsEncoder(nn.Module):
    """Text tower: a caption is a bag of attribute words: summed embeddings, LayerNorm, MLP."""

    def __init__(self, vocab_size, width, output_dim):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="sum")
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, output_dim))

    def forward(self, captions):  # list of word-id lists -> (T, output_dim)
        flat = torch.tensor([t for c in captions for t in c])
        offsets = torch.tensor([0] + [len(c) for c in captions[:-1]]).cumsum(0)
        return self.mlp(self.ln(self.embed(flat, offsets)))


def clip_loss(img, txt, captions, logit_scale):
    """CLIP's symmetric InfoNCE; views with the same caption are all positives of each other.
    Returns the loss and the top-1 accuracy of image -> caption."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()  # (T, T)
    keys = [tuple(sorted(c)) for c in captions]
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    cid = torch.tensor([ids[k] for k in keys])
    target = (cid[:, None] == cid[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()
    return loss / 2, (cid[logits.argmax(1)] == cid).float().mean()


# ----------------------------------------------------------------------------- main

def save_visual(visual, path):
    """OpenAI's layout: `visual.` + VisionTransformer keys, fp32. Returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"visual.{k}": v.detach().float().clone() for k, v in visual.state_dict().items()}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def verify(visual, path):
    """load_clip(path) must rebuild the same model: sizes, heads and outputs."""
    loaded, visual = load_clip(path).eval(), visual.eval()
    sizes = lambda m: (m.width, m.heads, len(m.blocks), m.patch_size, m.image_size)  # noqa: E731
    if sizes(loaded) != sizes(visual):
        raise RuntimeError(f"{path}: load_clip reads sizes {sizes(loaded)}, trained {sizes(visual)}")
    x = torch.randn(4, 3, visual.image_size, visual.image_size, generator=torch.Generator().manual_seed(0))
    if not torch.equal(loaded(x), visual(x)):
        raise RuntimeError(f"{path}: load_clip's model computes other outputs than the trained one")


def main(argv):
    o = Options(**cli.parse(argv, Options)[0])
    if o.toy:
        o = replace(o, **TOY)
    torch.manual_seed(o.seed)
    torch.set_num_threads(o.threads)
    t0 = time.time()
    pool, fgs, words = render_pool(o.pool, size=2 * o.view, seed=o.seed, workers=2 if o.pool > 256 else 1)
    print(f"pool: {o.pool} renders of {2 * o.view} px in {time.time() - t0:.0f} s", flush=True)
    visual = VisionTransformer(image_size=o.view, patch_size=o.patch, width=o.width, layers=o.layers,
                               heads=max(1, o.width // 64), output_dim=o.width)  # OpenAI's head width 64
    text = BagOfWordsEncoder(len(VOCAB), 2 * o.width, o.width)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = list(visual.parameters()) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.ndim >= 2], weight_decay=o.weight_decay),
                             dict(params=[p for p in params if p.ndim < 2], weight_decay=0.)],
                            lr=o.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / o.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, o.steps) / o.steps)))
    loader = torch.utils.data.DataLoader(PhotoBatches(pool, fgs, words, bases=o.bases, variants=o.variants,
                                                      seed=o.seed),
                                         batch_size=None, num_workers=o.workers,
                                         prefetch_factor=4 if o.workers else None)
    history, t1, seen = [], time.time(), 0
    for step, (x, captions) in enumerate(loader):
        if step >= o.steps:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=o.dtype == "bf16"):
            img = visual(views(x, o.view))  # (5B, output_dim)
            loss, acc = clip_loss(img, text(captions), captions, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        seen += len(captions)
        history.append(dict(step=step + 1, loss=loss.item(), acc=acc.item()))
        if (step + 1) % o.log_interval == 0 or step + 1 == o.steps:
            recent = history[-o.log_interval:]
            print(f"step {step + 1}/{o.steps} | loss {np.mean([h['loss'] for h in recent]):.3f} | top-1 "
                  f"{np.mean([h['acc'] for h in recent]):.3f} of {len(captions)} views | "
                  f"{seen / (time.time() - t1):.0f} views/s | {time.time() - t0:.0f} s", flush=True)
    out = Path(o.out)
    sha = save_visual(visual, out)
    verify(visual, out)
    meta = dict(asdict(o), sha256=sha, bytes=out.stat().st_size, seconds=round(time.time() - t0),
                heads=visual.heads, final=history[-1] if history else None)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {sha[:16]}...); load_clip reads it back "
          f"exactly; {time.time() - t0:.0f} s in all")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

"""The forgeries of the built-in synthetic benchmark, its data sets and its protocols.

No deepfake data ships with this project, so `SyntheticForgeries` draws face-like video
frames (faces.py: identity, pose, lighting, skin tone, background, camera noise, JPEG) and forges
them with four families that imitate the artifacts of real methods: blending boundaries and colour
mismatch (face swap), self-blending (SBI), low-resolution local re-synthesis (re-enactment),
up-sampling checkerboards (decoders). `synthetic_splits` builds the default protocol after SBI
(train on real frames and their self-blends, test every family on its own) and a cross-method
one after the paper's Protocol-2. One `strength` scales every family alike. Every frame is a
pure function of (seed, index): no files, no global RNG.

Letters: H, W image height and width, C = 3 colour channels; u, v face coordinates (faces.py).
"""
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull

from data import FrameDataset, Sample
from synthetic.faces import (Face, blur, camera, jitter_pose, landmarks, random_identity, random_scene, render_face,
                             resize)

FORGERY_METHODS = ("selfblend", "faceswap", "partial", "upsample")  # the SBI protocol's order: its training one first
TRAIN_METHODS = ("faceswap", "upsample")  # default Protocol-2-like split: train on these ...
HELD_OUT_METHODS = ("partial", "selfblend")  # ... and test on these as unseen methods


# ----------------------------------------------------------------------------- forgery families
# Each family maps a clean rendered face to (fake, mask): the fake (H, W, C) before camera
# post-processing and the soft blending mask (H, W) in [0, 1]. Outside the mask's support the
# fake equals the (self-blend: possibly altered) target exactly. `strength` s scales every
# family alike: colour mismatch, blur / sharpening, resolution lost, checkerboard amplitude
# linearly in s, and the width of the blending ramp (feathering) by feather_scale(s).

def feather_scale(strength: float) -> float:
    """Relative width of a blending ramp: 1 at s = 0.75, halved for every 0.75 of strength more:
    a stronger forgery has a sharper seam."""
    return float(2.0 ** (-(strength - .75) / .75))


def blend_mask(face: Face, rng, centre, axes, feather) -> np.ndarray:
    """Soft mask in face coordinates: an ellipse with a wobbly outline (like a deformed landmark
    hull), 1 well inside, a smooth ramp of relative width `feather`, exactly 0 outside."""
    du, dv = (face.u - centre[0]) / axes[0], (face.v - centre[1]) / axes[1]
    angle = np.arctan2(dv, du)
    wobble = 1 + sum(rng.uniform(0, .05) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    m = np.clip((1 - np.hypot(du, dv) * wobble) / max(feather, .02), 0, 1)
    return (m * m * (3 - 2 * m)).astype(np.float32)  # smoothstep


def _blend(face: Face, other: np.ndarray, mask: np.ndarray, target: np.ndarray = None) -> np.ndarray:
    target = face.image if target is None else target
    return target + mask[..., None] * (other.astype(np.float32) - target)


def forge_faceswap(face: Face, donor: np.ndarray, rng, strength: float):
    """FaceSwap / Deepfakes (FF++): another identity's inner face, rendered in the target's
    pose, pasted through a feathered ellipse. The donor is smoothed (autoencoder output is
    blurry) and only partly colour-corrected: a colour mismatch and a visible-ish seam."""
    i, centre_u = face.ident, .12 * face.pose.yaw
    mask = blend_mask(face, rng, (centre_u, (i.brow_v + i.mouth_v) / 2 + .04),
                      (i.eye_u + i.eye_w + .1, (i.mouth_v - i.brow_v) / 2 + .14), feather=.19 * feather_scale(strength))
    donor = blur(donor, rng.uniform(.3, .6 + .8 * strength))
    inside = mask > .5
    shift = face.image[inside].mean(0) - donor[inside].mean(0)  # colour transfer, left unfinished
    donor = donor + (1 - min(rng.uniform(.1, .4) * strength, 1.)) * shift
    tint = 1 + strength * rng.uniform(.03, .08, 3) * rng.choice([-1, 1], 3)
    return _blend(face, donor * tint, mask), mask


# SBI's mask families: the whole face hull (68 points or with the forehead, 81) and parts.
SBI_MASKS = (("jaw", "eye_r", "eye_l"), ("jaw", "eye_r", "eye_l", "forehead"), ("eye_r", "eye_l"), ("eye_l",),
             ("eye_r",), ("nose",), ("mouth",), ("nose", "mouth"), ("eye_r", "eye_l", "nose"))
SBI_MASK_P = (.35, .15, .1, .05, .05, .05, .1, .1, .05)


def hull_mask(points: np.ndarray, size: int, grow: float = 1.0) -> np.ndarray:
    """Filled convex hull (H, W) float32 in {0, 1} of (K, 2) pixel points, grown `grow`-fold
    about their centroid (a part's few points enclose less than the part)."""
    centre = points.mean(0)
    points = centre + grow * (points - centre)
    hull = points[ConvexHull(points).vertices]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in hull], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255


def _elastic(mask: np.ndarray, rng, amplitude: float) -> np.ndarray:
    """Warp a mask by a smooth random displacement field (pixels), drawn on a 4 x 4 grid."""
    size = mask.shape[0]
    field = [_resize_gray(rng.normal(0, amplitude, (4, 4)).astype(np.float32), size) for _ in range(2)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return ndimage.map_coordinates(mask, [yy + field[0], xx + field[1]], order=1, mode="constant")


def _resize_gray(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def sbi_mask(face: Face, rng) -> np.ndarray:
    """SBI's blending mask: a landmark hull (whole face or parts), elastically warped, blurred
    twice (the first blur's ramp is cut to the hull's interior, the second makes a new ramp),
    scaled to a maximum of 1."""
    size, pts = face.image.shape[0], landmarks(face)
    parts = SBI_MASKS[rng.choice(len(SBI_MASKS), p=SBI_MASK_P)]
    grow = 1.0 if "jaw" in parts else rng.uniform(1.3, 1.8)
    m = hull_mask(np.concatenate([pts[k] for k in parts]), size, grow)
    k = size / 128  # sizes below are pixels at 128 px
    m = _elastic(m, rng, rng.uniform(.5, 3) * k)
    m = ndimage.gaussian_filter(m, rng.uniform(1, 5) * k)
    m = m / max(m.max(), 1e-6)  # a part smaller than the blur never reaches 1: the cut keeps its peak
    m[m < 1 - 1e-3] = 0  # the first ramp is cut: only the interior survives ...
    m = ndimage.gaussian_filter(m, rng.uniform(1, 5) * k)  # ... and the second blur makes the seam
    return (m / max(m.max(), 1e-6)).astype(np.float32)


def _source_target_transform(img: np.ndarray, rng, s: float) -> np.ndarray:
    """SBI's source-target augmentation at strength s: colour (RGB gain and shift, contrast)
    and one of blur, sharpening or a down-up resampling (resolution loss)."""
    mean = img.mean((0, 1), keepdims=True)
    img = (img - mean) * (1 + s * rng.uniform(-.15, .15)) + mean  # contrast
    img = img * (1 + s * rng.uniform(-.1, .1, 3)) + s * rng.uniform(-.04, .04, 3)  # RGB gain and shift
    kind = rng.integers(3)
    if kind == 0:  # blur
        img = blur(img, s * rng.uniform(.4, 1.2))
    elif kind == 1:  # sharpen (unsharp mask)
        img = img + s * rng.uniform(.5, 1.5) * (img - blur(img, 1.))
    else:  # resolution: down-sample by 1 + s·U(0.5, 1.5), up-sample back
        size = img.shape[0]
        low = max(8, round(size / (1 + s * rng.uniform(.5, 1.5))))
        img = resize(resize(img.astype(np.float32), low, Image.BILINEAR), size, Image.BILINEAR)
    return img.astype(np.float32)


def _affine_jitter(img: np.ndarray, rng, s: float) -> np.ndarray:
    """Small random shift (up to 3 % · s of the size) and scale (1 ± 4 % · s) of an image."""
    size = img.shape[0]
    scale, (tx, ty) = 1 + s * rng.uniform(-.04, .04), s * rng.uniform(-.03, .03, 2) * size
    centre = (size - 1) / 2  # output pixel p samples the input at scale * (p - centre) + centre - shift
    offset = [centre * (1 - scale) - ty, centre * (1 - scale) - tx, 0]
    return ndimage.affine_transform(img, [scale, scale, 1], offset, order=1, mode="nearest")


class SelfBlend(NamedTuple):
    real: np.ndarray  # (H, W, C) the target: the face, possibly altered as a whole
    fake: np.ndarray  # (H, W, C) the source blended into the target
    mask: np.ndarray  # (H, W) the blending mask times the blend ratio


def self_blend(face: Face, rng, strength: float) -> SelfBlend:
    """Self-blended image (Shiohara & Yamasaki, CVPR 2022, SBI), randomised as theirs: two
    copies of the same frame, one of them (source or target, at random) altered by colour and
    by blur, sharpening or resolution loss; the source shifted and scaled a little and blended
    into the target through a landmark-hull mask (whole face or parts) that is elastically
    warped and blurred twice, at a ratio from {.25, .5, .75, 1, 1, 1}. The pair's real image is
    the target: real and fake differ only inside the mask."""
    source, target = face.image, face.image
    if rng.random() < .5:
        source = _source_target_transform(source, rng, strength)
    else:
        target = _source_target_transform(target, rng, strength)
    source = _affine_jitter(source, rng, strength)
    mask = sbi_mask(face, rng) * rng.choice([.25, .5, .75, 1, 1, 1])  # SBI's blend ratios
    return SelfBlend(np.clip(target, 0, 1), np.clip(_blend(face, source, mask, target), 0, 1), mask)


def forge_selfblend(face: Face, rng, strength: float):
    """The self-blend family as a forgery: (fake, mask); outside the mask the fake equals the
    (possibly altered) target."""
    sb = self_blend(face, rng, strength)
    return sb.fake, sb.mask


def forge_partial(face: Face, driver: np.ndarray, rng, strength: float):
    """NeuralTextures / Face2Face (FF++) expression re-enactment: the mouth (and/or the eyes)
    is re-synthesised at low resolution from a driver (the same face with another expression)
    and pasted back through a soft mask, so that region lacks fine detail."""
    i, size, centre_u = face.ident, face.image.shape[0], .12 * face.pose.yaw
    f = feather_scale(strength)
    mouth = blend_mask(face, rng, (centre_u, i.mouth_v), (i.mouth_w * 1.7, i.mouth_h * 4 + .06), rng.uniform(.2, .5) * f)
    eyes = blend_mask(face, rng, (centre_u, i.eye_v - .02), (i.eye_u + i.eye_w * 1.8, i.eye_h * 3.5 + .03),
                      rng.uniform(.2, .5) * f)
    mask = [mouth, mouth, mouth, eyes, np.maximum(mouth, eyes)][rng.integers(5)]
    low = max(8, round(size / (1.5 + 2.5 * strength)))  # 1/1.5 to 1/4 of the resolution at s in [0, 1]
    return _blend(face, resize(resize(driver, low, Image.BOX), size, Image.BILINEAR), mask), mask


def forge_upsample(face: Face, rng, strength: float):
    """Decoder up-sampling artifacts (GAN / autoencoder decoders, e.g. Deepfakes' decoder,
    StyleGAN-based swaps): the face is re-rendered at lower resolution (1/(1 + s)) and
    up-sampled by transposed-convolution-like steps whose uneven kernel overlap leaves a
    periodic gain: a checkerboard, i.e. a spectral peak at Nyquist, plus one at half-Nyquist
    for two steps."""
    i, size = face.ident, face.image.shape[0]
    amp, two_steps, k = .04 * strength, rng.random() < .5, np.arange(size)
    gain = 1 + amp * (np.cos(np.pi * k) + two_steps * np.cos(np.pi * k / 2))  # (H,), the same along W
    low = max(8, round(size / (1 + strength)))
    decoded = resize(resize(face.image, low, Image.BOX), size, Image.BILINEAR)
    mask = blend_mask(face, rng, (.12 * face.pose.yaw, .02), (i.a * .9, i.b * .9),
                      rng.uniform(.2, .4) * feather_scale(strength))
    return _blend(face, decoded * gain[:, None, None] * gain[None, :, None], mask), mask


# ----------------------------------------------------------------------------- synthetic data set

_IDENTITY, _SCENE, _FORGERY, _FRAME, _CAMERA = range(5)  # independent random streams (and _AUGMENT)
CHANGED = 2  # 8-bit levels: a pixel a forgery moved by more than this, it changed (camera noise is shared)
STRENGTH = 4.0  # videos draw s from STRENGTH · U(0.5, 1): what the default run learns; 1 is the subtle setting


def forge(method: str, face: Face, *, scene, pose, rng, frame_rng, strength: float) -> np.ndarray:
    """A face forged by one family (before camera post-processing); "real" returns it as is."""
    size = face.image.shape[0]
    if method == "real":
        return face.image
    if method == "faceswap":
        return forge_faceswap(face, render_face(random_identity(rng), scene, pose, size).image, rng, strength)[0]
    if method == "selfblend":
        return forge_selfblend(face, frame_rng, strength)[0]  # a new blend in every frame, as SBI draws
    if method == "partial":  # the driver's expression changes from frame to frame
        driver = pose._replace(mouth_open=frame_rng.uniform(0, .6), smile=frame_rng.uniform(-.3, .7))
        return forge_partial(face, render_face(face.ident, scene, driver, size).image, rng, strength)[0]
    if method == "upsample":
        return forge_upsample(face, rng, strength)[0]
    raise ValueError(f"unknown forgery method {method!r}")


def _render_range(args):
    dataset, lo, hi = args
    frames, records = zip(*(dataset.render(i) for i in range(lo, hi)))
    return np.stack(frames), None if records[0] is None else np.stack(records)


_RENDERED = {}  # render_key() -> (frames, records): a process that trains several runs renders once


def prerender(datasets, workers=2, chunk=64) -> int:
    """Render every frame of the synthetic data sets among `datasets` (or under a Subset) once, in
    `workers` processes, and keep them in memory (uint8, S·S·3 bytes a frame, and S·S for what a data
    set records of each frame: where a test frame's forgery changed it, a training pair's blending
    mask): later reads cost nothing, and a later data set of the same frames in this process takes
    them as they are. A rendered SelfBlendPairs keeps the
    blends of epoch 0 in every epoch. Returns the number of frames rendered."""
    from multiprocessing import get_context
    todo = {}
    for ds in datasets:
        ds = getattr(ds, "dataset", ds)  # a Subset's data set
        if not isinstance(ds, (SyntheticForgeries, SelfBlendPairs)) or ds._cache is not None:
            continue
        if ds.render_key() in _RENDERED:
            ds._cache, ds._record = _RENDERED[ds.render_key()]
        else:
            todo[id(ds)] = ds
    jobs = [(ds, lo, min(lo + chunk, len(ds))) for ds in todo.values() for lo in range(0, len(ds), chunk)]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_range, jobs)
    else:
        parts = list(map(_render_range, jobs))
    for ds in todo.values():
        mine = [p for (d, _, _), p in zip(jobs, parts) if d is ds]
        ds._cache = np.concatenate([frames for frames, _ in mine])
        if mine[0][1] is not None:
            ds._record = np.concatenate([records for _, records in mine])
        _RENDERED[ds.render_key()] = ds._cache, ds._record
    return sum(map(len, todo.values()))


class SyntheticForgeries(FrameDataset):
    """The built-in benchmark: `num_videos` videos of `frames_per_video` frames each. Videos
    are real in proportion `real_fraction` (interleaved); fakes cycle through `methods`. Each
    frame is drawn from (seed, index) alone: the same index gives the same image in every
    epoch and worker. Per video: one identity, scene and forgery (strength drawn from
    `strength` · U(0.5, 1)); per frame: head motion, expression, camera noise and JPEG."""

    def __init__(self, *, methods, num_videos, frames_per_video, image_size, seed,
                 augment=None, real_fraction=0.5, strength=STRENGTH):
        unknown = [m for m in methods if m not in FORGERY_METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown forgery methods {unknown}; choose from {FORGERY_METHODS}")
        super().__init__(image_size=image_size, augment=augment, seed=seed)
        self.methods, self.frames_per_video, self.strength = tuple(methods), frames_per_video, strength
        for video in range(num_videos):
            reals_before = math.floor(video * real_fraction)
            real = math.floor((video + 1) * real_fraction) > reals_before
            method = "real" if real else self.methods[(video - reals_before) % len(self.methods)]
            for f in range(frames_per_video):
                self.samples.append(Sample(f"synthetic:{seed}/{video * frames_per_video + f}", int(not real),
                                           f"synthetic:{seed}/{method}/{video:05d}", method))

    _cache = None   # (N, S, S, C) uint8 once prerender() ran
    _record = None  # (N, S, S) bool, likewise: where each frame's forgery changed it

    def render_key(self):
        """What its frames are drawn from: two data sets of one key hold the same frames."""
        return (type(self).__name__, self.seed, self.image_size, self.strength, self.frames_per_video,
                tuple(s.method for s in self.samples[::self.frames_per_video]))

    def image(self, index: int, forged: bool = True) -> Image.Image:
        """Frame `index` as the camera delivers it: before augmentation and resizing. With
        forged=False, the same frame as it was before the forgery."""
        if self._cache is not None and forged:
            return Image.fromarray(self._cache[index])
        return self._draw(index, forged)

    def render(self, index: int):
        """(frame, changed): frame `index` (uint8 (S, S, C)) and where its forgery changed it,
        (S, S) bool: the pixels whose mean over C differs by more than CHANGED 8-bit levels from
        the same frame drawn without the forgery (camera noise and JPEG alike). None changed in a
        real frame; in a self-blend onto an altered target, all of it did."""
        frame = np.asarray(self._draw(index, True))
        if self.samples[index].label == 0:
            return frame, np.zeros(frame.shape[:2], dtype=bool)
        pristine = np.asarray(self._draw(index, False))
        return frame, np.abs(frame.astype(np.int16) - pristine).mean(-1) > CHANGED

    def changed(self, index: int) -> np.ndarray:
        """Where the forgery of frame `index` changed it, (S, S) bool (render)."""
        return self._record[index] if self._record is not None else self.render(index)[1]

    def _draw(self, index: int, forged: bool) -> Image.Image:
        video, f = divmod(int(index), self.frames_per_video)
        method, size = self.samples[index].method if forged else "real", self.image_size
        ident = random_identity(np.random.default_rng((self.seed, _IDENTITY, video)))
        scene = random_scene(np.random.default_rng((self.seed, _SCENE, video)))
        frame_rng = np.random.default_rng((self.seed, _FRAME, video, f))
        pose = jitter_pose(scene.pose, frame_rng)
        face = render_face(ident, scene, pose, size)
        rng = np.random.default_rng((self.seed, _FORGERY, video))  # the same forgery in every frame
        strength = self.strength * rng.uniform(.5, 1)
        img = forge(method, face, scene=scene, pose=pose, rng=rng, frame_rng=frame_rng, strength=strength)
        return camera(img, scene, np.random.default_rng((self.seed, _CAMERA, video, f)))


class SelfBlendPairs(FrameDataset):
    """Training set of the SBI protocol: `num_videos` real videos of `frames_per_video` frames;
    every rendered frame gives two samples, index 2k its real image (the target) and 2k + 1 its
    self-blend (SBI), so one render serves both and `group_size = 2` lets the trainer keep each
    pair in one batch. A new blend (mask, transforms, ratio, strength) is drawn per frame, and
    per epoch. Camera post-processing (blur, noise, JPEG) is the same for both of a pair.
    With `masks`, each sample also has "mask", the blend's mask (S, S) in [0, 1] (zero for the real
    image), for a method whose loss reads it (ForAda's boundary); masks are not augmented, so not with
    `augment`."""

    group_size = 2

    def __init__(self, *, num_videos, frames_per_video, image_size, seed, augment=None, strength=STRENGTH,
                 masks=False):
        if masks and augment is not None:
            raise ValueError("blending masks follow the frames unaugmented: use them without augmentation")
        super().__init__(image_size=image_size, augment=augment, seed=seed)
        self.frames_per_video, self.strength, self._last, self.masks = frames_per_video, strength, (None, None), masks
        for video in range(num_videos):
            for f in range(frames_per_video):
                k = video * frames_per_video + f
                self.samples.append(Sample(f"synthetic:{seed}/{2 * k}", 0, f"synthetic:{seed}/real/{video:05d}", "real"))
                self.samples.append(Sample(f"synthetic:{seed}/{2 * k + 1}", 1, f"synthetic:{seed}/selfblend/{video:05d}",
                                           "selfblend"))

    def pair(self, k: int):
        """(real, fake) PIL images of rendered frame k and the blend's mask (H, W); the last pair is
        cached (a worker that draws 2k then 2k + 1 renders once)."""
        if self._last[0] == (k, self.epoch):
            return self._last[1]
        video, f = divmod(k, self.frames_per_video)
        ident = random_identity(np.random.default_rng((self.seed, _IDENTITY, video)))
        scene = random_scene(np.random.default_rng((self.seed, _SCENE, video)))
        frame_rng = np.random.default_rng((self.seed, _FRAME, video, f))
        face = render_face(ident, scene, jitter_pose(scene.pose, frame_rng), self.image_size)
        rng = np.random.default_rng((self.seed, _FORGERY, video, f, self.epoch))
        sb = self_blend(face, rng, self.strength * rng.uniform(.5, 1))
        out = (*(camera(img, scene, np.random.default_rng((self.seed, _CAMERA, video, f))) for img in sb[:2]), sb.mask)
        self._last = ((k, self.epoch), out)
        return out

    _cache = None   # (N, S, S, C) uint8 once prerender() ran
    _record = None  # (N, S, S) uint8 blending masks, likewise, with `masks`

    def render_key(self):
        """What its frames are drawn from: two data sets of one key hold the same frames."""
        return (type(self).__name__, self.seed, self.image_size, self.strength, self.frames_per_video, len(self),
                self.masks)

    def render(self, index: int):
        """(frame, its blending mask in 8-bit levels, or None without `masks`), uint8."""
        mask = np.round(255 * self.mask(index)).astype(np.uint8) if self.masks else None
        return np.asarray(self.image(index)), mask

    def image(self, index: int) -> Image.Image:
        if self._cache is not None:
            return Image.fromarray(self._cache[index])
        return self.pair(int(index) // 2)[int(index) % 2]

    def mask(self, index: int) -> np.ndarray:
        """The blending mask (H, W) in [0, 1] of sample `index`: zero for a real image."""
        if self._record is not None:
            return self._record[index].astype(np.float32) / 255
        return self.pair(int(index) // 2)[2] * (int(index) % 2)

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if self.masks:
            sample["mask"] = torch.from_numpy(self.mask(index))
        return sample


PROTOCOLS = ("sbi", "cross_method")


class FamilyTestSet(torch.utils.data.Subset):
    """The rows of a shared test set that are real or of one family, with their `samples`."""

    @property
    def samples(self):
        return [self.dataset.samples[i] for i in self.indices]

    def image(self, index: int, forged: bool = True) -> Image.Image:
        return self.dataset.image(self.indices[index], forged)

    def changed(self, index: int) -> np.ndarray:
        return self.dataset.changed(self.indices[index])


def family_test_sets(shared: "SyntheticForgeries") -> dict:
    """{family: the shared test set's real videos and that family's fake videos}: every family
    is scored against the same real videos, rendered once."""
    methods = [s.method for s in shared.samples]
    return {m: FamilyTestSet(shared, [i for i, k in enumerate(methods) if k in ("real", m)]) for m in shared.methods}


def synthetic_splits(*, protocol="sbi", image_size, seed, train_videos, test_videos, frames_per_video,
                     test_frames_per_video=None, train_methods=TRAIN_METHODS, test_methods=HELD_OUT_METHODS,
                     augment=None, strength=STRENGTH, test_real_videos=None, masks=False) -> dict:
    """The benchmark's protocols; each split has its own seed, hence its own identities.

    "sbi" (after SBI, Shiohara & Yamasaki 2022): "train" is real frames and their self-blends
    (`SelfBlendPairs`, `train_videos` real videos, with their blending masks if `masks`), "val" new
    real and self-blended videos; one test set per family ("selfblend" in-domain; "faceswap",
    "partial", "upsample" never seen), each with `test_videos` fake videos against the same
    `test_real_videos` real ones.

    "cross_method" (after the paper's Protocol-2): "train", "val" and "in_domain" use
    `train_methods`, "cross_method" the held-out `test_methods`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    frames = test_frames_per_video or frames_per_video
    test = dict(image_size=image_size, frames_per_video=frames, strength=strength)
    if protocol == "sbi":
        reals = test_real_videos or test_videos
        fakes = len(FORGERY_METHODS) * test_videos
        shared = SyntheticForgeries(methods=FORGERY_METHODS, seed=seed + 1, num_videos=reals + fakes,
                                    real_fraction=reals / (reals + fakes), **test)
        return {"train": SelfBlendPairs(num_videos=train_videos, frames_per_video=frames_per_video, seed=seed,
                                        image_size=image_size, augment=augment, strength=strength, masks=masks),
                "val": SyntheticForgeries(methods=("selfblend",), seed=seed + 3, num_videos=test_videos, **test),
                **family_test_sets(shared)}
    return {"train": SyntheticForgeries(methods=train_methods, num_videos=train_videos, seed=seed, augment=augment,
                                        image_size=image_size, frames_per_video=frames_per_video, strength=strength),
            "val": SyntheticForgeries(methods=train_methods, seed=seed + 3, num_videos=test_videos, **test),
            "in_domain": SyntheticForgeries(methods=train_methods, seed=seed + 1, num_videos=test_videos, **test),
            "cross_method": SyntheticForgeries(methods=test_methods, seed=seed + 2, num_videos=test_videos, **test)}

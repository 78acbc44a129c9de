"""Face-forgery data for DFD-HR: frame folders, DeepfakeBench JSON files, and the training
augmentation of the paper's runs (DeepfakeBench's). The built-in synthetic benchmark is in synthetic/.

The paper trains on FaceForensics++ (c23) face crops and tests across methods and data sets;
its released code reads DeepfakeBench's preprocessed JSON files (`DeepfakeBenchJSON`).

Every data set returns {"image": (3, S, S) CLIP-normalised, "label": 0 real / 1 fake,
"video": unique video id, "method": "real" or the forgery, "source": file or synthetic key}.
Letters: H, W image height and width (H = W = S, the input size), C = 3 colour channels.
"""
import copy
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, default_collate

from vit import CLIP_MEAN, CLIP_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MEAN, _STD = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
_AUGMENT, _HOLD_OUT = 5, 6  # random streams of the augmentation and the validation split, apart from synthetic/'s
MIN_SIDE = 16  # a smaller image cannot be a face crop: it is skipped like an unreadable one


# ----------------------------------------------------------------------------- images

def load_image(path) -> Image.Image:
    """Read an image file as 8-bit RGB (gray, 16-bit gray, palette and RGBA are converted;
    alpha is dropped). A missing file raises FileNotFoundError; an unreadable one, or one with
    a side under MIN_SIDE pixels, ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if min(im.size) < MIN_SIDE:
                raise ValueError(f"image is {im.size[0]}x{im.size[1]}, too small for a face crop")
            if im.mode.startswith("I"):  # 16-bit gray (Pillow modes I;16*, I): 0..65535 -> 0..255
                gray = np.asarray(im, dtype=np.float64) / 257.0
                return Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # not an image, truncated, bad header
        raise ValueError(f"cannot read image {path}: {err}") from err


def resize(img: Image.Image, image_size: int) -> Image.Image:
    """A face crop to S x S, bicubic (DeepfakeBench: cv2 INTER_CUBIC)."""
    return img if img.size == (image_size, image_size) else img.resize((image_size, image_size), Image.BICUBIC)


def to_input(img: Image.Image, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of a (square-ish) face crop: bicubic resize to S x S, [0, 1], normalise."""
    x = (np.asarray(resize(img, image_size), dtype=np.float32) / 255 - _MEAN) / _STD  # (H, W, C)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (C, H, W)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# ----------------------------------------------------------------------------- data sets

class Sample(NamedTuple):
    source: str  # file path, or "synthetic:<seed>/<index>"
    label: int  # 0 real, 1 fake
    video: str  # globally unique video id
    method: str  # "real" or the forgery method


class FrameDataset(Dataset):
    """What the data sets below share: one face crop per sample, returned as the dict of the
    module docstring. `augment(img, rng)` draws from (seed, index, epoch), so set_epoch(e)
    changes it from epoch to epoch, reproducibly and the same in every loader worker."""

    def __init__(self, *, image_size: int, augment, seed: int):
        self.image_size, self.augment, self.seed, self.epoch = image_size, augment, seed, 0
        self.samples: list[Sample] = []

    def image(self, index: int) -> Image.Image:
        return load_image(self.samples[index].source)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        s = self.samples[index]
        try:
            img = self.image(index)
        except ValueError as err:  # corrupt, truncated, not an image, too small: skipped and counted
            return {"skipped": str(err)}
        if self.augment is not None:  # on the face at the model's input size, as DeepfakeBench
            img = self.augment(resize(img, self.image_size),
                               np.random.default_rng((self.seed, _AUGMENT, int(index), self.epoch)))
        return {"image": to_input(img, self.image_size), "label": s.label, "video": s.video,
                "method": s.method, "source": s.source}


def collate(batch: list) -> dict:
    """Default collation of the readable samples; the unreadable ones are listed in "skipped"."""
    good = [b for b in batch if "skipped" not in b]
    out = default_collate(good) if good else {}
    out["skipped"] = [b["skipped"] for b in batch if "skipped" in b]
    return out


# ----------------------------------------------------------------------------- data on disk

def _natural_key(path) -> list:  # "frame_10" after "frame_9"
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def pick_frames(frames: list, frames_per_video, sampling="even") -> list:
    """`frames_per_video` of the sorted frames (all of them if fewer): spread evenly over the video,
    or the first ones, as DeepfakeBench takes them for the paper's runs (sampling="first")."""
    if frames_per_video is None or len(frames) <= frames_per_video:
        return list(frames)
    if sampling == "first":
        return list(frames[:frames_per_video])
    return [frames[i] for i in np.linspace(0, len(frames) - 1, frames_per_video).round().astype(int)]


def hold_out_videos(dataset: FrameDataset, fraction: float, *, seed: int):
    """Split a data set by video into (train, validation), `fraction` of each class's videos held out
    (at least one), chosen by `seed`. Both are copies of `dataset` with fewer samples; the held-out
    part is not augmented."""
    rng = np.random.default_rng((seed, _HOLD_OUT))
    held = set()
    for label in (0, 1):
        videos = sorted({s.video for s in dataset.samples if s.label == label})
        n = max(1, round(fraction * len(videos))) if len(videos) > 1 else 0
        held.update(rng.choice(videos, n, replace=False).tolist() if n else [])
    train, val = copy.copy(dataset), copy.copy(dataset)
    train.samples = [s for s in dataset.samples if s.video not in held]
    val.samples = [s for s in dataset.samples if s.video in held]
    val.augment = None
    return train, val


class FrameFolder(FrameDataset):
    """Face crops on disk: ROOT/real/<video>/<frame> and ROOT/fake/[<method>/]<video>/<frame>
    (.png/.jpg/.jpeg). The video id is the video folder relative to ROOT, e.g.
    "fake/Deepfakes/000_003"; frames of files directly in fake/<video>/ get method "fake".
    A folder without frames (a failed face extraction leaves them) is skipped, listed in
    `skipped_videos` and named in a warning; only a class without any video left stops."""

    def __init__(self, root, *, frames_per_video, image_size, sampling="even", augment=None, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root not found: {root}")
        super().__init__(image_size=image_size, augment=augment, seed=seed)
        self.skipped_videos: list[str] = []  # folders without frames, relative to root
        for label, kind in ((0, "real"), (1, "fake")):
            top = root / kind
            if not top.is_dir():
                raise FileNotFoundError(f"missing folder {top} (expected {kind}/<video>/<frames>)")
            videos, empty = self._videos(top)
            empty = [f.relative_to(root).as_posix() for f in empty]
            self.skipped_videos += empty
            if not videos:
                named = f" ({len(empty)} without frames: {', '.join(empty[:3])})" if empty else ""
                raise ValueError(f"no video folders in {top} with frames ({'/'.join(IMAGE_SUFFIXES)}){named}")
            for folder, frames in videos:
                method = "real" if label == 0 else folder.parent.name if folder.parent != top else "fake"
                video = folder.relative_to(root).as_posix()
                self.samples += [Sample(str(f), label, video, method)
                                 for f in pick_frames(frames, frames_per_video, sampling)]
        if self.skipped_videos:
            print(f"warning: {root}: skipped {len(self.skipped_videos)} video folders without frames: "
                  + ", ".join(self.skipped_videos[:5]) + (", ..." if len(self.skipped_videos) > 5 else ""))

    @staticmethod
    def _videos(top: Path) -> tuple[list, list]:
        """(folder, sorted frames) of every video under `top`, one method level allowed, and the
        folders without frames."""
        videos, empty = [], []
        for folder in _subfolders(top):
            if _frames(folder):
                videos.append((folder, _frames(folder)))
                continue
            subfolders = _subfolders(folder)
            if not subfolders:
                empty.append(folder)
            for video in subfolders:
                if _frames(video):
                    videos.append((video, _frames(video)))
                else:
                    empty.append(video)
        return videos, empty


def _subfolders(folder: Path) -> list:  # hidden ones (.ipynb_checkpoints, ...) left out
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _frames(folder: Path) -> list:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


# Label names used in DeepfakeBench's JSON files (training/config/*.yaml, `label_dict`).
# Names not listed fall back to: containing "real" (any case) -> 0, anything else -> 1.
DEEPFAKEBENCH_LABELS = {
    "FF-real": 0, "FF-DF": 1, "FF-F2F": 1, "FF-FS": 1, "FF-NT": 1, "FF-FH": 1, "FF-SH": 1,
    "DFD_real": 0, "DFD_fake": 1,
    "CelebDFv1_real": 0, "CelebDFv1_fake": 1, "CelebDFv2_real": 0, "CelebDFv2_fake": 1,
    "DFDCP_Real": 0, "DFDCP_FakeA": 1, "DFDCP_FakeB": 1, "DFDC_Real": 0, "DFDC_Fake": 1,
    "DF_real": 0, "DF_fake": 1, "UADFV_Real": 0, "UADFV_Fake": 1, "roop_Real": 0, "roop_Fake": 1,
}


def deepfakebench_label(name: str) -> int:
    return DEEPFAKEBENCH_LABELS.get(name, 0 if "real" in name.lower() else 1)


class DeepfakeBenchJSON(FrameDataset):
    """A data set described by one of DeepfakeBench's preprocessed JSON files, laid out as
    {dataset: {label_name: {split: [{compression}:] {video: {"label": label_name, "frames": [paths]}}}}}
    with split "train" / "val" / "test" and a compression level ("c23", "c40", "raw") only for
    the FaceForensics++ family; it is detected by the absence of "frames" one level down.
    Relative frame paths (Windows separators allowed) are resolved against `data_root`, or
    the JSON's folder. The video id is "<label_name>/<video>", unique across methods."""

    def __init__(self, json_path, *, dataset, split, frames_per_video, image_size, sampling="even",
                 compression="c23", data_root=None, augment=None, seed=0):
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"DeepfakeBench JSON not found: {json_path}")
        info = json.loads(json_path.read_text())
        if dataset not in info:
            raise ValueError(f"{json_path}: no data set {dataset!r} (has {sorted(info)})")
        base = Path(data_root) if data_root is not None else json_path.parent
        super().__init__(image_size=image_size, augment=augment, seed=seed)
        for label_name, splits in info[dataset].items():
            if split not in splits:
                raise ValueError(f"{json_path}: no split {split!r} in {dataset}/{label_name} (has {sorted(splits)})")
            videos = splits[split]
            if videos and all("frames" not in v for v in videos.values()):  # keyed by compression
                if compression not in videos:
                    raise ValueError(f"{json_path}: no compression {compression!r} in {dataset}/{label_name}/{split} "
                                     f"(has {sorted(videos)})")
                videos = videos[compression]
            for name, video in videos.items():
                video_label = video.get("label", label_name)
                label = deepfakebench_label(video_label)
                frames = sorted((Path(p.replace("\\", "/")) for p in video["frames"]), key=_natural_key)
                for f in pick_frames(frames, frames_per_video, sampling):  # a video without frames adds nothing
                    self.samples.append(Sample(str(f if f.is_absolute() else base / f), label,
                                               f"{video_label}/{name}", "real" if label == 0 else video_label))
        if not self.samples:
            raise ValueError(f"{json_path}: no frames for {dataset}/{split}")
        missing = [s.source for s in self.samples if not Path(s.source).is_file()]
        if missing:
            raise FileNotFoundError(f"{json_path}: {len(missing)} frame files missing, first: {missing[:3]} "
                                    f"(relative paths resolve against {base})")


# ----------------------------------------------------------------------------- augmentation

class Augment:
    """The training augmentation of the paper's runs, as DeepfakeBench applies it after resizing
    the face to the model's input: each operation in this order, independently, with its
    probability. `probability` scales every probability (1 = DeepfakeBench's). Called as
    `augment(img, rng)`: the same numpy Generator state gives the same result."""

    OPS = (("hflip", .5), ("brightness_contrast", .5), ("hue_saturation_value", .3), ("jpeg", .1),
           ("gauss_noise", .1), ("motion_blur", .1), ("clahe", .1), ("channel_shuffle", .1), ("cutout", .1),
           ("gamma", .3), ("glass_blur", .3))

    def __init__(self, *, probability: float = 1.0, seed=None):
        self.probability = probability
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: Image.Image, rng: np.random.Generator = None) -> Image.Image:
        rng = self.rng if rng is None else rng
        for name, p in self.OPS:
            if rng.random() < p * self.probability:
                img = getattr(self, name)(img, rng)
        return img

    @staticmethod
    def hflip(img, rng):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    @staticmethod
    def brightness_contrast(img, rng):  # x·(1 + c) + 255·b, c and b in ±0.2
        x = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2) + 255 * rng.uniform(-0.2, 0.2)
        return _image(x)

    @staticmethod
    def hue_saturation_value(img, rng):  # hue ±20 of OpenCV's 180 steps (±40°), saturation ±30, value ±20
        hsv = np.asarray(img.convert("HSV"), np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-20, 20) * 256 / 180) % 256
        hsv[..., 1:] += [rng.uniform(-30, 30), rng.uniform(-20, 20)]
        return Image.fromarray(np.clip(hsv + 0.5, 0, 255).astype(np.uint8), "HSV").convert("RGB")

    @staticmethod
    def jpeg(img, rng):
        return _jpeg(img, rng.integers(40, 101))

    @staticmethod
    def gauss_noise(img, rng):  # variance 10-50 (in 8-bit steps²)
        x = np.asarray(img, np.float32)
        return _image(x + rng.normal(0.0, np.sqrt(rng.uniform(10, 50)), x.shape))

    @staticmethod
    def motion_blur(img, rng):  # the mean along a line of 3, 5 or 7 pixels through each pixel, any angle
        r = int(rng.choice([1, 2, 3]))
        angle, t = rng.uniform(0, np.pi), np.linspace(-r, r, 8 * r + 1)
        offsets = sorted(set(zip(np.round(t * np.sin(angle)).astype(int), np.round(t * np.cos(angle)).astype(int))))
        x = np.pad(np.asarray(img, np.float32), ((r, r), (r, r), (0, 0)), mode="edge")
        h, w = img.height, img.width
        return _image(sum(x[r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets) / len(offsets))

    @staticmethod
    def clahe(img, rng):  # contrast-limited adaptive histogram equalisation of the lightness, 8×8 tiles
        lab = np.array(img.convert("LAB"))
        lab[..., 0] = clahe(lab[..., 0], clip_limit=rng.uniform(1, 4))
        return Image.fromarray(lab, "LAB").convert("RGB")

    @staticmethod
    def channel_shuffle(img, rng):
        return Image.fromarray(np.asarray(img)[..., rng.permutation(3)])

    @staticmethod
    def cutout(img, rng):  # 8 black squares of 8 pixels
        x = np.array(img)
        for top, left in zip(rng.integers(0, x.shape[0], 8), rng.integers(0, x.shape[1], 8)):
            x[top:top + 8, left:left + 8] = 0
        return Image.fromarray(x)

    @staticmethod
    def gamma(img, rng):  # gamma 0.8-1.2
        g = rng.uniform(0.8, 1.2)
        return img.point([round(255 * (i / 255) ** g) for i in range(256)] * 3)

    @staticmethod
    def glass_blur(img, rng):  # blur σ 0.7, twice every pixel takes a neighbour's value up to 4 away, blur again
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)))
        h, w = x.shape[:2]
        for _ in range(2):
            rows = np.clip(np.arange(h)[:, None] + rng.integers(-4, 5, (h, w)), 0, h - 1)
            cols = np.clip(np.arange(w)[None, :] + rng.integers(-4, 5, (h, w)), 0, w - 1)
            x = x[rows, cols]
        return Image.fromarray(x).filter(ImageFilter.GaussianBlur(0.7))


def _image(x):  # float (H, W, C) in 8-bit units -> uint8 RGB
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


def clahe(channel, *, clip_limit, tiles=8):
    """Contrast-limited adaptive histogram equalisation of a uint8 (H, W) channel: each tile's
    histogram is clipped at clip_limit × its mean count (the excess spread over all bins) and
    turned into a mapping; each pixel blends the mappings of its four nearest tile centres."""
    h, w = channel.shape
    ys, xs = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    maps = np.empty((tiles, tiles, 256))
    for i in range(tiles):
        for j in range(tiles):
            hist = np.bincount(channel[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].ravel(), minlength=256).astype(float)
            limit = max(1.0, clip_limit * hist.sum() / 256)
            hist = np.minimum(hist, limit) + (hist - np.minimum(hist, limit)).sum() / 256
            maps[i, j] = np.round(255 * np.cumsum(hist) / max(hist.sum(), 1))
    cy, cx = (ys[:-1] + ys[1:]) / 2, (xs[:-1] + xs[1:]) / 2  # tile centres
    fy = np.clip(np.interp(np.arange(h), cy, np.arange(tiles)), 0, tiles - 1)  # (H,) tile coordinate
    fx = np.clip(np.interp(np.arange(w), cx, np.arange(tiles)), 0, tiles - 1)
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    v = channel
    out = ((1 - wy) * ((1 - wx) * maps[y0[:, None], x0[None, :], v] + wx * maps[y0[:, None], x1[None, :], v])
           + wy * ((1 - wx) * maps[y1[:, None], x0[None, :], v] + wx * maps[y1[:, None], x1[None, :], v]))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)

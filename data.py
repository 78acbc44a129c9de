"""Face-forgery data for DFD-HR: real frame folders, DeepfakeBench JSON files, and the
training augmentation of SPEC §6. The built-in synthetic benchmark is in synthetic.py.

The paper trains on FaceForensics++ (c23) face crops and tests across methods and data sets;
its released code reads DeepfakeBench's preprocessed JSON files (`DeepfakeBenchJSON`).

Every data set returns {"image": (C, S, S) CLIP-normalised, "label": 0 real / 1 fake,
"video": unique video id, "method": "real" or the forgery, "source": file or synthetic key}.
Letters: H, W image height and width (H = W = S, the input size), C = 3 colour channels.
"""
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import Dataset, default_collate

from vit import CLIP_MEAN, CLIP_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MEAN, _STD = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
_AUGMENT = 5  # random stream of the augmentation, apart from those of the synthetic data
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


def to_input(img: Image.Image, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of a (square-ish) face crop: bicubic resize to S x S, [0, 1], normalise."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255 - _MEAN) / _STD  # (H, W, C)
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
        if self.augment is not None:
            img = self.augment(img, np.random.default_rng((self.seed, _AUGMENT, int(index), self.epoch)))
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


def _evenly(frames: list, frames_per_video) -> list:
    """`frames_per_video` frames spread evenly over the sorted list (all of them if fewer)."""
    if frames_per_video is None or len(frames) <= frames_per_video:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, frames_per_video).round().astype(int)]


class FrameFolder(FrameDataset):
    """Face crops on disk: ROOT/real/<video>/<frame> and ROOT/fake/[<method>/]<video>/<frame>
    (.png/.jpg/.jpeg). The video id is the video folder relative to ROOT, e.g.
    "fake/Deepfakes/000_003"; frames of files directly in fake/<video>/ get method "fake"."""

    def __init__(self, root, *, frames_per_video, image_size, augment=None, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root not found: {root}")
        super().__init__(image_size=image_size, augment=augment, seed=seed)
        for label, kind in ((0, "real"), (1, "fake")):
            top = root / kind
            if not top.is_dir():
                raise FileNotFoundError(f"missing folder {top} (expected {kind}/<video>/<frames>)")
            videos = self._videos(top)
            if not videos:
                raise ValueError(f"no video folders in {top}")
            for folder, frames in videos:
                method = "real" if label == 0 else folder.parent.name if folder.parent != top else "fake"
                video = folder.relative_to(root).as_posix()
                self.samples += [Sample(str(f), label, video, method) for f in _evenly(frames, frames_per_video)]

    @staticmethod
    def _videos(top: Path) -> list:
        """(folder, sorted frames) of every video under `top`; one method level is allowed."""
        videos = []
        for folder in _subfolders(top):
            if _frames(folder):
                videos.append((folder, _frames(folder)))
                continue
            subfolders = _subfolders(folder)
            if not subfolders:
                raise ValueError(f"empty folder {folder}")
            for video in subfolders:
                if not _frames(video):
                    raise ValueError(f"no frames ({'/'.join(IMAGE_SUFFIXES)}) in {video}")
                videos.append((video, _frames(video)))
        return videos


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

    def __init__(self, json_path, *, dataset, split, frames_per_video, image_size,
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
                for f in _evenly(frames, frames_per_video):  # a video without frames adds nothing
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
    """SPEC §6 training augmentation: horizontal flip (probability `flip_p`), then each of
    brightness/contrast, hue/saturation, JPEG quality 40-100, Gaussian noise, motion or glass
    blur, gamma and cutout with probability `p`. Called as `augment(img, rng)`: the same
    numpy Generator state gives the same result; without rng it uses its own (from `seed`)."""

    def __init__(self, *, p: float = 0.2, flip_p: float = 0.5, seed=None):
        self.p, self.flip_p = p, flip_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: Image.Image, rng: np.random.Generator = None) -> Image.Image:
        rng = self.rng if rng is None else rng
        if rng.random() < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.p:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
        if rng.random() < self.p:
            h, s, v = img.convert("HSV").split()
            shift = int(rng.integers(-10, 11))  # hue is a circle of 256 steps
            h = h.point([(i + shift) % 256 for i in range(256)])
            img = ImageEnhance.Color(Image.merge("HSV", (h, s, v)).convert("RGB")).enhance(rng.uniform(0.7, 1.3))
        if rng.random() < self.p:
            img = _jpeg(img, rng.integers(40, 101))
        if rng.random() < self.p:
            x = np.asarray(img, dtype=np.float32) + rng.normal(0.0, rng.uniform(2.0, 10.0), (img.height, img.width, 3))
            img = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
        if rng.random() < self.p:
            img = self._motion_blur(img, rng) if rng.random() < 0.5 else self._glass_blur(img, rng)
        if rng.random() < self.p:
            gamma = rng.uniform(0.8, 1.25)
            img = img.point([round(255 * (i / 255) ** gamma) for i in range(256)] * 3)
        if rng.random() < self.p:
            x = np.array(img)
            side = int(min(x.shape[:2]) * rng.uniform(0.1, 0.3))
            top, left = rng.integers(0, x.shape[0] - side + 1), rng.integers(0, x.shape[1] - side + 1)
            x[top:top + side, left:left + side] = 0
            img = Image.fromarray(x)
        return img

    @staticmethod
    def _motion_blur(img, rng):  # a 5-pixel line kernel: horizontal, vertical or diagonal
        k, i, kind = np.zeros((5, 5)), np.arange(5), rng.integers(4)
        k[(2, i) if kind == 0 else (i, 2) if kind == 1 else (i, i if kind == 2 else 4 - i)] = 1
        return img.filter(ImageFilter.Kernel((5, 5), k.ravel().tolist(), scale=k.sum()))

    @staticmethod
    def _glass_blur(img, rng):  # blur, then every pixel takes the value of a random neighbour
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)))
        h, w = x.shape[:2]
        rows = np.clip(np.arange(h)[:, None] + rng.integers(-1, 2, (h, w)), 0, h - 1)
        cols = np.clip(np.arange(w)[None, :] + rng.integers(-1, 2, (h, w)), 0, w - 1)
        return Image.fromarray(x[rows, cols])

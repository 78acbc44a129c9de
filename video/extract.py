"""Face crops from videos: the preprocessing that turns FaceForensics++, Celeb-DF v2 or any tree of
real and fake videos into the frame folders that data.FrameFolder reads (README "From videos").

    python -m video.extract VIDEOS_ROOT OUT_ROOT [--frames=32] [--size=256] [--workers=1] [--detector=dlib|haar]
                      [--compression=c23] [--only=LIST|SPLIT.json] [--json=PATH --split=train]

As DeepfakeBench's preprocessing, on which the paper's data rest: N frames taken evenly from each
video (32, its test setting; 8 are enough for training sets), the largest face in each, a square
crop around it enlarged x1.3, resized to S x S and written as PNG to OUT_ROOT/real/<video>/ or
OUT_ROOT/fake/<method>/<video>/, named by frame index. Where a frame shows no face, the video's last
box is reused (before the first detection, the next one).

Layouts known by name, anywhere under VIDEOS_ROOT:
  FaceForensics++  original_sequences/<youtube|actors>/<c23|c40|raw>/videos/*  -> real/
                   manipulated_sequences/<method>/<level>/videos/*             -> fake/<method>/
  Celeb-DF v2      Celeb-real/*, YouTube-real/* -> real/;  Celeb-synthesis/*   -> fake/Celeb-synthesis/
  anything else    VIDEOS_ROOT/real/*, VIDEOS_ROOT/fake/* and VIDEOS_ROOT/fake/<method>/*
Other video files (FF++'s masks/videos, ...) are counted and left alone.

A video is finished when its folder holds done.json (frame indices, face boxes, squares cut), written
last: a rerun skips finished videos and redoes half-written ones. Empty files, unreadable videos
and videos without a face in any frame are skipped and listed with the reason in
OUT_ROOT/skipped_videos.txt; the run goes on.

Detectors (video/requirements.txt; see README "From videos" for how they compare):
  dlib  dlib's HOG frontal-face detector (pip install dlib-bin), the default;
  haar  OpenCV's Haar cascade haarcascade_frontalface_default.xml (in OpenCV 4's cv2/data).
Letters: H, W frame height and width; S crop side. A box is (x, y, w, h) in frame pixels.
"""
import functools
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

import cli

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
SCALE = 1.3        # crop side / longer side of the face box (DeepfakeBench, after FaceForensics++)
DETECT_SIDE = 960  # frames are searched at most this large: faster, and a 1080p face stays above 80 px
MIN_FACE = 40      # px at that scale, searched only where no face of 80 px is; a smaller one is too blurred
DONE = "done.json"
REPORT = "skipped_videos.txt"

FFPP_LEVELS = ("raw", "c23", "c40")  # FF++'s compression levels; <method>/masks/videos/ holds masks, not faces
# FF++ folder names -> DeepfakeBench's label names (data.DEEPFAKEBENCH_LABELS), used by --json.
FFPP_LABELS = {"youtube": "FF-real", "actors": "DFD_real", "Deepfakes": "FF-DF", "Face2Face": "FF-F2F",
               "FaceSwap": "FF-FS", "NeuralTextures": "FF-NT", "FaceShifter": "FF-FH", "DeepFakeDetection": "DFD_fake"}
# Celeb-DF v2 folder -> (label, DeepfakeBench's label name).
CELEBDF = {"Celeb-real": (0, "CelebDFv2_real"), "YouTube-real": (0, "CelebDFv2_real"),
           "Celeb-synthesis": (1, "CelebDFv2_fake")}


class VideoError(ValueError):
    """A video that yields no face crops: empty, unreadable, or no face in any frame taken."""


def _need(module: str, package: str):
    """Import an optional extra, or say which package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"video/extract.py needs {package} for {module}: pip install '{package}' "
                          f"(or pip install -r video/requirements.txt)") from err


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# ----------------------------------------------------------------------------- which videos

class Video(NamedTuple):
    source: Path      # the video file
    label: int        # 0 real, 1 fake
    method: str       # "real", or the forgery: "Deepfakes", "Celeb-synthesis", a fake/<method> name, "fake"
    folder: str       # output folder relative to OUT_ROOT, also data.FrameFolder's video id
    level: str        # FF++ compression level ("c23"), "" elsewhere
    label_name: str   # DeepfakeBench's label name, for --json


def classify(path: Path, root: Path):
    """The Video that `path` is in one of the known layouts, or None."""
    parts, name = path.relative_to(root).parts, path.stem
    for i, part in enumerate(parts):  # FF++: <sequences>/<source or method>/<level>/videos/<file>
        if (part in ("original_sequences", "manipulated_sequences") and len(parts) == i + 5
                and parts[i + 2] in FFPP_LEVELS and parts[i + 3] == "videos"):
            kind, level = parts[i + 1], parts[i + 2]
            if part == "original_sequences":
                return Video(path, 0, "real", f"real/{name}", level, FFPP_LABELS.get(kind, "FF-real"))
            return Video(path, 1, kind, f"fake/{kind}/{name}", level, FFPP_LABELS.get(kind, kind))
    if len(parts) >= 2 and parts[-2] in CELEBDF:
        label, label_name = CELEBDF[parts[-2]]
        return Video(path, label, "real", f"real/{name}", "", label_name) if label == 0 else \
            Video(path, 1, parts[-2], f"fake/{parts[-2]}/{name}", "", label_name)
    if parts[0] == "real" and len(parts) == 2:
        return Video(path, 0, "real", f"real/{name}", "", "real")
    if parts[0] == "fake" and len(parts) in (2, 3):
        method = parts[1] if len(parts) == 3 else "fake"
        return Video(path, 1, method, "/".join(parts[:-1] + (name,)), "", method)
    return None


def find_videos(root: Path, compression: str = "", only: str = "") -> tuple[list, list]:
    """(videos to extract, video files outside the known layouts). `compression` keeps one FF++
    level. `only` names a list of the videos to keep: lines ending in a path relative to
    VIDEOS_ROOT (Celeb-DF's List_of_testing_videos.txt), or one of FF++'s split files
    (splits/train.json, pairs of source ids: [["071", "054"], ...] keeps 071, 054, 071_054, 054_071)."""
    files = sorted(p for p in root.rglob("*") if is_video(p) and p.is_file() and not p.name.startswith("."))
    known = [(p, classify(p, root)) for p in files]
    videos, ignored = [v for p, v in known if v is not None], [p for p, v in known if v is None]
    levels = sorted({v.level for v in videos if v.level})
    if compression:
        videos = [v for v in videos if v.level in ("", compression)]
    elif len(levels) > 1:
        raise SystemExit(f"{root}: FF++ videos at several compression levels ({', '.join(levels)}); "
                         f"choose one with --compression={levels[0]}")
    if only:
        text = Path(only).read_text()
        if only.endswith(".json"):
            ids = {i for a, b in json.loads(text) for i in (a, b, f"{a}_{b}", f"{b}_{a}")}
            kept = [v for v in videos if v.level and v.source.stem in ids]
        else:
            paths = {line.split()[-1] for line in text.splitlines() if line.strip()}
            kept = [v for v in videos if v.source.relative_to(root).as_posix() in paths]
        print(f"{only}: {len(kept)} of the {len(videos)} videos under {root} are listed")
        videos = kept
    seen = {}
    for v in videos:  # two sources, one output folder: stop before writing anything
        if v.folder in seen:
            raise SystemExit(f"{seen[v.folder].source} and {v.source} would both be written to {v.folder}")
        seen[v.folder] = v
    return videos, ignored


# ----------------------------------------------------------------------------- frames and faces

def read_frames(path: Path, n: int) -> tuple[list, list]:
    """n frames spread evenly over the video (all of them if fewer), RGB (H, W, 3), and their
    indices. The container's frame count is only a hint: where decoding ends early, or the count
    is missing, the frames are counted and the video is read again."""
    cv2 = _need("cv2", "opencv-python-headless<5")
    count = None
    for attempt in range(2):
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise VideoError(f"{path}: not a readable video (OpenCV cannot open it)")
        total = count if count is not None else int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()) if total > 0 else set()
        frames, indices, decoded = [], [], 0
        while len(indices) < len(wanted) or not wanted:
            if not cap.grab():
                break
            if decoded in wanted:
                ok, bgr = cap.retrieve()
                if ok:
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    indices.append(decoded)
            decoded += 1
        cap.release()
        if decoded == 0:
            raise VideoError(f"{path}: not a readable video (no frame decodes)")
        if len(indices) == len(wanted) > 0 or attempt == 1:
            break
        count = decoded  # the container's count was wrong: n frames evenly over those really there
    if not frames:
        raise VideoError(f"{path}: not a readable video (no frame decodes)")
    return frames, indices


@functools.lru_cache(maxsize=None)
def load_detector(name: str):
    """A function RGB frame (H, W, 3) uint8 -> face boxes [(x, y, w, h)], loaded once per process."""
    if name == "haar":
        cv2 = _need("cv2", "opencv-python-headless<5")
        xml = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
        if not xml.is_file():
            raise ImportError(f"OpenCV {cv2.__version__} ships no Haar cascade ({xml} is missing; version 5 "
                              f"dropped them): pip install 'opencv-python-headless<5'")
        cascade = cv2.CascadeClassifier(str(xml))

        def haar(rgb):
            gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
            for side in (2 * MIN_FACE, MIN_FACE):  # as dlib's below; small windows cost most (4x at 40 px)
                found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
                if len(found):
                    break
            return [tuple(int(v) for v in box) for box in found]
        return haar
    if name == "dlib":
        hog = _need("dlib", "dlib-bin").get_frontal_face_detector()

        def dlib_hog(rgb):
            for upsample in (0, 1):  # the HOG window is 80 px = 2 * MIN_FACE; upsampled once, 40 px, at 4x the time
                found = hog(rgb, upsample)
                if found:
                    break
            return [(r.left(), r.top(), r.width(), r.height()) for r in found]
        return dlib_hog
    raise ValueError(f"unknown detector {name!r}: choose dlib or haar")


def largest_face(rgb: np.ndarray, detect):
    """The largest face box in a frame, searched at most DETECT_SIDE large, or None."""
    cv2 = _need("cv2", "opencv-python-headless<5")
    h, w = rgb.shape[:2]
    s = min(1.0, DETECT_SIDE / max(h, w))
    small = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else rgb
    boxes = detect(small)
    if not boxes:
        return None
    x, y, bw, bh = max(boxes, key=lambda b: b[2] * b[3])
    return round(x / s), round(y / s), round(bw / s), round(bh / s)


def square(box, width: int, height: int) -> tuple[int, int, int]:
    """The crop (x0, y0, side): SCALE times the box's longer side, centred on the box, at most the
    frame's shorter side, shifted (not shrunk) to lie inside the frame."""
    x, y, w, h = box
    side = min(round(max(w, h) * SCALE), width, height)
    x0 = min(max(round(x + w / 2 - side / 2), 0), width - side)
    y0 = min(max(round(y + h / 2 - side / 2), 0), height - side)
    return x0, y0, side


class Faces(NamedTuple):
    crops: list          # S x S RGB PIL images, one per frame taken
    frame_indices: list  # their indices in the video
    boxes: list          # the face box (x, y, w, h) each crop is built on
    detected: list       # whether that box was found in that very frame (else reused from a neighbour)
    squares: list        # the square cut from the frame, (x0, y0, side)


def video_faces(path, *, frames: int = 32, size: int = 256, detector: str = "dlib") -> Faces:
    """The face crops of one video, as the extraction writes them. Raises VideoError for an empty
    or unreadable file, or a video without a face in any of the frames taken."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    cv2 = _need("cv2", "opencv-python-headless<5")
    rgbs, indices = read_frames(path, frames)
    detect = load_detector(detector)
    found = [largest_face(rgb, detect) for rgb in rgbs]
    if all(b is None for b in found):
        raise VideoError(f"{path}: no face found in any of the {len(rgbs)} frames taken ({detector} detector)")
    first = next(b for b in found if b is not None)
    boxes, last = [], first  # before the first detection: the next box found; after: the last one
    for b in found:
        last = b if b is not None else last
        boxes.append(last)
    crops, squares = [], []
    for rgb, box in zip(rgbs, boxes):
        x0, y0, side = square(box, rgb.shape[1], rgb.shape[0])
        shrink = side > size  # area averaging to shrink, bicubic to enlarge
        crop = cv2.resize(rgb[y0:y0 + side, x0:x0 + side], (size, size),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)  # (S, S, 3)
        crops.append(Image.fromarray(crop))
        squares.append((x0, y0, side))
    return Faces(crops, indices, boxes, [b is not None for b in found], squares)


# ----------------------------------------------------------------------------- the command

def extract_one(job) -> tuple:
    """Extract one video into its folder. Returns (video, "extracted" | "done" | "skipped", detail)."""
    video, out_root, frames, size, detector = job
    folder, settings = out_root / video.folder, {"frames_per_video": frames, "size": size, "detector": detector}
    if (folder / DONE).is_file() and json.loads((folder / DONE).read_text()).get("settings") == settings:
        return video, "done", ""
    if folder.exists():  # half-written by an interrupted run, or written with other settings
        shutil.rmtree(folder)
    try:
        faces = video_faces(video.source, frames=frames, size=size, detector=detector)
    except VideoError as err:
        return video, "skipped", str(err)
    folder.mkdir(parents=True)
    for index, crop in zip(faces.frame_indices, faces.crops):
        crop.save(folder / f"{index:04d}.png")
    record = {"source": str(video.source), "settings": settings, "frames": faces.frame_indices,
              "boxes": faces.boxes, "detected": faces.detected, "squares": faces.squares}
    (folder / (DONE + ".tmp")).write_text(json.dumps(record))
    os.replace(folder / (DONE + ".tmp"), folder / DONE)  # last, and atomic: the folder is complete
    return video, "extracted", f"{len(faces.crops)} frames"


def write_json(path: Path, videos: list, out_root: Path, split: str):
    """DeepfakeBench's {dataset: {label_name: {split: [{level}:] {video: {"label", "frames"}}}}}
    (data.DeepfakeBenchJSON) for the finished videos; dataset = the file's stem, frame paths
    relative to the file's folder."""
    tree = {}
    for v in videos:
        done = out_root / v.folder / DONE
        if not done.is_file():
            continue
        node = tree.setdefault(v.label_name, {}).setdefault(split, {})
        node = node.setdefault(v.level, {}) if v.level else node
        node[Path(v.folder).name] = {"label": v.label_name, "frames": [
            Path(os.path.relpath(out_root / v.folder / f"{i:04d}.png", path.parent)).as_posix()
            for i in json.loads(done.read_text())["frames"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({path.stem: tree}, indent=1))


def _clock(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def _one_thread():  # each worker process decodes and detects on one core
    _need("cv2", "opencv-python-headless<5").setNumThreads(1)


@dataclass(frozen=True)
class Options:
    videos_root: Path = Path()   # the videos (first argument)
    out_root: Path = Path()      # the frame folders (second argument)
    frames: int = 32             # frames per video, evenly spread (DeepfakeBench: 32 test, 8 train)
    size: int = 256              # crop side S in pixels (DeepfakeBench: 256)
    workers: int = 1             # processes, one video each
    detector: str = "dlib"       # "dlib" or "haar"
    compression: str = ""        # FF++ level to take (c23, c40, raw) when several are present
    only: str = ""               # the videos to take: paths relative to VIDEOS_ROOT (Celeb-DF's
                                 # List_of_testing_videos.txt) or FF++'s splits/*.json
    json: str = ""               # also write a DeepfakeBench JSON file here
    split: str = "train"         # the split the JSON files the videos under


def main(argv=()):
    args = Options(**cli.parse(argv, Options, positional=("videos_root", "out_root"))[0])
    if not args.videos_root.is_dir():
        raise SystemExit(f"{args.videos_root}: no such folder")
    if args.frames < 1 or args.size < 1 or args.workers < 1:
        raise SystemExit("--frames, --size and --workers must be at least 1")
    if args.detector not in ("dlib", "haar"):
        raise SystemExit(f"--detector={args.detector}: choose dlib or haar")
    try:
        load_detector(args.detector)  # a missing package is named now, not once per worker
    except ImportError as err:
        raise SystemExit(str(err)) from None

    videos, ignored = find_videos(args.videos_root, args.compression, args.only)
    if ignored:
        print(f"{len(ignored)} video files outside the known layouts left alone, e.g. {ignored[0]}")
    if not videos:
        raise SystemExit(f"{args.videos_root}: no videos in a known layout (FF++, Celeb-DF v2, or real/ and fake/)")
    methods = sorted({v.method for v in videos if v.label == 1})
    print(f"{len(videos)} videos ({sum(v.label == 0 for v in videos)} real, {sum(v.label == 1 for v in videos)} fake: "
          f"{', '.join(methods)}) -> {args.out_root}, {args.frames} frames of {args.size} px, {args.detector} detector")
    args.out_root.mkdir(parents=True, exist_ok=True)
    jobs = [(v, args.out_root, args.frames, args.size, args.detector) for v in videos]
    status, skipped = {"extracted": 0, "done": 0, "skipped": 0}, []
    start = shown = time.time()
    spawn = multiprocessing.get_context("spawn")  # fresh workers: a fork inherits OpenCV's thread pool half-alive
    with spawn.Pool(args.workers, initializer=_one_thread) if args.workers > 1 else nullcontext() as pool:
        results = pool.imap_unordered(extract_one, jobs) if pool else map(extract_one, jobs)
        for k, (video, state, detail) in enumerate(results, 1):
            status[state] += 1
            if state == "skipped":
                skipped.append((video.source, detail))
            now, worked = time.time(), k - status["done"]  # finished videos cost nothing
            if now - shown >= 5 or k == len(jobs):
                eta = (now - start) / max(worked, 1) * (len(jobs) - k)
                print(f"[{k}/{len(jobs)}] {status['extracted']} extracted, {status['done']} already done, "
                      f"{status['skipped']} skipped; {_clock(now - start)} elapsed, ETA {_clock(eta)}", flush=True)
                shown = now

    report = args.out_root / REPORT
    if skipped:
        report.write_text("".join(f"{source}\t{reason.removeprefix(f'{source}: ')}\n"
                                  for source, reason in sorted(skipped)))
    elif report.exists():  # a stale report from an earlier run would mislead
        report.unlink()
    if args.json:
        write_json(Path(args.json), videos, args.out_root, args.split)
    print(f"done: {status['extracted']} extracted, {status['done']} already done, {status['skipped']} skipped"
          + (f" (listed with the reason in {report})" if skipped else "")
          + (f"; DeepfakeBench JSON {args.json}" if args.json else ""))
    return status


if __name__ == "__main__":
    main(sys.argv[1:])

"""video/extract.py on real decoding and detection: videos written with OpenCV from a real photograph
(matplotlib's grace_hopper.jpg) moved across the frame, laid out like FaceForensics++ and
Celeb-DF v2, extracted, then read by data.FrameFolder / data.DeepfakeBenchJSON and trained on."""
import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

cv2 = pytest.importorskip("cv2", reason="the video extra is not installed: pip install -r video/requirements.txt")

import data  # noqa: E402  (after the skip: extract.py needs cv2)
import predict  # noqa: E402
import train  # noqa: E402
from video import extract  # noqa: E402

pytestmark = pytest.mark.slow  # real video decoding and detection
ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ["haar", pytest.param("dlib", marks=pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None, reason="dlib-bin (video/requirements.txt) is not installed"))]

PHOTO = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
PHOTO_FACE = (175, 140, 360, 315)  # (x0, y0, x1, y1) by eye in the 512x600 photo: brim of the cap to chin, ear to ear
W, H, SCALE, TOP = 480, 320, 0.45, 25  # video frame; the photo is drawn at SCALE, TOP px down, moving left to right
SMALL = np.asarray(Image.fromarray(PHOTO).resize((round(512 * SCALE), round(600 * SCALE)), Image.BICUBIC))


def left(k, n):  # where the photo is drawn in frame k of n
    return round((W - SMALL.shape[1]) * k / (n - 1))


def drawn_face(k, n):  # (x0, y0, x1, y1) of the face in frame k
    x0, y0, x1, y1 = (SCALE * v for v in PHOTO_FACE)
    return x0 + left(k, n), y0 + TOP, x1 + left(k, n), y1 + TOP


def frame(k, n, blank=()):
    img = np.empty((H, W, 3), np.uint8)
    img[:] = np.linspace(60, 160, W, dtype=np.uint8)[None, :, None]  # a smooth background, no face in it
    if k not in blank:
        img[TOP:TOP + SMALL.shape[0], left(k, n):left(k, n) + SMALL.shape[1]] = SMALL
    return img


def write_video(path, n=12, blank=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (W, H))
    assert out.isOpened()
    for k in range(n):
        out.write(cv2.cvtColor(frame(k, n, blank), cv2.COLOR_RGB2BGR))
    out.release()


def iou(a, b):  # boxes as (x0, y0, x1, y1)
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def corners(box):  # (x, y, w, h) -> (x0, y0, x1, y1)
    return box[0], box[1], box[0] + box[2], box[1] + box[3]


def on_face(box, face):
    """A detector's box (x, y, w, h) on the face (x0, y0, x1, y1): overlapping it (detectors differ
    on forehead and chin: Haar's box is ~30 % wider than our by-eye face) and centred on it."""
    x0, y0, x1, y1 = corners(box)
    off = np.hypot((x0 + x1 - face[0] - face[2]) / 2, (y0 + y1 - face[1] - face[3]) / 2)
    return iou((x0, y0, x1, y1), face) > 0.4 and off < 0.15 * (face[2] - face[0])


@pytest.mark.parametrize("detector", DETECTORS)
def test_detects_the_face_in_a_real_photograph_and_none_in_the_flag(detector):
    detect = extract.load_detector(detector)
    box = extract.largest_face(PHOTO, detect)
    assert box is not None and on_face(box, PHOTO_FACE), box
    assert extract.largest_face(np.ascontiguousarray(PHOTO[:300, :150]), detect) is None  # stars and stripes


@pytest.mark.parametrize("detector", DETECTORS)
def test_video_faces_follow_the_drawn_face(tmp_path, detector):
    n, blank = 20, (0, 11)  # the face is missing in frames 0 and 11
    write_video(tmp_path / "clip.mp4", n, blank)
    faces = extract.video_faces(tmp_path / "clip.mp4", frames=8, size=64, detector=detector)
    idx = faces.frame_indices
    assert len(faces.crops) == len(idx) == 8 and all(c.size == (64, 64) and c.mode == "RGB" for c in faces.crops)
    assert idx[0] == 0 and idx[-1] == n - 1 and all(2 <= b - a <= 3 for a, b in zip(idx, idx[1:]))  # evenly
    assert 0 in idx and 11 in idx
    for j, k in enumerate(idx):
        assert faces.detected[j] == (k not in blank)
        if faces.detected[j]:
            assert on_face(faces.boxes[j], drawn_face(k, n)), (k, faces.boxes[j], drawn_face(k, n))
    assert faces.boxes[idx.index(0)] == faces.boxes[idx.index(3)]  # before the first face: the next box
    assert faces.boxes[idx.index(11)] == faces.boxes[idx.index(8)]  # a face lost: the last box
    for j, k in enumerate(idx):
        x, y, w, h = faces.boxes[j]
        x0, y0, side = faces.squares[j]
        assert abs(side - 1.3 * max(w, h)) <= 1 and x0 <= x and y0 <= y and x + w <= x0 + side and y + h <= y0 + side
        drawn = Image.fromarray(frame(k, n, blank)[y0:y0 + side, x0:x0 + side]).resize((64, 64), Image.BICUBIC)
        gap = np.abs(np.asarray(drawn, float) - np.asarray(faces.crops[j], float)).mean()
        assert gap < 12, (k, gap)  # the crop is that square of the drawn frame (up to mp4v's compression)


def test_layouts_are_known_by_name(tmp_path):
    files = {  # path under the root -> (label, method, output folder, FF++ level), written by hand
        "FF/original_sequences/youtube/c23/videos/000.mp4": (0, "real", "real/000", "c23"),
        "FF/original_sequences/actors/c23/videos/01__hugging.mp4": (0, "real", "real/01__hugging", "c23"),
        "FF/manipulated_sequences/Deepfakes/c23/videos/000_003.mp4": (1, "Deepfakes", "fake/Deepfakes/000_003", "c23"),
        "FF/manipulated_sequences/FaceShifter/c23/videos/000_003.mp4":
            (1, "FaceShifter", "fake/FaceShifter/000_003", "c23"),
        "CDF/Celeb-real/id0_0000.mp4": (0, "real", "real/id0_0000", ""),
        "CDF/YouTube-real/00000.mp4": (0, "real", "real/00000", ""),
        "CDF/Celeb-synthesis/id0_id1_0000.mp4": (1, "Celeb-synthesis", "fake/Celeb-synthesis/id0_id1_0000", ""),
        "real/a.avi": (0, "real", "real/a", ""),
        "fake/b.mkv": (1, "fake", "fake/b", ""),
        "fake/MyGAN/c.mov": (1, "MyGAN", "fake/MyGAN/c", ""),
    }
    ignored = ["FF/manipulated_sequences/Deepfakes/masks/videos/000_003.mp4", "elsewhere/d.mp4", "real/deeper/e.mp4"]
    for name in [*files, *ignored, "FF/original_sequences/youtube/c23/videos/notes.txt", "real/._a.mp4"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    videos, left_alone = extract.find_videos(tmp_path)
    assert {v.source.relative_to(tmp_path).as_posix(): (v.label, v.method, v.folder, v.level) for v in videos} == files
    assert sorted(p.relative_to(tmp_path).as_posix() for p in left_alone) == sorted(ignored)
    for v in videos:  # the DeepfakeBench label names mean the same label to data.py
        assert data.deepfakebench_label(v.label_name) == v.label

    (tmp_path / "FF/original_sequences/youtube/c40/videos").mkdir(parents=True)
    (tmp_path / "FF/original_sequences/youtube/c40/videos/000.mp4").touch()
    with pytest.raises(SystemExit, match=r"several compression levels \(c23, c40\); choose one with --compression"):
        extract.find_videos(tmp_path)
    assert {v.level for v in extract.find_videos(tmp_path, compression="c40")[0]} == {"c40", ""}
    (tmp_path / "split.json").write_text('[["000", "003"]]')  # FF++'s splits/*.json: pairs of source ids
    kept = extract.find_videos(tmp_path, compression="c23", only=str(tmp_path / "split.json"))[0]
    assert sorted(v.folder for v in kept) == ["fake/Deepfakes/000_003", "fake/FaceShifter/000_003", "real/000"]
    (tmp_path / "real/000.mp4").touch()  # FF++'s real/000 too
    with pytest.raises(SystemExit, match=r"000\.mp4 would both be written to real/000"):
        extract.find_videos(tmp_path, compression="c23")


def extract_quietly(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = extract.main([str(a) for a in argv])
    return status, out.getvalue()


@pytest.fixture(scope="module")
def ffpp(tmp_path_factory):
    """An FF++ c23 tree: 3 real videos (one without a face), 2 methods, a corrupt file, an empty
    file and a mask video; extracted with 2 workers into OUT."""
    root = tmp_path_factory.mktemp("videos") / "FaceForensics++"
    real, fake = root / "original_sequences/youtube/c23/videos", root / "manipulated_sequences"
    write_video(real / "000.mp4")
    write_video(real / "001.mp4", blank=(3, 4))
    write_video(real / "002.mp4", blank=range(12))  # no face in any frame
    write_video(fake / "Deepfakes/c23/videos/000_001.mp4")
    write_video(fake / "FaceSwap/c23/videos/001_000.mp4", n=9)
    write_video(fake / "Deepfakes/masks/videos/000_001.mp4")  # a mask, not a face video
    (fake / "Deepfakes/c23/videos/corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (fake / "Deepfakes/c23/videos/empty.mp4").touch()
    out = root.parent / "OUT"
    status, printed = extract_quietly([root, out, "--frames=4", "--size=48", "--workers=2", "--detector=haar",
                                       f"--json={out / 'FF.json'}"])
    return root, out, status, printed


FF_VIDEOS = {"real/000": (0, "real"), "real/001": (0, "real"), "fake/Deepfakes/000_001": (1, "Deepfakes"),
             "fake/FaceSwap/001_000": (1, "FaceSwap")}


def test_ffpp_extraction_counts_skips_and_loads(ffpp):
    root, out, status, printed = ffpp
    assert status == {"extracted": 4, "done": 0, "skipped": 3}
    assert "1 video files outside the known layouts" in printed and "masks" in printed
    assert "done: 4 extracted, 0 already done, 3 skipped" in printed and "ETA" in printed
    report = dict(line.split("\t") for line in (out / "skipped_videos.txt").read_text().splitlines())
    assert len(report) == 3
    assert "not a readable video" in report[str(root / "manipulated_sequences/Deepfakes/c23/videos/corrupt.mp4")]
    assert "empty file (0 bytes)" in report[str(root / "manipulated_sequences/Deepfakes/c23/videos/empty.mp4")]
    assert "no face found in any of the 4 frames" in report[str(root / "original_sequences/youtube/c23/videos/002.mp4")]
    for video in FF_VIDEOS:
        pngs = sorted((out / video).glob("*.png"))
        assert len(pngs) == 4 and all(Image.open(p).size == (48, 48) for p in pngs)
    n9 = [int(p.stem) for p in sorted((out / "fake/FaceSwap/001_000").glob("*.png"))]
    assert n9[0] == 0 and n9[-1] == 8  # first and last of the 9 frames written
    assert not (out / "real/002").exists()

    ds = data.FrameFolder(out, frames_per_video=8, image_size=32)
    assert {s.video: (s.label, s.method) for s in ds.samples} == FF_VIDEOS and len(ds) == 16
    dfb = data.DeepfakeBenchJSON(out / "FF.json", dataset="FF", split="train", frames_per_video=8, image_size=32)
    assert {s.video: s.label for s in dfb.samples} == {"FF-real/000": 0, "FF-real/001": 0, "FF-DF/000_001": 1,
                                                       "FF-FS/001_000": 1}
    assert sorted(s.source for s in dfb.samples) == sorted(s.source for s in ds.samples)


def test_a_rerun_skips_finished_videos_and_redoes_half_written_ones(ffpp, tmp_path):
    root, out, _, _ = ffpp
    status, _ = extract_quietly([root, out, "--frames=4", "--size=48", "--detector=haar"])
    assert status == {"extracted": 0, "done": 4, "skipped": 3}
    half = out / "fake/FaceSwap/001_000"
    (half / "done.json").unlink()  # as if killed before its last write
    Image.new("RGB", (48, 48)).save(half / "9999.png")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "real/000").iterdir()}
    status, _ = extract_quietly([root, out, "--frames=4", "--size=48", "--detector=haar"])
    assert status == {"extracted": 1, "done": 3, "skipped": 3}
    assert not (half / "9999.png").exists() and len(list(half.glob("*.png"))) == 4 and (half / "done.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "real/000").iterdir()} == before  # untouched
    other = tmp_path / "other"
    shutil.copytree(out, other)
    status, _ = extract_quietly([root, other, "--frames=4", "--size=40", "--detector=haar"])  # other settings: redone
    assert status == {"extracted": 4, "done": 0, "skipped": 3}
    assert {Image.open(p).size for p in other.rglob("*.png")} == {(40, 40)}


def test_celebdf_test_list_then_train_end_to_end(ffpp, tmp_path, tiny_run):
    cdf = tmp_path / "Celeb-DF-v2"
    write_video(cdf / "Celeb-real/id0_0000.mp4")
    write_video(cdf / "YouTube-real/00000.mp4")
    write_video(cdf / "Celeb-synthesis/id0_id1_0000.mp4")
    (cdf / "List_of_testing_videos.txt").write_text("1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n")
    out = tmp_path / "CDF"
    run = subprocess.run([sys.executable, "-m", "video.extract", cdf, out, "--frames=4", "--size=48", "--detector=haar",
                          f"--only={cdf / 'List_of_testing_videos.txt'}", f"--json={out / 'Celeb-DF-v2.json'}",
                          "--split=test"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "2 videos (1 real, 1 fake: Celeb-synthesis)" in run.stdout and "done: 2 extracted" in run.stdout
    ds = data.FrameFolder(out, frames_per_video=8, image_size=32)
    assert {s.video: s.method for s in ds.samples} == {"real/00000": "real",
                                                       "fake/Celeb-synthesis/id0_id1_0000": "Celeb-synthesis"}
    dfb = data.DeepfakeBenchJSON(out / "Celeb-DF-v2.json", dataset="Celeb-DF-v2", split="test",
                                 frames_per_video=8, image_size=32)
    assert {s.video: s.label for s in dfb.samples} == {"CelebDFv2_real/00000": 0, "CelebDFv2_fake/id0_id1_0000": 1}

    _, ff_out, _, _ = ffpp
    train.main(tiny_run + ["--max_iters=2", f"--train_data={ff_out}", f"--test_data={out},{out / 'Celeb-DF-v2.json'}",
                       f"--out_dir={tmp_path / 'run'}"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("CDF", "Celeb-DF-v2"):  # the folder and the JSON: the same 2 videos of 4 frames
        assert metrics[name]["frames"] == 8 and metrics[name]["videos"] == 2 and 0 <= metrics[name]["video_auc"] <= 1

    # predict.py on a video: the mean fake probability of its frames' face crops, and a bad video skipped
    videos = tmp_path / "to_score"
    write_video(videos / "clip.mp4")
    (videos / "broken.mp4").write_bytes(b"not a video")
    results = predict.main([f"--input={videos}", f"--out_dir={tmp_path / 'run'}", "--frames=4", "--detector=haar"])
    model, _ = predict.load_model(tmp_path / "run" / "best.pt")
    faces = extract.video_faces(videos / "clip.mp4", frames=4, size=model.config.image_size, detector="haar")
    probs = model.predict(torch.stack([data.to_input(c, model.config.image_size) for c in faces.crops]))[0]
    clip = results[str(videos / "clip.mp4")]
    assert [f["frame"] for f in clip["frames"]] == [f"frame {i}" for i in faces.frame_indices] == \
        ["frame 0", "frame 4", "frame 7", "frame 11"]
    assert clip["score"] == pytest.approx(probs.mean().item(), abs=1e-6)
    assert "not a readable video" in results[str(videos / "broken.mp4")]["skipped"]

"""Tests of data.py: the disk loaders read small layouts written here, bad files get clear errors,
and the preprocessing and augmentation match hand computations (the synthetic benchmark:
test_synthetic.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ----------------------------------------------------------------------------- data on disk

def _write_video(folder, n, suffix=".png"):
    folder.mkdir(parents=True)
    for k in range(n):
        Image.new("RGB", (16, 16), (k * 20, 0, 0)).save(folder / f"{k:03d}{suffix}")


def test_frame_folder_counts_labels_even_sampling_and_unique_video_ids(tmp_path):
    _write_video(tmp_path / "real" / "000", 10)
    _write_video(tmp_path / "real" / "001", 3, ".jpg")
    _write_video(tmp_path / "fake" / "Deepfakes" / "000_003", 5)
    _write_video(tmp_path / "fake" / "Face2Face" / "000_003", 5)
    _write_video(tmp_path / "fake" / "loose_video", 2)  # no method folder
    (tmp_path / "fake" / ".ipynb_checkpoints").mkdir()  # hidden: ignored, not an empty video
    ds = data.FrameFolder(tmp_path, frames_per_video=4, image_size=16)
    by_video = {}
    for s in ds.samples:
        by_video.setdefault(s.video, []).append(s)
    assert set(by_video) == {"real/000", "real/001", "fake/Deepfakes/000_003", "fake/Face2Face/000_003",
                             "fake/loose_video"}
    picked = [int(s.source[-7:-4]) for s in by_video["real/000"]]
    assert picked == [0, 3, 6, 9] == np.linspace(0, 9, 4).astype(int).tolist()
    assert [len(by_video[v]) for v in sorted(by_video)] == [4, 4, 2, 4, 3]
    assert {(s.label, s.method) for s in by_video["fake/Deepfakes/000_003"]} == {(1, "Deepfakes")}
    assert {(s.label, s.method) for s in by_video["fake/loose_video"]} == {(1, "fake")}
    assert {(s.label, s.method) for s in by_video["real/001"]} == {(0, "real")}
    x = ds[0]
    expected = data.to_input(Image.open(ds.samples[0].source).convert("RGB"), 16)
    torch.testing.assert_close(x["image"], expected, rtol=0, atol=0)
    assert x["source"] == ds.samples[0].source and x["video"] == ds.samples[0].video


def test_frame_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.FrameFolder(tmp_path / "nowhere", frames_per_video=2, image_size=16)
    _write_video(tmp_path / "real" / "000", 2)
    with pytest.raises(FileNotFoundError, match="fake"):
        data.FrameFolder(tmp_path, frames_per_video=2, image_size=16)
    (tmp_path / "fake").mkdir()
    with pytest.raises(ValueError, match="no video folders in .*fake"):
        data.FrameFolder(tmp_path, frames_per_video=2, image_size=16)
    (tmp_path / "fake" / "NeuralTextures" / "007").mkdir(parents=True)
    with pytest.raises(ValueError, match="no video folders in .*fake with frames .*1 without frames: "
                                         "fake/NeuralTextures/007"):
        data.FrameFolder(tmp_path, frames_per_video=2, image_size=16)


def test_frame_folder_skips_and_names_video_folders_without_frames(tmp_path, capsys):
    _write_video(tmp_path / "real" / "000", 3)
    _write_video(tmp_path / "fake" / "Deepfakes" / "000_003", 3)
    for empty in ("real/001", "fake/Deepfakes/001_002", "fake/FaceSwap"):  # what failed extractions leave
        (tmp_path / empty).mkdir(parents=True)
    (tmp_path / "fake" / "Deepfakes" / "002_004").mkdir()
    (tmp_path / "fake" / "Deepfakes" / "002_004" / "done.json").write_text("{}")  # a file, but no frame
    ds = data.FrameFolder(tmp_path, frames_per_video=4, image_size=16)
    assert sorted({s.video for s in ds.samples}) == ["fake/Deepfakes/000_003", "real/000"] and len(ds) == 6
    assert sorted(ds.skipped_videos) == ["fake/Deepfakes/001_002", "fake/Deepfakes/002_004", "fake/FaceSwap",
                                         "real/001"]
    assert "skipped 4 video folders without frames: real/001, fake/Deepfakes/001_002" in capsys.readouterr().out


def _ff_json(tmp_path, compression_level):
    """A DeepfakeBench-style JSON: FF++ nests a compression level, Celeb-DF does not."""
    def video(label, folder, n, windows=False):
        _write_video(tmp_path / "frames" / folder, n)
        paths = [f"frames/{folder}/{k:03d}.png" for k in range(n)]
        return {"label": label, "frames": [p.replace("/", "\\") for p in paths] if windows else paths}

    def split(videos):
        return {"c23": videos, "c40": {}} if compression_level else videos

    info = {"FaceForensics++": {
        "FF-real": {"train": split({"000": video("FF-real", "real_000", 10)}), "test": split({}), "val": split({})},
        "FF-DF": {"train": split({"000_003": video("FF-DF", "df_000_003", 6, windows=True)}), "test": split({}),
                  "val": split({})},
        "FF-F2F": {"train": split({"000_003": video("FF-F2F", "f2f_000_003", 3)}), "test": split({}), "val": split({})},
    }}
    path = tmp_path / "FaceForensics++.json"
    path.write_text(json.dumps(info))
    return path


@pytest.mark.parametrize("compression_level", [True, False])
def test_deepfakebench_json_labels_video_ids_and_frame_sampling(tmp_path, compression_level):
    path = _ff_json(tmp_path, compression_level)
    ds = data.DeepfakeBenchJSON(path, dataset="FaceForensics++", split="train", frames_per_video=4, image_size=16)
    videos = {}
    for s in ds.samples:
        videos.setdefault(s.video, []).append(s)
    assert set(videos) == {"FF-real/000", "FF-DF/000_003", "FF-F2F/000_003"}
    assert {(s.label, s.method) for s in videos["FF-real/000"]} == {(0, "real")}
    assert {(s.label, s.method) for s in videos["FF-DF/000_003"]} == {(1, "FF-DF")}
    assert [int(s.source[-7:-4]) for s in videos["FF-real/000"]] == np.linspace(0, 9, 4).round().astype(int).tolist()
    assert len(videos["FF-DF/000_003"]) == 4 and len(videos["FF-F2F/000_003"]) == 3
    assert ds[0]["image"].shape == (3, 16, 16)


def test_deepfakebench_json_without_compression_and_label_fallback(tmp_path):
    _write_video(tmp_path / "data" / "id0", 2)
    _write_video(tmp_path / "data" / "id0_id1", 2)
    info = {"Celeb-DF-v2": {
        "CelebDFv2_real": {"test": {"id0": {"label": "CelebDFv2_real", "frames": ["id0/000.png", "id0/001.png"]}}},
        "CelebDFv2_fake": {"test": {"id0_id1": {"label": "CelebDFv2_fake", "frames": ["id0_id1/000.png"]}}},
        "WDF_Real_unlisted": {"test": {"x": {"label": "WDF_Real_unlisted", "frames": ["id0/001.png"]}}},
    }}
    path = tmp_path / "json" / "Celeb-DF-v2.json"
    path.parent.mkdir()
    path.write_text(json.dumps(info))
    ds = data.DeepfakeBenchJSON(path, dataset="Celeb-DF-v2", split="test", frames_per_video=8, image_size=16,
                                data_root=tmp_path / "data")
    assert [(s.video, s.label, s.method) for s in ds.samples] == [
        ("CelebDFv2_real/id0", 0, "real"), ("CelebDFv2_real/id0", 0, "real"),
        ("CelebDFv2_fake/id0_id1", 1, "CelebDFv2_fake"), ("WDF_Real_unlisted/x", 0, "real")]
    assert data.deepfakebench_label("DFDCP_FakeA") == 1 and data.deepfakebench_label("SomeNewFake") == 1


def test_deepfakebench_json_missing_frames_name_the_json_and_the_file(tmp_path):
    path = _ff_json(tmp_path, True)
    (tmp_path / "frames" / "f2f_000_003" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"FaceForensics\+\+\.json.*f2f_000_003.001\.png"):
        data.DeepfakeBenchJSON(path, dataset="FaceForensics++", split="train", frames_per_video=4, image_size=16)
    with pytest.raises(ValueError, match="c99"):
        data.DeepfakeBenchJSON(path, dataset="FaceForensics++", split="train", frames_per_video=4, image_size=16,
                               compression="c99")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        data.DeepfakeBenchJSON(tmp_path / "absent.json", dataset="x", split="test", frames_per_video=4, image_size=16)


# ----------------------------------------------------------------------------- images

def test_load_image_converts_modes_to_rgb(tmp_path):
    cases = {
        "gray.png": (Image.new("L", (16, 16), 100), (100, 100, 100)),
        "alpha.png": (Image.new("RGBA", (16, 16), (10, 20, 30, 0)), (10, 20, 30)),
        "deep.png": (Image.fromarray(np.full((16, 16), 257 * 100, np.uint16)), (100, 100, 100)),
    }
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    cases["palette.png"] = (palette, (200, 50, 25))
    assert cases["deep.png"][0].mode == "I;16"
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        out = data.load_image(tmp_path / name)
        assert out.mode == "RGB", name
        assert np.asarray(out)[2, 2].tolist() == list(rgb), name


def test_load_image_errors_name_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match="cut.jpg"):
        data.load_image(path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        data.load_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        data.load_image(tmp_path / "absent.png")


def test_to_input_matches_a_hand_computation():
    pixels = [[(0, 128, 255), (10, 20, 30)], [(255, 255, 255), (1, 2, 3)]]
    x = data.to_input(Image.fromarray(np.array(pixels, dtype=np.uint8)), 2)
    for c in range(3):
        for row in range(2):
            for col in range(2):
                expected = (pixels[row][col][c] / 255 - data.CLIP_MEAN[c]) / data.CLIP_STD[c]
                assert abs(x[c, row, col].item() - expected) < 1e-6
    flat = data.to_input(Image.new("RGB", (3, 3), (51, 102, 153)), 7)  # bicubic keeps a constant image
    assert flat.shape == (3, 7, 7)
    for c, value in enumerate((51, 102, 153)):
        torch.testing.assert_close(flat[c], torch.full((7, 7), (value / 255 - data.CLIP_MEAN[c]) / data.CLIP_STD[c]))


# ----------------------------------------------------------------------------- augmentation

def test_augment_is_deterministic_for_the_same_rng_seed():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    augment = data.Augment(probability=2)
    outs = [np.asarray(augment(img, np.random.default_rng(s))) for s in (3, 3, 4)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    seeded = [np.asarray(data.Augment(seed=9)(img)) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])
    same = data.Augment(probability=0)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(img))


def test_augment_fires_each_operation_with_deepfakebenchs_probability_in_its_order(monkeypatch):
    """Over 4000 draws each operation fires as often as DeepfakeBench's list says (within 4σ),
    independently of the others, and in the list's order."""
    expected = {"hflip": .5, "brightness_contrast": .5, "hue_saturation_value": .3, "jpeg": .1, "gauss_noise": .1,
                "motion_blur": .1, "clahe": .1, "channel_shuffle": .1, "cutout": .1, "gamma": .3, "glass_blur": .3}
    calls = []
    for name in expected:
        monkeypatch.setattr(data.Augment, name, staticmethod(lambda img, rng, name=name: calls.append(name) or img))
    augment, img, n = data.Augment(), Image.new("RGB", (8, 8)), 4000
    fired = []
    for i in range(n):
        calls.clear()
        augment(img, np.random.default_rng(i))
        assert calls == [k for k in expected if k in calls]  # the order of the list
        fired.append(set(calls))
    for name, p in expected.items():
        rate = np.mean([name in f for f in fired])
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (name, rate, p)
    both = np.mean([{"hflip", "gamma"} <= f for f in fired])
    assert abs(both - .5 * .3) < 4 * np.sqrt(.15 * .85 / n)  # independent draws


def test_hflip_is_numpy_fliplr_and_every_operation_keeps_size_and_mode():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(data.Augment.hflip(img, None)), np.fliplr(np.asarray(img)))
    for name, _ in data.Augment.OPS:  # smoke: shapes and modes only
        out = getattr(data.Augment, name)(img, np.random.default_rng(0))
        assert out.size == img.size and out.mode == "RGB", name


def test_clahe_without_a_clip_on_one_tile_is_histogram_equalisation():
    channel = np.random.default_rng(4).integers(60, 120, (40, 56)).astype(np.uint8)
    cdf = np.cumsum(np.bincount(channel.ravel(), minlength=256)) / channel.size
    want = np.round(255 * cdf[channel]).astype(np.uint8)  # the textbook global equalisation
    np.testing.assert_array_equal(data.clahe(channel, clip_limit=1e9, tiles=1), want)

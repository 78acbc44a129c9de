"""Bad input gets a clear error or a counted skip; an interrupted run loses nothing (README "When things go wrong")."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train

ROOT = Path(train.__file__).parent


def face(seed, size=40):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def frame_folder(root, videos=2, frames=3):
    """ROOT/real/<v>/ and ROOT/fake/M/<v>/ with readable PNG frames."""
    for kind in ("real", "fake/M"):
        for v in range(videos):
            (root / kind / f"v{v}").mkdir(parents=True)
            for f in range(frames):
                face(hash((kind, v, f)) % 1000).save(root / kind / f"v{v}" / f"{f}.png")
    return root


def run_on_folder(root, out, tiny_run):
    train.main(tiny_run + ["--max_iters=2", "--test_frames_per_video=8", "--val_data=none", f"--train_data={root}",
                       f"--test_data={root}", f"--out_dir={out}"])
    return json.loads((out / "metrics.json").read_text())[root.name]


def test_unreadable_frames_are_skipped_and_counted(tmp_path, capsys, tiny_run):
    root = frame_folder(tmp_path / "faces")
    good = root / "real" / "v0" / "0.png"
    (root / "real" / "v0" / "1.png").write_text("not an image")  # a non-image with an image extension
    jpeg = root / "fake" / "M" / "v1" / "1.jpg"
    face(1).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated JPEG
    Image.new("RGB", (1, 1)).save(root / "fake" / "M" / "v0" / "2.png")  # 1x1
    img = Image.open(good)
    for mode in ("L", "RGBA", "P"):  # converted to RGB, not skipped
        img.convert(mode).save(root / "real" / "v1" / f"{mode}.png")
    sixteen = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    sixteen.save(root / "real" / "v1" / "I16.png")
    m = run_on_folder(root, tmp_path / "out", tiny_run)
    reasons = "\n".join(m["skipped"])
    assert len(m["skipped"]) == 3
    assert "v0/1.png" in reasons and "1.jpg" in reasons and "1x1, too small" in reasons
    assert m["frames"] == (3 + 7 + 3 + 4) - 3  # every frame of the four videos (≤ 8 each), less the skipped
    out = capsys.readouterr().out
    assert "skipped 3 unreadable frames" in out
    # Training samples 2 frames per video, first and last: of the bad ones only the 1x1 frame.
    assert "skipped 1 unreadable training frames" in out
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 1


def test_a_video_folder_without_frames_is_skipped_and_named(tmp_path, capsys, tiny_run):
    root = frame_folder(tmp_path / "faces")
    (root / "fake" / "M" / "v_no_face").mkdir()  # what a face extraction that found no face leaves
    m = run_on_folder(root, tmp_path / "out", tiny_run)
    assert m["videos"] == 4 and m["frames"] == 12  # the four videos with frames, nothing of the empty one
    assert "skipped 1 video folders without frames: fake/M/v_no_face" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing_root", "data root not found: .*nowhere"),
    ("empty_real", "no video folders in .*real"),
    ("empty_fake", "no video folders in .*fake"),
    ("json_missing_files", "2 frame files missing"),
])
def test_bad_data_stops_before_training(tmp_path, case, message, tiny_run):
    root = tmp_path / "faces"
    if case == "missing_root":
        root = tmp_path / "nowhere"
    elif case.startswith("empty"):
        frame_folder(root)
        kind = case.split("_")[1]
        for f in sorted((root / kind).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    else:
        frames = {"label": "FF-real", "frames": ["a/0.png", "a/1.png"]}
        spec = {"FF": {"FF-real": {"train": {"c23": {"000": frames}}}}}
        (tmp_path / "FF.json").write_text(json.dumps(spec))
        root = tmp_path / "FF.json"
    with pytest.raises(SystemExit, match="data: .*" + message):
        train.main(tiny_run + [f"--train_data={root}", f"--out_dir={tmp_path / 'out'}"])


def test_one_class_test_set_reports_what_is_defined(tmp_path, capsys, tiny_run):
    (tmp_path / "f").mkdir()
    for i in range(2):
        face(i).save(tmp_path / "f" / f"{i}.png")
    spec = {"FF": {"FF-DF": {"test": {"c23": {"000_003": {"label": "FF-DF", "frames": ["f/0.png", "f/1.png"]}}}}}}
    (tmp_path / "FF.json").write_text(json.dumps(spec))
    train.main(tiny_run + ["--max_iters=1", f"--test_data={tmp_path / 'FF.json'}", f"--out_dir={tmp_path / 'out'}"])
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["FF"]
    assert m["video_auc"] is None and m["eer"] is None and m["frames"] == 2 and 0 <= m["acc"] <= 1
    assert "FF: only one class (fake): AUC, EER and AP are undefined" in capsys.readouterr().out


def test_bad_checkpoints(tmp_path, tiny_run):
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1)}, tmp_path / "resnet.pt")
    with pytest.raises(SystemExit, match=r"--init_from: .*resnet\.pt: no CLIP ViT image encoder"):
        train.main(tiny_run + [f"--init_from={tmp_path / 'resnet.pt'}", f"--out_dir={tmp_path / 'a'}"])
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={tmp_path / 'b'}"])
    last = tmp_path / "b" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"last\.pt: not a readable checkpoint of this project"):
        train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}"])
    with pytest.raises(SystemExit, match=r"last\.pt: nothing to resume"):
        train.main(["--init_from=resume", f"--out_dir={tmp_path / 'c'}"])


def test_a_checkpoint_that_does_not_fit_gets_one_message(tmp_path, tiny_run):
    """predict.py on a best.pt with half its weights gone, or one tensor of another shape: one message
    with the counts, the first keys, the shape, and what the checkpoint says it was made with."""
    run = tmp_path / "run"
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={run}"])
    ckpt = torch.load(run / "best.pt", weights_only=True)
    keys = list(ckpt["model"])
    torch.save({**ckpt, "model": {k: ckpt["model"][k] for k in keys[::2]}}, tmp_path / "half.pt")
    torch.save({**ckpt, "model": {**ckpt["model"], "head.weight": torch.zeros(3, 128)}}, tmp_path / "shape.pt")
    made_with = "(method dfdhr, preset small, ablation full)"
    for name, problem in (("half", f"missing keys ({len(keys[1::2])}): {', '.join(keys[1:11:2])} (+"),
                          ("shape", "shapes differ (1): head.weight: file (3, 128) vs model (2, 128)")):
        with pytest.raises(SystemExit) as err:
            predict.main([f"--input={tmp_path}", f"--checkpoint={tmp_path / name}.pt"])
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}.pt: its weights do not fit the model its settings describe "
                                  f"{made_with}: {problem}"), message
        assert len(message) < 1000 and "Traceback" not in message


def test_a_checkpoint_with_the_earlier_names_scores_as_it_did(tmp_path, tiny_run, inputs):
    """Parameters and settings renamed since a checkpoint was written are mapped when it is read."""
    run = tmp_path / "run"
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={run}"])
    ckpt = torch.load(run / "best.pt", weights_only=True)
    earlier = {"original_routers.": "global_routers.", "split_routers.": "local_routers.", ".after_attn.": ".0.",
               ".after_mlp.": ".1."}

    def written_then(key):
        for now, then in earlier.items():
            key = key.replace(now, then)
        return key
    settings_then = {("route_global" if k == "route_original" else k): v for k, v in ckpt["model_config"].items()}
    old = {**ckpt, "model": {written_then(k): v for k, v in ckpt["model"].items()}, "model_config": settings_then}
    assert "global_routers.experts.0.1.gate.weight" in old["model"] and "route_global" in old["model_config"]
    torch.save(old, tmp_path / "old.pt")
    model, _ = predict.load_model(run / "best.pt")
    old_model, _ = predict.load_model(tmp_path / "old.pt")
    x = inputs(model.config, n=3)
    assert torch.equal(model.predict(x)[0], old_model.predict(x)[0])


class RunsCode:
    """A pickled object whose loading would run a command: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the checkpoint ran code"))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path, tiny_run):
    run = tmp_path / "run"
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={run}"])
    marker = tmp_path / "pwned.txt"
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        torch.save({**ckpt, "payload": RunsCode(marker)}, run / name)  # a tampered copy of a real checkpoint
    with pytest.raises(SystemExit, match=r"best\.pt: not a readable checkpoint of this project \(it is loaded with "
                                         r"weights_only=True"):
        predict.main([f"--input={tmp_path}", f"--out_dir={run}"])
    with pytest.raises(SystemExit, match=r"last\.pt: not a readable checkpoint of this project"):
        train.main(["--init_from=resume", f"--out_dir={run}"])
    assert not marker.exists()
    torch.load(run / "last.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "the checkpoint ran code"


def test_bad_config_is_refused_before_work(tmp_path):
    for args, message in ((["--bogus=1"], "unknown option '--bogus=1'"), (["--lr=fast"], "--lr=fast: expected float"),
                          (["--keep_ratio=0"], "keep_ratio=0.0 must be in"),
                          (["--first_routed_layer=30"], "first_routed_layer=30 leaves no routed layer"),
                          (["--batch_size=0"], "--batch_size=0 must be at least 1"),
                          (["--method=nope"], "--method=nope: choose one of dfdhr, baseline")):
        with pytest.raises(SystemExit, match=message):
            train.main(args + [f"--out_dir={tmp_path / 'never'}"])
    assert not (tmp_path / "never").exists()


def test_nan_loss_stops_with_the_step_sources_and_last_checkpoint(tmp_path, tiny_run):
    args = tiny_run + ["--lr=1e30", "--ckpt_interval=1", f"--out_dir={tmp_path}"]
    with pytest.raises(SystemExit) as err:
        train.main(args)
    message = str(err.value)
    assert "loss is nan" in message or "loss is inf" in message
    assert "batch sources: synthetic:" in message and f"last good checkpoint: {tmp_path / 'last.pt'}" in message
    step = int(message.split("step ")[1].split(":")[0])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["step"] == step  # the last finite step


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_atomic({"step": 1}, path)

    def dies_midway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # every leg with the same threads: the same float reductions


def subprocess_run(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def wait_for_checkpoint(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < timeout
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, tiny_run):
    args = tiny_run + ["--synthetic_train_videos=16", "--epochs=3", "--ckpt_interval=3"]  # 24 steps
    subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'straight'}"], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess_run(args + [f"--out_dir={killed}"])
    wait_for_checkpoint(killed / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(killed / "last.pt", weights_only=True)["progress"]["step"]
    assert step_at_kill < 24, "the run ended before it was killed"
    subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={killed}"], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["in_domain"]["scores"] == mb["in_domain"]["scores"]


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(tmp_path, tiny_run):
    args = tiny_run + ["--synthetic_train_videos=16", "--epochs=50", "--ckpt_interval=2", f"--out_dir={tmp_path}"]
    proc = subprocess_run(args)
    wait_for_checkpoint(tmp_path / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "interrupted: saved" in out
    step = int(out.split("interrupted: saved")[1].split("at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["step"] == step < 400


def test_same_seed_same_metrics(tmp_path, tiny_run):
    for name in ("a", "b"):
        train.main(tiny_run + ["--max_iters=3", f"--out_dir={tmp_path / name}"])
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    assert a == b

"""Score face images and videos with a trained DFD-HR checkpoint (a train.py run's `best.pt`).

    python predict.py --input=face.png                  # an image, a folder of images, a video, a folder of videos
    python predict.py --input=clips/ --out_dir=out/ffpp --frames=32

Images are taken as face crops (resized to the model's input); from a video, `frames` frames are
taken evenly and the face is cropped from each (video/extract.py, the optional video extra). A video's
score is the mean fake probability of its frames, as the video-level AUC uses. One line per input
is printed, and every frame's score and exit layers are written to `predictions.csv` and
`predictions.json` in out_dir (or `--output`, without suffix). It computes in the precision the
run evaluated in (`--dtype` overrides); `--compile` compiles the model first (speed.py).
"""
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import data
import finetune
import speed
from dfdhr import DFDHRConfig
from video import extract  # imports OpenCV and dlib only when a video is read
from vit import CheckpointError, load_weights, read_checkpoint


@dataclass(frozen=True)
class Options:
    input: str = ""            # an image, a video, or a folder of either
    out_dir: str = "out"       # the run whose best.pt scores
    checkpoint: str = ""       # a checkpoint file instead of out_dir/best.pt
    frames: int = 32           # frames per video (DeepfakeBench's test setting)
    detector: str = "dlib"     # face detector for videos (video/extract.py): "dlib" or "haar"
    output: str = ""           # where predictions.{csv,json} go (default: out_dir/predictions)
    batch_size: int = 32
    device: str = "auto"       # "auto", "cpu", "cuda"
    dtype: str = "auto"        # "auto": as the run evaluated (its --dtype, speed.py's rule), or "bf16", "fp32"
    compile: bool = False      # speed.compile_for_inference: pays for many images only (README, "Speed")


def load_model(path, device="cpu"):
    """(model, the run's settings as a dict) of a train.py checkpoint, read without executing code
    and built as the run built it: its method, its model config (vit.read_checkpoint, load_weights)."""
    try:
        ckpt = read_checkpoint(path)
        model = finetune.build_model(ckpt["config"]["method"], DFDHRConfig(**ckpt["model_config"]))
        load_weights(model, ckpt, path)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    return model.to(device).eval(), ckpt["config"]


def inputs(path):
    """The images and videos to score: `path` itself, or every one under the folder, sorted."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = [p for p in files if p.suffix.lower() in data.IMAGE_SUFFIXES or extract.is_video(p)]
    if not found:
        raise SystemExit(f"{path}: no image ({'/'.join(data.IMAGE_SUFFIXES)}) or video "
                         f"({'/'.join(extract.VIDEO_SUFFIXES)}) in it")
    return found


def faces(path, opts, size):
    """(name of each frame, (F, 3, S, S) model inputs) of an image or a video."""
    if path.suffix.lower() in data.IMAGE_SUFFIXES:
        return [path.name], data.to_input(data.load_image(path), size)[None]
    video = extract.video_faces(path, frames=opts.frames, size=size, detector=opts.detector)
    return [f"frame {i}" for i in video.frame_indices], torch.stack([data.to_input(c, size) for c in video.crops])


@torch.no_grad()
def main(argv):
    opts, = cli.parse(argv, Options)
    opts = Options(**opts)
    if not opts.input:
        raise SystemExit("--input=PATH: an image, a video, or a folder of them")
    if opts.dtype not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--dtype={opts.dtype}: choose one of auto, bf16, fp32")
    speed.keep_freed_memory()
    model, run_settings = load_model(opts.checkpoint or Path(opts.out_dir) / "best.pt")
    dtype = run_settings["dtype"] if opts.dtype == "auto" else opts.dtype
    device, bf16 = speed.device_and_precision(opts.device, dtype)
    model.to(device)
    run = speed.compile_for_inference(model) if opts.compile else model
    rows, results = [], {}
    for path in inputs(opts.input):
        try:
            names, x = faces(path, opts, model.config.image_size)
        except (ValueError, ImportError) as e:  # an unreadable image or video, no face, no video extra: reported
            print(f"{path}  skipped: {e}")
            results[str(path)] = {"skipped": str(e)}
            continue
        probs, exits = [], []
        for chunk in x.split(opts.batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = run(chunk.to(device))
            probs += out.logits.float().softmax(-1)[:, 1].cpu().tolist()
            exits += out.exit_layer.cpu().tolist()
        score = sum(probs) / len(probs)
        print(f"{path}  fake probability {score:.4f}" + (f" (mean of {len(probs)} frames)" if len(probs) > 1 else "")
              + f"  exit layer per view {exits[0] if len(exits) == 1 else 'per frame in the files'}")
        results[str(path)] = {"score": score, "frames": [{"frame": n, "prob": p, "exit_layer": e}
                                                         for n, p, e in zip(names, probs, exits)]}
        rows += [[str(path), n, f"{p:.6f}", " ".join(map(str, e))] for n, p, e in zip(names, probs, exits)]
    stem = Path(opts.output) if opts.output else Path(opts.out_dir) / "predictions"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([["input", "frame", "fake_probability", "exit_layer_per_view"], *rows])
    print(f"per-frame scores and exit layers: {stem.with_suffix('.csv')}, {stem.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

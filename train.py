"""Train and evaluate DFD-HR (SPEC §6).

    python train.py                                   # the built-in synthetic benchmark, small preset, CPU
    python train.py --preset=paper --init_from=ViT-L-14.pt --train_data=FFPP_ROOT --test_data=CDF_ROOT
    python train.py --init_from=resume                # continue the run in out_dir
    python train.py --predict=face.png                # score an image or a folder with out_dir/best.pt
    torchrun --nproc_per_node=4 train.py --preset=paper ...   # DistributedDataParallel

Defaults sit at the top; any of them, and any field of `DFDHRConfig`, is overridden by
`--key=value`. Every run writes to `out_dir`: `config.json`, checkpoints `last.pt` and `best.pt`
(written atomically, with the config inside), `history.json` and `metrics.json`
(`{test_set: {frame_auc, video_auc, eer, ap, acc, ...}}`).
"""
import json
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import data
import figures
import peft
import synthetic
from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, PRESETS, dfdhr_loss, make_config
from vit import CheckpointError, load_clip

# ------------------------------------------------------------------------------ defaults
preset = "small"            # "small" (CPU, trains from scratch) or "paper" (CLIP ViT-L/14, 448 input)
ablation = "full"           # a row of the paper's ablations, see dfdhr.ABLATIONS
method = "dfdhr"            # "dfdhr", or a fine-tuning method of supp. Tab. A on the baseline model (peft.METHODS)
init_from = "scratch"       # "scratch", "resume" (out_dir/last.pt) or the path of a CLIP checkpoint
out_dir = "out"
train_data = "synthetic"    # "synthetic", a folder ROOT/{real,fake}/..., or a DeepfakeBench JSON file
test_data = "synthetic"     # comma-separated list of the same kinds ("synthetic": in-domain + cross-method)
dataset = ""                # DeepfakeBench: dataset name inside the JSON (default: the file's stem)
data_root = ""              # DeepfakeBench: folder the JSON's relative frame paths start from
train_split = "train"
test_split = "test"
synthetic_train_videos = 1200  # synthetic benchmark size (videos per split)
synthetic_test_videos = 60
synthetic_train_methods = "faceswap,upsample"   # forgery families seen in training (and in_domain)
synthetic_test_methods = "partial,selfblend"    # held-out families (cross_method)
frames_per_video = 8        # training frames per video (paper)
test_frames_per_video = 8   # test frames per video (paper: 8-32)
epochs = 1                  # paper: 20
max_iters = 0               # stop after this many steps (0: run all epochs)
batch_size = 16             # global batch (paper: 16 over 4 GPUs)
eval_batch_size = 32
lr = 0.0                    # Adam, for routers, experts, fusion and head; 0: the preset's, PRESET_LR
backbone_lr = 0.0           # when the backbone trains; 0: 1e-6 for a loaded CLIP (the paper's full
                            # fine-tuning baseline), lr for a backbone trained from scratch
weight_decay = 5e-4
beta1, beta2 = 0.9, 0.999
augment = "auto"            # SPEC §6 augmentations on training images: "true", "false", or "auto": on for
                            # real data, off for the synthetic benchmark, whose camera model already
                            # degrades every frame and whose cues the blur/JPEG augmentations erase
seed = 1024                 # paper
dtype = "auto"              # "auto" (bf16 on a GPU that has it, else fp32), "bf16" or "fp32"
device = "auto"             # "auto", "cpu", "cuda"
num_workers = 1             # data-loading processes
log_interval = 10           # steps
ckpt_interval = 50          # steps between last.pt writes (and at each epoch end)
predict = ""                # an image or a folder to score with out_dir/best.pt, then exit
# ----------------------------------------------------------------------------------------

PRESET_LR = {"paper": 1e-4, "small": 1e-3}  # paper; a small backbone trained from scratch needs more
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
MODEL_KEYS = {f.name: type(f.default) for f in fields(DFDHRConfig)}


def parse_overrides(argv):
    """`--key=value` pairs, typed after the default they replace; unknown keys are refused."""
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key in DEFAULTS:
            kind = type(DEFAULTS[key])
        elif key in MODEL_KEYS:
            kind = MODEL_KEYS[key]
        else:
            raise SystemExit(f"unknown option --{key}; options: {', '.join(sorted([*DEFAULTS, *MODEL_KEYS]))}")
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise SystemExit(f"--{key}={value}: expected {kind.__name__}") from None
    return out


def check(cfg):
    """Refuse impossible settings before any work starts."""
    if cfg["preset"] not in PRESETS:
        raise SystemExit(f"--preset={cfg['preset']}: choose one of {sorted(PRESETS)}")
    if cfg["ablation"] not in ABLATIONS:
        raise SystemExit(f"--ablation={cfg['ablation']}: choose one of {sorted(ABLATIONS)}")
    for key in ("batch_size", "eval_batch_size", "frames_per_video", "test_frames_per_video", "epochs"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]} must be at least 1")
    if cfg["method"] != "dfdhr":
        if cfg["method"] not in peft.METHODS:
            raise SystemExit(f"--method={cfg['method']}: choose dfdhr or one of {', '.join(peft.METHODS)}")
        cfg["ablation"] = "baseline"  # supp. Tab. A: every method on the same plain CLIP ViT and head
    cfg["lr"] = cfg["lr"] or PRESET_LR[cfg["preset"]]
    if cfg["augment"] not in ("auto", "true", "false"):
        raise SystemExit(f"--augment={cfg['augment']}: choose auto, true or false")
    if cfg["dtype"] not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--dtype={cfg['dtype']}: choose auto, bf16 or fp32")
    try:
        return make_config(cfg["preset"], cfg["ablation"], **{k: v for k, v in cfg.items() if k in MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(str(e)) from None


# ------------------------------------------------------------------------------ data

def datasets(cfg, image_size):
    """{"train": Dataset, test_name: Dataset, ...} for the synthetic benchmark, folders or JSON files."""
    on = cfg["augment"] == "true" or (cfg["augment"] == "auto" and cfg["train_data"] != "synthetic")
    aug = data.Augment(seed=cfg["seed"]) if on else None

    def real(spec, split, frames, augment):
        path = Path(spec)
        if path.suffix == ".json":
            return path.stem, data.DeepfakeBenchJSON(path, dataset=cfg["dataset"] or path.stem, split=split,
                                                     frames_per_video=frames, image_size=image_size,
                                                     data_root=cfg["data_root"] or None, augment=augment)
        return path.name, data.FrameFolder(path, frames_per_video=frames, image_size=image_size, augment=augment)

    out = {}
    if "synthetic" in (cfg["train_data"], *cfg["test_data"].split(",")):
        bench = synthetic.synthetic_splits(image_size=image_size, seed=cfg["seed"], augment=aug,
                                           train_videos=cfg["synthetic_train_videos"],
                                           test_videos=cfg["synthetic_test_videos"],
                                           frames_per_video=cfg["frames_per_video"],
                                           test_frames_per_video=cfg["test_frames_per_video"],
                                           train_methods=cfg["synthetic_train_methods"].split(","),
                                           test_methods=cfg["synthetic_test_methods"].split(","))
    out["train"] = bench["train"] if cfg["train_data"] == "synthetic" else \
        real(cfg["train_data"], cfg["train_split"], cfg["frames_per_video"], aug)[1]
    for spec in cfg["test_data"].split(","):
        if spec == "synthetic":
            out.update(in_domain=bench["in_domain"], cross_method=bench["cross_method"])
        else:
            name, ds = real(spec, cfg["test_split"], cfg["test_frames_per_video"], None)
            out[name] = ds
    return out


# ------------------------------------------------------------------------------ evaluation

def compute_metrics(probs, labels, videos):
    """Frame AUC, video AUC (over per-video mean fake probability), EER, AP and accuracy (at 0.5).

    A test set with one class has no AUC, EER or AP: those are None and `note` says why.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    by_video = {}
    for p, y, v in zip(probs, labels, videos):
        by_video.setdefault(v, [[], y])[0].append(p)
    video_probs = np.array([np.mean(ps) for ps, _ in by_video.values()])
    video_labels = np.array([y for _, y in by_video.values()])
    out = dict(frames=len(probs), videos=len(by_video), acc=float(np.mean((probs > 0.5) == labels)),
               frame_auc=None, video_auc=None, eer=None, ap=None)
    if len(set(labels.tolist())) < 2:
        out["note"] = f"only one class ({'fake' if labels[0] else 'real'}): AUC, EER and AP are undefined"
        return out
    fpr, tpr, _ = roc_curve(labels, probs)
    i = np.argmin(np.abs((1 - tpr) - fpr))
    out.update(frame_auc=float(roc_auc_score(labels, probs)), video_auc=float(roc_auc_score(video_labels, video_probs)),
               eer=float((fpr[i] + 1 - tpr[i]) / 2), ap=float(average_precision_score(labels, probs)))
    return out


@torch.no_grad()
def evaluate(model, dataset, *, batch, autocast, workers):
    """Metrics of one test set, and what the routers did: exit layers, expert gates, FLOPs (supp. Fig. A, Tab. D)."""
    model.eval()
    cfg = model.config
    rows = dict(prob=[], label=[], video=[], method=[], exit=[], gates=[], flops=[])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=data.collate,
                                         generator=torch.Generator())  # leaves the global RNG alone
    dev = next(model.parameters()).device
    skipped = []
    for b in loader:
        skipped += b["skipped"]
        if "image" not in b:
            continue
        with autocast():
            prob, out = model.predict(b["image"].to(dev))
        rows["prob"] += prob.float().cpu().tolist()
        rows["label"] += b["label"].tolist()
        rows["video"] += b["video"]
        rows["method"] += b["method"]
        rows["exit"] += out.exit_layer[:, 0].cpu().tolist()  # the global view ("original images", supp. Fig. A)
        rows["gates"].append(out.gates[:, 0].float().nanmean((1, 2)).cpu())  # (B, E) over the layers it ran
        rows["flops"] += out.flops.cpu().tolist()
    if not rows["prob"]:
        raise SystemExit(f"no readable frame in the test set ({len(skipped)} skipped, e.g. {skipped[:1]})")
    metrics = compute_metrics(rows["prob"], rows["label"], rows["video"])
    metrics["skipped"] = skipped
    labels, methods, gates = np.array(rows["label"]), np.array(rows["method"]), torch.cat(rows["gates"]).numpy()
    exits = np.array(rows["exit"])
    layers = list(range(cfg.first_routed_layer, cfg.layers + 1))
    metrics["exit_layers"] = {"layers": layers, **{name: [int(np.sum(exits[labels == y] == t)) for t in layers]
                                                   for name, y in (("real", 0), ("fake", 1))}}
    if cfg.expert_routing:
        groups = {"real": labels == 0, "fake": labels == 1,
                  **{f"fake/{m}": methods == m for m in sorted(set(methods[labels == 1].tolist()))}}
        metrics["gate_weights"] = {k: np.nanmean(gates[mask], 0).round(4).tolist() for k, mask in groups.items()
                                   if mask.any()}
    metrics["gflops_per_image"] = float(np.mean(rows["flops"])) / 1e9
    metrics["scores"] = dict(prob=rows["prob"], label=rows["label"])
    return metrics


def print_table(metrics):
    keys = ("frame_auc", "video_auc", "eer", "ap", "acc", "gflops_per_image")
    print(f"{'test set':<16}" + "".join(f"{k:>17}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:<16}" + "".join(f"{'n/a' if m[k] is None else format(m[k], '.4f'):>17}" for k in keys))
        if "note" in m:
            print(f"  {name}: {m['note']}")
        if m["skipped"]:
            print(f"  {name}: skipped {len(m['skipped'])} unreadable frames, e.g. {m['skipped'][0]}")


# ------------------------------------------------------------------------------ checkpoints

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, overrides):
    """A run's `last.pt`, refused with the difference named if `overrides` change its model."""
    if not path.exists():
        raise SystemExit(f"{path}: nothing to resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise SystemExit(f"{path}: not a readable checkpoint of this project: {e}") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise SystemExit(f"{path}: not a checkpoint of this project (no model_config inside)")
    saved = {**ckpt["model_config"], "preset": ckpt["config"]["preset"], "ablation": ckpt["config"]["ablation"]}
    differ = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in overrides.items() if k in saved and saved[k] != v]
    if differ:
        raise SystemExit(f"{path} was trained with a different config: " + "; ".join(differ))
    return ckpt


# ------------------------------------------------------------------------------ prediction

def run_predict(cfg, dev):
    path = Path(cfg["out_dir"]) / "best.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    if ckpt is None:
        raise SystemExit(f"{path}: no trained checkpoint to predict with (train first, or set --out_dir)")
    model = DFDHR(DFDHRConfig(**ckpt["model_config"]))
    if ckpt["config"].get("method", "dfdhr") != "dfdhr":
        model = peft.apply(model, ckpt["config"]["method"])
    model.to(dev).load_state_dict(ckpt["model"])
    target = Path(cfg["predict"])
    files = sorted(p for p in target.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES) if target.is_dir() else [target]
    if not files:
        raise SystemExit(f"{target}: no .png/.jpg images in it")
    for f in files:
        x = data.to_input(data.load_image(f), model.config.image_size)[None].to(dev)
        prob, out = model.predict(x)
        print(f"{f}  fake probability {prob.item():.4f}  exit layer per view {out.exit_layer[0].tolist()}")


# ------------------------------------------------------------------------------ training

def main(argv):
    overrides = parse_overrides(argv)
    cfg = {**DEFAULTS, **overrides}
    model_config = check(cfg)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["batch_size"] % world:
            raise SystemExit(f"--batch_size={cfg['batch_size']} is not divisible by {world} processes")
    else:
        rank, world = 0, 1
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    bf16 = cfg["dtype"] == "bf16" or (cfg["dtype"] == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if cfg["predict"]:
        return run_predict(cfg, dev)

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(out / "last.pt", overrides)
        # the run's own settings, except those given now
        cfg = {**ckpt["config"], **overrides, "init_from": ckpt["config"]["init_from"]}
        model = DFDHR(DFDHRConfig(**ckpt["model_config"])).to(dev)
    else:
        ckpt = None
        try:
            backbone = load_clip(cfg["init_from"]) if cfg["init_from"] != "scratch" else None
        except CheckpointError as e:
            raise SystemExit(f"--init_from: {e}") from None
        model = DFDHR(model_config, backbone=backbone)
        model = model.to(dev)
    if cfg["method"] != "dfdhr":
        model = peft.apply(model, cfg["method"]).to(dev)
    model_config = model.config  # a loaded CLIP checkpoint sets the backbone sizes
    try:
        sets = datasets(cfg, model_config.image_size)
    except (FileNotFoundError, ValueError) as e:  # a missing root, an empty folder, a JSON pointing nowhere
        raise SystemExit(f"data: {e}") from None
    train_set = sets.pop("train")
    # supp. Tab. A: every fine-tuning method at lr 1e-4, the full fine-tuning baseline at its own
    backbone_lr = cfg["backbone_lr"] or (cfg["lr"] if cfg["init_from"] == "scratch" else 1e-6)
    groups = model.param_groups(lr=cfg["lr"], backbone_lr=cfg["lr"] if cfg["method"] not in ("dfdhr", "baseline")
                                else backbone_lr)
    opt = torch.optim.Adam(groups, betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])
    step, epoch, history, best = 0, 0, [], -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, history, best = ckpt["step"], ckpt["epoch"], ckpt["history"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"])
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    per_epoch = len(train_set) // cfg["batch_size"]
    if per_epoch == 0:
        raise SystemExit(f"training set has {len(train_set)} frames, fewer than one batch of {cfg['batch_size']}")
    total = min(cfg["max_iters"] or 10 ** 12, cfg["epochs"] * per_epoch)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({**cfg, "model": asdict(model_config)}, indent=1))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{cfg['method']} on {cfg['preset']}/{cfg['ablation']}: {trainable / 1e6:.2f}M trainable parameters, "
              f"{len(train_set)} training frames, {total} steps of {cfg['batch_size']}, {dev}, "
              f"{'bf16' if bf16 else 'fp32'}, {world} process(es)")

    def checkpoint(name):
        if rank == 0:
            save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=cfg,
                             model_config=asdict(model_config), step=step, epoch=epoch, history=history,
                             best=best, rng=torch.get_rng_state()), out / name)

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # finish the step, save, exit
    try:
        t0, seen, skipped = time.time(), 0, []
        while step < total:
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg["seed"] + epoch)).tolist()
            train_set.set_epoch(epoch)
            start = (step - epoch * per_epoch) * cfg["batch_size"]
            batches = [order[i:i + cfg["batch_size"]] for i in range(start, per_epoch * cfg["batch_size"], cfg["batch_size"])]
            local = [b[rank::world] for b in batches]  # this process's share of each global batch
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=local, num_workers=cfg["num_workers"],
                                                 collate_fn=data.collate, generator=torch.Generator())
            model.train()
            for b in loader:
                for reason in b["skipped"]:
                    if len(skipped) < 5:
                        print(f"warning: skipped {reason}")
                    skipped.append(reason)
                if "image" not in b:  # every frame of the batch unreadable: a step without an update
                    step += 1
                    continue
                with autocast():
                    o = wrapped(b["image"].to(dev))
                    loss = dfdhr_loss(o, b["label"].to(dev), model_config)
                if not torch.isfinite(loss.total):
                    last = out / "last.pt"
                    raise SystemExit(f"step {step}: loss is {loss.total.item()} (ce {loss.ce.item()}, rank "
                                     f"{loss.rank.item()}); batch sources: {', '.join(b['source'][:4])}...; "
                                     f"last good checkpoint: {last if last.exists() else 'none yet'} (left untouched)")
                opt.zero_grad(set_to_none=True)
                loss.total.backward()
                opt.step()
                step += 1
                seen += len(b["label"]) * world
                history.append(dict(step=step, loss=loss.total.item(), ce=loss.ce.item(), rank=loss.rank.item()))
                if rank == 0 and (step % cfg["log_interval"] == 0 or step == total):
                    rate = seen / (time.time() - t0)
                    eta = (total - step) * cfg["batch_size"] / rate
                    print(f"step {step}/{total} | epoch {epoch} | loss {loss.total.item():.4f} "
                          f"(ce {loss.ce.item():.4f}, rank {loss.rank.item():.4f}) | {rate:.1f} img/s | "
                          f"ETA {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)
                if step % cfg["ckpt_interval"] == 0:
                    checkpoint("last.pt")
                if interrupted:
                    checkpoint("last.pt")
                    print(f"interrupted: saved {out / 'last.pt'} at step {step}; continue with --init_from=resume")
                    return
                if step >= total or step % per_epoch == 0:
                    break
            if step % per_epoch == 0:
                epoch += 1
            if rank == 0 and (step % per_epoch == 0 or step >= total):  # evaluate at each epoch end and at the end
                metrics = {name: evaluate(model, ds, batch=cfg["eval_batch_size"], autocast=autocast,
                                          workers=cfg["num_workers"]) for name, ds in sets.items()}
                score = next(iter(metrics.values()))["video_auc"] or 0.0  # best: first test set's video AUC
                history.append(dict(step=step, epoch=epoch, **{f"{n}/video_auc": m["video_auc"] for n, m in metrics.items()}))
                print_table(metrics)
                if score > best:
                    best = score
                    checkpoint("best.pt")
                (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
                (out / "history.json").write_text(json.dumps(history))
            checkpoint("last.pt")
        if rank == 0:
            if skipped:
                (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
                print(f"skipped {len(skipped)} unreadable training frames (listed in {out / 'skipped.txt'})")
            if sets and (out / "metrics.json").exists():
                paths = figures.write_run_figures(out, json.loads((out / "metrics.json").read_text()), history,
                                                  model, sets)
                print(f"figures: {len(paths)} files in {out / 'figures'}")
            print(f"done: {step} steps in {time.time() - t0:.0f} s; metrics in {out / 'metrics.json'}")
        if ddp:
            dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGINT, previous_handler)


if __name__ == "__main__":
    main(sys.argv[1:])

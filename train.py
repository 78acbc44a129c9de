"""Train and evaluate DFD-HR: Adam on L = L_cls + λ·L_rank, video-level AUC on each test set.

    python train.py                                   # small preset on weights/small_clip.pt, synthetic benchmark, CPU
    python train.py --preset=paper --init_from=ViT-L-14.pt --train_data=FFPP_ROOT --test_data=CDF_ROOT
    python train.py --init_from=resume                # continue the run in out_dir
    torchrun --nproc_per_node=4 train.py --preset=paper ...   # DistributedDataParallel

Settings are the fields of `Settings` below (the paper preset changes those in PAPER_SETTINGS) and
of `dfdhr.DFDHRConfig`; each is overridden by `--key=value`. A run writes to `out_dir`:
`config.json`, checkpoints `last.pt` and `best.pt` (written atomically, the settings inside),
`history.json`, `metrics.json` (`{test_set: {frame_auc, video_auc, eer, ap, acc, ...}}`) and
`figures/`. `predict.py` scores new images and videos with `best.pt`.
"""
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import cli
import data
import figures
import peft
import speed
import synthetic
from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, PRESETS, dfdhr_loss, make_config
from vit import CheckpointError, load_clip


# The small preset's pretrained backbone, made by pretrain.py (README: "The pretrained small backbone").
SMALL_CLIP = "weights/small_clip.pt"  # relative to the repository root, where the README's commands run


@dataclass(frozen=True)
class Settings:
    preset: str = "small"          # model preset of dfdhr.PRESETS: "small" (CPU) or "paper" (CLIP ViT-L/14, 448 input)
    ablation: str = "full"         # a row of the paper's ablations, dfdhr.ABLATIONS
    method: str = "dfdhr"          # "dfdhr", or a fine-tuning method of supp. Tab. A on the baseline (peft.METHODS)
    init_from: str = SMALL_CLIP    # a CLIP checkpoint (vit.load_clip), "resume" (out_dir/last.pt) or "scratch"
    out_dir: str = "out"
    # Data: "synthetic" (synthetic.py), a folder ROOT/{real,fake}/..., or a DeepfakeBench JSON file.
    train_data: str = "synthetic"
    test_data: str = "synthetic"   # comma-separated; "synthetic" gives one test set per forgery family
    val_data: str = "holdout"      # model selection: "holdout" (val_fraction of the training videos), "none", or data
    val_fraction: float = 0.1
    select: str = "val"            # best.pt by: "val" video AUC, or "test": DeepfakeBench's best per test set
    dataset: str = ""              # DeepfakeBench: data set name inside the JSON (default: the file's stem)
    data_root: str = ""            # DeepfakeBench: folder the JSON's relative frame paths start from
    train_split: str = "train"
    test_split: str = "test"
    synthetic_protocol: str = "sbi"  # "sbi": train on real + self-blends, test each family; or "cross_method"
    synthetic_strength: float = synthetic.STRENGTH  # scales every forgery family alike (1: subtle)
    synthetic_train_videos: int = 600   # sbi: real videos, each frame paired with its self-blend
    synthetic_test_videos: int = 100    # fake videos per test set (sbi: per family, against as many real ones)
    synthetic_train_methods: str = "faceswap,upsample"   # cross_method: families seen in training (and in_domain)
    synthetic_test_methods: str = "partial,selfblend"    # cross_method: held-out families
    synthetic_prerender: bool = True  # render the synthetic frames once, in 2 processes, and keep them in memory
    frames_per_video: int = 4      # training frames per video (paper: 8)
    test_frames_per_video: int = 4  # test frames per video (paper: 8-32)
    frame_sampling: str = "even"   # "even" over the video, or "first" (DeepfakeBench, the paper's runs)
    augment: str = "auto"          # "true", "false", or "auto": on for real data, off for the synthetic benchmark
    # Optimisation: Adam (paper).
    epochs: int = 4                # paper: 20
    max_iters: int = 0             # stop after this many steps (0: run all epochs)
    batch_size: int = 16           # effective batch per optimizer step, over all processes (paper: 64)
    micro_batch_size: int = 0      # per process and forward pass; 0: batch_size / processes (no accumulation)
    eval_batch_size: int = 32
    lr: float = 1e-3               # judges, experts, fusion, head (paper: 1e-4)
    backbone_lr: float = 1e-6      # a pretrained backbone under full fine-tuning (the paper's baseline)
    weight_decay: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    # Machine.
    seed: int = 1024               # paper
    dtype: str = "auto"            # "auto" (bf16 where the GPU or CPU computes in it natively, else fp32), "bf16", "fp32"
    device: str = "auto"           # "auto", "cpu", "cuda"
    num_workers: int = 1           # data-loading processes
    compile: bool = False          # torch.compile the training step (evaluation stays eager): at the small preset
                                   # 1.27x a step, its 129 s of compiling repaid after ~2,000 steps (BENCHMARKS.md §8)
    log_interval: int = 10         # steps
    ckpt_interval: int = 50        # steps between last.pt writes (and at each epoch end)


# The released recipe (the paper's runs): 4 processes × 16 = 64 per step, fp32, 20 epochs, the
# first 8 frames of each video, lr 1e-4.
PAPER_SETTINGS = dict(lr=1e-4, batch_size=64, micro_batch_size=16, epochs=20, dtype="fp32", frame_sampling="first",
                      frames_per_video=8, test_frames_per_video=8, init_from="ViT-L-14.pt")


def settings(given, model_given):
    """(Settings, DFDHRConfig) from the parsed options, refused before any work if impossible."""
    preset = given.get("preset", Settings.preset)
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: choose one of {sorted(PRESETS)}")
    cfg = Settings(**{**(PAPER_SETTINGS if preset == "paper" else {}), **given})
    check(cfg)
    return cfg, model_config(cfg, model_given)


def check(cfg):
    choices = dict(ablation=ABLATIONS, method=("dfdhr", *peft.METHODS), augment=("auto", "true", "false"),
                   dtype=("auto", "bf16", "fp32"), device=("auto", "cpu", "cuda"), select=("val", "test"),
                   frame_sampling=("even", "first"), synthetic_protocol=synthetic.PROTOCOLS)
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    for key in ("batch_size", "eval_batch_size", "frames_per_video", "test_frames_per_video", "epochs"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key}={getattr(cfg, key)} must be at least 1")
    if not 0 < cfg.val_fraction < 1:
        raise SystemExit(f"--val_fraction={cfg.val_fraction} must be in (0, 1)")


def model_config(cfg, overrides):
    """The model's config: preset, then ablation row, then single switches. Every method of supp.
    Tab. A runs on the baseline model (the plain ViT on the original image and a linear head)."""
    try:
        return make_config(cfg.preset, "baseline" if cfg.method != "dfdhr" else cfg.ablation, **overrides)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def build_model(cfg, config, backbone=None):
    """DFD-HR, or a fine-tuning method of supp. Tab. A: the one place train.py meets peft.py."""
    model = DFDHR(config, backbone)
    return model if cfg.method == "dfdhr" else peft.apply(model, cfg.method)


def optimizer(model, cfg):
    """Adam with one group per role. The backbone, where it trains, takes backbone_lr under full
    fine-tuning of a pretrained backbone (the paper's baseline), lr when trained from scratch; the
    methods of supp. Tab. A train everything at lr (supp. Sec. B)."""
    gentle = cfg.init_from != "scratch" and cfg.method in ("dfdhr", "baseline")
    groups = model.param_groups(lr=cfg.lr, backbone_lr=cfg.backbone_lr if gentle else cfg.lr)
    return torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------ data

def datasets(cfg, image_size):
    """{"train": Dataset, "val": Dataset or absent, test_name: Dataset, ...}."""
    on = cfg.augment == "true" or (cfg.augment == "auto" and cfg.train_data != "synthetic")
    aug = data.Augment(seed=cfg.seed) if on else None
    frames = dict(frames_per_video=cfg.frames_per_video, sampling=cfg.frame_sampling, image_size=image_size)
    test_frames = {**frames, "frames_per_video": cfg.test_frames_per_video}

    def load(spec, split, augment, **kw):
        path = Path(spec)
        if path.suffix == ".json":
            return path.stem, data.DeepfakeBenchJSON(path, dataset=cfg.dataset or path.stem, split=split,
                                                     data_root=cfg.data_root or None, augment=augment, **kw)
        return path.name, data.FrameFolder(path, augment=augment, **kw)

    bench, own = {}, cfg.train_data == "synthetic"
    if "synthetic" in (cfg.train_data, *cfg.test_data.split(",")):
        bench = synthetic.synthetic_splits(protocol=cfg.synthetic_protocol, strength=cfg.synthetic_strength,
                                           image_size=image_size, seed=cfg.seed, augment=aug,
                                           train_videos=cfg.synthetic_train_videos if own else 0,
                                           test_videos=cfg.synthetic_test_videos,
                                           frames_per_video=cfg.frames_per_video,
                                           test_frames_per_video=cfg.test_frames_per_video,
                                           train_methods=cfg.synthetic_train_methods.split(","),
                                           test_methods=cfg.synthetic_test_methods.split(","))
    out = {}
    if own:
        out["train"] = bench["train"]
        if cfg.val_data != "none":
            out["val"] = bench["val"]
    else:
        out["train"] = load(cfg.train_data, cfg.train_split, aug, **frames)[1]
        if cfg.val_data == "holdout":
            out["train"], out["val"] = data.hold_out_videos(out["train"], cfg.val_fraction, seed=cfg.seed)
        elif cfg.val_data != "none":
            out["val"] = load(cfg.val_data, "val", None, **test_frames)[1]
    for spec in cfg.test_data.split(","):
        if spec == "synthetic":
            out.update({k: v for k, v in bench.items() if k not in ("train", "val")})
        else:
            name, ds = load(spec, cfg.test_split, None, **test_frames)
            out[name] = ds
    return out


def batches(dataset, cfg, *, step, rank, world):
    """(epoch, this process's share of a global batch) for every step from `step` on, endlessly.

    Each epoch is a fresh shuffle seeded by (seed, epoch) and sets the data set's epoch (its
    augmentation draws); a resumed run skips exactly the batches it had done. A data set with a
    `group_size` (a real frame and its self-blend) is shuffled in groups that stay together."""
    per_epoch = len(dataset) // cfg.batch_size
    group = getattr(dataset, "group_size", 1)
    while True:
        epoch, done = divmod(step, per_epoch)
        groups = torch.randperm(len(dataset) // group, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        order = (groups[:, None] * group + torch.arange(group)).flatten().tolist()
        dataset.set_epoch(epoch)
        local = cfg.batch_size // world  # this process's contiguous share: pairs stay together
        shares = [order[i * cfg.batch_size + rank * local:i * cfg.batch_size + (rank + 1) * local]
                  for i in range(done, per_epoch)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=shares, num_workers=cfg.num_workers,
                                             collate_fn=data.collate, generator=torch.Generator())
        for b in loader:
            step += 1
            yield epoch, b


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
def predict_rows(model, dataset, *, batch, autocast, workers):
    """The model's outputs on every frame of a data set, as lists (one entry per frame)."""
    model.eval()
    cfg = model.config
    rows = dict(prob=[], label=[], video=[], method=[], exit=[], gates=[], gates_all=[], flops=[], skipped=[])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=data.collate,
                                         generator=torch.Generator())  # leaves the global RNG alone
    dev = next(model.parameters()).device
    for b in loader:
        rows["skipped"] += b["skipped"]
        if "image" not in b:
            continue
        with autocast():
            prob, out = model.predict(b["image"].to(dev))
        rows["prob"] += prob.float().cpu().tolist()
        rows["label"] += b["label"].tolist()
        rows["video"] += b["video"]
        rows["method"] += b["method"]
        rows["exit"] += out.exit_layer[:, 0].cpu().tolist()
        gates = out.gates[:, 0].float().cpu()  # (B, L, 2, E)
        rows["gates"] += list(gates[:, cfg.first_routed_layer].nanmean(1))  # (E,) each, supp. Tab. D's layer
        rows["gates_all"] += list(gates.nanmean((1, 2)))  # (E,) each, over the layers each image ran
        rows["flops"] += out.flops.cpu().tolist()
    return rows


def summarise(rows, cfg):
    """Metrics of one test set from its rows, and what the routers did on the original image: exit
    layers (supp. Fig. A), expert gate weights at layer K+1 as supp. Tab. D reports them (and over
    all layers), FLOPs."""
    if not rows["prob"]:
        raise SystemExit(f"no readable frame in the test set ({len(rows['skipped'])} skipped, e.g. "
                         f"{rows['skipped'][:1]})")
    metrics = compute_metrics(rows["prob"], rows["label"], rows["video"])
    metrics["skipped"] = rows["skipped"]
    labels, methods, exits = np.array(rows["label"]), np.array(rows["method"]), np.array(rows["exit"])
    layers = list(range(cfg.first_routed_layer, cfg.layers + 1))
    metrics["exit_layers"] = {"layers": layers, **{name: [int(np.sum(exits[labels == y] == t)) for t in layers]
                                                   for name, y in (("real", 0), ("fake", 1))}}
    if cfg.expert_routing:
        groups = {"real": labels == 0, "fake": labels == 1,
                  **{f"fake/{m}": methods == m for m in sorted(set(methods[labels == 1].tolist()))}}
        for key in ("gates", "gates_all"):
            g = torch.stack(rows[key]).numpy()
            name = "gate_weights" if key == "gates" else "gate_weights_all_layers"
            metrics[name] = {k: np.nanmean(g[mask], 0).round(4).tolist() for k, mask in groups.items()
                             if mask.any() and not np.isnan(g[mask]).all()}
        metrics["gate_layer"] = cfg.first_routed_layer + 1  # 1-based, as the supplementary counts
    metrics["gflops_per_image"] = float(np.mean(rows["flops"])) / 1e9
    metrics["scores"] = dict(prob=rows["prob"], label=rows["label"], method=rows["method"])
    return metrics


def evaluate(model, dataset, **kw):
    """Metrics of one test set (summarise)."""
    return summarise(predict_rows(model, dataset, **kw), model.config)


def evaluate_sets(model, sets, **kw):
    """{name: metrics} of several test sets; test sets that are views of one shared set (the
    synthetic families against the same real videos) are run once."""
    shared = {}
    for ds in sets.values():
        if isinstance(ds, synthetic.FamilyTestSet):
            shared.setdefault(id(ds.dataset), ds.dataset)
    rows = {key: predict_rows(model, ds, **kw) for key, ds in shared.items()}
    out = {}
    for name, ds in sets.items():
        every = rows.get(id(getattr(ds, "dataset", None)))
        if every is not None and not every["skipped"]:  # rows align with the shared set's frames
            out[name] = summarise({k: v if k == "skipped" else [v[i] for i in ds.indices] for k, v in every.items()},
                                  model.config)
        else:
            out[name] = evaluate(model, ds, **kw)
    return out


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


def load_checkpoint(path):
    """A checkpoint of this project, read without executing code: only tensors and plain data load."""
    if not path.exists():
        raise SystemExit(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a foreign one, or a pickle that would run code
        raise SystemExit(f"{path}: not a readable checkpoint of this project (it is loaded with weights_only=True, "
                         f"which refuses anything but tensors and plain data): {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
        raise SystemExit(f"{path}: not a checkpoint of this project (no model, model_config and config inside)")
    return ckpt


def resume(path, cfg_given, model_given):
    """A run's last.pt, refused with each difference named if the options now change its model."""
    if not path.exists():
        raise SystemExit(f"{path}: nothing to resume")
    ckpt = load_checkpoint(path)
    saved = {**ckpt["model_config"], "preset": ckpt["config"]["preset"], "ablation": ckpt["config"]["ablation"],
             "method": ckpt["config"]["method"]}
    differ = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in {**cfg_given, **model_given}.items()
              if k in saved and saved[k] != v]
    if differ:
        raise SystemExit(f"{path} was trained with a different config: " + "; ".join(differ))
    return ckpt


# ------------------------------------------------------------------------------ training

def uses_bf16(dtype, dev):
    """Whether `--dtype` computes in bf16 autocast on `dev`: "bf16", or "auto" where the device
    computes in bf16 natively (a recent GPU; a CPU with AVX512-BF16 or AMX), there faster than fp32."""
    if dtype != "auto":
        return dtype == "bf16"
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def main(argv):
    cfg_given, model_given = cli.parse(argv, Settings, DFDHRConfig)
    cfg, config = settings(cfg_given, model_given)
    speed.keep_freed_memory()
    out = Path(cfg.out_dir)
    ckpt = None
    if cfg.init_from == "resume":  # the run's own settings, before anything is derived from them
        ckpt = resume(out / "last.pt", cfg_given, model_given)
        cfg = replace(Settings(**ckpt["config"]), **{k: v for k, v in cfg_given.items() if k != "init_from"})
        config = DFDHRConfig(**ckpt["model_config"])
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    bf16 = uses_bf16(cfg.dtype, dev)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model = build_model(cfg, config)
    else:
        try:
            backbone = load_clip(cfg.init_from, heads=model_given.get("heads")) if cfg.init_from != "scratch" else None
        except CheckpointError as e:
            raise SystemExit(f"--init_from: {e}") from None
        model = build_model(cfg, config, backbone)
    model.to(dev)
    config = model.config  # a loaded CLIP checkpoint sets the backbone sizes
    local_batch, rest = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or local_batch
    if rest or local_batch % micro:
        raise SystemExit(f"--batch_size={cfg.batch_size} does not split into {world} process(es) × micro-batches "
                         f"of {micro}")
    try:
        sets = datasets(cfg, config.image_size)
    except (FileNotFoundError, ValueError) as e:  # a missing root, an empty folder, a JSON pointing nowhere
        raise SystemExit(f"data: {e}") from None
    train_set, val_set = sets.pop("train"), sets.pop("val", None)
    if cfg.synthetic_prerender:
        t = time.time()
        if synthetic.prerender([train_set, val_set, *sets.values()]) and rank == 0:
            print(f"rendered the synthetic frames in {time.time() - t:.0f} s", flush=True)
    per_epoch = len(train_set) // cfg.batch_size
    if per_epoch == 0:
        raise SystemExit(f"training set has {len(train_set)} frames, fewer than one batch of {cfg.batch_size}")
    total = min(cfg.max_iters or 10 ** 12, cfg.epochs * per_epoch)
    opt = optimizer(model, cfg)
    step, history, best = 0, [], {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history, best = ckpt["step"], ckpt["history"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"])
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    if cfg.compile:
        wrapped = speed.compile_for_training(wrapped)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "model": asdict(config)}, indent=1))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{cfg.method} on {cfg.preset}/{cfg.ablation}: {trainable / 1e6:.2f}M trainable parameters, "
              f"{len(train_set)} training frames, {total} steps of {cfg.batch_size}"
              f"{f' ({local_batch // micro} micro-batches of {micro})' if micro < local_batch else ''}, {dev}, "
              f"{'bf16' if bf16 else 'fp32'}, {world} process(es)")

    def checkpoint(name):
        if rank == 0:
            save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg),
                             model_config=asdict(config), step=step, history=history, best=best,
                             rng=torch.get_rng_state()), out / name)

    def evaluate_all(epoch):
        """Every set at an epoch end; best.pt follows the validation set, or the first test set."""
        kw = dict(batch=cfg.eval_batch_size, autocast=autocast, workers=cfg.num_workers)
        metrics = evaluate_sets(model, sets, **kw)
        val = evaluate(model, val_set, **kw)["video_auc"] if val_set is not None else None
        history.append(dict(step=step, epoch=epoch, seconds=round(time.time() - t0), val_video_auc=val,
                            **{f"{n}/video_auc": m["video_auc"] for n, m in metrics.items()}))
        print_table(metrics)
        if val is not None:
            print(f"validation video AUC {val:.4f}")
        score = val if cfg.select == "val" and val is not None else next(iter(metrics.values()))["video_auc"]
        if score is None or score >= best.get("score", -1.0):
            best.update(score=score, step=step)
            checkpoint("best.pt")
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if cfg.select == "test":  # DeepfakeBench: each test set's best evaluation, selected on its own labels
            for name, m in metrics.items():
                if m["video_auc"] is not None and m["video_auc"] >= best.get(name, {}).get("video_auc", -1.0):
                    best[name] = {**m, "step": step, "selected_on": "this test set (DeepfakeBench's reporting)"}
            (out / "metrics_best_per_test_set.json").write_text(json.dumps({k: v for k, v in best.items()
                                                                            if k in metrics}, indent=1))
        (out / "history.json").write_text(json.dumps(history))

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # finish the step, save, exit
    try:
        t0, seen, skipped = time.time(), 0, []
        model.train()
        stream = batches(train_set, cfg, step=step, rank=rank, world=world)
        while step < total:
            epoch, b = next(stream)
            for reason in b["skipped"]:
                if len(skipped) < 5:
                    print(f"warning: skipped {reason}")
                skipped.append(reason)
            losses = []
            if "image" in b:  # a batch whose every frame is unreadable is a step without an update
                opt.zero_grad(set_to_none=True)
                chunks = list(zip(b["image"].split(micro), b["label"].split(micro)))
                for i, (x, y) in enumerate(chunks):
                    sync = wrapped.no_sync if ddp and i < len(chunks) - 1 else contextlib.nullcontext  # DDP: reduce once
                    with sync(), autocast():
                        loss = dfdhr_loss(wrapped(x.to(dev)), y.to(dev), config)
                    if not torch.isfinite(loss.total):
                        last = out / "last.pt"
                        raise SystemExit(f"step {step}: loss is {loss.total.item()} (ce {loss.ce.item()}, rank "
                                         f"{loss.rank.item()}); batch sources: {', '.join(b['source'][:4])}...; "
                                         f"last good checkpoint: {last if last.exists() else 'none yet'} "
                                         f"(left untouched)")
                    (loss.total * len(x) / len(b["label"])).backward()
                    losses.append([t.item() * len(x) / len(b["label"]) for t in loss])
                opt.step()
                seen += len(b["label"]) * world
            step += 1
            if losses:
                total_loss, ce, rank_l = np.sum(losses, 0).tolist()
                history.append(dict(step=step, loss=total_loss, ce=ce, rank=rank_l))
                if rank == 0 and (step % cfg.log_interval == 0 or step == total):
                    rate = seen / (time.time() - t0)
                    eta = (total - step) * cfg.batch_size / rate
                    print(f"step {step}/{total} | epoch {epoch} | loss {total_loss:.4f} (ce {ce:.4f}, rank "
                          f"{rank_l:.4f}) | {rate:.1f} img/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)
            if step % cfg.ckpt_interval == 0:
                checkpoint("last.pt")
            if interrupted:
                checkpoint("last.pt")
                print(f"interrupted: saved {out / 'last.pt'} at step {step}; continue with --init_from=resume")
                return
            if step % per_epoch == 0 or step == total:  # an epoch's end, or the run's
                if rank == 0:
                    evaluate_all(round(step / per_epoch, 3))
                    model.train()
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

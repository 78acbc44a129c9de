"""Train and evaluate DFD-HR: Adam on L = L_cls + λ·L_rank, video-level AUC on each test set.

    python train.py                                   # small preset on weights/small_clip.pt, synthetic benchmark, CPU
    python train.py --preset=paper --init_from=ViT-L-14.pt --train_data=FFPP_ROOT --test_data=CDF_ROOT
    python train.py --init_from=resume                # continue the run in out_dir
    torchrun --nproc_per_node=4 train.py --preset=paper ...   # DistributedDataParallel

Settings are the fields of `Settings` below (the paper preset changes those in PAPER_SETTINGS) and
of `dfdhr.DFDHRConfig`; each is overridden by `--key=value`. `main` reads in sections: set-up
(the machine, DDP, precision), model, data, optimizer, the loop (`train_step` per batch), the end
of each epoch (`end_of_epoch`: evaluate, select best.pt), the finish. A run writes to `out_dir`:
`config.json`, checkpoints `last.pt` and `best.pt` (written atomically, the settings inside),
`history.json` (`{"steps": [...], "evals": [...]}`), `metrics.json` (`{test_set: {frame_auc,
video_auc, eer, ap, acc, ...}}`, evaluation.py) and `figures/`. `predict.py` scores new images and
videos with `best.pt`.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import compared
import cli
import data
import figures
import finetune
import speed
import synthetic
from dfdhr import ABLATIONS, PRESETS, SMALL_BACKBONE, DFDHRConfig, dfdhr_loss, make_config
from evaluation import evaluate, evaluate_sets, print_table
from vit import CheckpointError, load_clip, load_weights, read_checkpoint


@dataclass(frozen=True)
class Settings:
    preset: str = "small"          # model preset of dfdhr.PRESETS: "small" (CPU) or "paper" (CLIP ViT-L/14, 448 input)
    ablation: str = "full"         # a row of the paper's ablations, dfdhr.ABLATIONS
    method: str = "dfdhr"          # "dfdhr", or a fine-tuning method of supp. Tab. A on the baseline (finetune.METHODS)
                                   # or a method of supp. Tab. 6 that replaces the model (compared.METHODS)
    init_from: str = SMALL_BACKBONE  # a CLIP checkpoint (vit.load_clip), "resume" (out_dir/last.pt) or "scratch"
    init_convnext: str = ""        # --method=mra: its ConvNeXt's checkpoint (compared/convnext.py); "": a new one
    out_dir: str = "out"
    # Data: "synthetic" (the synthetic/ benchmark), a folder ROOT/{real,fake}/..., or a DeepfakeBench JSON file.
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
    synthetic_seed: int = 1024     # the benchmark's videos (identities, scenes, forgeries): fixed while --seed varies
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
    epochs: int = 2                # paper: 20
    max_iters: int = 0             # stop after this many steps (0: run all epochs)
    batch_size: int = 16           # effective batch per optimizer step, over all processes (paper: 64)
    micro_batch_size: int = 0      # per process and forward pass; 0: batch_size / processes (no accumulation)
    eval_batch_size: int = 32
    lr: float = 2e-3               # judges, experts, fusion, head (paper: 1e-4)
    lr_schedule: str = "cosine"    # "cosine": a linear warm-up over the first WARMUP of the steps, then a cosine
                                   # decay to 0 at the last; "constant": the paper's
    backbone_lr: float = 1e-6      # a pretrained backbone under full fine-tuning (the paper's baseline)
    exit_cost_from: float = 0.0    # the share of the steps after which the model's exit_cost (not in the paper) starts
    weight_decay: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    # Machine.
    seed: int = 1024               # paper
    dtype: str = "auto"            # "auto" (bf16 where the device computes in it natively: speed.py), "bf16", "fp32"
    device: str = "auto"           # "auto", "cpu", "cuda"
    num_workers: int = 1           # data-loading processes
    compile: bool = False          # torch.compile the training step (evaluation stays eager, as its exits change
                                   # shapes): pays for long runs only (README, "Compiling")
    log_interval: int = 10         # steps
    ckpt_interval: int = 50        # steps between last.pt writes (and at each epoch end)


# The released recipe (the paper's runs): 4 processes × 16 = 64 per step, fp32, 20 epochs, the
# first 8 frames of each video, lr 1e-4.
PAPER_SETTINGS = dict(lr=1e-4, lr_schedule="constant", batch_size=64, micro_batch_size=16, epochs=20, dtype="fp32",
                      frame_sampling="first", frames_per_video=8, test_frames_per_video=8, init_from="ViT-L-14.pt")
WARMUP = 0.05  # of the steps, under --lr_schedule=cosine


def settings(given, model_given):
    """(Settings, DFDHRConfig) from the parsed options, refused before any work if impossible."""
    preset = given.get("preset", Settings.preset)
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: choose one of {sorted(PRESETS)}")
    cfg = Settings(**{**(PAPER_SETTINGS if preset == "paper" else {}), **given})
    check(cfg)
    model = model_config(cfg, model_given)
    if cfg.exit_cost_from and not model.exit_cost:
        raise SystemExit(f"--exit_cost_from={cfg.exit_cost_from} starts --exit_cost, which is 0: set both")
    return cfg, model


def check(cfg):
    """Refuse an impossible setting before any work starts."""
    choices = dict(ablation=ABLATIONS, method=("dfdhr", *finetune.METHODS, *compared.METHODS),
                   augment=("auto", "true", "false"),
                   dtype=("auto", "bf16", "fp32"), device=("auto", "cpu", "cuda"), select=("val", "test"),
                   frame_sampling=("even", "first"), synthetic_protocol=synthetic.PROTOCOLS,
                   lr_schedule=("cosine", "constant"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    for key in ("batch_size", "eval_batch_size", "frames_per_video", "test_frames_per_video", "epochs"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key}={getattr(cfg, key)} must be at least 1")
    if not 0 < cfg.val_fraction < 1:
        raise SystemExit(f"--val_fraction={cfg.val_fraction} must be in (0, 1)")
    if not 0 <= cfg.exit_cost_from < 1:
        raise SystemExit(f"--exit_cost_from={cfg.exit_cost_from} must be in [0, 1)")
    if cfg.init_convnext and cfg.method != "mra":
        raise SystemExit("--init_convnext is MRA's ConvNeXt: it needs --method=mra")


def model_config(cfg, overrides):
    """The model's config: preset, then ablation row, then single switches. Every method of supp.
    Tab. A runs on the baseline model (the plain ViT on the original image and a linear head)."""
    try:
        return make_config(cfg.preset, "baseline" if cfg.method != "dfdhr" else cfg.ablation, **overrides)
    except ValueError as e:
        raise SystemExit(str(e)) from None


# ----------------------------------------------------------------------------- set-up

class Process(NamedTuple):
    """This process: where it computes, in what precision, its place among the DDP processes."""
    device: torch.device
    bf16: bool            # compute in bf16 autocast
    ddp_rank: int         # its rank under DistributedDataParallel (torchrun); 0 when it runs alone
    world: int            # number of processes
    micro_batch: int      # rows per forward pass; a batch's micro-batches add their gradients up

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def set_up(cfg):
    """The Process: DDP where torchrun started several (nccl on GPUs, gloo on CPUs), the device and
    precision (speed.device_and_precision), the micro-batch, refused if the batch does not split."""
    device, bf16 = speed.device_and_precision(cfg.device, cfg.dtype, index=int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch, rest = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or local_batch
    if rest or local_batch % micro:
        raise SystemExit(f"--batch_size={cfg.batch_size} does not split into {world} process(es) × micro-batches "
                         f"of {micro}")
    if world > 1 and cfg.method in finetune.ONE_PROCESS:
        raise SystemExit(f"--method={cfg.method} trains in one process: its own loss terms (finetune.extra_loss) read "
                         "what its forward leaves behind, which DistributedDataParallel does not see")
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Process(device, bf16, dist.get_rank() if world > 1 else 0, world, micro)


def describe(out, cfg, model, proc, machine, *, frames, total):
    """The run's settings, model and machine in out_dir/config.json, and its size in a line."""
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "model": asdict(model.config), "machine": machine},
                                                indent=1))
    local_batch = cfg.batch_size // proc.world
    micro = f" ({local_batch // proc.micro_batch} micro-batches of {proc.micro_batch})" \
        if proc.micro_batch < local_batch else ""
    print(f"{cfg.method} on {cfg.preset}/{cfg.ablation}: {finetune.count_trainable(model) / 1e6:.2f}M trainable "
          f"parameters, {frames} training frames, {total} steps of {cfg.batch_size}{micro}, {proc.world} process(es)")


# ----------------------------------------------------------------------------- model and optimizer

def backbone(cfg, heads):
    """The CLIP backbone a new run starts from (`--init_from`), or None to start from scratch."""
    if cfg.init_from == "scratch":
        return None
    try:
        return load_clip(cfg.init_from, heads=heads)
    except CheckpointError as e:
        raise SystemExit(f"--init_from: {e}") from None


def optimizer(model, cfg):
    """Adam with one group per role. The backbone, where it trains, takes backbone_lr under full
    fine-tuning of a pretrained backbone (the paper's baseline, and Tab. 6's methods), lr when trained from
    scratch; the methods of supp. Tab. A train everything at lr (supp. Sec. B)."""
    gentle = cfg.init_from != "scratch" and cfg.method in ("dfdhr", "baseline", *compared.METHODS)
    groups = model.param_groups(lr=cfg.lr, backbone_lr=cfg.backbone_lr if gentle else cfg.lr)
    for group in groups:
        group["initial_lr"] = group["lr"]  # what the schedule scales
    return torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def schedule(opt, cfg, *, step, total):
    """Set each group's learning rate for `step` of `total` (the epochs' steps: --max_iters stops a
    run, it does not shorten the schedule): its initial one ("constant", the paper's), or that times
    a linear warm-up over the first WARMUP of the steps and then a cosine decay to 0 at the last
    ("cosine"). A function of the step alone: a resumed run continues it."""
    warm = max(1, round(WARMUP * total))
    if cfg.lr_schedule == "constant":
        factor = 1.0
    elif step < warm:
        factor = (step + 1) / warm
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


# ----------------------------------------------------------------------------- data

def datasets(cfg, image_size, *, render=False, lead=True):
    """{"train": Dataset, "val": Dataset or absent, test_name: Dataset, ...}; render: the synthetic frames
    rendered once up front where --synthetic_prerender says so (lead: and say how long it took)."""
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
                                           image_size=image_size, seed=cfg.synthetic_seed, augment=aug,
                                           train_videos=cfg.synthetic_train_videos if own else 0,
                                           masks=cfg.method in finetune.NEEDS_MASKS,
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
    t = time.time()
    if render and cfg.synthetic_prerender and synthetic.prerender(list(out.values())) and lead:
        print(f"rendered the synthetic frames in {time.time() - t:.0f} s", flush=True)
    return out


def batches(dataset, cfg, *, step, ddp_rank, world):
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
        share = cfg.batch_size // world  # this process's contiguous share: pairs stay together
        shares = [order[i * cfg.batch_size + ddp_rank * share:i * cfg.batch_size + (ddp_rank + 1) * share]
                  for i in range(done, per_epoch)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=shares, num_workers=cfg.num_workers,
                                             collate_fn=data.collate, generator=torch.Generator())
        for b in loader:
            step += 1
            yield epoch, b


# ----------------------------------------------------------------------------- a step, and the run's record

class NonFiniteLoss(ArithmeticError):
    """A loss that is NaN or infinite: the step stopped before any update."""


def train_step(model, batch, opt, *, config, micro_batch, autocast, device):
    """One optimizer step on `batch`: forward and backward per micro-batch, whose gradients add up
    (DistributedDataParallel reduces them once, at the last), then the optimizer. Returns the
    batch's mean [L, L_cls, L_rank, L_extra] and the share of its views that left before the last layer;
    raises NonFiniteLoss, before any update, if a loss is not finite. A batch's blending masks ("mask",
    where a method's loss reads them) split with it."""
    opt.zero_grad(set_to_none=True)
    chunks = list(zip(*(batch[k].split(micro_batch) for k in ("image", "label", "mask") if k in batch)))
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP's: no gradient reduction in this pass
    parts = []
    for i, (x, y, *mask) in enumerate(chunks):
        x, y, mask = x.to(device), y.to(device), mask[0].to(device) if mask else None
        with (no_sync() if i < len(chunks) - 1 else contextlib.nullcontext()), autocast():
            out = model(x)
            loss = dfdhr_loss(out, y, config, finetune.extra_loss(model, y, mask))
        if not torch.isfinite(loss.total):
            raise NonFiniteLoss(f"loss is {loss.total.item()} (ce {loss.ce.item()}, rank {loss.rank.item()}, extra "
                                f"{loss.extra.item()}); batch sources: {', '.join(batch['source'][:4])}...")
        share = len(x) / len(batch["label"])
        (loss.total * share).backward()
        left = (out.exit_layer < config.layers).float().mean()
        parts.append([t.item() * share for t in (*loss, left)])
    opt.step()
    return np.sum(parts, 0).tolist()


@dataclass
class Progress:
    """What the run has done, saved in every checkpoint: a resumed run continues from it."""
    step: int = 0
    steps: list = field(default_factory=list)  # per step: {step, loss, ce, rank, extra, left}
    evals: list = field(default_factory=list)  # per epoch end: {step, epoch, seconds, val_video_auc, video_auc}
    best_score: float = -1.0  # best.pt's: the validation video AUC (or the first test set's)
    best_step: int = 0
    best_per_test_set: dict = field(default_factory=dict)  # --select=test: each test set's best evaluation

    def history(self):
        """history.json: one kind of record per list."""
        return {"steps": self.steps, "evals": self.evals}


def warn_skipped(skipped, reasons, shown=5):
    """Add a batch's unreadable frames to the run's list; the first `shown` of the run are printed."""
    for reason in reasons:
        if len(skipped) < shown:
            print(f"warning: skipped {reason}")
        skipped.append(reason)


def log_step(progress, losses, cfg, *, lead, epoch, total, rate):
    """Record a step's losses; the lead process prints them every log_interval steps, with the
    throughput (images a second) and an ETA."""
    loss, ce, l_rank, extra, left = losses  # left: the share of training views that left before the last layer
    progress.steps.append(dict(step=progress.step, loss=loss, ce=ce, rank=l_rank, extra=extra, left=left))
    if lead and (progress.step % cfg.log_interval == 0 or progress.step == total):
        eta = (total - progress.step) * cfg.batch_size / rate
        own = f", {cfg.method} {extra:.4f}" if extra else ""  # finetune.extra_loss, weighted
        print(f"step {progress.step}/{total} | epoch {epoch} | loss {loss:.4f} (ce {ce:.4f}, rank {l_rank:.4f}{own}) | "
              f"{rate:.1f} img/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)


# ----------------------------------------------------------------------------- the end of an epoch

def end_of_epoch(model, opt, sets, val_set, progress, cfg, proc, *, epoch, seconds):
    """Validate and keep best.pt, the best validation video AUC: the test sets wait for the finish
    (test_best). Without a validation set, or with --select=test, every test set is evaluated now:
    best.pt follows the first test set, and --select=test also keeps each test set's best evaluation
    (DeepfakeBench's reporting, selected on the test labels)."""
    out, kw = Path(cfg.out_dir), dict(batch=cfg.eval_batch_size, autocast=proc.autocast, workers=cfg.num_workers)
    metrics = evaluate_sets(model, sets, **kw) if tests_every_epoch(cfg, val_set) else {}
    val = evaluate(model, val_set, **kw)["video_auc"] if val_set is not None else None
    progress.evals.append(dict(step=progress.step, epoch=epoch, seconds=seconds, val_video_auc=val,
                               video_auc={name: m["video_auc"] for name, m in metrics.items()}))
    if metrics:
        print_table(metrics)
    if val is not None:
        print(f"validation video AUC {val:.4f}", flush=True)
    score = val if cfg.select == "val" and val is not None else next(iter(metrics.values()), {}).get("video_auc")
    if score is None or score >= progress.best_score:  # a one-class set has no AUC: its latest evaluation
        progress.best_score, progress.best_step = -1.0 if score is None else score, progress.step
        save_checkpoint(out / "best.pt", model, opt, cfg, progress)
        if metrics:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if cfg.select == "test":  # each test set's best evaluation, selected on its own labels
        best = progress.best_per_test_set
        for name, m in metrics.items():
            if m["video_auc"] is not None and m["video_auc"] >= best.get(name, {}).get("video_auc", -1.0):
                best[name] = {**m, "step": progress.step, "selected_on": "this test set (DeepfakeBench's reporting)"}
        (out / "metrics_best_per_test_set.json").write_text(json.dumps(best, indent=1))
    (out / "history.json").write_text(json.dumps(progress.history()))


def tests_every_epoch(cfg, val_set):
    """Whether the test sets are evaluated at every epoch's end, rather than once on best.pt."""
    return cfg.select == "test" or val_set is None


def test_best(model, sets, cfg, proc):
    """The test sets on best.pt's weights, once, into metrics.json; the model keeps those weights."""
    out = Path(cfg.out_dir)
    load_weights(model, read_checkpoint(out / "best.pt"), out / "best.pt")
    metrics = evaluate_sets(model, sets, batch=cfg.eval_batch_size, autocast=proc.autocast, workers=cfg.num_workers)
    print_table(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path, model, opt, cfg, progress):
    """Everything a resumed run needs: weights, optimizer, settings, progress, the random state."""
    save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg),
                     model_config=asdict(model.config), progress=asdict(progress), rng=torch.get_rng_state()), path)


def resume(path, cfg_given, model_given):
    """A run's last.pt and the run's own settings (options given now override them), refused with
    each difference named if the options now change its model."""
    if not path.exists():
        raise SystemExit(f"{path}: nothing to resume")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    if "progress" not in ckpt:
        raise SystemExit(f"{path} was written by an earlier train.py, whose record of the run this one does not "
                         "read: it cannot be resumed (predict.py still scores with it)")
    saved = {**ckpt["model_config"], **{k: ckpt["config"][k] for k in ("preset", "ablation", "method")}}
    differ = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in {**cfg_given, **model_given}.items()
              if k in saved and saved[k] != v]
    if differ:
        raise SystemExit(f"{path} was trained with a different config: " + "; ".join(differ))
    cfg = replace(Settings(**ckpt["config"]), **{k: v for k, v in cfg_given.items() if k != "init_from"})
    return ckpt, cfg, DFDHRConfig(**ckpt["model_config"])


def restore(model, opt, ckpt, path):
    """A resumed run's weights, optimizer state and random state, and its progress."""
    try:
        load_weights(model, ckpt, path)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return Progress(**ckpt["progress"])


# ----------------------------------------------------------------------------- the finish

def finish(out, model, sets, progress, skipped, seconds):
    """Name the skipped training frames, draw the run's figures, say where the results are."""
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
        print(f"skipped {len(skipped)} unreadable training frames (listed in {out / 'skipped.txt'})")
    if sets and (out / "metrics.json").exists():
        paths = figures.write_run_figures(out, json.loads((out / "metrics.json").read_text()), progress.history(),
                                          model, sets)
        print(f"figures: {len(paths)} files in {out / 'figures'}")
    print(f"done: {progress.step} steps in {seconds:.0f} s; metrics in {out / 'metrics.json'}")


def main(argv):
    # Set-up: the settings (a resumed run's own), the machine, this process among the DDP processes.
    cfg_given, model_given = cli.parse(argv, Settings, DFDHRConfig)
    cfg, config = settings(cfg_given, model_given)
    speed.keep_freed_memory()
    out, ckpt = Path(cfg.out_dir), None
    if cfg.init_from == "resume":
        ckpt, cfg, config = resume(out / "last.pt", cfg_given, model_given)
    proc = set_up(cfg)
    lead = proc.ddp_rank == 0  # the process that prints, evaluates and writes
    machine = speed.machine(proc.device, proc.bf16)
    if lead:
        print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)

    # Model: a new run's starts from its CLIP backbone, which sets the backbone's sizes.
    torch.manual_seed(cfg.seed)
    try:
        model = finetune.build_model(cfg.method, config, None if ckpt else backbone(cfg, model_given.get("heads")),
                                     convnext=None if ckpt else cfg.init_convnext)
    except CheckpointError as e:  # --init_convnext's
        raise SystemExit(f"--init_convnext: {e}") from None
    model.to(proc.device)

    # Data.
    try:
        sets = datasets(cfg, model.config.image_size, render=True, lead=lead)
    except (FileNotFoundError, ValueError) as e:  # a missing root, an empty folder, a JSON pointing nowhere
        raise SystemExit(f"data: {e}") from None
    train_set, val_set = sets.pop("train"), sets.pop("val", None)
    per_epoch = len(train_set) // cfg.batch_size
    if per_epoch == 0:
        raise SystemExit(f"training set has {len(train_set)} frames, fewer than one batch of {cfg.batch_size}")
    total = min(cfg.max_iters or 10 ** 12, cfg.epochs * per_epoch)

    # Optimizer and progress, a resumed run's own; the model as the step runs it (DDP, compiled).
    opt = optimizer(model, cfg)
    progress = restore(model, opt, ckpt, out / "last.pt") if ckpt is not None else Progress()
    stepped = torch.nn.parallel.DistributedDataParallel(model) if proc.world > 1 else model
    stepped = speed.compile_for_training(stepped) if cfg.compile else stepped
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        describe(out, cfg, model, proc, machine, frames=len(train_set), total=total)

    # The loop: a step per batch; last.pt every ckpt_interval steps; Ctrl-C ends the step, saves, exits.
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        t0, seen, skipped = time.time(), 0, []
        model.train()
        stream = batches(train_set, cfg, step=progress.step, ddp_rank=proc.ddp_rank, world=proc.world)
        while progress.step < total:
            epoch, b = next(stream)
            warn_skipped(skipped, b["skipped"])
            losses = None
            if "image" in b:  # a batch whose every frame is unreadable is a step without an update
                schedule(opt, cfg, step=progress.step, total=cfg.epochs * per_epoch)
                charged = progress.step >= cfg.exit_cost_from * cfg.epochs * per_epoch
                config = model.config if charged else replace(model.config, exit_cost=0.0)
                losses = train_step(stepped, b, opt, config=config, micro_batch=proc.micro_batch,
                                    autocast=proc.autocast, device=proc.device)
                finetune.after_step(model, progress.step + 1, total)  # AdaLoRA: its rank allocation
                seen += len(b["label"]) * proc.world
            progress.step += 1
            if losses is not None:
                log_step(progress, losses, cfg, lead=lead, epoch=epoch, total=total, rate=seen / (time.time() - t0))
            if lead and (progress.step % cfg.ckpt_interval == 0 or interrupted):
                save_checkpoint(out / "last.pt", model, opt, cfg, progress)
            if interrupted:
                print(f"interrupted: saved {out / 'last.pt'} at step {progress.step}; continue with --init_from=resume")
                return

            # The end of an epoch, or of the run: evaluate, select best.pt, save last.pt.
            if (progress.step % per_epoch == 0 or progress.step == total) and lead:
                end_of_epoch(model, opt, sets, val_set, progress, cfg, proc,
                             epoch=round(progress.step / per_epoch, 3), seconds=round(time.time() - t0))
                model.train()
                save_checkpoint(out / "last.pt", model, opt, cfg, progress)

        # The finish: the test sets on best.pt, the figures.
        if lead:
            if sets and not tests_every_epoch(cfg, val_set):
                test_best(model, sets, cfg, proc)
            finish(out, model, sets, progress, skipped, time.time() - t0)
        if proc.world > 1:
            dist.destroy_process_group()
    except NonFiniteLoss as e:
        last = out / "last.pt"
        raise SystemExit(f"step {progress.step}: {e}; last good checkpoint: {last if last.exists() else 'none yet'} "
                         "(left untouched)") from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)


if __name__ == "__main__":
    main(sys.argv[1:])

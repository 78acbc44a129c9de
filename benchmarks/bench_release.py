"""DFD-HR against the authors' released detector: the same weights, the same inputs, on this machine.

    python -m benchmarks.bench_release --release=/path/to/DFD-HR          # a checkout of the authors' repository
    python -m benchmarks.bench_release --release=... --batches=2 --repeats=1 --train=false

The released detector (`training/detectors/dfd_hr_detector.py` and its `utils/`) is imported from
the user's checkout, never copied into this project; it needs `einops` and `transformers`. What it
takes from DeepfakeBench (a detector registry, a loss registry, a training-metrics function) is
supplied by the minimal harness below, and its CLIP download by a ViT-L/14 `CLIPModel` built offline
with random weights. Without a checkout the benchmark says so and exits.

Both detectors get the same weights: the release's adapters, judges, pooling and head are copied
into ours built with `--ablation=released` (its routing: layers 20-22 routed, 23 for every sample,
argsort ranks, one Gumbel draw, no gate noise), so their eval logits must agree. Reported per batch:
eval forward and one training step (forward, backward, Adam), release seconds / ours, medians of
`repeats` after a warm-up with the two in turn, and the largest |difference| of the eval logits.
`--malloc` sets glibc's allocator for the process, so for both (speed.py; train.py keeps freed memory).
"""
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cli
import speed
from benchmarks.measure import breakdown, table, timed
from dfdhr import DFDHR, dfdhr_loss, make_config
from vit import load_clip


@dataclass(frozen=True)
class Options:
    release: str = ""          # the authors' repository (the folder holding training/detectors/)
    batches: str = "2,8"
    repeats: int = 2           # timed runs of each measurement, after one warm-up
    train: bool = True         # also time a training step
    profile: bool = False      # with --train: also profile one training step of each, self CPU time by kind of operator
    malloc: str = "kept"       # "kept": freed memory kept for reuse in this process (speed.py), or glibc's "default"
    seed: int = 0


# ----------------------------------------------------------------------------- the harness

class Registry(dict):
    """DeepfakeBench's registries: `@REGISTRY.register_module(module_name=...)` on a class."""

    def register_module(self, module_name):
        def add(cls):
            self[module_name] = cls
            return cls
        return add


class CrossEntropy(nn.Module):  # DeepfakeBench's "cross_entropy" loss: a tensor, not a dict
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels)


def clip_l14():
    """A CLIP ViT-L/14 with random weights, built offline (the release downloads `openai/clip-vit-large-patch14`)."""
    import transformers
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=224, hidden_act="quick_gelu")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    return transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                          projection_dim=768)).eval()


def load_release(root, clip):
    """The released DFDHRDetector class, imported from `root` with DeepfakeBench's pieces stubbed."""
    folder = Path(root) / "training" / "detectors"
    if not (folder / "dfd_hr_detector.py").is_file():
        raise SystemExit(f"{folder / 'dfd_hr_detector.py'}: not found; --release is the authors' repository root")
    detector_registry, losses = Registry(), Registry(cross_entropy=CrossEntropy)
    package = types.ModuleType("detectors")  # the release's package, without its __init__'s path edits
    package.__path__, package.DETECTOR = [str(folder)], detector_registry
    metrics = types.ModuleType("metrics.base_metrics_class")
    metrics.calculate_metrics_for_train = lambda label, pred: (0.0, 0.0, 0.0, 0.0)
    stubs = {"detectors": package, "loss": types.SimpleNamespace(LOSSFUNC=losses),
             "metrics": types.ModuleType("metrics"), "metrics.base_metrics_class": metrics}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = importlib.import_module("detectors.dfd_hr_detector")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    offline = types.SimpleNamespace(from_pretrained=lambda name: clip)  # both of its from_pretrained calls
    module.CLIPModel, module.AutoProcessor = offline, types.SimpleNamespace(from_pretrained=lambda name: None)
    return module.DFDHRDetector


RELEASE_CONFIG = {"backbone_name": "ViT-L/14_proj", "loss_func": "cross_entropy",
                  "backbone_config": {"layer": 24, "remain_layer": 20, "capacity": 0.75}}


# ----------------------------------------------------------------------------- the same weights

@torch.no_grad()
def copy_release_into_ours(release, ours):
    """Our modules take the release's weights: experts, token and layer judges, pooling, head."""
    routers, K = ours.original_routers, ours.config.first_routed_layer
    for i, pair in enumerate(routers.experts):
        released = (release.adapters_attn[i], release.adapters_mlp[i])
        for ours_moa, theirs in zip((pair.after_attn, pair.after_mlp), released):
            ours_moa.gate.load_state_dict(theirs.gate.state_dict())
            r = ours_moa.adapter_rank
            for e, expert in enumerate(theirs.experts):  # Linear(D, r) -> GELU -> Linear(r, D)
                ours_moa.up.weight[e * r:(e + 1) * r] = expert[0].weight
                ours_moa.up.bias[e * r:(e + 1) * r] = expert[0].bias
                ours_moa.down_weight[e] = expert[2].weight.T
                ours_moa.down_bias[e] = expert[2].bias
    for layer in ours.config.routed_layers:
        routers.token_judge(layer).proj.load_state_dict(release.token_router[layer].weight_predictor.state_dict())
        routers.layer_judge(layer).load_state_dict(release.layer_router[layer].state_dict())
    assert list(ours.config.routed_layers) == list(range(K, 23)), "the release routes layers 20-22"
    ours.pool.query.copy_(release.query_token)
    ours.pool.attn.load_state_dict(release.query_attn.state_dict())
    ours.head.load_state_dict(release.head.state_dict())


def build(opts):
    torch.manual_seed(opts.seed)
    clip = clip_l14()
    release = load_release(opts.release, clip)(RELEASE_CONFIG)
    with torch.no_grad():  # the release's Linear defaults leave the adapters near zero: make them count
        for name, p in release.named_parameters():
            if p.requires_grad and not name.startswith("query"):
                p.normal_(0, 0.02)
    vision = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    ours = DFDHR(make_config("paper", "released"), backbone=load_clip(vision, heads=16))
    copy_release_into_ours(release, ours)
    return release, ours


# ----------------------------------------------------------------------------- measurements

def training_step(model, loss_of, x, y):
    """One step of either detector, driven alike: its own loss, backward, Adam (train.train_step
    drives ours alone, and the release's forward takes a dict)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=5e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()
    return step


def compare(release, ours, batch, opts):
    """One row: the two detectors timed in turn (measure.timed), medians of `repeats` after a warm-up."""
    x = torch.randn(batch, 3, 448, 448, generator=torch.Generator().manual_seed(batch))
    y = torch.arange(batch) % 2
    release.eval(), ours.eval()
    row = dict(batch=batch)
    with torch.no_grad():
        row["max_abs_logit_diff"] = (release({"image": x})["cls"] - ours(x).logits).abs().max().item()
        t = timed([lambda: release({"image": x}), lambda: ours(x)], repeats=opts.repeats)
    row.update(release_eval_s=t[0], ours_eval_s=t[1], eval_release_over_ours=t[0] / t[1])
    if opts.train:
        def release_loss(x, y):
            data = {"image": x, "label": y}
            return release.get_losses(data, release(data))["overall"]

        steps = dict(release=training_step(release, release_loss, x, y),
                     ours=training_step(ours, lambda x, y: dfdhr_loss(ours(x), y, ours.config).total, x, y))
        t = timed(list(steps.values()), repeats=opts.repeats)
        row.update(release_train_s=t[0], ours_train_s=t[1], train_release_over_ours=t[0] / t[1])
        if opts.profile:  # where each training step's time goes, by kind of operator
            for name, step in steps.items():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    step()
                _, ops, kinds, total = breakdown(prof, top=12)
                print(f"\n{name}, training step at batch {batch}: {total / 1e6:.1f} s self CPU time\n\n"
                      f"{table(kinds, ['kind', 'self_ms', 'share'])}\n\n{table(ops, ['op', 'calls', 'self_ms', 'share'])}",
                      flush=True)
    return row


def main(argv):
    opts = Options(**cli.parse(argv, Options)[0])
    if not opts.release:
        print("bench_release: skipped, no --release=PATH (a checkout of the authors' DFD-HR repository)")
        return []
    for package in ("einops", "transformers"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"bench_release: the released detector needs {package} (pip install {package})")
    if opts.malloc not in ("kept", "default"):
        raise SystemExit(f"--malloc={opts.malloc}: choose kept or default")
    if opts.malloc == "kept":
        speed.keep_freed_memory()  # for both detectors: the setting is the process's
    release, ours = build(opts)
    rows = []
    for batch in map(int, opts.batches.split(",")):
        rows.append(compare(release, ours, batch, opts))
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
              flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""The project's own supp. Tab. A and main ablation: fine-tuning methods of finetune.py, DFD-HR and rows
of dfdhr.ABLATIONS, each trained by train.py with the same budget on the same data, in one table.

    python -m benchmarks.compare_methods                        # every method, a train.py run each, synthetic benchmark
    python -m benchmarks.compare_methods --methods=lora,dora,dfdhr --max_iters=300 --synthetic_train_videos=480
    python -m benchmarks.compare_methods --ablations=main       # the main ablation: baseline, each router added, full
    python -m benchmarks.compare_methods --params_only          # trainable parameters at the paper's size

The options of this script are `Options` below; every other `--key=value` goes to each train.py run unchanged. Run NAME
writes to out_dir/NAME/ (train.py's files); the table goes to out_dir/comparison.md and is printed.
"""
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import cli
import finetune
import train
from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, make_config


@dataclass(frozen=True)
class Options:
    methods: str = ",".join((*finetune.METHODS, "dfdhr"))  # comma-separated
    ablations: str = ""         # instead of methods: rows of dfdhr.ABLATIONS, comma-separated, or "main"
    out_dir: str = "out/compare"
    max_iters: int = 0          # steps per run (0: train.py's own, its epochs)
    params_only: bool = False   # print the trainable parameters at the paper preset, train nothing


# The paper's main ablation: routers added one at a time to the baseline, and the
# Multi-Scale Fusion without and with them.
MAIN_ABLATION = ("baseline", "+layer_pruning", "+token_selection", "+expert_routing", "fusion_only", "full")


def trainable(config, method):
    """Trainable parameters of `method` on a model of `config`, built on the meta device: no memory, no time."""
    with torch.device("meta"):
        return finetune.count_trainable(finetune.build_model(method, config))


def params_table(names, preset="paper"):
    """Markdown: trainable parameters of each method at `preset` (baseline model + finetune.apply; DFD-HR's own)."""
    with torch.device("meta"):
        backbone = sum(p.numel() for p in DFDHR(make_config(preset, "baseline")).backbone.parameters())
    lines = [f"| method | trainable parameters | % of the backbone ({backbone / 1e6:.1f}M) |", "|---|---:|---:|"]
    for name in names:
        n = trainable(make_config(preset, "full" if name == "dfdhr" else "baseline"), name)
        lines.append(f"| {name} | {n:,} | {100 * n / backbone:.3f} |")
    return "\n".join(lines)


def fmt(value, spec=".4f"):
    return "n/a" if value is None else format(value, spec)


def main(argv):
    ours = [a for a in argv if a[2:].partition("=")[0] in {f.name for f in fields(Options)}]
    passed = [a for a in argv if a not in ours]
    opts = Options(**cli.parse(ours, Options)[0])
    given = cli.parse(passed, train.Settings, DFDHRConfig)[0]  # refuse a bad option before the first run, not after ten
    if "method" in given or "ablation" in given:
        raise SystemExit("--method and --ablation are set by this script for each run")
    if opts.ablations:
        names = list(MAIN_ABLATION) if opts.ablations == "main" else opts.ablations.split(",")
        unknown = [a for a in names if a not in ABLATIONS]
        kind = "ablation"
    else:
        names = [m for m in opts.methods.split(",") if m]
        unknown = [m for m in names if m != "dfdhr" and m not in finetune.METHODS]
        kind = "method"
    if unknown:
        raise SystemExit(f"unknown {kind}s {unknown}")
    if opts.params_only:
        table = params_table(names)
        print(table)
        return table

    root = Path(opts.out_dir)
    rows, test_sets = [], []
    for name in names:
        run = root / name
        print(f"\n=== {name} -> {run}", flush=True)
        (run / "metrics.json").unlink(missing_ok=True)
        t0 = time.time()
        try:
            train.main([f"--{kind}={name}", f"--out_dir={run}", f"--max_iters={opts.max_iters}", *passed])
            error = None
        except SystemExit as e:  # a run that fails (a NaN loss, ...) is reported, the others still run
            error = str(e)
        seconds = time.time() - t0
        if error is None and not (run / "metrics.json").exists():  # Ctrl-C: train.py saved last.pt and returned
            print(f"{name} was interrupted: stopping here")
            break
        metrics = json.loads((run / "metrics.json").read_text()) if error is None else {}
        config = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").exists() else None
        params = trainable(DFDHRConfig(**config), "dfdhr" if kind == "ablation" else name) if config else None
        if config is None:
            backbone = None
        elif kind == "method" and name != "baseline":
            backbone = "PEFT"  # the method decides what of the backbone trains (finetune.py)
        else:
            backbone = "frozen" if config["freeze_backbone"] else "fine-tuned"
        test_sets += [t for t in metrics if t not in test_sets]
        rows.append((name, backbone, params, metrics, seconds, error))

    header = [kind, "backbone", "trainable params", *[f"{t} video AUC" for t in test_sets], "GMAC / image", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, backbone, params, metrics, seconds, error in rows:
        gmac = next(iter(metrics.values()))["gmac_per_image"] if metrics else None
        cells = [name, backbone or "", fmt(params, ","), *[fmt(metrics.get(t, {}).get("video_auc")) for t in test_sets],
                 fmt(gmac, ".3f"), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |" + (f" failed: {error}" if error else ""))
    settings = " ".join([f"--max_iters={opts.max_iters}", *passed])
    table = (f"Same budget for every run: `{settings}`\n\n" + "\n".join(lines) + "\n\n"
             "GMAC (multiply-adds, the paper's FLOPs): train.py's estimate (dfdhr.estimate_flops) at the exits taken; for the methods of finetune.py it is\n"
             "the plain ViT's, without the adapters' or prompts' own cost (VPT-deep runs N + 5 tokens; SideTuning's AlexNet, ForAda's adapter\n"
             "and second CLIP pass, MoE-FFD's experts are not counted).")
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.md").write_text(table + "\n")
    print("\n" + table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])

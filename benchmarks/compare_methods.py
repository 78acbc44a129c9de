"""The project's own supp. Tab. A, main ablation and Tab. 5, 6, 8: fine-tuning methods of finetune/, DFD-HR,
rows of dfdhr.ABLATIONS and the methods of compared/, each trained by train.py with the same budget on the
same data, over one or more seeds, in one table.

    python -m benchmarks.compare_methods                        # every method, a train.py run each, synthetic benchmark
    python -m benchmarks.compare_methods --methods=lora,dora,dfdhr --max_iters=300 --synthetic_train_videos=480
    python -m benchmarks.compare_methods --ablations=main       # the main ablation: baseline, each router added, full
    python -m benchmarks.compare_methods --ablations=tab6       # a table of supp. Sec. B: tab5, tab6 or tab8 (TABLES)
    python -m benchmarks.compare_methods --ablations=full --seeds=1024,1,2 --dtype=fp32   # the default run, 3 seeds
    python -m benchmarks.compare_methods --params_only          # trainable parameters at the paper's size

The options of this script are `Options` below; every other `--key=value` goes to each train.py run unchanged. Run NAME
writes to out_dir/NAME/ (train.py's files), or out_dir/NAME/seedS/ over several seeds; the table goes to
out_dir/comparison.md and is printed, every run's figures to out_dir/comparison.json. A cell is a run's video
AUC with its 95 % interval over videos (evaluation.py), or over several seeds their mean ± standard deviation
(seeds vary the training: initialisation, batch order, noise; the benchmark's videos stay those of
--synthetic_seed).
"""
import json
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import compared
import cli
import finetune
import train
from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, make_config
from evaluation import interval


@dataclass(frozen=True)
class Options:
    methods: str = ",".join((*finetune.METHODS, "dfdhr"))  # comma-separated
    ablations: str = ""         # instead of methods: rows of dfdhr.ABLATIONS (or compared.METHODS), comma-separated,
                                # or a table of TABLES: "main", "tab5", "tab6", "tab8"
    out_dir: str = "out/compare"
    seeds: str = "1024"         # comma-separated training seeds (train.py's --seed); one run per row and seed
    routers: bool = False       # also what the routers did: early exits, multiply-adds saved, forged patches kept
    max_iters: int = 0          # steps per run (0: train.py's own, its epochs)
    params_only: bool = False   # print the trainable parameters at the paper preset, train nothing


# The paper's main ablation: routers added one at a time to the baseline, and the
# Multi-Scale Fusion without and with them.
MAIN_ABLATION = ("baseline", "+layer_pruning", "+token_selection", "+expert_routing", "fusion_only", "full")
# The tables of supp. Sec. B, each with the rows of ours they are compared with first: Tab. 5 under Early Layer
# Pruning (without token selection, then ours), Tab. 6 in the baseline regime (the baseline, then our
# Multi-Scale Fusion), Tab. 8 against the full model. A name of compared.METHODS is a --method= run.
TABLES = {
    "main": MAIN_ABLATION,
    "tab5": ("+layer_pruning", "+token_selection", "pca", "fastv", "sparse_attention"),
    "tab6": ("baseline", "fusion_only", "split_ensemble", "multi_cls_pooling", *compared.METHODS),
    "tab8": ("full", "sa_pooling", "soft_routers", "shared_layer_judges", "gap_judges", "learn_weight"),
}


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
    if {"method", "ablation", "seed"} & given.keys():
        raise SystemExit("--method, --ablation and --seed are set by this script for each run (--seeds)")
    if opts.ablations:
        names = list(TABLES.get(opts.ablations, opts.ablations.split(",")))
        kinds = {n: "ablation" if n in ABLATIONS else "method" for n in names}
        unknown = [n for n in names if n not in ABLATIONS and n not in compared.METHODS]
    else:
        names = [m for m in opts.methods.split(",") if m]
        kinds = {n: "method" for n in names}
        unknown = [m for m in names if m != "dfdhr" and m not in finetune.METHODS and m not in compared.METHODS]
    if unknown:
        raise SystemExit(f"unknown {'rows' if opts.ablations else 'methods'} {unknown}")
    if opts.params_only:
        table = params_table(names)
        print(table)
        return table

    root, seeds = Path(opts.out_dir), [int(x) for x in opts.seeds.split(",")]
    rows, test_sets = [], []
    for name in names:
        runs, kind = [], kinds[name]
        for seed in seeds:
            run = root / name / (f"seed{seed}" if len(seeds) > 1 else "")
            print(f"\n=== {name}, seed {seed} -> {run}", flush=True)
            runs.append(train_one(run, [f"--{kind}={name}", f"--seed={seed}", f"--max_iters={opts.max_iters}",
                                        *passed]))
            if runs[-1] is None:  # Ctrl-C: train.py saved last.pt and returned
                print(f"{name} was interrupted: stopping here")
                break
        if runs[-1] is None:
            break
        config = next((r["config"] for r in runs if r["config"]), None)
        params = trainable(DFDHRConfig(**config), "dfdhr" if kind == "ablation" else name) if config else None
        if config is None:
            backbone = None
        elif kind == "method" and name not in ("baseline", *compared.METHODS):
            backbone = "PEFT"  # the method decides what of the backbone trains (finetune/)
        else:
            backbone = "frozen" if config["freeze_backbone"] else "fine-tuned"
        for r in runs:
            test_sets += [t for t in r["metrics"] if t not in test_sets]
        rows.append(dict(name=name, backbone=backbone, params=params, seeds=seeds[:len(runs)], runs=runs))
    table = comparison(rows, test_sets, opts, passed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.md").write_text(table + "\n")
    (root / "comparison.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    return table


def train_one(run, args):
    """One train.py run: {metrics, config, seconds, error}; None if it was interrupted. A run that
    fails (a NaN loss, ...) is reported, and the others still run."""
    (run / "metrics.json").unlink(missing_ok=True)
    t0 = time.time()
    try:
        train.main([f"--out_dir={run}", *args])
        error = None
    except SystemExit as e:
        error = str(e)
    if error is None and not (run / "metrics.json").exists():
        return None
    metrics = json.loads((run / "metrics.json").read_text()) if error is None else {}
    for m in metrics.values():
        m.pop("scores", None)  # every frame's score: in the run's own metrics.json
    config = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").exists() else None
    return dict(metrics=metrics, config=config, seconds=time.time() - t0, error=error)


def auc_cell(runs, test_set):
    """One run: its video AUC and interval; several: mean ± standard deviation over the seeds."""
    ms = [r["metrics"].get(test_set) for r in runs]
    if any(m is None or m["video_auc"] is None for m in ms):
        return "n/a"
    if len(ms) == 1:
        return interval(ms[0])
    aucs = [m["video_auc"] for m in ms]
    return f"{statistics.mean(aucs):.3f} ± {statistics.stdev(aucs):.3f}"


def mean_of(runs, value):
    values = [value(r["metrics"]) for r in runs if r["metrics"]]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def router_cells(runs, test_sets):
    """Early exits of real and fake test images (original image), multiply-adds saved against every
    view running every layer, and the smallest forged/other ratio of kept patches over the routed
    layers and views (1: Token Selection blind to the forgery), averaged over test sets and seeds."""
    def over_sets(value):
        return lambda metrics: statistics.mean(v for v in (value(metrics[t]) for t in test_sets if t in metrics)
                                               if v is not None) if metrics else None

    def ratio(m):
        tr = m.get("token_recall", {})
        ratios = [r for view in ("original", "split") if view in tr for r in tr[view]["ratio"] if r is not None]
        return min(ratios) if ratios else None

    real = mean_of(runs, over_sets(lambda m: m["exits"]["early_share"].get("real")))
    fake = mean_of(runs, over_sets(lambda m: m["exits"]["early_share"].get("fake")))
    saved = mean_of(runs, over_sets(lambda m: m.get("gmac_saved")))
    tokens = mean_of(runs, over_sets(ratio)) if any(ratio(m) for r in runs for m in r["metrics"].values()) else None
    return [fmt(real, ".0%"), fmt(fake, ".0%"), fmt(saved, ".1%"), fmt(tokens, ".2f")]


def comparison(rows, test_sets, opts, passed):
    """The Markdown table of every row."""
    router_header = ["exited early: real", "fake", "GMAC saved", "forged/other kept (min)"] if opts.routers else []
    header = ["row" if opts.ablations else "method", "backbone", "trainable params",
              *[f"{t} video AUC" for t in test_sets], *router_header, "GMAC / image", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        runs = row["runs"]
        gmac = mean_of(runs, lambda metrics: next(iter(metrics.values()))["gmac_per_image"])
        errors = [r["error"] for r in runs if r["error"]]
        cells = [row["name"], row["backbone"] or "", fmt(row["params"], ","), *[auc_cell(runs, t) for t in test_sets],
                 *(router_cells(runs, test_sets) if opts.routers else []), fmt(gmac, ".3f"),
                 f"{statistics.mean(r['seconds'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(cells) + " |" + (f" failed: {errors[0]}" if errors else ""))
    settings = " ".join([f"--max_iters={opts.max_iters}", *passed])
    spread = (f"mean ± standard deviation over seeds {opts.seeds}" if "," in opts.seeds
              else f"seed {opts.seeds}, [95 % interval] over videos")
    return (f"Same budget for every run: `{settings}`; {spread}; seconds per run.\n\n" + "\n".join(lines) + "\n\n"
            "GMAC (multiply-adds, the paper's FLOPs): train.py's estimate (dfdhr.estimate_flops) at the exits taken; "
            "for the methods of finetune/ it is\nthe plain ViT's, without the adapters' or prompts' own cost "
            "(VPT-deep runs N + 5 tokens; SideTuning's AlexNet, ForAda's adapter\nand second CLIP pass, MoE-FFD's "
            "experts are not counted); for RINE, D³ and MRA (compared/) the ViT's by the formula on each view,\n"
            "and MRA's ConvNeXt and adapters.")


if __name__ == "__main__":
    main(sys.argv[1:])

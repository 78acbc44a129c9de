"""The project's own supp. Tab. A: every fine-tuning method of peft.py and DFD-HR, trained by train.py
with the same budget on the same data, in one table.

    python compare_methods.py                                   # all methods, 60 steps each, synthetic benchmark
    python compare_methods.py --methods=lora,dora,dfdhr --max_iters=300 --synthetic_train_videos=480
    python compare_methods.py --params_only                     # trainable parameters at the paper's size

Options of this script: `methods` (comma-separated; default every peft.METHODS and dfdhr), `out_dir`,
`max_iters`, `params_only`. Every other `--key=value` goes to each train.py run unchanged. Run NAME
writes to out_dir/NAME/ (train.py's files); the table goes to out_dir/comparison.md and is printed.
"""
import json
import sys
import time
from pathlib import Path

import torch

import peft
import train
from dfdhr import DFDHR, DFDHRConfig, make_config

methods = ",".join((*peft.METHODS, "dfdhr"))
out_dir = "out/compare"
max_iters = 60
params_only = False


def trainable(config, method):
    """Trainable parameters of `method` on a model of `config`, built on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = DFDHR(config)
        if method != "dfdhr":
            model = peft.apply(model, method)
    return peft.count_trainable(model)


def params_table(names, preset="paper"):
    """Markdown: trainable parameters of each method at `preset` (baseline model + peft.apply; DFD-HR's own)."""
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
    ours = {"methods": methods, "out_dir": out_dir, "max_iters": max_iters, "params_only": params_only}
    passed = []
    for arg in argv:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key == "params_only" and "=" not in arg:
            ours[key] = True
        elif key in ours:
            if "=" not in arg:
                raise SystemExit(f"arguments are --key=value, got {arg!r}")
            value = arg.split("=", 1)[1]
            ours[key] = value.lower() in ("true", "1") if key == "params_only" else type(ours[key])(value)
        elif key in ("method", "init_from"):
            raise SystemExit(f"--{key} is set by this script for each run")
        else:
            passed.append(arg)
    names = [m for m in ours["methods"].split(",") if m]
    unknown = [m for m in names if m != "dfdhr" and m not in peft.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from dfdhr, {', '.join(peft.METHODS)}")
    if ours["params_only"]:
        table = params_table(names)
        print(table)
        return table
    train.parse_overrides(passed)  # refuse a bad option before the first run, not after ten

    root = Path(ours["out_dir"])
    rows, test_sets = [], []
    for name in names:
        run = root / name
        print(f"\n=== {name} -> {run}", flush=True)
        (run / "metrics.json").unlink(missing_ok=True)
        t0 = time.time()
        try:
            train.main([f"--method={name}", f"--out_dir={run}", f"--max_iters={ours['max_iters']}", *passed])
            error = None
        except SystemExit as e:  # a run that fails (a NaN loss, ...) is reported, the others still run
            error = str(e)
        seconds = time.time() - t0
        if error is None and not (run / "metrics.json").exists():  # Ctrl-C: train.py saved last.pt and returned
            print(f"{name} was interrupted: stopping here")
            break
        metrics = json.loads((run / "metrics.json").read_text()) if error is None else {}
        config = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").exists() else None
        params = trainable(DFDHRConfig(**config), name) if config else None
        test_sets += [t for t in metrics if t not in test_sets]
        rows.append((name, params, metrics, seconds, error))

    header = ["method", "trainable params", *[f"{t} video AUC" for t in test_sets], "GMAC / image", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, params, metrics, seconds, error in rows:
        gflops = next(iter(metrics.values()))["gflops_per_image"] if metrics else None
        cells = [name, fmt(params, ","), *[fmt(metrics.get(t, {}).get("video_auc")) for t in test_sets],
                 fmt(gflops, ".3f"), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |" + (f" failed: {error}" if error else ""))
    settings = " ".join([f"--max_iters={ours['max_iters']}", *passed])
    table = (f"Same budget for every method: `{settings}`\n\n" + "\n".join(lines) + "\n\n"
             "GMAC (multiply-adds, the paper's FLOPs): train.py's estimate (dfdhr.estimate_flops) at the exits taken; for the methods of peft.py it is\n"
             "the plain ViT's, without the adapters' or prompts' own cost (VPT-deep runs N + 5 tokens).")
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.md").write_text(table + "\n")
    print("\n" + table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])

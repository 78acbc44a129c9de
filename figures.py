"""Figures of a DFD-HR run, after the paper's analyses, drawn from evaluation.py's metrics.

  exit_layers       supp. Fig. A (main Fig. 5(a)): at which layer real and fake samples exit
  gate_weights      supp. Tab. D (main Fig. 5(b)) as bars: mean expert gate weight, real / fake / per method
  gate_table        supp. Tab. D itself: gate weights in %, the rank of each expert in parentheses
  roc               frame-level ROC curve per test set, behind the AUCs of the paper's tables
  training_curves   L = CE + λ·L_rank and its parts per step; video AUC per test set at epoch ends
  token_recall      Token Selection against the forged region: forged patches kept relative to the others
  token_overlays    supp. Fig. B style: test faces with exit layer and fake probability, and the
                    tokens each routed layer kept (Token Selection) drawn over the original image,
                    from overlay_data(model, dataset): a stored run draws it without its model
  write_run_figures all of them as PNG files in out_dir/figures/, plus gate_weights.md

Figures are built on matplotlib's Agg canvas directly, so importing this module leaves pyplot's
backend alone. Layers are numbered from 0 as in dfdhr.py: "exit at layer T" means block T was the
first the sample skipped (it skipped the routed layers T.. from there on; an unrouted last layer,
as in the released code, still ran); T = L means it skipped none.
"""
import json
import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, roc_curve

from dfdhr import original_image
from vit import CLIP_MEAN, CLIP_STD

REAL = "#1f77b4"  # blue, every real sample in every figure
FAKE = "#d62728"  # red, every fake sample
METHOD_SHADES = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#9467bd", "#7f7f7f")  # fake methods, warm/neutral
SETS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")  # test sets, in their order (ROC, AUC)
LOSSES = {"loss": ("black", "L = CE + λ·L_rank"), "ce": ("#bcbd22", "CE"),
          "rank": ("#17becf", "L_rank = 1 − Spearman")}  # history keys: colour, legend
DPI = 100


def _figure(width, height):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------- layers (supp. Fig. A)

def exit_layers(metrics, title):
    """Share of real and of fake test images that exit at each layer (original image, supp. Fig. A)."""
    ex = metrics["exit_layers"]
    layers, L = np.array(ex["layers"]), ex["layers"][-1]
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    width = 0.38
    for shift, name, colour in ((-width / 2, "real", REAL), (width / 2, "fake", FAKE)):
        counts = np.array(ex[name], dtype=float)
        share = 100 * counts / max(counts.sum(), 1)
        bars = ax.bar(layers + shift, share, width, color=colour, label=f"{name} ({int(counts.sum())} images)")
        ax.bar_label(bars, [f"{int(c)}" if c else "" for c in counts], fontsize=8, padding=1)
    ax.set_xticks(layers, [f"{t}" if t < L else f"{t}\n(all ran)" for t in layers])
    no_exit = ex["real"][-1] + ex["fake"][-1] == sum(ex["real"]) + sum(ex["fake"])
    ax.set(xlabel="exit layer T (the first block skipped)", ylabel="share of the class's images (%)", ylim=(0, 112),
           title=title + ("\n(no image exited early)" if no_exit else ""))
    ax.legend(loc="best", fontsize=9, title="bar labels: image counts", title_fontsize=8)
    return fig


# ----------------------------------------------------------------------------- experts (supp. Tab. D)

def _gate_rows(metrics):  # (row name, colour, weights (E,)) for real, fake, then each fake method
    g = metrics["gate_weights"]
    methods = sorted(k for k in g if k.startswith("fake/"))
    rows = [(k, c, np.asarray(g[k], dtype=float)) for k, c in (("real", REAL), ("fake", FAKE)) if k in g]
    return rows + [(k, METHOD_SHADES[i % len(METHOD_SHADES)], np.asarray(g[k], dtype=float))
                   for i, k in enumerate(methods)]


def gate_weights(metrics, title):
    """Mean gate weight (%) of each expert for real, fake and each fake method (supp. Tab. D as bars)."""
    rows = _gate_rows(metrics)
    E = len(rows[0][2])
    fig = _figure(max(6, 1.3 * E + 0.4 * len(rows)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for j, (name, colour, w) in enumerate(rows):
        ax.bar(np.arange(E) + (j - (len(rows) - 1) / 2) * width, 100 * w, width, label=name, color=colour,
               edgecolor="white", hatch="//" if name.startswith("fake/") else None)
    ax.axhline(100 / E, color="black", lw=0.8, ls="--", label=f"uniform (100/E = {100 / E:.1f}%)")
    values = np.concatenate([w for *_, w in rows]) * 100
    pad = max(0.5, 0.15 * (values.max() - values.min()))
    ax.set_ylim(min(values.min(), 100 / E) - pad, max(values.max(), 100 / E) + 2.5 * pad)
    ax.set_xticks(np.arange(E), [f"Expert #{e + 1}" for e in range(E)])
    ax.set(ylabel="mean gate weight (%)\n(axis does not start at 0)", title=title)
    ax.legend(fontsize=8, ncol=min(3, len(rows) + 1), loc="upper center")
    return fig


def gate_table(metrics):
    """supp. Tab. D as Markdown: weight in %, (rank among experts), largest bold, second underlined."""
    if "gate_weights" not in metrics:
        return "_Expert routing is off in this run: no gate weights._\n"
    rows = _gate_rows(metrics)
    E = len(rows[0][2])
    lines = ["| | " + " | ".join(f"Expert #{e + 1}" for e in range(E)) + " |", "|---" * (E + 1) + "|"]
    for name, _, w in rows:
        rank = np.empty(E, dtype=int)
        rank[np.argsort(-w, kind="stable")] = np.arange(1, E + 1)  # 1 = largest; ties by expert order
        cells = [f"{100 * x:.2f}" for x in w]
        cells = [f"**{c}**" if r == 1 else f"<ins>{c}</ins>" if r == 2 else c for c, r in zip(cells, rank)]
        lines.append(f"| {name} | " + " | ".join(f"{c} ({r})" for c, r in zip(cells, rank)) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- detection

def roc(metrics_by_set):
    """Frame-level ROC curve of each test set; a one-class set has none and says so in the legend."""
    fig = _figure(5, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance (AUC 0.5)")
    for i, (name, m) in enumerate(metrics_by_set.items()):
        labels, probs = np.asarray(m["scores"]["label"]), np.asarray(m["scores"]["prob"])
        if len(set(labels.tolist())) < 2:
            kind = "fake" if len(labels) and labels[0] else "real"
            ax.plot([], [], " ", label=f"{name}: only {kind} images, no ROC")
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, color=SETS[i % len(SETS)], lw=1.8,
                label=f"{name} (AUC {auc(fpr, tpr):.3f}, {len(labels)} frames)")
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title="ROC per test set (frame level)")
    ax.legend(loc="best", fontsize=8)
    return fig


def training_curves(history):
    """L, CE and L_rank (unweighted) per step, raw and as a running mean; video AUC per test set at
    epoch ends. history: train.py's {"steps": [...], "evals": [...]}."""
    steps, evals = history["steps"], history["evals"]
    fig = _figure(10, 3.8)
    ax, bx = fig.subplots(1, 2)
    x = np.array([h["step"] for h in steps])
    window = max(1, len(steps) // 25)
    for key, (colour, label) in LOSSES.items():
        y = np.array([h[key] for h in steps], dtype=float)
        ax.plot(x, y, color=colour, alpha=0.3, lw=0.8)
        if len(y) >= window:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1:], smooth, color=colour, lw=1.6, label=label)
    ax.set(xlabel="step", ylabel="loss",
           title="training losses" + (f" (faint: per step, solid: mean of {window})" if window > 1 else ""))
    if steps:
        ax.legend(fontsize=8)
    names = dict.fromkeys(name for h in evals for name in h["video_auc"])
    for i, name in enumerate(names):
        pts = [(h["step"], h["video_auc"][name]) for h in evals if h["video_auc"].get(name) is not None]
        if pts:
            bx.plot(*zip(*pts), marker="o", color=SETS[i % len(SETS)], label=name)
        else:
            bx.plot([], [], " ", label=f"{name}: one class, no AUC")
    bx.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    bx.set(xlabel="step", ylabel="video AUC", title="video AUC per test set at epoch ends", ylim=(0, 1.05),
           xlim=(0, max([h["step"] for h in steps + evals], default=1) * 1.03))
    bx.legend(fontsize=8, loc="lower right")
    for axis in (ax, bx):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# ----------------------------------------------------------------------------- tokens (supp. Fig. B)

def to_display(image):
    """A CLIP-normalised (3, H, W) tensor -> (H, W, 3) numpy RGB in [0, 1]."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def kept_mask(idx, grid):
    """Kept token indices (n̂,) -> (grid, grid) bool of kept patches and whether CLS was kept.

    Token 0 is CLS, token t >= 1 is patch t-1 in row-major order; -1 (sample had exited) keeps none.
    """
    idx = np.asarray(idx)
    mask = np.zeros(grid * grid, dtype=bool)
    mask[idx[idx >= 1] - 1] = True
    return mask.reshape(grid, grid), bool((idx == 0).any())


def _pick(dataset, n):  # n sample indices, half real and half fake (as far as each has), spread over the set
    labels = np.array([s.label for s in dataset.samples])
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    n_real = min(len(reals), max(n // 2, n - len(fakes)))
    return [i for pool, count in ((reals, n_real), (fakes, min(len(fakes), n - n_real)))
            for i in pool[np.linspace(0, len(pool) - 1, count).round().astype(int)].tolist()]


def forged_region(dataset, indices, items, size):
    """Per face, where its forgery changed the original image, (size, size) bool: a view pixel whose
    frame pixels changed at least half, from data that knows what its forgeries changed (`changed`:
    the synthetic benchmark); None for real faces and for other data."""
    changed = getattr(dataset, "changed", None)
    out = []
    for i, it in zip(indices, items):
        if it["label"] == 0 or changed is None:
            out.append(None)
            continue
        c = changed(i)  # (S, S)
        k = c.shape[0] // size
        out.append(c.reshape(size, k, size, k).mean((1, 3)) >= 0.5)
    return out


@torch.no_grad()
def overlay_data(model, dataset, n=4):
    """What token_overlays draws, as plain data (train.py stores it as overlays.json): for n test
    faces (half real, half fake) their index in `dataset`, fake probability, exit layer of the
    original image, and for each routed layer the token indices it kept (−1 where it had exited)."""
    picks = _pick(dataset, n)
    batch = torch.stack([dataset[i]["image"] for i in picks]).to(next(model.parameters()).device)
    prob, out = model.predict(batch)
    return dict(first_routed_layer=model.config.first_routed_layer, layers=model.config.layers,
                view_size=model.config.view_size, patch_size=model.config.patch_size,
                faces=[dict(index=i, prob=float(prob[row]), exit=int(out.exit_layer[row, 0]),
                            kept=[k[row, 0].tolist() for k in out.kept]) for row, i in enumerate(picks)])


def token_overlays(overlays, dataset):
    """supp. Fig. B style, from overlay_data(model, dataset): each test face's original image with its
    true class, fake probability and exit layer, then the tokens each routed layer kept (dropped
    patches darkened; "exited" where the sample had left)."""
    faces, L, K, size = overlays["faces"], overlays["layers"], overlays["first_routed_layer"], overlays["view_size"]
    items = [dataset[f["index"]] for f in faces]
    view = original_image(torch.stack([it["image"] for it in items]).float(), size)
    changed = forged_region(dataset, [f["index"] for f in faces], items, size)
    grid, routed = size // overlays["patch_size"], len(faces[0]["kept"]) if faces else 0
    fig = _figure(max(2.3 * (1 + routed), 4.5), 2.5 * len(items))
    axes = np.array(fig.subplots(len(items), 1 + routed, squeeze=False))
    for row, (it, face) in enumerate(zip(items, faces)):
        img, T = to_display(view[row]), face["exit"]
        truth = "real" if it["label"] == 0 else f"fake ({it['method']})"
        axes[row, 0].imshow(img)
        if changed[row] is not None and changed[row].any():
            for ax in axes[row]:
                ax.contour(changed[row], levels=[0.5], colors=FAKE, linewidths=0.8)
        axes[row, 0].set_title(f"{truth}\np(fake) = {face['prob']:.2f}, exit at layer {T}"
                               + (" (ran all)" if T == L else ""), fontsize=9,
                               color=REAL if it["label"] == 0 else FAKE)
        for j, idx in enumerate(face["kept"]):
            ax, layer, idx = axes[row, 1 + j], K + j, np.asarray(idx)
            ax.imshow(img, zorder=0)
            if (idx < 0).all():
                ax.imshow(np.zeros((*img.shape[:2], 4)) + [0, 0, 0, 0.75])
                ax.set_title(f"layer {layer}: exited", fontsize=9)
                continue
            mask, cls = kept_mask(idx, grid)
            shade = np.zeros((grid, grid, 4))
            shade[~mask] = [0, 0, 0, 0.65]  # dropped patches darkened
            ax.imshow(shade, extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
            ax.set_title(f"layer {layer}: {mask.sum()}/{grid * grid} patches\n"
                         f"CLS {'kept' if cls else 'dropped'}", fontsize=9)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    outlined = "; red: the outline of what the forgery changed" if any(c is not None for c in changed) else ""
    fig.suptitle("Original image: kept tokens of the routed layers, dropped patches darkened" + outlined if routed else
                 "Original image (token selection is off:\nevery token runs in every layer)", fontsize=10)
    return fig


def token_recall(metrics):
    """Token Selection against the forged region: per test set and routed layer, the share of forged
    patches kept over the share of other patches kept, original and split images (1: blind to the
    forgery; above 1: it keeps the forgery). None if no test set knows its forged regions."""
    rows = [(name, m["token_recall"]) for name, m in metrics.items() if "token_recall" in m]
    if not rows:
        return None
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    for i, (name, tr) in enumerate(rows):
        for view, style in (("original", "-"), ("split", "--")):
            if view in tr:
                ratio = [np.nan if r is None else r for r in tr[view]["ratio"]]  # a layer no view ran
                ax.plot(tr["layers"], ratio, style, marker="o", color=SETS[i % len(SETS)],
                        label=f"{name}, {view}")
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="routed layer", ylabel="forged kept / other kept",
           title="Token Selection: forged patches kept, relative to other patches")
    ax.legend(fontsize=7, ncol=2)
    return fig


# ----------------------------------------------------------------------------- a run's figures

def write_run_figures(out_dir, metrics, history, model, test_sets):
    """Every figure of a run as out_dir/figures/*.png, and supp. Tab. D as gate_weights.md.

    metrics: {test set: evaluation.evaluate() dict}; history: train.py's {"steps", "evals"}; test_sets:
    {test set: Dataset}, the first one gives token_overlays.png (and its data, overlays.json).
    Returns the paths written.
    """
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        path = folder / name
        fig.savefig(path, dpi=DPI)
        paths.append(path)

    safe = {name: re.sub(r"[^\w.-]+", "_", name) for name in metrics}
    table = ["# Gate weight distribution (%) of Expert Routing (supp. Tab. D)", "",
             "Original image at layer K+1, where the supplementary reads them; (·) is the rank "
             "among experts. `gate_weights_all_layers` in metrics.json has the mean over every layer run.", ""]
    for name, m in metrics.items():
        save(exit_layers(m, f"Exit layers on {name} (original image)"), f"exit_layers_{safe[name]}.png")
        if "gate_weights" in m:
            save(gate_weights(m, f"Expert gate weights on {name} (original image)"),
                 f"gate_weights_{safe[name]}.png")
        table += [f"## {name}", "", gate_table(m)]
    save(roc(metrics), "roc.png")
    recall = token_recall(metrics)
    if recall is not None:
        save(recall, "token_recall.png")
    save(training_curves(history), "training_curves.png")
    if model is not None and test_sets:
        first = next(iter(test_sets.values()))
        overlays = overlay_data(model, first)
        (folder / "overlays.json").write_text(json.dumps(overlays))
        paths.append(folder / "overlays.json")
        save(token_overlays(overlays, first), "token_overlays.png")
    (folder / "gate_weights.md").write_text("\n".join(table))
    return paths + [folder / "gate_weights.md"]

"""Evaluation of a trained DFD-HR model: the detection metrics of the paper's tables with their
uncertainty, and what each router did on each test set.

  metrics      frame AUC, video AUC (over per-video mean fake probability, the paper's headline)
               with its 95 % interval, EER, AP, accuracy; `compute_metrics`
  routers      on the original image, as the supplementary reads them: the exit layers of real and
               fake images (supp. Fig. A) and the multiply-adds they saved; the expert gate weights at
               layer K+1 (supp. Tab. D) of real and fake, and which expert tells them apart; over
               every view, the share of forged and of other patches that Token Selection kept
               (where the data knows what its forgery changed: the synthetic benchmark)
  a test set   the model's outputs on every frame (`predict_rows`), then its metrics (`summarise`)
  several      `evaluate_sets` runs test sets that share their frames once; `print_table`

train.py evaluates with these; figures.py draws from their output. Intervals come from a bootstrap
over videos, real and fake resampled apart, with a fixed seed: a run reports the same interval
every time it is evaluated.
"""
import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import data
import synthetic
from routing import num_kept

LEVEL = 0.95       # of every interval
RESAMPLES = 2000   # bootstrap resamples
FORGED_SHARE = 0.25  # a patch is forged when at least this share of its pixels changed


# ----------------------------------------------------------------------------- metrics

def bootstrap_rows(n, rng):  # (RESAMPLES, n) indices drawn with replacement
    return rng.integers(n, size=(RESAMPLES, n))


def percentile_interval(values):  # (RESAMPLES, ...) -> [low, high] of each statistic
    low, high = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    return low.tolist(), high.tolist()


def auc_interval(scores, labels, seed=0):
    """LEVEL percentile interval of the AUC over RESAMPLES stratified bootstrap resamples: the real
    and the fake scores resampled apart, so every resample keeps both classes' sizes. Each AUC is
    the Mann-Whitney statistic of the ranks (ties count half, as roc_auc_score)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    fake, real = scores[labels == 1], scores[labels == 0]
    rng = np.random.default_rng(seed)
    resampled = np.concatenate([fake[bootstrap_rows(len(fake), rng)], real[bootstrap_rows(len(real), rng)]], 1)
    fake_ranks = rankdata(resampled, axis=1)[:, :len(fake)]  # (RESAMPLES, fakes)
    auc = (fake_ranks.sum(1) - len(fake) * (len(fake) + 1) / 2) / (len(fake) * len(real))
    low, high = percentile_interval(auc)
    return [low, high]


def compute_metrics(probs, labels, videos):
    """Frame AUC, video AUC (over per-video mean fake probability) and its LEVEL interval over
    videos, EER, AP and accuracy (at 0.5).

    A test set with one class has no AUC, EER or AP: those are None and `note` says why.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    by_video = {}
    for p, y, v in zip(probs, labels, videos):
        by_video.setdefault(v, [[], y])[0].append(p)
    video_probs = np.array([np.mean(ps) for ps, _ in by_video.values()])
    video_labels = np.array([y for _, y in by_video.values()])
    out = dict(frames=len(probs), videos=len(by_video), acc=float(np.mean((probs > 0.5) == labels)),
               frame_auc=None, video_auc=None, video_auc_interval=None, eer=None, ap=None)
    if len(set(labels.tolist())) < 2:
        out["note"] = f"only one class ({'fake' if labels[0] else 'real'}): AUC, EER and AP are undefined"
        return out
    fpr, tpr, _ = roc_curve(labels, probs)
    i = np.argmin(np.abs((1 - tpr) - fpr))
    out.update(frame_auc=float(roc_auc_score(labels, probs)), video_auc=float(roc_auc_score(video_labels, video_probs)),
               video_auc_interval=auc_interval(video_probs, video_labels),
               eer=float((fpr[i] + 1 - tpr[i]) / 2), ap=float(average_precision_score(labels, probs)))
    return out


# ----------------------------------------------------------------------------- routers

def forged_patches(changed, config):
    """(V, g·g) bool from where a forgery changed a frame, changed (S, S) bool: the patches of each
    view (the original image, then the four split images) of which at least FORGED_SHARE of the
    pixels changed. A patch of the original image covers S/g frame pixels a side, of a split image
    S/2g."""
    g = config.view_size // config.patch_size

    def shares(region):  # (s, s) -> (g·g,) share of each patch's pixels that changed
        k = region.shape[0] // g
        return region.reshape(g, k, g, k).mean((1, 3)).ravel()

    S = changed.shape[0]
    views = [changed] + ([changed[r:r + S // 2, c:c + S // 2] for r in (0, S // 2) for c in (0, S // 2)]
                         if config.multi_scale else [])
    return np.stack([shares(v) for v in views]) >= FORGED_SHARE


def kept_counts(kept, forged):
    """Per routed layer and view, the patches Token Selection kept among the forged ones and among
    the others: kept (R, V, n̂) token indices (-1 where the view had exited), forged (V, g·g) ->
    (R, V, 4) [forged kept, forged, other kept, other], zero where the view had exited."""
    R, V, _ = kept.shape
    counts = np.zeros((R, V, 4))
    for r in range(R):
        for v in range(V):
            idx = kept[r, v]
            if (idx < 0).all():
                continue
            keep = np.zeros(forged.shape[1], dtype=bool)
            keep[idx[idx >= 1] - 1] = True  # token t >= 1 is patch t - 1; CLS is not a patch
            counts[r, v] = [(keep & forged[v]).sum(), forged[v].sum(), (keep & ~forged[v]).sum(), (~forged[v]).sum()]
    return counts


def share(part, whole, digits):
    """part / whole elementwise as a list, None where whole is 0 (a routed layer no view ran)."""
    return [round(float(p) / w, digits) if w else None for p, w in zip(part, whole)]


def token_recall(counts, cfg):
    """Token Selection against the forged region, from the fake frames' kept_counts (F, R, V, 4):
    per routed layer, for the original and the split images, the share of forged patches kept,
    of other patches kept, and their ratio (1: blind to the forgery; chance keeps n̂/N of each);
    None for a layer no view with such patches ran (every one exited before it)."""
    chance = num_kept(cfg.num_tokens, cfg.keep_ratio) / cfg.num_tokens
    out = dict(layers=list(cfg.routed_layers), chance=round(chance, 4))
    views = {"original": slice(0, 1), "split": slice(1, None)}
    for name, view in views.items():
        c = counts[:, :, view].sum((0, 2))  # (R, 4)
        if not c[:, 1].any():
            continue
        forged, other = share(c[:, 0], c[:, 1], 4), share(c[:, 2], c[:, 3], 4)
        out[name] = dict(forged_kept=forged, other_kept=other, forged_patches=int(c[0, 1]),
                         ratio=[None if f is None or not o else round(f / o, 3) for f, o in zip(forged, other)])
    return out


def gate_difference(gates, labels, videos, seed=0):
    """Which expert tells real from fake (supp. Tab. D): per expert, the fake minus the real mean gate
    weight (gates (F, E), one row a frame) and its LEVEL interval over a bootstrap of videos (real and
    fake apart); `separating_expert` (1-based, as the supplementary counts) is the largest
    difference whose interval leaves out 0, or None."""
    per_video = {}
    for g, y, v in zip(gates, labels, videos):
        per_video.setdefault(v, [[], y])[0].append(g)
    means = {y: np.array([np.nanmean(gs, 0) for gs, yy in per_video.values() if yy == y]) for y in (0, 1)}
    if any(len(m) == 0 or np.isnan(m).all() for m in means.values()):
        return None
    rng = np.random.default_rng(seed)
    diff = (np.nanmean(means[1][bootstrap_rows(len(means[1]), rng)], 1)
            - np.nanmean(means[0][bootstrap_rows(len(means[0]), rng)], 1))  # (RESAMPLES, E)
    low, high = percentile_interval(diff)
    point = np.nanmean(means[1], 0) - np.nanmean(means[0], 0)
    apart = [e for e in range(len(point)) if low[e] > 0 or high[e] < 0]
    best = max(apart, key=lambda e: abs(point[e])) + 1 if apart else None
    return dict(fake_minus_real=point.round(5).tolist(), separating_expert=best,
                interval=[np.round(low, 5).tolist(), np.round(high, 5).tolist()])


# ----------------------------------------------------------------------------- a test set

@torch.no_grad()
def predict_rows(model, dataset, *, batch, autocast, workers):
    """The model's outputs on every frame of a data set, as lists (one entry per frame); where the
    data set knows what each forgery changed (`changed`), the kept_counts of each fake frame."""
    model.eval()
    cfg = model.config
    rows = dict(prob=[], label=[], video=[], method=[], exit=[], gates=[], gates_all=[], flops=[], kept=[],
                skipped=[])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=data.collate,
                                         generator=torch.Generator())  # leaves the global RNG alone
    dev = next(model.parameters()).device
    changed = getattr(dataset, "changed", None)
    for b in loader:
        rows["skipped"] += b["skipped"]
        if "image" not in b:
            continue
        with autocast():
            prob, out = model.predict(b["image"].to(dev))
        first = len(rows["prob"])  # the data set's index of this batch's first frame (none skipped)
        rows["prob"] += prob.float().cpu().tolist()
        rows["label"] += b["label"].tolist()
        rows["video"] += b["video"]
        rows["method"] += b["method"]
        rows["exit"] += out.exit_layer[:, 0].cpu().tolist()
        gates = out.gates[:, 0].float().cpu()  # (B, L, 2, E) of the original image
        rows["gates"] += list(gates[:, cfg.first_routed_layer].nanmean(1).numpy())  # (E,) each, Tab. D's layer
        rows["gates_all"] += list(gates.nanmean((1, 2)).numpy())  # (E,) each, over the layers each image ran
        rows["flops"] += out.flops.cpu().tolist()
        kept = torch.stack(out.kept, 1).cpu().numpy() if out.kept else None  # (B, R, V, n̂)
        for j, y in enumerate(b["label"].tolist()):
            measurable = kept is not None and y == 1 and changed is not None and not rows["skipped"]
            rows["kept"].append(kept_counts(kept[j], forged_patches(changed(first + j), cfg)) if measurable else None)
    return rows


def summarise(rows, cfg, dense_flops=None):
    """Metrics of one test set from its rows, and what the routers did: on the original image the
    exit layers of real and fake (supp. Fig. A) and the multiply-adds per image against
    `dense_flops` (every view running every layer); the expert gate weights at layer K+1 (supp.
    Tab. D) and over all layers, with gate_difference; Token Selection against the forged region."""
    if not rows["prob"]:
        raise SystemExit(f"no readable frame in the test set ({len(rows['skipped'])} skipped, e.g. "
                         f"{rows['skipped'][:1]})")
    metrics = compute_metrics(rows["prob"], rows["label"], rows["video"])
    metrics["skipped"] = rows["skipped"]
    labels, methods, exits = np.array(rows["label"]), np.array(rows["method"]), np.array(rows["exit"])
    L, layers = cfg.layers, list(range(cfg.first_routed_layer, cfg.layers + 1))
    classes = {name: labels == y for name, y in (("real", 0), ("fake", 1)) if (labels == y).any()}
    metrics["exit_layers"] = {"layers": layers, **{name: [int(np.sum(exits[labels == y] == t)) for t in layers]
                                                   for name, y in (("real", 0), ("fake", 1))}}
    metrics["exits"] = dict(early_share={name: float(np.mean(exits[m] < L)) for name, m in classes.items()},
                            mean_exit_layer={name: float(np.mean(exits[m])) for name, m in classes.items()})
    if cfg.expert_routing:
        groups = {**classes, **{f"fake/{m}": methods == m for m in sorted(set(methods[labels == 1].tolist()))}}
        for key in ("gates", "gates_all"):
            g = np.stack(rows[key])
            name = "gate_weights" if key == "gates" else "gate_weights_all_layers"
            metrics[name] = {k: np.nanmean(g[mask], 0).round(4).tolist() for k, mask in groups.items()
                             if mask.any() and not np.isnan(g[mask]).all()}
        metrics["gate_layer"] = cfg.first_routed_layer + 1  # 1-based, as the supplementary counts
        metrics["gate_difference"] = gate_difference(np.stack(rows["gates"]).astype(np.float64), labels, rows["video"])
    metrics["gmac_per_image"] = float(np.mean(rows["flops"])) / 1e9  # multiply-adds, the paper's "FLOPs"
    if dense_flops:
        metrics["gmac_dense"] = dense_flops / 1e9
        metrics["gmac_saved"] = 1 - metrics["gmac_per_image"] / metrics["gmac_dense"]
    counts = [c for c in rows["kept"] if c is not None]
    if counts:
        metrics["token_recall"] = token_recall(np.stack(counts), cfg)
    metrics["scores"] = dict(prob=rows["prob"], label=rows["label"], method=rows["method"])
    return metrics


def evaluate(model, dataset, **kw):
    """Metrics of one test set (summarise)."""
    return summarise(predict_rows(model, dataset, **kw), model.config, dense_flops(model))


def dense_flops(model):
    """Multiply-adds per image with every view running every layer, or None for a model that does
    not count its own (dfdhr.DFDHR.dense_flops)."""
    return model.dense_flops() if hasattr(model, "dense_flops") else None


# ----------------------------------------------------------------------------- several test sets

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
                                  model.config, dense_flops(model))
        else:
            out[name] = evaluate(model, ds, **kw)
    return out


def interval(m):
    """'0.923 [0.889, 0.952]', or 'n/a'."""
    if m["video_auc"] is None:
        return "n/a"
    low, high = m["video_auc_interval"]
    return f"{m['video_auc']:.3f} [{low:.3f}, {high:.3f}]"


def print_table(metrics):
    """The test sets' metrics, the video AUC with its interval, and a line per test set on the routers."""
    keys = ("frame_auc", "eer", "ap", "acc", "gmac_per_image")
    print(f"{'test set':<16}{f'video AUC [{LEVEL:.0%} interval]':>26}" + "".join(f"{k:>16}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:<16}{interval(m):>26}" + "".join(f"{'n/a' if m[k] is None else format(m[k], '.4f'):>16}"
                                                        for k in keys))
        if "note" in m:
            print(f"  {name}: {m['note']}")
        if m["skipped"]:
            print(f"  {name}: skipped {len(m['skipped'])} unreadable frames, e.g. {m['skipped'][0]}")
    for name, m in metrics.items():
        print(f"  routers on {name}: {routers_line(m)}")


def routers_line(m):
    """What the routers did on a test set, in a line."""
    ex = m["exits"]
    parts = ["exited early (original image): " + ", ".join(f"{k} {v:.0%}" for k, v in ex["early_share"].items())
             + "; mean exit layer " + ", ".join(f"{k} {v:.2f}" for k, v in ex["mean_exit_layer"].items())]
    if "gmac_saved" in m:
        parts.append(f"GMAC {m['gmac_per_image']:.3f}, {m['gmac_saved']:.1%} below dense")
    tr = m.get("token_recall", {})
    for view in ("original", "split"):
        if view in tr:
            parts.append(f"forged/other patches kept ({view}) "
                         + " ".join("-" if r is None else f"{r:.2f}" for r in tr[view]["ratio"]))
    gd = m.get("gate_difference")
    if gd:
        parts.append("expert separating real and fake: " + (f"#{gd['separating_expert']}" if gd["separating_expert"]
                                                            else "none outside its interval"))
    return "; ".join(parts)

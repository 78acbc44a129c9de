"""Evaluation of a trained DFD-HR model: the detection metrics of the paper's tables, and what the
routers did on each test set.

  metrics      frame AUC, video AUC (over per-video mean fake probability, the paper's headline),
               EER, AP, accuracy; `compute_metrics`
  a test set   the model's outputs on every frame (`predict_rows`), then its metrics and the
               routers' record on the original image (`summarise`): exit layers (supp. Fig. A),
               expert gate weights at layer K+1 (supp. Tab. D), multiply-adds per image
  several      `evaluate_sets` runs test sets that share their frames once; `print_table`

train.py evaluates at every epoch's end with these; figures.py draws from their output.
"""
import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import data
import synthetic


# ----------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------- a test set

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
        gates = out.gates[:, 0].float().cpu()  # (B, L, 2, E) of the original image
        rows["gates"] += list(gates[:, cfg.first_routed_layer].nanmean(1))  # (E,) each, supp. Tab. D's layer
        rows["gates_all"] += list(gates.nanmean((1, 2)))  # (E,) each, over the layers each image ran
        rows["flops"] += out.flops.cpu().tolist()
    return rows


def summarise(rows, cfg):
    """Metrics of one test set from its rows, and what the routers did on the original image: exit
    layers (supp. Fig. A), expert gate weights at layer K+1 as supp. Tab. D reports them (and over
    all layers), multiply-adds per image."""
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
    metrics["gmac_per_image"] = float(np.mean(rows["flops"])) / 1e9  # multiply-adds, the paper's "FLOPs"
    metrics["scores"] = dict(prob=rows["prob"], label=rows["label"], method=rows["method"])
    return metrics


def evaluate(model, dataset, **kw):
    """Metrics of one test set (summarise)."""
    return summarise(predict_rows(model, dataset, **kw), model.config)


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
                                  model.config)
        else:
            out[name] = evaluate(model, ds, **kw)
    return out


def print_table(metrics):
    keys = ("frame_auc", "video_auc", "eer", "ap", "acc", "gmac_per_image")
    print(f"{'test set':<16}" + "".join(f"{k:>17}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:<16}" + "".join(f"{'n/a' if m[k] is None else format(m[k], '.4f'):>17}" for k in keys))
        if "note" in m:
            print(f"  {name}: {m['note']}")
        if m["skipped"]:
            print(f"  {name}: skipped {len(m['skipped'])} unreadable frames, e.g. {m['skipped'][0]}")

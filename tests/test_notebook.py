"""figures.py against hand computations and the paper's own Tab. D; the walkthrough notebook runs headless."""
import contextlib
import json
import os
from pathlib import Path

import matplotlib.image
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image

import data
import figures
import synthetic
from dfdhr import DFDHR, force_exit, make_config
from evaluation import evaluate

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"

# supp. Tab. D, CDF-v2 and two of the forgery-method rows, as fractions; the ranks the paper prints beside them.
TAB_D = {"real": [0.2609, 0.2422, 0.2473, 0.2496], "fake": [0.2502, 0.2384, 0.2493, 0.2621],
         "fake/e4s": [0.2510, 0.2293, 0.2555, 0.2642], "fake/UniFace": [0.2534, 0.2328, 0.2531, 0.2607]}
TAB_D_RANKS = {"real": [1, 4, 3, 2], "fake": [2, 4, 3, 1], "fake/e4s": [3, 4, 2, 1], "fake/UniFace": [2, 4, 3, 1]}


def test_gate_table_reproduces_the_ranks_and_percentages_of_tab_d():
    lines = figures.gate_table({"gate_weights": TAB_D}).strip().splitlines()
    assert lines[0] == "| | Expert #1 | Expert #2 | Expert #3 | Expert #4 |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["real", "fake", "fake/UniFace", "fake/e4s"]  # real, fake, then methods by name
    for name, cells in rows.items():
        for cell, weight, rank in zip(cells, TAB_D[name], TAB_D_RANKS[name]):
            text = f"{100 * weight:.2f}"
            shown = f"**{text}**" if rank == 1 else f"<ins>{text}</ins>" if rank == 2 else text
            assert cell == f"{shown} ({rank})", (name, cell)
    assert rows["real"][0] == "**26.09** (1)" and rows["fake"][0] == "<ins>25.02</ins> (2)"  # as printed in Tab. D


def test_gate_table_without_experts_says_so():
    assert "off" in figures.gate_table({"exit_layers": {}})


def test_kept_mask_maps_tokens_to_patches_row_major():
    mask, cls = figures.kept_mask([0, 1, 4, 9], grid=3)  # CLS, patch (0, 0), patch (1, 0), patch (2, 2)
    assert cls and mask.tolist() == [[True, False, False], [True, False, False], [False, False, True]]
    mask, cls = figures.kept_mask([-1, -1], grid=3)  # the sample had exited
    assert not cls and not mask.any()


def test_to_display_undoes_clip_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    shown = figures.to_display(data.to_input(Image.fromarray(pixels), 16))
    np.testing.assert_allclose(shown, pixels / 255, atol=1e-5)


def test_roc_and_exit_layers_on_a_hand_made_one_class_set():
    one_class = dict(frame_auc=None, scores=dict(prob=[0.9, 0.7], label=[1, 1]),
                     exit_layers=dict(layers=[4, 5, 6], real=[0, 0, 0], fake=[0, 0, 2]))
    two_class = dict(frame_auc=0.75, scores=dict(prob=[0.1, 0.6, 0.4, 0.8], label=[0, 0, 1, 1]),
                     exit_layers=dict(layers=[4, 5, 6], real=[1, 1, 0], fake=[0, 1, 1]))
    legend = [t.get_text() for t in figures.roc({"a": two_class, "b": one_class}).axes[0].get_legend().get_texts()]
    assert "a (AUC 0.750, 4 frames)" in legend  # 3 of the 4 real-fake pairs ordered right
    assert "b: only fake images, no ROC" in legend
    assert "no image exited early" in figures.exit_layers(one_class, "b").axes[0].get_title()
    assert "no image exited" not in figures.exit_layers(two_class, "a").axes[0].get_title()


def test_token_overlays_show_exited_layers():
    torch.manual_seed(0)
    cfg = make_config("small")
    model = force_exit(DFDHR(cfg), cfg.first_routed_layer)  # every sample's pass ends at the first routed layer
    ds = synthetic.SyntheticForgeries(methods=["faceswap"], num_videos=2, frames_per_video=1,
                                      image_size=cfg.image_size, seed=0)
    axes = figures.token_overlays(figures.overlay_data(model, ds, n=2), ds).axes
    assert len(axes) == 2 * (1 + cfg.layers - cfg.first_routed_layer)
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("real") and titles[5].startswith("fake (faceswap)")
    assert all(f"exit at layer {cfg.first_routed_layer}" in t for t in (titles[0], titles[5]))
    assert [t for t in titles if "exited" in t] == [f"layer {i}: exited" for i in range(4, 8)] * 2


@pytest.mark.parametrize("routing", ["full", "no routing"])
def test_write_run_figures_from_evaluate(tmp_path, routing):
    """A run's figures from evaluation.evaluate's own metrics, with a one-class test set; without routing
    there are no gate weights, every image runs all layers and every token is kept."""
    torch.manual_seed(0)
    off = dict(layer_pruning=False, token_selection=False, expert_routing=False) if routing == "no routing" else {}
    model = DFDHR(make_config("small", **off))
    common = dict(num_videos=4, frames_per_video=1, image_size=model.config.image_size)
    sets = {"mixed": synthetic.SyntheticForgeries(methods=["faceswap", "selfblend"], seed=1, **common),
            "only fake": synthetic.SyntheticForgeries(methods=["upsample"], seed=2, real_fraction=0, **common)}
    metrics = {name: evaluate(model, ds, batch=4, autocast=contextlib.nullcontext, workers=0)
               for name, ds in sets.items()}
    history = {"steps": [dict(step=1, loss=0.8, ce=0.7, rank=1.0), dict(step=2, loss=0.7, ce=0.6, rank=0.9)],
               "evals": [dict(step=2, epoch=1, video_auc={"mixed": 0.6, "only fake": None})]}
    paths = figures.write_run_figures(tmp_path, metrics, history, model, sets)
    names = ["exit_layers_mixed.png", "exit_layers_only_fake.png", "roc.png", "training_curves.png",
             "token_overlays.png", "gate_weights.md", "overlays.json"]
    if routing == "full":  # Token Selection's record against the forged regions the synthetic frames know
        names += ["gate_weights_mixed.png", "gate_weights_only_fake.png", "token_recall.png"]
    assert sorted(p.name for p in paths) == sorted(names)
    assert all(p.parent == tmp_path / "figures" and p.stat().st_size > 0 for p in paths)
    for p in paths:
        if p.suffix == ".png":
            h, w, _ = matplotlib.image.imread(p).shape
            assert 200 < h < 1500 and 300 < w < 1500, (p.name, h, w)
    table = (tmp_path / "figures" / "gate_weights.md").read_text()
    assert ("Expert #4" in table) == (routing == "full") and ("off" in table) == (routing == "no routing")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom():
    """Every cell of notebooks/walkthrough.ipynb runs without an error, started where Jupyter starts it.

    One intra-op thread: on a loaded machine with few cores, torch's spinning threads made the
    notebook's training cell up to 5x slower (measured 8 s with one thread, 40 s with two).
    """
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # raises on a cell error
    stored = json.loads((NOTEBOOK.parents[1] / "results" / "default" / "metrics.json").read_text())
    aucs = [f"| {name} | {'yes' if name == 'selfblend' else 'no'} | {m['video_auc']:.3f} |" for name, m in stored.items()]

    def text(notebook):  # every text output of every code cell
        return "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                       for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    # The stored run's section shows the stored run, both when run now and as committed.
    assert all(a in text(nb) for a in aucs), aucs
    assert all(a in text(nbformat.read(NOTEBOOK, as_version=4)) for a in aucs), "re-run and commit the notebook"

"""train.py: options, the data's order, a short run that learns, the step compiled, exact resume, DDP."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import finetune
import predict
import synthetic
import train
from benchmarks import compare_methods
from dfdhr import DFDHRConfig


def test_overrides_are_typed_and_checked():
    assert cli.parse(["--lr=0.5", "--augment=false", "--keep_ratio=0.5", "--out_dir=x", "--post_weight=false",
                      "--cls_eligible"], train.Settings, DFDHRConfig) == \
        [dict(lr=0.5, augment="false", out_dir="x"), dict(keep_ratio=0.5, post_weight=False, cls_eligible=True)]
    with pytest.raises(SystemExit, match="unknown option '--lrate=1'"):
        cli.parse(["--lrate=1"], train.Settings)
    with pytest.raises(SystemExit, match="--epochs=two: expected int"):
        cli.parse(["--epochs=two"], train.Settings)
    with pytest.raises(SystemExit, match="--lr needs a value"):
        cli.parse(["--lr"], train.Settings)
    with pytest.raises(SystemExit, match="keep_ratio=0.0 must be in"):
        train.main(["--keep_ratio=0"])
    with pytest.raises(SystemExit, match="first_routed_layer=9"):
        train.main(["--first_routed_layer=9"])
    with pytest.raises(SystemExit, match="--exit_cost_from=0.5 starts --exit_cost, which is 0"):
        train.main(["--exit_cost_from=0.5"])


def test_paper_preset_takes_the_released_recipe_unless_overridden():
    cfg, config = train.settings({"preset": "paper"}, {})
    assert (cfg.lr, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.dtype, cfg.frame_sampling,
            cfg.frames_per_video, cfg.init_from) == (1e-4, 64, 16, 20, "fp32", "first", 8, "ViT-L-14.pt")
    assert config.width == 1024 and config.freeze_backbone
    cfg, _ = train.settings({"preset": "paper", "lr": 3e-4, "dtype": "bf16"}, {})
    assert (cfg.lr, cfg.dtype, cfg.batch_size) == (3e-4, "bf16", 64)


def test_default_protocol_scores_each_family_against_the_same_reals(tmp_path, tiny_run):
    """The SBI protocol of the default run: trained on pairs, one test set per family."""
    args = [a for a in tiny_run if not a.startswith("--synthetic_protocol")]
    train.main(args + ["--max_iters=2", "--synthetic_test_videos=3", "--test_frames_per_video=1",
                       f"--out_dir={tmp_path}"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["selfblend", "faceswap", "partial", "upsample"]
    for family, m in metrics.items():
        assert m["videos"] == 6 and m["frames"] == 6
        assert set(m["scores"]["method"]) == {"real", family}
        reals = [p for p, y in zip(m["scores"]["prob"], m["scores"]["label"]) if y == 0]
        assert reals == [p for p, y in zip(metrics["selfblend"]["scores"]["prob"],
                                           metrics["selfblend"]["scores"]["label"]) if y == 0]


def test_pairs_stay_in_one_batch_and_in_one_process(tmp_path):
    """A data set with group_size 2 (a frame and its self-blend) is shuffled in pairs, and each
    DDP process gets whole pairs; the concatenated shares are the whole batch."""
    pairs = synthetic.SelfBlendPairs(num_videos=6, frames_per_video=2, image_size=32, seed=0)
    cfg = train.Settings(batch_size=8, num_workers=0, seed=3)
    one = [b for _, b in itertools.islice(train.batches(pairs, cfg, step=0, ddp_rank=0, world=1), 3)]
    two = [[b for _, b in itertools.islice(train.batches(pairs, cfg, step=0, ddp_rank=r, world=2), 3)]
           for r in (0, 1)]
    for k, b in enumerate(one):
        sources = [int(s.rsplit("/", 1)[1]) for s in b["source"]]
        assert all(sources[i] // 2 == sources[i + 1] // 2 and sources[i] % 2 == 0 for i in range(0, 8, 2))
        assert two[0][k]["source"] + two[1][k]["source"] == b["source"]
    seen = [s for b in one for s in b["source"]]
    assert len(set(seen)) == 24  # one epoch of 3 batches: every sample once


@pytest.mark.slow
def test_short_run_learns(tmp_path, tiny_run):
    """Smoke test with a real assertion: the loss falls and unseen videos are ranked above chance.

    The up-sampling checkerboard is the cue a tiny backbone from scratch learns within seconds.
    """
    args = tiny_run + ["--synthetic_train_videos=96", "--synthetic_test_videos=32", "--frames_per_video=4",
                   "--epochs=4", "--batch_size=16", "--eval_batch_size=64", "--synthetic_train_methods=upsample",
                   "--synthetic_test_methods=upsample", "--freeze_backbone=false", f"--out_dir={tmp_path}"]
    train.main(args)
    history = json.loads((tmp_path / "history.json").read_text())
    steps = history["steps"]
    first, last = np.mean([h["ce"] for h in steps[:6]]), np.mean([h["ce"] for h in steps[-6:]])
    assert last < first
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # the test sets, on best.pt
    assert metrics["in_domain"]["video_auc"] > 0.65  # 32 new videos; chance is 0.5 ± 0.1


@pytest.mark.slow
def test_compiled_training_steps_as_eager_training_does(tmp_path, tiny_run):
    """--compile: the same losses step by step as eager mode (the same Gumbel draws; steps 2 and 3
    see the weights the compiled backward and Adam made)."""
    runs, graphs = {}, {}
    for mode in ("eager", "compiled"):
        torch._dynamo.utils.counters.clear()
        train.main(tiny_run + ["--max_iters=3", f"--compile={mode == 'compiled'}", f"--out_dir={tmp_path / mode}"])
        graphs[mode] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs[mode] = [h["loss"] for h in json.loads((tmp_path / mode / "history.json").read_text())["steps"]]
    assert graphs["eager"] == 0 and graphs["compiled"] > 0  # the compiled run did run compiled graphs
    assert len(runs["eager"]) == 3 and runs["compiled"] == pytest.approx(runs["eager"], abs=1e-5)


@pytest.mark.slow
def test_predict_scores_a_folder_as_evaluation_does(tmp_path, capsys, tiny_run):
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={tmp_path / 'run'}"])
    machine = json.loads((tmp_path / "run" / "config.json").read_text())["machine"]  # where the run computed
    assert capsys.readouterr().out.splitlines()[0] == "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items())
    assert machine["precision"] == "fp32" and machine["torch"] == torch.__version__
    (tmp_path / "faces").mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (70, 70, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "faces" / f"{i}.png")
    capsys.readouterr()
    results = predict.main([f"--input={tmp_path / 'faces'}", f"--out_dir={tmp_path / 'run'}"])  # the run's fp32
    lines = [line for line in capsys.readouterr().out.splitlines() if "fake probability" in line]
    assert len(lines) == 2 and all("exit layer per view [" in line for line in lines)
    compiled = predict.main([f"--input={tmp_path / 'faces'}", f"--out_dir={tmp_path / 'run'}", "--compile",
                             f"--output={tmp_path / 'compiled'}"])
    model, _ = predict.load_model(tmp_path / "run" / "best.pt")
    for i in range(2):  # the same score as the model on the same preprocessing, eager and compiled
        path = tmp_path / "faces" / f"{i}.png"
        x = data.to_input(data.load_image(path), model.config.image_size)[None]
        assert results[str(path)]["score"] == pytest.approx(model.predict(x)[0].item(), abs=1e-6)
        assert compiled[str(path)]["score"] == pytest.approx(model.predict(x)[0].item(), abs=1e-5)
    rows = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "input,frame,fake_probability,exit_layer_per_view" and len(rows) == 3


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_run):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train.main(tiny_run + ["--epochs=2", f"--out_dir={straight}"])  # 2 epochs of 4 steps
    train.main(tiny_run + ["--epochs=2", "--max_iters=3", f"--out_dir={halves}"])  # stops inside epoch 0
    train.main(["--init_from=resume", "--max_iters=0", f"--out_dir={halves}"])
    a, b = weights(straight / "last.pt"), weights(halves / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "metrics.json").read_text())["in_domain"]["frame_auc"] == \
        json.loads((halves / "metrics.json").read_text())["in_domain"]["frame_auc"]


def test_resume_refuses_a_different_model(tmp_path, tiny_run):
    train.main(tiny_run + ["--max_iters=1", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"last\.pt was trained with a different config: keep_ratio: checkpoint 0.75 vs now 0.5"):
        train.main(["--init_from=resume", "--keep_ratio=0.5", f"--out_dir={tmp_path}"])


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, tiny_run):
    """DistributedDataParallel on CPU: 2 processes with half batches each = 1 process with the whole batch.

    Run on the deterministic `fusion_only` ablation: the routers' Gumbel and gate noise is drawn
    per process, so with it the two runs would differ in their noise, not in their arithmetic.
    """
    args = tiny_run + ["--ablation=fusion_only", "--max_iters=4", "--augment=false"]
    train.main(args + [f"--out_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "train.py", *args, f"--out_dir={tmp_path / 'two'}"], check=True, env=env,
                   cwd=Path(train.__file__).parent, capture_output=True, timeout=300)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for name in one:
        assert np.allclose(one[name]["scores"]["prob"], two[name]["scores"]["prob"], atol=1e-5)
        assert one[name]["frame_auc"] == pytest.approx(two[name]["frame_auc"], abs=1e-6)


def test_ablation_table_states_each_rows_regime_and_parameters(tmp_path, capsys, tiny_run):
    table = compare_methods.main(tiny_run + ["--ablations=baseline,+expert_routing", "--max_iters=1",
                                         f"--out_dir={tmp_path}"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| baseline") or line.startswith("| +expert")}
    cfg = {name: json.loads((tmp_path / name / "config.json").read_text())["model"] for name in rows}
    assert rows["baseline"][1] == "fine-tuned" and rows["+expert_routing"][1] == "frozen"
    for name, row in rows.items():  # the parameters that train, counted from the run's own model
        model, _ = predict.load_model(tmp_path / name / "last.pt")
        assert int(row[2].replace(",", "")) == finetune.count_trainable(model)
        assert cfg[name]["freeze_backbone"] == (name == "+expert_routing")


def test_seeds_table_gives_mean_and_sd_of_the_runs_own_metrics(tmp_path, tiny_run):
    """--seeds: one run per seed in its own folder, each with its --seed; a cell is the mean ± sample
    standard deviation of the runs' own video AUCs, read back from their metrics.json."""
    table = compare_methods.main(tiny_run + ["--ablations=full", "--seeds=3,4", "--max_iters=2", "--routers",
                                             f"--out_dir={tmp_path}"])
    runs = {seed: tmp_path / "full" / f"seed{seed}" for seed in (3, 4)}
    assert [json.loads((run / "config.json").read_text())["seed"] for run in runs.values()] == [3, 4]
    aucs = [json.loads((run / "metrics.json").read_text())["in_domain"]["video_auc"] for run in runs.values()]
    row = next(line for line in table.splitlines() if line.startswith("| full"))
    assert f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in row


def test_cosine_schedule_is_torchs_linear_warm_up_then_cosine_annealing():
    """train.schedule against torch's own schedulers chained: LinearLR over the warm-up steps, then
    CosineAnnealingLR to 0 at the last step."""
    total, lr = 200, 2e-3
    warm = round(train.WARMUP * total)
    cfg = train.Settings(lr_schedule="cosine")
    ours = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    ours.param_groups[0]["initial_lr"] = lr
    ref_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / warm, total_iters=warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warm)], milestones=[warm])
    for step in range(total):
        train.schedule(ours, cfg, step=step, total=total)
        assert ours.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        ref_opt.step()
        ref.step()
    train.schedule(ours, train.Settings(lr_schedule="constant"), step=57, total=total)
    assert ours.param_groups[0]["lr"] == lr


def test_exit_cost_starts_at_its_share_of_the_steps(tmp_path, tiny_run):
    """--exit_cost_from=0.5: no term on computation in the first of two epochs, the term in the second."""
    train.main(tiny_run + ["--epochs=2", "--exit_cost=1", "--exit_cost_from=0.5", "--synthetic_test_videos=2",
                           "--test_frames_per_video=1", f"--out_dir={tmp_path}"])
    steps = json.loads((tmp_path / "history.json").read_text())["steps"]  # "step" counts from 1
    first_epoch = len(steps) // 2
    assert len(steps) >= 4 and all(h["extra"] == 0 for h in steps[:first_epoch])
    assert all(h["extra"] > 0 for h in steps[first_epoch:])

"""Benchmarks of the backbone and the routed model on CPU; results in benchmarks/BENCHMARKS.md.

Every figure is a ratio against a reference measured in the same run, so it survives a change
of machine; absolute times are printed with the machine they were taken on.

  1. Backbone vs Hugging Face: vit.VisionTransformer, eager and compiled (speed.py), against
     transformers' CLIPVisionModelWithProjection holding the same random weights (saved by
     save_pretrained, read back by vit.load_clip), fp32 and bf16 autocast: time ratios and max
     |difference|. `--malloc=default` runs the process under glibc's malloc defaults instead of
     keeping freed memory (speed.keep_freed_memory, as train.py and predict.py run).
  2. Against the hardware: GFLOP/s of the ViT-L/14 forward (2 × estimate_flops of a plain ViT)
     against a large square matmul; a torch.profiler breakdown says where the rest goes.
  3. Routing pays: the DFD-HR forward (eval) with every routed layer run, with every sample
     exiting at the first routed layer K (the paper's T = 20), without token selection, and
     without any router (fusion_only): the wall-time saving against what estimate_flops predicts.
  3b. (--only=exits) Layer exit under the profiler, per operator, T = K beside T = L.
  3c. The DFD-HR eval forward compiled (predict.py --compile) against eager.
  4. Training: train.train_step's time (forward + backward + Adam) and peak resident memory,
     each configuration in a fresh process.
  5. Multiply-adds per image: estimate_flops (the supplementary's formula plus the experts)
     against torch's FlopCounterMode on the model's own forward, for each exit layer.
  6. Attention: torch's fused CPU kernel against the explicit matmuls vit.Attention uses on the
     CPU in bf16, at the small preset's training and evaluation shapes and ViT-L/14's.
  8. The default run's step (python train.py): data, forward, backward and optimizer time of
     train.train_step, and one step's profile; with --step_compiled, the step compiled
     (train.py --compile) against eager. (Section 7 of BENCHMARKS.md is bench_release.py.)

Run from the repository root:

    python -m benchmarks.bench            # the full run (each section's time is in BENCHMARKS.md)
    python -m benchmarks.bench --quick    # tiny shapes; tests/test_bench.py runs this
"""
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import transformers

import cli
import finetune
import speed
import synthetic
import train
import vit
from benchmarks.measure import breakdown, category, matmul_share, peak_rss_mib, precision, table, timed
from dfdhr import DFDHR, estimate_flops, force_exit, make_config

# Backbone shapes: ViT-B/16 and ViT-L/14 at 224 (CLIP); TINY for --quick.
BACKBONES = {
    "ViT-B/16": dict(width=768, layers=12, heads=12, patch=16, image=224, proj=512),
    "ViT-L/14": dict(width=1024, layers=24, heads=16, patch=14, image=224, proj=768),
}
TINY = {"tiny": dict(width=64, layers=2, heads=2, patch=8, image=32, proj=48)}


def hardware():
    """The CPU's model name, its cores and threads, and the library versions the figures were taken with."""
    model = platform.processor() or "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=model, cores=len(os.sched_getaffinity(0)), threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__)


# ----------------------------------------------------------------------------- 1. backbone vs HF

def backbone_repeats(shape, batch):
    """Timed calls per cell: fewer for the big ones (ViT-L/14 at batch 8 is 1.3 TFLOP a call)."""
    return 3 if shape["layers"] * batch > 96 else 5 if shape["layers"] > 12 else 7


def hf_and_ours(shape):
    """A Hugging Face CLIP vision tower with random weights, and ours loaded from its saved folder."""
    config = transformers.CLIPVisionConfig(
        hidden_size=shape["width"], intermediate_size=4 * shape["width"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], patch_size=shape["patch"], image_size=shape["image"],
        projection_dim=shape["proj"], hidden_act="quick_gelu")
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # random norms and biases, so every weight matters
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(std=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = vit.load_clip(tmp).eval()
    return hf, ours


def bench_backbones(shapes, *, batches, repeats, profiled):
    """Rows of the comparison, and the profiles of ours at the `profiled` (model, batch): Hugging
    Face, ours eager and ours compiled (speed.compile_for_inference) timed in turn."""
    rows, profiles = [], {}
    for name, shape in shapes.items():
        hf, ours = hf_and_ours(shape)
        for prec in ("fp32", "bf16"):
            compiled = speed.compile_for_inference(ours)  # one per precision: autocast is traced in
            for batch in batches:
                x = torch.randn(batch, 3, shape["image"], shape["image"], generator=torch.Generator().manual_seed(1))
                with torch.no_grad(), precision(prec):
                    reference = hf(pixel_values=x).image_embeds.float()
                    diff = (reference - ours(x).float()).abs().max().item()
                    start = time.perf_counter()
                    diff_compiled = (reference - compiled(x).float()).abs().max().item()
                    compile_s = time.perf_counter() - start
                    t_hf, t_ours, t_compiled = timed([lambda: hf(pixel_values=x), lambda: ours(x), lambda: compiled(x)],
                                                     repeats=repeats(shape, batch))
                    hf_matmuls = matmul_share(lambda: hf(pixel_values=x))
                rows.append(dict(model=name, batch=batch, precision=prec, hf_s=t_hf, ours_s=t_ours,
                                 ours_compiled_s=t_compiled, hf_over_ours=t_hf / t_ours,
                                 hf_over_ours_compiled=t_hf / t_compiled, hf_matmul_share=hf_matmuls,
                                 hf_over_its_matmuls=1 / hf_matmuls, max_abs_diff=diff,
                                 max_abs_diff_compiled=diff_compiled, compile_s=compile_s,
                                 attn=hf.config._attn_implementation))
                if (name, batch) == profiled:
                    profiles[prec] = profile(ours, x, prec, shape)
                    profiles[f"{prec} compiled"] = profile(compiled, x, prec, shape)
            torch._dynamo.reset()
    return rows, profiles


# ----------------------------------------------------------------------------- 2. hardware

def plain_vit_config(shape):
    """The DFD-HR config of a plain ViT of this shape: no token selection, no experts, T = L."""
    return replace(make_config("paper"), view_size=shape["image"], patch_size=shape["patch"], width=shape["width"],
                   layers=shape["layers"], heads=shape["heads"], embed_dim=shape["proj"],
                   image_size=2 * shape["image"], first_routed_layer=0, token_selection=False, expert_routing=False)


def matmul_peak(n, prec, repeats):
    """GFLOP/s of the fastest of `repeats` n×n @ n×n matmuls: the peak is what the machine can reach."""
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    (t,) = timed([lambda: a @ b], repeats=repeats, stat=min)
    return 2 * n ** 3 / t / 1e9


def bench_hardware(backbone_rows, shapes, *, matmul_n, repeats):
    """GFLOP/s of our forward (timed in section 1) against the matmul peak, per precision."""
    peaks = {prec: matmul_peak(matmul_n, prec, repeats) for prec in ("fp32", "bf16")}
    rows = []
    for r in backbone_rows:
        flops = 2 * estimate_flops(plain_vit_config(shapes[r["model"]])) * r["batch"]  # multiply-adds -> FLOPs
        peak = peaks[r["precision"]]
        rows.append(dict(model=r["model"], batch=r["batch"], precision=r["precision"], gflop=flops / 1e9,
                         gflop_s=flops / r["ours_s"] / 1e9, matmul_peak_gflop_s=peak,
                         fraction_of_peak=flops / r["ours_s"] / 1e9 / peak,
                         compiled_fraction_of_peak=flops / r["ours_compiled_s"] / 1e9 / peak))
    return rows, peaks


def profile(model, x, prec, shape, top=10):
    """Self CPU time by operator and by kind for one forward (after one warm-up), largest first.

    Also the rate of the matmuls alone: the ViT's 4nd² + 2ndm multiply-adds per token and layer
    over the time spent in addmm/mm, which says whether the gap to the matmul peak is in the
    matmuls themselves or around them; and the attention's rate: its 2n²d multiply-adds over the
    fused kernel's time, or the explicit path's bmm and softmax (compiled: the softmax is fused
    with other ops and not counted).
    """
    with torch.no_grad(), precision(prec):
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events, ops, kinds, total = breakdown(prof, top)
    n, d, L = (shape["image"] // shape["patch"]) ** 2 + 1, shape["width"], shape["layers"]
    gemm_flops = 2 * L * len(x) * (4 * n * d * d + 2 * n * d * 4 * d)
    gemm_ms = sum(e.self_cpu_time_total for e in events if category(e.key).startswith("matmul")) / 1e3
    attn_flops = 2 * L * len(x) * 2 * n * n * d
    attn_ms = sum(e.self_cpu_time_total for e in events if category(e.key).startswith("attention")) / 1e3
    return dict(ops=ops, kinds=kinds, total_ms=total / 1e3, gemm_gflop_s=gemm_flops / gemm_ms / 1e6,
                attention_gflop_s=attn_flops / attn_ms / 1e6)


# ----------------------------------------------------------------------------- 3. routing pays

def exit_variants(preset, batch):
    """The model with no view exiting, the same backbone with every view exiting at K (its own
    routers), and an input batch."""
    torch.manual_seed(0)
    full = DFDHR(make_config(preset)).eval()
    exited = DFDHR(full.config, backbone=full.backbone).eval()
    size = full.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    return force_exit(full, full.config.layers), force_exit(exited, full.config.first_routed_layer), x


def bench_routing(preset, *, batch, repeats):
    """Predicted (estimate_flops) and realised (wall time) savings of layer exit and token selection."""
    full, exited, x = exit_variants(preset, batch)
    cfg = full.config
    L, K = cfg.layers, cfg.first_routed_layer
    no_tokens = force_exit(DFDHR(replace(cfg, token_selection=False), backbone=full.backbone).eval(), L)
    fusion_only = DFDHR(make_config(preset, "fusion_only"), backbone=full.backbone).eval()
    models = dict(all_layers=full, exit_at_K=exited, no_token_selection=no_tokens, fusion_only=fusion_only)
    with torch.no_grad():
        exits = {k: m(x).exit_layer.unique().tolist() for k, m in models.items()}
        times = dict(zip(models, timed([lambda m=m: m(x) for m in models.values()], repeats=repeats, warmup=0)))
    flops = dict(all_layers=estimate_flops(cfg, L), exit_at_K=estimate_flops(cfg, K),
                 no_token_selection=estimate_flops(replace(cfg, token_selection=False), L),
                 fusion_only=estimate_flops(replace(cfg, token_selection=False, expert_routing=False), L))
    rows = []
    for name, ref, what in (("exit_at_K", "all_layers", f"layer exit: T = {K} vs T = {L}"),
                            ("all_layers", "no_token_selection", "token selection on vs off (T = L)"),
                            ("fusion_only", "all_layers", "no routers (fusion_only) vs routers, T = L")):
        predicted = 1 - flops[name] / flops[ref]
        realised = 1 - times[name] / times[ref]
        rows.append(dict(comparison=what, predicted_saving=predicted, realised_saving=realised,
                         realised_over_predicted=realised / predicted, seconds=times[name], ref_seconds=times[ref]))
    return rows, dict(exits=exits, times=times, flops_per_view=flops, batch=batch, preset=preset)


def profile_exits(preset, *, batch, passes, top=12):
    """Layer exit side by side: every view exiting at K against none exiting, `passes` forwards of
    each in turn under torch.profiler; per operator the mean self time of both, so the saving can be
    followed to the operators that give it (and those that do not), and the profiler's FLOPs count."""
    full, exited, x = exit_variants(preset, batch)
    cfg = full.config
    self_ms = {"all_layers": {}, "exit_at_K": {}}
    flops = {k: {} for k in self_ms}  # the profiler's count per forward: unlike the times, the same on any machine
    walls = {k: [] for k in self_ms}
    with torch.no_grad():
        full(x), exited(x)
        for _ in range(passes):
            for name, model in (("all_layers", full), ("exit_at_K", exited)):
                start = time.perf_counter()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
                    model(x)
                walls[name].append(time.perf_counter() - start)
                for e in prof.key_averages():
                    self_ms[name][e.key] = self_ms[name].get(e.key, 0) + e.self_cpu_time_total / 1e3 / passes
                    flops[name][e.key] = e.flops
    a, b = self_ms["all_layers"], self_ms["exit_at_K"]
    total_a, total_b = sum(a.values()), sum(b.values())
    rows = [dict(op=op, all_layers_ms=a.get(op, 0), exit_at_K_ms=b.get(op, 0), saved_ms=a.get(op, 0) - b.get(op, 0),
                 share_of_saving=(a.get(op, 0) - b.get(op, 0)) / (total_a - total_b),
                 all_layers_flops=flops["all_layers"].get(op, 0), exit_at_K_flops=flops["exit_at_K"].get(op, 0))
            for op in sorted(set(a) | set(b), key=lambda op: -a.get(op, 0))[:top]]
    predicted = 1 - estimate_flops(cfg, cfg.first_routed_layer) / estimate_flops(cfg, cfg.layers)
    return rows, dict(passes=passes, batch=batch, predicted_saving=predicted, self_total_ms=[total_a, total_b],
                      realised_saving_self=1 - total_b / total_a,
                      wall_median_s=[statistics.median(walls["all_layers"]), statistics.median(walls["exit_at_K"])])


def bench_compiled_model(cases, repeats):
    """The DFD-HR eval forward, eager against speed.compile_for_inference (as `predict.py
    --compile`), no sample exiting: (preset, batch, precision) per case; compile time apart."""
    rows = []
    for preset, batch, prec in cases:
        torch.manual_seed(0)
        model = DFDHR(make_config(preset)).eval()
        force_exit(model, model.config.layers)
        compiled = speed.compile_for_inference(model)
        x = torch.randn(batch, 3, model.config.image_size, model.config.image_size)
        with torch.no_grad(), precision(prec):
            start = time.perf_counter()
            first = compiled(x).logits.float()
            compile_s = time.perf_counter() - start
            diff = (first - model(x).logits.float()).abs().max().item()
            t_eager, t_compiled = timed([lambda: model(x), lambda: compiled(x)], repeats=repeats)
        rows.append(dict(preset=preset, batch=batch, precision=prec, eager_s=t_eager, compiled_s=t_compiled,
                         eager_over_compiled=t_eager / t_compiled, compile_s=compile_s, max_abs_logit_diff=diff))
        torch._dynamo.reset()
    return rows


# ----------------------------------------------------------------------------- 4. training

def measure_training(preset, batch, steps):
    """Run in a fresh process: time and peak memory of train.train_step (forward, backward, Adam; fp32)."""
    torch.manual_seed(0)
    cfg = make_config(preset)
    model = DFDHR(cfg).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = dict(image=torch.randn(batch, 3, cfg.image_size, cfg.image_size), label=torch.randint(0, 2, (batch,)))
    rss_model = peak_rss_mib()
    (t,) = timed([lambda: train.train_step(model, inputs, opt, config=cfg, micro_batch=batch,
                                           autocast=contextlib.nullcontext, device=torch.device("cpu"))],
                 repeats=steps)
    rss_peak = peak_rss_mib()
    return dict(preset=preset, batch=batch, step_s=t, rss_model_mib=rss_model, rss_peak_mib=rss_peak,
                rss_step_mib=rss_peak - rss_model, trainable_params=finetune.count_trainable(model),
                frozen_backbone=cfg.freeze_backbone)


def bench_training(runs):
    rows = []
    for preset, batch, steps in runs:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench", f"--measure_training={preset},{batch},{steps}"],
                             capture_output=True, text=True)
        if out.returncode:
            rows.append(dict(preset=preset, batch=batch, error=out.stderr.strip().splitlines()[-1:]))
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ----------------------------------------------------------------------------- 5. multiply-adds

def count_flops(preset):
    """Multiply-adds of one image (every view) by estimate_flops and by torch's FlopCounterMode on
    the model's own forward, for each exit layer T."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = make_config(preset)
    views = 1 + 4 * cfg.multi_scale
    model, x = DFDHR(cfg).eval(), torch.randn(1, 3, cfg.image_size, cfg.image_size)
    rows = []
    for T in range(cfg.first_routed_layer, cfg.layers + 1):
        force_exit(model, T)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        formula, counted = views * estimate_flops(cfg, T), counter.get_total_flops() // 2
        rows.append(dict(exit_layer=T, formula_gmac=f"{formula / 1e9:.2f}", counted_gmac=f"{counted / 1e9:.2f}",
                         counted_over_formula=f"{counted / formula:.4f}"))
    return rows


# ----------------------------------------------------------------------------- 6. attention

def bench_attention(repeats=20, inference_batches=(1, 2, 8)):
    """torch's fused CPU attention kernel against vit.explicit_attention (softmax(QKᵀ/√d)V, softmax
    in fp32), the path vit.Attention takes on the CPU in bf16: in training (forward + backward) at the
    small preset's batch, in inference at its evaluation batch's split views and at ViT-L/14's
    (B, 16, 257, 64)."""
    fused, explicit = torch.nn.functional.scaled_dot_product_attention, vit.explicit_attention
    cases = [("training", (160, 2, 65, 64)), ("inference", (128, 2, 65, 64))] + \
        [("inference", (b, 16, 257, 64)) for b in inference_batches]
    rows = []
    for mode, shape in cases:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=mode == "training") for _ in range(3))

            def call(f):
                if mode == "training":
                    return lambda: f(q, k, v).float().sum().backward()
                return lambda: f(q, k, v)
            with torch.set_grad_enabled(mode == "training"):
                t_fused, t_explicit = timed([call(fused), call(explicit)], repeats=repeats)
            rows.append(dict(mode=mode, dtype=str(dtype).split(".")[1], shape="x".join(map(str, shape)),
                             fused_ms=1e3 * t_fused, explicit_ms=1e3 * t_explicit,
                             fused_over_explicit=t_fused / t_explicit))
    return rows


# ----------------------------------------------------------------------------- 8. the default run's step

class Phases:
    """A model and its optimizer, wrapped to count the seconds of each forward and of each optimizer
    step apart: train.train_step's phases, timed from outside it."""

    def __init__(self, model, opt):
        self.model, self.opt, self.seconds = model, opt, dict(forward=0.0, optimizer=0.0)

    def __call__(self, x):
        start = time.perf_counter()
        out = self.model(x)
        self.seconds["forward"] += time.perf_counter() - start
        return out

    def modules(self):  # where train_step looks for a fine-tuning method's own losses (finetune.extra_loss)
        return self.model.modules()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        start = time.perf_counter()
        self.opt.step()
        self.seconds["optimizer"] += time.perf_counter() - start


def profile_default_step(steps, compiled=False, **overrides):
    """Where a step of `python train.py` (the default run) spends its time: waiting for the batch
    (the data loader over prerendered frames), then train.train_step's forward, its backward (the
    rest of the step: the loss, backward, logging) and its optimizer step. Built by train.py's own
    functions with its default settings (and `overrides` of them, for --quick). `compiled`: then
    also the whole step with the model under torch.compile (forward and backward graphs), its
    steps and eager ones in turn."""
    cfg, config = train.settings(overrides, {})
    model = finetune.build_model(cfg.method, config, vit.load_clip(cfg.init_from)).train()
    train_set = train.datasets(cfg, model.config.image_size)["train"]  # test sets are built, not rendered
    start = time.perf_counter()
    synthetic.prerender([train_set])
    render_s = time.perf_counter() - start
    opt = train.optimizer(model, cfg)
    device, bf16 = speed.device_and_precision("cpu", cfg.dtype)
    stream = train.batches(train_set, cfg, step=0, ddp_rank=0, world=1)

    def step(net=model):  # seconds of (data, forward, backward, optimizer)
        start = time.perf_counter()
        _, b = next(stream)
        data_s, clock = time.perf_counter() - start, Phases(net, opt)
        start = time.perf_counter()
        train.train_step(clock, b, clock, config=model.config, micro_batch=cfg.micro_batch_size or cfg.batch_size,
                         autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), device=device)
        forward, optimizer = clock.seconds["forward"], clock.seconds["optimizer"]
        return [data_s, forward, time.perf_counter() - start - forward - optimizer, optimizer]

    for _ in range(2):  # warm-up: the loader's worker starts, kernels are picked
        step()
    times = [step() for _ in range(steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    _, ops, kinds, _ = breakdown(prof, top=15)
    medians = [statistics.median(column) for column in zip(*times)]
    rows = [dict(phase=k, ms=1e3 * m, share=m / sum(medians))
            for k, m in zip(("data", "forward", "backward", "optimizer"), medians)]
    detail = dict(steps=steps, batch=cfg.batch_size, bf16=bf16, img_s=cfg.batch_size / sum(medians),
                  render_s=render_s, frames=len(train_set), kinds=kinds, ops=ops)
    if compiled:
        net = speed.compile_for_training(model)  # as train.py --compile runs it
        compile_s = sum(step(net))  # the first step compiles
        step(net)
        pairs = [(sum(step()), sum(step(net))) for _ in range(steps)]
        eager_s, compiled_s = (statistics.median(column) for column in zip(*pairs))
        repay = compile_s / (eager_s - compiled_s) if compiled_s < eager_s else math.inf  # never, if not faster
        detail["compiled"] = dict(eager_s=eager_s, compiled_s=compiled_s, eager_over_compiled=eager_s / compiled_s,
                                  first_step_s=compile_s, steps_to_repay=repay)
    return rows, detail


# ----------------------------------------------------------------------------- report

def report_backbone(results, shapes, repeats, matmul_n, profiled):
    results["backbone"], results["profile"] = bench_backbones(shapes, batches=(1, 8), repeats=repeats,
                                                              profiled=profiled)
    print("\n## 1. Backbone: Hugging Face time / ours (>= 1: ours not slower)\n")
    print(table(results["backbone"], ["model", "batch", "precision", "hf_s", "ours_s", "ours_compiled_s",
                                      "hf_over_ours", "hf_over_ours_compiled", "hf_matmul_share", "hf_over_its_matmuls",
                                      "max_abs_diff", "max_abs_diff_compiled", "compile_s"]))

    results["hardware"], results["matmul_peak"] = bench_hardware(results["backbone"], shapes, matmul_n=matmul_n,
                                                                 repeats=20)
    print(f"\n## 2. Against the hardware: matmul {matmul_n}² peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in results["matmul_peak"].items()) + "\n")
    print(table(results["hardware"], ["model", "batch", "precision", "gflop", "gflop_s", "matmul_peak_gflop_s",
                                      "fraction_of_peak", "compiled_fraction_of_peak"]))
    name, batch = profiled
    for prec, p in results["profile"].items():
        print(f"\n### Profile: ours, {name}, batch {batch}, {prec}: {p['total_ms']:.0f} ms self CPU time; "
              f"matmuls alone {p['gemm_gflop_s']:.0f} GFLOP/s, attention {p['attention_gflop_s']:.0f} GFLOP/s\n")
        print(table(p["kinds"], ["kind", "self_ms", "share"]))
        print()
        print(table(p["ops"], ["op", "calls", "self_ms", "share"]))



def report_routing(results, preset, batch, repeats):
    results["routing"], results["routing_detail"] = bench_routing(preset, batch=batch, repeats=repeats)
    d = results["routing_detail"]
    print(f"\n## 3. Routing pays: DFD-HR {preset}, eval, batch {batch}, median of {repeats}; exit layers "
          f"{d['exits']}; seconds {', '.join(f'{k} {v:.3g}' for k, v in d['times'].items())}\n")
    print(table(results["routing"], ["comparison", "predicted_saving", "realised_saving", "realised_over_predicted",
                                     "seconds", "ref_seconds"]))


@dataclass(frozen=True)
class Options:
    quick: bool = False          # tiny shapes (what tests/test_bench.py runs)
    json: str = ""               # also write the results to this file
    only: str = ""               # one part: backbone (1 and 2), routing (3), exits (3b, only when named), compiled
                                 # (3c), training (4), flops (5), attention (6), step (8: the default run's step)
    routing_repeats: int = 2     # timed passes of each routing variant
    exit_profile: int = 0        # with --only=exits: profiled passes of each exit variant (BENCHMARKS.md §3b: 10)
    step_compiled: bool = False  # with --only=step: also time the step compiled (compiling takes minutes)
    malloc: str = "kept"         # "kept": freed memory kept for reuse, as train.py runs (speed.py); "default": glibc's
    measure_training: str = ""   # internal: "PRESET,BATCH,STEPS", one training measurement in this process


def main(argv=()):
    args, = cli.parse(argv, Options)
    args = Options(**args)
    if args.measure_training:
        preset, batch, steps = args.measure_training.split(",")
        print(json.dumps(measure_training(preset, int(batch), int(steps))))
        return None

    transformers.utils.logging.disable_progress_bar()
    if args.malloc not in ("kept", "default"):
        raise SystemExit(f"--malloc={args.malloc}: choose kept or default")
    if args.malloc == "kept":
        speed.keep_freed_memory()  # the whole process, Hugging Face included
    start = time.perf_counter()
    info = hardware()
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads), "
          f"transformers {info['transformers']}; malloc: {args.malloc}")
    if args.quick:
        shapes, matmul_n, profiled, routing_preset, routing_batch = TINY, 256, ("tiny", 8), "small", 2
        train_runs = [("small", 4, 1)]
    else:
        shapes, matmul_n, profiled, routing_preset, routing_batch = BACKBONES, 2048, ("ViT-L/14", 8), "paper", 2
        train_runs = [("small", 16, 5), ("paper", 2, 1)]
    results = dict(machine=info, quick=args.quick, malloc=args.malloc)

    if args.only in ("", "backbone"):
        report_backbone(results, shapes, backbone_repeats, matmul_n, profiled)
    if args.only in ("", "routing"):
        report_routing(results, routing_preset, routing_batch, args.routing_repeats)
    if args.only == "exits":
        results["exits"], d = profile_exits("small" if args.quick else "paper", batch=2, passes=args.exit_profile or 2)
        print(f"\n## 3b. Layer exit under the profiler: T = K vs T = L, {d['passes']} passes each, batch {d['batch']}; "
              f"predicted saving {d['predicted_saving']:.3f}, realised in self CPU time {d['realised_saving_self']:.3f} "
              f"({d['self_total_ms'][0]:.0f} vs {d['self_total_ms'][1]:.0f} ms), wall medians "
              f"{d['wall_median_s'][0]:.2f} vs {d['wall_median_s'][1]:.2f} s\n")
        print(table(results["exits"], ["op", "all_layers_ms", "exit_at_K_ms", "saved_ms", "share_of_saving"]))
    if args.only in ("", "compiled"):
        cases = [("small", 4, "bf16")] if args.quick else [("small", 32, "bf16"), ("small", 32, "fp32"),
                                                             ("paper", 2, "bf16"), ("paper", 2, "fp32")]
        results["compiled"] = bench_compiled_model(cases, repeats=2 if args.quick else 5)
        print("\n## 3c. DFD-HR eval forward, eager vs compiled (predict.py --compile)\n")
        print(table(results["compiled"], ["preset", "batch", "precision", "eager_s", "compiled_s",
                                          "eager_over_compiled", "compile_s", "max_abs_logit_diff"]))
    if args.only in ("", "training"):
        results["training"] = bench_training(train_runs)
        print("\n## 4. Training step (fp32, forward + backward + Adam), each in a fresh process\n")
        print(table(results["training"], ["preset", "batch", "step_s", "rss_model_mib", "rss_peak_mib",
                                          "rss_step_mib", "trainable_params", "frozen_backbone", "error"]))
    if args.only in ("", "flops"):
        preset = "small" if args.quick else "paper"
        results["flops"] = count_flops(preset)
        print(f"\n## 5. Multiply-adds per image ({preset} preset, every view): the formula and torch's counter\n")
        print(table(results["flops"], ["exit_layer", "formula_gmac", "counted_gmac", "counted_over_formula"]))
    if args.only in ("", "attention"):
        results["attention"] = bench_attention(repeats=3, inference_batches=(1,)) if args.quick else bench_attention()
        print("\n## 6. Attention: fused kernel vs explicit matmuls (training: forward + backward)\n")
        print(table(results["attention"], ["mode", "dtype", "shape", "fused_ms", "explicit_ms", "fused_over_explicit"]))
    if args.only in ("", "step"):
        quick = dict(synthetic_train_videos=8, synthetic_test_videos=2, num_workers=0) if args.quick else {}
        results["step"], d = profile_default_step(steps=3 if args.quick else 30, compiled=args.step_compiled, **quick)
        results["step_profile"] = d
        print(f"\n## 8. The default run's step (python train.py's settings): median of {d['steps']} steps of "
              f"{d['batch']}, {'bf16' if d['bf16'] else 'fp32'}, {d['img_s']:.1f} img/s; rendering its "
              f"{d['frames']} training frames once took {d['render_s']:.0f} s\n")
        print(table(results["step"], ["phase", "ms", "share"]))
        print("\nOne step under torch.profiler, self CPU time by kind (forward, backward and optimizer ops):\n")
        print(table(d["kinds"], ["kind", "self_ms", "share"]))
        print()
        print(table(d["ops"], ["op", "calls", "self_ms", "share"]))
        if "compiled" in d:
            c = d["compiled"]
            print(f"\nCompiled (torch.compile, forward and backward), {d['steps']} steps each, in turn: eager "
                  f"{c['eager_s']:.3f} s, compiled {c['compiled_s']:.3f} s a step ({c['eager_over_compiled']:.2f}×); "
                  f"the first compiled step took {c['first_step_s']:.0f} s, repaid after {c['steps_to_repay']:.0f} steps")
    results["total_s"] = time.perf_counter() - start
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""benchmarks/bench.py --quick runs end to end and its two implementations agree; no timing is asserted.
benchmarks/precision.py compares what the fp32 and bf16 gradients of the losses reach."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.precision import compare
from dfdhr import DFDHR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_runs_and_outputs_agree(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", f"--json={out}"], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    results = json.loads(out.read_text())
    assert {r["precision"] for r in results["backbone"]} == {"fp32", "bf16"}
    for r in results["backbone"]:  # ours and Hugging Face on the same weights
        assert r["max_abs_diff"] < (1e-4 if r["precision"] == "fp32" else 5e-2), r
        assert 0 < r["hf_matmul_share"] < 1, r  # smoke: the profile of Hugging Face's forward saw its matmuls
    exits = results["routing_detail"]["exits"]  # the forced judges did what they were told
    cfg_layers, first_routed = 8, 4  # the small preset
    assert exits == dict(all_layers=[cfg_layers], exit_at_K=[first_routed], no_token_selection=[cfg_layers],
                         fusion_only=[cfg_layers])
    assert [r.get("error") for r in results["training"]] == [None]
    assert all(r["step_s"] > 0 and r["rss_peak_mib"] > 0 for r in results["training"])
    # smoke: the step profile and the attention cases ran (their figures are not checked here)
    assert [r["phase"] for r in results["step"]] == ["data", "forward", "backward", "optimizer"]
    assert {(r["mode"], r["dtype"]) for r in results["attention"]} == {(m, d) for m in ("training", "inference")
                                                                       for d in ("bfloat16", "float32")}
    for r in results["compiled"]:  # the compiled routed model against the eager one (bf16 rounding)
        assert r["max_abs_logit_diff"] < 5e-2, r


@pytest.mark.slow
def test_bench_quick_exit_profile_sees_the_skipped_layers(tmp_path):
    out = tmp_path / "exits.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--only=exits", f"--json={out}"], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    results = json.loads(out.read_text())
    d = results["exits"]
    matmul = next(r for r in d if r["op"] == "aten::addmm")  # half the small preset's layers are skipped
    assert 0.2 < 1 - matmul["exit_at_K_flops"] / matmul["all_layers_flops"] < 0.7  # FLOPs: times vary by machine


def test_profile_kinds_name_the_kernels_of_each_path():
    """measure.category, which every profile breakdown sums by: the linears of eager and compiled code
    are matmuls, the explicit attention's bmm and softmax are attention, other names are not matmuls."""
    from benchmarks import measure
    kinds = {op: measure.category(op).split(" ")[0] for op in (
        "aten::addmm", "aten::mm", "mkl::_mkl_linear", "mkldnn::_linear_pointwise", "aten::bmm", "aten::_softmax",
        "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::upsample_bilinear2d", "aten::copy_")}
    assert kinds == {"aten::addmm": "matmul", "aten::mm": "matmul", "mkl::_mkl_linear": "matmul",
                     "mkldnn::_linear_pointwise": "matmul", "aten::bmm": "attention", "aten::_softmax": "attention",
                     "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
                     "aten::upsample_bilinear2d": "other", "aten::copy_": "copies"}


@pytest.mark.parametrize("reaches", [False, True])
def test_precision_compares_each_role_the_loss_reaches(reaches, small, inputs):
    """benchmarks/precision.py: fp32 and bf16 gradients of the same weights on the same batch and noise point the
    same way at initialisation, and L_rank reaches the experts only when rank_reaches_features says so."""
    torch.manual_seed(0)
    model = DFDHR(replace(small, rank_reaches_features=reaches)).train()
    rows = compare(model, inputs(small, n=4), torch.tensor([0, 1, 0, 1]))
    reached = {(r["term"], r["role"]) for r in rows}
    assert {("ce", "head"), ("ce", "experts"), ("rank", "token_judges")} <= reached
    assert (("rank", "experts") in reached) == reaches
    assert all(r["cosine"] > 0.9 for r in rows if r["role"] != "layer_judges"), rows
    assert all(r["value_fp32"] != r["value_bf16"] for r in rows)  # the second pass did run in bf16

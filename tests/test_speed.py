"""speed.py: the precision "auto" resolves to on a CPU below AVX512, kept memory is reused without
page faults (the kernel's own count, in fresh processes with and without it), and the compiled
backbone computes what the eager one does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speed
import vit

ROOT = Path(__file__).resolve().parents[1]

FAULTS = """
import resource, sys, torch, speed
if sys.argv[1] == "kept":
    assert speed.keep_freed_memory()
n = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
torch.empty(2 * n, dtype=torch.uint8).fill_(1)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(n, dtype=torch.uint8).fill_(1)  # a smaller block, room for its alignment to spare
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / n)
"""


@pytest.mark.slow
def test_auto_precision_is_fp32_where_aten_runs_below_avx512():
    """An AVX2 machine, as ATEN_CPU_CAPABILITY=avx2 makes of this one, emulates bf16: "auto" is fp32."""
    probe = "import speed, torch; print(torch.backends.cpu.get_cpu_capability(), speed.device_and_precision()[1])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "CUDA_VISIBLE_DEVICES": ""})
    assert out.stdout.split() == ["AVX2", "False"]
    cpu = torch.device("cpu")
    assert speed.device_and_precision("cpu", "bf16") == (cpu, True)
    assert speed.device_and_precision("cpu", "fp32") == (cpu, False)


def faults_per_page(malloc):
    """Minor page faults per page of a 64 MiB block allocated after a 128 MiB one was freed."""
    out = subprocess.run([sys.executable, "-c", FAULTS, malloc], cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.slow
def test_kept_freed_memory_is_reused_without_page_faults():
    if not sys.platform.startswith("linux"):
        assert not speed.keep_freed_memory()
        return
    assert faults_per_page("default") > 0.5  # glibc's defaults: mapped afresh and faulted in again
    assert faults_per_page("kept") < 0.01    # the freed block is reused


@pytest.mark.slow
def test_compiled_backbone_computes_what_the_eager_one_does():
    torch.manual_seed(0)
    model = vit.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=48).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = speed.compile_for_inference(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)

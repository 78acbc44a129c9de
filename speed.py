"""The machine the scripts run on, and CPU speed-ups they switch on; benchmarks/BENCHMARKS.md measures them.

device_and_precision: the device and whether to compute in bf16 autocast, one rule for train.py,
predict.py and the benchmarks; machine() describes it in a line for a run's record.

keep_freed_memory: glibc's malloc serves each block above its mmap threshold (at most 32 MiB) with
a fresh mapping and unmaps it on free, so every large tensor is page-faulted in again on each
allocation (a ViT-L/14 MLP activation at batch 8 is (8, 257, 4096) fp32 = 34 MB). Kept, freed
blocks are reused at once; the process's resident memory then stays at its peak instead of
shrinking between steps.

compile_for_inference: torch.compile (inductor) with the weights frozen into the compiled code
(constant folding, weights prepacked for oneDNN's matmuls). For inference under torch.no_grad() only:
a model whose weights change afterwards must be compiled again.

compile_for_training: torch.compile of the training forward (and so its backward) with the random
draws of eager mode, so a compiled run draws the same Gumbel noise as an eager one.
"""
import ctypes
import ctypes.util
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)


def device_and_precision(device="auto", dtype="auto", index=0):
    """(torch.device, whether to compute in bf16 autocast) for `--device` and `--dtype`.

    device "auto" takes a GPU where there is one; `index` is this process's GPU (torchrun's
    LOCAL_RANK). dtype "auto" is bf16 where the device computes in it natively, and there faster
    than in fp32: a GPU that supports it, or a CPU with AVX512-BF16 whose kernels ATen dispatches at
    its AVX512 level; at a lower level (an AVX2 machine, or ATEN_CPU_CAPABILITY=avx2) bf16 is
    emulated, slower than fp32, and "auto" is fp32.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{index}" if use_cuda else "cpu")
    if dtype != "auto":
        return dev, dtype == "bf16"
    if use_cuda:
        return dev, torch.cuda.is_bf16_supported()
    return dev, torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()


def machine(device, bf16):
    """Where a run computes, for its record: the device, the precision, the CPU capability ATen
    dispatches its kernels to, threads, torch's version."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return dict(device=f"{device}{name}", precision="bf16" if bf16 else "fp32",
                cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                torch=torch.__version__)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse, for the rest of the process: no block is
    served by mmap, and the heap is never trimmed. True if it took effect (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:  # no C library by that name: nothing to tune
        return False
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


RECOMPILE_LIMIT = 64  # variants of one function: DFD-HR's per-layer code is one per layer index and branch (2 x 24)


def compile_for_inference(model):
    """`model` in eval mode, compiled with its weights frozen in, as a function. Shapes are static:
    each new batch size or row count compiles once more (the first call of each takes seconds to
    minutes), up to RECOMPILE_LIMIT variants of a function, past which dynamo runs it eagerly.
    Inductor and dynamo read these switches when they compile, which is at a call."""
    compiled = torch.compile(model.eval(), dynamic=False)

    def run(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return run


def compile_for_training(model):
    """`model` (a module, or DDP around one) under torch.compile; inductor otherwise generates its own
    random numbers, which would make a compiled run draw other noise than the eager run."""
    return torch.compile(model, options={"fallback_random": True})

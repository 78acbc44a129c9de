"""CPU speed-ups that the scripts switch on; BENCHMARKS.md measures them.

keep_freed_memory: glibc's malloc serves each block above its mmap threshold (at most 32 MiB) with
a fresh mapping and unmaps it on free, so every large tensor is page-faulted in again on each
allocation (a ViT-L/14 MLP activation at batch 8 is (8, 257, 4096) fp32 = 34 MB). In the paper
preset's forward, QuickGELU's sigmoid and mul took 528 ms on fresh pages and 184 ms on reused ones
(`bench.py --only=exits`). Kept, freed blocks are reused at once; the process's resident memory
then stays at its peak instead of shrinking between steps.

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

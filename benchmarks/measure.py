"""Measuring on the CPU, shared by bench.py and bench_release.py: timing callables in turn, a
torch.profiler breakdown by kind of operator, a process's peak memory, and Markdown tables."""
import statistics
import time

import torch


def timed(fns, *, repeats, warmup=1, stat=statistics.median):
    """Median (or `stat`) seconds of each callable; they run in turn, so a change of machine load hits all alike."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, f in zip(times, fns):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return [stat(t) for t in times]


def precision(name):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16")


def category(op):
    if op in ("aten::addmm", "aten::mm", "aten::linear", "mkl::_mkl_linear", "mkldnn::_linear_pointwise"):
        return "matmul (addmm/mm, oneDNN linear)"
    if "CompiledFxGraph" in op:
        return "compiled kernels (fused element-wise, norms, softmax)"
    if "scaled_dot_product" in op or op in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data"):
        return "attention (sdpa; or bmm and softmax)"  # the routers' few softmaxes land here too
    if "convolution" in op:
        return "patch embedding (conv)"
    if op in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"):
        return "copies and casts"
    if "layer_norm" in op:
        return "layer norm"
    return "other (element-wise, views, ...)"


def breakdown(prof, top):
    """A profile's events (largest self CPU time first), its `top` operators, its time by kind
    (`category`), and its total self time in µs."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [dict(op=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total)
           for e in events[:top]]
    kinds = {}
    for e in events:
        kinds[category(e.key)] = kinds.get(category(e.key), 0) + e.self_cpu_time_total / 1e3
    kinds = [dict(kind=k, self_ms=v, share=v * 1e3 / total) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    return events, ops, kinds, total


def matmul_share(call):
    """The share of one call's self CPU time that its matmuls take. HF time / ours can exceed
    1 / share only if our matmuls run faster than Hugging Face's: the rest is all there is to save."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    _, _, kinds, _ = breakdown(prof, 0)
    return sum(k["share"] for k in kinds if k["kind"].startswith("matmul"))


def peak_rss_mib():
    """This process's peak resident memory. Linux's ru_maxrss is not used: exec keeps the peak of
    the parent that spawned the process (a child of the full benchmark run reports the parent's
    peak), while VmHWM belongs to the process's own address space."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB -> MiB


def table(rows, columns):
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

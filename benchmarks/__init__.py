"""Measurements and comparisons, run from the repository root; results in BENCHMARKS.md and README.md.

  bench.py            speed: our ViT against Hugging Face's CLIP, the hardware, the routing's
                      savings, training steps, the default run's step: python -m benchmarks.bench
  bench_release.py    the authors' released detector with our weights: python -m benchmarks.bench_release
  measure.py          what both measure with: timing in turn, profiles by kind of operator, peak memory
  compare_methods.py  supp. Tab. A and the main ablation, each row a train.py run:
                      python -m benchmarks.compare_methods
"""

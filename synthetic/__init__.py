"""The built-in synthetic benchmark, nothing to download: `python train.py` trains and tests on it.

  faces.py      the face world: identities, scenes, poses, rendering, landmarks, camera
  forgeries.py  four forgery families that imitate real methods' artifacts, the data sets and the
                protocols (after SBI; after the paper's Protocol-2)
  pretrain.py   the small preset's CLIP backbone (weights/small_clip.pt), pretrained on real renders:
                python -m synthetic.pretrain
  probe.py      a linear probe that vets a backbone on the benchmark: python -m synthetic.probe

`import synthetic` gives what train.py and figures.py use of the benchmark.
"""
from synthetic.forgeries import (FORGERY_METHODS, PROTOCOLS, STRENGTH, FamilyTestSet, SelfBlendPairs,
                                 SyntheticForgeries, prerender, synthetic_splits)

__all__ = ["FORGERY_METHODS", "PROTOCOLS", "STRENGTH", "FamilyTestSet", "SelfBlendPairs", "SyntheticForgeries",
           "prerender", "synthetic_splits"]

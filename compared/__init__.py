"""The methods of the paper's comparisons that replace DFD-HR's model (supp. Sec. B): Tab. 6's RINE,
D³ and MRA (multiscale.py), and the ConvNeXt that MRA runs beside the ViT (convnext.py). Every other
row of Tab. 5, 6 and 8 is a switch of DFD-HR's own model (dfdhr.ABLATIONS).

`build_model(method, config, backbone)` builds one, as finetune.build_model does the methods of
Tab. A: train.py trains and evaluates it with `--method=rine|d3|mra`.
"""
from compared.convnext import load_convnext
from compared.multiscale import D3, MRA, RINE

METHODS = ("rine", "d3", "mra")


def build_model(method, config, backbone=None, convnext=None):
    """`method` of METHODS on the baseline config (dfdhr.make_config(preset, "baseline")) and a loaded CLIP
    `backbone` (vit.load_clip; None: a new one). MRA's ConvNeXt: `convnext`, a checkpoint's path (its
    layouts: convnext.load_convnext), or None for a new one."""
    if method == "rine":
        return RINE(config, backbone)
    if method == "d3":
        return D3(config, backbone)
    if method == "mra":
        return MRA(config, backbone, load_convnext(convnext) if convnext else None)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022), written from scratch, and loading the
ConvNeXt checkpoints researchers have: the high-resolution path of MRA (supp. Tab. 6; multiscale.py).

The parameter names are those of ConvNeXt's own release (facebookresearch/ConvNeXt), so its state
dicts load strictly. `load_convnext` also reads timm's and Hugging Face's layouts (and open_clip's
CLIP-ConvNeXt, timm's names under `visual.trunk.`, which LLaVA-HR's MRA uses) through one rename table
each, and reads every size, the stages' widths and blocks, off the tensors. The classifier at the end
of each layout is left out: MRA reads the stages' feature maps.

Letters: B batch, C a stage's channels, S the image's side, s a feature map's side.
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vit import CheckpointError, find_weights, mismatch, read_tensors

LAYER_SCALE = 1e-6  # γ's initial value (ConvNeXt)
STRIDE = 32         # of the last stage: the stem's 4, then 2 before each of the three other stages


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, s, s) map, ConvNeXt's "channels_first" norm."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """x + γ ⊙ pwconv2(GELU(pwconv1(LN(dwconv7×7(x))))): the 1×1 convolutions as linear layers on (B, s, s, C)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE))

    def forward(self, x):  # (B, C, s, s)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, s, s, C)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)  # (B, C, s, s)


class ConvNeXt(nn.Module):
    """The stem (a 4×4 convolution of stride 4, LN), four stages of `depths` blocks at widths `dims`, a
    downsampling (LN, 2×2 convolution of stride 2) before each stage but the first. No classifier."""

    def __init__(self, *, depths, dims):
        super().__init__()
        self.dims = tuple(dims)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
               for i in range(1, len(dims))])
        self.stages = nn.ModuleList(nn.Sequential(*(Block(dim) for _ in range(depth))) for depth, dim in zip(depths, dims))
        for m in self.modules():  # ConvNeXt's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, S, S) -> every stage's output, the i-th (B, dims[i], S / 2^(i+2), ...)
        features = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            features.append(x)
        return features

    def flops(self, size):
        """Multiply-adds on one size × size image: every convolution and linear layer."""
        s, total = size // 4, 0
        for i, (stage, C) in enumerate(zip(self.stages, self.dims)):
            if i == 0:
                total += s * s * C * 3 * 16  # stem: 4×4 kernel on 3 channels
            else:
                s //= 2
                total += s * s * C * self.dims[i - 1] * 4  # 2×2 kernel
            total += len(stage) * s * s * C * (49 + 8 * C)  # 7×7 depthwise, C -> 4C -> C
        return total


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------

# timm's and Hugging Face's names -> ours (ConvNeXt's release). Each pattern matches a whole key.
TIMM_TO_OURS = {
    r"stem\.([01])\.(weight|bias)": r"downsample_layers.0.\1.\2",
    r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)": r"downsample_layers.\1.\2.\3",
    r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)": r"stages.\1.\2.dwconv.\3",
    r"stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)": r"stages.\1.\2.norm.\3",
    r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)": r"stages.\1.\2.pwconv\3.\4",
    r"stages\.(\d+)\.blocks\.(\d+)\.gamma": r"stages.\1.\2.gamma",
}
HF_TO_OURS = {
    r"embeddings\.patch_embeddings\.(weight|bias)": r"downsample_layers.0.0.\1",
    r"embeddings\.layernorm\.(weight|bias)": r"downsample_layers.0.1.\1",
    r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)": r"downsample_layers.\1.\2.\3",
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(weight|bias)": r"stages.\1.\2.dwconv.\3",
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)": r"stages.\1.\2.norm.\3",
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv([12])\.(weight|bias)": r"stages.\1.\2.pwconv\3.\4",
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter": r"stages.\1.\2.gamma",
}
# A model inside a larger one: Hugging Face's ConvNextForImageClassification, open_clip's CLIP-ConvNeXt.
PREFIXES = ("convnext.", "visual.trunk.")
# What follows the last stage: ours "norm", "head"; timm's "norm_pre", "head"; Hugging Face's "layernorm", "classifier".
HEADS = ("norm.", "head.", "norm_pre.", "layernorm.", "classifier.")


def to_our_names(sd, name):
    """A ConvNeXt state dict in our names, fp32, without its classifier; keys no table knows are kept
    as `<unmapped> key`, which the load reports."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: not a state dict of tensors (got {type(sd).__name__})")
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    table = TIMM_TO_OURS if "stem.0.weight" in sd else HF_TO_OURS if "embeddings.patch_embeddings.weight" in sd else None
    out = {}
    for key, value in sd.items():
        if key.startswith(HEADS):
            continue
        if table is not None:
            match = next((m for m in (re.fullmatch(p, key) for p in table) if m), None)
            key = match.expand(table[match.re.pattern]) if match else f"<unmapped> {key}"
        out[key] = value.float()
    return out


def load_convnext(source):
    """Build the right-sized `ConvNeXt` from a checkpoint path, a Hugging Face folder, or a state dict:
    ConvNeXt's own (also wrapped as {"model": ...}, as its release saves it), timm's, Hugging Face's
    (ConvNextModel, ConvNextForImageClassification) or open_clip's CLIP-ConvNeXt. Sizes are read off
    the tensors; the load is strict."""
    if isinstance(source, (str, Path)):
        path = find_weights(Path(source))
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        name, sd = str(path), read_tensors(path)
    else:
        name, sd = "<state dict>", source
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # ConvNeXt's release: {"model": state dict}
        sd = sd["model"]
    sd = to_our_names(sd, name)
    blocks = [k.split(".")[1:3] for k in sd if re.fullmatch(r"stages\.\d+\.\d+\.dwconv\.weight", k)]
    if not blocks:
        raise CheckpointError(f"{name}: no ConvNeXt in it (no stages.*.dwconv after renaming); "
                              f"keys start with {sorted(sd)[:5]}")
    stages = 1 + max(int(i) for i, _ in blocks)
    depths = [sum(i == str(n) for i, _ in blocks) for n in range(stages)]
    dims = [sd[f"stages.{n}.0.dwconv.weight"].shape[0] if depths[n] else 0 for n in range(stages)]
    model = ConvNeXt(depths=depths, dims=dims)
    problems = mismatch(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{name} does not fit a ConvNeXt (depths {depths}, widths {dims}): {problems}")
    model.load_state_dict(sd, strict=True)
    return model


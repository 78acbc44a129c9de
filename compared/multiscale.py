"""The methods of supp. Tab. 6 ("Comparison of methods for multi-scale complementarity") that replace
DFD-HR's model, each as its own paper and code define it, on the paper's CLIP ViT:

  RINE  Koutlis & Papadopoulos, "Leveraging Representations from Intermediate Encoder-blocks for
        Synthetic Image Detection", ECCV 2024 (mever-team/rine): the CLS of every block, weighted by a
        trainable importance estimator; CLIP frozen.
  D³    Yang et al., "D³: Scaling Up Deepfake Detection by Learning from Discrepancy", CVPR 2025
        (BigAandSmallq/D3): the image and copies with shuffled patches, fused by self-attention.
  MRA   Luo et al., "Feast Your Eyes: Mixture-of-Resolution Adaptation for Multimodal Large Language
        Models" (LLaVA-HR; luogen1996/LLaVA-HR): a ConvNeXt on the image at high resolution (convnext.py),
        fused into the ViT by gated adapters.

The table's two other rows, "Split Ensemble" and "Multi CLS Pooling", change DFD-HR's own model
(dfdhr.ABLATIONS). Each model here is built on the paper's baseline config (one view, no routers;
train.py's `--method=rine|d3|mra`) and answers as DFDHR does: a DFDHROutput, whose record is that of
a model that does not route (every view runs every layer, no expert gates, no L_rank).

Letters as in dfdhr.py's glossary, and: F RINE's projection width, g the ViT's grid side, C and s the
ConvNeXt's channels and map side, S' its input side.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from compared.convnext import STRIDE, ConvNeXt
from dfdhr import DFDHR, DFDHROutput, estimate_flops, original_image, param_groups, with_backbone

RINE_PROJECTIONS = 2    # RINE's 4-class setting (its best for ProGAN's four classes): 2 projection layers of width D
D3_SHUFFLES = 4         # supp.: "D³ uses patch shuffling 4 times and the original image"
MRA_RESOLUTION = 384 / 224  # supp.: the ConvNeXt sees the face at 384 px where the ViT sees it at 224
MRA_DEPTHS = (3, 3, 9, 3)   # a ConvNeXt built here (without a checkpoint): ConvNeXt-T's depths, widths D/8 .. D


class Compared(nn.Module):
    """What train.py, evaluation.py and predict.py ask of a model: `config` (the baseline's, with the
    loaded backbone's sizes), `backbone`, `param_groups`, `predict`, and a DFDHROutput from `forward`."""

    predict = DFDHR.predict  # fake probability softmax[:, 1] in eval mode, and the output

    def __init__(self, config, backbone):
        super().__init__()
        self.config, self.backbone = with_backbone(config, backbone)

    def flops(self):
        """Multiply-adds per image: the ViT on one view by the supplementary's formula (dfdhr.estimate_flops)."""
        return estimate_flops(self.config)

    def output(self, logits, views=1):
        """The DFDHROutput of a model that does not route."""
        B, L = len(logits), self.config.layers
        return DFDHROutput(logits=logits, rank_loss=logits.new_zeros(()).float(), kept=[],
                           exit_layer=torch.full((B, views), L, device=logits.device),
                           gates=logits.new_full((B, views, L, 2, self.config.num_experts), math.nan),
                           flops=logits.new_full((B,), float(self.flops())).float())


# ---------------------------------------------------------------------------------------------
# RINE
# ---------------------------------------------------------------------------------------------

def projection(dim_in, dim):
    """RINE's projections Q₁, Q₂: dropout, then (Linear, ReLU, dropout) × RINE_PROJECTIONS, at p = 0.5."""
    layers = [nn.Dropout()]
    for i in range(RINE_PROJECTIONS):
        layers += [nn.Linear(dim_in if i == 0 else dim, dim), nn.ReLU(), nn.Dropout()]
    return nn.Sequential(*layers)


class ImportanceEstimator(nn.Module):
    """RINE's Trainable Importance Estimator: a softmax over the L blocks per feature, A (1, L, F) (its
    `alpha`), weighs the blocks' projected CLS, z = Σ_l softmax_l(A)_l ⊙ g_l: (B, L, F) -> (B, F)."""

    def __init__(self, blocks, width):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, blocks, width))

    def forward(self, g):
        return (self.alpha.softmax(1) * g).sum(1)


class RINE(Compared):
    """RINE: the CLS token of each block's intermediate representation (after its attention, normed by
    ln_2: the input of its MLP, where RINE's hooks read it), projected by Q₁, weighed over the blocks by
    the Trainable Importance Estimator, projected by Q₂, classified by a 3-layer head. CLIP stays frozen
    (supp.: "following its original configuration"). RINE's training adds a supervised contrastive term
    on Q₂'s output; train.py's loss is L_cls for every compared method (README)."""

    def __init__(self, config, backbone=None):
        super().__init__(replace(config, freeze_backbone=True), backbone)
        D, L = self.config.width, self.config.layers
        width = D  # F: RINE's 4-class setting projects to 1024, ViT-L/14's width
        self.q1, self.q2 = projection(D, width), projection(width, width)
        self.importance = ImportanceEstimator(L, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Dropout(), nn.Linear(width, self.config.num_classes))

    def param_groups(self, *, lr, backbone_lr):
        roles = {"backbone": [self.backbone], "fusion": [self.q1, self.importance, self.q2], "head": [self.head]}
        return param_groups(roles, lr=lr, backbone_lr=backbone_lr)

    def forward(self, x):  # (B, 3, S, S)
        h, cls = self.backbone.embed(original_image(x, self.config.view_size)), []
        for blk in self.backbone.blocks:
            h = h + blk.attn(blk.ln_1(h))
            m = blk.ln_2(h)  # (B, N, D) the block's intermediate representation
            cls.append(m[:, 0])
            h = h + blk.mlp(m)
        z = self.q2(self.importance(self.q1(torch.stack(cls, 1))))  # (B, L, D) -> (B, L, F) -> (B, F)
        return self.output(self.head(z))


# ---------------------------------------------------------------------------------------------
# D³
# ---------------------------------------------------------------------------------------------

def shuffle_patches(x, patch, perm):
    """D³'s patch shuffle: (B, 3, S, S) cut into (S/patch)² patches, row-major; position j receives the
    patch perm[j] (one permutation for the batch, as D³'s code draws it)."""
    B, C, S, _ = x.shape
    g = S // patch
    p = x.view(B, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, patch, patch)
    return p[:, perm].view(B, g, g, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, S, S)


class D3(Compared):
    """D³: the original image and D3_SHUFFLES copies whose ViT patches are shuffled, each through the
    backbone to its final CLS after ln_post (D³'s "penultimate" feature); one self-attention layer over
    the five (q, k, v: Linear(D, D)), its outputs concatenated, a linear head. D³'s code normalises the
    attention over the queries (softmax dim=1); we follow its paper's self-attention, over the keys.
    In training each shuffle is a fresh permutation; at inference a fixed set, so a score is
    reproducible (D³'s code draws new ones at test time too). The backbone fine-tunes as the baseline."""

    def __init__(self, config, backbone=None):
        super().__init__(config, backbone)
        D = self.config.width
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear((D3_SHUFFLES + 1) * D, self.config.num_classes)

    def param_groups(self, *, lr, backbone_lr):
        roles = {"backbone": [self.backbone], "fusion": [self.q, self.k, self.v], "head": [self.head]}
        return param_groups(roles, lr=lr, backbone_lr=backbone_lr)

    def flops(self):
        return (D3_SHUFFLES + 1) * estimate_flops(self.config)  # the ViT on each view

    def permutations(self, n):  # (D3_SHUFFLES, n)
        draw = None if self.training else torch.Generator().manual_seed(0)
        return torch.stack([torch.randperm(n, generator=draw) for _ in range(D3_SHUFFLES)])

    def forward(self, x):  # (B, 3, S, S)
        cfg = self.config
        view = original_image(x, cfg.view_size)  # (B, 3, v, v)
        perms = self.permutations((cfg.view_size // cfg.patch_size) ** 2).to(x.device)
        views = [shuffle_patches(view, cfg.patch_size, p) for p in perms] + [view]  # D³'s order: shuffled, original
        f = self.backbone.ln_post(self.backbone.tokens(torch.cat(views))[:, 0])  # (5B, D)
        f = f.view(len(views), len(x), -1).transpose(0, 1)  # (B, 5, D)
        a = (self.q(f) @ self.k(f).transpose(1, 2) / math.sqrt(f.shape[-1])).softmax(-1)  # (B, 5, 5)
        logits = self.head((a @ self.v(f)).flatten(1))  # (B, 5·D) -> (B, 2)
        return self.output(logits, views=len(views))


# ---------------------------------------------------------------------------------------------
# MRA
# ---------------------------------------------------------------------------------------------

class MRAdapter(nn.Module):
    """LLaVA-HR's MR-Adapter (its S2FStitchAlignModuleV2), the ConvNeXt's map (B, C, s, s) into the ViT's
    patch tokens (B, g², D):
        slow = W_s2 GELU(W_s1 F_conv), 1×1 convolutions, resized to g × g (bilinear, align_corners,
               as LLaVA-HR; averaged where s > g);
        fast = F_vit + W_f2 GELU(DWConv7×7 F_vit);
        out  = fast + tanh(MLP(mean over the tokens of [fast, slow])) · slow, one gate per image.
    W_s2 and W_f2 start at zero, so at initialisation the adapter passes the ViT's tokens unchanged."""

    def __init__(self, dim, slow_dim):
        super().__init__()
        self.slow_conv, self.slow_proj = nn.Conv2d(slow_dim, slow_dim, 1), nn.Conv2d(slow_dim, dim, 1)
        self.fast_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.fast_proj = nn.Conv2d(dim, dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))
        for conv in (self.slow_conv, self.fast_conv):
            nn.init.xavier_uniform_(conv.weight)
        for conv in (self.slow_conv, self.fast_conv, self.slow_proj, self.fast_proj):
            nn.init.zeros_(conv.bias)
        for conv in (self.slow_proj, self.fast_proj):
            nn.init.zeros_(conv.weight)

    def forward(self, tokens, slow):  # (B, g², D), (B, C, s, s) -> (B, g², D)
        B, n, D = tokens.shape
        g = math.isqrt(n)
        slow = self.slow_proj(F.gelu(self.slow_conv(slow)))  # (B, D, s, s)
        if slow.shape[-1] < g:
            slow = F.interpolate(slow.float(), size=(g, g), mode="bilinear", align_corners=True).to(tokens.dtype)
        elif slow.shape[-1] > g:
            slow = F.adaptive_avg_pool2d(slow, g)
        fast = tokens.transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g)
        fast = fast + self.fast_proj(F.gelu(self.fast_conv(fast)))
        gate = torch.tanh(self.gate(torch.cat([fast, slow], 1).mean((2, 3))))  # (B, 1)
        return (fast + gate[:, :, None, None] * slow).flatten(2).transpose(1, 2)  # (B, g², D)

    def flops(self, s, g):
        """Multiply-adds per image with an s × s map and g × g tokens: the convolutions and the gate's MLP."""
        C, D = self.slow_conv.in_channels, self.fast_proj.out_channels
        return s * s * C * (C + D) + g * g * D * (49 + D) + 2 * D * (D // 2) + D // 2


class MRA(Compared):
    """MRA: a ConvNeXt on the face at high resolution (S' = 384 where the ViT's view is 224, the next
    multiple of its stride 32 at other sizes); its last stage's map enters the ViT's patch tokens through an
    MR-adapter after each of the first three quarters of the blocks (LLaVA-HR: after blocks L/4, L/2, 3L/4).
    The head reads the ViT's CLS, as the baseline's does (LLaVA-HR drops CLS and hands the patch tokens
    to its language model: its final fusion of the two paths is left out). `convnext`: a loaded one
    (convnext.load_convnext), which trains at backbone_lr as the CLIP does; else one of ConvNeXt-T's
    depths and widths D/8 .. D, trained from scratch at lr. The CLIP fine-tunes as the baseline."""

    def __init__(self, config, backbone=None, convnext=None):
        super().__init__(config, backbone)
        D, L, v = self.config.width, self.config.layers, self.config.view_size
        self.config = replace(self.config, image_size=STRIDE * math.ceil(v * MRA_RESOLUTION / STRIDE))  # S'
        self.pretrained = convnext is not None
        self.convnext = convnext or ConvNeXt(depths=MRA_DEPTHS, dims=(D // 8, D // 4, D // 2, D))
        self.after = [L * q // 4 - 1 for q in (1, 2, 3)]  # the blocks an adapter follows
        self.adapters = nn.ModuleList(MRAdapter(D, self.convnext.dims[-1]) for _ in self.after)
        self.head = nn.Linear(self.config.embed_dim, self.config.num_classes)

    def param_groups(self, *, lr, backbone_lr):
        roles = {"backbone": [self.backbone], "convnext": [self.convnext], "fusion": [self.adapters], "head": [self.head]}
        return param_groups(roles, lr=lr, backbone_lr=backbone_lr,
                            slow=("backbone", "convnext") if self.pretrained else ("backbone",))

    def flops(self):
        """Multiply-adds per image: the ViT (the supplementary's formula), the ConvNeXt and the adapters."""
        cfg = self.config
        s, g = cfg.image_size // STRIDE, cfg.view_size // cfg.patch_size
        return estimate_flops(cfg) + self.convnext.flops(cfg.image_size) + sum(a.flops(s, g) for a in self.adapters)

    def forward(self, x):  # (B, 3, S', S')
        slow = self.convnext(x)[-1]  # (B, C, s, s)
        h = self.backbone.embed(original_image(x, self.config.view_size))  # (B, N, D)
        for i, blk in enumerate(self.backbone.blocks):
            h = blk(h)
            if i in self.after:
                h = torch.cat([h[:, :1], self.adapters[self.after.index(i)](h[:, 1:], slow)], 1)
        return self.output(self.head(self.backbone.project(h[:, 0])))

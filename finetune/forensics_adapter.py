"""ForAda, the Forensics Adapter (Cui et al., CVPR 2025; [4] of the supplementary; OUC-VAS/ForensicsAdapter),
a row of supp. Tab. A: a small ViT beside the frozen CLIP that reads CLIP's features, biases CLIP's attention
to learned queries, and learns the blending boundary. Written from their model/ds.py, adapters/adapter.py,
attn.py, layer.py and config/train.yaml:

  1. CLIP runs on the view as it is; its patch tokens after layers 1, 8 and 15 (of 24; `FUSED`) are kept.
  2. The adapter: Q = 128 queries and the view's own patch tokens (a patch embedding on CLIP's grid) through
     8 blocks of a ViT-Tiny (width 192, 3 heads), its positional embedding added again after each block;
     after adapter block j = 1, 2, 3 the patch tokens get 0.01·Linear(LN(CLIP's patch tokens of layer l_j)).
  3. Its decoder, from the queries and patch tokens after block 8 (three-layer MLPs q̂, x̂, â): per query a
     boundary map X_q = q̂_q·x̂ over the g × g patches, and per CLIP head an attention bias
     A_h = a·(q̂·â_h) + c.
  4. CLIP again, on [Q copies of its CLS, CLS, patches]: the copies attend to themselves and, with the bias
     A_h added, to the patches; CLS and patches never see the copies. After CLIP layer 7 (of 24) the patch
     tokens get 0.05·g(x) of a bottleneck g: D → 192 (ReLU; L_clip reads these) → D.
  5. The copies → ln_post, CLIP's projection, L2-normalised → the classifier (`head`): 1-D convolutions over
     the Q queries down to one, then an MLP P → P/2 → P/4 → 2.

Its losses besides L_cls (`loss`), from the blending mask M of each training frame (0 for real frames):
  L_boundary  MSE between the boundary head's map (X masked to the patches the blend's edge crosses, then
              convolutions and an up-sampling to S × S) and Face X-ray's 4·M̃(1 - M̃), M̃ M blurred 3 × 3;
  L_intra     after adapter blocks 4, 5, 6: in the fake frames, their real patches (M ≤ 40/255 over 90 % of a
              patch) pulled together and pushed from their fake patches,
              −log(Σ_RR e^{s/τ} / (Σ_RR e^{s/τ} + Σ_FR e^{s/τ})), s the cosine similarity, τ = 0.5;
  L_clip      the same on the bottleneck's features, plus real frames pulled together and pushed from fake
              ones, each real frame against a random fake frame's patches.
Their weights 10·L_cls + 200·L_boundary + 20·L_intra + 10·L_clip are used divided by 10, L_cls keeping 1.

Where this differs from their code: the adapter reads the CLIP view with CLIP's patch size (theirs: the 256 px
image with 16 px patches: the same 16 × 16 grid); its blocks are vit.Block, QuickGELU, trained from scratch as
theirs (timm's ViT-Tiny with GELU, not pretrained); the fusion projections train (theirs are drawn anew at every
forward and never train); masked attention is exact (theirs adds -100); the contrastive sums run over the pairs
the equation names (theirs also count e⁰ for every pair with a zeroed token). Layer numbers scale with L.

Letters as in dfdhr.py's glossary: B batch, N = 1 + g² CLIP tokens, g the patch grid, D CLIP's width, H its
heads, P its projection width, S the view's side; here also Q queries, d = 192 the adapter's width.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from finetune.added_networks import WithSideNetwork, attention
from dfdhr import original_image
from vit import Block, LayerNorm

QUERIES = 128            # Q (train.yaml num_quires)
WIDTH, HEADS, DEPTH = 192, 3, 8  # d: ViT-Tiny's width and heads, the 8 blocks they use of its 12
FUSED = (1, 8, 15)       # CLIP layers (of 24) whose patch tokens adapter blocks 1, 2, 3 read (fusion_map)
INTRA_BLOCKS = (4, 5, 6)  # adapter blocks whose patch tokens L_intra reads
BOTTLENECK_LAYER = 7     # the CLIP layer (of 24) after which the bottleneck g acts (RecAttnClip, block index 6)
MLP_DIM, OUT_DIM = 256, 128  # the decoder's MLPs: d -> 256 -> 256 -> 128 (mlp_dim, mlp_out_dim)
TAU = 0.5                # contrastive temperature
LOSS_WEIGHTS = dict(boundary=20.0, intra=2.0, clip=1.0)  # 200, 20, 10 of 10·L_cls + ... (ds.py), over 10


def scaled(layer, layers):
    """A CLIP layer number given for ViT-L/14's 24 layers, at a backbone of `layers` layers."""
    return max(1, round(layer * layers / 24))


def mlp(sizes):  # Linear, ReLU between, as their MLP
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


class Adapter(nn.Module):
    """The side network (steps 2, 3 and the bottleneck of 4): everything that trains but the classifier."""

    def __init__(self, *, clip_width, clip_heads, grid, patch):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, WIDTH, patch, stride=patch)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(grid * grid, WIDTH), std=0.02))  # (g², d)
        self.queries = nn.Parameter(torch.randn(QUERIES, WIDTH) * 0.02)  # (Q, d)
        self.query_pos = nn.Parameter(torch.randn(QUERIES, WIDTH) * 0.02)
        self.ln_pre = LayerNorm(WIDTH)
        self.blocks = nn.ModuleList(Block(width=WIDTH, heads=HEADS) for _ in range(DEPTH))
        self.fusion = nn.ModuleList(nn.Sequential(LayerNorm(clip_width), nn.Linear(clip_width, WIDTH)) for _ in FUSED)
        self.query_mlp = mlp([WIDTH, MLP_DIM, MLP_DIM, OUT_DIM])
        self.boundary_mlp = mlp([WIDTH, MLP_DIM, MLP_DIM, OUT_DIM])
        self.bias_mlp = mlp([WIDTH, MLP_DIM, MLP_DIM, OUT_DIM * clip_heads])
        self.bias_scale = nn.Linear(1, 1)  # a·A + c
        self.bottleneck = nn.ModuleList([nn.Linear(clip_width, WIDTH), nn.Linear(WIDTH, clip_width)])
        self.boundary_head = nn.Sequential(  # the boundary map from X: (B, Q, g, g) -> (B, 1, S, S)
            nn.Conv2d(QUERIES, QUERIES // 2, 3, padding=1), nn.BatchNorm2d(QUERIES // 2), nn.ReLU(),
            nn.Conv2d(QUERIES // 2, QUERIES // 4, 3, padding=1), nn.BatchNorm2d(QUERIES // 4), nn.ReLU(),
            nn.Conv2d(QUERIES // 4, 1, 1), nn.ConvTranspose2d(1, 1, patch, stride=patch))

    def forward(self, view, fused):
        """Steps 2, 3: the view (B, 3, S, S) and CLIP's patch tokens of the FUSED layers [(B, g², D)] ->
        boundary maps X (B, Q, g²), attention biases (B, H, Q, g²), and L_intra's patch tokens [(B, g², d)]."""
        x = self.patch_embed(view).flatten(2).transpose(1, 2)  # (B, g², d)
        pos = torch.cat([self.query_pos, self.pos])  # (Q + g², d)
        x = self.ln_pre(torch.cat([self.queries.expand(len(x), -1, -1), x], 1) + pos)  # (B, Q + g², d)
        intra = []
        for j, block in enumerate(self.blocks, 1):
            x = block(x)
            if j <= len(self.fusion):
                x = torch.cat([x[:, :QUERIES], x[:, QUERIES:] + 0.01 * self.fusion[j - 1](fused[j - 1])], 1)
            if j in INTRA_BLOCKS:
                intra.append(x[:, QUERIES:])
            if j < len(self.blocks):
                x = x + pos
        q = self.query_mlp(x[:, :QUERIES])  # (B, Q, 128)
        boundary = q @ self.boundary_mlp(x[:, QUERIES:]).mT  # (B, Q, g²)
        a = self.bias_mlp(x[:, QUERIES:]).unflatten(-1, (-1, OUT_DIM))  # (B, g², H, 128)
        bias = self.bias_scale(torch.einsum("bqc,bnhc->bhqn", q, a)[..., None])[..., 0]  # (B, H, Q, g²)
        return boundary, bias, intra


class Seen(NamedTuple):
    """What a training forward leaves for `ForensicsAdapter.loss`."""
    boundary: torch.Tensor  # (B, Q, g²) the queries' boundary maps X
    intra: list             # [(B, g², d)] the adapter's patch tokens after INTRA_BLOCKS
    clip: torch.Tensor      # (B, g², 192) the bottleneck's features of CLIP's patch tokens


class Classifier(nn.Module):
    """ForAda's head: 1-D convolutions over the Q queries (Q → Q/2 → Q/4 → 1, BN, ReLU), then an MLP
    P → P/2 → P/4 → 2."""

    def __init__(self, features):
        super().__init__()
        self.over_queries = nn.Sequential(
            nn.Conv1d(QUERIES, QUERIES // 2, 3, padding=1), nn.BatchNorm1d(QUERIES // 2), nn.ReLU(),
            nn.Conv1d(QUERIES // 2, QUERIES // 4, 3, padding=1), nn.BatchNorm1d(QUERIES // 4), nn.ReLU(),
            nn.Conv1d(QUERIES // 4, 1, 3, padding=1))
        self.mlp = mlp([features, features // 2, features // 4, 2])

    def forward(self, queries):  # (B, Q, P) -> (B, 2)
        return self.mlp(self.over_queries(queries)[:, 0])


def query_mask(bias, tokens):
    """The additive attention mask of step 4 (B, H, Q + N, Q + N) over [queries, CLS, patches]: a query sees
    itself and, biased, the patches; CLS and patches see CLS and patches."""
    B, H, Q, _ = bias.shape
    mask = bias.new_full((Q + tokens, Q + tokens), float("-inf"))
    mask[Q:, Q:] = 0
    mask[range(Q), range(Q)] = 0
    mask = mask.expand(B, H, -1, -1).clone()
    mask[:, :, :Q, Q + 1:] = bias
    return mask


def masked_block(block, x, mask):
    """vit.Block with an additive attention mask."""
    h = block.ln_1(x)
    x = x + attention(block.attn, F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias), mask)
    return x + block.mlp(block.ln_2(x))


class ForensicsAdapter(WithSideNetwork):
    """ForAda [4] on the frozen CLIP ViT: `side` is the adapter, `head` the classifier of the queries."""

    def __init__(self, config, backbone=None):
        super().__init__(config, backbone)
        cfg = self.config
        self.grid = cfg.view_size // cfg.patch_size
        self.side = Adapter(clip_width=cfg.width, clip_heads=cfg.heads, grid=self.grid, patch=cfg.patch_size)
        self.head = Classifier(cfg.embed_dim)
        self.fused = [scaled(layer, cfg.layers) for layer in FUSED]
        self.bottleneck_layer = scaled(BOTTLENECK_LAYER, cfg.layers)
        self.seen = None  # the last training forward's Seen

    def forward(self, x):  # (B, 3, S, S), S = view size
        view = original_image(x, self.config.view_size)
        bb = self.backbone
        h, states = bb.embed(view), {}  # (B, N, D)
        with torch.no_grad():  # step 1: CLIP as it is, up to the last layer the adapter reads
            t = h
            for i, block in enumerate(bb.blocks[:max(self.fused)], 1):
                t = states[i] = block(t)
        boundary, bias, intra = self.side(view, [states[i][:, 1:] for i in self.fused])  # steps 2, 3
        t = torch.cat([h[:, :1].expand(-1, QUERIES, -1), h], 1)  # (B, Q + N, D): step 4
        mask = query_mask(bias.to(t.dtype), h.shape[1])
        for i, block in enumerate(bb.blocks, 1):
            t = masked_block(block, t, mask)
            if i == self.bottleneck_layer:
                down, up = self.side.bottleneck
                clip = F.relu(down(t[:, QUERIES + 1:]))  # (B, g², 192)
                t = torch.cat([t[:, :QUERIES + 1], t[:, QUERIES + 1:] + 0.05 * up(clip)], 1)
        self.seen = Seen(boundary, intra, clip) if self.training else None
        queries = F.normalize(bb.project(t[:, :QUERIES]), dim=-1)  # (B, Q, P): step 5
        return self.plain_output(self.head(queries))

    def targets(self, mask):
        """From the blending masks (B, S', S') in [0, 1], resized (bilinear, as their cv2.resize) to the view's
        S: per patch whether it is fake and whether the blend's edge crosses it (B, g²) (their
        split_images_by_patch), and the boundary 4·M̃(1 - M̃) (B, S, S)."""
        S = self.config.view_size
        if mask.shape[-1] != S:
            mask = F.interpolate(mask[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        binary = (mask > 40 / 255).float()
        p = self.config.patch_size
        share = F.avg_pool2d(binary[:, None], p).flatten(1)  # (B, g²) fraction of the patch's pixels
        blur = torch.tensor([1.0, 2.0, 1.0], device=mask.device) / 4  # cv2.GaussianBlur(3 × 3) at σ = 0, reflect-101
        m = F.conv2d(F.pad(mask[:, None], (1, 1, 1, 1), mode="reflect"), (blur[:, None] * blur)[None, None])[:, 0]
        return share > 0.1, (share > 0.1) & (share < 1), 4 * m * (1 - m)

    def loss(self, labels, mask):
        """20·L_boundary + 2·L_intra + 1·L_clip of the last training forward; None without masks."""
        if mask is None or self.seen is None:
            return None
        fake_patch, edge, target = self.targets(mask.float())
        X = self.seen.boundary * edge[:, None]  # (B, Q, g²) only where the blend's edge crosses
        pred = self.side.boundary_head(X.unflatten(-1, (self.grid, self.grid)))[:, 0]  # (B, S, S)
        target = target * labels[:, None, None]
        intra = sum(patch_contrast(t, fake_patch, labels) for t in self.seen.intra)
        clip = patch_contrast(self.seen.clip, fake_patch, labels) + frame_contrast(self.seen.clip, labels)
        w = LOSS_WEIGHTS
        return w["boundary"] * F.mse_loss(pred.float(), target) + w["intra"] * intra + w["clip"] * clip


def contrast(pos, neg):
    """−log(Σ pos / (Σ pos + Σ neg)) of exponentiated similarities; 0 where nothing is positive."""
    pos, neg = pos.sum(), neg.sum()
    return -torch.log(pos / (pos + neg)) if pos > 0 else pos.new_zeros(())


def patch_contrast(tokens, fake_patch, labels):
    """L_intra over the fake frames: their real patches pulled together, pushed from their fake patches."""
    fake = labels == 1
    z = F.normalize(tokens[fake].float(), dim=-1)  # (f, g², c)
    f, r = fake_patch[fake].float(), (~fake_patch[fake]).float()  # (f, g²)
    e = torch.exp(z @ z.mT / TAU)  # (f, g², g²)
    return contrast(e * r[:, :, None] * r[:, None, :], e * f[:, :, None] * r[:, None, :])


def frame_contrast(tokens, labels):
    """L_clip's term between frames: as many real and fake frames, drawn at random, paired; each real frame's
    patches pulled together, pushed from its partner's:
    −log(Σ e^{s(r, r')/τ} / (Σ e^{s(r, r')/τ} + Σ e^{s(r, f)/τ}))."""
    z = F.normalize(tokens.float(), dim=-1)
    real, fake = z[labels == 0], z[labels == 1]
    n = min(len(real), len(fake))
    if n == 0:
        return z.new_zeros(())
    real = real[torch.randperm(len(real), device=z.device)[:n]]
    fake = fake[torch.randperm(len(fake), device=z.device)[:n]]
    return contrast(torch.exp(real @ real.mT / TAU), torch.exp(real @ fake.mT / TAU))

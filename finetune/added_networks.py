"""The rows of supp. Tab. A that add networks of their own to the frozen CLIP ViT: MoE-FFD's experts inside its
blocks, SideTuning's side AlexNet beside it (ForAda's adapter, also beside it, is forensics_adapter.py).

  MoE-FFD [10] (Kong et al. 2024; LoveSiameseCat/MoE-FFD, ViT_MoE.py): in every block, a mixture of LoRA
           experts of ranks 8 to 128 changes q, k, v, and beside the MLP a mixture of adapter experts, each with
           a 3 × 3 pixel-difference convolution over the patch grid; noisy top-1 gating (Shazeer et al. 2017) for
           both, per token for LoRA, per image for the adapters; their load-balancing losses join the loss.
           `finetune.apply` puts them in place (ExpertAttention for the attention, a forward hook on the MLP).
  SideTuning [27] (Zhang et al., ECCV 2020; jozhang97/side-tuning): r = α·base(x) + (1 - α)·side(x), the
           frozen ViT's feature and a side AlexNet's trained from scratch, before the head; α = σ(a), a learned
           from 0, their code's alpha blending (tlkit/models/merge_operators.py, `Alpha`).

SideTuning and ForAda run a forward of their own: `WithSideNetwork`, a DFDHR whose side network `side` trains.
Letters as in dfdhr.py's glossary: B batch, N tokens, D width, H heads, P the head's input width; here also
g the patch grid (N = 1 + g²), E experts, T the tokens of a batch (B·N), c an adapter expert's channels.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from dfdhr import DFDHR, DFDHROutput, estimate_flops, original_image

LORA_RANKS = (8, 16, 32, 48, 64, 96, 128)  # MoE-FFD's LoRA experts (ViT_MoE.py, LoRA_MoElayer)
ADAPTER_KINDS = ("cv", "cd", "ad", "rd", "scd")  # its adapter experts' convolutions (Adapter_MoElayer)
ADAPTER_CHANNELS = 8  # c: their adapter_dim
BALANCE_WEIGHTS = (200.0, 1.0)  # L = L_cls + 200·mean L_balance(LoRA) + 1·mean L_balance(adapters) (forward_features)


def attention(attn, qkv, mask=None):
    """vit.Attention's multi-head attention from the projections qkv (B, N, 3D) that `attn`'s weights would
    give or a method changed, with an additive attention mask (B, H, N, N) or None."""
    B, N, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.view(B, N, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D/H)
    return attn.out_proj(y.transpose(1, 2).reshape(B, N, D))


# ---------------------------------------------------------------------------------- MoE-FFD

def cv_squared(x):
    """Squared coefficient of variation var/mean² (unbiased var, as torch and MoE-FFD), 0 for one expert."""
    return x.var() / (x.mean() ** 2 + 1e-10) if len(x) > 1 else x.new_zeros(())


class NoisyTopOneGate(nn.Module):
    """Noisy top-k gating with k = 1 (Shazeer et al. 2017), as MoE-FFD: logits x·W_g, in training plus
    ε·(softplus(x·W_n) + 0.01), ε ~ N(0, 1); W_g = W_n = 0 at init. An input goes to its top expert with gate
    value softmax(top logit) = 1 (so the task loss does not reach W_g, W_n), and L_balance = cv²(importance) +
    cv²(load): importance the gates summed per expert, load in training the probability, under the noise,
    that the expert is the top one, Φ((clean logit - the best other logit)/std) summed (else the counts)."""

    def __init__(self, width, experts):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(width, experts))
        self.w_noise = nn.Parameter(torch.zeros(width, experts))

    def forward(self, x):  # (T, D) -> the chosen expert (T,), L_balance ()
        clean = x @ self.w_gate  # (T, E)
        logits, std = clean, None
        if self.training:
            std = F.softplus(x @ self.w_noise) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        top = logits.topk(min(2, clean.shape[1]), dim=1)  # the best and, for the load, the runner-up
        choice = top.indices[:, 0]
        gates = F.one_hot(choice, clean.shape[1]).to(x.dtype)  # (T, E): softmax of one logit is 1
        if std is not None and clean.shape[1] > 1:
            normal = torch.distributions.Normal(0.0, 1.0)
            is_top = logits > top.values[:, 1:2]  # the top expert beats the runner-up, the others the top
            load = torch.where(is_top, normal.cdf((clean - top.values[:, 1:2]) / std),
                               normal.cdf((clean - top.values[:, :1]) / std)).sum(0)
        else:
            load = gates.sum(0)
        return choice, cv_squared(gates.sum(0).float()) + cv_squared(load.float())


def dispatch(x, choice, experts):
    """Each row of x (R, ...) through the expert `choice` names: the chosen expert's output, not scaled by its
    gate (MoE-FFD's `combine` with multiply_by_gates=False)."""
    out = None
    for e, expert in enumerate(experts):
        rows = (choice == e).nonzero().squeeze(1)
        if len(rows):
            y = expert(x[rows])
            out = (y.new_zeros(len(x), *y.shape[1:]) if out is None else out).index_copy(0, rows, y)
    return out


class LoRAExpert(nn.Module):
    """One LoRA expert: a change B·A·h of q, k, v (3D) of rank r; A Kaiming-uniform, B = 0 (as LoRA)."""

    def __init__(self, width, rank):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width).uniform_(-width ** -0.5, width ** -0.5))  # (r, D)
        self.B = nn.Parameter(torch.zeros(3 * width, rank))  # (3D, r)

    def forward(self, h):  # (T, D) -> (T, 3D)
        return h @ self.A.T @ self.B.T


class LoRAExperts(nn.Module):
    """MoE-FFD's mixture of LoRA experts in attention: per token, q, k, v change by the chosen expert's B_e A_e h.
    `balance` is the last training forward's L_balance (finetune.extra_loss reads it), None in eval."""

    def __init__(self, width, ranks=LORA_RANKS):
        super().__init__()
        self.experts = nn.ModuleList(LoRAExpert(width, r) for r in ranks)
        self.gate = NoisyTopOneGate(width, len(ranks))
        self.balance = None

    def forward(self, h):  # (B, N, D) -> (B, N, 3D)
        x = h.flatten(0, 1)  # (T, D)
        choice, balance = self.gate(x)
        self.balance = balance if self.training else None
        return dispatch(x, choice, self.experts).view(*h.shape[:2], -1)


class ExpertAttention(nn.Module):
    """A block's attention with MoE-FFD's LoRA experts on q, k, v. It keeps the frozen attention's parameters
    under their names (in_proj_weight, in_proj_bias, out_proj), so a CLIP state dict still fits."""

    def __init__(self, attn, experts):
        super().__init__()
        self.heads, self.in_proj_weight, self.in_proj_bias = attn.heads, attn.in_proj_weight, attn.in_proj_bias
        self.out_proj, self.lora_experts = attn.out_proj, experts

    def forward(self, h):  # (B, N, D), h = ln_1(x)
        return attention(self, F.linear(h, self.in_proj_weight, self.in_proj_bias) + self.lora_experts(h))


class PixelDifferenceConv(nn.Module):
    """A 3 × 3 pixel-difference convolution (Su et al., PiDiNet, ICCV 2021) as MoE-FFD writes them
    (createConvFunc), each an ordinary convolution with a kernel K made from the learned 3 × 3 weights w
    (w_0 .. w_8 row by row, w_4 the centre):
      cv   K = w
      cd   centre differences: y = Σ_i w_i x_i - (Σ_i w_i - w_4)·x_centre, K = w with w_4 → 2w_4 - Σ w
      ad   angular differences: K = w - w∘π, π rotating the ring of neighbours clockwise, centre 0
      rd   radial differences, 5 × 5: w_1..w_8 at distance 2, -w_1..-w_8 at distance 1, w_0 in the centre
      scd  second-order: as rd with -2w_1..-2w_8 at distance 1 and Σ w in the centre
    Initialised as MoE-FFD: w = identity at the centre, zero elsewhere; bias nn.Conv2d's."""

    RING = [0, 2, 4, 10, 14, 20, 22, 24]  # the 5 × 5 kernel's taps at distance 2, row by row
    INNER = [6, 7, 8, 11, 13, 16, 17, 18]  # and at distance 1
    CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]

    def __init__(self, channels, kind):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.zeros(channels, channels, 3, 3))
        self.weight.data[:, :, 1, 1] = torch.eye(channels)
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-(9 * channels) ** -0.5, (9 * channels) ** -0.5))

    def kernel(self):  # (c, c, k, k), k = 3 or 5
        w = self.weight.flatten(2)  # (c, c, 9)
        if self.kind == "cv":
            return self.weight
        if self.kind == "cd":
            centre = 2 * w[..., 4:5] - w.sum(-1, keepdim=True)
            return torch.cat([w[..., :4], centre, w[..., 5:]], -1).unflatten(-1, (3, 3))
        if self.kind == "ad":
            return (w - w[..., self.CLOCKWISE] * (torch.arange(9, device=w.device) != 4)).unflatten(-1, (3, 3))
        K = w.new_zeros(*w.shape[:2], 25)
        K[..., self.RING] = w[..., 1:]
        K[..., self.INNER] = -(2 if self.kind == "scd" else 1) * w[..., 1:]
        K[..., 12] = w.sum(-1) if self.kind == "scd" else w[..., 0]
        return K.unflatten(-1, (5, 5))

    def forward(self, x):  # (b, c, h, w) -> same
        K = self.kernel()
        return F.conv2d(x, K, self.bias, padding=K.shape[-1] // 2)


class DifferenceAdapter(nn.Module):
    """One adapter expert of MoE-FFD: down D → c (Xavier, bias 0), the convolution over the g × g patch grid
    and over the CLS as a 1 × 1 map, up c → D (zero, so the expert starts at 0)."""

    def __init__(self, width, kind, grid, channels=ADAPTER_CHANNELS):
        super().__init__()
        self.grid = grid
        self.down, self.up = nn.Linear(width, channels), nn.Linear(channels, width)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.conv = PixelDifferenceConv(channels, kind)

    def forward(self, h):  # (b, N, D) -> (b, N, D)
        z = self.down(h)  # (b, N, c)
        b, c = len(z), z.shape[-1]
        patches = self.conv(z[:, 1:].transpose(1, 2).reshape(b, c, self.grid, self.grid)).flatten(2).transpose(1, 2)
        cls = self.conv(z[:, 0, :, None, None])[:, None, :, 0, 0]  # (b, 1, c)
        return self.up(torch.cat([cls, patches], 1))


class AdapterExperts(nn.Module):
    """MoE-FFD's mixture of adapter experts beside the MLP: x + MLP(h) + expert_e(h), h = ln_2(x), one expert per
    image chosen from its mean token. `balance`: as LoRAExperts."""

    def __init__(self, width, grid, kinds=ADAPTER_KINDS):
        super().__init__()
        self.experts = nn.ModuleList(DifferenceAdapter(width, k, grid) for k in kinds)
        self.gate = NoisyTopOneGate(width, len(kinds))
        self.balance = None

    def forward(self, h):  # (B, N, D) -> (B, N, D)
        choice, balance = self.gate(h.mean(1))
        self.balance = balance if self.training else None
        return dispatch(h, choice, self.experts)

    def hook(self, mlp, args, out):  # forward hook on block.mlp, whose input is h = ln_2(x)
        return out + self(args[0])


# ---------------------------------------------------------------------------------- SideTuning

class WithSideNetwork(DFDHR):
    """The baseline DFDHR with a network of its own, `side`, beside the frozen ViT, trained at lr; its
    forward gives the output of a single view that ran every layer (`plain_output`)."""

    def param_groups(self, *, lr, backbone_lr):
        side = [p for p in self.side.parameters() if p.requires_grad]
        return [*super().param_groups(lr=lr, backbone_lr=backbone_lr), dict(name="side", params=side, lr=lr)]

    def plain_output(self, logits):
        B, cfg, dev = len(logits), self.config, logits.device
        return DFDHROutput(logits=logits, rank_loss=torch.zeros((), device=dev),
                           exit_layer=torch.full((B, 1), cfg.layers, device=dev), kept=[],
                           gates=torch.full((B, 1, cfg.layers, 2, cfg.num_experts), math.nan, device=dev),
                           flops=torch.full((B,), float(estimate_flops(cfg)), device=dev))


class AlexNet(nn.Module):
    """SideTuning's side network: AlexNet's five convolutions and first two max-pools (Krizhevsky et al. 2012,
    torchvision's widths), then, in place of its third pool and its classifier, a global average and a linear
    map to P features: it runs on 32, 64 and 224 px views alike."""

    def __init__(self, features):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.proj = nn.Linear(256, features)

    def forward(self, x):  # (B, 3, S, S) -> (B, P)
        return self.proj(self.features(x).mean((2, 3)))


class AlphaBlend(nn.Module):
    """r = α·base + (1 - α)·side(x), α = σ(a), a = 0 at init (Side-tuning's `Alpha` merge operator)."""

    def __init__(self, features):
        super().__init__()
        self.net = AlexNet(features)
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, base, x):  # (B, P), (B, 3, S, S) -> (B, P)
        alpha = torch.sigmoid(self.a)
        return alpha * base + (1 - alpha) * self.net(x)


class SideTuning(WithSideNetwork):
    """SideTuning [27]: the frozen ViT's projected CLS and the side AlexNet's features, α-blended, into the head."""

    def __init__(self, config, backbone=None):
        super().__init__(config, backbone)
        self.side = AlphaBlend(self.config.embed_dim)

    def forward(self, x):  # (B, 3, S, S), S = view size
        view = original_image(x, self.config.view_size)
        base = self.backbone.project(self.encode(view, self.original_routers).cls)  # (B, P)
        return self.plain_output(self.head(self.side(base, view)))

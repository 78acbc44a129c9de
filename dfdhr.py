"""The DFD-HR model: multi-scale split fusion around a routed CLIP ViT (SPEC §2-§7).

A 448 face crop is seen twice by one shared backbone (SPEC §2): as a whole ("global" view,
bicubic resize to 224) and as its 2×2 split ("local" views, four 224 crops stacked on the batch
axis). The global view runs first; its final CLS is the query whose cosine similarity ranks the
local views' tokens for the Spearman rank loss (§4). In every layer a mixture of adapters follows
attention and MLP (§5); in the routed layers K..L-1 a layer judge may end the sample's pass
(§3) and a token judge keeps the top tokens (§4). The four split CLS are pooled by a learned
query (4-head attention), concatenated with the global CLS and classified.

At inference an exited sample and a dropped token cost nothing: routed layers run on the active
rows and kept tokens only. In training every row runs every layer, since the straight-through
update H' = p·Layer(H) + (1-p)·H needs Layer(H) for the judge's gradient.

Letters: B batch, V views (1 global + 4 splits), L layers, N tokens, K kept tokens, D width,
E experts.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from routing import (LayerJudge, MixtureOfAdapters, TokenJudge, gumbel_sigmoid, num_kept, routed_update,
                     run_on_selected, spearman_loss, still_active)
from vit import VisionTransformer


@dataclass(frozen=True)
class DFDHRConfig:
    # Backbone, SPEC §1 (CLIP ViT-L/14). Replaced by the sizes of a loaded checkpoint.
    view_size: int = 224          # backbone input; each view is this big (CLIP)
    patch_size: int = 14          # ViT-L/14
    width: int = 1024             # D
    layers: int = 24              # L
    heads: int = 16               # ViT-L/14: 1024 / 64
    embed_dim: int = 768          # CLIP projection output
    # Multi-Scale Fusion, SPEC §2.
    image_size: int = 448         # input face crop, split 2×2 into view_size crops (paper)
    multi_scale: bool = True      # False: global view only (the baseline)
    pool_heads: int = 4           # heads of the query pooling of the split CLS (released code)
    route_global: bool = True     # Tab. B "Split+Origin": routers also in the global branch
    share_routers: bool = True    # Tab. B "w.i. shared": one set of judges and experts for both branches
    # Early Layer Pruning, SPEC §3.
    layer_pruning: bool = True
    first_routed_layer: int = 20  # K: layers K..L-1 are routed (paper: the last four)
    judge_hidden: int = 64        # layer judge Linear(D, 64) -> ReLU -> Linear(64, 1) (released code)
    gumbel_tau: float = 1.0       # τ of the Gumbel-sigmoid (released code)
    # Token Selection, SPEC §4.
    token_selection: bool = True
    keep_ratio: float = 0.75      # 1 - R%: k = ⌊0.75·257⌋ = 192 (paper)
    cls_eligible: bool = True     # Tab. C(a) "CLS+Patch": CLS is scored like any token
    post_weight: bool = True      # Tab. C(b): weight kept tokens by 1 + softmax after the block
    share_token_judges: bool = False  # Tab. C(c) "w.i. shared": one token judge for all routed layers
    rank_weight: float = 0.1      # λ of L = CE + λ·L_rank (paper)
    rank_temperature: float = 0.1  # soft-rank temperature, in units of the scores' std (routing.py)
    # Token-level Expert Routing, SPEC §5.
    expert_routing: bool = True
    num_experts: int = 4          # E (paper)
    adapter_rank: int = 256       # adapter bottleneck D -> 256 -> D (released code)
    # Training, SPEC §6.
    freeze_backbone: bool = True  # released code; False = full fine-tuning (paper's baseline, lr 1e-6)
    num_classes: int = 2          # real, fake

    def __post_init__(self):
        problems = []
        if not 0 < self.keep_ratio <= 1:
            problems.append(f"keep_ratio={self.keep_ratio} must be in (0, 1]")
        if not 0 <= self.first_routed_layer < self.layers:
            problems.append(f"first_routed_layer={self.first_routed_layer} must be in [0, layers={self.layers})")
        if self.view_size % self.patch_size:
            problems.append(f"view_size={self.view_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.multi_scale and self.image_size != 2 * self.view_size:
            problems.append(f"multi_scale needs image_size = 2·view_size, got {self.image_size} and {self.view_size}")
        if self.embed_dim % self.pool_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by pool_heads={self.pool_heads}")
        if min(self.num_experts, self.adapter_rank, self.judge_hidden, self.gumbel_tau, self.rank_temperature) <= 0:
            problems.append("num_experts, adapter_rank, judge_hidden, gumbel_tau and rank_temperature must be > 0")
        if problems:
            raise ValueError("invalid DFDHRConfig: " + "; ".join(problems))

    @property
    def num_tokens(self):
        return (self.view_size // self.patch_size) ** 2 + 1  # N = 257 for ViT-L/14 at 224


PRESETS = {
    "paper": DFDHRConfig(),
    # A backbone small enough to train from scratch on 2 CPU cores (no CLIP weights exist there):
    # 64 px views of 8 px patches (N = 65), 8 layers of width 128, the last four routed as in the paper.
    "small": DFDHRConfig(view_size=64, patch_size=8, width=128, layers=8, heads=4, embed_dim=128, image_size=128,
                         first_routed_layer=4, judge_hidden=32, adapter_rank=32, freeze_backbone=False),
}

# Each row of the paper's ablations as a change of the config.
ABLATIONS = {
    # Main ablation (SPEC §8): the baseline is full fine-tuning of the global view alone.
    "baseline": dict(multi_scale=False, layer_pruning=False, token_selection=False, expert_routing=False,
                     freeze_backbone=False),
    "+layer_pruning": dict(multi_scale=False, token_selection=False, expert_routing=False),
    "+token_selection": dict(multi_scale=False, expert_routing=False),
    "+expert_routing": dict(multi_scale=False),
    "fusion_only": dict(layer_pruning=False, token_selection=False, expert_routing=False),
    "full": dict(),
    # Tab. B
    "split_only": dict(route_global=False),
    "separate_routers": dict(share_routers=False),
    # Tab. C
    "patch_only": dict(cls_eligible=False),
    "pre_weight": dict(post_weight=False),
    "shared_token_judges": dict(share_token_judges=True),
}


def make_config(preset="paper", ablation="full", **overrides):
    config = replace(PRESETS[preset], **ABLATIONS[ablation])
    if not config.multi_scale:
        overrides = {"image_size": config.view_size, **overrides}  # the baseline sees the face at 224
    return replace(config, **overrides)


# ---------------------------------------------------------------------------------------------
# Computing cost (supp. "Computing Cost Estimation")
# ---------------------------------------------------------------------------------------------

def layer_flops(n, d, m):
    """One block on n tokens: 4nd² (q, k, v, out) + 2n²d (QKᵀ, AV) + 2ndm (MLP). Multiply-adds."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def estimate_flops(config, exit_layer=None):
    """FLOPs of one view, the supplementary's formula plus the experts' cost.

    K·(4nd²+2n²d+2ndm) + (T-K)·(4n̂d²+2n̂²d+2n̂dm), with n̂ = ⌊keep·n⌋ after token selection and T
    the exit layer (a number or a tensor of them; default L). Like the paper, a "FLOP" here is a
    multiply-add (a FLOP counter reports twice as many). Each mixture of adapters costs
    E·2dr (adapters) + 2dE (gate, expert biases) per token, two per layer. Omitted, as in the
    paper: patch embedding, layer norms, softmax, element-wise ops, judges, pooling and head.
    """
    n, d, m, K = config.num_tokens, config.width, 4 * config.width, config.first_routed_layer
    T = config.layers if exit_layer is None else exit_layer
    n_hat = num_kept(n, config.keep_ratio) if config.token_selection else n
    experts = 2 * (config.num_experts * 2 * d * config.adapter_rank + 2 * d * config.num_experts) \
        if config.expert_routing else 0
    return K * (layer_flops(n, d, m) + n * experts) + (T - K) * (layer_flops(n_hat, d, m) + n_hat * experts)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Routers(nn.Module):
    """One branch's routers: layer and token judges for the routed layers, experts for all layers."""

    def __init__(self, config):
        super().__init__()
        D, R = config.width, config.layers - config.first_routed_layer
        self.layer_judges = nn.ModuleList(LayerJudge(dim=D, hidden=config.judge_hidden) for _ in range(R)) \
            if config.layer_pruning else None
        if config.token_selection:
            judges = [TokenJudge(dim=D)] * R if config.share_token_judges else [TokenJudge(dim=D) for _ in range(R)]
            self.token_judges = nn.ModuleList(judges)
        else:
            self.token_judges = None
        self.experts = nn.ModuleList(  # per layer: after attention, after MLP
            nn.ModuleList(MixtureOfAdapters(dim=D, num_experts=config.num_experts, rank=config.adapter_rank)
                          for _ in range(2)) for _ in range(config.layers)) if config.expert_routing else None


class Encoded(NamedTuple):
    cls: torch.Tensor         # (B, D) final CLS, before ln_post
    exit_layer: torch.Tensor  # (B,) number of blocks run
    kept: list                # per routed layer (B, K) kept token indices, -1 where the sample had exited
    gates: torch.Tensor       # (B, L, 2, E) mean gate weight per layer and adapter, NaN where skipped
    rank_loss: torch.Tensor   # () mean over routed layers, 0 without a query
    flops: torch.Tensor       # (B,) multiply-adds spent (estimate_flops at the exit layer)


class DFDHROutput(NamedTuple):
    logits: torch.Tensor      # (B, 2)
    rank_loss: torch.Tensor   # () L_rank, averaged over routed layers
    exit_layer: torch.Tensor  # (B, V) blocks run per view; V = 1 (global) + 4 (splits, row-major)
    kept: list                # per routed layer (B, V, K) kept token indices, -1 where exited
    gates: torch.Tensor       # (B, V, L, 2, E) mean expert gate weights, NaN where skipped
    flops: torch.Tensor       # (B,) multiply-adds spent over all views (estimate_flops at each exit)


class Loss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    rank: torch.Tensor


def dfdhr_loss(out, labels, config):
    """L = CE(logits, label) + λ·L_rank (SPEC §6), the one place the losses are weighted."""
    ce = F.cross_entropy(out.logits.float(), labels)
    return Loss(ce + config.rank_weight * out.rank_loss, ce, out.rank_loss)


def split_2x2(x):  # (B, 3, 2v, 2v) -> (4B, 3, v, v), the four crops of a sample adjacent, row-major
    B, C, S, _ = x.shape
    v = S // 2
    return x.view(B, C, 2, v, 2, v).permute(0, 2, 4, 1, 3, 5).reshape(B * 4, C, v, v)


class DFDHR(nn.Module):
    def __init__(self, config, backbone=None):
        """`backbone`: a loaded CLIP ViT (vit.load_clip); the config's backbone sizes are taken from it."""
        super().__init__()
        if backbone is None:
            backbone = VisionTransformer(image_size=config.view_size, patch_size=config.patch_size,
                                         width=config.width, layers=config.layers, heads=config.heads,
                                         output_dim=config.embed_dim)
        else:
            config = replace(config, view_size=backbone.image_size, patch_size=backbone.patch_size,
                             width=backbone.width, layers=len(backbone.blocks), heads=backbone.heads,
                             embed_dim=backbone.output_dim,
                             image_size=2 * backbone.image_size if config.multi_scale else backbone.image_size)
        self.config = config
        self.backbone = backbone.requires_grad_(not config.freeze_backbone)
        any_routing = config.layer_pruning or config.token_selection or config.expert_routing
        branches = 1 if config.share_routers or not (config.multi_scale and config.route_global) else 2
        self.routers = nn.ModuleList(Routers(config) for _ in range(branches)) if any_routing else None
        C = config.embed_dim
        if config.multi_scale:
            self.pool_query = nn.Parameter(torch.randn(1, 1, C) * C ** -0.5)
            self.pool = nn.MultiheadAttention(C, config.pool_heads, batch_first=True)
        self.head = nn.Linear(2 * C if config.multi_scale else C, config.num_classes)

    def param_groups(self, *, lr, backbone_lr):
        """Parameters by role, each an optimizer group: backbone, layer_judges, token_judges, experts, fusion, head."""
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            role = ("backbone" if name.startswith("backbone.") else
                    name.split(".")[2] if name.startswith("routers.") else
                    "fusion" if name.startswith("pool") else "head")
            groups.setdefault(role, []).append(p)
        return [dict(name=role, params=ps, lr=backbone_lr if role == "backbone" else lr) for role, ps in groups.items()]

    def _block(self, i, x, experts, gate_sink):
        """Block i with a mixture of adapters after attention and after the MLP (SPEC §5)."""
        block = self.backbone.blocks[i]
        a = block.attn(block.ln_1(x))
        if experts is not None:
            a, g_attn = experts[0](a)
        x = x + a
        m = block.mlp(block.ln_2(x))
        if experts is not None:
            m, g_mlp = experts[1](m)
            gate_sink.append(torch.stack([g_attn.mean(1), g_mlp.mean(1)], 1).detach())  # (b, 2, E)
        return x + m

    def encode(self, x, routers, query=None):
        """One view through the routed backbone: (B, 3, v, v) -> Encoded. `query` (B, D) enables L_rank."""
        cfg, L, K = self.config, self.config.layers, self.config.first_routed_layer
        h = self.backbone.embed(x)  # (B, N, D)
        B = h.shape[0]
        active = h.new_ones(B)  # running product of the layer gates: 1 while the sample runs
        exit_layer = torch.full((B,), L, device=h.device)
        gates = h.new_full((B, L, 2, cfg.num_experts), math.nan)
        kept, rank_losses = [], []
        for i in range(L):
            r = i - K  # index among routed layers, negative before K
            experts = routers.experts[i] if routers is not None and routers.experts is not None else None
            rows = None  # inference: the rows still active, the only ones that run
            if r >= 0 and routers is not None and routers.layer_judges is not None:
                p = gumbel_sigmoid(routers.layer_judges[r](h[:, 0]), tau=cfg.gumbel_tau, training=self.training)
                active = still_active(active, p)
                exit_layer = torch.where((exit_layer == L) & (active.detach() < 0.5), i, exit_layer)
                if not self.training:
                    rows = active.nonzero().squeeze(1)
            hr = h if rows is None else h[rows]  # (b, N, D)
            sink = []
            if r >= 0 and routers is not None and routers.token_judges is not None:
                scores = routers.token_judges[r](hr)  # (b, N)
                if query is not None and self.training:
                    target = F.cosine_similarity(hr.float(), query[:, None].float(), dim=-1)  # (B, N)
                    rank_losses.append(spearman_loss(scores.float(), target, temperature=cfg.rank_temperature))
                out, idx = run_on_selected(hr, scores, lambda t: self._block(i, t, experts, sink),
                                           keep=cfg.keep_ratio, cls_eligible=cfg.cls_eligible,
                                           post_weight=cfg.post_weight)
                kept.append(idx if rows is None else idx.new_full((B, idx.shape[1]), -1).index_copy(0, rows, idx))
            else:
                out = self._block(i, hr, experts, sink)
            if sink:
                gates[:, i] = sink[0] if rows is None else gates[:, i].index_copy(0, rows, sink[0])
            if rows is not None:
                h = h.index_copy(0, rows, out.to(h.dtype))
            elif r >= 0 and routers is not None and routers.layer_judges is not None:
                h = routed_update(h, out, active)
            else:
                h = out
        rank_loss = torch.stack(rank_losses).mean() if rank_losses else h.new_zeros(()).float()
        spent = cfg if routers is not None else replace(cfg, token_selection=False, expert_routing=False)
        return Encoded(h[:, 0], exit_layer, kept, gates, rank_loss, estimate_flops(spent, exit_layer))

    def forward(self, x):  # (B, 3, S, S) CLIP-normalised face crops, S = image_size
        cfg = self.config
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} input, got {tuple(x.shape[-2:])}")
        B, v = x.shape[0], cfg.view_size
        view = F.interpolate(x, size=(v, v), mode="bicubic", antialias=True, align_corners=False) \
            if cfg.image_size != v else x
        routers = self.routers
        glob = self.encode(view, routers[0] if routers is not None and cfg.route_global else None)
        feats, views = [self.backbone.head(glob.cls)], [glob]  # (B, C)
        if cfg.multi_scale:
            query = glob.cls.detach().repeat_interleave(4, 0)  # (4B, D) the global query, one per split
            local = self.encode(split_2x2(x), routers[-1] if routers is not None else None, query)
            tokens = self.backbone.head(local.cls).view(B, 4, -1)  # (B, 4, C)
            query_token = self.pool_query.repeat(B, 1, 1).to(tokens.dtype)  # (B, 1, C)
            pooled = self.pool(query_token, tokens, tokens, need_weights=False)[0]  # (B, 1, C)
            feats.append(pooled[:, 0])
            views.append(local)
        logits = self.head(torch.cat(feats, -1))  # (B, 2)

        def per_view(t):  # global (B, ...) and local (4B, ...) -> (B, V, ...)
            return torch.cat([t[:B, None]] + ([t[B:].view(B, 4, *t.shape[1:])] if cfg.multi_scale else []), 1)

        kept = []
        if cfg.token_selection:  # a view without routers (Tab. B "Split") keeps every token: -1
            none = [torch.full((len(e.cls), num_kept(cfg.num_tokens, cfg.keep_ratio)), -1, device=x.device)
                    for e in views]
            kept = [per_view(torch.cat(ks)) for ks in
                    zip(*(e.kept or [n] * (cfg.layers - cfg.first_routed_layer) for e, n in zip(views, none)))]
        return DFDHROutput(logits=logits, rank_loss=views[-1].rank_loss,
                           exit_layer=per_view(torch.cat([e.exit_layer for e in views])), kept=kept,
                           gates=per_view(torch.cat([e.gates for e in views])),
                           flops=per_view(torch.cat([e.flops for e in views])).sum(1).float())

    @torch.no_grad()
    def predict(self, x):
        """Fake probability (softmax[:, 1]) and the model's full output, computed in eval mode."""
        was_training = self.training
        out = self.eval()(x)
        self.train(was_training)
        return out.logits.float().softmax(-1)[:, 1], out

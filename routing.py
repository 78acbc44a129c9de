"""The three routers of DFD-HR (the paper's method section and figure): over layers, tokens, experts.

  - Early Layer Pruning: a layer judge per routed layer reads the CLS token and decides, per
    sample, whether the layer runs; training uses a straight-through Gumbel-sigmoid and the
    paper's residual update H_{i+1} = p·Layer_i(H_i) + (1−p)·H_i.
  - Token Selection: a token judge scores the tokens, the block runs on the top k only, its
    outputs are post-weighted by 1 + softmax of their scores (supp. Tab. C(b)), CLS may compete
    like a patch (supp. Tab. C(a)); the judge is trained by a Spearman rank loss computed with a
    differentiable soft rank.
  - Token-level Expert Routing: a dense mixture of four bottleneck adapters with a per-token
    softmax gate, noisy in training (Eq. 13).
  - What the paper compares them with (supp. Sec. B): the soft gate of Tab. 8 "w.o. Gumbel", the
    score of Tab. 8 "Learn.+Weight", and Tab. 5's PCA (LongCLIP), FastV's ranking and SparseViT's
    sparse attention in place of Token Selection.

The model (dfdhr.py) places these pieces in the ViT; this module depends on torch only.

Letters as in dfdhr.py's glossary: B batch, N tokens, n̂ kept tokens, D width, E experts, r adapter rank.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- layers

def gumbel_sigmoid(logits, *, tau=1.0, training=True, draw="logistic"):
    """Straight-through Gumbel-sigmoid gate of Early Layer Pruning, any shape.

    Training: p_soft = σ((logit + g)/τ), p_hard = 1[p_soft > 0.5], p = p_hard − sg(p_soft) + p_soft
    (forward value p_hard, gradient of p_soft). Not training: p = 1[σ(logit) > 0.5].
    draw="logistic": g = log U − log(1 − U), the two-class Gumbel-softmax noise, so the gate fires
    with probability σ(logit), the same rule inference thresholds. draw="gumbel": the released
    code's single draw g = −log(−log U), which fires with 1 − exp(−e^logit) (README, "Where we differ").
    """
    if not training:
        return (torch.sigmoid(logits) > 0.5).to(logits.dtype)
    u = torch.rand_like(logits)
    g = torch.log(u) - torch.log1p(-u) if draw == "logistic" else -torch.log(-torch.log(u))  # U = 0: ±inf, harmless
    p_soft = torch.sigmoid((logits + g) / tau)
    p_hard = (p_soft > 0.5).to(p_soft.dtype)
    return p_hard - p_soft.detach() + p_soft


class LayerJudge(nn.Module):
    """Layer judge: Linear(D, 64, no bias) → ReLU → Linear(64, 1, no bias) on CLS (released code)."""

    def __init__(self, *, dim, hidden=64, init_gain=1.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=False)
        # Non-negative output weights on ReLU features: logit ≥ 0, so every sample starts by running
        # every layer, rather than half of the network being cut off by a random sign. In training
        # the gate fires with σ(logit) only; `init_gain` scales the logits so that it starts near 1.
        # init_gain = 0: nn.Linear's own initialisation, random signs, as the released code's.
        if init_gain > 0:
            with torch.no_grad():
                self.fc2.weight.abs_().mul_(init_gain)

    def forward(self, cls):  # (B, D) -> (B,) logits
        return self.fc2(F.relu(self.fc1(cls))).squeeze(-1)


def judges(make, n, *, shared):
    """n judges for the routed layers, each made by `make()`: one shared by all (supp. Tab. C(c), Tab. 8
    "w.i. Shared"), or one each."""
    return nn.ModuleList([make()] * n if shared else [make() for _ in range(n)])


def still_active(active, p):
    """Running product of the gates (B,): a sample that exits (0) never re-enters."""
    return active * p


def routed_update(h_in, h_out, p):
    """The paper's update H_{i+1} = p·Layer_i(H_i) + (1 − p)·H_i, with p (B,), h (B, N, D).

    With a hard p each row is exactly h_in or h_out, and dH_{i+1}/dp = Layer_i(H_i) − H_i reaches
    the judge in every row, also where p = 0: so in training the block runs on all rows.
    """
    p = p[:, None, None]  # (B, 1, 1)
    return p * h_out + (1 - p) * h_in


# ----------------------------------------------------------------------------- tokens

class TokenJudge(nn.Module):
    """Token judge: Linear(D, 1, no bias), one score per token, CLS included (supp. Tab. C(a))."""

    def __init__(self, *, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1, bias=False)

    def forward(self, x):  # (B, N, D) -> (B, N) scores
        return self.proj(x).squeeze(-1)


def num_kept(n_tokens, keep):
    """n̂ = max(1, ⌊keep · N⌋): 192 of 257 tokens at keep = 0.75 (the paper's R% = 25 %)."""
    return max(1, math.floor(keep * n_tokens))


def select_tokens(scores, k, *, cls_eligible=True):
    """Indices (B, k) of the k best-scored tokens of each row (k = n̂), in ascending (original) order.

    cls_eligible=True: CLS competes like a patch (Tab. C(a), default). False: CLS (token 0) is
    always kept and the other k − 1 are the best of tokens 1..N−1 (Tab. C(a) "Patch" row).
    """
    if cls_eligible:
        idx = scores.topk(k, dim=-1).indices  # (B, k)
    else:
        rest = scores[:, 1:].topk(k - 1, dim=-1).indices + 1  # (B, k−1)
        idx = torch.cat([torch.zeros_like(rest[:, :1]), rest], dim=-1)  # (B, k)
    return idx.sort(dim=-1).values


def gather_tokens(x, idx):
    """x (B, N, D), idx (B, n̂) -> (B, n̂, D), batched (no loop over samples)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x, idx, y):
    """A copy of x (B, N, D) with the rows idx (B, n̂) replaced by y (B, n̂, D); out of place."""
    return x.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), y)


class Selected(NamedTuple):
    out: torch.Tensor  # (B, N, D) the block's weighted outputs on kept tokens, input elsewhere
    idx: torch.Tensor  # (B, n̂) kept tokens, ascending
    aux: object        # what the block returned besides its tokens (the expert gates)


def run_on_selected(x, scores, block, *, keep, cls_eligible=True, post_weight=True, weighted=True):
    """Token Selection: run `block` on the top ⌊keep·N⌋ tokens of each row only.

    block: a callable (B, n̂, D) -> ((B, n̂, D), aux), e.g. a whole residual block and its expert
    gates. The kept tokens are weighted by w = 1 + softmax over their n̂ scores, after the block
    (post_weight=True, supp. Tab. C(b)) or before it; weighted=False: not at all (FastV, Tab. 5).
    Unkept tokens pass through unchanged.
    """
    idx = select_tokens(scores, num_kept(x.shape[1], keep), cls_eligible=cls_eligible)  # (B, n̂)
    x_kept = gather_tokens(x, idx)  # (B, n̂, D)
    w = 1 + scores.gather(1, idx).softmax(dim=-1)[..., None]  # (B, n̂, 1)
    if not weighted:
        y, aux = block(x_kept)
    elif post_weight:
        y, aux = block(x_kept)
        y = y * w
    else:
        y, aux = block(x_kept * w)
    return Selected(scatter_tokens(x, idx, y), idx, aux)


# ----------------------------------------------------------------------------- rank loss

def standardised(x):
    """(x − mean) / (std + 1e-6) over the last axis (..., N): scores on a common scale."""
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


def soft_rank(x, *, temperature):
    """Differentiable ranks (..., N) -> (..., N), 1 for the smallest, as scipy's rankdata.

    z = (x − mean) / (std + 1e-6) per row, so t is in units of the row's std and scaling the
    scores cannot lower the loss; rank_i = 0.5 + Σ_j σ((z_i − z_j) / t). The j = i term is 0.5,
    so as t → 0 the ranks tend to 1..N, and a tied pair counts 0.5 each way (scipy's 'average').
    O(N²) per row: 66k pairs at N = 257.
    """
    z = standardised(x)  # (..., N)
    pairs = torch.sigmoid((z[..., :, None] - z[..., None, :]) / temperature)  # (..., N, N)
    return 0.5 + pairs.sum(-1)


@torch.no_grad()
def exact_rank(x):
    """Average ranks with ties (..., N), 1 for the smallest, as scipy's rankdata; no gradient."""
    above = (x[..., :, None] > x[..., None, :]).to(x.dtype)  # (..., N, N)
    tied = (x[..., :, None] == x[..., None, :]).to(x.dtype)  # diagonal included
    return 0.5 + above.sum(-1) + 0.5 * tied.sum(-1)


def spearman_corr(scores, target, *, temperature):
    """Spearman coefficient per row, (..., N) -> (...,): the Pearson correlation of the ranks of
    `scores` and the exact average ranks of `target` (no gradient flows into the target).

    temperature: soft ranks of the scores (a gradient reaches them); None: exact ranks, as the
    released code's argsort, which gives the scores no gradient. A constant row gives 0.
    """
    a = exact_rank(scores) if temperature is None else soft_rank(scores, temperature=temperature)
    b = exact_rank(target.detach())
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def spearman_loss(scores, target, *, temperature):
    """L_rank = mean over rows of 1 − Spearman(scores, target); both (B, N)."""
    return (1 - spearman_corr(scores, target, temperature=temperature)).mean()


# ----------------------------------------------------------------------------- experts

class MoAOutput(NamedTuple):
    out: torch.Tensor    # (..., D) x + Σ_e g_e · Adapter_e(x)
    gates: torch.Tensor  # (..., E) per-token expert weights, sum to 1 (supp. Tab. D)


class MixtureOfAdapters(nn.Module):
    """Token-level Expert Routing: MoA(X) = X + Σ_e G_e(X) · Adapter_e(X).

    Adapter_e = Linear(D, r) → GELU → Linear(r, D); dense, all E experts run on every token.
    Gate: Linear(D, E) with bias, softmax per token; in training (with `noise`) the noisy gate of
    Eq. 13, G = softmax(ℓ + ε ⊙ softplus(ℓ)), ε ~ N(0, I); otherwise softmax(ℓ).

    The E adapters run as two matmuls instead of a loop over experts: the up-projections are
    one Linear(D, E·r); since Σ_e g_e (h_e W2_e + b2_e) = [g ⊙ h] W2_cat + g b2, each expert's
    hidden block is scaled by its gate and all go through one (E·r, D) down-projection.
    """

    def __init__(self, *, dim, num_experts=4, adapter_rank=256, noise=True):
        super().__init__()
        self.num_experts, self.adapter_rank, self.noise = num_experts, adapter_rank, noise
        self.gate = nn.Linear(dim, num_experts)
        self.up = nn.Linear(dim, num_experts * adapter_rank)  # expert e: rows e·r .. (e+1)·r − 1
        # Small but not zero: a zero down-projection would give the gate no gradient at step one.
        self.down_weight = nn.Parameter(torch.randn(num_experts, adapter_rank, dim) * 1e-3)  # (E, r, D)
        self.down_bias = nn.Parameter(torch.zeros(num_experts, dim))  # (E, D)

    def forward(self, x):  # x (..., D)
        logits = self.gate(x)  # (..., E)
        if self.training and self.noise:
            logits = logits + torch.randn_like(logits) * F.softplus(logits)
        gates = logits.softmax(dim=-1)  # (..., E)
        h = F.gelu(self.up(x)).unflatten(-1, (self.num_experts, self.adapter_rank))  # (..., E, r)
        h = (h * gates[..., None]).flatten(-2)  # (..., E·r)
        out = x + h @ self.down_weight.flatten(0, 1) + gates @ self.down_bias  # (..., D)
        return MoAOutput(out, gates)


# ----------------------------------------------------------------------------- what the paper compares them with

# The alternatives of supp. Sec. B, each as its own paper defines it (dfdhr.py switches them on):
# Tab. 8 "w.o. Gumbel" for the layer gate, Tab. 8 "Learn.+Weight" for the token score, and Tab. 5's
# three replacements of Token Selection in the routed layers: "PCA", "FastV", "Sparse Attention".

def soft_gate(logits, *, tau=1.0, training=True):
    """Tab. 8 "w.o. Gumbel": in training the soft gate p = σ(logit/τ), no noise and no rounding, so
    the update p·Layer(H) + (1 − p)·H mixes the two; at inference the hard rule 1[σ(logit) > 0.5]."""
    return torch.sigmoid(logits / tau) if training else gumbel_sigmoid(logits, training=False)


def judge_and_cosine(scores, tokens, query):
    """Tab. 8 "Learn.+Weight": the average of the token judge's scores and the tokens' cosine
    similarity to the global query, each standardised over the tokens first (a judge's scores are
    unbounded, a cosine lies in [−1, 1]). scores (B, N), tokens (B, N, D), query (B, D) -> (B, N)."""
    return (standardised(scores) + standardised(F.cosine_similarity(tokens, query[:, None], dim=-1))) / 2


def principal_components(x, k):
    """Tab. 5 "PCA" as LongCLIP applies it (Zhang et al., ECCV 2024, its `PCA`): centre, keep the top k
    principal components, project back and add the mean. LongCLIP's samples are a batch of image
    features; here they are each image's N tokens, so an image's output does not depend on its batch:
    (B, N, D) -> (B, N, D). The principal directions come from an SVD without gradient (the SVD's
    gradient is unstable where singular values repeat); the projection passes it to every token.
    Cost: 2·N·D·k multiply-adds, and the SVD."""
    mean = x.mean(1, keepdim=True)  # (B, 1, D)
    centred = x - mean
    with torch.no_grad():
        at_least_fp32 = centred.to(torch.promote_types(centred.dtype, torch.float32))  # the SVD has no bf16 kernel
        V = torch.linalg.svd(at_least_fp32, full_matrices=False).Vh[:, :k].to(x.dtype)  # (B, k, D)
    return centred @ V.transpose(1, 2) @ V + mean  # (B, N, k) -> (B, N, D)


def attention_received(attn, x):
    """FastV's ranking (Chen et al., ECCV 2024): the attention each token receives in a layer, averaged
    over heads, in the row of the token that reads the sequence out (an LLM's last token; a ViT's
    CLS). attn: a vit.Attention; x (B, N, D) its input (after ln_1) -> (B, N). Only CLS's query and the
    keys are computed (q, k, v are the rows of OpenAI's fused projection): D² + N·D² + N·D multiply-adds."""
    D, heads = x.shape[-1], attn.heads
    W, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(x[:, :1], W[:D], b[:D]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, 1, D/H)
    k = F.linear(x, W[D:2 * D], b[D:2 * D]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, D/H)
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, 1, N)
    return a.softmax(-1, dtype=torch.float32)[:, :, 0].mean(1)


def sparse_attention(attn, x, sparse_size):
    """Tab. 5 "Sparse Attention", SparseViT's (Su et al., AAAI 2025, its `alter_sparse`): the grid × grid
    patches fall into (grid/s)² groups of s × s patches taken at a stride of grid/s (s = sparse_size),
    patch (r, c) in group (r mod stride, c mod stride), and attend within their group only. SparseViT
    has no CLS; here each patch also attends to CLS, and CLS, which the head reads, to every token.
    attn: a vit.Attention; x (B, N, D) its input (after ln_1) -> (B, N, D)."""
    q, k, v = attn.split_heads(x)  # 3 x (B, H, N, d)
    B, H, N, d = q.shape
    s = sparse_size
    stride = math.isqrt(N - 1) // s

    def grouped(t):  # patches (B, H, N-1, d), row r = a·stride + b -> (B, H, G, s², d), G = stride² groups (b_r, b_c)
        t = t[:, :, 1:].reshape(B, H, s, stride, s, stride, d)  # (B, H, a_r, b_r, a_c, b_c, d)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, H, -1, s * s, d)

    def with_cls(t):  # (B, H, N, d) -> (B, H, G, 1 + s², d): CLS first in every group
        return torch.cat([t[:, :, None, :1].expand(-1, -1, stride * stride, -1, -1), grouped(t)], 3)

    patches = F.scaled_dot_product_attention(grouped(q), with_cls(k), with_cls(v))  # (B, H, G, s², d)
    patches = patches.reshape(B, H, stride, stride, s, s, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, N - 1, d)
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, H, 1, d)
    return attn.merge_heads(torch.cat([cls, patches], 2))

"""The three routers of DFD-HR: over layers, over tokens, over experts.

  - Early Layer Pruning (SPEC §3): a layer judge per routed layer reads the CLS token and
    decides, per sample, whether the layer runs; training uses a straight-through
    Gumbel-sigmoid and the paper's residual update H_{i+1} = p·Layer_i(H_i) + (1−p)·H_i.
  - Token Selection (SPEC §4): a token judge scores the tokens, the block runs on the top k
    only, its outputs are post-weighted by 1 + softmax of their scores (Tab. C(b)), CLS may
    compete like a patch (Tab. C(a)); the judge is trained by a Spearman rank loss computed
    with a differentiable soft rank (the released code's argsort has no gradient).
  - Token-level Expert Routing (SPEC §5): a dense mixture of four bottleneck adapters with a
    per-token softmax gate, noisy in training (paper Eq. 13).

The model (dfdhr.py) places these pieces in the ViT; this module depends on torch only.

Letters: B batch, N tokens, K kept tokens, D width, E experts, R adapter rank.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Default temperature of the soft rank, in units of the row's standard deviation (see soft_rank).
# The gradient of σ(d/t) lives on pairs less than a few t apart. Standardized N = 257 scores lie
# ~0.01 apart, so at t = 0.1 every token is pulled by its tens of neighbours in rank order; at
# t = 1e-4 only the handful of near-tied pairs of a row carry a gradient, each of size ~1/t
# (measured: 20 plain gradient steps on random scores raise the exact Spearman coefficient from
# ~0 to ~0.95 at t = 0.1, to ~0.1 at t = 1e-4). The price: at t = 0.1 the soft coefficient is
# off the exact one by up to ~5e-3 (N = 257, measured), which only matters for reporting.
RANK_TEMPERATURE = 0.1


# ----------------------------------------------------------------------------- layers (§3)

def gumbel_sigmoid(logits, *, tau=1.0, training=True):
    """Straight-through Gumbel-sigmoid gate of Early Layer Pruning (SPEC §3), any shape.

    The gate chooses between two classes, run and exit, with logits (logit, 0). Gumbel-softmax
    over two classes adds a Gumbel draw to each logit; only their difference matters, and the
    difference of two Gumbels is logistic noise g = log U − log(1 − U), U ~ U(0, 1). Training:
    p_soft = σ((logit + g)/τ), p_hard = 1[p_soft > 0.5], p = p_hard − sg(p_soft) + p_soft: the
    forward value is p_hard, the gradient that of p_soft. The value is exactly 0 or 1: −a + a =
    0, and for p_hard = 1, p_soft lies in (0.5, 1] so 1 − p_soft is exact (Sterbenz) and adding
    p_soft back gives exactly 1.

    How often the gate fires: p_hard = 1 ⇔ logit + g > 0, so P(p = 1) = σ(logit) for every
    τ > 0, and the inference rule σ(logit) > 0.5 keeps the more likely choice.
    SPEC §3 (after the released code) writes a single draw g = −log(−log U); then
    P(p = 1) = 1 − exp(−eˡᵒᵍⁱᵗ), 0.63 at logit 0 where inference never fires: a train/test
    mismatch that left our models exiting at the first routed layer at inference while they
    trained with deeper passes. The two-class draw removes it.

    Not training: p = 1[σ(logit) > 0.5], deterministic.
    """
    if not training:
        return (torch.sigmoid(logits) > 0.5).to(logits.dtype)
    u = torch.rand_like(logits)
    g = torch.log(u) - torch.log1p(-u)  # logistic: Gumbel(run) − Gumbel(exit); U = 0 gives −inf, harmless
    p_soft = torch.sigmoid((logits + g) / tau)
    p_hard = (p_soft > 0.5).to(p_soft.dtype)
    return p_hard - p_soft.detach() + p_soft


class LayerJudge(nn.Module):
    """Layer judge (SPEC §3): Linear(D, 64, no bias) → ReLU → Linear(64, 1, no bias) on CLS."""

    def __init__(self, *, dim, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=False)
        # Non-negative output weights on non-negative ReLU features: logit ≥ 0, so at the start
        # every sample runs every layer and the judges learn where to exit, rather than half of
        # the network being cut off by the sign of a random initialisation.
        with torch.no_grad():
            self.fc2.weight.abs_()

    def forward(self, cls):  # (B, D) -> (B,) logits
        return self.fc2(F.relu(self.fc1(cls))).squeeze(-1)


def still_active(active, p):
    """Running product of the gates (B,): a sample that exits (0) never re-enters."""
    return active * p


def routed_update(h_in, h_out, p):
    """The paper's update H_{i+1} = p·Layer_i(H_i) + (1 − p)·H_i, with p (B,), h (B, N, D).

    p is the running product `still_active` of the straight-through gates, so its value is
    exactly 0 or 1 and the row is then exactly h_in or h_out (x·0 = ±0 and y + ±0 = y for
    finite x, y). The gradient dH_{i+1}/dp = Layer_i(H_i) − H_i reaches the judge in every
    row, also where p = 0: a torch.where(p > 0, ...) would cut it there, and a judge that
    had let a sample exit could never learn to keep it. That is why in training the block
    runs on all rows; at inference the caller runs it on the active rows only and may pass
    h_out = h_in elsewhere.
    """
    p = p[:, None, None]  # (B, 1, 1)
    return p * h_out + (1 - p) * h_in


# ----------------------------------------------------------------------------- tokens (§4)

class TokenJudge(nn.Module):
    """Token judge (SPEC §4): Linear(D, 1, no bias), one score per token, CLS included."""

    def __init__(self, *, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1, bias=False)

    def forward(self, x):  # (B, N, D) -> (B, N) scores
        return self.proj(x).squeeze(-1)


def num_kept(n_tokens, keep):
    """k = max(1, ⌊keep · N⌋): 192 of 257 tokens at keep = 0.75 (SPEC §4)."""
    return max(1, math.floor(keep * n_tokens))


def select_tokens(scores, k, *, cls_eligible=True):
    """Indices (B, K) of the k best-scored tokens of each row, in ascending (original) order.

    cls_eligible=True: CLS competes like a patch (Tab. C(a), default). False: CLS (token 0) is
    always kept and the other k − 1 are the best of tokens 1..N−1 (Tab. C(a) "Patch" row).
    """
    if cls_eligible:
        idx = scores.topk(k, dim=-1).indices  # (B, K)
    else:
        rest = scores[:, 1:].topk(k - 1, dim=-1).indices + 1  # (B, K−1)
        idx = torch.cat([torch.zeros_like(rest[:, :1]), rest], dim=-1)  # (B, K)
    return idx.sort(dim=-1).values


def gather_tokens(x, idx):
    """x (B, N, D), idx (B, K) -> (B, K, D), batched (no loop over samples)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x, idx, y):
    """A copy of x (B, N, D) with the rows idx (B, K) replaced by y (B, K, D); out of place."""
    return x.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), y)


class Selected(NamedTuple):
    out: torch.Tensor  # (B, N, D) the block's weighted outputs on kept tokens, input elsewhere
    idx: torch.Tensor  # (B, K) kept tokens, ascending


def run_on_selected(x, scores, block, *, keep, cls_eligible=True, post_weight=True):
    """Token Selection (SPEC §4): run `block` on the top ⌊keep·N⌋ tokens of each row only.

    block: any callable (B, K, D) -> (B, K, D), e.g. a whole residual block. The kept tokens
    are weighted by w = 1 + softmax over their k scores, after the block (post_weight=True,
    Tab. C(b) default) or before it. Unkept tokens pass through unchanged.
    """
    idx = select_tokens(scores, num_kept(x.shape[1], keep), cls_eligible=cls_eligible)  # (B, K)
    x_kept = gather_tokens(x, idx)  # (B, K, D)
    w = 1 + scores.gather(1, idx).softmax(dim=-1)[..., None]  # (B, K, 1)
    y = block(x_kept) * w if post_weight else block(x_kept * w)  # (B, K, D)
    return Selected(scatter_tokens(x, idx, y), idx)


# ----------------------------------------------------------------------------- rank loss (§4)

def soft_rank(x, *, temperature):
    """Differentiable ranks (..., N) -> (..., N), 1 for the smallest, as scipy's rankdata.

    Each row is standardized, z = (x − mean) / (std + 1e-6), so the temperature is in units
    of the row's std and the loss cannot be lowered by merely scaling the scores; then
    rank_i = 0.5 + Σ_j σ((z_i − z_j) / t). The j = i term is σ(0) = 0.5, so without ties the
    ranks tend to 1..N as t → 0, and a tied pair counts 0.5 each way: the limit is the
    average rank with ties (scipy's 'average' method; exactly so for ties, since z_i − z_j is
    then exactly 0). A row whose scores are all more than ~20·t std apart gets its exact
    ranks (to float precision); a closer pair is blended toward a tie. Measured on random
    N = 257 rows, the coefficient agrees with scipy within 2e-4 at t = 1e-4 (the blended
    near-ties move it little) and within 5e-3 at t = RANK_TEMPERATURE.

    Cost: all pairs, O(N²) time and memory per row (N = 257: 66k pairs, 264 kB in fp32).
    """
    z = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)  # (..., N)
    pairs = torch.sigmoid((z[..., :, None] - z[..., None, :]) / temperature)  # (..., N, N)
    return 0.5 + pairs.sum(-1)


@torch.no_grad()
def exact_rank(x):
    """Average ranks with ties (..., N), 1 for the smallest, as scipy's rankdata; no gradient."""
    above = (x[..., :, None] > x[..., None, :]).to(x.dtype)  # (..., N, N)
    tied = (x[..., :, None] == x[..., None, :]).to(x.dtype)  # diagonal included
    return 0.5 + above.sum(-1) + 0.5 * tied.sum(-1)


def spearman_corr(scores, target, *, temperature):
    """Soft Spearman coefficient per row, (..., N) -> (...,).

    The estimator: the Pearson correlation of soft_rank(scores) with the exact average ranks
    of the target (a constant: no gradient flows into it). As t → 0 it is scipy's spearmanr,
    the Pearson correlation of the two average-rank vectors. A constant row gives 0.
    """
    a = soft_rank(scores, temperature=temperature)
    b = exact_rank(target.detach())
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def spearman_loss(scores, target, *, temperature=RANK_TEMPERATURE):
    """L_rank = mean over rows of 1 − Spearman(scores, target) (SPEC §4); both (B, N)."""
    return (1 - spearman_corr(scores, target, temperature=temperature)).mean()


# ----------------------------------------------------------------------------- experts (§5)

class MoAOutput(NamedTuple):
    out: torch.Tensor    # (..., D) x + Σ_e g_e · Adapter_e(x)
    gates: torch.Tensor  # (..., E) per-token expert weights, sum to 1 (supp. Tab. D)


class MixtureOfAdapters(nn.Module):
    """Token-level Expert Routing (SPEC §5): MoA(X) = X + Σ_e G_e(X) · Adapter_e(X).

    Adapter_e = Linear(D, R) → GELU → Linear(R, D); dense, all E experts run on every token.
    Gate: Linear(D, E) with bias, softmax per token; in training the noisy gate of paper
    Eq. 13, G = softmax(ℓ + ε ⊙ softplus(ℓ)), ε ~ N(0, I); at eval softmax(ℓ).

    The E adapters run as two matmuls instead of a loop over experts: the up-projections are
    one Linear(D, E·R); since Σ_e g_e (h_e W2_e + b2_e) = [g ⊙ h] W2_cat + g b2, each expert's
    hidden block is scaled by its gate and all go through one (E·R, D) down-projection.
    """

    def __init__(self, *, dim, num_experts=4, rank=256):
        super().__init__()
        self.num_experts, self.rank = num_experts, rank
        self.gate = nn.Linear(dim, num_experts)
        self.up = nn.Linear(dim, num_experts * rank)  # expert e: rows e·R .. (e+1)·R − 1
        # Small but not zero: with a zero down-projection every adapter outputs 0 at step one
        # and the gate would get no gradient then.
        self.down_weight = nn.Parameter(torch.randn(num_experts, rank, dim) * 1e-3)  # (E, R, D)
        self.down_bias = nn.Parameter(torch.zeros(num_experts, dim))  # (E, D)

    def forward(self, x):  # x (..., D)
        logits = self.gate(x)  # (..., E)
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(logits)
        gates = logits.softmax(dim=-1)  # (..., E)
        h = F.gelu(self.up(x)).unflatten(-1, (self.num_experts, self.rank))  # (..., E, R)
        h = (h * gates[..., None]).flatten(-2)  # (..., E·R)
        out = x + h @ self.down_weight.flatten(0, 1) + gates @ self.down_bias  # (..., D)
        return MoAOutput(out, gates)

"""The weight changes of supp. Tab. A: parametrizations W' = f(W, new parameters) of a linear layer's weight,
computed at each forward (torch.nn.utils.parametrize); finetune/__init__.py registers them on the ViT's linear layers.

  additive, W' = W + ΔW   LoRA [6] and its variants (LowRank), DoRA [14] (its direction), Effort [21]
                          (SVDResidual), LoHa [7], LoKr [23], AdaLoRA [28]
  multiplicative          (IA)³ [13] rescales rows or columns; OFT [18] and BOFT [15] rotate the input side,
                          W' = W Rᵀ with R orthogonal

Each change acts on G groups of a weight's rows, each group with its own parameters: the fused q, k, v
weight is three layers in Hugging Face's CLIP, which the paper's runs adapted (G = 3 there, else 1).
LoHa, LoKr, AdaLoRA, OFT and BOFT follow the PEFT library (peft 0.21.2), whose defaults the supplementary
kept ("All other settings follow default of the PEFT library"); tests/test_finetune.py checks each against it.

Letters: G groups, O/I output/input features of a group, r rank, n_b blocks of an orthogonal change and b
their size (n_b·b = I), m butterfly factors.
"""
import math

import torch
from torch import nn


def kaiming(*shape, fan_in, device=None):
    """Kaiming-uniform with a = √5, nn.Linear's (and PEFT's) init: U(±1/√fan_in)."""
    return torch.empty(shape, device=device).uniform_(-fan_in ** -0.5, fan_in ** -0.5)


class Additive(nn.Module):
    """W' = W + ΔW. Registering W stores W - ΔW as the frozen weight (`right_inverse`), so W' = W at any
    initial ΔW: B = 0 for LoRA, the top singular part for PiSSA, the residual triplets for Effort."""

    def delta(self):  # ΔW (G·O, I)
        raise NotImplementedError

    def forward(self, W):
        return W + self.delta()

    def right_inverse(self, W):
        return W - self.delta()


# ---------------------------------------------------------------------------------- the LoRA family, Effort

class LowRank(Additive):
    """LoRA [6] and its variants: ΔW = s·BA, one (B, A) per group of rows."""

    def __init__(self, A, B, scale):
        super().__init__()
        self.A = nn.Parameter(A)  # (G, r, I)
        self.B = nn.Parameter(B)  # (G, O, r)
        self.scale = scale

    def delta(self):
        return self.scale * (self.B @ self.A).flatten(0, 1)  # (G·O, I)


class DoRA(LowRank):
    """DoRA [14]: W' = m · V / ||V||_c with the direction V = W + s·BA, the magnitude m = ||W||_c at init.

    ||·||_c is the norm of each output feature's weights (the paper's columns of W ∈ R^{d×k}; rows of
    PyTorch's (out, in) layout). As the paper suggests (§4.3) the norm is a constant for the gradient.
    Registration happens with B = 0, where the inherited `right_inverse` stores W itself.
    """

    def __init__(self, A, B, scale, W):
        super().__init__(A, B, scale)
        self.m = nn.Parameter(W.detach().norm(dim=1))  # (G·O,)

    def forward(self, W):
        V = W + self.delta()  # (G·O, I)
        return self.m[:, None] * V / V.norm(dim=1, keepdim=True).detach()


def orthonormality_error(X, X0):
    """||MᵀM - I||_F of M = [X_frozen, X], the frozen columns X_frozen those of an orthonormal basis that are
    orthogonal to X0 (G, k, r): the columns X started from. As MᵀM has blocks I, X_frozenᵀX and XᵀX, the error
    is √(2||X_frozenᵀX||² + ||XᵀX - I||²), and X_frozen X_frozenᵀ = I - X0X0ᵀ makes ||X_frozenᵀX|| =
    ||X - X0(X0ᵀX)||: the frozen columns never need storing. For a square M, ||MMᵀ - I||_F is the same."""
    outside = X - X0 @ (X0.mT @ X)  # (G, k, r)
    gram = X.mT @ X - torch.eye(X.shape[-1], device=X.device)  # (G, r, r)
    return torch.linalg.vector_norm(torch.cat([math.sqrt(2) * outside.flatten(1), gram.flatten(1)], 1), dim=1)


class SVDResidual(Additive):
    """Effort [21]: W = UΣVᵀ; the top principal components stay frozen, the remaining r train.

    W' = W_main + U_r Σ_r V_rᵀ with U_r, Σ_r, V_r the last r singular triplets of each group; registering W
    stores W_main = W - U_r Σ_r V_rᵀ. `regulariser` is Effort's pair of constraints (their release,
    effort_detector.py: `compute_orthogonal_loss`, `compute_keepsv_loss`): ½||UUᵀ - I||_F + ½||VVᵀ - I||_F of
    the whole U = [U_main, U_r], V = [V_main; V_rᵀ], and | ||W'||²_F - ||W||²_F |. They hold for the square
    weights Effort adapts (q, k, v, out: D × D).
    """

    def __init__(self, W, groups, rank):
        super().__init__()
        W = W.detach().unflatten(0, (groups, -1))  # (G, O, I)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (G, O, n) (G, n) (G, n, I)
        self.U = nn.Parameter(U[..., -rank:].contiguous())    # (G, O, r)
        self.S = nn.Parameter(S[:, -rank:].contiguous())      # (G, r)
        self.Vh = nn.Parameter(Vh[:, -rank:].contiguous())    # (G, r, I)
        self.register_buffer("U0", self.U.detach().clone())   # where U_r and V_r start: the frozen singular
        self.register_buffer("V0", self.Vh.detach().mT.clone())  # vectors are the orthonormal complement (G, I, r)
        self.register_buffer("norm0", W.square().sum((1, 2)))  # ||W||²_F per group (G,)

    def delta(self):
        return ((self.U * self.S[:, None]) @ self.Vh).flatten(0, 1)  # (G·O, I)

    def regulariser(self, W):
        """Per group (G,): Effort's L_orth + L_ksv for the current weight W' (G·O, I)."""
        orth = 0.5 * orthonormality_error(self.U, self.U0) + 0.5 * orthonormality_error(self.Vh.mT, self.V0)
        return orth + (W.unflatten(0, (len(self.S), -1)).square().sum((1, 2)) - self.norm0).abs()


class IA3(nn.Module):
    """(IA)³ [13]: a learned vector l (ones at init) rescales activations, here folded into the weights.

    Keys and values: l ⊙ (Wx + b) = (l ⊙ W)x + l ⊙ b, rows `skip`.. of the fused weight and its bias
    (q's rows are left alone). MLP hidden activation: c_proj(l ⊙ h) = (W diag l) h, c_proj's columns.
    """

    def __init__(self, size, *, skip=0, columns=False, device=None):
        super().__init__()
        self.l = nn.Parameter(torch.ones(size, device=device))
        self.skip, self.columns = skip, columns

    def forward(self, T):  # a weight (rows, cols) or a bias (rows,)
        l = torch.cat([self.l.new_ones(self.skip), self.l])
        return T * (l if self.columns or T.dim() == 1 else l[:, None])


# ---------------------------------------------------------------------------------- LoHa, LoKr

class LoHa(Additive):
    """LoHa [7], FedPara's low-rank Hadamard product: ΔW = s·(W1a W1b) ⊙ (W2a W2b), s = α/r.

    The product of two rank-r matrices reaches rank r² with 2r(O + I) parameters. As PEFT: W1a, W1b, W2a
    Kaiming-uniform, W2b = 0, so ΔW = 0 at init."""

    def __init__(self, W, groups, *, rank, alpha):
        super().__init__()
        (GO, I), dev = W.shape, W.device
        G, O = groups, GO // groups
        self.w1a = nn.Parameter(kaiming(G, O, rank, fan_in=rank, device=dev))  # (G, O, r)
        self.w1b = nn.Parameter(kaiming(G, rank, I, fan_in=I, device=dev))     # (G, r, I)
        self.w2a = nn.Parameter(kaiming(G, O, rank, fan_in=rank, device=dev))
        self.w2b = nn.Parameter(torch.zeros(G, rank, I, device=dev))
        self.scale = alpha / rank

    def delta(self):
        return self.scale * ((self.w1a @ self.w1b) * (self.w2a @ self.w2b)).flatten(0, 1)


def factorization(n):
    """n = a·b with a ≤ b the divisor pair closest to √n (PEFT's `factorization` with its default factor -1)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


class LoKr(Additive):
    """LoKr [23], a Kronecker product: ΔW = s·W1 ⊗ W2, s = α/r, O = l·k and I = p·q split as `factorization`.

    As PEFT: W1 (l, p) a full matrix, zero at init; W2 (k, q) full and Kaiming-uniform, or W2a W2b of rank r
    where r < max(k, q)/2."""

    def __init__(self, W, groups, *, rank, alpha):
        super().__init__()
        (GO, I), dev = W.shape, W.device
        G, O = groups, GO // groups
        (l, k), (p, q) = factorization(O), factorization(I)
        self.w1 = nn.Parameter(torch.zeros(G, l, p, device=dev))
        self.low_rank = rank < max(k, q) / 2
        if self.low_rank:
            self.w2a = nn.Parameter(kaiming(G, k, rank, fan_in=rank, device=dev))  # (G, k, r)
            self.w2b = nn.Parameter(kaiming(G, rank, q, fan_in=q, device=dev))     # (G, r, q)
        else:
            self.w2 = nn.Parameter(kaiming(G, k, q, fan_in=q, device=dev))          # (G, k, q)
        self.scale = alpha / rank

    def delta(self):
        w2 = self.w2a @ self.w2b if self.low_rank else self.w2
        G, (l, p), (k, q) = len(w2), self.w1.shape[1:], w2.shape[1:]
        kron = torch.einsum("gij,gab->giajb", self.w1, w2).reshape(G, l * k, p * q)  # (W1 ⊗ W2)[ik + a, jq + b]
        return self.scale * kron.flatten(0, 1)


# ---------------------------------------------------------------------------------- AdaLoRA

class AdaLoRA(Additive):
    """AdaLoRA [28]: ΔW = s·P Λ Q in the form of an SVD, P (O, r), Λ = diag(E), Q (r, I), whose triplets
    (P_i, E_i, Q_i) are pruned over training by their importance (`allocate`); s = α/(r + 1e-5) with the
    initial r, as PEFT. As PEFT: E = 0, P and Q ~ N(0, 0.02²). The buffers are `allocate`'s state: the
    smoothed sensitivity Ī and uncertainty Ū of every entry of Q, E, P, and the triplets kept."""

    def __init__(self, W, groups, *, rank, alpha):
        super().__init__()
        (GO, I), dev = W.shape, W.device
        G, O = groups, GO // groups
        self.A = nn.Parameter(torch.empty(G, rank, I, device=dev).normal_(0, 0.02))  # Q (PEFT's lora_A)
        self.E = nn.Parameter(torch.zeros(G, rank, device=dev))                       # Λ (lora_E)
        self.B = nn.Parameter(torch.empty(G, O, rank, device=dev).normal_(0, 0.02))  # P (lora_B)
        self.scale = alpha / (rank + 1e-5)
        for name in ("A", "E", "B"):
            self.register_buffer(f"{name}_ipt", torch.zeros_like(getattr(self, name)))
            self.register_buffer(f"{name}_unc", torch.zeros_like(getattr(self, name)))
        self.register_buffer("kept", torch.ones(G, rank, dtype=torch.bool, device=dev))

    def delta(self):
        return self.scale * (self.B @ (self.A * self.E[..., None])).flatten(0, 1)

    def orthogonality(self):
        """||QQᵀ - I||_F and ||PᵀP - I||_F of each group (2G,): PEFT's orthogonal regulariser."""
        eye = torch.eye(self.E.shape[1], device=self.E.device)
        return torch.cat([torch.linalg.matrix_norm(self.A @ self.A.mT - eye),
                          torch.linalg.matrix_norm(self.B.mT @ self.B - eye)])

    def triplet_scores(self):
        """S(P_i, E_i, Q_i) = s(E_i) + mean_j s(Q_ij) + mean_o s(P_oi), s = Ī·Ū of an entry (G, r)."""
        return (self.E_ipt * self.E_unc + (self.A_ipt * self.A_unc).mean(2)
                + (self.B_ipt * self.B_unc).mean(1))


@torch.no_grad()
def allocate(changes, step, total, *, target_rank, tinit, tfinal, delta_t, beta1, beta2):
    """AdaLoRA's budget allocation after optimizer step `step` (1, 2, ...) of `total`, from the step's gradients,
    over the AdaLoRA changes of a model together (PEFT's RankAllocator and AdaLoraModel.update_and_allocate).

    Until step T - t_final every entry's sensitivity I = |w·∂L/∂w| is smoothed, Ī ← β1 Ī + (1 - β1) I, with
    its uncertainty Ū ← β2 Ū + (1 - β2)|I - Ī|. The budget b(t) of kept triplets falls from all of them to
    target_rank per matrix as b_T + (b_0 - b_T)(1 - (t - t_init)/(T - t_final - t_init))³; every Δ_T steps E_i is
    zeroed for the triplets that score lowest until b(t) remain. At T - t_final the final budget is masked and the
    scores cleared; later steps keep those triplets zeroed.
    """
    final = total - tfinal
    if step > final:
        for c in changes:
            c.E.masked_fill_(~c.kept, 0.0)
        return
    if step < final:
        for c in changes:
            for name in ("A", "E", "B"):
                w = getattr(c, name)
                ipt, ema, unc = (w * w.grad).abs(), getattr(c, f"{name}_ipt"), getattr(c, f"{name}_unc")
                ema.mul_(beta1).add_((1 - beta1) * ipt)
                unc.mul_(beta2).add_((1 - beta2) * (ipt - ema).abs())
    start = sum(c.E.numel() for c in changes)  # b_0: every triplet
    if step <= tinit:
        return
    end = target_rank * sum(len(c.E) for c in changes)  # b_T: target_rank per matrix
    budget = int((start - end) * (1 - (step - tinit) / (final - tinit)) ** 3 + end)
    if (step % delta_t == 0 or step == final) and budget < start:
        scores = [c.triplet_scores() for c in changes]
        threshold = torch.cat([s.flatten() for s in scores]).kthvalue(start - budget).values
        for c, s in zip(changes, scores):
            c.kept.copy_(s > threshold)
            c.E.masked_fill_(~c.kept, 0.0)
    if step == final:
        for c in changes:
            for name in ("A", "E", "B"):
                getattr(c, f"{name}_ipt").zero_()
                getattr(c, f"{name}_unc").zero_()


# ---------------------------------------------------------------------------------- OFT, BOFT

class OFT(nn.Module):
    """OFT [18]: W' = W Rᵀ, R = diag(R_1, ..., R_nb) block-diagonal orthogonal: x ↦ (xR)Wᵀ rotates the input.

    Each R_i = Cayley(Q_i) of a skew-symmetric Q_i (b × b) whose upper triangle, row by row, is the
    parameter (PEFT's layout), zero at init (R = I); by PEFT's default 5-term Neumann series, R = I + 2Q + 2Q²
    + 2Q³ + Q⁴ ≈ (I + Q)(I - Q)⁻¹. `right_inverse` is the identity, right at registration, where R = I."""

    def __init__(self, W, groups, *, blocks):
        super().__init__()
        (GO, I), dev = W.shape, W.device
        self.block = b = I // blocks
        self.q = nn.Parameter(torch.zeros(groups, blocks, b * (b - 1) // 2, device=dev))  # (G, n_b, b(b-1)/2)
        self.register_buffer("upper", torch.triu_indices(b, b, 1, device=dev), persistent=False)  # (2, b(b-1)/2)

    def rotations(self):  # (G, n_b, b, b)
        Q = self.q.new_zeros(*self.q.shape[:2], self.block, self.block)
        Q[..., self.upper[0], self.upper[1]] = self.q
        Q = Q - Q.mT
        Q2 = Q @ Q
        return torch.eye(self.block, device=Q.device) + 2 * Q + 2 * Q2 + 2 * Q2 @ Q + Q2 @ Q2

    def forward(self, W):
        R = self.rotations()
        G, nb, b, _ = R.shape
        W = W.unflatten(0, (G, -1)).unflatten(-1, (nb, b))  # (G, O, n_b, b)
        return torch.einsum("gonk,gnck->gonc", W, R).flatten(2).flatten(0, 1)  # (W Rᵀ) block by block

    def right_inverse(self, W):
        return W


def butterfly_permutation(n, blocks, half):
    """PEFT's `block_butterfly_perm`: in each run of n/blocks entries, its chunks of `half` entries reordered,
    the even-numbered chunks first, then the odd ones. As a matrix, P[i, perm[i]] = 1."""
    size = n // blocks
    chunks = torch.cat([torch.arange(0, size // half, 2), torch.arange(1, size // half, 2)])
    run = (chunks[:, None] * half + torch.arange(half)).flatten()  # (size,)
    return (torch.arange(0, n, size)[:, None] + run).flatten()


class BOFT(nn.Module):
    """BOFT [15], butterfly orthogonal fine-tuning: W' = diag(s) W Mᵀ, M = B_m ⋯ B_1 a product of m butterfly
    factors B_j = P_j diag(R_j1, ..., R_jnb) P_jᵀ, P_j the butterfly permutation at scale 2^(j-1) (P_1 = I).

    As PEFT: each block R = Cayley(S) exactly, (I - S)(I + S)⁻¹ with S = (Z - Zᵀ)/2 of a free b × b matrix Z
    (zero at init: M = I), and s a learned scale per output feature (ones at init). With m = 1, PEFT's
    default, BOFT is OFT with the exact Cayley transform and the scale s. `right_inverse`: as OFT."""

    def __init__(self, W, groups, *, blocks, factors):
        super().__init__()
        (GO, I), dev = W.shape, W.device
        b = I // blocks
        self.Z = nn.Parameter(torch.zeros(groups, factors, blocks, b, b, device=dev))  # (G, m, n_b, b, b)
        self.s = nn.Parameter(torch.ones(groups, GO // groups, device=dev))            # (G, O)
        perms = [butterfly_permutation(I, blocks // 2 ** j, b // 2) if factors > 1 else torch.arange(I)
                 for j in range(factors)]
        self.register_buffer("perm", torch.stack(perms).to(dev), persistent=False)  # (m, I)

    def butterfly(self):  # M (G, I, I)
        S = (self.Z - self.Z.mT) / 2
        eye = torch.eye(S.shape[-1], device=S.device)
        R = torch.linalg.solve(eye + S, eye - S, left=False)  # (G, m, n_b, b, b)
        G, m, nb, b, _ = R.shape
        M = None
        for j in range(m):
            B = torch.einsum("gnij,nk->gnikj", R[:, j], torch.eye(nb, device=R.device)).reshape(G, nb * b, nb * b)
            B = B[:, self.perm[j]][:, :, self.perm[j]]  # P B Pᵀ
            M = B if M is None else B @ M
        return M

    def forward(self, W):
        M = self.butterfly()
        W = W.unflatten(0, (len(M), -1))  # (G, O, I)
        return (self.s[..., None] * (W @ M.mT)).flatten(0, 1)

    def right_inverse(self, W):
        return W

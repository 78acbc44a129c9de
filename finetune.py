"""The fine-tuning methods of the supplementary's Tab. A ("Comparison of different parameter-efficient
finetuning methods"), each applied to the paper's baseline: the plain CLIP ViT, the original image only, a
linear head on the projected CLS (`DFDHR(make_config(preset, "baseline"))`). DFD-HR itself, the
last row of the table, is dfdhr.py; `python train.py --method=NAME` trains a row of this module, built
by `build_model`.

`apply(model, method)` freezes what the method leaves alone, adds the method's parameters inside
`model.backbone` (or replaces `model.head`), and leaves exactly these trainable, plus the head,
which every method trains (supp.: all at lr 1e-4). The additions are plain submodules, so a
state dict saved after `apply` loads into any model that went through the same `apply`.

How the methods enter the ViT, which dfdhr.py runs piece by piece (`embed`, then each block as
`attn(ln_1(x))` and `mlp(ln_2(x))`, then `head`):
  - weight changes (the LoRA family, DoRA, (IA)³, Effort) are parametrizations of the weights,
    W' = f(W, new parameters), computed at each forward; `merge` removes them and leaves W' in
    place, which is the usual "merge the adapter into the weights";
  - new modules on the activations (Houlsby adapters, VPT prompts) are forward hooks.

"Every linear layer" of a block is the fused q, k, v projection `attn.in_proj_weight`, `attn.out_proj`,
`mlp.c_fc` and `mlp.c_proj`. The paper's runs used Hugging Face's CLIP, where q, k and v are three
layers, so the fused weight is adapted as three row blocks (G = 3 below), one adapter each.

Letters as in dfdhr.py's glossary: B batch, N tokens, D width, P the head's input width; here also n_p
prompts, O/I output/input features of a weight (per group), G groups of rows (3 for the fused q, k, v,
else 1), r the rank of a low-rank change.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import compared
from dfdhr import DFDHR

METHODS = ("baseline", "linear_probe", "mlp3", "partial4", "ln_tuning", "bias_tuning", "vpt_deep", "adapter",
           "lora", "rslora", "pissa", "olora", "gaussian_lora", "dora", "ia3", "effort")
LORA_FAMILY = ("lora", "rslora", "pissa", "olora", "gaussian_lora", "dora")

RANK = 16               # r of every LoRA variant (supp.)
ALPHA = 8               # α: "all other settings follow default of the PEFT library", whose default α is 8
PARTIAL_BLOCKS = 4      # Partial-k, k = 4 (Tab. A)
NUM_PROMPTS = 5         # VPT-deep: 5 prompt tokens per layer (supp.)
ADAPTER_BOTTLENECK = 64  # Houlsby D -> 64 -> D (not in the paper): 4·64·D per block, near LoRA r = 16's 18·16·D
EFFORT_RESIDUAL = 1     # Effort: the smallest singular component trains, the top n - 1 stay frozen


# ---------------------------------------------------------------------------------- weight changes

class LowRank(nn.Module):
    """LoRA [6] and its variants: W' = W + s·BA, one (B, A) per group of rows.

    Registering W stores W - s·BA as the frozen weight (`right_inverse`), so W' = W at any init:
    B = 0 for LoRA, the top singular part for PiSSA, the QR part for OLoRA.
    """

    def __init__(self, A, B, scale):
        super().__init__()
        self.A = nn.Parameter(A)  # (G, r, I)
        self.B = nn.Parameter(B)  # (G, O, r)
        self.scale = scale

    def delta(self):
        return self.scale * (self.B @ self.A).flatten(0, 1)  # (G·O, I)

    def forward(self, W):
        return W + self.delta()

    def right_inverse(self, W):
        return W - self.delta()


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


class SVDResidual(nn.Module):
    """Effort [21]: W = UΣVᵀ; the top principal components stay frozen, the remaining ones train.

    W' = W_main + U_r Σ_r V_rᵀ with U_r, Σ_r, V_r the last r singular triplets of each group;
    registering W stores W_main = W - U_r Σ_r V_rᵀ. Effort's orthogonality and singular-value
    regularisers are not part of this module (train.py's loss is the cross-entropy alone).
    """

    def __init__(self, W, groups, rank):
        super().__init__()
        U, S, Vh = torch.linalg.svd(W.detach().unflatten(0, (groups, -1)), full_matrices=False)  # (G,O,n) (G,n) (G,n,I)
        self.U = nn.Parameter(U[..., -rank:].contiguous())    # (G, O, r)
        self.S = nn.Parameter(S[:, -rank:].contiguous())      # (G, r)
        self.Vh = nn.Parameter(Vh[:, -rank:].contiguous())    # (G, r, I)

    def delta(self):
        return ((self.U * self.S[:, None]) @ self.Vh).flatten(0, 1)  # (G·O, I)

    def forward(self, W):
        return W + self.delta()

    def right_inverse(self, W):
        return W - self.delta()


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


def linear_layers(block):
    """The block's linear layers as (module, weight name, row groups)."""
    return [(block.attn, "in_proj_weight", 3), (block.attn.out_proj, "weight", 1),
            (block.mlp.c_fc, "weight", 1), (block.mlp.c_proj, "weight", 1)]


def lora_factors(W, groups, method):
    """(A, B, s) of a LoRA variant for the weight W (G·O, I), r = RANK, α = ALPHA."""
    r, W = RANK, W.detach().unflatten(0, (groups, -1))  # (G, O, I)
    G, O, I = W.shape
    s = ALPHA / math.sqrt(r) if method == "rslora" else ALPHA / r  # rsLoRA [9]: α/√r, else α/r
    if method == "pissa":
        # PiSSA [17]: s·BA is the top-r part U_r S_r V_rᵀ, split evenly: B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ.
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = (S[:, :r] / s).sqrt()  # (G, r)
        return root[..., None] * Vh[:, :r], U[..., :r] * root[:, None], s
    if method == "olora":
        # OLoRA [1]: W = QR; B = the first r columns of Q (orthonormal), A = the first r rows of R.
        Q, R = torch.linalg.qr(W)  # (G, O, n), (G, n, I)
        return R[:, :r].contiguous(), Q[..., :r].contiguous(), s
    if method == "gaussian_lora":
        A = W.new_empty(G, r, I).normal_(0, 1 / r)  # A ~ N(0, 1/r²), the PEFT library's "gaussian"
    else:
        A = W.new_empty(G, r, I).uniform_(-I ** -0.5, I ** -0.5)  # Kaiming-uniform (a = √5), as nn.Linear
    return A, W.new_zeros(G, O, r), s  # B = 0: W' = W at init (LoRA [6])


# ---------------------------------------------------------------------------------- new modules

class Adapter(nn.Module):
    """Houlsby adapter [5]: h + up(GELU(down(h))), D -> m -> D, after attention and after the MLP.

    It sits where Houlsby puts it, on the sublayer's output before the residual add. `up` starts at
    zero, so the block is unchanged at init (Houlsby: near-identity). Houlsby also trained the layer
    norms; the supplementary describes new MLP modules only, and only these train here.
    """

    def __init__(self, width, bottleneck, device=None):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, device=device)
        self.up = nn.Linear(bottleneck, width, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):  # (B, N, D)
        return h + self.up(F.gelu(self.down(h)))

    def hook(self, module, args, out):  # forward hook on block.attn / block.mlp
        return self(out)


class Prompts(nn.Module):
    """VPT-deep [8]: n_p learnable tokens fed to one layer, replaced by the next layer's own.

    The prompts sit after the patch tokens, [CLS, patches, prompts]: VPT writes [CLS, prompts,
    patches], which is the same network, since the blocks are equivariant to a permutation of the
    tokens and the prompts get no positional embedding. CLS stays at index 0 for the head.

    Why a pre-hook on ln_1 is VPT-deep exactly for the real tokens: a block reads the prompt
    positions of its input only through ln_1 (as keys and values of the attention); the residual
    adds, ln_2 and the MLP act token by token, so whatever the prompt positions carry in from the
    previous block reaches only the prompt positions' own outputs, which VPT-deep discards.
    Overwriting ln_1's input at the prompt positions with this layer's prompts therefore gives every
    real token the keys, values, and output it has in VPT-deep, where the block's input is
    [CLS, patches, this layer's prompts].
    """

    def __init__(self, num, width, patch_size, device=None):
        super().__init__()
        bound = math.sqrt(6 / (3 * patch_size ** 2 + width))  # Xavier-uniform (VPT), a patch embedding's fans
        self.tokens = nn.Parameter(torch.empty(num, width, device=device).uniform_(-bound, bound))  # (n_p, D)

    def expand(self, x):  # (B, ·, D) -> (B, n_p, D)
        return self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)

    def append(self, ln_pre, args, x):  # forward hook on backbone.ln_pre: (B, N, D) -> (B, N + n_p, D)
        return torch.cat([x, self.expand(x)], 1)

    def overwrite(self, ln_1, args):  # forward pre-hook on the block's ln_1: (B, N + n_p, D), last n_p replaced
        x, = args
        return torch.cat([x[:, :-len(self.tokens)], self.expand(x)], 1),


def mlp_head(head):
    """MLP-3: the head becomes Linear(P, P) -> GELU -> Linear(P, P) -> GELU -> Linear(P, classes)."""
    P, device = head.in_features, head.weight.device
    return nn.Sequential(nn.Linear(P, P, device=device), nn.GELU(), nn.Linear(P, P, device=device), nn.GELU(),
                         nn.Linear(P, head.out_features, device=device))


# ---------------------------------------------------------------------------------- apply

def apply(model, method):
    """Turn the baseline DFDHR `model` into `method` of supp. Tab. A, in place; returns it.

    baseline       full fine-tuning (the paper's baseline: every parameter trains).
    linear_probe   LinearProb: the backbone is frozen, only the linear head trains.
    mlp3           MLP-3: frozen backbone, a 3-layer MLP head.
    partial4       Partial-4 [25]: the last 4 blocks, ln_post and the projection train.
    ln_tuning      LNTuning [24]: every LayerNorm (ln_pre, ln_1, ln_2 of each block, ln_post).
    bias_tuning    BiasTuning [2]: every bias of the backbone, LayerNorm biases included.
    vpt_deep       VPT-deep [8]: 5 learnable prompt tokens at the input of every layer.
    adapter        Adapter [5]: Houlsby bottleneck adapters after attention and after the MLP.
    lora           LoRA [6]: W + (α/r)·BA on every linear layer, r = 16; A Kaiming-uniform, B = 0.
    rslora         rsLoRA [9]: LoRA scaled by α/√r.
    pissa          PiSSA [17]: A, B from the top-r singular triplets of W, the residual frozen.
    olora          OLoRA [1]: A, B from the QR decomposition of W, the residual frozen.
    gaussian_lora  Gaussian LoRA: LoRA with A ~ N(0, 1/r²).
    dora           DoRA [14]: magnitude m and LoRA-updated direction, W' = m·V/||V||_c.
    ia3            IA3 [13]: learned scaling of keys, values and the MLP hidden activation.
    effort         Effort [21]: SVD of the attention projections (q, k, v, out); the top n - 1
                   singular components frozen, the last one (U, Σ, V) trains.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if model.config.routing or model.config.multi_scale:
        raise ValueError("the methods of Tab. A apply to the baseline model (make_config(preset, 'baseline'))")
    bb = model.backbone
    device = bb.ln_pre.weight.device
    model.requires_grad_(method == "baseline")
    if method == "mlp3":
        model.head = mlp_head(model.head)
    elif method == "partial4":
        for module in (*bb.blocks[-PARTIAL_BLOCKS:], bb.ln_post):
            module.requires_grad_(True)
        if bb.proj is not None:
            bb.proj.requires_grad_(True)
    elif method == "ln_tuning":
        for module in bb.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    elif method == "bias_tuning":
        for name, p in bb.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif method == "vpt_deep":
        for block in bb.blocks:
            block.prompts = Prompts(NUM_PROMPTS, bb.width, bb.patch_size, device=device)
            block.ln_1.register_forward_pre_hook(block.prompts.overwrite)
        bb.ln_pre.register_forward_hook(bb.blocks[0].prompts.append)  # placeholders, overwritten by block 0
    elif method == "adapter":
        for block in bb.blocks:
            block.adapter_attn = Adapter(bb.width, ADAPTER_BOTTLENECK, device=device)
            block.adapter_mlp = Adapter(bb.width, ADAPTER_BOTTLENECK, device=device)
            block.attn.register_forward_hook(block.adapter_attn.hook)
            block.mlp.register_forward_hook(block.adapter_mlp.hook)
    elif method == "ia3":
        for block in bb.blocks:
            kv = IA3(2 * bb.width, skip=bb.width, device=device)  # one vector for the fused weight and its bias
            parametrize.register_parametrization(block.attn, "in_proj_weight", kv)
            parametrize.register_parametrization(block.attn, "in_proj_bias", kv)
            ff = IA3(block.mlp.c_proj.in_features, columns=True, device=device)
            parametrize.register_parametrization(block.mlp.c_proj, "weight", ff)
    elif method == "effort":
        for block in bb.blocks:
            for module, name, groups in linear_layers(block)[:2]:  # the attention's q, k, v and out
                W = getattr(module, name)
                parametrize.register_parametrization(module, name, SVDResidual(W, groups, EFFORT_RESIDUAL))
    elif method in LORA_FAMILY:
        for block in bb.blocks:
            for module, name, groups in linear_layers(block):
                W = getattr(module, name)
                A, B, s = lora_factors(W, groups, method)
                change = DoRA(A, B, s, W) if method == "dora" else LowRank(A, B, s)
                parametrize.register_parametrization(module, name, change)
    model.head.requires_grad_(True)
    return model


def merge(model):
    """Write every weight change into its weight (W <- W') and drop the parametrizations: same outputs,
    no adapter cost. Hooks (adapter, VPT) are not weight changes and stay."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def count_trainable(model):
    """Number of parameters that train (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------- a model to train

def build_model(method, config, backbone=None, convnext=None):
    """DFD-HR of `config` (method "dfdhr"), or `method` of supp. Tab. A applied to it, or a method of
    supp. Tab. 6 that replaces the model (compared.METHODS; MRA's ConvNeXt from the checkpoint
    `convnext`): the one place a model to train is built (train.py, predict.py, the benchmarks)."""
    if method in compared.METHODS:
        return compared.build_model(method, config, backbone, convnext)
    model = DFDHR(config, backbone)
    return model if method == "dfdhr" else apply(model, method)

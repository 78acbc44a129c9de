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
  - weight changes (the LoRA family, DoRA, (IA)³, Effort, LoHa, LoKr, AdaLoRA, OFT, BOFT) are
    parametrizations of the weights, W' = f(W, new parameters), computed at each forward
    (weight_changes.py); `merge` removes them and leaves W' in place, which is the usual "merge the
    adapter into the weights";
  - new modules on the activations (Houlsby adapters, VPT prompts, MoE-FFD's experts) are forward hooks,
    and for MoE-FFD an attention that adds its LoRA experts' change to q, k, v (added_networks.py);
  - SideTuning and ForAda add a network beside the frozen ViT and run a forward of their own: they are
    subclasses of DFDHR that `build_model` builds (added_networks.py, forensics_adapter.py).

Two seams reach train.py: `extra_loss`, a method's own loss terms besides L_cls, each weighted as in its
paper, which dfdhr.dfdhr_loss adds to L; and `after_step`, AdaLoRA's rank allocation after each optimizer
step.

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
from finetune.added_networks import BALANCE_WEIGHTS, AdapterExperts, ExpertAttention, LoRAExperts, SideTuning, WithSideNetwork
from dfdhr import DFDHR
from finetune.forensics_adapter import ForensicsAdapter
from finetune.weight_changes import BOFT, IA3, OFT, AdaLoRA, DoRA, LoHa, LoKr, LowRank, SVDResidual, allocate

METHODS = ("baseline", "ln_tuning", "bias_tuning", "vpt_deep", "side_tuning", "linear_probe", "partial4", "mlp3",
           "adapter", "forada", "lora", "gaussian_lora", "pissa", "olora", "rslora", "dora", "loha", "lokr",
           "adalora", "ia3", "oft", "boft", "effort", "moe_ffd")  # supp. Tab. A's rows in its order, DFD-HR's aside
LORA_FAMILY = ("lora", "rslora", "pissa", "olora", "gaussian_lora", "dora")
EVERY_LINEAR = (*LORA_FAMILY, "loha", "lokr", "adalora", "oft", "boft")  # "rank 16 ... into every linear layer"
OWN_MODELS = {"side_tuning": SideTuning, "forada": ForensicsAdapter}  # the methods with a forward of their own
NEEDS_MASKS = ("forada",)  # methods whose loss reads the blending mask of each training frame
ONE_PROCESS = ("moe_ffd", "forada")  # train in one process, as their authors' code does: their extra_loss terms use
                                    # parameters (gates, ForAda's boundary head) that DDP's view of the forward misses

RANK = 16               # r of every LoRA variant (supp.)
ALPHA = 8               # α: "all other settings follow default of the PEFT library", whose default α is 8
                        # (LoRA, LoHa, LoKr, AdaLoRA alike)
PARTIAL_BLOCKS = 4      # Partial-k, k = 4 (Tab. A)
NUM_PROMPTS = 5         # VPT-deep: 5 prompt tokens per layer (supp.)
ADAPTER_BOTTLENECK = 64  # Houlsby D -> 64 -> D (not in the paper): 4·64·D per block, near LoRA r = 16's 18·16·D
EFFORT_RESIDUAL = 1     # Effort: the smallest singular component trains, the top n - 1 stay frozen
EFFORT_WEIGHT = 1.0     # Effort: λ of its regulariser, averaged over the weights (its release's get_losses)
# AdaLoRA: PEFT's AdaLoraConfig defaults but for the ranks, where "rank 16" is the average rank it ends with.
ADALORA_TARGET_R = 16   # target_r (PEFT: 8)
ADALORA_INIT_R = 24     # init_r: 1.5 × target_r, the ratio of PEFT's defaults (12 and 8) and of AdaLoRA's paper
ADALORA_SCHEDULE = dict(tinit=0, tfinal=0, delta_t=1, beta1=0.85, beta2=0.85)  # PEFT's defaults (deltaT = delta_t)
ADALORA_ORTH_WEIGHT = 0.5  # PEFT's orth_reg_weight
OFT_BLOCKS = 16         # OFT's r in PEFT, "number of OFT blocks per injected layer": rank 16; b = I/16
BOFT_BLOCKS = 16        # BOFT's boft_block_num, its counterpart of OFT's r
BOFT_FACTORS = 1        # boft_n_butterfly_factor, PEFT's default (1: OFT with the exact Cayley map and a scale)


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

def weight_change(W, groups, method):
    """The parametrization that `method` of EVERY_LINEAR registers on a linear layer's weight W (G·O, I)."""
    if method == "loha":
        return LoHa(W, groups, rank=RANK, alpha=ALPHA)
    if method == "lokr":
        return LoKr(W, groups, rank=RANK, alpha=ALPHA)
    if method == "adalora":
        return AdaLoRA(W, groups, rank=ADALORA_INIT_R, alpha=ALPHA)
    if method == "oft":
        return OFT(W, groups, blocks=OFT_BLOCKS)
    if method == "boft":
        return BOFT(W, groups, blocks=BOFT_BLOCKS, factors=BOFT_FACTORS)
    A, B, s = lora_factors(W, groups, method)
    return DoRA(A, B, s, W) if method == "dora" else LowRank(A, B, s)


def apply(model, method):
    """Turn the baseline DFDHR `model` into `method` of supp. Tab. A, in place; returns it. SideTuning and
    ForAda need the model `build_model` builds for them (OWN_MODELS).

    baseline       full fine-tuning (the paper's baseline: every parameter trains).
    ln_tuning      LNTuning [24]: every LayerNorm (ln_pre, ln_1, ln_2 of each block, ln_post).
    bias_tuning    BiasTuning [2]: every bias of the backbone, LayerNorm biases included.
    vpt_deep       VPT-deep [8]: 5 learnable prompt tokens at the input of every layer.
    side_tuning    SideTuning [27]: a side AlexNet from scratch, α-blended with the frozen ViT's feature.
    linear_probe   LinearProb: the backbone is frozen, only the linear head trains.
    partial4       Partial-4 [25]: the last 4 blocks, ln_post and the projection train.
    mlp3           MLP-3: frozen backbone, a 3-layer MLP head.
    adapter        Adapter [5]: Houlsby bottleneck adapters after attention and after the MLP.
    forada         ForAda [4]: the Forensics Adapter beside the frozen ViT (forensics_adapter.py).
    lora           LoRA [6]: W + (α/r)·BA on every linear layer, r = 16; A Kaiming-uniform, B = 0.
    gaussian_lora  Gaussian LoRA: LoRA with A ~ N(0, 1/r²).
    pissa          PiSSA [17]: A, B from the top-r singular triplets of W, the residual frozen.
    olora          OLoRA [1]: A, B from the QR decomposition of W, the residual frozen.
    rslora         rsLoRA [9]: LoRA scaled by α/√r.
    dora           DoRA [14]: magnitude m and LoRA-updated direction, W' = m·V/||V||_c.
    loha           LoHa [7]: W + (α/r)·(W1a W1b) ⊙ (W2a W2b), r = 16.
    lokr           LoKr [23]: W + (α/r)·W1 ⊗ W2, r = 16 where W2 is low-rank.
    adalora        AdaLoRA [28]: W + P Λ Q, triplets pruned by importance from 24 to 16 per matrix on average.
    ia3            IA3 [13]: learned scaling of keys, values and the MLP hidden activation.
    oft            OFT [18]: W Rᵀ, R block-diagonal orthogonal, 16 blocks (Cayley transform).
    boft           BOFT [15]: diag(s) W Mᵀ, M a butterfly product of block-diagonal orthogonal factors.
    effort         Effort [21]: SVD of the attention projections (q, k, v, out); the top n - 1
                   singular components frozen, the last one (U, Σ, V) trains; its two regularisers.
    moe_ffd        MoE-FFD [10]: LoRA experts on q, k, v and adapter experts beside the MLP, gated; the
                   LayerNorms before attention train too (their ViT_MoE.py freezes all but "norm1").
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if model.config.routing or model.config.multi_scale:
        raise ValueError("the methods of Tab. A apply to the baseline model (make_config(preset, 'baseline'))")
    if method in OWN_MODELS and not isinstance(model, OWN_MODELS[method]):
        raise ValueError(f"{method} runs a model of its own: build it with finetune.build_model")
    bb = model.backbone
    device = bb.ln_pre.weight.device
    model.requires_grad_(method == "baseline")
    if isinstance(model, WithSideNetwork):  # SideTuning, ForAda: the side network and the head train
        model.side.requires_grad_(True)
    elif method == "mlp3":
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
    elif method == "moe_ffd":
        grid = bb.image_size // bb.patch_size
        for block in bb.blocks:
            block.ln_1.requires_grad_(True)
            block.attn = ExpertAttention(block.attn, LoRAExperts(bb.width).to(device))
            block.adapter_experts = AdapterExperts(bb.width, grid).to(device)
            block.mlp.register_forward_hook(block.adapter_experts.hook)
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
    elif method in EVERY_LINEAR:
        for block in bb.blocks:
            for module, name, groups in linear_layers(block):
                parametrize.register_parametrization(module, name, weight_change(getattr(module, name), groups, method))
    model.head.requires_grad_(True)
    return model


def merge(model):
    """Write every weight change into its weight (W <- W') and drop the parametrizations: same outputs,
    no adapter cost. Hooks (adapter, VPT, MoE-FFD's experts) are not weight changes and stay."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def count_trainable(model):
    """Number of parameters that train (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------- the seams in train.py

def parametrized(modules, kind):
    """(module, weight name, change) of every parametrization of type `kind` among `modules`."""
    return [(m, name, plist[0]) for m in modules if parametrize.is_parametrized(m)
            for name, plist in m.parametrizations.items() if isinstance(plist[0], kind)]


def extra_loss(model, labels, mask=None):
    """L_extra, a method's own loss terms besides L_cls, each weighted as in its source, from the forward just
    run (labels (B,), the batch's blending masks (B, S, S) or None); None for the methods without any:
      AdaLoRA  0.5 · the mean of ||QQᵀ - I||_F and ||PᵀP - I||_F over its matrices (PEFT's orth_reg_weight)
      Effort   1.0 · the mean over its weights of ½||UUᵀ - I||_F + ½||VVᵀ - I||_F + | ||W'||²_F - ||W||²_F |
      MoE-FFD  200 · the mean L_balance of the LoRA experts + 1 · that of the adapter experts
      ForAda   20·L_boundary + 2·L_intra + 1·L_clip, from the masks (forensics_adapter.py)
    `model` may be wrapped (DDP, torch.compile): its modules are searched.
    """
    modules, terms = list(model.modules()), []
    adalora = [change.orthogonality() for _, _, change in parametrized(modules, AdaLoRA)]
    if adalora:
        terms.append(ADALORA_ORTH_WEIGHT * torch.cat(adalora).mean())
    effort = [change.regulariser(getattr(m, name)) for m, name, change in parametrized(modules, SVDResidual)]
    if effort:
        terms.append(EFFORT_WEIGHT * torch.cat(effort).mean())
    for weight, kind in zip(BALANCE_WEIGHTS, (LoRAExperts, AdapterExperts)):
        balance = [m.balance for m in modules if isinstance(m, kind) and m.balance is not None]
        if balance:
            terms.append(weight * torch.stack(balance).mean())
    for m in modules:
        if isinstance(m, ForensicsAdapter) and (forada := m.loss(labels, mask)) is not None:
            terms.append(forada)
    return sum(terms) if terms else None


def after_step(model, step, total):
    """What a method does after optimizer step `step` (1, 2, ...) of `total`, with the step's gradients still
    in place: AdaLoRA's rank allocation; nothing for the others."""
    changes = [change for _, _, change in parametrized(model.modules(), AdaLoRA)]
    if changes:
        allocate(changes, step, total, target_rank=ADALORA_TARGET_R, **ADALORA_SCHEDULE)


# ---------------------------------------------------------------------------------- a model to train

def build_model(method, config, backbone=None, convnext=None):
    """DFD-HR of `config` (method "dfdhr"), or `method` of supp. Tab. A applied to it, or a method of
    supp. Tab. 6 that replaces the model (compared.METHODS; MRA's ConvNeXt from the checkpoint
    `convnext`): the one place a model to train is built (train.py, predict.py, the benchmarks)."""
    if method in compared.METHODS:
        return compared.build_model(method, config, backbone, convnext)
    model = OWN_MODELS.get(method, DFDHR)(config, backbone)
    return model if method == "dfdhr" else apply(model, method)

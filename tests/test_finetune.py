"""finetune/: the methods and their weight changes (weight_changes.py): each method of supp. Tab. A trains exactly its parameters, starts where
the paper's method starts, and computes what its paper writes: checked against numpy decompositions, hand
formulas, second implementations written out here, and for LoHa, LoKr, AdaLoRA, OFT and BOFT the PEFT library
itself, holding the same weights and adapter parameters. SideTuning, ForAda and MoE-FFD against their own
equations: tests/test_added_networks.py."""
import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import finetune
import train
from finetune import weight_changes
from dfdhr import DFDHR, dfdhr_loss, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = make_config("small", "baseline")
L, D, P = CFG.layers, CFG.width, CFG.embed_dim
HEAD = 2 * P + 2  # Linear(P, 2)

# Expected trainable parameters, written from the method descriptions: a name pattern (besides the
# head, which always trains), the number of such tensors, and for the added methods their size.
LINEAR = (r"backbone\.transformer\.resblocks\.\d+\.(attn\.parametrizations\.in_proj_weight|attn\.out_proj\."
          r"parametrizations\.weight|mlp\.c_fc\.parametrizations\.weight|mlp\.c_proj\.parametrizations\.weight)\.0\.")
ATTN = (r"backbone\.transformer\.resblocks\.\d+\.attn\."
        r"(parametrizations\.in_proj_weight|out_proj\.parametrizations\.weight)\.0\.")
LAST4 = "|".join(str(i) for i in range(L - 4, L))
r = finetune.RANK
GROUPS = [(D, D)] * 4 + [(4 * D, D), (D, 4 * D)]  # (O, I) of q, k, v, out, c_fc, c_proj
LORA_SIZE = L * sum(r * (O + I) for O, I in GROUPS)
# LoKr at D = 128: 128 = 8·16, 512 = 16·32; W1 (l, p) and W2 (k, q) full (r = 16 is not below max(k, q)/2)
LOKR_SIZE = L * (4 * (8 * 8 + 16 * 16) + 2 * (16 * 8 + 32 * 16))
OFT_SIZE = L * sum(16 * (I // 16) * (I // 16 - 1) // 2 for _, I in GROUPS)  # 16 blocks of b(b - 1)/2
BOFT_SIZE = L * sum(16 * (I // 16) ** 2 + O for O, I in GROUPS)  # 16 whole b × b blocks and the scale s
ADALORA_SIZE = L * sum(24 * (O + I + 1) for O, I in GROUPS)  # initial rank 24: P, Q and Λ
MOE = r"backbone\.transformer\.resblocks\.\d+\.(ln_1\.|attn\.lora_experts\.|adapter_experts\.)"
MOE_SIZE = L * (sum((8, 16, 32, 48, 64, 96, 128)) * 4 * D + 2 * 7 * D  # LoRA experts (D -> r -> 3D), gate
                + 5 * (D * 8 + 8 + 8 * 8 * 9 + 8 + 8 * D + D) + 2 * 5 * D + 2 * D)  # adapter experts, gate, ln_1
ALEXNET = (3 * 64 * 121 + 64) + (64 * 192 * 25 + 192) + (192 * 384 * 9 + 384) + (384 * 256 * 9 + 256) \
    + (256 * 256 * 9 + 256) + (256 * P + P)
EXPECTED = {  # method: (pattern, tensors, numel or None)
    "baseline": (r".*", None, None),
    "linear_probe": (r"$^", 0, 0),
    "mlp3": (r"$^", 0, 0),
    "partial4": (rf"backbone\.(transformer\.resblocks\.({LAST4})\..*|ln_post\..*|proj)", 4 * 12 + 2 + 1, None),
    "ln_tuning": (r"backbone\.(ln_pre|ln_post|transformer\.resblocks\.\d+\.ln_[12])\.(weight|bias)$", 4 * L + 4, None),
    "bias_tuning": (r"backbone\..*bias$", 6 * L + 2, None),
    "vpt_deep": (r"backbone\.transformer\.resblocks\.\d+\.prompts\.tokens$", L, L * 5 * D),
    "side_tuning": (r"side\.(net\..*|a)", 12 + 1, ALEXNET + 1),
    "adapter": (r"backbone\.transformer\.resblocks\.\d+\.adapter_(attn|mlp)\.(down|up)\.(weight|bias)$", 8 * L,
                L * 2 * (2 * D * 64 + 64 + D)),
    "forada": (r"side\..*", None, None),  # its counts: tests/test_added_networks.py
    "lora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "gaussian_lora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "pissa": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "olora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "rslora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "dora": (LINEAR + "(A|B|m)$", 12 * L, LORA_SIZE + L * (3 * D + D + 4 * D + D)),
    "loha": (LINEAR + "(w1a|w1b|w2a|w2b)$", 16 * L, 2 * LORA_SIZE),
    "lokr": (LINEAR + "(w1|w2)$", 8 * L, LOKR_SIZE),
    "adalora": (LINEAR + "(A|B|E)$", 12 * L, ADALORA_SIZE),
    "ia3": (r"backbone\.transformer\.resblocks\.\d+\.(attn\.parametrizations\.in_proj_(weight|bias)|"
            r"mlp\.c_proj\.parametrizations\.weight)\.0\.l$", 2 * L, L * (2 * D + 4 * D)),
    "oft": (LINEAR + "q$", 4 * L, OFT_SIZE),
    "boft": (LINEAR + "(Z|s)$", 8 * L, BOFT_SIZE),
    "effort": (ATTN + "(U|S|Vh)$", 6 * L, L * 4 * (D + 1 + D)),
    "moe_ffd": (MOE + ".*", 2 * L + (2 * 7 + 2 + 5 * 6 + 2) * L, MOE_SIZE),
}
UNCHANGED_AT_INIT = ("adapter", "lora", "rslora", "pissa", "olora", "gaussian_lora", "dora", "ia3", "effort", "loha",
                     "lokr", "adalora", "oft", "boft", "moe_ffd")


def base_model(seed=0):
    """A random baseline model, with the non-zero biases and LayerNorm gains of a trained one."""
    torch.manual_seed(seed)
    model = DFDHR(CFG).eval()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def adapted(method, seed=0):
    """(base, adapted copy) of the same random model; SideTuning and ForAda build their own model around a
    copy of the base's backbone (and, SideTuning, of its head)."""
    base = base_model(seed)
    if method not in finetune.OWN_MODELS:
        return base, finetune.apply(copy.deepcopy(base), method).eval()
    model = finetune.build_model(method, CFG, copy.deepcopy(base.backbone))
    if method == "side_tuning":
        model.head.load_state_dict(base.head.state_dict())
    return base, model.eval()


@torch.no_grad()
def perturb(model, scale=0.05, seed=2):
    """Move every trainable parameter off its init (B = 0, up = 0 make other gradients vanish)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


def blend_masks(n, size, seed=3):
    """Blending masks (n, size, size) of alternating real (zero) and fake frames: a soft rectangle each."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size)
    for i in range(1, n, 2):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        masks[i, top:top + size // 2, left:left + size // 3] = 0.5 + 0.5 * torch.rand((), generator=g)
    return masks


def test_methods_list():
    """The 24 rows of supp. Tab. A besides DFD-HR, in its order."""
    assert finetune.METHODS[0] == "baseline" and "dfdhr" not in finetune.METHODS and len(finetune.METHODS) == 24
    assert set(EXPECTED) == set(finetune.METHODS)


@pytest.mark.parametrize("method", finetune.METHODS)
def test_only_intended_parameters_train(method, inputs):
    """Exactly the method's parameters and the head get a non-zero gradient; the frozen ones none. The loss is
    train.py's: L_cls and the method's own terms (MoE-FFD's experts over 12 batches, as each image picks one
    adapter expert of five)."""
    _, model = adapted(method)
    pattern, tensors, numel = EXPECTED[method]
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if re.fullmatch(pattern, n) or n.startswith("head.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    if tensors is not None:
        assert sum(not n.startswith("head.") for n in trainable) == tensors
    head = HEAD if method != "mlp3" else 2 * (P * P + P) + HEAD  # MLP-3: P -> P -> P -> 2
    if numel is not None:
        assert finetune.count_trainable(model) == numel + head
    perturb(model)
    if method == "moe_ffd":  # the image gates back at W_g = 0, where their noise spreads the images over the experts
        for block in model.backbone.blocks:
            block.adapter_experts.gate.w_gate.data.zero_()
    model.train()
    y = torch.tensor([0, 1, 0, 1])
    torch.manual_seed(0)  # the gates' noise
    for seed in range(12 if method == "moe_ffd" else 1):
        out = model(inputs(CFG, 4, seed=1 + seed))
        dfdhr_loss(out, y, CFG, finetune.extra_loss(model, y, blend_masks(4, CFG.image_size))).total.backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("method", UNCHANGED_AT_INIT)
def test_output_unchanged_at_init(method, inputs):
    base, model = adapted(method)
    x = inputs(CFG, seed=1)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=1e-5)


def test_vpt_changes_the_output(inputs):
    base, model = adapted("vpt_deep")
    x = inputs(CFG, seed=1)
    assert (model(x).logits - base(x).logits).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["pissa", "olora", "effort"])
def test_decomposition_reconstructs_the_weight(method):
    """W' = W at init to 1e-5, and the trainable part is the paper's piece of W (numpy's SVD / QR)."""
    base, model = adapted(method)
    checked, originals = 0, dict(base.backbone.named_modules())
    for name, module in model.backbone.named_modules():
        for pname in getattr(module, "parametrizations", {}):
            W = getattr(originals[name], pname).detach().double().numpy()
            torch.testing.assert_close(getattr(module, pname).detach().double().numpy(), W, rtol=0, atol=1e-5)
            change = module.parametrizations[pname][0]
            G = 3 if pname == "in_proj_weight" else 1  # q, k, v adapted one by one
            for g, Wg in enumerate(np.split(W, G)):
                U, S, Vh = np.linalg.svd(Wg, full_matrices=False)
                if method == "pissa":  # s·BA is the best rank-r approximation of W
                    BA = change.scale * (change.B[g] @ change.A[g]).detach().double().numpy()
                    np.testing.assert_allclose(BA, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5)
                elif method == "olora":  # B orthonormal columns, A upper triangular: the first r of W = QR
                    B, A = change.B[g].detach().double().numpy(), change.A[g].detach().double().numpy()
                    np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-5)
                    np.testing.assert_allclose(A, np.triu(A), atol=1e-6)
                    Q, R = np.linalg.qr(Wg)
                    np.testing.assert_allclose(np.abs(B.T @ Q[:, :r]), np.eye(r), atol=1e-4)  # same span, up to sign
                else:  # effort: the trainable part holds the smallest singular value, the frozen one the rest
                    part = ((change.U[g] * change.S[g]) @ change.Vh[g]).detach().double().numpy()
                    np.testing.assert_allclose(np.linalg.svd(part, compute_uv=False)[0], S[-1], atol=1e-6 * S[0])
                    frozen = np.linalg.svd(Wg - part, compute_uv=False)
                    np.testing.assert_allclose(frozen[:-1], S[:-1], rtol=1e-4)
                    assert frozen[-1] < 1e-4 * S[0]
                    assert np.abs((Wg - part).T @ change.U[g].detach().double().numpy()).max() < 1e-4
            checked += 1
    assert checked == (2 if method == "effort" else 4) * L


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "effort", "loha", "lokr", "adalora", "oft",
                                    "boft"])
def test_merge_equals_unmerged(method, inputs):
    """`merge` writes W' into the weights: same output, plain weights a baseline model loads strictly."""
    _, model = adapted(method)
    perturb(model)
    x = inputs(CFG, seed=1)
    with torch.no_grad():
        unmerged = model(x).logits
    finetune.merge(model)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    plain = base_model(seed=5)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(plain(x).logits, unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "rslora", "pissa", "olora", "gaussian_lora"])
def test_lora_scales(method):
    """W' = W_frozen + s·BA with s = α/r, except rsLoRA's rank-stabilised α/√r."""
    scale = finetune.ALPHA / (r ** 0.5 if method == "rslora" else r)
    _, model = adapted(method)
    perturb(model)
    fc = model.backbone.blocks[1].mlp.c_fc
    change = fc.parametrizations.weight[0]
    assert change.scale == pytest.approx(scale)
    expected = fc.parametrizations.weight.original + scale * change.B[0] @ change.A[0]
    torch.testing.assert_close(fc.weight, expected)


@pytest.mark.parametrize("method", ["lora", "gaussian_lora"])
def test_lora_inits(method):
    """B = 0; A Kaiming-uniform (a = √5, nn.Linear's: U(±1/√in), std 1/√(3 in)) or Gaussian with std 1/r."""
    _, model = adapted(method)
    for module in (model.backbone.blocks[0].mlp.c_fc, model.backbone.blocks[0].mlp.c_proj):
        change = module.parametrizations.weight[0]
        fan_in = module.in_features
        assert not change.B.any()
        A = change.A.detach()
        if method == "lora":
            assert A.abs().max() <= fan_in ** -0.5
            assert A.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.05)
        else:
            assert A.std().item() == pytest.approx(1 / r, rel=0.05)
            assert A.abs().max() > 3 / r  # a Gaussian's tail, not a uniform's bound


def test_dora_magnitude_and_direction():
    """DoRA: m = ||W||_c at init (one per output feature) and W' = m·(W + sBA)/||W + sBA||_c, by hand."""
    base, model = adapted("dora")
    module = model.backbone.blocks[0].attn
    change = module.parametrizations.in_proj_weight[0]
    W = base.backbone.blocks[0].attn.in_proj_weight.detach().double().numpy()  # (3D, D)
    np.testing.assert_allclose(change.m.detach().double().numpy(), np.sqrt((W ** 2).sum(1)), rtol=1e-6)
    perturb(model)
    s = change.scale
    m, A, B = (t.detach().double().numpy() for t in (change.m, change.A, change.B))
    V = W + s * np.concatenate([B[g] @ A[g] for g in range(3)])
    by_hand = m[:, None] * V / np.sqrt((V ** 2).sum(1, keepdims=True))
    np.testing.assert_allclose(module.in_proj_weight.detach().double().numpy(), by_hand, atol=1e-6)


def manual_block(block, x, *, lk=1, lv=1, lff=1):
    """A pre-LN block written out from its weights, with (IA)³'s rescaling of keys, values, MLP hidden."""
    H = block.attn.heads
    h = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias)
    q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
    k, v = k * lk, v * lv
    split = lambda t: t.unflatten(-1, (H, D // H)).transpose(1, 2)  # noqa: E731  (B, H, N, D/H)
    att = (split(q) @ split(k).transpose(-1, -2) / (D // H) ** 0.5).softmax(-1) @ split(v)
    x = x + block.attn.out_proj(att.transpose(1, 2).flatten(2))
    h = F.layer_norm(x, (D,), block.ln_2.weight, block.ln_2.bias)
    hidden = block.mlp.c_fc(h)
    return x + block.mlp.c_proj(hidden * torch.sigmoid(1.702 * hidden) * lff)


@torch.no_grad()
def test_ia3_rescales_keys_values_and_mlp_hidden():
    base, model = adapted("ia3")
    perturb(model, scale=0.3)
    x = torch.randn(2, CFG.num_tokens, D)
    block = model.backbone.blocks[2]
    kv = block.attn.parametrizations.in_proj_weight[0].l
    lff = block.mlp.c_proj.parametrizations.weight[0].l
    expected = manual_block(base.backbone.blocks[2], x, lk=kv[:D], lv=kv[D:], lff=lff)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(block(x), base.backbone.blocks[2](x), atol=1e-3)


@torch.no_grad()
def test_adapters_sit_on_sublayer_outputs_before_the_residual():
    base, model = adapted("adapter")
    perturb(model)
    x = torch.randn(2, CFG.num_tokens, D)
    block, plain = model.backbone.blocks[3], base.backbone.blocks[3]

    def adapter(a, h):  # Houlsby: h + up(GELU(down(h)))
        return h + a.up(F.gelu(a.down(h)))

    x1 = x + adapter(block.adapter_attn, plain.attn(plain.ln_1(x)))
    expected = x1 + adapter(block.adapter_mlp, plain.mlp(plain.ln_2(x1)))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_vpt_deep_against_explicit_prompts(inputs):
    """VPT-deep written out: each layer's input is [CLS, its own prompts, patches] (the paper's order)."""
    base, model = adapted("vpt_deep")
    x = inputs(CFG, seed=1)
    bb = base.backbone
    h = bb.embed(x)  # (B, N, D)
    for block, vpt in zip(bb.blocks, model.backbone.blocks):
        P = vpt.prompts.tokens.expand(len(h), -1, -1)
        out = block(torch.cat([h[:, :1], P, h[:, 1:]], 1))  # (B, 1 + P + N-1, D)
        h = torch.cat([out[:, :1], out[:, 1 + len(vpt.prompts.tokens):]], 1)  # prompt outputs discarded
    expected = base.head(bb.project(h[:, 0]))
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", finetune.METHODS)
def test_state_dict_loads_into_the_same_method(method, inputs):
    """What train.py's resume does: a fresh model, the same `build_model`, a strict load, the same outputs."""
    _, model = adapted(method, seed=0)
    perturb(model)
    torch.manual_seed(7)
    other = finetune.build_model(method, CFG).eval()
    other.load_state_dict(model.state_dict())
    x = inputs(CFG, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, model(x).logits, rtol=0, atol=0)


def test_refuses_unknown_method_routed_model_and_a_model_not_its_own():
    with pytest.raises(ValueError, match="unknown method"):
        finetune.apply(base_model(), "lycoris")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="baseline"):
        finetune.apply(DFDHR(make_config("small")), "lora")
    with pytest.raises(ValueError, match="build_model"):
        finetune.apply(base_model(), "forada")


# ---------------------------------------------------------------------------------- against the PEFT library

class Reference(nn.Module):
    """The layout the PEFT library adapts in Hugging Face's CLIP: q, k, v three layers; and a wider layer."""

    def __init__(self, width=64, hidden=96):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.fc = nn.Linear(width, hidden)

    def forward(self, x):  # the outputs, and a loss AdaLoRA's model adds its regulariser to
        return SimpleOutput(torch.cat([self.q(x), self.k(x), self.v(x)], -1), self.fc(x), torch.zeros(()))


class SimpleOutput:
    def __init__(self, qkv, fc, loss):
        self.qkv, self.fc, self.loss = qkv, fc, loss


class Ours(nn.Module):
    """The same weights in this project's layout: q, k, v fused (a change with G = 3) and fc (G = 1)."""

    def __init__(self, ref, change):
        super().__init__()
        self.qkv = nn.Linear(ref.q.in_features, 3 * ref.q.out_features)
        self.fc = copy.deepcopy(ref.fc)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([ref.q.weight, ref.k.weight, ref.v.weight]))
            self.qkv.bias.copy_(torch.cat([ref.q.bias, ref.k.bias, ref.v.bias]))
        for layer, groups in ((self.qkv, 3), (self.fc, 1)):
            parametrize.register_parametrization(layer, "weight", change(layer.weight, groups))

    def forward(self, x):
        return self.qkv(x), self.fc(x)


# our parameter <- the PEFT layer's ParameterDict (or ModuleDict) of that name
PEFT_NAMES = {"loha": dict(w1a="hada_w1_a", w1b="hada_w1_b", w2a="hada_w2_a", w2b="hada_w2_b"),
              "lokr": dict(w1="lokr_w1", w2="lokr_w2", w2a="lokr_w2_a", w2b="lokr_w2_b"),
              "adalora": dict(A="lora_A", B="lora_B", E="lora_E"), "oft": dict(q="oft_R"),
              "boft": dict(Z="boft_R", s="boft_s")}


@torch.no_grad()
def paired(method, config, change, seed=0):
    """(PEFT's model, ours) on the same random weights, the PEFT adapter's parameters drawn at random off its
    init and copied into ours, group by group."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    ref = Reference()
    ours = Ours(ref, change)
    theirs = peft.get_peft_model(copy.deepcopy(ref), config)
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            p.copy_((1.0 if name.endswith("boft_s.default") else 0.0) + 0.3 * torch.randn_like(p))
    for layer, refs in ((ours.qkv, "qkv"), (ours.fc, ["fc"])):
        change = layer.parametrizations.weight[0]
        for g, ref_name in enumerate(refs):
            ref_layer = getattr(theirs.base_model.model, ref_name)
            for mine, their_name in PEFT_NAMES[method].items():
                if mine in dict(change.named_parameters()):
                    t = getattr(ref_layer, their_name)["default"]
                    getattr(change, mine)[g].copy_((t.weight if isinstance(t, nn.Module) else t).reshape_as(
                        getattr(change, mine)[g]))
    return theirs, ours


def assert_same_as_peft(theirs, ours, atol=1e-5):
    """The same outputs, and the same weights W' (PEFT's merged into its layers): max |Δ| below atol."""
    x = torch.randn(7, ours.qkv.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, (qkv, fc) = theirs(x), ours(x)
        torch.testing.assert_close(qkv, out.qkv, rtol=0, atol=atol)
        torch.testing.assert_close(fc, out.fc, rtol=0, atol=atol)
        merged = copy.deepcopy(theirs).merge_and_unload()
        torch.testing.assert_close(ours.qkv.weight, torch.cat([merged.q.weight, merged.k.weight, merged.v.weight]),
                                   rtol=0, atol=atol)
        torch.testing.assert_close(ours.fc.weight, merged.fc.weight, rtol=0, atol=atol)


TARGETS = ["q", "k", "v", "fc"]


def test_loha_as_peft():
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(r=4, alpha=finetune.ALPHA, target_modules=TARGETS)
    assert_same_as_peft(*paired("loha", config, lambda W, g: weight_changes.LoHa(W, g, rank=4, alpha=finetune.ALPHA)))


@pytest.mark.parametrize("rank", [2, 16])  # W2 low-rank (2 < max(k, q)/2 = 4 or 6) or whole
def test_lokr_as_peft(rank):
    peft = pytest.importorskip("peft")
    from peft.tuners.lokr.layer import factorization
    assert all(weight_changes.factorization(n) == factorization(n) for n in range(1, 4100))
    config = peft.LoKrConfig(r=rank, alpha=finetune.ALPHA, target_modules=TARGETS)
    theirs, ours = paired("lokr", config, lambda W, g: weight_changes.LoKr(W, g, rank=rank, alpha=finetune.ALPHA))
    assert ours.fc.parametrizations.weight[0].low_rank == (rank == 2)
    assert_same_as_peft(theirs, ours)


def test_oft_as_peft():
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(r=4, oft_block_size=0, target_modules=TARGETS)  # 4 blocks of 16
    theirs, ours = paired("oft", config, lambda W, g: weight_changes.OFT(W, g, blocks=4))
    assert_same_as_peft(theirs, ours)
    R = ours.fc.parametrizations.weight[0].rotations()  # the Neumann series leaves R near, not at, orthogonal
    assert (R @ R.mT - torch.eye(16)).abs().max() > 1e-3


class BlockDiagonal:
    """What PEFT's CUDA extension for BOFT computes (its `fbd_cuda.forward`), in torch: without the
    extension, PEFT sets the butterfly factor to 1."""

    @staticmethod
    def forward(blocks):  # (m, n_b, b, b) -> [(m, n_b·b, n_b·b)]
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_boft_as_peft(factors, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: BlockDiagonal)
    config = peft.BOFTConfig(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=factors,
                             target_modules=TARGETS)
    theirs, ours = paired("boft", config, lambda W, g: weight_changes.BOFT(W, g, blocks=4, factors=factors))
    assert theirs.base_model.model.fc.boft_R["default"].shape[0] == factors
    assert_same_as_peft(theirs, ours)
    M = ours.fc.parametrizations.weight[0].butterfly()  # the exact Cayley map: orthogonal
    torch.testing.assert_close(M @ M.mT, torch.eye(64).expand_as(M), rtol=0, atol=1e-5)


def test_adalora_as_peft_before_and_through_its_rank_allocation():
    """The same ΔW and regulariser; then the same gradients, step after step through AdaLoRA's schedule (warm-up
    to t_init, budget falling with masks every Δ_T steps, the final mask at T - t_final, then kept), give the
    same smoothed importances, the same triplets zeroed and the same ΔW."""
    peft = pytest.importorskip("peft")
    T, schedule = 10, dict(tinit=2, tfinal=3, delta_t=2, beta1=0.85, beta2=0.85)
    config = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=T, tinit=2, tfinal=3, deltaT=2, target_modules=TARGETS)
    theirs, ours = paired("adalora", config, lambda W, g: weight_changes.AdaLoRA(W, g, rank=6, alpha=config.lora_alpha))
    assert_same_as_peft(theirs, ours)
    x = torch.randn(7, 64)
    assert finetune.extra_loss(ours, None).item() == pytest.approx(theirs.base_model(x).loss.item(), abs=1e-5)
    changes = [layer.parametrizations.weight[0] for layer in (ours.qkv, ours.fc)]
    layers = [[getattr(theirs.base_model.model, n) for n in "qkv"], [theirs.base_model.model.fc]]
    g = torch.Generator().manual_seed(1)
    masked = []
    for step in range(1, T + 2):
        for change, refs in zip(changes, layers):
            for name, their_name in PEFT_NAMES["adalora"].items():
                mine = getattr(change, name)
                mine.grad = torch.randn(mine.shape, generator=g)
                for i, ref in enumerate(refs):
                    t = getattr(ref, their_name)["default"]
                    t.grad = mine.grad[i].reshape_as(t)
        theirs.base_model.update_and_allocate(step)
        weight_changes.allocate(changes, step, T, target_rank=2, **schedule)
        allocator = theirs.base_model.rankallocator
        names = {p: n for n, p in theirs.base_model.model.named_parameters()}
        for change, refs in zip(changes, layers):
            for i, ref in enumerate(refs):
                torch.testing.assert_close(change.E[i], ref.lora_E["default"][:, 0], rtol=0, atol=0)
                for name, their_name in PEFT_NAMES["adalora"].items():  # Ī and Ū, until PEFT clears them at 7
                    t = getattr(ref, their_name)["default"]
                    for mine, ema in ((f"{name}_ipt", allocator.exp_avg_ipt), (f"{name}_unc", allocator.exp_avg_unc)):
                        expected = ema.get(names[t], torch.zeros_like(t)).reshape(getattr(change, mine)[i].shape)
                        torch.testing.assert_close(getattr(change, mine)[i], expected, rtol=1e-6, atol=1e-10)
        masked.append(sum(int((c.E == 0).sum()) for c in changes))
        assert_same_as_peft(theirs, ours)
        with torch.no_grad():  # training moves E on, pruned triplets too: the mask has to hold them at zero
            for change, refs in zip(changes, layers):
                change.E.add_(0.1)
                for i, ref in enumerate(refs):
                    ref.lora_E["default"].add_(0.1)
    assert masked[0] == masked[1] == 0  # warm-up: nothing masked until t_init
    assert masked[2] == 0 and masked[3] > 0  # step 3 is odd; step 4 masks
    assert masked[6] == 4 * (6 - 2)  # at T - t_final the final budget, 2 of 6 triplets per matrix
    assert masked[7:] == [masked[6]] * 4  # then kept


def test_effort_regulariser_against_the_whole_singular_bases():
    """Effort's ½||UUᵀ - I||_F + ½||VVᵀ - I||_F + | ||W'||²_F - ||W||²_F | as its release computes it, from the
    whole U = [U_main, U_r] and V = [V_main; V_r] (numpy's SVD of the original weight), once training moved U_r,
    Σ_r, V_r: the same as `regulariser`, which keeps only where U_r and V_r started; extra_loss averages it."""
    base, model = adapted("effort")
    assert finetune.extra_loss(model, None).item() < 1e-3  # at init U, V are orthonormal and W' = W
    perturb(model, scale=0.05)
    values = []
    for i in range(L):
        module = model.backbone.blocks[i].attn
        change = module.parametrizations.in_proj_weight[0]
        W = base.backbone.blocks[i].attn.in_proj_weight.detach().double().numpy()
        expected = []
        for g, Wg in enumerate(np.split(W, 3)):
            U, S, Vh = np.linalg.svd(Wg)
            Ur, Sr, Vr = (t[g].detach().double().numpy() for t in (change.U, change.S, change.Vh))
            U_all, V_all = np.concatenate([U[:, :-1], Ur], 1), np.concatenate([Vh[:-1], Vr], 0)
            orth = 0.5 * np.linalg.norm(U_all @ U_all.T - np.eye(D)) + 0.5 * np.linalg.norm(V_all @ V_all.T - np.eye(D))
            W_now = (U[:, :-1] * S[:-1]) @ Vh[:-1] + (Ur * Sr) @ Vr
            expected.append(orth + abs((W_now ** 2).sum() - (Wg ** 2).sum()))
        got = change.regulariser(module.in_proj_weight).detach().double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
        values.append(got)
        values.append(module.out_proj.parametrizations.weight[0].regulariser(module.out_proj.weight).detach().numpy())
    assert min(np.concatenate(values)) > 1e-3  # training moved every weight off its start
    extra = finetune.extra_loss(model, None).item()
    assert extra == pytest.approx(finetune.EFFORT_WEIGHT * np.concatenate(values).mean(), rel=1e-5)


@pytest.mark.parametrize("method", ["side_tuning", "forada", "loha", "lokr", "adalora", "oft", "boft", "moe_ffd"])
def test_added_rows_train_and_evaluate_through_train_py(method, tmp_path, tiny_run):
    """Two steps and an evaluation by `train.py --method=NAME`. The method's own loss terms reach L (ForAda's from
    the SBI protocol's blending masks, split into micro-batches with the frames) and AdaLoRA's allocation runs
    after each step: at the run's end, T = 2, the final budget keeps 16 of every matrix's 24 triplets."""
    sbi = ["--synthetic_protocol=sbi", "--synthetic_test_videos=2", "--test_frames_per_video=1", "--micro_batch_size=2"]
    sbi = sbi if method == "forada" else []
    train.main(tiny_run + sbi + [f"--method={method}", "--max_iters=2", f"--out_dir={tmp_path}"])
    steps = json.loads((tmp_path / "history.json").read_text())["steps"]
    assert len(steps) == 2 and all(s["loss"] == pytest.approx(s["ce"] + s["extra"]) for s in steps)
    assert all(s["extra"] > 0 for s in steps) == (method in ("forada", "adalora", "moe_ffd"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(m["video_auc"] is not None for m in metrics.values())
    if method == "adalora":
        E = [v for k, v in torch.load(tmp_path / "last.pt", weights_only=True)["model"].items() if k.endswith(".E")]
        assert sum(int((e == 0).sum()) for e in E) == sum(e.shape[0] for e in E) * (24 - 16)


def test_moe_ffd_and_forada_train_in_one_process(monkeypatch, tmp_path, tiny_run):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before any process group starts
    for method in finetune.ONE_PROCESS:
        with pytest.raises(SystemExit, match=f"--method={method} trains in one process"):
            train.main(tiny_run + [f"--method={method}", f"--out_dir={tmp_path}"])

"""finetune/added_networks.py and finetune/forensics_adapter.py: MoE-FFD, SideTuning and ForAda against their defining equations,
written out here pixel by pixel, token by token and pair by pair (scipy for the normal CDF and the blur)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

import finetune
from finetune.added_networks import AlexNet, NoisyTopOneGate, PixelDifferenceConv
from dfdhr import DFDHR, make_config
from finetune.forensics_adapter import QUERIES, frame_contrast, masked_block, patch_contrast, query_mask

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = make_config("small", "baseline")
D = CFG.width


def built(method, seed=0):
    """`method` built around a random baseline model's backbone, every trainable parameter moved off its init."""
    torch.manual_seed(seed)
    model = finetune.build_model(method, CFG).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def softmax_attention(q, k, v, bias=0.0):  # (n, d) each -> (n, d), one head written out
    w = np.exp(q @ k.T / np.sqrt(q.shape[1]) + bias)
    return (w / w.sum(1, keepdims=True)) @ v


# ---------------------------------------------------------------------------------- MoE-FFD

RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # directions d_1..d_8
CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]  # MoE-FFD's angular permutation of the 3 × 3 taps


def difference_at(kind, x, w, b, r, c):
    """One output pixel (channels,) of a pixel-difference convolution from its definition; x (C, H, W), w (C', C, 3, 3).
    Taps i = 0..8 row by row, at offsets o_i; centre i = 4; w_k (k = 1..8) the taps after the first."""
    taps = [(i // 3 - 1, i % 3 - 1) for i in range(9)]
    at = lambda dr, dc: x[:, r + dr, c + dc]  # noqa: E731
    wf = w.reshape(*w.shape[:2], 9)
    if kind == "cv":
        y = sum(wf[..., i] @ at(*taps[i]) for i in range(9))
    elif kind == "cd":  # neighbours' differences to the centre, the centre tap plain
        y = sum(wf[..., i] @ (at(*taps[i]) - at(0, 0)) for i in range(9) if i != 4) + wf[..., 4] @ at(0, 0)
    elif kind == "ad":  # each tap's weight minus its clockwise neighbour's
        y = sum((wf[..., i] - (wf[..., CLOCKWISE[i]] if i != 4 else 0)) @ at(*taps[i]) for i in range(9))
    elif kind == "rd":  # along each direction: the pixel two steps out minus the one a step out
        y = wf[..., 0] @ at(0, 0) + sum(wf[..., k + 1] @ (at(2 * dr, 2 * dc) - at(dr, dc))
                                        for k, (dr, dc) in enumerate(RING))
    else:  # scd: second differences x(p + 2d) - 2x(p + d) + ..., the centre with the weights' sum
        y = wf.sum(-1) @ at(0, 0) + sum(wf[..., k + 1] @ (at(2 * dr, 2 * dc) - 2 * at(dr, dc))
                                        for k, (dr, dc) in enumerate(RING))
    return y + b


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd", "scd"])
def test_pixel_difference_convolutions_against_their_definitions(kind):
    conv = PixelDifferenceConv(3, kind)
    if kind in ("cv", "cd", "ad"):  # MoE-FFD's identity init is the identity for these three
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(conv(x), x + conv.bias[:, None, None])
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(1, 3, 7, 7)
    y = conv(x)[0].detach().numpy()
    w, b, xn = conv.weight.detach().numpy(), conv.bias.detach().numpy(), x[0].numpy()
    for r in range(2, 5):  # pixels whose 5 × 5 neighbourhood lies inside (no padding involved)
        for c in range(2, 5):
            np.testing.assert_allclose(y[:, r, c], difference_at(kind, xn, w, b, r, c), atol=1e-5)


def test_noisy_top_one_gate_by_hand():
    """Choice = the top noisy logit; importance = counts; load = Σ Φ((clean - threshold)/std), the threshold the
    runner-up for the top expert and the top for the others; L_balance = cv² + cv² (unbiased variance)."""
    gate = NoisyTopOneGate(6, 4).train()
    with torch.no_grad():
        gate.w_gate.normal_()
        gate.w_noise.normal_()
    x = torch.randn(40, 6)
    torch.manual_seed(3)
    choice, balance = gate(x)
    torch.manual_seed(3)
    eps = torch.randn(40, 4).numpy()
    clean = (x @ gate.w_gate).detach().numpy()
    std = np.log1p(np.exp((x @ gate.w_noise).detach().numpy())) + 0.01
    noisy = clean + eps * std
    order = np.sort(noisy, 1)
    first, second = order[:, -1:], order[:, -2:-1]
    load = np.where(noisy > second, stats.norm.cdf((clean - second) / std),
                    stats.norm.cdf((clean - first) / std)).sum(0)
    importance = np.bincount(noisy.argmax(1), minlength=4)
    cv2 = lambda v: v.var(ddof=1) / v.mean() ** 2  # noqa: E731
    np.testing.assert_array_equal(choice.numpy(), noisy.argmax(1))
    assert balance.item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-4)
    gate.eval()
    choice, balance = gate(x)  # no noise: the clean top; load = the counts
    counts = np.bincount(clean.argmax(1), minlength=4)
    np.testing.assert_array_equal(choice.numpy(), clean.argmax(1))
    assert balance.item() == pytest.approx(2 * cv2(counts), rel=1e-5)


@torch.no_grad()
def test_moe_ffd_block_token_by_token():
    """A block of MoE-FFD written out: q, k, v of token t changed by B_e A_e h_t of its expert e = argmax h_t·W_g
    (eval: no noise), the attention per head, then x1 + MLP(h) + adapter_e(h) with h = ln_2(x1), e the image's
    expert from its mean token, the adapter down → its convolution (on the grid, the CLS alone) → up."""
    model = built("moe_ffd")
    block = model.backbone.blocks[1]
    x = torch.randn(2, CFG.num_tokens, D)
    h = block.ln_1(x)
    lora = block.attn.lora_experts
    experts = (h @ lora.gate.w_gate).argmax(-1)  # (B, N)
    assert len(experts.unique()) > 1
    qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
    for b in range(2):
        for t in range(CFG.num_tokens):
            e = lora.experts[int(experts[b, t])]
            qkv[b, t] += e.B @ (e.A @ h[b, t])
    heads, d = CFG.heads, D // CFG.heads
    attn = np.zeros((2, CFG.num_tokens, D), np.float32)
    for b in range(2):
        for i in range(heads):
            q, k, v = (qkv[b, :, j * D + i * d: j * D + (i + 1) * d].numpy() for j in range(3))
            attn[b, :, i * d:(i + 1) * d] = softmax_attention(q, k, v)
    x1 = x + block.attn.out_proj(torch.from_numpy(attn))
    h = block.ln_2(x1)
    adapters = block.adapter_experts
    expected = x1 + block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(h)))  # CLIP's MLP, its layers called one by one
    for b, e in enumerate((h.mean(1) @ adapters.gate.w_gate).argmax(-1).tolist()):
        a = adapters.experts[e]
        z = a.down(h[b])  # (N, c)
        grid = int((CFG.num_tokens - 1) ** 0.5)
        patches = a.conv(z[1:].T.reshape(1, -1, grid, grid))[0].flatten(1).T
        cls = a.conv(z[0].reshape(1, -1, 1, 1))[0, :, 0, 0]
        expected[b] += a.up(torch.cat([cls[None], patches]))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


def test_moe_ffd_extra_loss_weights_its_balances():
    """L_extra = 200 · the mean L_balance of the LoRA mixtures + 1 · that of the adapter mixtures."""
    model = built("moe_ffd").train()
    model(torch.randn(4, 3, CFG.image_size, CFG.image_size))
    lora = [b.attn.lora_experts.balance for b in model.backbone.blocks]
    adapters = [b.adapter_experts.balance for b in model.backbone.blocks]
    expected = 200 * torch.stack(lora).mean() + torch.stack(adapters).mean()
    assert finetune.extra_loss(model, None).item() == pytest.approx(expected.item(), rel=1e-6)
    model.eval()(torch.randn(2, 3, CFG.image_size, CFG.image_size))
    assert finetune.extra_loss(model, None) is None  # an evaluation leaves no balance behind


# ---------------------------------------------------------------------------------- SideTuning

@torch.no_grad()
def test_side_tuning_blends_the_frozen_feature_and_the_side_alexnet(inputs):
    """logits = head(α·f(x) + (1 - α)·s(x)), α = σ(a): f the frozen ViT's projected CLS (its own forward), s the
    AlexNet written out as convolutions, ReLUs, two 3/2 max-pools, a global mean and the linear map."""
    model = built("side_tuning")
    x = inputs(CFG, n=3, seed=4)
    conv = [m for m in model.side.net.features if isinstance(m, torch.nn.Conv2d)]
    s = F.max_pool2d(F.relu(F.conv2d(x, conv[0].weight, conv[0].bias, stride=4, padding=2)), 3, 2)
    s = F.max_pool2d(F.relu(F.conv2d(s, conv[1].weight, conv[1].bias, padding=2)), 3, 2)
    for c in conv[2:]:
        s = F.relu(F.conv2d(s, c.weight, c.bias, padding=1))
    s = model.side.net.proj(s.mean((2, 3)))
    alpha = torch.sigmoid(model.side.a)
    expected = model.head(alpha * model.backbone(x) + (1 - alpha) * s)
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)
    for size in (32, 64, 224):  # one side network for the tiny, small and paper views
        assert AlexNet(7)(torch.randn(1, 3, size, size)).shape == (1, 7)


# ---------------------------------------------------------------------------------- ForAda

@torch.no_grad()
def test_forada_queries_see_the_patches_biased_and_no_one_sees_them():
    """A CLIP block on [queries, CLS, patches] under `query_mask`: CLS and patches come out as the block gives them
    without the queries; each query's attention runs over itself and the patches, the bias added to the patches."""
    torch.manual_seed(0)
    block = DFDHR(CFG).backbone.blocks[2]
    B, Q, N, H = 2, 3, CFG.num_tokens, CFG.heads
    x = torch.randn(B, Q + N, D)
    bias = torch.randn(B, H, Q, N - 1)
    out = masked_block(block, x, query_mask(bias, N))
    torch.testing.assert_close(out[:, Q:], block(x[:, Q:]), rtol=0, atol=1e-5)
    h = block.ln_1(x)
    qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
    d = D // H
    for b in range(B):
        for j in range(Q):
            heads = []
            for i in range(H):
                q, k, v = (qkv[b, :, m * D + i * d: m * D + (i + 1) * d].numpy() for m in range(3))
                seen = [j, *range(Q + 1, Q + N)]  # itself and the patches, not CLS nor the other queries
                heads.append(softmax_attention(q[j:j + 1], k[seen], v[seen], np.r_[0, bias[b, i, j].numpy()]))
            x1 = x[b, j] + block.attn.out_proj(torch.from_numpy(np.concatenate(heads, 1)[0]).float())
            torch.testing.assert_close(out[b, j], x1 + block.mlp(block.ln_2(x1)), rtol=0, atol=1e-5)


def test_forada_targets_by_hand():
    """Face X-ray's boundary 4·M̃(1 - M̃), M̃ the mask blurred by [1 2 1]ᵀ[1 2 1]/16 with reflect-101 borders
    (cv2.GaussianBlur 3 × 3 at σ = 0; scipy's 'mirror'), and per patch: fake where over 10 % of its pixels exceed
    40/255, on the blend's edge where fake but not whole."""
    model = built("forada")
    torch.manual_seed(1)
    mask = torch.zeros(3, CFG.image_size, CFG.image_size)
    mask[1, 5:40, 9:30] = 0.8
    mask[2] = torch.rand(CFG.image_size, CFG.image_size) * 0.3
    fake, edge, boundary = model.targets(mask)
    k = np.outer([1, 2, 1], [1, 2, 1]) / 16
    for i in range(3):
        m = ndimage.convolve(mask[i].numpy(), k, mode="mirror")
        np.testing.assert_allclose(boundary[i].numpy(), 4 * m * (1 - m), atol=1e-6)
        p, g = CFG.patch_size, CFG.image_size // CFG.patch_size
        share = (mask[i].numpy() > 40 / 255).reshape(g, p, g, p).mean((1, 3)).flatten()
        np.testing.assert_array_equal(fake[i].numpy(), share > 0.1)
        np.testing.assert_array_equal(edge[i].numpy(), (share > 0.1) & (share < 1))
    assert fake[1].any() and edge[1].any() and not fake[0].any()


def test_forada_contrastive_terms_pair_by_pair():
    """L_intra: for the fake frames together, −log(Σ_RR e^{s/τ} / (Σ_RR e^{s/τ} + Σ_FR e^{s/τ})) over (real
    patch, real patch) and (fake patch, real patch) pairs of a frame; the frame term over (real frame, real frame:
    itself) and (real frame, its fake partner) patch pairs, with the partners torch draws."""
    torch.manual_seed(2)
    tokens, labels = torch.randn(4, 9, 5), torch.tensor([0, 1, 1, 0])
    fake_patch = torch.rand(4, 9) > 0.6
    z = F.normalize(tokens, dim=-1).numpy()
    pos = neg = 0.0
    for b in (1, 2):
        for i in range(9):
            for j in range(9):
                e = np.exp(z[b, i] @ z[b, j] / 0.5)
                if not fake_patch[b, j]:
                    pos, neg = (pos + e, neg) if not fake_patch[b, i] else (pos, neg + e)
    assert patch_contrast(tokens, fake_patch, labels).item() == pytest.approx(-np.log(pos / (pos + neg)), rel=1e-5)
    torch.manual_seed(3)
    got = frame_contrast(tokens, labels).item()
    torch.manual_seed(3)
    reals, fakes = np.flatnonzero(labels == 0)[torch.randperm(2)], np.flatnonzero(labels == 1)[torch.randperm(2)]
    pos = sum(np.exp(z[r] @ z[r].T / 0.5).sum() for r in reals)
    neg = sum(np.exp(z[r] @ z[f].T / 0.5).sum() for r, f in zip(reals, fakes))
    assert got == pytest.approx(-np.log(pos / (pos + neg)), rel=1e-5)
    assert frame_contrast(tokens[labels == 1], labels[labels == 1]).item() == 0  # no real frame: no term


def test_forada_loss_weights_and_needs_masks(inputs):
    """20·L_boundary + 2·L_intra + 1·L_clip from the forward's queries' maps and tokens; without masks (data that
    has none) ForAda trains on L_cls alone, and an evaluation leaves nothing behind."""
    model = built("forada").train()
    x, labels = inputs(CFG, n=4, seed=5), torch.tensor([0, 1, 0, 1])
    mask = torch.zeros(4, CFG.image_size, CFG.image_size)
    mask[1, 8:40, 8:48], mask[3, 16:56, 4:30] = 1.0, 0.6
    model(x)
    seen = model.seen
    assert seen.boundary.shape == (4, QUERIES, (CFG.image_size // CFG.patch_size) ** 2) and len(seen.intra) == 3
    fake, edge, target = model.targets(mask)
    pred = model.side.boundary_head((seen.boundary * edge[:, None]).unflatten(-1, (8, 8)))[:, 0]
    torch.manual_seed(0)
    expected = (20 * F.mse_loss(pred, target * labels[:, None, None])
                + 2 * sum(patch_contrast(t, fake, labels) for t in seen.intra)
                + patch_contrast(seen.clip, fake, labels) + frame_contrast(seen.clip, labels))
    torch.manual_seed(0)
    assert finetune.extra_loss(model, labels, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert finetune.extra_loss(model, labels, None) is None
    model.eval()(x)
    assert model.seen is None


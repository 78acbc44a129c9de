"""The component specification of DFD-HR: each piece against an independent computation.

  backbone      vit.py against Hugging Face's CLIP holding the same weights
  routers       the Gumbel gate against its CDF, the paper's update against its derivative, token
                selection against a per-sample loop, the soft Spearman against scipy, the mixture
                of adapters against a loop over experts and tokens, Eq. 13 written out
  model         the FLOPs formula against torch's FLOP counter and by hand; query pooling against
                a hand-written multi-head attention; the rank target is the original image's CLS;
                each branch uses its own routers; exits at inference; the released code's switches
  shapes        the paper preset on meta tensors (a smoke test: shapes only)

The other tests (checkpoint formats, data, training, reliability, figures) are in tests/.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dfdhr import (DFDHR, ConstantJudge, dfdhr_loss, estimate_flops, force_exit, make_config, original_image,
                   rank_loss, split_images)
from routing import MixtureOfAdapters, gumbel_sigmoid, num_kept, routed_update, run_on_selected, spearman_corr
from vit import load_clip


@pytest.fixture
def small_model(small):
    """A factory of seeded small-preset models, with config changes."""
    def make(seed=0, **changes):
        torch.manual_seed(seed)
        return DFDHR(replace(small, **changes))
    return make


# ============================================================================= backbone

@pytest.mark.parametrize("shape", [
    dict(width=64, layers=2, heads=2, patch=8, image=32, proj=48),  # tiny, head width 32
    dict(width=768, layers=12, heads=12, patch=16, image=224, proj=512),  # ViT-B/16
], ids=["tiny", "ViT-B-16"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_backbone_matches_hugging_face_clip(tmp_path, shape, safe, hf_clip):
    hf = hf_clip(**shape)
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    ours = load_clip(tmp_path).eval()
    assert (ours.width, len(ours.blocks), ours.heads, ours.patch_size, ours.image_size, ours.output_dim) == (
        shape["width"], shape["layers"], shape["heads"], shape["patch"], shape["image"], shape["proj"])
    x = torch.randn(2, 3, shape["image"], shape["image"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        assert (ours(x) - ref.image_embeds).abs().max() < 1e-4
        if shape["width"] == 64:  # every layer's hidden states, not just the end
            for a, b in zip(ours.hidden_states(x), ref.hidden_states, strict=True):
                assert (a - b).abs().max() < 1e-4


# ============================================================================= routers: layers

def test_gumbel_gate_is_hard_forward_soft_backward():
    logits = (3 * torch.randn(2000)).requires_grad_()
    w = torch.randn(2000)
    torch.manual_seed(1)
    p = gumbel_sigmoid(logits, tau=0.7)
    (p * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()  # the same U, the soft path written out
    torch.manual_seed(1)
    g = torch.logit(torch.rand(2000))  # the logistic's inverse CDF
    p_soft = torch.sigmoid((ref_logits + g) / 0.7)
    (p_soft * w).sum().backward()
    assert torch.equal(p.detach(), (p_soft > 0.5).float())  # exactly 0 or 1
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("draw, cdf", [("logistic", lambda a: torch.sigmoid(a)),  # P(a + logistic > 0)
                                       ("gumbel", lambda a: 1 - torch.exp(-torch.exp(a)))])  # P(a + Gumbel > 0)
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_gumbel_gate_fires_as_often_as_its_cdf_says(draw, cdf, tau):
    torch.manual_seed(0)
    n = 20000
    logit = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5])
    p = gumbel_sigmoid(logit[:, None].expand(-1, n), tau=tau, draw=draw)
    theory = cdf(logit)
    assert ((p.mean(1) - theory).abs() < 4 * (theory * (1 - theory) / n).sqrt()).all()


def test_gumbel_gate_at_inference_is_a_threshold():
    logits = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 2.0])
    assert torch.equal(gumbel_sigmoid(logits, training=False), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))


def test_routed_update_gradient_is_the_papers():
    torch.manual_seed(0)
    h_in, h_out, w = torch.randn(3, 2, 5, 8)
    p = torch.tensor([0.0, 1.0], requires_grad=True)
    (routed_update(h_in, h_out, p) * w).sum().backward()
    # d/dp [p·Layer(H) + (1 − p)·H] = Layer(H) − H, also in the row whose gate is 0
    torch.testing.assert_close(p.grad, ((h_out - h_in) * w).sum((1, 2)))


# ============================================================================= routers: tokens

def mixing_block(a):
    """A token-mixing, non-linear block returning (tokens, aux): any wrong gather shows everywhere."""
    return lambda t: (t + torch.tanh(t @ a) + 0.5 * t.mean(dim=-2, keepdim=True), "aux")


def selection_loop(x, scores, block, k, cls_eligible, post_weight):
    """Token Selection one sample at a time, with Python sorting."""
    outs, idxs = [], []
    for xb, sb in zip(x, scores):
        s = sb.tolist()
        candidates = range(len(s)) if cls_eligible else range(1, len(s))
        best = sorted(candidates, key=lambda i: -s[i])[: k if cls_eligible else k - 1]
        kept = sorted(best if cls_eligible else [0] + best)
        w = 1 + torch.softmax(sb[kept], dim=0)[:, None]
        xk = xb[kept]
        y = block(xk[None])[0][0] * w if post_weight else block((xk * w)[None])[0][0]
        out = xb.clone()
        out[kept] = y
        outs.append(out)
        idxs.append(kept)
    return torch.stack(outs), torch.tensor(idxs)


@pytest.mark.parametrize("post_weight", [True, False])
@pytest.mark.parametrize("cls_eligible", [True, False])
def test_token_selection_matches_a_per_sample_loop(post_weight, cls_eligible):
    torch.manual_seed(0)
    B, N, D = 4, 11, 6
    x = torch.randn(B, N, D, dtype=torch.float64)
    scores = torch.randn(B, N, dtype=torch.float64)
    scores[0, 0], scores[1, 0] = -10, 10  # CLS worst in row 0, best in row 1
    block = mixing_block(torch.randn(D, D, dtype=torch.float64))
    out, idx, aux = run_on_selected(x, scores, block, keep=0.5, cls_eligible=cls_eligible, post_weight=post_weight)
    ref_out, ref_idx = selection_loop(x, scores, block, num_kept(N, 0.5), cls_eligible, post_weight)
    assert torch.equal(idx, ref_idx) and aux == "aux"
    assert (0 in idx[0].tolist()) == (not cls_eligible)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_soft_spearman_matches_scipy(ties, low_t):
    torch.manual_seed(0)
    s, t = torch.randint(0, 10, (2, 100, 257)).float() if ties else torch.randn(2, 100, 257)
    scipy = torch.tensor([spearmanr(u, v).statistic for u, v in zip(s.numpy(), t.numpy())])
    assert (spearman_corr(s, t, temperature=low_t).double() - scipy).abs().max() <= 1e-3
    assert (spearman_corr(s, t, temperature=None).double() - scipy).abs().max() <= 1e-5  # exact ranks


# ============================================================================= routers: experts

def moa_loop(moa, x, gates):
    """x + Σ_e g_e · Adapter_e(x), token by token and expert by expert, from the module's weights."""
    E, r = moa.num_experts, moa.adapter_rank
    w1, b1 = moa.up.weight, moa.up.bias
    out = []
    for xt, gt in zip(x.reshape(-1, x.shape[-1]), gates.reshape(-1, E)):
        acc = xt.clone()
        for e in range(E):
            h = F.gelu(w1[e * r:(e + 1) * r] @ xt + b1[e * r:(e + 1) * r])
            acc = acc + gt[e] * (h @ moa.down_weight[e] + moa.down_bias[e])
        out.append(acc)
    return torch.stack(out).view_as(x)


def visible_moa(**kw):
    torch.manual_seed(0)
    moa = MixtureOfAdapters(dim=16, num_experts=4, adapter_rank=8, **kw).double()
    with torch.no_grad():  # make every term visible (the default down-projection is ~1e-3)
        for prm in moa.parameters():
            prm.normal_(0, 0.5)
    return moa


def test_mixture_of_adapters_matches_a_loop_over_experts_and_tokens():
    moa = visible_moa().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, gates = moa(x)
    torch.testing.assert_close(gates, torch.softmax(x @ moa.gate.weight.T + moa.gate.bias, dim=-1))
    torch.testing.assert_close(out, moa_loop(moa, x, gates))
    assert (out - x).abs().mean() > 0.1


def test_noisy_gate_is_eq13():
    moa = visible_moa().train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(3)
    out, gates = moa(x)
    torch.manual_seed(3)
    logits = x @ moa.gate.weight.T + moa.gate.bias
    eps = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(gates, torch.softmax(logits + eps * F.softplus(logits), dim=-1))
    torch.testing.assert_close(out, moa_loop(moa, x, gates))
    quiet = visible_moa(noise=False).train()  # the released code's gate
    torch.testing.assert_close(quiet(x).gates, torch.softmax(logits, dim=-1))


# ============================================================================= model

@pytest.mark.parametrize("T", [4, 6, 8])
@pytest.mark.parametrize("token_selection", [True, False])
def test_flops_formula_matches_the_counter(T, token_selection, small, inputs):
    cfg = replace(small, token_selection=token_selection, keep_ratio=0.6)
    torch.manual_seed(0)
    model = force_exit(DFDHR(cfg).eval(), T)
    view = inputs(cfg)[:, :, :cfg.view_size, :cfg.view_size]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoded = model.encode(view, model.original_routers)
    assert encoded.exit_layer.tolist() == [T, T]
    # What the formula omits and the counter sees, in multiply-adds: the patch embedding, and the
    # token judges (one dot product per token in each routed layer run).
    n, D, K = cfg.num_tokens, cfg.width, cfg.first_routed_layer
    embedding = (n - 1) * 3 * cfg.patch_size ** 2 * D
    token_judges = (T - K) * n * D if token_selection else 0
    assert counter.get_total_flops() == 2 * 2 * (estimate_flops(cfg, T) + embedding + token_judges)
    assert torch.equal(encoded.flops, torch.tensor([estimate_flops(cfg, T)] * 2))


def test_flops_formula_by_hand():
    paper = make_config("paper")
    n, d, m = 257, 1024, 4096
    layer, selected = (4 * n * d * d + 2 * n * n * d + 2 * n * d * m), (4 * 192 * d * d + 2 * 192 ** 2 * d + 2 * 192 * d * m)
    assert estimate_flops(replace(paper, expert_routing=False, token_selection=False)) == 24 * layer
    assert estimate_flops(replace(paper, expert_routing=False), exit_layer=22) == 20 * layer + 2 * selected
    released = replace(paper, expert_routing=False, route_last_layer=False)  # layer 23 runs unrouted
    assert estimate_flops(released, exit_layer=21) == 20 * layer + 1 * selected + layer


def test_query_pooling_is_multi_head_attention_written_out(small):
    torch.manual_seed(0)
    model = DFDHR(small)
    pool, P, H = model.pool, small.embed_dim, small.pool_heads
    tokens = torch.randn(3, 4, P)  # (B, 4 split images, P)
    w, b = pool.attn.in_proj_weight, pool.attn.in_proj_bias
    q = pool.query[0] @ w[:P].T + b[:P]  # (1, P)
    k, v = tokens @ w[P:2 * P].T + b[P:2 * P], tokens @ w[2 * P:].T + b[2 * P:]  # (B, 4, P)
    heads = []
    for h in range(H):
        part = slice(h * P // H, (h + 1) * P // H)
        att = torch.softmax(q[:, part] @ k[..., part].transpose(1, 2) / math.sqrt(P // H), dim=-1)  # (B, 1, 4)
        heads.append(att @ v[..., part])  # (B, 1, P/H)
    want = torch.cat(heads, -1)[:, 0] @ pool.attn.out_proj.weight.T + pool.attn.out_proj.bias
    torch.testing.assert_close(pool(tokens), want, atol=1e-5, rtol=1e-5)


def test_rank_target_is_the_original_images_final_cls(small, low_t, inputs, small_model):
    """L_rank = mean over routed layers of 1 − Spearman(scores, cos(tokens, q)) with q the
    original image's final CLS, here at a temperature where the soft coefficient is scipy's."""
    model = small_model(rank_temperature=low_t, share_routers=False).train()
    x = inputs(small, n=1)
    torch.manual_seed(5)
    q = model.encode(original_image(x, small.view_size), model.original_routers).cls.detach()
    with torch.no_grad():  # split-image judges that score by the direction of the global query
        for judge in model.split_routers.token_judges:
            judge.proj.weight.copy_(q)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)  # the same random draws again, piece by piece
    orig = model.encode(original_image(x, small.view_size), model.original_routers)
    split = model.encode(split_images(x), model.split_routers)

    def loss_with(query):  # (4, D) -> L_rank with scipy's coefficient
        rhos = [spearmanr(s.detach().numpy(), F.cosine_similarity(t, q[None], dim=-1).detach().numpy()).statistic
                for scores, tokens in split.ranked for s, t, q in zip(scores, tokens, query)]
        return 1 - sum(rhos) / len(rhos)

    assert len(split.ranked) == len(small.routed_layers)
    assert out.rank_loss.item() == pytest.approx(loss_with(orig.cls.expand(4, -1)), abs=2e-3)
    assert abs(out.rank_loss.item() - loss_with(split.cls)) > 5e-3  # the split images' own CLS: another value


def test_one_view_ranks_its_tokens_against_its_own_final_cls(small, low_t, inputs, small_model):
    """Rows without the split images (the main ablation's first four) have no original-image query
    for the split images: L_rank ranks the view's tokens against its own final CLS."""
    model = small_model(rank_temperature=low_t, multi_scale=False, layer_pruning=False).train()
    x = inputs(small, n=3)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    enc = model.encode(original_image(x, small.view_size), model.original_routers)
    rhos = [spearmanr(s.detach().numpy(), F.cosine_similarity(t, q[None], dim=-1).detach().numpy()).statistic
            for scores, tokens in enc.ranked for s, t, q in zip(scores, tokens, enc.cls)]
    assert len(enc.ranked) == len(small.routed_layers) and out.rank_loss.item() > 0
    assert out.rank_loss.item() == pytest.approx(1 - sum(rhos) / len(rhos), abs=2e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_each_branch_uses_its_own_routers(shared, small, inputs, small_model):
    model = small_model(share_routers=shared).eval()
    assert (model.split_routers is model.original_routers) == shared
    force_exit(model, small.layers)  # every view runs every layer ...
    for j in range(len(small.routed_layers)):  # ... but the split images' judges say exit at once
        model.split_routers.layer_judges[j] = ConstantJudge(-10.0)
    _, out = model.predict(inputs(small))
    K, L = small.first_routed_layer, small.layers
    expected_original = K if shared else L
    assert out.exit_layer.tolist() == [[expected_original, K, K, K, K]] * 2


class ThresholdJudge(nn.Module):
    """Exits the samples whose first CLS feature is below `cut`: a mixed batch of exits."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut

    def forward(self, cls):
        return torch.where(cls[:, 0] > self.cut, 10.0, -10.0)


def mixed_exits(model, x):
    """Layer judges that cut the j-th routed layer at quantile (j + 1) / (n + 1) of the plain backbone's
    CLS, n routed layers."""
    with torch.no_grad():
        states = model.backbone.hidden_states(original_image(x, model.config.view_size))
    n = len(model.config.routed_layers)
    for j, layer in enumerate(model.config.routed_layers):
        cut = states[layer][:, 0, 0].quantile((j + 1) / (n + 1)).item()
        model.original_routers.layer_judges[j] = ThresholdJudge(cut)
    return states


def test_inference_is_per_sample_and_exits_hold_their_state(small, inputs):
    cfg = replace(small, multi_scale=False, image_size=small.view_size, first_routed_layer=2)
    torch.manual_seed(0)
    model = DFDHR(cfg).eval()
    x = inputs(cfg, n=8)
    states = mixed_exits(model, x)
    p_batch, out = model.predict(x)
    singles = [model.predict(x[i:i + 1]) for i in range(8)]
    T = out.exit_layer[:, 0]
    assert len(set(T.tolist())) > 2, "the batch should exit at several layers"
    assert torch.equal(torch.cat([o.exit_layer for _, o in singles]), out.exit_layer)
    torch.testing.assert_close(torch.cat([p for p, _ in singles]), p_batch, atol=1e-5, rtol=0)
    with torch.no_grad():  # with experts and token selection off, an exited sample's CLS is the plain
        plain = DFDHR(replace(cfg, token_selection=False, expert_routing=False), backbone=model.backbone).eval()
        mixed_exits(plain, x)
        encoded = plain.encode(x, plain.original_routers)  # backbone's hidden state at its exit layer
    for b in range(8):
        torch.testing.assert_close(encoded.cls[b], states[encoded.exit_layer[b]][b, 0], atol=1e-5, rtol=0)
    for j, layer in enumerate(cfg.routed_layers):  # exited samples report no kept tokens and no gates
        gone = T <= layer
        assert (out.kept[j][gone] == -1).all() and (out.kept[j][~gone] >= 0).all()
        assert out.gates[gone, 0, layer].isnan().all() and not out.gates[~gone, 0, layer].isnan().any()


def test_original_image_is_the_released_resize_bit_for_bit(small, inputs):
    x = inputs(small, n=3)
    want = F.interpolate(x, size=(small.view_size,) * 2, mode="bicubic", align_corners=False)
    assert torch.equal(original_image(x, small.view_size), want)
    assert not torch.allclose(original_image(x, small.view_size),
                              F.interpolate(x, size=(small.view_size,) * 2, mode="bicubic", antialias=True))


def test_split_images_are_the_four_quadrants():
    x = torch.arange(2 * 3 * 4 * 4.).view(2, 3, 4, 4)
    s = split_images(x)
    assert torch.equal(s[0], x[0, :, :2, :2]) and torch.equal(s[1], x[0, :, :2, 2:])
    assert torch.equal(s[2], x[0, :, 2:, :2]) and torch.equal(s[7], x[1, :, 2:, 2:])


@pytest.mark.parametrize("ablation", ["full", "released"])
def test_layer_judges_learn_except_in_the_released_code(ablation, inputs):
    cfg = make_config("small", ablation)
    torch.manual_seed(0)
    model = DFDHR(cfg).train()
    dfdhr_loss(model(inputs(cfg, n=8)), torch.tensor([0, 1] * 4), cfg).total.backward()
    grads = [p.grad for p in model.original_routers.layer_judges.parameters()]
    if ablation == "released":  # the decision only picks rows: exactly no gradient
        assert all(g is None or not g.any() for g in grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("reaches", [True, False])
def test_rank_loss_reaches_the_features_only_if_asked(reaches, small, inputs, small_model):
    """L_rank always trains the token judges; with rank_reaches_features=False nothing else: the same
    value, and a gradient on the token judges' weights alone."""
    x = inputs(small, n=2)
    values = []
    for switch in (True, False):
        model = small_model(rank_reaches_features=switch).train()
        torch.manual_seed(5)
        values.append(model(x).rank_loss)
        if switch == reaches:
            loss, tested = values[-1], model
    assert values[0].item() == pytest.approx(values[1].item(), abs=1e-6)
    loss.backward()
    judges = {id(p) for r in (tested.original_routers, tested.split_routers) for p in r.token_judges.parameters()}
    moved = {n for n, p in tested.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tested.parameters() if id(p) in judges)
    others = {n for n, p in tested.named_parameters() if id(p) not in judges} & moved
    assert bool(others) == reaches and (not reaches or any("experts" in n for n in others))


def test_released_switches_do_what_the_released_code_does(inputs):
    cfg = make_config("small", "released")
    torch.manual_seed(0)
    model = DFDHR(cfg).train()
    L, K = cfg.layers, cfg.first_routed_layer
    assert list(cfg.routed_layers) == list(range(K, L - 1)) and len(model.original_routers.layer_judges) == L - 1 - K
    out = model(inputs(cfg, n=4))
    assert out.rank_loss.grad_fn is None  # argsort ranks: L_rank gives the token judges no gradient
    split = model.encode(split_images(inputs(cfg, n=4)), model.split_routers)
    layer_k = split.ranked[:1]
    query = torch.randn(16, cfg.width)
    assert torch.equal(rank_loss(split.ranked, query, cfg), rank_loss(layer_k, query, cfg))  # layer K only
    model.eval()
    force_exit(model, K)  # every sample exits at K, and layer L-1 still runs for all of them
    _, out = model.predict(inputs(cfg, n=2))
    assert (out.exit_layer == K).all()
    assert not out.gates[:, :, L - 1].isnan().any() and out.gates[:, :, K:L - 1].isnan().all()
    assert all(not m.noise for pair in model.original_routers.experts for m in (pair.after_attn, pair.after_mlp))


# ============================================================================= shapes

def test_paper_preset_shapes_on_meta():
    """Smoke test (shapes only): ViT-L/14, 448 input, routed layers 20-23, on meta tensors."""
    with torch.device("meta"):
        model = DFDHR(make_config("paper"))
        out = model.train()(torch.empty(1, 3, 448, 448))
    assert out.logits.shape == (1, 2) and out.gates.shape == (1, 5, 24, 2, 4) and out.exit_layer.shape == (1, 5)
    assert [k.shape for k in out.kept] == [(1, 5, 192)] * 4
    assert model.config.num_tokens == 257 and num_kept(257, 0.75) == 192

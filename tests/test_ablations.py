"""The designs the paper compares its own with (supp. Sec. B: Tab. 5, 6, 8), each against an independent
computation: PCA against numpy's SVD, FastV's ranking against the attention weights written out, sparse
attention against full attention under a block mask, SA pooling against torch's MultiheadAttention, the
soft gate and the GAP judge's input written out, Learn.+Weight's score by hand, the split ensemble and the
layers' CLS from the plain backbone, RINE from hooks on ln_2 as its code reads them, D³'s shuffles as a
permutation of patches, MRA's adapter written out and its ConvNeXt against Hugging Face's; the FLOPs of
each row against torch's counter; and every row through train.py."""
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import compared
import finetune
import predict
import train
from compared.convnext import ConvNeXt, load_convnext
from compared.multiscale import MRAdapter, shuffle_patches
from benchmarks import compare_methods
from dfdhr import (ABLATIONS, DFDHR, ConstantJudge, SelfAttentionPooling, estimate_flops, force_exit, make_config,
                   original_image, split_images)
from routing import attention_received, judge_and_cosine, num_kept, principal_components, soft_gate, sparse_attention
from vit import Attention, CheckpointError

TAB5 = ("pca", "fastv", "sparse_attention")
TAB6 = ("split_ensemble", "multi_cls_pooling")
TAB8 = ("sa_pooling", "soft_routers", "shared_layer_judges", "gap_judges", "learn_weight")


def plain(config, **changes):
    """One view, no experts, no token selection: every layer before and outside the routed ones is the backbone's."""
    return replace(config, multi_scale=False, image_size=config.view_size, expert_routing=False,
                   token_selection=False, **changes)


def seeded(config, seed=0):
    torch.manual_seed(seed)
    return DFDHR(config)


# ============================================================================= Tab. 5

def pca_by_numpy(x, k):
    """Per image: centre its tokens, keep the top k singular triplets, add the mean back."""
    out = []
    for tokens in x.detach().double().numpy():
        mean = tokens.mean(0)
        U, S, Vt = np.linalg.svd(tokens - mean, full_matrices=False)
        out.append(U[:, :k] * S[:k] @ Vt[:k] + mean)
    return torch.tensor(np.stack(out))


def test_pca_is_the_svd_reconstruction():
    x = torch.randn(3, 17, 24, dtype=torch.float64, requires_grad=True)
    got = principal_components(x, 5)
    torch.testing.assert_close(got, pca_by_numpy(x, 5))
    assert not torch.allclose(got, x)  # 5 of 17 components: something is removed
    got.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pca_row_projects_each_routed_layers_output(small, inputs):
    cfg = replace(make_config("small", "pca"), layer_pruning=False)
    model = seeded(cfg).eval()
    view = inputs(cfg)
    with torch.no_grad():
        got = model.encode(view, model.original_routers).cls
        h = model.backbone.embed(view)
        for i, blk in enumerate(model.backbone.blocks):
            h = blk(h)
            if i in cfg.routed_layers:
                h = pca_by_numpy(h, cfg.pca_components).float()
    torch.testing.assert_close(got, h[:, 0], atol=1e-4, rtol=1e-4)


def received_by_loop(attn, x):
    """The attention CLS pays each token, head by head and key by key, from the layer's weights."""
    D, H = attn.in_proj_weight.shape[1], attn.heads
    d = D // H
    q = x @ attn.in_proj_weight[:D].T + attn.in_proj_bias[:D]  # (B, N, D)
    k = x @ attn.in_proj_weight[D:2 * D].T + attn.in_proj_bias[D:2 * D]
    out = torch.zeros(x.shape[:2], dtype=x.dtype)
    for b in range(len(x)):
        for h in range(H):
            part = slice(h * d, (h + 1) * d)
            logits = torch.tensor([float(q[b, 0, part] @ k[b, j, part]) / math.sqrt(d) for j in range(x.shape[1])])
            out[b] += torch.softmax(logits, 0) / H
    return out


def test_fastv_ranks_by_the_attention_cls_pays_in_layer_k_minus_1(small, inputs):
    cfg = make_config("small", "fastv")
    model = force_exit(seeded(cfg).eval(), cfg.layers)  # every view runs every layer
    x = inputs(cfg, n=3)
    _, out = model.predict(x)
    blk = model.backbone.blocks[cfg.first_routed_layer - 1]
    with torch.no_grad():
        t = blk.ln_1(model.backbone.hidden_states(x)[cfg.first_routed_layer - 1])  # layer K-1's input, normed
        received = received_by_loop(blk.attn, t)
        torch.testing.assert_close(attention_received(blk.attn, t), received, atol=1e-6, rtol=1e-5)
    n_hat = num_kept(cfg.num_tokens, cfg.keep_ratio)
    for b in range(3):  # CLS and the n̂ - 1 patches CLS attended to most, the same set in every routed layer
        order = sorted(range(1, cfg.num_tokens), key=lambda j: -float(received[b, j]))
        want = sorted([0] + order[:n_hat - 1])
        assert all(kept[b, 0].tolist() == want for kept in out.kept)


def group_mask(grid, sparse_size):
    """SparseViT's groups as an attention mask: patch (r, c) in group (r mod stride, c mod stride); CLS sees
    and is seen by every token."""
    stride, N = grid // sparse_size, grid * grid + 1
    group = [None] + [(r % stride, c % stride) for r in range(grid) for c in range(grid)]
    return torch.tensor([[i == 0 or j == 0 or group[i] == group[j] for j in range(N)] for i in range(N)])


@pytest.mark.parametrize("sparse_size", [2, 4, 8])
def test_sparse_attention_is_full_attention_under_a_block_mask(sparse_size):
    torch.manual_seed(0)
    attn = Attention(width=32, heads=2).double()
    x = torch.randn(2, 65, 32, dtype=torch.float64)  # an 8 × 8 grid and CLS
    q, k, v = attn.split_heads(x)
    want = attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=group_mask(8, sparse_size)))
    torch.testing.assert_close(sparse_attention(attn, x, sparse_size), want)
    if sparse_size == 8:  # one group: full attention
        torch.testing.assert_close(sparse_attention(attn, x, 8), attn(x))
    else:
        assert not torch.allclose(want, attn(x))


# ============================================================================= Tab. 8

def test_sa_pooling_is_torchs_multi_head_self_attention_averaged(small):
    model = seeded(make_config("small", "sa_pooling"))
    assert isinstance(model.pool, SelfAttentionPooling)
    mha = nn.MultiheadAttention(small.embed_dim, small.pool_heads, batch_first=True)
    mha.load_state_dict(model.pool.attn.state_dict())  # the same names: in_proj_weight, in_proj_bias, out_proj
    tokens = torch.randn(3, 4, small.embed_dim)
    torch.testing.assert_close(model.pool(tokens), mha(tokens, tokens, tokens)[0].mean(1), atol=1e-5, rtol=1e-5)


def test_soft_gate_is_sigmoid_in_training_and_a_threshold_at_inference():
    logits = torch.tensor([-3.0, -0.2, 0.0, 0.4, 2.5], requires_grad=True)
    torch.manual_seed(1)
    p = soft_gate(logits, tau=0.5)
    torch.manual_seed(2)  # no random draw: another seed, the same gate
    assert torch.equal(p, soft_gate(logits, tau=0.5))
    torch.testing.assert_close(p, torch.sigmoid(logits / 0.5))
    p.sum().backward()
    torch.testing.assert_close(logits.grad, (p * (1 - p) / 0.5).detach())
    assert soft_gate(logits, tau=0.5, training=False).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_soft_routers_mix_each_routed_layer_by_the_soft_gate(small, inputs):
    cfg = plain(make_config("small", "soft_routers"), judge_init_gain=0.2)  # logits near 0: gates far from 0 and 1
    model = seeded(cfg).train()
    x = inputs(cfg)
    got = model.encode(x, model.original_routers).cls
    h, active, gates = model.backbone.embed(x), 1.0, []
    for i, blk in enumerate(model.backbone.blocks):
        if i in cfg.routed_layers:
            p = torch.sigmoid(model.original_routers.layer_judge(i)(h[:, 0]) / cfg.gumbel_tau)
            active, gates = active * p[:, None, None], gates + [p]
            h = active * blk(h) + (1 - active) * h
        else:
            h = blk(h)
    torch.testing.assert_close(got, h[:, 0])
    assert all(((g > 0.05) & (g < 0.95)).all() for g in gates)


class Recorder(nn.Module):
    """A layer judge that lets every sample run and keeps what it was shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, inp):
        self.seen.append(inp)
        return inp.new_full(inp.shape[:1], 10.0)


@pytest.mark.parametrize("judge_input", ["cls", "gap"])
def test_layer_judges_read_cls_or_the_mean_of_all_tokens(judge_input, small, inputs):
    cfg = plain(small, judge_input=judge_input)
    model = seeded(cfg).eval()
    recorders = [Recorder() for _ in cfg.routed_layers]
    for j, r in enumerate(recorders):
        model.original_routers.layer_judges[j] = r
    x = inputs(cfg)
    model.predict(x)
    states = model.backbone.hidden_states(x)  # [i]: the input of layer i
    for r, i in zip(recorders, cfg.routed_layers):
        want = states[i][:, 0] if judge_input == "cls" else states[i].mean(1)
        torch.testing.assert_close(r.seen[0], want, atol=1e-5, rtol=1e-5)


def test_shared_layer_judge_decides_every_routed_layer(small):
    routers = seeded(make_config("small", "shared_layer_judges")).original_routers
    assert len({id(routers.layer_judge(i)) for i in small.routed_layers}) == 1
    assert len({id(j) for j in seeded(small).original_routers.layer_judges}) == len(small.routed_layers)


def test_learn_weight_score_by_hand():
    torch.manual_seed(0)
    scores, tokens, query = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, 5, dtype=torch.float64), \
        torch.randn(2, 5, dtype=torch.float64)
    want = []
    for s, t, q in zip(scores.numpy(), tokens.numpy(), query.numpy()):
        cos = t @ q / np.linalg.norm(t, axis=1) / np.linalg.norm(q)
        z = [(v - v.mean()) / (v.std(ddof=1) + 1e-6) for v in (s, cos)]
        want.append((z[0] + z[1]) / 2)
    torch.testing.assert_close(judge_and_cosine(scores, tokens, query), torch.tensor(np.stack(want)))


def test_learn_weight_ranks_the_split_images_by_judge_and_global_query(small, inputs):
    cfg = replace(make_config("small", "learn_weight"), expert_routing=False, layer_pruning=False)
    model = seeded(cfg).eval()
    x = inputs(cfg)
    _, out = model.predict(x)
    K, n_hat = cfg.first_routed_layer, num_kept(cfg.num_tokens, cfg.keep_ratio)
    with torch.no_grad():
        query = model.encode(original_image(x, cfg.view_size), model.original_routers).cls.repeat_interleave(4, 0)
        h = model.backbone.hidden_states(split_images(x))[K]  # (4B, N, D) layer K's input
        judge = model.split_routers.token_judge(K)(h)
    both = judge_and_cosine(judge, h, query).topk(n_hat).indices.sort().values.view(2, 4, -1)
    alone = judge.topk(n_hat).indices.sort().values.view(2, 4, -1)
    assert torch.equal(out.kept[0][:, 1:], both) and not torch.equal(both, alone)


# ============================================================================= Tab. 6: rows of DFDHR

def test_split_ensemble_averages_the_two_scales_scores(small, inputs):
    cfg = make_config("small", "split_ensemble")
    model = seeded(cfg).eval()
    x = inputs(cfg)
    _, out = model.predict(x)
    with torch.no_grad():
        original = model.head(model.backbone(original_image(x, cfg.view_size)))  # (B, 2)
        split = model.head(model.backbone(split_images(x))).view(2, 4, 2)
    torch.testing.assert_close(out.logits, (original + split.mean(1)) / 2, atol=1e-5, rtol=1e-5)
    assert model.pool is None and out.exit_layer.shape == (2, 5)


def test_multi_cls_pooling_pools_the_routed_layers_cls(small, inputs):
    cfg = make_config("small", "multi_cls_pooling")
    model = seeded(cfg).eval()
    x = inputs(cfg)
    _, out = model.predict(x)
    bb = model.backbone
    with torch.no_grad():
        states = bb.hidden_states(x)  # [i + 1]: after block i
        layers = bb.project(torch.stack([states[i + 1][:, 0] for i in cfg.routed_layers], 1))  # (B, 4, P)
        want = model.head(torch.cat([bb.project(states[-1][:, 0]), model.pool(layers)], -1))
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)


# ============================================================================= Tab. 6: RINE, D³, MRA

def method(name, cfg=None, seed=0):
    torch.manual_seed(seed)
    return finetune.build_model(name, cfg or make_config("small", "baseline"))


def test_rine_reads_ln2s_cls_of_every_block_and_weighs_them(inputs):
    model = method("rine").eval()
    bb, cfg = model.backbone, model.config
    assert cfg.freeze_backbone and not any(p.requires_grad for p in bb.parameters())
    seen = []  # RINE's own way: forward hooks on every block's ln_2
    hooks = [blk.ln_2.register_forward_hook(lambda m, i, o: seen.append(o[:, 0])) for blk in bb.blocks]
    x = inputs(cfg)
    with torch.no_grad():
        bb(x)
        for h in hooks:
            h.remove()
        g = model.q1(torch.stack(seen, 1))  # (B, L, F)
        w = torch.softmax(model.importance.alpha, dim=1)  # over the L blocks, per feature
        want = model.head(model.q2(sum(w[:, l] * g[:, l] for l in range(cfg.layers))))
    _, out = model.predict(x)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    model.train()
    train_out = model(x)
    train_out.logits.sum().backward()
    assert all(p.grad is None for p in bb.parameters()) and model.importance.alpha.grad.abs().sum() > 0


def test_d3_shuffles_are_a_permutation_of_the_vits_patches():
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    out = shuffle_patches(x, 4, perm)
    for j in range(16):  # position j holds patch perm[j]
        r, c, (pr, pc) = j // 4, j % 4, divmod(int(perm[j]), 4)
        assert torch.equal(out[..., 4 * r:4 * r + 4, 4 * c:4 * c + 4], x[..., 4 * pr:4 * pr + 4, 4 * pc:4 * pc + 4])
    model = method("d3")
    bb, cfg = model.backbone, model.config
    view = torch.randn(2, 3, cfg.view_size, cfg.view_size)
    n = (cfg.view_size // cfg.patch_size) ** 2
    perm = torch.randperm(n)
    with torch.no_grad():  # the ViT sees the same patch embeddings, moved
        torch.testing.assert_close(bb.conv1(shuffle_patches(view, cfg.patch_size, perm)).flatten(2),
                                   bb.conv1(view).flatten(2)[..., perm])


def test_d3_fuses_the_original_and_four_shuffles_by_self_attention(inputs):
    model = method("d3").eval()
    bb, cfg = model.backbone, model.config
    x = inputs(cfg)
    n = (cfg.view_size // cfg.patch_size) ** 2
    perms = model.permutations(n)
    assert perms.shape == (4, n) and torch.equal(perms, model.permutations(n))  # fixed at inference
    with torch.no_grad():
        views = [shuffle_patches(x, cfg.patch_size, p) for p in perms] + [x]
        f = torch.stack([bb.ln_post(bb.hidden_states(v)[-1][:, 0]) for v in views], 1)  # (B, 5, D)
        q, k, v = model.q(f), model.k(f), model.v(f)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(cfg.width), dim=-1)  # over the keys
        want = model.head((att @ v).reshape(len(x), -1))
    _, out = model.predict(x)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    assert out.exit_layer.shape == (2, 5) and model.train().permutations(n).ne(perms).any()


def test_mra_starts_as_the_plain_vit_and_sees_the_face_at_384_where_the_vit_sees_224(inputs):
    with torch.device("meta"):
        assert finetune.build_model("mra", make_config("paper", "baseline")).config.image_size == 384
    model = method("mra").eval()
    cfg = model.config
    assert cfg.image_size == 128 and model.after == [1, 3, 5]  # small preset: 64 px views, 8 layers
    x = inputs(cfg)
    _, out = model.predict(x)
    with torch.no_grad():
        want = model.head(model.backbone(original_image(x, cfg.view_size)))
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)  # zero-initialised adapters


def bilinear_align_corners(x, size):
    """Bilinear resize with the corners aligned, written out: output pixel i reads input i·(s-1)/(size-1)."""
    s = x.shape[-1]
    pos = np.arange(size) * (s - 1) / (size - 1)
    lo = np.minimum(np.floor(pos).astype(int), s - 2)
    w = torch.tensor(pos - lo, dtype=x.dtype)
    rows = x[..., lo, :] * (1 - w)[:, None] + x[..., lo + 1, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., lo + 1] * w


def test_mr_adapter_written_out():
    torch.manual_seed(0)
    adapter = MRAdapter(8, 6).double()
    with torch.no_grad():
        for p in adapter.parameters():  # every weight non-zero (the projections start at zero)
            p.normal_(0, 0.3)
    tokens, slow = torch.randn(2, 16, 8, dtype=torch.float64), torch.randn(2, 6, 3, 3, dtype=torch.float64)
    c = adapter
    s = torch.einsum("oc,bchw->bohw", c.slow_conv.weight[..., 0, 0], slow) + c.slow_conv.bias[:, None, None]
    s = torch.einsum("oc,bchw->bohw", c.slow_proj.weight[..., 0, 0], F.gelu(s)) + c.slow_proj.bias[:, None, None]
    s = bilinear_align_corners(s, 4)  # (2, 8, 4, 4)
    fast = tokens.transpose(1, 2).reshape(2, 8, 4, 4)
    padded, dw = F.pad(fast, (3, 3, 3, 3)), c.fast_conv.bias[:, None, None].expand(2, 8, 4, 4).clone()
    for dy in range(7):
        for dx in range(7):
            dw = dw + c.fast_conv.weight[:, 0, dy, dx][:, None, None] * padded[..., dy:dy + 4, dx:dx + 4]
    fast = fast + torch.einsum("oc,bchw->bohw", c.fast_proj.weight[..., 0, 0], F.gelu(dw)) \
        + c.fast_proj.bias[:, None, None]
    pooled = torch.cat([fast, s], 1).mean((2, 3))  # (2, 16)
    gate = torch.tanh(c.gate[2](F.gelu(c.gate[0](pooled))))  # (2, 1)
    want = (fast + gate[:, :, None, None] * s).flatten(2).transpose(1, 2)
    torch.testing.assert_close(adapter(tokens, slow), want)


@pytest.fixture
def hf_convnext(tmp_path):
    """A Hugging Face ConvNeXt with random weights, layer scales and norms included, saved as safetensors."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], image_size=64)
    torch.manual_seed(0)
    hf = transformers.ConvNextModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "scale" in name or name.endswith("bias"):
                p.normal_(std=0.3)
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def timm_names(sd):
    """Our (ConvNeXt's release) names -> timm's, by the rules of timm's own converter of those checkpoints
    (timm.models.convnext.checkpoint_filter_fn), and a timm classifier, which loading leaves out."""
    out = {}
    for k, v in sd.items():
        k = k.replace("downsample_layers.0.", "stem.")
        k = re.sub(r"stages.([0-9]+).([0-9]+)", r"stages.\1.blocks.\2", k)
        k = re.sub(r"downsample_layers.([0-9]+).([0-9]+)", r"stages.\1.downsample.\2", k)
        out[k.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc")] = v
    return {**out, "head.norm.weight": torch.ones(32), "head.fc.weight": torch.zeros(10, 32)}


def test_convnext_matches_hugging_face_and_reads_timm_and_its_own_layout(hf_convnext):
    hf, folder = hf_convnext
    ours = load_convnext(folder).eval()
    assert ours.dims == (8, 16, 24, 32) and [len(s) for s in ours.stages] == [1, 2, 1, 1]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x, output_hidden_states=True).hidden_states[1:]  # each stage's output
        got = ours(x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        sd = ours.state_dict()
        released = {"model": {**sd, "norm.weight": torch.ones(32), "head.weight": torch.zeros(5, 32)}}
        for layout in (timm_names(sd), released):
            for a, b in zip(load_convnext(layout)(x), got, strict=True):
                torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): stages.1.1.norm.weight"):
        load_convnext({k: v for k, v in sd.items() if k != "stages.1.1.norm.weight"})


def test_mra_loads_a_convnext_checkpoint_that_then_trains_at_backbone_lr(tmp_path):
    torch.manual_seed(0)
    convnext = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 40))
    torch.save({"model": convnext.state_dict()}, tmp_path / "convnext.pth")
    model = finetune.build_model("mra", make_config("small", "baseline"), convnext=tmp_path / "convnext.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.convnext.state_dict().values(), convnext.state_dict().values()))
    lrs = {g["name"]: g["lr"] for g in model.param_groups(lr=1e-3, backbone_lr=1e-6)}
    assert lrs == {"backbone": 1e-6, "convnext": 1e-6, "fusion": 1e-3, "head": 1e-3}
    assert {g["name"]: g["lr"] for g in method("mra").param_groups(lr=1e-3, backbone_lr=1e-6)}["convnext"] == 1e-3
    with pytest.raises(SystemExit, match="needs --method=mra"):
        train.main(["--method=rine", f"--init_convnext={tmp_path / 'convnext.pth'}"])


# ============================================================================= the rows' regimes and costs

@pytest.mark.parametrize("row", TAB5 + TAB6 + TAB8)
def test_each_row_is_the_row_it_is_compared_with_and_one_change(row):
    cfg, base = make_config("small", row), {**{r: "+token_selection" for r in TAB5}, "split_ensemble": "fusion_only",
                                            "multi_cls_pooling": "baseline", **{r: "full" for r in TAB8}}[row]
    differ = {f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(make_config("small", base), f)}
    assert len(differ) == 1
    if row in TAB5:  # under Early Layer Pruning, fine-tuned at backbone_lr as the main ablation's rows
        assert cfg.layer_pruning and not cfg.expert_routing and not cfg.freeze_backbone
    if row in TAB6:  # the baseline regime
        assert not cfg.routing and not cfg.freeze_backbone
    if row in TAB8:
        assert cfg.freeze_backbone and cfg.layer_pruning and cfg.token_selection and cfg.expert_routing


def test_each_table_runs_known_rows_with_ours_first():
    tables = compare_methods.TABLES
    assert tables["tab5"][:2] == ("+layer_pruning", "+token_selection") and set(tables["tab5"][2:]) == set(TAB5)
    assert tables["tab6"][:2] == ("baseline", "fusion_only") and set(tables["tab6"][2:]) == {*TAB6, *compared.METHODS}
    assert tables["tab8"][0] == "full" and set(tables["tab8"][1:]) == set(TAB8)
    assert all(n in ABLATIONS or n in compared.METHODS for t in tables.values() for n in t)


@pytest.mark.parametrize("row", TAB5 + TAB6 + TAB8)
def test_flops_of_each_row_match_the_counter(row, inputs):
    """One view through a branch, every layer run (constant layer judges): the counter sees the formula's
    multiply-adds, the patch embedding and the token judges (what the formula omits, as the paper)."""
    cfg = make_config("small", row)
    model = force_exit(seeded(cfg).eval(), cfg.layers)
    view = inputs(cfg)[:, :, :cfg.view_size, :cfg.view_size]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoded = model.encode(view, model.original_routers)
    n, D = cfg.num_tokens, cfg.width
    embedding = (n - 1) * 3 * cfg.patch_size ** 2 * D
    judges = len(cfg.routed_layers) * n * D if model.original_routers.token_judges is not None else 0
    assert counter.get_total_flops() == 2 * 2 * (estimate_flops(cfg) + embedding + judges)
    assert torch.equal(encoded.flops, torch.tensor([estimate_flops(cfg)] * 2))


@torch.no_grad()
def linear_macs(modules, run):
    """Multiply-adds of every nn.Linear in `modules` while `run()` runs, counted by forward hooks."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(i[0].numel() * m.out_features))
             for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    run()
    for h in hooks:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("name", compared.METHODS)
def test_flops_of_each_method_match_the_counter(name, inputs):
    """The counter sees a method's own estimate, and what it omits as the paper does: the patch embedding
    of each view, CLIP's projection, the heads and fusion layers (counted here by hooks), D³'s attention."""
    model = method(name).eval()
    cfg = model.config
    x = inputs(cfg)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x)
    own = model.flops()
    assert out.flops.tolist() == pytest.approx([own] * len(x))
    assert own == {"rine": estimate_flops(cfg), "d3": 5 * estimate_flops(cfg)}.get(name, own)  # MRA: + ConvNeXt, adapters
    views = 5 if name == "d3" else 1
    omitted = views * (cfg.num_tokens - 1) * 3 * cfg.patch_size ** 2 * cfg.width  # patch embeddings
    omitted += {"rine": 0, "d3": 2 * views * views * cfg.width,  # D³'s attention: two (5 × 5 × D) matmuls
                "mra": cfg.width * cfg.embed_dim}[name]  # MRA's head reads CLIP's projected CLS
    heads = {"rine": ("q1", "q2", "head"), "d3": ("q", "k", "v", "head"), "mra": ("head",)}[name]
    heads = [getattr(model, h) for h in heads]
    assert counter.get_total_flops() == 2 * (len(x) * (own + omitted) + linear_macs(heads, lambda: model(x)))


# ============================================================================= through train.py

@pytest.mark.slow
@pytest.mark.parametrize("row", [*(f"--ablation={r}" for r in TAB5 + TAB6 + TAB8),
                                 *(f"--method={m}" for m in compared.METHODS)])
def test_each_row_trains_and_evaluates_through_train_py(row, tmp_path, tiny_run):
    train.main(tiny_run + [row, "--max_iters=1", f"--out_dir={tmp_path}"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(metrics) == {"in_domain", "cross_method"} and all(m["gmac_per_image"] > 0 for m in metrics.values())
    assert config[row[2:].split("=")[0]] == row.split("=")[1]
    model, _ = predict.load_model(tmp_path / "best.pt")  # the checkpoint rebuilds the same model
    assert type(model).__name__ == {"rine": "RINE", "d3": "D3", "mra": "MRA"}.get(config["method"], "DFDHR")

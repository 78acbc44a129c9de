"""finetune.py: each method of supp. Tab. A trains exactly its parameters, starts where the paper's
method starts, and computes what its paper writes: checked against numpy decompositions, hand
formulas and second implementations written out here."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits  # comes with scikit-learn

import finetune
from dfdhr import DFDHR, make_config

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
LORA_SIZE = L * r * (3 * (D + D) + (D + D) + (D + 4 * D) + (4 * D + D))  # q, k, v one each; out; c_fc; c_proj
EXPECTED = {  # method: (pattern, tensors, numel or None)
    "baseline": (r".*", None, None),
    "linear_probe": (r"$^", 0, 0),
    "mlp3": (r"$^", 0, 0),
    "partial4": (rf"backbone\.(transformer\.resblocks\.({LAST4})\..*|ln_post\..*|proj)", 4 * 12 + 2 + 1, None),
    "ln_tuning": (r"backbone\.(ln_pre|ln_post|transformer\.resblocks\.\d+\.ln_[12])\.(weight|bias)$", 4 * L + 4, None),
    "bias_tuning": (r"backbone\..*bias$", 6 * L + 2, None),
    "vpt_deep": (r"backbone\.transformer\.resblocks\.\d+\.prompts\.tokens$", L, L * 5 * D),
    "adapter": (r"backbone\.transformer\.resblocks\.\d+\.adapter_(attn|mlp)\.(down|up)\.(weight|bias)$", 8 * L,
                L * 2 * (2 * D * 64 + 64 + D)),
    "lora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "rslora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "pissa": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "olora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "gaussian_lora": (LINEAR + "(A|B)$", 8 * L, LORA_SIZE),
    "dora": (LINEAR + "(A|B|m)$", 12 * L, LORA_SIZE + L * (3 * D + D + 4 * D + D)),
    "ia3": (r"backbone\.transformer\.resblocks\.\d+\.(attn\.parametrizations\.in_proj_(weight|bias)|"
            r"mlp\.c_proj\.parametrizations\.weight)\.0\.l$", 2 * L, L * (2 * D + 4 * D)),
    "effort": (ATTN + "(U|S|Vh)$", 6 * L, L * 4 * (D + 1 + D)),
}
UNCHANGED_AT_INIT = ("adapter", "lora", "rslora", "pissa", "olora", "gaussian_lora", "dora", "ia3", "effort")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices run on one thread: on a busy machine, a pool of spinning LAPACK/OpenMP threads
    makes a 128 x 128 SVD or a tiny forward pass take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


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
    """(base, adapted copy) of the same random model."""
    base = base_model(seed)
    return base, finetune.apply(copy.deepcopy(base), method).eval()


@torch.no_grad()
def perturb(model, scale=0.05, seed=2):
    """Move every trainable parameter off its init (B = 0, up = 0 make other gradients vanish)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_methods_list():
    assert finetune.METHODS[0] == "baseline" and "dfdhr" not in finetune.METHODS
    assert set(EXPECTED) == set(finetune.METHODS)


@pytest.mark.parametrize("method", finetune.METHODS)
def test_only_intended_parameters_train(method, inputs):
    """Exactly the method's parameters and the head get a non-zero gradient; the frozen ones none."""
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
    model.train()
    loss = F.cross_entropy(model(inputs(CFG, 4, seed=1)).logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
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


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "effort"])
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
    """What train.py's resume does: a fresh model, the same `apply`, a strict load, the same outputs."""
    _, model = adapted(method, seed=0)
    perturb(model)
    other = finetune.apply(base_model(seed=7), method).eval()
    other.load_state_dict(model.state_dict())
    x = inputs(CFG, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, model(x).logits, rtol=0, atol=0)


def test_refuses_unknown_method_and_routed_model():
    with pytest.raises(ValueError, match="unknown method"):
        finetune.apply(base_model(), "lokr")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="baseline"):
        finetune.apply(DFDHR(make_config("small")), "lora")

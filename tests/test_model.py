"""dfdhr.py: the FLOPs formula against a counter, gradients, inference routing, ablation switches."""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, dfdhr_loss, estimate_flops, make_config, split_2x2

SMALL = make_config("small")


class ConstantJudge(nn.Module):
    """A layer judge that says `logit` for every sample."""

    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, cls):
        return torch.full(cls.shape[:1], float(self.logit))


class ThresholdJudge(nn.Module):
    """Exits the samples whose first CLS feature is below `cut`: a mixed batch of exits."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut

    def forward(self, cls):
        return torch.where(cls[:, 0] > self.cut, 10.0, -10.0)


def force_exit(model, T):
    """Every sample runs blocks 0..T-1 and exits at layer T (T = L: none exits)."""
    K = model.config.first_routed_layer
    for routers in model.routers:
        for r in range(len(routers.layer_judges)):
            routers.layer_judges[r] = ConstantJudge(10.0 if K + r < T else -10.0)


def inputs(config, n=2, seed=0):
    return torch.randn(n, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [4, 6, 8])
@pytest.mark.parametrize("token_selection", [True, False])
def test_flops_formula_matches_counter(T, token_selection):
    cfg = replace(SMALL, token_selection=token_selection, keep_ratio=0.6)
    torch.manual_seed(0)
    model = DFDHR(cfg).eval()
    force_exit(model, T)
    view = inputs(cfg)[:, :, :cfg.view_size, :cfg.view_size]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoded = model.encode(view, model.routers[0])
    assert encoded.exit_layer.tolist() == [T, T]
    # What the formula omits and the counter sees, each in multiply-adds: the patch embedding,
    # and the token judges (one dot product per token in each routed layer run).
    n, D, K = cfg.num_tokens, cfg.width, cfg.first_routed_layer
    embedding = (n - 1) * 3 * cfg.patch_size ** 2 * D
    token_judges = (T - K) * n * D if token_selection else 0
    per_sample = estimate_flops(cfg, T) + embedding + token_judges
    assert counter.get_total_flops() == 2 * 2 * per_sample  # 2 samples, 2 FLOPs per multiply-add
    assert torch.equal(encoded.flops, torch.tensor([estimate_flops(cfg, T)] * 2))


def test_flops_formula_by_hand():
    paper = make_config("paper")
    n, d, m = 257, 1024, 4096
    dense = 24 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    assert estimate_flops(replace(paper, expert_routing=False, token_selection=False)) == dense
    routed = 20 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + 2 * (4 * 192 * d * d + 2 * 192 ** 2 * d + 2 * 192 * d * m)
    assert estimate_flops(replace(paper, expert_routing=False), exit_layer=22) == routed


def test_every_trainable_group_gets_a_gradient_and_the_frozen_backbone_none():
    cfg = replace(SMALL, freeze_backbone=True)
    torch.manual_seed(0)
    model = DFDHR(cfg).train()
    out = model(inputs(cfg, n=8))
    dfdhr_loss(out, torch.tensor([0, 1] * 4), cfg).total.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    groups = {g["name"]: g["params"] for g in model.param_groups(lr=1e-4, backbone_lr=1e-6)}
    assert set(groups) == {"layer_judges", "token_judges", "experts", "fusion", "head"}
    for name, params in groups.items():
        assert sum(p.grad.abs().sum() for p in params) > 0, name
    routers = model.routers[0]
    judges = [j for j in routers.layer_judges] + [j for j in routers.token_judges]
    experts = [e for pair in routers.experts for e in pair]
    for module in judges + experts:  # each judge, each gate and each adapter, not just each group
        for name, p in module.named_parameters():
            assert p.grad.abs().sum() > 0, name


def test_full_fine_tuning_switch():
    model = DFDHR(replace(SMALL, freeze_backbone=False))
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, backbone_lr=1e-6)}
    assert groups["backbone"]["lr"] == 1e-6 and groups["head"]["lr"] == 1e-4
    assert sum(p.numel() for p in groups["backbone"]["params"]) == sum(p.numel() for p in model.backbone.parameters())


def test_inference_is_per_sample_deterministic_and_exits_hold_their_state():
    torch.manual_seed(0)
    model = DFDHR(SMALL).eval()
    x = inputs(SMALL, n=5)
    p_batch, out = model.predict(x)
    p_again, _ = model.predict(x)
    assert torch.equal(p_batch, p_again)
    p_single = torch.cat([model.predict(x[i:i + 1])[0] for i in range(5)])
    assert torch.allclose(p_batch, p_single, atol=1e-5)


def test_exited_samples_keep_their_hidden_state_at_exit():
    cfg = replace(SMALL, token_selection=False, expert_routing=False, first_routed_layer=2)
    torch.manual_seed(0)
    model = DFDHR(cfg).eval()
    view = inputs(cfg, n=8)[:, :, :cfg.view_size, :cfg.view_size]
    with torch.no_grad():
        states = model.backbone.hidden_states(view)  # the plain backbone, every layer
        for r, K in enumerate(range(cfg.first_routed_layer, cfg.layers)):  # cut at the batch median
            model.routers[0].layer_judges[r] = ThresholdJudge(states[K][:, 0, 0].median().item())
        encoded = model.encode(view, model.routers[0])
    T = encoded.exit_layer
    assert len(set(T.tolist())) > 1, "the batch should exit at several layers"
    for b in range(8):
        assert torch.allclose(encoded.cls[b], states[T[b]][b, 0], atol=1e-5)


def test_kept_tokens_and_gates_are_reported():
    torch.manual_seed(0)
    model = DFDHR(SMALL).eval()
    force_exit(model, 6)
    _, out = model.predict(inputs(SMALL, n=2))
    assert out.exit_layer.tolist() == [[6] * 5] * 2
    assert [k.min().item() >= 0 for k in out.kept] == [True, True, False, False]  # kept at 4, 5; exited at 6
    g = out.gates  # (B, V, L, 2, E)
    assert torch.allclose(g[:, :, :6].sum(-1), torch.ones(2, 5, 6, 2), atol=1e-5)
    assert torch.isnan(g[:, :, 6:]).all()


def test_split_2x2_is_the_four_quadrants():
    x = torch.arange(2 * 3 * 4 * 4.).view(2, 3, 4, 4)
    s = split_2x2(x)
    assert torch.equal(s[0], x[0, :, :2, :2]) and torch.equal(s[1], x[0, :, :2, 2:])
    assert torch.equal(s[2], x[0, :, 2:, :2]) and torch.equal(s[7], x[1, :, 2:, 2:])


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable(cfg):
    """Trainable parameters counted from the paper's description, module by module."""
    D, C, L, R = cfg.width, cfg.embed_dim, cfg.layers, cfg.layers - cfg.first_routed_layer
    E, r, h = cfg.num_experts, cfg.adapter_rank, cfg.judge_hidden
    per_branch = (R * (D * h + h) if cfg.layer_pruning else 0) \
        + ((1 if cfg.share_token_judges else R) * D if cfg.token_selection else 0) \
        + (L * 2 * ((D * E + E) + (D * E * r + E * r) + (E * r * D + E * D)) if cfg.expert_routing else 0)
    branches = 2 if not cfg.share_routers and cfg.route_global and cfg.multi_scale else 1
    fusion = (C + 4 * C * C + 4 * C) if cfg.multi_scale else 0  # query, in/out projections
    head = (2 * C if cfg.multi_scale else C) * 2 + 2
    backbone = 0 if cfg.freeze_backbone else sum(p.numel() for p in DFDHR(cfg).backbone.parameters())
    return branches * per_branch + fusion + head + backbone


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_builds_what_it_says(ablation):
    cfg = make_config("small", ablation)
    model = DFDHR(cfg)
    assert trainable(model) == expected_trainable(cfg)
    assert hasattr(model, "pool") == cfg.multi_scale
    if model.routers is not None:
        routers = model.routers[0]
        assert (routers.layer_judges is not None) == cfg.layer_pruning
        assert (routers.experts is not None) == cfg.expert_routing
        if cfg.token_selection:
            assert len({id(j) for j in routers.token_judges}) == (1 if cfg.share_token_judges else 4)
    model.train()
    out = model(inputs(cfg))  # smoke: every variant runs a training step's forward
    assert out.logits.shape == (2, 2) and out.exit_layer.shape == (2, 5 if cfg.multi_scale else 1)
    assert (out.rank_loss > 0) == (cfg.multi_scale and cfg.token_selection)


def test_ablation_details():
    assert make_config("small", "baseline").image_size == SMALL.view_size
    assert DFDHR(make_config("small", "split_only")).routers is not None
    model = DFDHR(make_config("small", "separate_routers"))
    assert len(model.routers) == 2 and model.routers[0] is not model.routers[1]
    model.eval()
    out = model(inputs(SMALL))
    assert out.logits.shape == (2, 2)


@pytest.mark.parametrize("bad", [dict(keep_ratio=0.0), dict(first_routed_layer=8), dict(image_size=100),
                                 dict(heads=5), dict(num_experts=0)])
def test_impossible_configs_are_refused(bad):
    with pytest.raises(ValueError, match="invalid DFDHRConfig: .*" + next(iter(bad))):
        replace(SMALL, **bad)


def test_paper_preset_shapes_on_meta():
    """Smoke test at the paper preset: ViT-L/14, 448 input, routed 20-23, on meta tensors (no memory)."""
    with torch.device("meta"):
        model = DFDHR(make_config("paper"))
        out = model.train()(torch.empty(1, 3, 448, 448))
    assert out.logits.shape == (1, 2) and out.gates.shape == (1, 5, 24, 2, 4)
    assert [k.shape for k in out.kept] == [(1, 5, 192)] * 4
    assert model.config.num_tokens == 257 and math.isclose(model.config.keep_ratio, 0.75)
    assert trainable(model) == expected_trainable(model.config)

"""dfdhr.py beyond the specification in test_dfdhr.py: gradients per role, what is reported, ablation rows."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from dfdhr import ABLATIONS, DFDHR, DFDHRConfig, dfdhr_loss, force_exit, make_config, rank_loss
from finetune import count_trainable


def test_every_trainable_group_gets_a_gradient_and_the_frozen_backbone_none(small, inputs):
    cfg = replace(small, freeze_backbone=True)
    torch.manual_seed(0)
    model = DFDHR(cfg).train()
    out = model(inputs(cfg, n=8))
    dfdhr_loss(out, torch.tensor([0, 1] * 4), cfg).total.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    groups = {g["name"]: g["params"] for g in model.param_groups(lr=1e-4, backbone_lr=1e-6)}
    assert set(groups) == {"layer_judges", "token_judges", "experts", "fusion", "head"}
    for name, params in groups.items():
        assert sum(p.grad.abs().sum() for p in params) > 0, name
    routers = model.original_routers
    judges = [j for j in routers.layer_judges] + [j for j in routers.token_judges]
    experts = [e for pair in routers.experts for e in (pair.after_attn, pair.after_mlp)]
    for module in judges + experts:  # each judge, each gate and each adapter, not just each group
        for name, p in module.named_parameters():
            assert p.grad.abs().sum() > 0, name


def test_full_fine_tuning_switch(small):
    model = DFDHR(replace(small, freeze_backbone=False))
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, backbone_lr=1e-6)}
    assert groups["backbone"]["lr"] == 1e-6 and groups["head"]["lr"] == 1e-4
    assert sum(p.numel() for p in groups["backbone"]["params"]) == sum(p.numel() for p in model.backbone.parameters())


def test_kept_tokens_and_gates_are_reported(small, inputs):
    torch.manual_seed(0)
    model = force_exit(DFDHR(small).eval(), 6)
    _, out = model.predict(inputs(small, n=2))
    assert out.exit_layer.tolist() == [[6] * 5] * 2
    assert [k.min().item() >= 0 for k in out.kept] == [True, True, False, False]  # kept at 4, 5; exited at 6
    g = out.gates  # (B, V, L, 2, E)
    assert torch.allclose(g[:, :, :6].sum(-1), torch.ones(2, 5, 6, 2), atol=1e-5)
    assert torch.isnan(g[:, :, 6:]).all()


def judged(cfg):
    """Token judges score the tokens: Token Selection and Tab. 8 "Learn.+Weight", not Tab. 5's alternatives."""
    return cfg.token_selection and cfg.token_rule in ("judge", "judge+cosine")


def pooled(cfg):
    """A pooling module: the split images' CLS (but Tab. 6 "Split Ensemble"), or Tab. 6's layers' CLS."""
    return cfg.multi_scale and cfg.fusion != "ensemble" or cfg.layer_cls


def expected_trainable(cfg):
    """Trainable parameters counted from the paper's description, module by module."""
    D, P, L, routed = cfg.width, cfg.embed_dim, cfg.layers, len(cfg.routed_layers)
    E, r, h = cfg.num_experts, cfg.adapter_rank, cfg.judge_hidden
    per_branch = ((1 if cfg.share_layer_judges else routed) * (D * h + h) if cfg.layer_pruning else 0) \
        + ((1 if cfg.share_token_judges else routed) * D if judged(cfg) else 0) \
        + (L * 2 * ((D * E + E) + (D * E * r + E * r) + (E * r * D + E * D)) if cfg.expert_routing else 0)
    branches = 2 if not cfg.share_routers and cfg.route_original and cfg.multi_scale else 1
    query = P if cfg.fusion != "self_attention" else 0  # SA pooling (Tab. 8) has no learned query
    fusion = (query + 4 * P * P + 4 * P) if pooled(cfg) else 0  # query, in/out projections
    head = (2 * P if pooled(cfg) else P) * 2 + 2
    backbone = 0 if cfg.freeze_backbone else sum(p.numel() for p in DFDHR(cfg).backbone.parameters())
    return branches * per_branch + fusion + head + backbone


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_builds_what_it_says(ablation, inputs):
    cfg = make_config("small", ablation)
    model = DFDHR(cfg)
    assert count_trainable(model) == expected_trainable(cfg)
    assert (model.pool is not None) == pooled(cfg)
    if cfg.routing:
        routers = model.branches()[0]
        assert (routers.layer_judges is not None) == cfg.layer_pruning
        assert (routers.experts is not None) == cfg.expert_routing
        if cfg.layer_pruning:
            assert len({id(j) for j in routers.layer_judges}) == (1 if cfg.share_layer_judges else len(cfg.routed_layers))
        if judged(cfg):
            assert len({id(j) for j in routers.token_judges}) == (1 if cfg.share_token_judges else len(cfg.routed_layers))
    model.train()
    out = model(inputs(cfg))  # smoke: every variant runs a training step's forward
    assert out.logits.shape == (2, 2) and out.exit_layer.shape == (2, 5 if cfg.multi_scale else 1)
    assert (out.rank_loss > 0) == judged(cfg)  # one view ranks against its own final CLS


def test_ablation_details(small, inputs):
    assert make_config("small", "baseline").image_size == small.view_size
    split_only = DFDHR(make_config("small", "split_only"))
    assert split_only.branches() == [split_only.split_routers] and not split_only.original_routers.on
    assert split_only.original_routers.layer_judge(small.first_routed_layer) is None
    model = DFDHR(make_config("small", "separate_routers"))
    assert model.branches() == [model.original_routers, model.split_routers]
    model.eval()
    out = model(inputs(small))
    assert out.logits.shape == (2, 2)


@pytest.mark.parametrize("bad", [dict(keep_ratio=0.0), dict(first_routed_layer=8), dict(image_size=100),
                                 dict(heads=5), dict(num_experts=0)])
def test_impossible_configs_are_refused(bad, small):
    with pytest.raises(ValueError, match="invalid DFDHRConfig: .*" + next(iter(bad))):
        replace(small, **bad)


@pytest.mark.parametrize("T", [4, 6, 8])
def test_depth_counts_the_routed_layers_each_view_ran(small, inputs, T):
    model = force_exit(DFDHR(small).eval(), T)
    _, out = model.predict(inputs(small, n=2))
    assert out.exit_layer.eq(T).all() and out.depth.eq(T - small.first_routed_layer).all()


def test_compute_cost_charges_the_share_of_routed_layers_run_beyond_the_allowance(small, inputs):
    """μ·max(0, d − allowance) by hand from the views' depths, and its gradient reaches the layer judges only
    where the batch runs beyond the allowance."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 1])
    for budget, charged in ((0.0, True), (1.0, False)):
        cfg = replace(small, exit_cost=0.3, exit_budget=budget, rank_weight=0.0)
        model = DFDHR(cfg).train()
        out = model(inputs(cfg))
        share = out.depth.float().mean().item() / len(cfg.routed_layers)  # every view ran all four at init
        loss = dfdhr_loss(out, labels, cfg)
        assert loss.extra.item() == pytest.approx(0.3 * max(0.0, share - budget))
        loss.extra.backward()  # at the allowance, max(0, ·) passes no gradient
        grads = [p.grad for j in model.original_routers.layer_judges for p in j.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) == charged


@pytest.mark.parametrize("target", ["similar", "dissimilar"])
def test_rank_target_orders_tokens_by_their_cosine_or_its_opposite(target):
    """L_rank with exact ranks against scipy: Spearman(scores, cos) for the paper's target, Spearman(scores, −cos)
    for rank_target="dissimilar" (not in the paper), each averaged over the rows and the routed layers."""
    torch.manual_seed(0)
    config = DFDHRConfig(soft_rank=False, rank_target=target)
    query = torch.randn(3, 16)
    ranked = [(torch.randn(3, 10), torch.randn(3, 10, 16)) for _ in range(2)]  # (scores (b, N), tokens (b, N, D))
    sign = -1 if target == "dissimilar" else 1
    rhos = [spearmanr(s.numpy(), sign * F.cosine_similarity(t, q[None], dim=-1).numpy()).statistic
            for scores, tokens in ranked for s, t, q in zip(scores, tokens, query)]
    assert rank_loss(ranked, query, config).item() == pytest.approx(1 - np.mean(rhos), abs=1e-6)

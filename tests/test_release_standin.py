"""benchmarks/bench_release.py's comparison with the authors' release, without their code: a small stand-in of
the released detector, written here from what the release is described to do (README, "The paper, the released
code and this project"; benchmarks/BENCHMARKS.md section 7), gets the same checks as the release does at the
paper preset: the project's copy function copies its weights into ours under --ablation=released, and the
exit layers, logits and a training step's gradients must agree, while a copied weight changed in ours must show.

What the stand-in does as the release does, and ours does otherwise (gathering, order, exits):
  - views: the original image, a bicubic resize; the split images, the four quadrants stacked split-major
    (row q·B + s is quadrant q of sample s)
  - every layer: a mixture of adapters after attention and after the MLP, every expert on, a softmax gate without noise
  - layers K..L-2: a layer judge on each row's CLS, p = 1[σ(ℓ) > 0.5], in training 1[σ(ℓ + g) > 0.5] with one
    Gumbel draw g = -log(-log U); a running product; the rows still active picked by index, run, written back
  - in those layers each row's top ⌊0.75·N⌋ tokens by the token judge gathered one sample at a time (in their
    original order), the layer run on them, its outputs × (1 + softmax of their scores), written back in place
  - layer L-1: every row, exited ones too
  - the original image's CLS, and the four split CLS pooled by a learned query (4-head attention), each after
    the post-norm and the projection; concatenated; a linear head
  - L_rank at layer K of the split images, over the rows that run it: 1 - the mean product of standardised
    argsort ranks of the token scores and of the tokens' cosine with the original image's CLS (no gradient)
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import benchmarks.bench_release as bench
from benchmarks.bench_release import (TOLERANCE, answer, changed, check_case, check_cases, check_training,
                                      copy_release_into_ours, expert, let_through, paired_weights, token_judge,
                                      watching)
from dfdhr import DFDHR, make_config
from vit import load_clip

SIZES = dict(width=32, layers=6, heads=2, patch=8, image=32, proj=16)  # N = 17 tokens, routed layers 2-4, 5 unrouted
K = 2


def sample_gumbel(shape, device):  # the stand-in's source of Gumbel noise, where the release has its own
    return -torch.log(-torch.log(torch.rand(shape).to(device)))


def gumbel_sigmoid_sample(logits):
    return torch.sigmoid(logits + sample_gumbel(logits.shape, logits.device))


class Mixture(nn.Module):
    """x + Σ_e softmax(gate(x))_e · expert_e(x), each expert Linear(D, r) -> GELU -> Linear(r, D)."""

    def __init__(self, dim, experts, rank):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, rank), nn.GELU(), nn.Linear(rank, dim))
                                     for _ in range(experts))

    def forward(self, x):
        g = self.gate(x).softmax(-1)
        return x + sum(g[..., e, None] * adapter(x) for e, adapter in enumerate(self.experts))


class TokenRouter(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight_predictor = nn.Linear(dim, 1, bias=False)

    def forward(self, x):  # (b, N, D) -> (b, N)
        return self.weight_predictor(x)[..., 0]


class LayerRouter(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, 1, bias=False)

    def forward(self, cls):  # (b, D) -> (b, 1)
        return self.fc2(F.relu(self.fc1(cls)))


class StandIn(nn.Module):
    """The released detector in small, its modules under the release's names."""

    def __init__(self, clip, *, first_routed, experts=4, rank=8, judge_hidden=8, keep=0.75):
        super().__init__()
        self.backbone, self.visual_projection = clip.vision_model, clip.visual_projection
        clip.requires_grad_(False)
        D, P, L = clip.config.hidden_size, clip.config.projection_dim, clip.config.num_hidden_layers
        self.K, self.L, self.keep, self.view = first_routed, L, keep, clip.config.image_size
        self.query_token = nn.Parameter(torch.randn(1, 1, P))
        self.query_attn = nn.MultiheadAttention(P, num_heads=4, batch_first=True)
        self.adapters_attn = nn.ModuleList(Mixture(D, experts, rank) for _ in range(L))
        self.adapters_mlp = nn.ModuleList(Mixture(D, experts, rank) for _ in range(L))
        self.token_router = nn.ModuleList(TokenRouter(D) for _ in range(L))
        self.layer_router = nn.ModuleList(LayerRouter(D, judge_hidden) for _ in range(L))
        self.head = nn.Linear(2 * P, 2)

    def block(self, i, h):  # (b, n, D) -> (b, n, D)
        layer = self.backbone.encoder.layers[i]
        h = h + self.adapters_attn[i](layer.self_attn(layer.layer_norm1(h))[0])
        return h + self.adapters_mlp[i](layer.mlp(layer.layer_norm2(h)))

    def selected(self, i, h):
        """Layer i on each row's kept tokens, gathered and written back one sample at a time."""
        scores = self.token_router[i](h)  # (b, N)
        k = int(self.keep * h.shape[1])
        picks = [scores[s].topk(k).indices.sort().values for s in range(len(h))]
        tokens = torch.stack([h[s, idx] for s, idx in enumerate(picks)])  # (b, k, D)
        weights = torch.stack([scores[s, idx] for s, idx in enumerate(picks)]).softmax(-1)  # (b, k)
        y = self.block(i, tokens) * (1 + weights[..., None])
        out = h.clone()
        for s, idx in enumerate(picks):
            out[s, idx] = y[s]
        return out, scores

    @staticmethod
    def rank_loss(scores, tokens, query):  # 1 - Spearman by standardised argsort ranks, mean over rows
        sim = F.cosine_similarity(tokens, query[:, None], dim=-1)
        a, b = ((t.argsort(1).argsort(1).float() - (t.shape[1] - 1) / 2) for t in (scores, sim))
        a, b = a / a.std(1, keepdim=True), b / b.std(1, keepdim=True)
        return 1 - (a * b).mean(1).mean()

    def encode(self, h, query=None):  # (b, N, D) -> (b, N, D), L_rank or None
        active, rank = torch.ones(len(h)), None
        for i in range(self.L):
            if not self.K <= i < self.L - 1:
                h = self.block(i, h)
                continue
            logit = self.layer_router[i](h[:, 0])  # (b, 1)
            p = gumbel_sigmoid_sample(logit) if self.training else torch.sigmoid(logit)
            active = active * (p[:, 0] > 0.5).float()
            rows = active.nonzero()[:, 0]
            if len(rows):
                out, scores = self.selected(i, h[rows])
                if i == self.K and query is not None:
                    rank = self.rank_loss(scores, h[rows], query[rows])
                h = h.index_put((rows,), out)
        return h, rank

    def forward(self, data):
        x = data["image"]
        B, v = len(x), self.view
        embed = lambda images: self.backbone.pre_layrnorm(self.backbone.embeddings(images))  # noqa: E731
        project = lambda h: self.visual_projection(self.backbone.post_layernorm(h[:, 0]))  # noqa: E731
        orig = F.interpolate(x, size=v, mode="bicubic")
        split = x.view(B, 3, 2, v, 2, v).permute(2, 4, 0, 1, 3, 5).reshape(4 * B, 3, v, v)  # split-major
        g, _ = self.encode(embed(orig))
        s, rank = self.encode(embed(split), query=g[:, 0].repeat(4, 1))
        local = project(s).view(4, B, -1).transpose(0, 1)  # (B, 4, P)
        pooled = self.query_attn(self.query_token.repeat(B, 1, 1), local, local)[0][:, 0]
        return {"cls": self.head(torch.cat([project(g), pooled], -1)), "loss_spearman": rank}

    def get_losses(self, data, pred):
        return {"overall": F.cross_entropy(pred["cls"], data["label"]) + 0.1 * pred["loss_spearman"]}


@pytest.fixture
def pair(hf_clip):
    """The stand-in and ours under --ablation=released on the same backbone, its weights copied into ours."""
    clip = hf_clip(**SIZES)
    torch.manual_seed(1)
    release = StandIn(clip, first_routed=K)
    ours = DFDHR(make_config("small", "released", first_routed_layer=K, judge_hidden=8, adapter_rank=8),
                 backbone=load_clip(clip.state_dict(), heads=SIZES["heads"]))
    copy_release_into_ours(release, ours)
    return release, ours


def images(n=2, seed=0):
    return torch.randn(n, 3, 2 * SIZES["image"], 2 * SIZES["image"], generator=torch.Generator().manual_seed(seed))


def test_copy_pairs_every_weight_ours_trains_with_the_release(pair):
    release, ours = pair
    pairs = paired_weights(release, ours)  # asserts the cover and the shapes itself
    assert all(torch.equal(p.view(p.ours), p.theirs) for p in pairs)
    assert {p.group for p in pairs} == {"experts", "layer_judges", "token_judges", "fusion", "head"}
    assert sum(p.theirs.numel() for p in pairs) == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_three_cases_agree_and_a_changed_weight_shows(pair):
    release, ours = pair
    built, through, mixed = check_cases(release, ours, images())
    L = ours.config.layers
    assert (through.release_exits == L).all()  # through every routed layer
    expected = torch.where(torch.arange(10).view(2, 5) % 2 == 0, L, K + 1)  # the views alternately leave at K+1
    assert torch.equal(mixed.release_exits, expected)  # mixed in each pass: the original images, the split ones
    for case in (built, through, mixed):
        assert torch.equal(case.release_exits, case.ours_exits), case
        assert case.max_abs_logit_diff < TOLERANCE and case.changed_diff > TOLERANCE, case
        assert case.release_gmac == pytest.approx(case.ours_gmac)
        assert case.failures() == []
    assert through.ours_gmac > mixed.ours_gmac


def test_rows_that_leave_are_blind_to_later_layers_and_the_others_are_written_back(pair):
    """Sample 0's views all leave at K+1, sample 1's run on (the release's judge at K+1 told so): the two agree,
    and a change to layer K+2's expert in ours moves sample 1's logits only."""
    release, ours = pair
    x, L = images(), ours.config.layers
    let_through(release, ours.config.routed_layers)
    with torch.no_grad(), watching(release, ours.config) as seen:
        release.eval()({"image": x})
    answer(release, K + 1, seen.judge_inputs(K + 1).flatten(0, 1), torch.tensor([-0.5] * 5 + [0.5] * 5))
    case, _ = check_case("sample 0 leaves", release, ours, x, lambda m, exits: expert(m, K + 2))
    assert case.release_exits.tolist() == case.ours_exits.tolist() == [[K + 1] * 5, [L] * 5]
    assert case.failures() == [], case
    with torch.no_grad():
        base = ours.eval()(x).logits
        with changed(expert(ours, K + 2)[1]):
            moved = (ours(x).logits - base).abs().amax(1)
    assert moved[0] == 0 and moved[1] > TOLERANCE


def test_a_training_step_agrees_with_the_same_draws(pair):
    release, ours = pair
    x, y = images(n=3, seed=2), torch.tensor([0, 1, 0])
    t = check_training(release, ours, x, y, seed=3)
    assert t.failures() == [], t
    assert t.same_draws and torch.equal(t.release_exits, t.ours_exits)
    assert len(t.ours_exits.unique()) > 2  # rows leave at different layers: picked and written back per row
    assert t.grads["layer_judges"] is None  # the decision only picks rows, in both
    assert all(t.grads[g][1] > 0 for g in ("experts", "token_judges", "fusion", "head"))


def test_without_the_same_draws_the_training_step_differs(pair, monkeypatch):
    """The check can fail: with the release's split rows drawn in its own order, exits or gradients differ."""
    release, ours = pair
    monkeypatch.setattr(bench, "draws_in_our_order", lambda release, batch: contextlib.nullcontext())
    t = bench.check_training(release, ours, images(n=3, seed=2), torch.tensor([0, 1, 0]), seed=3)
    assert t.failures() != []


"""routing.py against independent references: scipy's ranks and Spearman coefficient, the
Gumbel CDF, the paper's update formula, per-sample Python loops, finite differences."""

import pytest
import torch
from scipy.stats import rankdata, spearmanr

from routing import (RANK_TEMPERATURE, LayerJudge, MixtureOfAdapters, exact_rank, gather_tokens,
                     gumbel_sigmoid, num_kept, routed_update, run_on_selected, scatter_tokens,
                     select_tokens, soft_rank, spearman_corr, spearman_loss, still_active)

LOW_T = 1e-4  # the temperature at which soft_rank's docstring says it matches scipy


# ----------------------------------------------------------------------------- layers

def test_gumbel_sigmoid_is_hard_forward_soft_backward():
    logits = (3 * torch.randn(2000)).requires_grad_()
    w = torch.randn(2000)
    torch.manual_seed(1)
    p = gumbel_sigmoid(logits, tau=0.7)
    (p * w).sum().backward()

    # the same U again, through the soft path written out from SPEC §3
    ref_logits = logits.detach().clone().requires_grad_()
    torch.manual_seed(1)
    u = torch.rand(2000)
    g = torch.logit(u)  # the logistic's inverse CDF: Gumbel(run) − Gumbel(exit) in distribution
    p_soft = torch.sigmoid((ref_logits + g) / 0.7)
    (p_soft * w).sum().backward()

    assert torch.equal(p.detach(), (p_soft > 0.5).float())  # exactly 0 or 1
    assert 0 < p.detach().mean() < 1
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_gumbel_sigmoid_fires_as_often_as_the_logistic_cdf_says(tau):
    torch.manual_seed(0)
    n = 20000
    logit = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5])
    p = gumbel_sigmoid(logit[:, None].expand(-1, n), tau=tau)
    theory = 1 / (1 + torch.exp(-logit))  # P(logit + g > 0), g the difference of two Gumbel(0, 1)
    sigma = (theory * (1 - theory) / n).sqrt()
    assert ((p.mean(1) - theory).abs() < 4 * sigma).all()
    assert abs(p.mean(1)[2] - 0.5) < 0.02  # logit 0 fires half the time, as inference's threshold


def test_gumbel_sigmoid_eval_is_a_deterministic_threshold():
    logits = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 2.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])  # σ(0) = 0.5 is not > 0.5
    for _ in range(3):
        assert torch.equal(gumbel_sigmoid(logits, training=False), expected)


def test_routed_update_gradient_is_the_papers():
    torch.manual_seed(0)
    h_in, h_out = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w = torch.randn(2, 5, 8)
    p = torch.tensor([0.0, 1.0], requires_grad=True)
    (routed_update(h_in, h_out, p) * w).sum().backward()
    # d/dp [p·Layer(H) + (1 − p)·H] = Layer(H) − H, also in the row whose gate is 0
    torch.testing.assert_close(p.grad, ((h_out - h_in) * w).sum((1, 2)))


def test_layer_judge_trains_through_routed_update():
    torch.manual_seed(0)
    judge = LayerJudge(dim=16)
    h_in = torch.randn(32, 5, 16)
    h_out = 2 * h_in + 1  # any layer
    p = gumbel_sigmoid(judge(h_in[:, 0]))
    routed_update(h_in, h_out, p).square().mean().backward()
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in judge.parameters())


def test_routed_update_rows_are_bit_identical_for_hard_gates():
    torch.manual_seed(0)
    h_in = torch.randn(64, 5, 16) * torch.logspace(-20, 20, 16)  # magnitudes that round badly
    h_out = torch.randn(64, 5, 16) * torch.logspace(20, -20, 16)
    p = gumbel_sigmoid(torch.randn(64, requires_grad=True))  # straight-through values
    out = routed_update(h_in, h_out, p)
    off, on = p == 0, p == 1
    assert off.any() and on.any() and (off | on).all()
    assert torch.equal(out[off], h_in[off])
    assert torch.equal(out[on], h_out[on])


def test_exited_sample_never_reenters():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    layers = [lambda h, i=i: torch.tanh(h) + i + 1 for i in range(3)]  # moves every row
    gates = torch.tensor([[1.0, 0.0, 1.0],   # layer 1: sample 1 exits
                          [1.0, 1.0, 0.0],   # layer 2: judge says 1 for sample 1 again
                          [1.0, 1.0, 1.0]])  # layer 3: and again
    h, active = x, torch.ones(3)
    states = []
    for layer, p in zip(layers, gates):
        states.append(h)
        active = still_active(active, p)
        h = routed_update(h, layer(h), active)
    assert torch.equal(active, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(h[1], x[1])              # exited before layer 1
    assert torch.equal(h[2], states[1][2])      # exited before layer 2
    full = x[0]
    for layer in layers:
        full = layer(full)
    assert torch.equal(h[0], full)              # ran every layer


# ----------------------------------------------------------------------------- tokens

def test_num_kept():
    assert num_kept(257, 0.75) == 192
    assert num_kept(3, 0.1) == 1
    assert num_kept(10, 1.0) == 10


def _mixing_block(a):
    """A token-mixing, non-linear block: any wrong gather shows up in every output."""
    return lambda t: t + torch.tanh(t @ a) + 0.5 * t.mean(dim=-2, keepdim=True)


def _reference(x, scores, block, k, cls_eligible, post_weight):
    """One sample at a time with Python sorting (SPEC §4 written out)."""
    outs, idxs = [], []
    for xb, sb in zip(x, scores):
        s = sb.tolist()
        candidates = range(len(s)) if cls_eligible else range(1, len(s))
        best = sorted(candidates, key=lambda i: -s[i])[: k if cls_eligible else k - 1]
        kept = sorted(best if cls_eligible else [0] + best)
        w = 1 + torch.softmax(sb[kept], dim=0)[:, None]
        xk = xb[kept]
        y = block(xk[None])[0] * w if post_weight else block((xk * w)[None])[0]
        out = xb.clone()
        out[kept] = y
        outs.append(out)
        idxs.append(kept)
    return torch.stack(outs), torch.tensor(idxs)


@pytest.mark.parametrize("post_weight", [True, False])
@pytest.mark.parametrize("cls_eligible", [True, False])
def test_run_on_selected_matches_per_sample_loop(post_weight, cls_eligible):
    torch.manual_seed(0)
    B, N, D = 4, 11, 6
    x = torch.randn(B, N, D, dtype=torch.float64)
    scores = torch.randn(B, N, dtype=torch.float64)
    scores[0, 0], scores[1, 0] = -10, 10  # CLS worst in row 0, best in row 1
    block = _mixing_block(torch.randn(D, D, dtype=torch.float64))

    out, idx = run_on_selected(x, scores, block, keep=0.5, cls_eligible=cls_eligible,
                               post_weight=post_weight)
    ref_out, ref_idx = _reference(x, scores, block, num_kept(N, 0.5), cls_eligible, post_weight)

    assert idx.shape == (B, 5)
    assert torch.equal(idx, ref_idx)
    assert (idx.diff(dim=-1) > 0).all()
    assert (0 in idx[0].tolist()) == (not cls_eligible)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    unkept = torch.ones(B, N, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(out[unkept], x[unkept])


def test_gather_scatter_tokens_and_their_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, requires_grad=True)
    idx = select_tokens(torch.randn(3, 7), 3)
    kept = gather_tokens(x, idx)
    for b in range(3):
        assert torch.equal(kept[b], x[b, idx[b]])
    y = torch.randn(3, 3, 4, requires_grad=True)
    out = scatter_tokens(x, idx, y)
    g = torch.randn(3, 7, 4)
    out.backward(g)
    for b in range(3):
        assert torch.equal(out[b, idx[b]], y[b])
        assert torch.equal(y.grad[b], g[b, idx[b]])
        assert (x.grad[b, idx[b]] == 0).all()
        unkept = [i for i in range(7) if i not in idx[b].tolist()]
        assert torch.equal(x.grad[b, unkept], g[b, unkept])


# ----------------------------------------------------------------------------- rank loss

def test_exact_rank_matches_scipy_rankdata():
    torch.manual_seed(0)
    x = torch.randint(0, 6, (3, 4, 30)).float()  # many ties
    y = torch.randn(5, 257)
    for v in (x, y):
        torch.testing.assert_close(exact_rank(v), torch.from_numpy(rankdata(v, axis=-1)).float())


def test_soft_rank_tends_to_scipy_rankdata():
    torch.manual_seed(0)
    x = torch.randint(0, 8, (6, 40)).float()  # ties, distinct values far apart
    ranks = soft_rank(x, temperature=LOW_T)
    torch.testing.assert_close(ranks, torch.from_numpy(rankdata(x.numpy(), axis=-1)).float())


def _scipy_spearman(a, b):
    return torch.tensor([spearmanr(u, v).statistic for u, v in zip(a.numpy(), b.numpy())])


@pytest.mark.parametrize("ties", [False, True])
def test_soft_spearman_matches_scipy_n257(ties):
    torch.manual_seed(0)
    if ties:
        s, t = torch.randint(0, 10, (2, 100, 257)).float()
    else:
        s, t = torch.randn(2, 100, 257)
    diff = spearman_corr(s, t, temperature=LOW_T).double() - _scipy_spearman(s, t)
    assert diff.abs().max() <= 1e-3


@pytest.mark.parametrize("ties", [False, True])
def test_soft_spearman_matches_scipy_small_n(ties):
    torch.manual_seed(0)
    if ties:
        s, t = torch.randint(0, 4, (2, 300, 7)).float()
    else:
        s, t = torch.randn(2, 300, 7)
    diff = spearman_corr(s, t, temperature=LOW_T).double() - _scipy_spearman(s, t)
    # soft_rank is exact where no two scores are within ~20 t std; it blends closer pairs
    z = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)
    gaps = z.sort(-1).values.diff(dim=-1)
    clear = ((gaps == 0) | (gaps > 20 * LOW_T)).all(-1)
    assert clear.float().mean() > 0.95
    assert diff[clear].abs().max() <= 1e-5


def test_spearman_loss_gradient_at_training_temperature():
    torch.manual_seed(0)
    s = torch.randn(4, 257, requires_grad=True)
    spearman_loss(s, torch.randn(4, 257), temperature=RANK_TEMPERATURE).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad.abs().sum(-1) > 1e-4).all()
    # and the gradient is the loss's (finite differences, float64)
    s64 = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(3, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: spearman_loss(v, t64, temperature=RANK_TEMPERATURE), (s64,))


def test_gradient_descent_on_spearman_loss_raises_the_exact_coefficient():
    torch.manual_seed(0)
    target = torch.randn(4, 257)
    s = torch.randn(4, 257, requires_grad=True)
    before = _scipy_spearman(s.detach(), target)
    for _ in range(20):
        spearman_loss(s, target).backward()
        with torch.no_grad():
            s -= 257 * s.grad
        s.grad = None
    after = _scipy_spearman(s.detach(), target)
    assert (after > before + 0.5).all(), (before, after)


def test_soft_rank_is_scale_free():
    # the temperature is in units of the row's std: scaling the scores changes nothing
    # (up to the 1e-6 added to the std, relatively 1e-4 at scale 1e-2)
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 257, dtype=torch.float64)
    ref = spearman_corr(s, t, temperature=RANK_TEMPERATURE)
    for scale in (1e-2, 1e3):
        got = spearman_corr(scale * s + 5, t, temperature=RANK_TEMPERATURE)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_constant_rows_give_zero_correlation():
    s = torch.randn(2, 9)
    assert torch.equal(spearman_corr(s, torch.ones(2, 9), temperature=0.1), torch.zeros(2))


# ----------------------------------------------------------------------------- experts

def _moa_loop(moa, x, gates):
    """Σ_e g_e · Adapter_e(x) + x, token by token, expert by expert, from the module's weights."""
    E, R = moa.num_experts, moa.rank
    w1, b1 = moa.up.weight, moa.up.bias
    out = torch.empty_like(x)
    flat_out = out.view(-1, x.shape[-1])
    for n, (xt, gt) in enumerate(zip(x.reshape(-1, x.shape[-1]), gates.reshape(-1, E))):
        acc = xt.clone()
        for e in range(E):
            h = torch.nn.functional.gelu(w1[e * R:(e + 1) * R] @ xt + b1[e * R:(e + 1) * R])
            acc = acc + gt[e] * (h @ moa.down_weight[e] + moa.down_bias[e])
        flat_out[n] = acc
    return out


def _gate_logits(moa, x):
    return x @ moa.gate.weight.T + moa.gate.bias


def _moa(seed=0):
    torch.manual_seed(seed)
    moa = MixtureOfAdapters(dim=16, num_experts=4, rank=8).double()
    with torch.no_grad():  # make every term visible (the default down-projection is ~1e-3)
        for prm in moa.parameters():
            prm.normal_(0, 0.5)
    return moa


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 16), (2, 2, 3, 16)])
def test_moa_eval_matches_loop_over_experts_and_tokens(shape):
    moa = _moa().eval()
    x = torch.randn(shape, dtype=torch.float64)
    out, gates = moa(x)
    torch.testing.assert_close(gates, torch.softmax(_gate_logits(moa, x), dim=-1))
    torch.testing.assert_close(gates.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))
    torch.testing.assert_close(out, _moa_loop(moa, x, gates))
    assert (out - x).abs().mean() > 0.1


def test_moa_training_gate_is_eq13_and_noisy():
    moa = _moa().train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(3)
    out, gates = moa(x)
    torch.manual_seed(3)
    eps = torch.randn(2, 5, 4, dtype=torch.float64)
    logits = _gate_logits(moa, x)
    noisy = logits + eps * torch.nn.functional.softplus(logits)
    torch.testing.assert_close(gates, torch.softmax(noisy, dim=-1))
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(out, _moa_loop(moa, x, gates))
    assert not torch.allclose(moa(x).gates, gates)            # a new draw
    assert not torch.allclose(moa.eval()(x).gates, gates)     # eval has none
    assert torch.equal(moa(x).out, moa(x).out)


def test_moa_gate_gets_a_gradient_at_step_one():
    torch.manual_seed(0)
    moa = MixtureOfAdapters(dim=16, num_experts=4, rank=8)  # default init
    x, w = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    (moa(x).out * w).sum().backward()
    assert moa.gate.weight.grad.abs().sum() > 0 and moa.up.weight.grad.abs().sum() > 0
    # with a zero down-projection (LoRA-style init) it would not
    moa.zero_grad()
    with torch.no_grad():
        moa.down_weight.zero_()
    (moa(x).out * w).sum().backward()
    assert moa.gate.weight.grad.abs().sum() == 0

"""routing.py beyond the specification in test_dfdhr.py: exits that never re-enter, exact hard
gates, gather/scatter gradients, ranks against scipy, the rank loss's gradient, the gate's init."""

import pytest
import torch
from scipy.stats import rankdata, spearmanr

from routing import (LayerJudge, MixtureOfAdapters, exact_rank, gather_tokens,
                     gumbel_sigmoid, num_kept, routed_update, scatter_tokens,
                     select_tokens, soft_rank, spearman_corr, spearman_loss, still_active)

# ----------------------------------------------------------------------------- layers

def test_layer_judge_trains_through_routed_update():
    torch.manual_seed(0)
    judge = LayerJudge(dim=16)
    h_in = torch.randn(32, 5, 16)
    h_out = 2 * h_in + 1  # any layer
    p = gumbel_sigmoid(judge(h_in[:, 0]))
    routed_update(h_in, h_out, p).square().mean().backward()
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in judge.parameters())


def test_layer_judge_starts_non_negative_and_init_gain_scales_its_logits():
    cls = torch.randn(64, 16)
    torch.manual_seed(0)
    plain = LayerJudge(dim=16)(cls)
    torch.manual_seed(0)
    scaled = LayerJudge(dim=16, init_gain=4.0)(cls)
    assert (plain >= 0).all() and plain.max() > 0
    torch.testing.assert_close(scaled, 4 * plain)
    torch.manual_seed(0)
    released = LayerJudge(dim=16, init_gain=0)  # nn.Linear's own draw, signs and all
    torch.manual_seed(0)
    linear = [torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 1, bias=False)]  # its hidden width
    torch.testing.assert_close(released.fc2.weight, linear[1].weight)
    assert (released.fc2.weight < 0).any()


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


def test_soft_rank_tends_to_scipy_rankdata(low_t):
    torch.manual_seed(0)
    x = torch.randint(0, 8, (6, 40)).float()  # ties, distinct values far apart
    ranks = soft_rank(x, temperature=low_t)
    torch.testing.assert_close(ranks, torch.from_numpy(rankdata(x.numpy(), axis=-1)).float())


def _scipy_spearman(a, b):
    return torch.tensor([spearmanr(u, v).statistic for u, v in zip(a.numpy(), b.numpy())])


@pytest.mark.parametrize("ties", [False, True])
def test_soft_spearman_matches_scipy_small_n(ties, low_t):
    torch.manual_seed(0)
    if ties:
        s, t = torch.randint(0, 4, (2, 300, 7)).float()
    else:
        s, t = torch.randn(2, 300, 7)
    diff = spearman_corr(s, t, temperature=low_t).double() - _scipy_spearman(s, t)
    # soft_rank is exact where no two scores are within ~20 t std; it blends closer pairs
    z = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)
    gaps = z.sort(-1).values.diff(dim=-1)
    clear = ((gaps == 0) | (gaps > 20 * low_t)).all(-1)
    assert clear.float().mean() > 0.95
    assert diff[clear].abs().max() <= 1e-5


def test_spearman_loss_gradient_at_training_temperature(small):
    torch.manual_seed(0)
    s = torch.randn(4, 257, requires_grad=True)
    spearman_loss(s, torch.randn(4, 257), temperature=small.rank_temperature).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad.abs().sum(-1) > 1e-4).all()
    # and the gradient is the loss's (finite differences, float64)
    s64 = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(3, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: spearman_loss(v, t64, temperature=small.rank_temperature), (s64,))


def test_gradient_descent_on_spearman_loss_raises_the_exact_coefficient(small):
    torch.manual_seed(0)
    target = torch.randn(4, 257)
    s = torch.randn(4, 257, requires_grad=True)
    before = _scipy_spearman(s.detach(), target)
    for _ in range(20):
        spearman_loss(s, target, temperature=small.rank_temperature).backward()
        with torch.no_grad():
            s -= 257 * s.grad
        s.grad = None
    after = _scipy_spearman(s.detach(), target)
    assert (after > before + 0.5).all(), (before, after)


def test_soft_rank_is_scale_free(small):
    # the temperature is in units of the row's std: scaling the scores changes nothing
    # (up to the 1e-6 added to the std, relatively 1e-4 at scale 1e-2)
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 257, dtype=torch.float64)
    ref = spearman_corr(s, t, temperature=small.rank_temperature)
    for scale in (1e-2, 1e3):
        got = spearman_corr(scale * s + 5, t, temperature=small.rank_temperature)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_constant_rows_give_zero_correlation():
    s = torch.randn(2, 9)
    assert torch.equal(spearman_corr(s, torch.ones(2, 9), temperature=0.1), torch.zeros(2))


# ----------------------------------------------------------------------------- experts

def test_moa_gate_gets_a_gradient_at_step_one():
    torch.manual_seed(0)
    moa = MixtureOfAdapters(dim=16, num_experts=4, adapter_rank=8)  # default init
    x, w = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    (moa(x).out * w).sum().backward()
    assert moa.gate.weight.grad.abs().sum() > 0 and moa.up.weight.grad.abs().sum() > 0
    # with a zero down-projection (LoRA-style init) it would not
    moa.zero_grad()
    with torch.no_grad():
        moa.down_weight.zero_()
    (moa(x).out * w).sum().backward()
    assert moa.gate.weight.grad.abs().sum() == 0

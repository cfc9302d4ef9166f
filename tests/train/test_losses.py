"""Preference losses against hand-computed values, identities, gradcheck and stability.

Shared example (one pair, float64): beta = 0.5, pi_c = -1, pi_r = -3, ref_c = -2, ref_r = -2.
Log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1, so the margin h = 1 - (-1) = 2 and
the DPO logit z = beta * h = 1. Rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * (-1) = -0.5.
Numbers below: softplus(x) = log(1 + e^x); e^-1 = 0.367879441, e^-0.5 = 0.606530660,
sigma(1) = 0.731058579.
"""

import math

import pytest
import torch

from rosepo.losses import (LOSSES, cdpo_loss, dpo_loss, ipo_loss, preference_loss, rosepo_loss,
                           sdpo_loss, sft_regularizer)

BETA = 0.5


def t(*values, grad=False):
    """A float64 tensor, optionally a leaf that records gradients."""
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def example(grad=False):
    """The shared example's (pi_c, pi_r, ref_c, ref_r), batch of one."""
    return t(-1.0, grad=grad), t(-3.0, grad=grad), t(-2.0), t(-2.0)


def random_logps(batch=4, k=None, seed=0, scale=3.0):
    """Random float64 log-probs; policy ones are leaves for gradcheck."""
    g = torch.Generator().manual_seed(seed)
    rshape = (batch,) if k is None else (batch, k)
    pc = (-scale * torch.rand(batch, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-scale * torch.rand(rshape, generator=g, dtype=torch.float64)).requires_grad_()
    rc = -scale * torch.rand(batch, generator=g, dtype=torch.float64)
    rr = -scale * torch.rand(rshape, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr


# --- hand-computed values -------------------------------------------------------------------

def test_dpo_value_and_rewards():
    """z = 1, loss = -log sigma(1) = log(1 + e^-1) = log(1.367879441) = 0.313262."""
    loss, chosen, rejected = dpo_loss(*example(), beta=BETA)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_rosepo_value_and_gradient():
    """eps = 0.2, z = 1.

    loss = 0.8 softplus(-1) + 0.2 softplus(1); softplus(1) = 1 + softplus(-1), so
    loss = softplus(-1) + 0.2 = 0.313262 + 0.2 = 0.513262 (DPO gives 0.313262: the smoothing
    term must be there). d loss / dz = -0.8 sigma(-1) + 0.2 sigma(1) = sigma(1) - 0.8
    = 0.731059 - 0.8 = -0.068941; dz/dpi_c = beta = 0.5, so d loss / dpi_c = -0.034471 and
    d loss / dpi_r = +0.034471. DPO's would be 0.5 (sigma(1) - 1) = -0.134471; with the sign of
    the eps term flipped it would be 0.5 (-0.8 sigma(-1) - 0.2 sigma(1)) = -0.180682.
    """
    pc, pr, rc, rr = example(grad=True)
    loss, chosen, rejected = rosepo_loss(pc, pr, rc, rr, eps=t(0.2), beta=BETA)
    assert loss.item() == pytest.approx(0.513262, abs=1e-6)
    dpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert abs(loss.item() - dpo.item()) > 0.19
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.034471, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.034471, abs=1e-6)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_cdpo_value():
    """Constant eps = 0.2 on the shared example gives RosePO's 0.513262 (see above)."""
    loss, _, _ = cdpo_loss(*example(), eps=0.2, beta=BETA)
    assert loss.item() == pytest.approx(0.513262, abs=1e-6)


def test_sdpo_value_and_gradient():
    """Chosen as in the shared example (h_c = 1); K = 2 rejected: pi_r = [-3, -2],
    ref_r = [-2, -2], so h_r = [-1, 0] and beta (h_r - h_c) = [-1, -0.5].

    S = e^-1 + e^-0.5 = 0.367879 + 0.606531 = 0.974410, L = log S = -0.025923.
    loss = -log sigma(-L) = log(1 + e^L) = log(1 + S) = log(1.974410) = 0.680270.
    d loss / dpi_c = sigma(L) * dL/dpi_c = -beta S / (1 + S) = -0.5 * 0.493520 = -0.246760.
    d loss / dpi_rk = beta e^{x_k} / (1 + S): 0.5 * 0.367879 / 1.974410 = 0.093162 and
    0.5 * 0.606531 / 1.974410 = 0.153598.
    """
    pc, rc = t(-1.0, grad=True), t(-2.0)
    pr, rr = t([-3.0, -2.0], grad=True), t([-2.0, -2.0])
    loss, chosen, rejected = sdpo_loss(pc, pr, rc, rr, beta=BETA)
    assert loss.item() == pytest.approx(0.680270, abs=1e-6)
    assert rejected.shape == (1, 2)
    assert rejected[0].tolist() == pytest.approx([-0.5, 0.0])
    assert chosen.item() == pytest.approx(0.5)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.246760, abs=1e-6)
    assert pr.grad[0].tolist() == pytest.approx([0.093162, 0.153598], abs=1e-6)


def test_sdpo_smoothed_value():
    """Same pair, eps = 0.2: 0.8 softplus(L) + 0.2 softplus(-L) = softplus(L) - 0.2 L
    = 0.680270 + 0.2 * 0.025923 = 0.680270 + 0.005185 = 0.685454."""
    pc, rc, pr, rr = t(-1.0), t(-2.0), t([-3.0, -2.0]), t([-2.0, -2.0])
    loss, _, _ = sdpo_loss(pc, pr, rc, rr, beta=BETA, eps=t(0.2))
    assert loss.item() == pytest.approx(0.685454, abs=1e-6)


def test_ipo_value_and_gradient():
    """h = 2. beta = 0.5: (2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1. beta = 0.1: (2 - 5)^2 = 9, and
    d loss / dpi_c = 2 (h - 5) = -6, d loss / dpi_r = +6."""
    assert ipo_loss(*example(), beta=0.5)[0].item() == pytest.approx(1.0)
    pc, pr, rc, rr = example(grad=True)
    loss, chosen, _ = ipo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(9.0)
    assert chosen.item() == pytest.approx(0.1)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-6.0) and pr.grad.item() == pytest.approx(6.0)


def test_sft_regularizer_value():
    """-logp / count: -(-12) / 4 = 3 and -(-5) / 2 = 2.5; a zero count is refused."""
    out = sft_regularizer(t(-12.0, -5.0), torch.tensor([4, 2]))
    assert out.tolist() == pytest.approx([3.0, 2.5])
    with pytest.raises(ValueError, match="positive"):
        sft_regularizer(t(-1.0), torch.tensor([0]))


# --- identities -----------------------------------------------------------------------------

def test_rosepo_eps_zero_equals_dpo():
    pc, pr, rc, rr = random_logps(seed=1)
    got = rosepo_loss(pc, pr, rc, rr, eps=torch.zeros(4, dtype=torch.float64), beta=0.3)
    want = dpo_loss(pc, pr, rc, rr, beta=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_rosepo_constant_eps_equals_cdpo():
    pc, pr, rc, rr = random_logps(seed=2)
    got = rosepo_loss(pc, pr, rc, rr, eps=torch.full((4,), 0.15, dtype=torch.float64), beta=0.3)
    want = cdpo_loss(pc, pr, rc, rr, eps=0.15, beta=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_eps_half_zero_gradient_at_reference_and_label_free():
    """At eps = 0.5 the loss is 0.5 [softplus(-z) + softplus(z)], even in z: the label carries no
    information. Its gradient is beta (sigma(z) - 0.5), zero where the policy equals the
    reference (z = 0) for every pair, whereas eps = 0.2 there gives beta (0.5 - 0.8) = -0.15.
    Away from z = 0 it is not zero: z = 1 gives 0.5 (0.731059 - 0.5) = 0.115529."""
    pc, pr, rc, rr = random_logps(seed=3)
    half = torch.full((4,), 0.5, dtype=torch.float64)
    at_ref_c, at_ref_r = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    loss = rosepo_loss(at_ref_c, at_ref_r, pc.detach(), pr.detach(), eps=half, beta=BETA)[0]
    loss.sum().backward()
    assert torch.equal(at_ref_c.grad, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(at_ref_r.grad, torch.zeros(4, dtype=torch.float64))

    at_ref_c.grad = None
    rosepo_loss(at_ref_c, at_ref_r.detach(), pc.detach(), pr.detach(),
                eps=torch.full((4,), 0.2, dtype=torch.float64), beta=BETA)[0].sum().backward()
    assert at_ref_c.grad.tolist() == pytest.approx([-0.15] * 4)

    swapped = rosepo_loss(pr, pc, rr, rc, eps=half, beta=BETA)[0]
    torch.testing.assert_close(rosepo_loss(pc, pr, rc, rr, eps=half, beta=BETA)[0], swapped)

    ex_c, ex_r, ref_c, ref_r = example(grad=True)
    rosepo_loss(ex_c, ex_r, ref_c, ref_r, eps=t(0.5), beta=BETA)[0].sum().backward()
    assert ex_c.grad.item() == pytest.approx(0.115529, abs=1e-6)


def test_sdpo_one_negative_equals_dpo_and_smoothed_equals_rosepo():
    pc, pr, rc, rr = random_logps(seed=4)
    eps = torch.tensor([0.0, 0.1, 0.3, 0.45], dtype=torch.float64)
    s_loss, s_chosen, s_rejected = sdpo_loss(pc, pr.unsqueeze(-1), rc, rr.unsqueeze(-1), beta=0.7)
    d_loss, d_chosen, d_rejected = dpo_loss(pc, pr, rc, rr, beta=0.7)
    torch.testing.assert_close(s_loss, d_loss)
    torch.testing.assert_close(s_chosen, d_chosen)
    torch.testing.assert_close(s_rejected, d_rejected.unsqueeze(-1))
    smoothed = sdpo_loss(pc, pr.unsqueeze(-1), rc, rr.unsqueeze(-1), beta=0.7, eps=eps)[0]
    torch.testing.assert_close(smoothed, rosepo_loss(pc, pr, rc, rr, eps=eps, beta=0.7)[0])
    assert not torch.allclose(smoothed, d_loss)


# --- gradcheck ------------------------------------------------------------------------------

def test_gradcheck_rosepo():
    pc, pr, rc, rr = random_logps(seed=5)
    eps = torch.tensor([0.0, 0.1, 0.25, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c, r: rosepo_loss(c, r, rc, rr, eps=eps, beta=0.4)[0], (pc, pr))


@pytest.mark.parametrize("smoothed", [False, True])
def test_gradcheck_sdpo(smoothed):
    pc, pr, rc, rr = random_logps(seed=6, k=3)
    eps = torch.tensor([0.0, 0.1, 0.25, 0.4], dtype=torch.float64) if smoothed else None
    assert torch.autograd.gradcheck(
        lambda c, r: sdpo_loss(c, r, rc, rr, beta=0.4, eps=eps)[0], (pc, pr))


def test_gradcheck_ipo():
    pc, pr, rc, rr = random_logps(seed=7)
    assert torch.autograd.gradcheck(lambda c, r: ipo_loss(c, r, rc, rr, beta=0.4)[0], (pc, pr))


# --- numerical stability --------------------------------------------------------------------

def test_rosepo_large_margins_finite():
    """beta = 1, |h| = 1000 with eps = 0.2: loss = softplus(-z) + 0.2 z, so z = 1000 gives
    0 + 200 = 200 and z = -1000 gives 1000 - 200 = 800; d loss / dpi_c = sigma(z) - 0.8 =
    0.2 and -0.8. Naive log(sigmoid(-1000)) would be -inf."""
    pc, pr = t(0.0, -1000.0, grad=True), t(-1000.0, 0.0, grad=True)
    zeros = t(0.0, 0.0)
    loss, _, _ = rosepo_loss(pc, pr, zeros, zeros, eps=t(0.2, 0.2), beta=1.0)
    assert loss.tolist() == pytest.approx([200.0, 800.0])
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([0.2, -0.8])
    assert torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("eps", [None, 0.2])
def test_sdpo_large_margins_finite(eps):
    """beta = 1, K = 3, differences of +-1000: L = logsumexp([1000, 0, -1000]) = 1000 for the
    first pair and logsumexp([-1000, -2000, -1000]) = -1000 + log 2 for the second; loss
    softplus(L) - eps L is 1000 (800 with eps 0.2) and ~0 (~200 with eps 0.2)."""
    pc = t(-1000.0, 0.0, grad=True)
    pr = t([0.0, -1000.0, -2000.0], [-1000.0, -2000.0, -1000.0], grad=True)
    loss, _, _ = sdpo_loss(pc, pr, t(0.0, 0.0), torch.zeros(2, 3, dtype=torch.float64),
                           beta=1.0, eps=None if eps is None else t(eps, eps))
    e = eps or 0.0
    assert loss.tolist() == pytest.approx([1000.0 * (1 - e), e * (1000.0 - math.log(2))])
    loss.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# --- validation and dispatch ----------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.01, 0.51, float("nan")])
def test_eps_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        rosepo_loss(*example(), eps=t(bad), beta=BETA)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        cdpo_loss(*example(), eps=bad, beta=BETA)


def test_eps_shape_and_type_checked():
    with pytest.raises(ValueError, match="shape"):
        rosepo_loss(*example(), eps=t(0.1, 0.1), beta=BETA)
    with pytest.raises(ValueError, match="cdpo"):
        rosepo_loss(*example(), eps=0.1, beta=BETA)


def test_unknown_loss_names_known_ones():
    with pytest.raises(ValueError) as info:
        preference_loss("orpo", *example(), beta=BETA)
    assert all(name in str(info.value) for name in LOSSES)


def test_preference_loss_dispatch():
    """Each name reaches its loss: on the shared example dpo 0.313262, cdpo (eps 0.2) and
    rosepo (eps 0.2) 0.513262, ipo 1, sdpo with K=1 0.313262."""
    ex = example()
    assert preference_loss("dpo", *ex, beta=BETA)[0].item() == pytest.approx(0.313262, abs=1e-6)
    assert preference_loss("cdpo", *ex, beta=BETA, const_eps=0.2)[0].item() == pytest.approx(
        0.513262, abs=1e-6)
    assert preference_loss("rosepo", *ex, beta=BETA, eps=t(0.2))[0].item() == pytest.approx(
        0.513262, abs=1e-6)
    assert preference_loss("ipo", *ex, beta=BETA)[0].item() == pytest.approx(1.0)
    assert preference_loss("sdpo", *ex, beta=BETA)[0].item() == pytest.approx(0.313262, abs=1e-6)
    smoothed = preference_loss("sdpo_smoothed", *ex, beta=BETA, eps=t(0.2))
    assert smoothed[0].item() == pytest.approx(0.513262, abs=1e-6)
    assert smoothed[2].shape == (1, 1)


def test_preference_loss_negatives_shape():
    pc, pr, rc, rr = random_logps(seed=8, k=1)
    got = preference_loss("dpo", pc, pr, rc, rr, beta=BETA)[0]
    torch.testing.assert_close(got, dpo_loss(pc, pr.squeeze(-1), rc, rr.squeeze(-1), beta=BETA)[0])
    pc, pr, rc, rr = random_logps(seed=8, k=3)
    for name in ("dpo", "cdpo", "ipo"):
        with pytest.raises(ValueError, match="sdpo"):
            preference_loss(name, pc, pr, rc, rr, beta=BETA)
    with pytest.raises(ValueError, match="sdpo"):
        preference_loss("rosepo", pc, pr, rc, rr, beta=BETA,
                        eps=torch.zeros(4, dtype=torch.float64))
    assert preference_loss("sdpo", pc, pr, rc, rr, beta=BETA)[0].shape == (4,)


@pytest.mark.parametrize("name", ["rosepo", "sdpo_smoothed"])
def test_preference_loss_requires_eps(name):
    with pytest.raises(ValueError, match="eps"):
        preference_loss(name, *example(), beta=BETA)


def test_sdpo_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sdpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=BETA)

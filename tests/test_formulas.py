"""Each formula of the paper against a small hand-computed case."""

import math

import pytest
import torch

import brme
import r2m


def test_omega_schedule():
    T, floor = 100, 0.6
    assert r2m.omega(0, T, floor) == 1.0
    assert r2m.omega(T // 2, T, floor) == pytest.approx(0.6)  # ½cos(π/2)+½ = 0.5 -> floored at 0.6
    assert r2m.omega(T, T, floor) == pytest.approx(0.6)  # ½cos(π)+½ = 0 -> floor
    assert r2m.omega(25, T, 0.0) == pytest.approx(0.5 * math.cos(math.pi / 4) + 0.5)  # 0.853553...
    assert r2m.omega(T // 2, T, 0.0) == pytest.approx(0.5)
    assert all(r2m.omega(t, T, floor) >= floor for t in range(T + 1))
    assert all(r2m.omega(t + 1, T, 0.0) <= r2m.omega(t, T, 0.0) for t in range(T))


def test_rloo_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    # leave-one-out means: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]])
    torch.testing.assert_close(r2m.rloo_advantages(r), expected)


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 3**2) / 3)  # unbiased std = sqrt(14/3)
    expected = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - mean) / (std + 1e-4)
    adv = r2m.grpo_advantages(r)
    torch.testing.assert_close(adv[0], expected)
    assert torch.equal(adv[1], torch.zeros(4))  # a degenerate group gives no signal, and no NaN


def test_bradley_terry_loss_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert r2m.bradley_terry_loss(rc, rr).item() == pytest.approx(expected)


def test_group_reward_entropy_hand_computed():
    r = torch.tensor([[0.0, 1.0]])
    # mean 0.5, population std 0.5 (App. A, Defs. A.9-A.10: divide by K); z = ±1
    p1 = 1 / (1 + math.exp(-2.0))
    expected = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert r2m.group_reward_entropy(r, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    # K = 3: rewards 0, 0, 3 -> mean 1, population std sqrt(2); z = (-1, -1, 2) / sqrt(2)
    z = torch.tensor([-1.0, -1.0, 2.0]) / math.sqrt(2.0)
    p = torch.softmax(z, 0)
    expected3 = -(p * p.log()).sum().item()
    assert r2m.group_reward_entropy(torch.tensor([[0.0, 0.0, 3.0]]), eps=0.0).item() == pytest.approx(expected3, rel=1e-6)


def test_gre_equal_rewards_give_zero_gradient():
    r = torch.full((3, 5), 0.1, requires_grad=True)  # 0.1 is not exact in binary: rounding would bite
    loss = r2m.group_reward_entropy(r)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(5))
    assert torch.equal(r.grad, torch.zeros_like(r))


def test_gre_sharpening_lowers_entropy():
    flat = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    peaked = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    assert r2m.group_reward_entropy(peaked) < r2m.group_reward_entropy(flat)


def test_grebt_alpha_extremes_and_pair_choice():
    torch.manual_seed(0)
    new = torch.randn(6, 4)
    annotated = torch.randn(6, 4)
    w, l = annotated.argmax(1), annotated.argmin(1)
    rows = torch.arange(6)
    bt = r2m.bradley_terry_loss(new[rows, w], new[rows, l])
    gre = r2m.group_reward_entropy(new)
    torch.testing.assert_close(r2m.grebt_loss(new, annotated, alpha=0.0), bt)
    torch.testing.assert_close(r2m.grebt_loss(new, annotated, alpha=1.0), gre)
    torch.testing.assert_close(r2m.grebt_loss(new, annotated, alpha=0.3), 0.7 * bt + 0.3 * gre)
    # the pair comes from the annotated rewards, not from the new ones
    assert not torch.allclose(r2m.grebt_loss(new, annotated, 0.0), r2m.grebt_loss(new, new, 0.0))


def test_policy_loss_hand_computed():
    logp = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    old = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([2.0])
    # token 1: ratio 2 -> clipped to 1.2 (A > 0): 2.4; token 2: ratio 1: 2.0. KL k3: token 1: 0; token 2:
    # q-p = log 0.5 -> exp(-log2)... = 0.5 + log 2 - 1
    k3 = 0.5 + math.log(2) - 1
    expected = -((2.4 - 0.0) + (2.0 - 0.1 * k3)) / 2
    loss, stats = r2m.policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["policy/clipfrac"] == pytest.approx(0.5)


def test_policy_loss_masks_padding_and_averages_per_sequence():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    base, _ = r2m.policy_loss(logp, old, ref, adv, mask, 0.2, 0.05)
    logp2 = logp.clone()
    logp2[1, 2:] = 99.0  # garbage under the mask
    changed, _ = r2m.policy_loss(logp2, old, ref, adv, mask, 0.2, 0.05)
    assert changed.item() == base.item()
    # per-sequence mean then mean over sequences: the short sequence weighs as much as the long one
    seq0, _ = r2m.policy_loss(logp[:1], old[:1], ref[:1], adv[:1], mask[:1], 0.2, 0.05)
    seq1, _ = r2m.policy_loss(logp[1:], old[1:], ref[1:], adv[1:], mask[1:], 0.2, 0.05)
    assert base.item() == pytest.approx((seq0.item() + seq1.item()) / 2, rel=1e-6)


def test_brme_robust_reward_picks_lowest_sigma_and_minimum():
    mu = torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.0, 4.0]])
    sigma = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    nominal = torch.tensor([3.0, 0.5])
    worst = torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(brme.robust_reward(mu, sigma, 0.0), nominal)
    torch.testing.assert_close(brme.robust_reward(mu, sigma, 1.0), worst)
    torch.testing.assert_close(brme.robust_reward(mu, sigma, 0.4), 0.6 * nominal + 0.4 * worst)


def test_gaussian_bt_loss_hand_computed():
    mu_w, mu_l = torch.tensor([1.0]), torch.tensor([0.0])
    s_w, s_l = torch.tensor([1.0]), torch.tensor([2.0])
    scale = math.sqrt(1 + math.pi / 8 * 5)
    expected = math.log(1 + math.exp(-1 / scale))
    assert brme.gaussian_bradley_terry_loss(mu_w, s_w, mu_l, s_l).item() == pytest.approx(expected, rel=1e-6)

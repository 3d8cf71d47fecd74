"""Tests for advantage.py: hand-computed tables and brute-force references (fast, CPU only)."""
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from advantage import (entropy_shaped_advantages, explained_variance, gae_advantages,  # noqa: E402
                       group_advantages, masked_mean, policy_loss, shaping_stats, value_loss,
                       zero_spread)


def close(a, b, atol=1e-4):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


# ---------------------------------------------------------------------------- masked_mean

def test_masked_mean_ignores_padding_even_inf_and_takes_num_tokens():
    x = torch.tensor([[1.0, 3.0, float("inf")], [5.0, float("nan"), 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert masked_mean(x, m, num_tokens=9).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- group_advantages

@pytest.mark.parametrize("rewards, expected", [
    ([1, 0, 0, 0], [1.5, -0.5, -0.5, -0.5]),                   # mean .25, Bessel std .5
    ([1, 1, 0, 0], [0.8660, 0.8660, -0.8660, -0.8660]),         # mean .5, std sqrt(1/3)
    ([0, 0, 0, 1], [-0.5, -0.5, -0.5, 1.5]),
    ([1, 1, 1, 1], [0, 0, 0, 0]),                               # all equal: no signal, no NaN
    ([0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_group_advantages_table(rewards, expected):
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), group_size=4)
    assert not torch.isnan(adv).any()
    assert close(adv, expected)


def test_group_advantages_paper_worked_example():
    # PAPER.md: rewards +-1, G = 8, 2 right and 6 wrong: A_right = +1.620, A_wrong = -0.540
    r = torch.tensor([1.0, -1, -1, 1, -1, -1, -1, -1])
    adv = group_advantages(r, group_size=8)
    assert close(adv[[0, 3]], [1.620, 1.620], atol=1e-3)
    assert close(adv[[1, 2, 4, 5, 6, 7]], [-0.540] * 6, atol=1e-3)
    # +-1 rewards and 1/0 rewards give the same z-scores (Appendix B's "equivalent")
    assert close(group_advantages((r + 1) / 2, group_size=8), adv, atol=1e-5)


def test_group_advantages_groups_are_independent_and_match_statistics_module():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(24, generator=g)
    adv = group_advantages(r, group_size=6, eps=0.0)
    for i in range(4):
        chunk = r[i * 6:(i + 1) * 6].tolist()
        mu, sd = statistics.mean(chunk), statistics.stdev(chunk)  # stdev is Bessel-corrected
        assert close(adv[i * 6:(i + 1) * 6], [(x - mu) / sd for x in chunk], atol=1e-5)


@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("value", [0.7, 0.1, 1e6 + 0.1])
def test_equal_rewards_of_any_value_give_exactly_zero(value, scale_std):
    """A custom reward_fn's equal rewards are a group with nothing to learn, like all-0 or all-1: A
    is 0 exactly (float32 rounding of the mean over a std of ~1e-8 once made +0.056 of 0.7s)."""
    rewards = torch.tensor([value] * 8 + [1.0, 0, 0, 0, 0, 0, 0, 1])  # equal, then a spread
    adv = group_advantages(rewards, group_size=8, scale_std=scale_std)
    assert torch.equal(adv[:8], torch.zeros(8))
    right, wrong = (1.620, -0.540) if scale_std else (0.75, -0.25)  # as the paper's example
    assert close(adv[8:], [right] + [wrong] * 6 + [right], atol=1e-3)
    assert zero_spread(rewards, group_size=8).tolist() == [True, False]


def test_dr_grpo_only_centres():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 3, 3, 3, 3]), group_size=4, scale_std=False)
    assert close(adv, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-6)


def test_group_advantages_accepts_integer_or_bool_rewards():
    assert close(group_advantages(torch.tensor([True, False, False, False]), 4), [1.5, -0.5, -0.5, -0.5])


@pytest.mark.parametrize("rewards, g, match", [
    (torch.ones(8), 1, "group_size must be >= 2"),
    (torch.ones(6), 4, "multiple of group_size"),
    (torch.ones(2, 4), 4, r"flat \(N,\)"),
])
def test_group_advantages_errors(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size=g)


# ---------------------------------------------------------------------------- entropy_shaped_advantages

@pytest.mark.parametrize("a, h, expected", [
    (1.620, 0.5, 1.820),    # positive A, alpha*H = 0.2 < cap 0.81: alpha*H binds
    (1.620, 2.0, 2.420),    # just under PAPER.md's threshold H = 2.03: still alpha*H
    (1.620, 2.1, 2.430),    # just over it: the cap |A|/2 = 0.81 binds
    (-0.540, 0.5, -0.340),  # negative A, alpha*H = 0.2 < cap 0.27
    (-0.540, 3.0, -0.270),  # negative A, cap binds (H > 0.675): shrinks by half, sign kept
    (0.0, 5.0, 0.0),        # A = 0 (all-equal group): no bonus at all
    (2.0, 0.0, 2.0),        # a certain token (H = 0): no bonus
])
def test_entropy_shaped_table(a, h, expected):
    out = entropy_shaped_advantages(torch.tensor([[a]]), torch.tensor([[h]]), alpha=0.4, kappa=2.0)
    assert out.item() == pytest.approx(expected, abs=1e-5)


def test_per_response_advantage_broadcasts_over_tokens():
    adv = torch.tensor([1.0, -1.0])
    H = torch.tensor([[0.1, 0.2, 9.0], [0.1, 0.2, 9.0]])
    out = entropy_shaped_advantages(adv, H, alpha=1.0, kappa=4.0)
    assert close(out, [[1.1, 1.2, 1.25], [-0.9, -0.8, -0.75]], atol=1e-6)
    assert torch.equal(out, entropy_shaped_advantages(adv[:, None].expand(2, 3), H, alpha=1.0, kappa=4.0))


@pytest.mark.parametrize("alpha, kappa", [(0.1, 2.0), (0.4, 2.0), (5.0, 1.01), (0.4, 10.0), (100.0, 1.5)])
def test_bonus_never_flips_sign_and_stays_within_cap(alpha, kappa):
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(64, 50, generator=g) * 3
    adv[::5] = 0.0                                       # some zero-advantage rows
    H = torch.rand(64, 50, generator=g) * 10             # entropies up to 10 nats
    out = entropy_shaped_advantages(adv, H, alpha=alpha, kappa=kappa)
    assert torch.equal(torch.sign(out), torch.sign(adv))
    assert (out >= adv).all()                            # psi >= 0
    assert ((out - adv) <= adv.abs() / kappa + 1e-6).all()
    assert (out[::5] == 0).all()


def test_no_gradient_flows_through_the_entropy():
    adv = torch.tensor([[1.0, -0.5, 2.0]], requires_grad=True)
    H = torch.tensor([[0.3, 2.0, 0.1]], requires_grad=True)
    out = entropy_shaped_advantages(adv, H)
    g_adv, g_H = torch.autograd.grad(out.sum(), (adv, H), allow_unused=True)
    assert g_H is None                                   # H is not in the graph at all
    assert g_adv is not None
    # with only the entropy requiring grad, the output is a constant
    assert not entropy_shaped_advantages(adv.detach(), H).requires_grad


def test_alpha_zero_is_plain_grpo_exactly():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1]), group_size=4)
    H = torch.rand(8, 7) * 5
    out = entropy_shaped_advantages(adv, H, alpha=0.0, kappa=2.0)
    assert torch.equal(out, adv[:, None].expand(8, 7))


@pytest.mark.parametrize("alpha, kappa, match", [
    (0.4, 1.0, "kappa must be > 1"), (0.4, 0.5, "kappa must be > 1"), (-0.1, 2.0, "alpha must be >= 0")])
def test_entropy_shaped_errors(alpha, kappa, match):
    with pytest.raises(ValueError, match=match):
        entropy_shaped_advantages(torch.ones(2, 3), torch.ones(2, 3), alpha=alpha, kappa=kappa)
    with pytest.raises(ValueError, match=match):
        shaping_stats(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), alpha=alpha, kappa=kappa)


def test_entropy_shaped_shape_error():
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, R\)"):
        entropy_shaped_advantages(torch.ones(2, 4), torch.ones(2, 3))


def test_shaping_stats_hand_example():
    adv = torch.tensor([1.62, -0.54, 0.0])               # right, wrong, and a zero-advantage row
    H = torch.tensor([[0.5, 3.0, 50.0], [0.5, 3.0, 50.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0], [1, 1, 1]])  # column 2 of the first rows is padding
    s = shaping_stats(adv, H, mask, alpha=0.4, kappa=2.0)
    # psi on response tokens: [.2, .81], [.2, .27], [0, 0, 0] -> mean 1.48 / 7
    assert s["psi_mean"] == pytest.approx(1.48 / 7, abs=1e-5)
    # among the 4 tokens with A != 0 the cap binds on the two H = 3 tokens
    assert s["cap_frac"] == pytest.approx(0.5, abs=1e-6)
    # psi/|A|: .2/1.62, .81/1.62, .2/.54, .27/.54
    assert s["psi_ratio"] == pytest.approx((0.2 / 1.62 + 0.5 + 0.2 / 0.54 + 0.5) / 4, abs=1e-5)
    assert all(isinstance(v, float) for v in s.values())


# ---------------------------------------------------------------------------- policy_loss

def _clip_example():
    # one row, 4 response tokens + 1 padded token full of garbage
    A = torch.tensor([[1.0, -2.0, 2.0, -2.0, -7.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp = (old + ratio.log()).clone()
    logp[0, 4] = 200.0                                   # exp(201) = inf: NaN gradients if not masked
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    return logp, old, A, mask


def test_policy_loss_hand_example_clipping_on_both_sides():
    logp, old, A, mask = _clip_example()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, A, mask, eps_low=0.2, eps_high=0.28)
    # token 0: A>0, ratio 1.5 > 1.28 -> min(1.5, 1.28) = 1.28           (clipped high)
    # token 1: A<0, ratio 0.5 < 0.80 -> min(-1.0, -1.6) = -1.6          (clipped low)
    # token 2: A>0, ratio 0.5        -> min(1.0, 1.6)  = 1.0            (unclipped: may still rise)
    # token 3: A<0, ratio 1.5        -> min(-3.0, -2.56) = -3.0         (unclipped: may still fall)
    assert loss.item() == pytest.approx(-(1.28 - 1.6 + 1.0 - 3.0) / 4, abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["clip_frac_low"] == pytest.approx(0.25)
    assert stats["clip_frac_high"] == pytest.approx(0.25)
    # clipped tokens give no gradient; unclipped ones d(-ratio*A/4)/dlogp = -ratio*A/4; padding 0
    loss.backward()
    assert close(logp.grad, [[0.0, 0.0, -0.25, 0.75, 0.0]], atol=1e-6)


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    A = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, 100.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    lp = torch.randn(2, 3)
    loss, stats = policy_loss(lp, lp, A, mask)
    assert loss.item() == pytest.approx(-(1 - 2 + 4 + 0.5 + 0.5) / 5, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_micro_batches_add_up_to_the_batch_loss():
    g = torch.Generator().manual_seed(2)
    N, T = 6, 9
    lengths = torch.tensor([9, 3, 5, 1, 7, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(N, T, generator=g) * 3
    logp = old + 0.4 * torch.randn(N, T, generator=g)
    ref = old + 0.2 * torch.randn(N, T, generator=g)
    A = torch.randn(N, T, generator=g)
    H = torch.rand(N, T, generator=g) * 2
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy=H, entropy_coef=0.01)
    full, _ = policy_loss(logp, old, A, mask, **kw)
    total = mask.sum()
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = policy_loss(logp[rows], old[rows], A[rows], mask[rows], num_tokens=total,
                              ref_logprobs=ref[rows], kl_coef=0.05, entropy=H[rows], entropy_coef=0.01)
        parts = parts + part
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)
    # without num_tokens, averaging per-micro-batch means would weight tokens unequally
    unequal = sum(policy_loss(logp[r], old[r], A[r], mask[r], **{k: v[r] if torch.is_tensor(v) else v
                                                                   for k, v in kw.items()})[0]
                  for r in (slice(0, 2), slice(2, 3), slice(3, 6))) / 3
    assert abs(unequal.item() - full.item()) > 1e-4


def test_k3_kl_to_reference_hand_value():
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2), -math.log(2), 123.0]])  # last token is padding
    mask = torch.tensor([[1.0, 1, 0]])
    A = torch.zeros(1, 3)
    # k3 = e^d - d - 1: d = ln2 -> 1 - ln2; d = -ln2 -> ln2 - 1/2; mean = 1/4
    loss, stats = policy_loss(lp, lp, A, mask, ref_logprobs=ref, kl_coef=0.1)
    assert stats["kl_ref"] == pytest.approx(0.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    # kl to reference is reported even when it does not enter the loss
    loss0, stats0 = policy_loss(lp, lp, A, mask, ref_logprobs=ref)
    assert loss0.item() == 0.0 and stats0["kl_ref"] == pytest.approx(0.25, abs=1e-6)


def test_approx_kl_old_to_new_hand_value():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(2), 0.0]])
    _, stats = policy_loss(new, old, torch.zeros(1, 2), torch.ones(1, 2))
    assert stats["approx_kl"] == pytest.approx((2 - 1 - math.log(2)) / 2, abs=1e-6)


def test_entropy_bonus_gradient_flows_to_entropy():
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    H = torch.rand(2, 3).requires_grad_(True)
    loss, _ = policy_loss(lp, lp, torch.zeros(2, 3), mask, entropy=H, entropy_coef=0.5)
    assert loss.item() == pytest.approx(-0.5 * masked_mean(H, mask).item(), abs=1e-6)
    loss.backward()
    assert close(H.grad, -0.5 * mask / 4, atol=1e-7)   # raising H lowers the loss, padding untouched


# veRL's compute_policy_loss_vanilla per token, worked by hand with eps_low 0.2, eps_high 0.28 and
# clip_ratio_c 3: pg1 = -A*r, pg2 = -A*clip(r, 0.8, 1.28), loss = max(pg1, pg2), and for A < 0 also
# min(that, -3*A). (ratio, A, loss)
VERL_TABLE = [
    (1.0, 1.0, -1.0),     # ratio 1: -A
    (1.5, 1.0, -1.28),    # max(-1.5, -1.28): clipped high
    (0.5, 1.0, -0.5),     # max(-0.5, -0.8): unclipped below
    (4.0, 2.0, -2.56),    # max(-8, -2.56)
    (0.9, 0.5, -0.45),    # inside the clip range
    (0.5, -1.0, 0.8),     # max(0.5, 0.8) = 0.8 < 3: clipped low
    (1.5, -1.0, 1.5),     # max(1.5, 1.28) = 1.5 < 3: unclipped above
    (1.1, -0.5, 0.55),    # inside the clip range
    (4.0, -1.0, 3.0),     # max(4, 1.28) = 4, dual-clip: min(4, 3) = 3
    (4.0, -2.0, 6.0),     # max(8, 2.56) = 8, min(8, 6) = 6
    (2.5, -2.0, 5.0),     # max(5, 2.56) = 5 < 6: dual-clip does not act
]


@pytest.mark.parametrize("ratio, A, expected", VERL_TABLE)
def test_policy_loss_matches_a_hand_table_of_verl_values(ratio, A, expected):
    logp = torch.tensor([[math.log(ratio) - 1.0]])
    loss, _ = policy_loss(logp, torch.full((1, 1), -1.0), torch.tensor([[A]]), torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_dual_clip_share_and_its_zero_gradient():
    ratio = torch.tensor([[4.0, 1.5, 4.0]])
    A = torch.tensor([[-1.0, -1.0, 1.0]])
    logp = ratio.log().requires_grad_(True)
    loss, stats = policy_loss(logp, torch.zeros(1, 3), A, torch.ones(1, 3))
    assert stats["clip_frac_dual"] == pytest.approx(1 / 3) and stats["clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    # token 0 is dual-clipped and token 2 clipped high: no gradient; token 1: d(ratio*1/3)/dlogp = 1.5/3
    assert close(logp.grad, [[0.0, 0.5, 0.0]], atol=1e-6)


@pytest.mark.parametrize("log_ratio", [100.0, -100.0])
@pytest.mark.parametrize("A", [1.0, -1.0])
def test_extreme_log_ratios_give_finite_loss_and_gradient(log_ratio, A):
    logp = torch.tensor([[log_ratio, 0.0]], requires_grad=True)
    ref = torch.tensor([[-log_ratio, 0.0]])  # the KL term has its own exp
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[A, A]]), torch.ones(1, 2),
                              ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (loss, logp.grad)
    assert all(math.isfinite(v) for v in stats.values()), stats


@pytest.mark.parametrize("kw, match", [
    (dict(kl_coef=0.1), "needs ref_logprobs"),
    (dict(entropy_coef=0.1), "needs entropy"),
])
def test_policy_loss_errors(kw, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        policy_loss(x, x, x, torch.ones(2, 3), **kw)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3))


# ---------------------------------------------------------------------------- gae_advantages

def _brute_force_gae(r, v, lengths, gamma, lam):
    """Independent reference: A_t = sum_l (gamma*lam)^l delta_{t+l}, in plain Python."""
    out = []
    for row_r, row_v, L in zip(r.tolist(), v.tolist(), lengths):
        def delta(k):
            nxt = row_v[k + 1] if k + 1 < L else 0.0
            return row_r[k] + gamma * nxt - row_v[k]
        row = [sum((gamma * lam) ** l * delta(t + l) for l in range(L - t)) for t in range(L)]
        out.append(row + [0.0] * (len(row_v) - L))
    return torch.tensor(out)


def test_gae_hand_table():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(r, v, torch.ones(1, 3), gamma=0.9, lam=0.5, whiten=False)
    # delta = [0.9*.6-.5, 0.9*.7-.6, 1-.7] = [.04, .03, .3]; A = [.04+.45*.165, .03+.45*.3, .3]
    assert close(adv, [[0.11425, 0.165, 0.3]], atol=1e-6)
    assert close(ret, [[0.61425, 0.765, 1.0]], atol=1e-6)


def _random_batch(seed, N=5, T=8):
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 3, 5, 1, 6][:N]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    r = torch.zeros(N, T)
    for i, L in enumerate(lengths):
        r[i, L - 1] = float(torch.randint(0, 2, (1,), generator=g)) * 2 - 1   # +-1 on the last token
    r += 0.1 * torch.randn(N, T, generator=g) * mask                          # some per-token reward too
    v = torch.randn(N, T, generator=g)
    return r, v, mask, lengths


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_gae_matches_brute_force(gamma, lam):
    r, v, mask, lengths = _random_batch(3)
    expected = _brute_force_gae(r, v, lengths, gamma, lam)
    adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=lam, whiten=False)
    assert close(adv, expected, atol=1e-5)
    assert close(ret, (expected + v) * mask, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # whitened: brute-force values standardised over response tokens only (Bessel std)
    flat = expected[mask.bool()].tolist()
    mu, sd = statistics.mean(flat), statistics.stdev(flat)
    adv_w, ret_w = gae_advantages(r, v, mask, gamma=gamma, lam=lam)
    assert close(adv_w, ((expected - mu) / sd) * mask, atol=1e-4)
    assert torch.equal(ret_w, ret)                       # returns use the advantages before whitening


def test_gae_ignores_padded_positions():
    r, v, mask, _ = _random_batch(4)
    r2, v2 = r.clone(), v.clone()
    r2[mask == 0] = 100.0
    v2[mask == 0] = -55.0
    for whiten in (False, True):
        a1, R1 = gae_advantages(r, v, mask, gamma=0.9, lam=0.9, whiten=whiten)
        a2, R2 = gae_advantages(r2, v2, mask, gamma=0.9, lam=0.9, whiten=whiten)
        assert torch.allclose(a1, a2) and torch.allclose(R1, R2)
        assert (a2[mask == 0] == 0).all() and (R2[mask == 0] == 0).all()


def test_gae_gamma_lam_one_is_return_minus_value():
    r, v, mask, _ = _random_batch(5)
    adv, ret = gae_advantages(r, v, mask, whiten=False)
    reward_to_go = r.flip(1).cumsum(1).flip(1) * mask    # sum of rewards from t to the end
    assert close(adv, (reward_to_go - v) * mask, atol=1e-5)
    assert close(ret, reward_to_go, atol=1e-5)


def test_gae_whitened_has_zero_mean_unit_std_and_no_grad():
    r, v, mask, _ = _random_batch(6)
    v.requires_grad_(True)
    adv, ret = gae_advantages(r, v, mask)
    flat = adv[mask.bool()]
    assert abs(flat.mean().item()) < 1e-5 and flat.std().item() == pytest.approx(1.0, abs=1e-4)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="whiten=False"):
        gae_advantages(torch.ones(1, 3), torch.ones(1, 3), torch.tensor([[1.0, 0, 0]]))


# ---------------------------------------------------------------------------- value_loss, explained_variance

def test_value_loss_hand_example_with_clipping():
    old = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[2.0, 2.0, 1.2, 9.0]], requires_grad=True)
    R = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, stats = value_loss(v, old, R, mask, clip=0.5)
    # token 0: (2-3)^2 = 1 vs clipped (0.5-3)^2 = 6.25 -> 6.25 (clipped branch wins)
    # token 1: (2-0)^2 = 4 vs clipped (0.5-0)^2 = 0.25 -> 4
    # token 2: within the clip: 1.44 both
    assert loss.item() == pytest.approx(0.5 * (6.25 + 4 + 1.44) / 3, abs=1e-5)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()   # the clipped token has no gradient: d/dv of 0.5*(v-R)^2/3 = (v-R)/3 elsewhere
    assert close(v.grad, [[0.0, 2.0 / 3, 1.2 / 3, 0.0]], atol=1e-6)


def test_value_loss_num_tokens_splits_add_up():
    g = torch.Generator().manual_seed(7)
    v, old, R = (torch.randn(4, 5, generator=g) for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    full, _ = value_loss(v, old, R, mask)
    parts = sum(value_loss(v[s], old[s], R[s], mask[s], num_tokens=mask.sum())[0] for s in (slice(0, 1), slice(1, 4)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_explained_variance():
    R = torch.tensor([[1.0, 0.0, 1.0], [0.0, 3.0, 77.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    garbage = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -50.0]])
    assert explained_variance(R + garbage, R, mask) == pytest.approx(1.0)
    mean = masked_mean(R, mask).item()                  # 1.0 over response tokens
    assert explained_variance(torch.full((2, 3), mean), R, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(R / 2, R, mask) == pytest.approx(0.75, abs=1e-6)   # Var(R/2) = Var(R)/4
    assert math.isnan(explained_variance(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)))

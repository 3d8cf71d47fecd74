"""
advantage.py: from rewards to a loss. Pure tensor functions (torch only), no model, no state.

Where it sits in the pipeline:
    rollout -> reward -> [group_advantages or gae_advantages] -> [entropy_shaped_advantages]
            -> [policy_loss (+ value_loss for PPO)] -> optimiser step
train.py calls these in that order; each function below has a small example that runs as a doctest
(`python -m pytest --doctest-modules advantage.py`).

The paper (Cheng et al. 2025, "Reasoning with Exploration: An Entropy Perspective", Section 3.2)
changes one line: every response token's advantage gets a bonus psi_t = min(alpha*H_t, |A_t|/kappa),
with H_t the policy's token entropy, detached. It is `entropy_shaped_advantages` below. Defaults are
the paper's Appendix B: alpha 0.4 with GRPO (0.1 with PPO), kappa 2, clip-higher 0.2 / 0.28,
token-level loss mean, no KL and no entropy loss.

Shapes: N rows (responses: B prompts x G answers each), R response positions; `mask` is float
(N, R), 1 on response tokens (up to and including the stop token), 0 on padding. Values at padded
positions must be finite; they are otherwise ignored.
"""
import torch

# -----------------------------------------------------------------------------
# the one reduction we use everywhere

def masked_mean(x, mask, num_tokens=None):
    """Mean of x over the positions where mask is 1 (one number, over the whole batch).

    num_tokens, if given, replaces the count of masked positions as the denominator: pass the number
    of response tokens in the whole batch, so that micro-batches add up to the batch's token mean.

    >>> masked_mean(torch.tensor([[1., 2., 99.]]), torch.tensor([[1., 1., 0.]]))
    tensor(1.5000)
    """
    total = torch.where(mask.bool(), x, 0.0).sum()  # where, not x*mask: a stray inf/nan in padding stays out
    count = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return total / count

# -----------------------------------------------------------------------------
# 1) GRPO: one advantage per response, from the rewards of its group

def zero_spread(rewards, group_size):
    """(N,) rewards -> (num_prompts,) bool: the groups whose rewards are all equal (max == min), of
    any value. train.py counts them (zero_spread_groups); group_advantages gives them A = 0.

    >>> zero_spread(torch.tensor([1., 1., 0.7, 0.7, 0., 1.]), group_size=2)
    tensor([ True,  True, False])
    """
    r = rewards.view(-1, group_size)  # (num_prompts, G)
    return r.amax(dim=1) == r.amin(dim=1)

def group_advantages(rewards, group_size, scale_std=True, eps=1e-6):
    """(N,) rewards -> (N,) advantages, z-scored within each group of `group_size` consecutive rows.

    GRPO (Shao et al. 2024): A_i = (r_i - mean(r)) / (std(r) + eps) over the G answers to one prompt.
    std is Bessel-corrected (torch.std's default), as in veRL and TRL. scale_std=False is Dr. GRPO
    (Liu et al. 2025): only subtract the mean, since dividing by std up-weights groups that are nearly
    all right or all wrong. A group whose rewards are all equal gets A = 0: nothing to learn from it.
    Exactly 0, set outright (zero_spread): in float32 the mean of eight rewards of 0.7 is not quite
    0.7, and that rounding error over a std of 6e-8 (+ eps) would be an advantage of 0.06.

    >>> group_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 0., 0.]), group_size=4)
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.8660,  0.8660, -0.8660, -0.8660])
    >>> group_advantages(torch.full((4,), 0.7), group_size=4)
    tensor([0., 0., 0., 0.])
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare answers within a group (got {group_size}); "
                         "sample several answers per prompt, e.g. group_size=8")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be a flat (N,) tensor with N a multiple of group_size={group_size} "
                         f"(got shape {tuple(rewards.shape)}); pass len(prompts) * group_size rewards")
    r = rewards.float().view(-1, group_size)  # (num_prompts, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # equal rewards: 0, not the rounding error of their mean scaled up
    adv = torch.where(zero_spread(r.view(-1), group_size)[:, None], 0.0, adv)
    return adv.view(-1)  # (N,)

# -----------------------------------------------------------------------------
# 2) the paper's one line: an entropy bonus on the advantage

def _psi(adv, entropy, alpha, kappa):
    """The shaping term psi (N, R); validated here so every caller gets the same checks."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (got {alpha}); the paper uses 0.4 with GRPO, 0.1 with PPO; "
                         "alpha=0 turns the entropy term off (plain GRPO/PPO)")
    if kappa <= 1:
        raise ValueError(f"kappa must be > 1 (got {kappa}) so the bonus stays below |A| and never "
                         "flips an advantage's sign; the paper uses kappa=2")
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(entropy)  # (N,) per-response advantage -> (N, R), as GRPO does
    if adv.shape != entropy.shape:
        raise ValueError(f"adv must be (N,) or (N, R) like entropy {tuple(entropy.shape)}, got {tuple(adv.shape)}")
    # entropy is detached: H_t only sets the size of the bonus, it is not something to optimise.
    # The cap uses the original |A_t|, so a positive A grows by at most |A|/kappa and a negative one
    # shrinks by at most |A|/kappa (sign kept); A = 0 gives psi = 0.
    psi = torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)   # psi_t = min(alpha*H_t, |A_t|/kappa), Cheng et al. Section 3.2
    return adv, psi

def entropy_shaped_advantages(adv, entropy, alpha=0.4, kappa=2.0):
    """Advantage plus the entropy bonus: A_t + min(alpha * H_t.detach(), |A_t| / kappa), (N, R).

    adv is either (N,) (one GRPO advantage per response, broadcast to every token) or (N, R)
    (e.g. PPO's GAE advantage); entropy is (N, R) in nats. alpha=0 returns adv unchanged.
    Uncertain tokens (high H) of a good answer get pushed up more, and those of a bad answer pushed
    down less, which favours exploratory reasoning (Cheng et al. 2025, Section 3.2).

    >>> adv = torch.tensor([1.62, -0.54])                     # one right, one wrong answer
    >>> H = torch.tensor([[0.5, 3.0], [0.5, 3.0]])            # a confident and an uncertain token each
    >>> entropy_shaped_advantages(adv, H, alpha=0.4, kappa=2.0)
    tensor([[ 1.8200,  2.4300],
            [-0.3400, -0.2700]])
    """
    adv, psi = _psi(adv, entropy, alpha, kappa)
    return adv + psi

def shaping_stats(adv, entropy, mask, alpha, kappa):
    """What train.py logs about the bonus, over response tokens (mask (N, R)): a dict of floats.

    psi_mean: mean psi over all response tokens. cap_frac: fraction of tokens with A != 0 where
    the |A|/kappa cap binds (alpha*H > |A|/kappa). psi_ratio: mean psi/|A| over tokens with A != 0
    (the paper's Figure 7 shows it falling as the policy grows confident). Tokens with A = 0 (groups
    with all-equal rewards) get no bonus and would only dilute the last two, so they are left out.

    >>> s = shaping_stats(torch.tensor([1.62, -0.54]), torch.tensor([[0.5, 3.0], [0.5, 3.0]]),
    ...                   torch.ones(2, 2), alpha=0.4, kappa=2.0)
    >>> {k: round(v, 4) for k, v in s.items()}        # psi = [[.2, .81], [.2, .27]]
    {'psi_mean': 0.37, 'cap_frac': 0.5, 'psi_ratio': 0.3735}
    """
    adv, psi = _psi(adv, entropy, alpha, kappa)
    nonzero = mask * (adv != 0)  # (N, R) response tokens that have an advantage to shape
    binds = (alpha * entropy.detach() > adv.abs() / kappa).float()
    ratio = psi / adv.abs().clamp(min=1e-12)  # only read where adv != 0
    return {"psi_mean": masked_mean(psi, mask).item(),
            "cap_frac": masked_mean(binds, nonzero).item(),
            "psi_ratio": masked_mean(ratio, nonzero).item()}

# -----------------------------------------------------------------------------
# 3) the policy loss: PPO's clipped surrogate with clip-higher, token-level mean

LOG_RATIO_LIMIT = 20.0  # |log pi/pi_old| is clamped here before exp (as veRL): exp(20) = 5e8 is finite, exp(100) is not
DUAL_CLIP = 3.0  # for A < 0 the per-token loss is at most 3 * |A| (veRL's clip_ratio_c, Ye et al. 2020's dual-clip)

def policy_loss(logprobs, old_logprobs, advantages, mask, eps_low=0.2, eps_high=0.28,
                ref_logprobs=None, kl_coef=0.0, entropy=None, entropy_coef=0.0, num_tokens=None):
    """Clipped policy-gradient loss -> (loss, stats). All tensors (N, R); stats is a dict of floats.

    ratio = exp(logp - old_logp); surrogate = min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A).
    Clip-higher (DAPO, Yu et al. 2025): a wider upper bound lets unlikely tokens with A > 0 grow,
    which keeps entropy from collapsing. Two guards against one wild token poisoning the step, both
    as veRL's compute_policy_loss_vanilla: the log-ratio is clamped to +-20 before exp (exp(100) is
    inf in float32, and inf * 0 in the backward pass is NaN), and for A < 0 the surrogate is bounded
    by dual-clip, -surrogate <= DUAL_CLIP * |A|: with A < 0 the plain min() above grows with the
    ratio without limit. Optional: a k3 KL penalty to a reference model (kl_coef, needs
    ref_logprobs), and a classic entropy bonus (entropy_coef, needs entropy with its graph).
    num_tokens: the number of response tokens in the whole batch, so micro-batches add up to the
    batch's token mean (default: this call's own mask.sum()). Stats are means over this call's tokens.

    >>> lp = torch.zeros(1, 3)                                  # ratio 1: loss is -mean(A)
    >>> loss, stats = policy_loss(lp, lp, torch.tensor([[1., -2., 4.]]), torch.tensor([[1., 1., 0.]]))
    >>> loss, stats["clip_frac"]
    (tensor(0.5000), 0.0)
    >>> policy_loss(torch.tensor([[2.]]), torch.zeros(1, 1), torch.tensor([[-1.]]), torch.ones(1, 1))[0]
    tensor(3.)
    """
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be (N, R) like logprobs {tuple(logprobs.shape)}, got "
                         f"{tuple(advantages.shape)}; expand per-response advantages with entropy_shaped_advantages")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs); or set kl_coef=0")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy (N, R) computed with gradient; or set entropy_coef=0")
    # log-ratio zeroed on padding, so exp() there is exactly 1 whatever the padded log-probs hold
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)  # (N, R)
    log_ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)  # pessimistic: never profit from moving past the clip
    # dual-clip: a token with A < 0 whose ratio has run far above 1 costs at most DUAL_CLIP * |A|
    floor = DUAL_CLIP * advantages  # (N, R), negative where A < 0
    dual = (advantages < 0) & (surrogate < floor)
    surrogate = torch.where(dual, floor, surrogate)
    # Token-level mean over ALL response tokens of the batch (DAPO; the paper's Appendix B), rather
    # than a mean per response then over responses: the latter gives each token of a long answer a
    # smaller weight, so long wrong answers are punished less per token (a length bias).
    loss = -masked_mean(surrogate, mask, num_tokens)
    # where the clipped branch is the active one, the token gives no gradient
    clip_low = (advantages < 0) & (ratio < 1 - eps_low)  # (N, R)
    clip_high = (advantages > 0) & (ratio > 1 + eps_high)  # (N, R)
    stats = _clip_stats(clip_low, clip_high, dual, ratio, log_ratio, mask)
    if ref_logprobs is not None:
        kl = _kl_to_reference(logprobs, ref_logprobs, mask)  # (N, R)
        loss = loss + kl_coef * masked_mean(kl, mask, num_tokens)
        stats["kl_ref"] = masked_mean(kl, mask).item()
    if entropy is not None and entropy_coef > 0:
        # Entropy *regularisation* (the paper's Table 3 baseline): the gradient flows through H, so the
        # update raises entropy everywhere. Contrast the entropy *advantage* above, where H is detached
        # and only scales how hard each sampled token is reinforced.
        loss = loss - entropy_coef * masked_mean(entropy, mask, num_tokens)
    return loss, stats

@torch.no_grad()
def _clip_stats(clip_low, clip_high, dual, ratio, log_ratio, mask):
    """What train.py logs about the clip: the share of response tokens each clip silenced, and the
    k3 estimate of KL(old || new) from tokens the old policy sampled (ratio - 1 - log ratio, >= 0)."""
    clip_low, clip_high, dual = clip_low.float(), clip_high.float(), dual.float()
    return {"clip_frac": masked_mean(clip_low + clip_high + dual, mask).item(),
            "clip_frac_low": masked_mean(clip_low, mask).item(),
            "clip_frac_high": masked_mean(clip_high, mask).item(),
            "clip_frac_dual": masked_mean(dual, mask).item(),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item()}

def _kl_to_reference(logprobs, ref_logprobs, mask):
    """Per-token KL(pi || ref), (N, R), by k3 (Schulman, "Approximating KL divergence", 2020): with
    d = ref - logp, exp(d) - d - 1 is >= 0 and unbiased, with low variance. 0 on padding."""
    d = torch.where(mask.bool(), ref_logprobs - logprobs, 0.0).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return d.exp() - d - 1

# -----------------------------------------------------------------------------
# 4) PPO: per-token advantages from a critic (GAE), and the critic's own loss

@torch.no_grad()  # advantages and returns are targets: no gradient may reach the critic through them
def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=1.0, whiten=True):
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), (N, R) each.

    token_rewards: (N, R), a response's reward on its last token, 0 elsewhere. values: critic V_t.
    Backward over response positions only: delta_t = r_t + gamma*V_{t+1} - V_t (V beyond the last
    response token is 0), A_t = delta_t + gamma*lam*A_{t+1}. returns = raw A + V (the critic's target).
    With gamma = lam = 1 the raw advantage is simply the return minus the value: (sum of rewards
    from t on) - V_t. Then, as veRL, advantages are whitened over the batch's response tokens
    (subtract the masked mean, divide by the Bessel-corrected masked std). Padding stays 0 in both.

    >>> r = torch.tensor([[0., 0., 1.], [0., 1., 0.]])          # second row: 2 tokens, then padding
    >>> v = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 9.0]])
    >>> m = torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    >>> adv, ret = gae_advantages(r, v, m, whiten=False)
    >>> adv, ret
    (tensor([[0.5000, 0.5000, 0.5000],
            [0.8000, 0.6000, 0.0000]]), tensor([[1., 1., 1.],
            [1., 1., 0.]]))
    """
    N, R = values.shape
    adv = torch.zeros_like(values)  # (N, R)
    next_value = torch.zeros(N, dtype=values.dtype, device=values.device)  # V_{t+1}; 0 past the end
    next_adv = torch.zeros_like(next_value)  # A_{t+1}
    for t in reversed(range(R)):
        is_resp = mask[:, t].bool()  # (N,)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        # on padding, carry the running values through untouched and write nothing
        next_adv = torch.where(is_resp, a_t, next_adv)
        next_value = torch.where(is_resp, values[:, t], next_value)
        adv[:, t] = torch.where(is_resp, a_t, 0.0)
    returns = torch.where(mask.bool(), adv + values, 0.0)
    if whiten:
        n = mask.sum()
        if n < 2:
            raise ValueError("whitening needs at least 2 response tokens in the batch; pass whiten=False")
        mean = masked_mean(adv, mask)
        var = masked_mean((adv - mean) ** 2, mask) * n / (n - 1)  # Bessel-corrected, as veRL's masked_var
        adv = torch.where(mask.bool(), (adv - mean) * torch.rsqrt(var + 1e-8), 0.0)
    return adv, returns

def value_loss(values, old_values, returns, mask, clip=0.5, num_tokens=None):
    """PPO's clipped value loss -> (loss, stats). All (N, R); num_tokens as in policy_loss.

    loss = 0.5 * token-mean of max((V - ret)^2, (V_clipped - ret)^2), with ret the returns and
    V_clipped = old + clamp(V - old, -clip, clip): like the policy's ratio clip, the critic cannot
    gain by moving far from its rollout-time values in one update. stats: value_clip_frac, the fraction of tokens where the clipped term wins.

    >>> v, old, ret = torch.tensor([[2.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[3.0, 0.0]])
    >>> value_loss(v, old, ret, torch.ones(1, 2), clip=0.5)       # 0.5 * mean(max(1, 2.5^2), 0.1^2)
    (tensor(1.5650), {'value_clip_frac': 0.5})
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask, num_tokens)
    frac = masked_mean((err_clipped > err).float(), mask).item()
    return loss, {"value_clip_frac": frac}

def explained_variance(values, returns, mask):
    """1 - Var(ret - V) / Var(ret) over response tokens (ret: the returns), a float: 1 is a perfect
    critic, 0 is no better than predicting the mean return, below 0 is worse. NaN when the returns
    do not vary.

    >>> ret, m = torch.tensor([[1., 0., 1., 0.]]), torch.ones(1, 4)
    >>> explained_variance(ret, ret, m), explained_variance(torch.full((1, 4), 0.5), ret, m)
    (1.0, 0.0)
    """
    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    var_r = var(returns)
    if var_r == 0:
        return float("nan")
    return (1 - var(returns - values) / var_r).item()

"""
update.py -- what train.py's update() needs around its micro-step block: who learns, what was
scored before the update, and the plumbing of an optimiser step.

train.py's loop holds the arrow "advantages -> the paper's line -> loss -> backward -> optimiser
step" itself (its update()). This file gives it, in reading order:

    Learner, make_learners()   the actor and PPO's critic, each with its optimiser
    reference_model()          the KL term's frozen starting model
    OldScores                  what the loss compares against: log pi_old, log pi_ref and the
                               critic's values, scored by score_old_policy() once before the first
                               optimiser step, and the advantages
    critic_loss_backward()     PPO's clipped value loss on a micro-batch, and its backward
    clipped_step()             clip the gradient norm, step (or skip a non-finite one)
    Means                      the step's statistics
    MicroBatches               the reference way to split a mini-batch: a fixed number of rows at a
                               time, in order, as wide as the rollout; FAST picks fast/'s instead
"""

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from advantage import shaping_stats, value_loss
from fast.micro_batches import MicroBatchPlan
from plumbing.load import load_model
from model import Critic
from rollout import Rollout, score_responses

# -----------------------------------------------------------------------------------------------
# The records: who learns, and what the loss compares against


@dataclass
class Learner:
    """A network and what updates it: the actor (the policy), or PPO's critic.

    The scaler acts only under float16 autocast (GPUs below compute capability 8.0; see
    plumbing/precision.py): small gradients underflow to 0 in float16, so the loss is multiplied by a
    large factor before backward and the gradients divided by it again before the step; a step whose
    gradients overflowed is skipped and the factor lowered. Under bfloat16 or float32 it does nothing.
    """

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Callable = nullcontext  # returns a fresh autocast context for its forwards (plumbing/precision.py)


@dataclass
class OldScores:
    """What the loss needs besides the rollout, scored before the update moves the policy (and the
    advantages made from them), each (N, R); None where unused."""

    adv: torch.Tensor  # A_t before the entropy term (GRPO's group z-score, or PPO's GAE)
    logprobs: torch.Tensor | None = None  # log pi_old with mini_batches > 1 (else the first forward's own)
    ref_logprobs: torch.Tensor | None = None  # the KL reference's, with kl_coef > 0
    values: torch.Tensor | None = None  # PPO: the critic's values at rollout time (its loss clips to them)
    returns: torch.Tensor | None = None  # PPO: the critic's targets

    def at(self, rows, R: int) -> "OldScores":
        """The same scores for some rows of the rollout (a micro-batch: a slice or row indices) and
        their first R response columns."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows, :R]
                                for f in fields(self)})


def make_learners(cfg, model, precision) -> tuple:
    """(actor, critic or None): the policy, and PPO's critic, each with its AdamW optimiser, its
    gradient scaler (float16 only) and the run's autocast."""
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device, amp_dtype = precision.device, precision.amp_dtype
    scaler = lambda: torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # noqa: E731
    actor, critic = Learner(model, optimizer, scaler(), precision.autocast), None
    if cfg.algo == "ppo":
        critic_net = Critic.from_policy(model).to(device)  # started from the policy's weights, as veRL does
        critic_opt = torch.optim.AdamW(critic_net.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
        critic = Learner(critic_net, critic_opt, scaler(), precision.autocast)
    return actor, critic


def reference_model(cfg, model, device):
    """The KL term's reference (kl_coef > 0, else None): the starting model, for a resumed run too
    (never the checkpoint), frozen."""
    if cfg.kl_coef <= 0:
        return None
    ref_model = load_model(cfg.model, device=device, dtype=torch.float32)[0] if cfg.resume else copy.deepcopy(model)
    return ref_model.eval().requires_grad_(False)


def score_old_policy(cfg, rollout: Rollout, actor: Learner, critic: Learner | None, ref_model,
                     plan) -> OldScores:
    """OldScores without the advantages (the caller adds them): what the loss compares against,
    scored once, without gradients, before the first optimiser step moves the policy. Each only
    where used: log pi_old with mini_batches > 1, the KL reference's log-probs with kl_coef > 0,
    PPO's values."""
    actor.net.train()
    if critic is not None:
        critic.net.train()  # train mode: gradient checkpointing (and any dropout) applies to it too
    old = OldScores(adv=None)
    if cfg.mini_batches > 1:  # later mini-batches need log-probs from before the first update
        old.logprobs = plan.score(lambda r: score_responses(actor.net, r, cfg.temperature)[0],
                                  rollout, actor.amp)
    if ref_model is not None:
        old.ref_logprobs = plan.score(lambda r: score_responses(ref_model, r, cfg.temperature)[0],
                                      rollout, actor.amp)
    if critic is not None:
        old.values = plan.score(critic.net, rollout, critic.amp)  # (N, R)
    return old


# -----------------------------------------------------------------------------------------------
# The plumbing of train.py's update: PPO's critic, the optimiser step, the step's statistics


def critic_loss_backward(cfg, critic: Learner, part: Rollout, old: OldScores, num_tokens,
                         stats: "Means"):
    """PPO's clipped value loss on one micro-batch, and its backward."""
    mask = part.response_mask
    with critic.amp():
        v = critic.net(part)  # (n, R)
    vloss, s = value_loss(v.float(), old.values, old.returns, mask, cfg.value_clip,
                          num_tokens=num_tokens)
    critic.scaler.scale(vloss).backward()
    s["value_loss"] = vloss.item() * num_tokens.item() / max(mask.sum().item(), 1)
    stats.add(s, mask.sum().item())


class Means:
    """The step's statistics as weighted means: each value counts as much as what it was measured on
    (a micro-batch's tokens, the tokens it had to shape, or one optimiser step)."""

    def __init__(self):
        self.sums, self.weights = {}, {}

    def add(self, values: dict, weight: float):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def merge(self, other: "Means"):
        for k in other.sums:
            self.sums[k] = self.sums.get(k, 0.0) + other.sums[k]
            self.weights[k] = self.weights.get(k, 0.0) + other.weights[k]

    def means(self) -> dict:
        """{name: mean}; None where nothing was measured (e.g. psi/|A| when every group had A = 0)."""
        return {k: self.sums[k] / w if w else None for k, w in self.weights.items()}


def add_actor_stats(stats: Means, loss_stats: dict, adv, ent, mask, cfg):
    """policy_loss's statistics and the paper's line's (shaping_stats) for one micro-batch. Each
    counts every response token, except cap_frac and psi_ratio: only the tokens with A != 0, over
    which shaping_stats averages them. (Weighting those two by all tokens instead would count a
    micro-batch of all-equal-reward groups as a psi/|A| of 0: it once halved the logged value.)"""
    stats.add(loss_stats, mask.sum().item())
    s = shaping_stats(adv, ent, mask, cfg.alpha, cfg.kappa)
    shaped_tokens = (mask.bool() & (adv != 0)).sum().item()
    stats.add({"psi_mean": s["psi_mean"]}, mask.sum().item())
    stats.add({"cap_frac": s["cap_frac"], "psi_ratio": s["psi_ratio"]}, shaped_tokens)


def clipped_step(learner: Learner, max_norm: float, stats: "Means", name: str) -> bool:
    """Clip the global grad norm (logged under `name`, before clipping) and step. A non-finite norm
    (one inf or NaN gradient anywhere) is never applied: clip_grad_norm_ would scale every gradient
    by NaN. That step is skipped and its gradients dropped; returns True when it was skipped, and
    its norm stays out of the logged mean (one inf would hide the other updates' norms; the skips
    are counted beside it). (Under float16 the scaler's first steps overflow by design while it
    finds its factor.)"""
    learner.scaler.unscale_(learner.optimizer)  # float16: the gradients back at their true scale
    norm = torch.nn.utils.clip_grad_norm_(learner.net.parameters(), max_norm).item()
    finite = math.isfinite(norm)
    stats.add({name: norm if finite else 0.0}, float(finite))  # weight 0: out of the mean
    if finite:
        learner.scaler.step(learner.optimizer)  # = optimizer.step() unless float16
    learner.scaler.update()  # float16: an overflow lowers the factor for the next step
    learner.optimizer.zero_grad(set_to_none=True)
    return not finite




# -----------------------------------------------------------------------------------------------
# Micro-batches: the reference, and the switch to fast/'s


class MicroBatches:
    """The reference way to cut a mini-batch into micro-batches: --micro_batch rows at a time (auto:
    8), in the rollout's order, each as wide as the rollout; recomputation as --recompute says
    (auto: off). fast/micro_batches.py's MicroBatchPlan gives the same gradients sooner."""

    def __init__(self, cfg, device, learners: list):
        self.last_rows = 8 if str(cfg.micro_batch) == "auto" else int(cfg.micro_batch)
        self.recompute = cfg.recompute == "true"
        for learner in learners:
            learner.net.set_recompute(self.recompute)

    def split(self, rollout: Rollout, old: OldScores, rows: slice, probe: bool):
        """The micro-batches of one mini-batch (`rows` of the rollout): (part, its old scores)."""
        for first in range(rows.start, rows.stop, self.last_rows):
            mb = slice(first, min(first + self.last_rows, rows.stop))
            yield rows_of(rollout, mb), old.at(mb, rollout.response_ids.shape[1])

    @torch.no_grad()
    def score(self, fn, rollout: Rollout, amp) -> torch.Tensor:
        """fn (a scorer: Rollout -> (n, R) per-token values) over the whole rollout -> (N, R)."""
        N, parts = rollout.response_ids.shape[0], []
        for first in range(0, N, self.last_rows):
            with amp():
                parts.append(fn(rows_of(rollout, slice(first, first + self.last_rows))).float())
        return torch.cat(parts)

    def attempts(self, learners: list):
        yield nullcontext()  # one try at a mini-batch (fast/'s tries again when out of memory)


def rows_of(r: Rollout, rows: slice) -> Rollout:
    """Some rows of a rollout, every column kept."""
    return Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.response_ids[rows],
                   r.response_mask[rows], r.logprobs[rows], r.entropies[rows], r.stopped[rows],
                   r.texts[rows], r.group_size)


FAST = True  # the switch: fast/micro_batches.py (the default: the same gradients, sooner), or
#              the reference above (False)


def micro_batch_plan(cfg, device, learners: list):
    """How train.py's update() cuts each mini-batch into micro-batches (see FAST)."""
    return (MicroBatchPlan if FAST else MicroBatches)(cfg, device, learners)

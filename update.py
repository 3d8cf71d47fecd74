"""
update.py -- the update of one training step: the arrow "advantages -> loss -> optimiser step".

train.py's loop hands this file a rollout (rollout.py's record: tokens, masks, log-probs, entropies)
and its Targets (the advantages before the entropy term, and what the loss compares against), and
gets back the step's statistics. Read it in this order:

    update()                 one optimiser step per mini-batch of whole groups (nanoGPT's micro-step block):
      accumulate_gradients()   for each micro-batch of the mini-batch:
        actor_loss_backward()    the paper's line (+ min(alpha * H_t, |A_t| / kappa)), the clipped loss, backward
        critic_loss_backward()   PPO's clipped value loss, backward
      clipped_step()           clip the gradient norm, step (or skip a non-finite one)

Above them the records (Learner, Targets), make_learners() (the actor and PPO's critic, with their
optimisers) and reference_model() (the KL term's). Below them the plumbing: Means (the step's
statistics), score_before_update() (log pi_old, log pi_ref and the critic's values, scored once
before the first optimiser step) and MicroBatchPlan (how many rows fit in one forward and backward).
"""

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from advantage import entropy_shaped_advantages, policy_loss, shaping_stats, value_loss
from load import load_model
from model import Critic
from rollout import Rollout, score_responses

# -----------------------------------------------------------------------------------------------
# The records: who learns, and what the loss needs besides the rollout


@dataclass
class Learner:
    """A network and what updates it: the actor (the policy), or PPO's critic.

    The scaler acts only under float16 autocast (GPUs below compute capability 8.0; see
    runs.choose_precision): small gradients underflow to 0 in float16, so the loss is multiplied by a
    large factor before backward and the gradients divided by it again before the step; a step whose
    gradients overflowed is skipped and the factor lowered. Under bfloat16 or float32 it does nothing.
    """

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Callable = nullcontext  # returns a fresh autocast context for its forwards (runs.Precision.autocast)


@dataclass
class Targets:
    """What the update needs besides the rollout, each (N, R); None where unused."""

    adv: torch.Tensor  # advantages before the entropy term (GRPO's group z-score, or PPO's GAE)
    old_logprobs: torch.Tensor | None = None  # log pi_old with mini_batches > 1 (else the first forward's own)
    ref_logprobs: torch.Tensor | None = None  # the KL reference's, with kl_coef > 0
    old_values: torch.Tensor | None = None  # PPO: the critic's values at rollout time (its loss clips to them)
    returns: torch.Tensor | None = None  # PPO: the critic's targets

    def at(self, rows, R: int) -> "Targets":
        """The same targets for some rows of the rollout (a micro-batch: a slice or row indices) and
        their first R response columns (see rollout_rows)."""
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


# -----------------------------------------------------------------------------------------------
# The update: nanoGPT's micro-step block, with a clipped loss


def update(cfg, actor: Learner | None, critic: Learner | None, rollout: Rollout, t: Targets, plan) -> dict:
    """One optimiser step per mini-batch of the rollout (cfg.mini_batches of them, whole groups each);
    within a mini-batch, gradients accumulate over micro-batches (plan.rows of them at a time).
    actor None: only the critic learns (PPO's warm-up). cfg is train.Config; plan a MicroBatchPlan."""
    N = rollout.response_ids.shape[0]
    stats, skipped = Means(), 0
    per_mb = N // cfg.mini_batches
    for first in range(0, N, per_mb):
        rows = slice(first, first + per_mb)
        while True:
            try:
                stats.merge(accumulate_gradients(cfg, actor, critic, rollout, t, rows, plan))
                break
            except torch.OutOfMemoryError:
                pass  # handled below, once the exception (and the tensors its traceback holds) is gone
            plan.after_out_of_memory([actor, critic])  # a smaller micro-batch, or a clear error
        if actor is not None:
            skipped += clipped_step(actor, cfg.grad_clip, stats, "grad_norm")
        if critic is not None:
            skipped += clipped_step(critic, cfg.grad_clip, stats, "critic_grad_norm")
    return {**stats.means(), "skipped_updates": skipped, "micro_batch": plan.last_rows, "recompute": plan.recompute}


def accumulate_gradients(cfg, actor, critic, rollout: Rollout, t: Targets, rows: slice, plan) -> "Means":
    """Forward and backward over one mini-batch's rows, a micro-batch at a time. Each loss is divided
    by the mini-batch's token count, so the gradients add up to its token-level mean whatever the split."""
    stats = Means()
    num_tokens = rollout.response_mask[rows].sum()  # the mini-batch's token count
    order = longest_first(rollout, rows)  # (n,) the mini-batch's rows
    p0, R = used_columns(rollout, order)
    tokens_per_row = rollout.prompt_ids.shape[1] - p0 + R  # the mini-batch's tokens a row, without shared padding: no micro-batch is wider
    m = 0
    while m < len(order):
        mb = order[m : m + plan.rows(tokens_per_row)]  # a micro-batch: rows of similar length
        part = rollout_rows(rollout, mb)  # ... without the columns that are padding in all of them
        part_targets = t.at(mb, part.response_ids.shape[1])
        width = part.prompt_ids.shape[1] + part.response_ids.shape[1]  # the tokens a row costs here
        with plan.measure(len(mb), width, len(order), tokens_per_row, probe=actor is not None):
            if actor is not None:
                actor_loss_backward(cfg, actor, part, part_targets, num_tokens, stats)
            if critic is not None:
                critic_loss_backward(cfg, critic, part, part_targets, num_tokens, stats)
        m += len(mb)
    return stats


def actor_loss_backward(cfg, actor: Learner, part: Rollout, t: Targets, num_tokens, stats: "Means"):
    """The policy's clipped loss on one micro-batch (`part`, with its targets `t`), and its backward."""
    mask = part.response_mask
    with actor.amp():
        logp, ent = score_responses(actor.net, part, cfg.temperature)  # (n, R) each, with gradients
    # 1) the paper's line, A_t + min(alpha * H_t.detach(), |A_t| / kappa), H_t of the current policy
    shaped = entropy_shaped_advantages(t.adv, ent, cfg.alpha, cfg.kappa) if cfg.alpha > 0 else t.adv
    # 2) the old log-probs: with a single update per rollout the policy has not moved yet,
    #    so they are this forward's own values (ratio exactly 1, no extra forward)
    old = logp.detach() if t.old_logprobs is None else t.old_logprobs
    # 3) the clipped surrogate, a token-level mean over the mini-batch
    loss, s = policy_loss(logp, old, shaped, mask, cfg.eps_low, cfg.eps_high, t.ref_logprobs, cfg.kl_coef,
                          ent, cfg.entropy_coef, num_tokens=num_tokens)
    actor.scaler.scale(loss).backward()
    stats.add(s, mask.sum().item())
    add_shaping_stats(stats, t.adv, ent, mask, cfg)


def critic_loss_backward(cfg, critic: Learner, part: Rollout, t: Targets, num_tokens, stats: "Means"):
    """PPO's clipped value loss on one micro-batch, and its backward."""
    mask = part.response_mask
    with critic.amp():
        v = critic.net(part)  # (n, R)
    vloss, s = value_loss(v.float(), t.old_values, t.returns, mask, cfg.value_clip, num_tokens=num_tokens)
    critic.scaler.scale(vloss).backward()
    s["value_loss"] = vloss.item() * num_tokens.item() / max(mask.sum().item(), 1)
    stats.add(s, mask.sum().item())


# -----------------------------------------------------------------------------------------------
# The step's statistics, and the plumbing of the update


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


def add_shaping_stats(stats: Means, adv, ent, mask, cfg):
    """psi_mean counts every response token; cap_frac and psi_ratio only the tokens with A != 0,
    over which shaping_stats averages them. (Weighting those two by all tokens instead would count a
    micro-batch of all-equal-reward groups as a psi/|A| of 0: it once halved the logged value.)"""
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


# A rollout is as wide as its longest prompt plus its longest answer, and most rows are padding at
# one end or the other: in the experiment's CPU size, answers of 60 to 100 tokens share a rollout
# with a few cut off at 192. A micro-batch needs only the columns some of its rows use, so each one
# is cut to those, and micro-batches are made of rows of similar length (longest first), so that
# short answers travel together and cost what they cost. The numbers do not change: positions
# count real tokens only and attention never looks at padding (tests/test_train.py compares).


def longest_first(r: Rollout, rows: slice) -> torch.Tensor:
    """The rollout's rows in `rows`, as (n,) indices, the longest answers first (ties: in order).
    First also means that the micro-batch the memory probe measures is the widest (MicroBatchPlan)."""
    return torch.arange(r.response_ids.shape[0], device=r.response_ids.device)[rows][
        r.response_mask[rows].sum(-1).argsort(descending=True, stable=True)]


def used_columns(r: Rollout, rows: torch.Tensor) -> tuple:
    """(p0, R) for some rows ((n,) indices): the first prompt column one of them uses (left padding
    before it) and the end of their longest answer (as rollout._pack cuts the rollout)."""
    return int(r.prompt_mask[rows].any(0).nonzero().min()), int(r.response_mask[rows].any(0).nonzero().max()) + 1


def rollout_rows(r: Rollout, rows: torch.Tensor) -> Rollout:
    """Some rows of a rollout ((n,) indices), as a Rollout without the columns that are padding in
    all of them: the prompts' shared left padding and the answers' shared right padding."""
    p0, R = used_columns(r, rows)
    prompt_mask, response_mask = r.prompt_mask[rows], r.response_mask[rows]  # (n, P), (n, R)
    return Rollout(r.prompt_ids[rows, p0:], prompt_mask[:, p0:], r.response_ids[rows, :R], response_mask[:, :R],
                   r.logprobs[rows, :R], r.entropies[rows, :R], r.stopped[rows], [r.texts[i] for i in rows.tolist()],
                   r.group_size)


@torch.no_grad()
def score_all(fn, rollout: Rollout, rows: int, amp) -> torch.Tensor:
    """fn (a scorer: Rollout -> (n, R') per-token values) over the whole rollout, `rows` rows of
    similar length at a time, without gradients -> (N, R), 0 in the columns a part did not have."""
    order = longest_first(rollout, slice(None))  # (N,)
    out = torch.zeros(rollout.response_ids.shape, device=rollout.response_ids.device)  # (N, R)
    for m in range(0, len(order), rows):
        idx = order[m : m + rows]  # (n,)
        with amp():
            part = fn(rollout_rows(rollout, idx))  # (n, R')
        out[idx, : part.shape[1]] = part.float()
    return out


def score_before_update(cfg, rollout: Rollout, actor: Learner, critic: Learner | None, ref_model, plan) -> Targets:
    """Targets without the advantages (the caller adds them): what the loss compares against, scored
    once, without gradients, before the first optimiser step moves the policy. Each only where used:
    log pi_old with mini_batches > 1, the KL reference's log-probs with kl_coef > 0, PPO's values."""
    actor.net.train()
    if critic is not None:
        critic.net.train()  # train mode: gradient checkpointing (and any dropout) applies to it too
    t = Targets(adv=None)
    rows = plan.rows(rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1])  # no gradients: a training micro-batch is plenty
    if cfg.mini_batches > 1:  # later mini-batches need log-probs from before the first update
        t.old_logprobs = score_all(lambda r: score_responses(actor.net, r, cfg.temperature)[0], rollout, rows, actor.amp)
    if ref_model is not None:
        t.ref_logprobs = score_all(lambda r: score_responses(ref_model, r, cfg.temperature)[0], rollout, rows, actor.amp)
    if critic is not None:
        t.old_values = score_all(critic.net, rollout, rows, critic.amp)  # (N, R)
    return t


# -----------------------------------------------------------------------------------------------
# Micro-batches sized by memory

CPU_MICRO_BATCH = 8  # rows. A CPU has no launch overhead to amortise, so the size barely matters:
#                     8 was the fastest of 4 to 32, and recomputation only cost time, so a CPU
#                     never recomputes under auto (docs/speed.md times both).
PROBE_ROWS = 8  # rows of the first GPU micro-batch, whose peak memory is measured
MEMORY_SHARE = 0.8  # of the free GPU memory, what one micro-batch's activations may take


class MicroBatchPlan:
    """How many rows go through one forward and backward, and whether backward recomputes RMSNorm,
    SwiGLU and the LM head instead of keeping them: fixed by --micro_batch and --recompute, or sized
    by memory with `auto`.

    Why: a GPU wants the largest micro-batch that fits. On an H200, 128 rows x 128 tokens took 6.52 s
    in micro-batches of 8 rows, 1.09 s in micro-batches of 32 and 0.51 s in one of 128.
    auto on a GPU: the run's first training micro-batch (PROBE_ROWS rows) is also a probe: its peak
    memory per token (a row's tokens without the padding its micro-batch shares), against the memory
    free, gives the most rows of the mini-batch's width (its rows' tokens without shared padding; no
    micro-batch of it is wider) that fit in MEMORY_SHARE of it. --recompute auto probes without
    recomputation, the faster way; if a whole mini-batch would then not fit in one micro-batch,
    recomputation goes on and the probe is repeated. Should memory run out all the same, the
    micro-batch is halved and the mini-batch redone.
    auto on a CPU: CPU_MICRO_BATCH rows, and no recomputation (there it only cost time).
    """

    def __init__(self, cfg, device, learners: list):
        self.fixed = None if str(cfg.micro_batch) == "auto" else int(cfg.micro_batch)
        self.gpu = device.type == "cuda"
        self.recompute_auto = cfg.recompute == "auto"
        self.nets = [learner.net for learner in learners]
        self.optimizers = [learner.optimizer for learner in learners]
        self.bytes_per_token = None  # measured by the probe (GPU, auto)
        self.cap = None  # the most rows after an out-of-memory error
        self.last_rows = None
        self.set_recompute(cfg.recompute == "true")

    def set_recompute(self, on: bool):
        self.recompute = on
        for net in self.nets:
            net.set_recompute(on)

    def rows(self, tokens_per_row: int) -> int:
        """Rows for the next micro-batch (the caller stops at the end of the mini-batch)."""
        if self.fixed:
            rows = self.fixed
        elif not self.gpu:
            rows = CPU_MICRO_BATCH
        elif self.bytes_per_token is None:
            rows = PROBE_ROWS
        else:
            rows = max(1, int(MEMORY_SHARE * self.free_bytes() / (self.bytes_per_token * tokens_per_row)))
        self.last_rows = min(rows, self.cap or rows)
        return self.last_rows

    def free_bytes(self) -> int:
        """GPU memory a micro-batch's activations may use: free on the device, plus what torch's
        allocator holds unused, minus what the step will still claim: gradients not yet made, and
        AdamW's two moments (8 bytes a parameter) before its first step."""
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        for net, opt in zip(self.nets, self.optimizers):
            params = list(net.parameters())
            free -= sum(p.numel() * p.element_size() for p in params if p.grad is None)
            if not opt.state:
                free -= sum(2 * p.numel() * 4 for p in params)
        return max(free, 0)

    @contextmanager
    def measure(self, rows: int, tokens_per_row: int, mini_batch_rows: int, mini_batch_width: int, probe: bool):
        """Around one micro-batch's forward and backward: with auto on a GPU, the first is the probe.
        rows x tokens_per_row: the micro-batch's size; the mini-batch's, for the recompute decision."""
        if not (probe and self.gpu and self.fixed is None and self.bytes_per_token is None):
            yield
            return
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        self.bytes_per_token = (torch.cuda.max_memory_allocated() - base) / (rows * tokens_per_row)
        if self.recompute_auto and not self.recompute and self.rows(mini_batch_width) < mini_batch_rows:
            self.set_recompute(True)  # a mini-batch would not fit in one micro-batch: recompute, and
            self.bytes_per_token = None  # measure again (the next micro-batch is a probe once more)

    def after_out_of_memory(self, learners: list):
        """Out of memory in a mini-batch: drop its gradients and halve the micro-batch (auto), else stop."""
        if self.fixed or (self.last_rows or 1) <= 1:
            raise ValueError(f"out of GPU memory with micro-batches of {self.last_rows} rows: use --micro_batch auto, "
                             "a smaller --micro_batch, --recompute true or --gradient_checkpointing true")
        for learner in learners:
            if learner is not None:
                learner.optimizer.zero_grad(set_to_none=True)
        self.cap = self.last_rows // 2
        torch.cuda.empty_cache()
        print(f"out of GPU memory at {self.last_rows} rows per micro-batch: redoing the mini-batch with {self.cap}")

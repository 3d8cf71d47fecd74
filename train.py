"""
train.py -- GRPO (or PPO) with the entropy-shaped advantage of Cheng et al. (2025), on one device.

    python train.py                                    # the offline CPU demo: SmolLM2-135M on arithmetic
    python train.py --alpha 0 --out_dir runs/plain     # the same run as plain GRPO (one folder holds one run)
    python train.py --algo ppo --out_dir runs/ppo      # PPO with a critic (alpha 0.1), the paper's second set of runs
    python train.py --resume runs/default/checkpoint   # continue a run exactly where it stopped
    python train.py --log tensorboard                  # curves also in TensorBoard: tensorboard --logdir runs

One step of the loop is the whole pipeline, one function call per arrow:

    prompts -> sample (G answers each, with log-probs and entropies) -> grade (reward 1/0)
      -> advantages (GRPO group z-score, or GAE with a critic) -> + min(alpha*H, |A|/kappa)
      -> for each mini-batch: forward, clipped loss, backward, clip grad norm, optimiser step

Our choices, and where we simplify against the paper (its Appendix B):
  1. The entropy term: psi_t = min(alpha * H_t.detach(), |A_t| / kappa) added to every response
     token's advantage, alpha 0.4 (GRPO) / 0.1 (PPO), kappa 2. H_t is the entropy of the *current*
     policy, taken from the training forward at the sampling temperature; no gradient flows through it.
  2. Loss aggregation: token-level mean over all response tokens of the batch (as the paper/DAPO),
     not a per-sequence mean, so long answers are not down-weighted.
  3. Clip-higher: eps_low 0.2, eps_high 0.28, and veRL's guards: dual-clip (a token with A < 0
     costs at most 3|A|), the log-ratio clamped to +-20, and a step whose gradient norm is not finite
     skipped (counted in skipped_steps). No KL penalty and no entropy loss by default (--kl_coef and
     --entropy_coef turn them on, the latter to compare with the paper's Table 3).
  4. GRPO advantages use the Bessel-corrected group std, as veRL and TRL; --scale_std false gives
     Dr. GRPO's mean-centred advantages.
  5. Scale: the paper trains 7B models on 512 prompts x 8 samples, 8K tokens, 16 updates per rollout,
     lr 1e-6. The CPU demo uses a 135M model, 4 prompts x 8 samples, 40 new tokens, one update per
     rollout and lr 1e-5 (a small model at 1e-6 barely moves in a few steps), so it fits 15 minutes.
     With one update per rollout the ratio is exactly 1 and clipping never acts (clip_frac 0): the
     update is REINFORCE with a token-mean loss; --mini_batches > 1 makes the clip matter.
  6. Reward 1 correct / 0 wrong (the paper uses +1/-1: identical after the group z-score).
  7. PPO: the critic is our decoder with a scalar head, started from the policy's weights, its own
     AdamW (lr 2x the actor's), a clipped value loss, GAE with gamma = lambda = 1, and
     `critic_warmup` steps that train only the critic. Simpler than veRL: one value per token from the
     same micro-batches, no separate critic mini-batch schedule, no value-head dropout.
  8. Training runs in float32 weights with bfloat16 autocast where the processor is faster at it
     (CUDA, CPUs with native bf16), float32 otherwise; the choice is printed at start.
"""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from advantage import entropy_shaped_advantages, explained_variance, gae_advantages, group_advantages, masked_mean, policy_loss, shaping_stats, value_loss
from cli import check_context
from evaluate import EvalSettings, check_device, cuda_graph_option, evaluate
from grader import is_correct
from load import load_model, save_pretrained
from model import Critic
from rollout import Rollout, format_prompt, graph_stats, sample, score_responses
from tasks import held_out_split, is_local_task, load_problems

# -----------------------------------------------------------------------------------------------
# Configuration: every field can be set from the command line as --name value


@dataclass
class Config:
    # --- I/O
    out_dir: str = "runs/default"  # metrics.jsonl, plots.png and checkpoint/ go here; one run per folder
    resume: str = ""  # a checkpoint folder to continue from (its saved config is the base)
    overwrite: bool = False  # replace the run already in out_dir (otherwise it is refused, never mixed)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    progress: bool = True  # tqdm bars
    log: str = ""  # also log to "tensorboard" (in out_dir/tensorboard) or "wandb" (offline); "" = metrics.jsonl only
    # --- model
    model: str = "smollm2-135m"  # alias, .gguf file, local folder or hub id (see model.load_model)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: autocast over float32 weights (see choose_precision)
    cuda_graph: str = "auto"  # auto | true | false: replay each decode step as a CUDA graph (auto: on CUDA)
    recompute: str = "auto"  # auto | true | false: recompute RMSNorm, SwiGLU, LM head in backward (auto: when memory needs it)
    gradient_checkpointing: bool = False  # recompute whole blocks in backward: for big models on one GPU
    # --- data
    task: str = "arith"  # arith[:level] | gsm8k | math500 | a local .jsonl/.json/.parquet file
    question_field: str = ""  # the question's field in a local file ("" = question, problem, prompt, ...)
    answer_field: str = ""  # the gold answer's field ("" = answer, final_answer, solution, ...)
    seed: int = 0
    # --- rollout
    prompts_per_step: int = 4  # B prompts per step (the paper: 512)
    group_size: int = 8  # G samples per prompt (the paper: 8)
    max_new_tokens: int = 40  # response budget (the paper: 8K)
    temperature: float = 1.0  # training temperature (the paper: 1.0)
    top_p: float = 1.0
    # --- optimisation
    algo: str = "grpo"  # grpo | ppo
    steps: int = 12
    lr: float = 1e-5  # the paper: 1e-6 for 7B models
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm
    mini_batches: int = 1  # optimiser updates per rollout (the paper: 16). With 1, every update starts
    #                        from the sampling policy, so the ratio is exactly 1 and clipping never acts
    #                        (clip_frac 0): the update is REINFORCE with a token-mean loss
    micro_batch: str = "auto"  # rows per forward/backward (gradients accumulate over a mini-batch);
    #                          auto = the most that fit in memory (GPU) / 8, measured fastest (CPU)
    eps_low: float = 0.2  # PPO clip range below 1
    eps_high: float = 0.28  # ... and above 1 (clip-higher, DAPO)
    kl_coef: float = 0.0  # k3 KL to the starting model; 0 = off, as in the paper
    entropy_coef: float = 0.0  # classic entropy regularisation (gradient through H); 0 = off
    scale_std: bool = True  # GRPO divides by the group std; False = Dr. GRPO
    # --- the entropy term (the paper's one line)
    alpha: float | None = None  # None = the paper's: 0.4 for GRPO, 0.1 for PPO; 0 = plain GRPO/PPO
    kappa: float = 2.0  # cap: psi <= |A| / kappa, so the sign of A never flips
    # --- PPO's critic (used with --algo ppo)
    critic_lr: float | None = None  # None = 2x lr, as the paper
    critic_warmup: int = 2  # steps that train only the critic (the paper: 10)
    value_clip: float = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    # --- evaluation (greedy pass@1 on held-out problems, at the start and at the end)
    eval_task: str = ""  # "" = the test split of --task (a local file: its hash-picked 10%, see load_tasks)
    eval_problems: int = 128  # 0 = skip
    eval_every: int = 0  # also evaluate every this many steps; 0 = only start and end
    eval_batch: int = 64  # prompts per sampling batch in evaluation


DEFAULT_ALPHA = {"grpo": 0.4, "ppo": 0.1}  # the paper's Appendix B


def config_help() -> str:
    """Every option with its default and its comment, grouped as in Config. Read from Config's own
    source, so the comment next to a field is the one place where a knob is explained."""
    import inspect

    lines = ["usage: python train.py [--name value ...]   (--name_with_underscores or --name-with-dashes; -h: this)"]
    for text in (line.strip() for line in inspect.getsource(Config).splitlines()[2:]):
        field = re.match(r"(\w+): [^=]+= (.+?)(?:\s+# (.*))?$", text)
        if text.startswith("# ---"):
            lines.append("\n" + text.lstrip("# -").strip())
        elif text.startswith("#"):  # a comment that goes on from the field above
            lines.append(" " * 36 + text.lstrip("# ").strip())
        elif field:
            name, default, comment = field.groups()
            lines.append(f"  --{name:<20} {default:<10} {comment or ''}".rstrip())
    return "\n".join(lines)


def parse_args(argv) -> dict:
    """['--lr', '1e-6', ...] -> {'lr': 1e-06, ...}, each value checked against the field's type.
    -h or --help prints config_help() and exits."""
    if "-h" in argv or "--help" in argv:
        print(config_help())
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    it = iter(argv)
    for arg in it:
        name = arg[2:].replace("-", "_") if arg.startswith("--") else None
        if name is not None and "=" in name:
            name, value = name.split("=", 1)
        else:
            value = next(it, None)
        if name not in fields:
            raise ValueError(f"unknown option '{arg}'. Valid options: " + " ".join(f"--{n}" for n in fields))
        if value is None:
            raise ValueError(f"option --{name} needs a value")
        kind = type(fields[name].default) if fields[name].default is not None else float  # alpha, critic_lr
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                overrides[name] = value.lower() in ("true", "1")
            else:
                overrides[name] = kind(value)
        except ValueError:
            raise ValueError(f"--{name} expects a {kind.__name__}, got '{value}'") from None
    return overrides


def resolve_defaults(cfg: Config) -> Config:
    """Fill in the defaults that follow the algorithm: alpha 0.4 (GRPO) or 0.1 (PPO), critic_lr 2x lr.
    (The config saved with a checkpoint keeps them unset, so a resumed --lr moves critic_lr too.)"""
    alpha = DEFAULT_ALPHA.get(cfg.algo, 0.4) if cfg.alpha is None else cfg.alpha
    return dataclasses.replace(cfg, alpha=alpha, critic_lr=2 * cfg.lr if cfg.critic_lr is None else cfg.critic_lr)


def check_config(cfg: Config):
    """Refuse settings that would fail later, or silently train something else, with the fix named.
    Takes a resolved Config (resolve_defaults); reads no file and loads nothing, so it is instant."""
    problems = []

    def need(ok, message):
        if not ok:  # (written as "ok", so a NaN, for which every comparison is False, is refused too)
            problems.append(message)

    need(cfg.group_size >= 2, "--group_size must be >= 2: GRPO compares answers within a group (the paper uses 8)")
    need(1 < cfg.kappa < math.inf, "--kappa must be > 1 so the entropy bonus cannot flip an advantage's sign (the paper uses 2)")
    need(0 <= cfg.alpha < math.inf, "--alpha must be >= 0 (0.4 for GRPO, 0.1 for PPO, 0 = off)")
    need(0 < cfg.lr < math.inf and 0 < cfg.critic_lr < math.inf, "--lr and --critic_lr must be positive (the paper: 1e-6 and 2e-6)")
    need(cfg.algo in ("grpo", "ppo"), f"--algo must be grpo or ppo, got '{cfg.algo}'")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"), f"--dtype must be auto, float32, bfloat16 or float16, got '{cfg.dtype}'")
    for name in ("cuda_graph", "recompute"):
        need(getattr(cfg, name) in ("auto", "true", "false"), f"--{name} must be auto, true or false, got '{getattr(cfg, name)}'")
    need(str(cfg.micro_batch) == "auto" or (str(cfg.micro_batch).isdigit() and int(cfg.micro_batch) >= 1),
         f"--micro_batch must be auto or a number of rows >= 1, got '{cfg.micro_batch}'")
    need(cfg.steps >= 0 and cfg.prompts_per_step >= 1 and cfg.max_new_tokens >= 1,
         "--steps must be >= 0; --prompts_per_step and --max_new_tokens >= 1")
    need(cfg.mini_batches >= 1 and cfg.prompts_per_step % cfg.mini_batches == 0,
         f"--mini_batches must divide --prompts_per_step ({cfg.prompts_per_step}): a group stays in one mini-batch")
    need(0 <= cfg.temperature < math.inf, f"--temperature must be >= 0 (the paper trains at 1.0), got {cfg.temperature}")
    need(0 < cfg.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    need(0 <= cfg.weight_decay < math.inf and 0 < cfg.grad_clip < math.inf,
         "--weight_decay must be >= 0 and --grad_clip > 0 (defaults 0 and 1)")
    need(0 <= cfg.eps_low < 1 and 0 <= cfg.eps_high < math.inf, "--eps_low must be in [0, 1) and --eps_high >= 0 (the paper: 0.2, 0.28)")
    need(0 <= cfg.kl_coef < math.inf and 0 <= cfg.entropy_coef < math.inf, "--kl_coef and --entropy_coef must be >= 0 (0 = off)")
    need(0 < cfg.value_clip < math.inf and 0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1 and cfg.critic_warmup >= 0,
         "--value_clip must be > 0, --gamma and --lam in [0, 1], --critic_warmup >= 0")
    need(cfg.save_every >= 0 and cfg.eval_every >= 0 and cfg.eval_problems >= 0 and cfg.eval_batch >= 1,
         "--save_every, --eval_every and --eval_problems must be >= 0 (0 = off), --eval_batch >= 1")
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    check_device(None if cfg.device == "auto" else cfg.device)
    MetricsLogger.check(cfg)
    if cfg.cuda_graph == "true" and pick_device(cfg.device).type != "cuda":
        raise ValueError("--cuda_graph true needs a CUDA device (CUDA graphs do not exist on a CPU): "
                         "leave it at auto (on for CUDA, off elsewhere)")


# -----------------------------------------------------------------------------------------------
# Set-up: device, precision, data


def pick_device(device: str) -> torch.device:
    """--device auto: CUDA when torch sees a GPU, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def choose_precision(device: torch.device, dtype: str):
    """The autocast dtype for --dtype (None = plain float32), by what this processor is fast at.

    GPUs, by compute capability: 8.0 and up (A100, H100, RTX 30xx/40xx) compute in bfloat16.
    7.x (V100, T4: free Colab and many classrooms) has float16 tensor cores but no bfloat16, so
    float16 autocast with a gradient scaler (see Learner): float16 keeps 3 more digits than bfloat16
    but overflows past 65504, which the forward avoids where it matters (norms, softmax and the
    loss run in float32) and the scaler handles for gradients. Below 7.0 (P100, K80) float32:
    without tensor cores float16 buys no speed, only the overflow risk.
    CPUs differ wildly: with native bf16 (AVX512-BF16, AMX) a bf16 matmul is 2-3x faster than
    float32; on an AVX2-only CPU it was 7x *slower*. So on CPU we time one second of matmuls.
    (float16 on a CPU is there to be asked for, --dtype float16, not picked: few CPUs are fast at it.)
    """
    if dtype != "auto":
        return None if dtype == "float32" else getattr(torch, dtype)
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return torch.bfloat16 if major >= 8 else torch.float16 if major >= 7 else None
    a, b = torch.randn(256, 576), torch.randn(576, 1536)

    def rate(x, y):
        x @ y  # warm-up
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.5:
            x @ y
            n += 1
        return n / (time.perf_counter() - t)

    return torch.bfloat16 if rate(a.bfloat16(), b.bfloat16()) > 1.3 * rate(a, b) else None


def autocast(device: torch.device, amp_dtype):
    """A fresh autocast context for amp_dtype (None: plain float32, a no-op)."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()


def batches_of_problems(problems, batch_size: int, seed: int, step: int):
    """The prompts of step `step`: epochs over a seeded shuffle, so a resumed run sees the same order."""
    per_epoch = len(problems) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [problems[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def load_tasks(cfg: Config, problems=None) -> tuple:
    """(training problems, held-out problems), checked before the model loads. A single local file
    has no test split: a fixed share of its rows is held out and never trained on (held_out_split)."""
    if problems is None:
        if is_local_task(cfg.task) and not cfg.eval_task:
            problems = held_out_split(load_problems(cfg.task, **fields_of(cfg)))[0]
        else:
            problems = load_problems(cfg.task, split="train", seed=cfg.seed, **fields_of(cfg))
    held_out = held_out_problems(cfg) if cfg.eval_problems else []
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.task}: {len(problems)} training problems, fewer than one step's --prompts_per_step "
                         f"{cfg.prompts_per_step}: lower it or add problems")
    if cfg.eval_problems and not held_out:
        raise ValueError(f"{cfg.eval_task or cfg.task} gave no held-out problems: pass --eval_task FILE, or --eval_problems 0")
    return problems, held_out


def held_out_problems(cfg: Config) -> list:
    """The first eval_problems of the test split of --eval_task, else of --task; of a single local
    file, of its held-out share. "Held-out" is never the training set. (experiment.py uses it too.)"""
    if is_local_task(cfg.task) and not cfg.eval_task:
        return held_out_split(load_problems(cfg.task, **fields_of(cfg)))[1][: cfg.eval_problems]
    return load_problems(cfg.eval_task or cfg.task, split="test", limit=cfg.eval_problems, seed=cfg.seed, **fields_of(cfg))


def fields_of(cfg: Config) -> dict:
    """The field names of a local task file, where given."""
    return dict(question_field=cfg.question_field or None, answer_field=cfg.answer_field or None)


# -----------------------------------------------------------------------------------------------
# One training step


def compute_advantages(cfg, rollout: Rollout, rewards, values=None):
    """Per-token advantages (N, R) before the entropy term, and PPO's returns (or None)."""
    mask = rollout.response_mask
    if cfg.algo == "grpo":
        adv = group_advantages(rewards, cfg.group_size, scale_std=cfg.scale_std)  # (N,): one per answer
        return adv[:, None] * mask, None  # (N, R): every token of answer i gets A_i
    # PPO: the reward sits on the last response token; GAE spreads it back against the critic's values
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (N,) index of each answer's last token
    token_rewards = torch.zeros_like(mask).scatter(1, last[:, None], rewards[:, None])  # (N, R)
    return gae_advantages(token_rewards, values, mask, cfg.gamma, cfg.lam)


@dataclass
class Learner:
    """A network and what updates it: the actor (the policy), or PPO's critic.

    The scaler acts only under float16 autocast (GPUs below compute capability 8.0; see
    choose_precision): small gradients underflow to 0 in float16, so the loss is multiplied by a
    large factor before backward and the gradients divided by it again before the step; a step whose
    gradients overflowed is skipped and the factor lowered. Under bfloat16 or float32 it does nothing.
    """

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass
class Targets:
    """What the update needs besides the rollout, each (N, R); None where unused."""

    adv: torch.Tensor  # advantages before the entropy term (GRPO's group z-score, or PPO's GAE)
    old_logprobs: torch.Tensor | None = None  # log pi_old with mini_batches > 1 (else the first forward's own)
    ref_logprobs: torch.Tensor | None = None  # the KL reference's, with kl_coef > 0
    old_values: torch.Tensor | None = None  # PPO: the critic's values at rollout time (its loss clips to them)
    returns: torch.Tensor | None = None  # PPO: the critic's targets


def update(cfg, actor: Learner, critic: Learner | None, rollout, t: Targets, plan, amp, train_actor=True) -> dict:
    """Optimiser steps over mini-batches of the rollout; gradients accumulate over micro-batches.
    amp: a function returning a fresh autocast context (see autocast)."""
    N = rollout.response_ids.shape[0]
    stats, skipped = Means(), 0
    per_mb = N // cfg.mini_batches
    for first in range(0, N, per_mb):
        rows = slice(first, first + per_mb)
        while True:
            try:
                stats.merge(accumulate_gradients(cfg, actor if train_actor else None, critic, rollout, t, rows, plan, amp))
                break
            except torch.OutOfMemoryError:
                pass  # handled below, once the exception (and the tensors its traceback holds) is gone
            plan.after_out_of_memory([actor, critic])  # a smaller micro-batch, or a clear error
        if train_actor:
            skipped += clipped_step(actor, cfg.grad_clip, stats, "grad_norm")
        if critic is not None:
            skipped += clipped_step(critic, cfg.grad_clip, stats, "critic_grad_norm")
    return {**stats.means(), "skipped_updates": skipped, "micro_batch": plan.last_rows, "recompute": plan.recompute}


def accumulate_gradients(cfg, actor, critic, rollout, t: Targets, rows: slice, plan, amp) -> "Means":
    """Forward and backward over one mini-batch's rows, a micro-batch at a time. Each loss is divided
    by the mini-batch's token count, so the gradients add up to its token-level mean whatever the split."""
    stats = Means()
    num_tokens = rollout.response_mask[rows].sum()  # the mini-batch's token count
    tokens_per_row = rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]  # P + R
    m = rows.start
    while m < rows.stop:
        mb = slice(m, min(m + plan.rows(tokens_per_row), rows.stop))
        part = rollout_rows(rollout, mb)
        with plan.measure(mb.stop - mb.start, tokens_per_row, rows.stop - rows.start, probe=actor is not None):
            if actor is not None:
                actor_loss_backward(cfg, actor, part, t, mb, num_tokens, amp, stats)
            if critic is not None:
                critic_loss_backward(cfg, critic, part, t, mb, num_tokens, amp, stats)
        m = mb.stop
    return stats


def actor_loss_backward(cfg, actor: Learner, part, t: Targets, mb: slice, num_tokens, amp, stats):
    """The policy's clipped loss on one micro-batch (rows mb of the rollout, `part`), and its backward."""
    mask = part.response_mask
    with amp():
        logp, ent = score_responses(actor.net, part, cfg.temperature)  # (n, R) each, with gradients
    # 1) the paper's line, A_t + min(alpha * H_t.detach(), |A_t| / kappa), H_t of the current policy
    a = t.adv[mb]
    shaped = entropy_shaped_advantages(a, ent, cfg.alpha, cfg.kappa) if cfg.alpha > 0 else a
    # 2) the old log-probs: with a single update per rollout the policy has not moved yet,
    #    so they are this forward's own values (ratio exactly 1, no extra forward)
    old = logp.detach() if t.old_logprobs is None else t.old_logprobs[mb]
    ref = None if t.ref_logprobs is None else t.ref_logprobs[mb]
    # 3) the clipped surrogate, a token-level mean over the mini-batch
    loss, s = policy_loss(logp, old, shaped, mask, cfg.eps_low, cfg.eps_high, ref, cfg.kl_coef,
                          ent, cfg.entropy_coef, num_tokens=num_tokens)
    actor.scaler.scale(loss).backward()
    stats.add(s, mask.sum().item())
    add_shaping_stats(stats, a, ent, mask, cfg)


def critic_loss_backward(cfg, critic: Learner, part, t: Targets, mb: slice, num_tokens, amp, stats):
    """PPO's clipped value loss on one micro-batch, and its backward."""
    mask = part.response_mask
    with amp():
        v = critic.net(part)  # (n, R)
    vloss, s = value_loss(v.float(), t.old_values[mb], t.returns[mb], mask, cfg.value_clip, num_tokens=num_tokens)
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
    by NaN. That step is skipped and its gradients dropped; returns True when it was skipped.
    (Under float16 the scaler's first steps overflow by design while it finds its factor.)"""
    learner.scaler.unscale_(learner.optimizer)  # float16: the gradients back at their true scale
    norm = torch.nn.utils.clip_grad_norm_(learner.net.parameters(), max_norm).item()
    stats.add({name: norm}, 1)
    if math.isfinite(norm):
        learner.scaler.step(learner.optimizer)  # = optimizer.step() unless float16
    learner.scaler.update()  # float16: an overflow lowers the factor for the next step
    learner.optimizer.zero_grad(set_to_none=True)
    return not math.isfinite(norm)


def rollout_rows(r: Rollout, rows: slice) -> Rollout:
    return Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.response_ids[rows], r.response_mask[rows],
                   r.logprobs[rows], r.entropies[rows], r.stopped[rows], r.texts[rows], r.group_size)


@torch.no_grad()
def score_all(fn, rollout: Rollout, rows: int, amp):
    """Run fn (a scorer of a Rollout) over the rollout, `rows` rows at a time, without gradients."""
    outs = []
    for m in range(0, rollout.response_ids.shape[0], rows):
        with amp():
            outs.append(fn(rollout_rows(rollout, slice(m, m + rows))))
    return torch.cat(outs).float()


# -----------------------------------------------------------------------------------------------
# Micro-batches sized by memory

CPU_MICRO_BATCH = 8  # rows. On 2 idle CPU cores (float32, SmolLM2, 32 rows x 110 tokens, 2026-11-28) a
#                     step took 11.7 s in micro-batches of 8, 11.9 of 16, 12.1 of 4, 12.2 of 32: a CPU has no
#                     launch overhead to amortise, so the size barely matters; 8 measured fastest.
#                     Recomputation made it 12.5 s (7% slower), so a CPU never recomputes under auto.
PROBE_ROWS = 8  # rows of the first GPU micro-batch, whose peak memory is measured
MEMORY_SHARE = 0.8  # of the free GPU memory, what one micro-batch's activations may take


class MicroBatchPlan:
    """How many rows go through one forward and backward, and whether backward recomputes RMSNorm,
    SwiGLU and the LM head instead of keeping them: fixed by --micro_batch and --recompute, or sized
    by memory with `auto`.

    Why: a GPU wants the largest micro-batch that fits. On an H200, 128 rows x 128 tokens took 6.52 s
    in micro-batches of 8 rows, 1.09 s in micro-batches of 32 and 0.51 s in one of 128.
    auto on a GPU: the run's first training micro-batch (PROBE_ROWS rows) is also a probe: its peak
    memory per token (P + R tokens a row), against the memory free, gives the most rows that fit in
    MEMORY_SHARE of it. --recompute auto probes without recomputation, the faster way; if a whole
    mini-batch would then not fit in one micro-batch, recomputation goes on and the probe is
    repeated. Should memory run out all the same, the micro-batch is halved and the mini-batch redone.
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
    def measure(self, rows: int, tokens_per_row: int, mini_batch_rows: int, probe: bool):
        """Around one micro-batch's forward and backward: with auto on a GPU, the first is the probe."""
        if not (probe and self.gpu and self.fixed is None and self.bytes_per_token is None):
            yield
            return
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        self.bytes_per_token = (torch.cuda.max_memory_allocated() - base) / (rows * tokens_per_row)
        if self.recompute_auto and not self.recompute and self.rows(tokens_per_row) < mini_batch_rows:
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


# -----------------------------------------------------------------------------------------------
# "Is it learning?": plain-language warnings while it runs, each with its fix


class Watch:
    """Reads each step's record and says what looks wrong. check() returns this step's warnings
    (they go into metrics.jsonl's `warnings`); a warning is printed when it starts, not every step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.no_spread = self.no_reward = 0  # consecutive steps
        self.active = set()  # kinds of warning raised last step

    def check(self, record: dict) -> list:
        cfg, found = self.cfg, {}
        self.no_spread = self.no_spread + 1 if record["zero_spread_groups"] >= 0.9 else 0
        self.no_reward = self.no_reward + 1 if record["reward"] == 0 else 0
        if cfg.temperature == 0:
            found["greedy"] = ("training at --temperature 0: the G answers to a prompt are all the same, so no group has "
                               "a reward spread to learn from; train at --temperature 1.0")
        if self.no_spread >= 3:
            found["no_spread"] = (f"no signal: for {self.no_spread} steps at least 90% of groups had all answers right or "
                                  "all wrong (A = 0 everywhere); use a task of fitting difficulty or a larger --group_size")
        if record["truncated"] > 0.5:
            found["truncated"] = (f"{100 * record['truncated']:.0f}% of the answers were cut off at --max_new_tokens "
                                  f"{cfg.max_new_tokens}: raise --max_new_tokens")
        if record["entropy"] < 0.05:
            found["collapse"] = (f"token entropy {record['entropy']:.3f} nats (below 0.05): the policy has collapsed to "
                                 "near-fixed answers; lower --lr, keep --eps_high above --eps_low, or raise --alpha")
        if self.no_reward >= 5:
            found["no_reward"] = (f"reward 0 for {self.no_reward} steps: no answer is ever right; check the answer format "
                                  "and grader on a few samples, use an easier task (e.g. --task arith:1), or raise --max_new_tokens")
        if record["skipped_updates"]:
            found["skipped"] = (f"{record['skipped_updates']} update(s) skipped: the gradient norm was not finite (inf or "
                                "NaN); lower --lr or look for a broken reward")
        for kind in found.keys() - self.active:
            self.say(found[kind])
        self.active = set(found)
        return list(found.values())

    def say(self, text: str):
        from tqdm import tqdm

        tqdm.write(f"warning: {text}")


# -----------------------------------------------------------------------------------------------
# Logging, plots, checkpoints


def log_metrics(out_dir: str, record: dict):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class MetricsLogger:
    """log(record) writes metrics.jsonl and, with --log, the same numbers to TensorBoard or W&B.

    metrics.jsonl stays the record of truth (plots.png and the tests read it); the others are views.
    A record's numbers go under "<kind>/<name>" (train/reward, eval/accuracy) at x = its step.
    """

    INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}

    @classmethod
    def check(cls, cfg):
        """Called by check_config, before the model loads: a missing package should cost a second."""
        if cfg.log not in ("", *cls.INSTALL):
            raise ValueError(f"--log must be tensorboard or wandb (or empty for metrics.jsonl only), got '{cfg.log}'")
        if cfg.log and importlib.util.find_spec(cfg.log) is None:
            raise ValueError(f"--log {cfg.log} needs the {cfg.log} package: {cls.INSTALL[cfg.log]}")

    def __init__(self, cfg):
        self.out_dir, self.kind = cfg.out_dir, cfg.log
        if cfg.log == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))  # tensorboard --logdir runs
            self.writer.add_text("config", json.dumps(dataclasses.asdict(cfg), indent=1))
        elif cfg.log == "wandb":
            import wandb

            # offline by default (no account, no network; `wandb sync` uploads later); WANDB_MODE=online to stream
            self.writer = wandb.init(project="entropy-rl", dir=cfg.out_dir, config=dataclasses.asdict(cfg),
                                     mode=os.environ.get("WANDB_MODE", "offline"))

    def __call__(self, record: dict):
        log_metrics(self.out_dir, record)
        numbers = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "tensorboard":
            for tag, v in numbers.items():
                self.writer.add_scalar(tag, v, record["step"])
            self.writer.flush()  # a step takes seconds: flushing each one keeps the file whole even if killed
        elif self.kind == "wandb":
            self.writer.log(numbers, step=record["step"])

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()  # an offline run's files are complete only after this


def plot_metrics(out_dir: str):
    """plots.png: reward, entropy, response length and psi/|A| over steps (+ the critic's, for PPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return
    panels = [("reward", "reward (mean)"), ("entropy", "token entropy (nats)"), ("length", "response length (tokens)"),
              ("psi_ratio", "psi / |A|")]
    if "value_loss" in train[-1]:
        panels += [("value_loss", "critic value loss"), ("explained_variance", "critic explained variance")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "plots.png"), dpi=110)
    plt.close(fig)


def save_checkpoint(folder, cfg, step, model, tokenizer, actor: Learner, critic: Learner | None = None, skipped_steps=0):
    """A folder transformers can load (config.json, model.safetensors, tokenizer), plus our state.

    Written into folder + ".tmp" and renamed into place only when complete: a save interrupted
    (a second Ctrl-C, a full disk) leaves the previous checkpoint whole. cfg is saved as given, with
    alpha and critic_lr unset where they were, so a resume re-derives them."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier interrupted save
    save_pretrained(model, tokenizer, tmp)
    state = {"step": step, "optimizer": actor.optimizer.state_dict(), "scaler": actor.scaler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "skipped_steps": skipped_steps}
    if critic is not None:
        state.update(critic=critic.net.state_dict(), critic_optimizer=critic.optimizer.state_dict(),
                     critic_scaler=critic.scaler.state_dict())
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    # a folder cannot be replaced in one rename: move the old one aside, the new one in, then delete
    if os.path.isdir(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


RUN_FILES = ("metrics.jsonl", "checkpoint", "summary.json")  # what marks a folder as holding a run
LOCK = "train.lock"  # holds the PID of the run writing to the folder


def lock_holder(out_dir: str) -> int | None:
    """The PID of another live run holding out_dir's lock, or None (no lock, or a stale one)."""
    try:
        pid = int(open(os.path.join(out_dir, LOCK)).read().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None  # ours: left by an earlier train() in this same process
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None  # its run died without cleaning up: the lock is stale, take it over
    except PermissionError:
        pass  # it exists, under another user
    return pid


def check_out_dir(cfg: Config):
    """One run per folder: refuse a file, a folder another live run writes to, and a folder that holds
    another run, unless we resume that run (--resume OUT/checkpoint) or replace it (--overwrite)."""
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out_dir {out} is a file: name a folder")
    pid = lock_holder(out)
    if pid is not None:
        raise ValueError(f"another run (PID {pid}) is writing to {out}: wait for it to end, or pass another --out_dir")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    resuming_here = cfg.resume and os.path.realpath(os.path.dirname(os.path.normpath(cfg.resume))) == os.path.realpath(out)
    if found and not (resuming_here or cfg.overwrite):
        raise ValueError(f"{out} holds another run ({', '.join(found)}): continue it with --resume "
                         f"{os.path.join(out, 'checkpoint')}, replace it with --overwrite true, or pass another --out_dir")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out_dir {out}: {parent} is {'a file' if not os.path.isdir(parent) else 'not writable'}; "
                         "pass another --out_dir")


def claim_out_dir(cfg: Config):
    """Create out_dir, take its lock and, with --overwrite, clear the run that was there."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite:
        for name in RUN_FILES + ("plots.png", "checkpoint.tmp", "checkpoint.old"):
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    with open(os.path.join(cfg.out_dir, LOCK), "w") as f:
        f.write(str(os.getpid()))


def release_out_dir(cfg: Config):
    try:
        os.remove(os.path.join(cfg.out_dir, LOCK))
    except OSError:
        pass


def check_resume(cfg: Config):
    """A checkpoint folder train.py wrote, of the same model and algorithm: those two cannot change
    mid-run (the weights and the optimiser state belong to them). Every other flag given now applies."""
    if not cfg.resume:
        return
    old = os.path.normpath(cfg.resume) + ".old"
    if not os.path.exists(cfg.resume) and os.path.isfile(os.path.join(old, "trainer_state.pt")):
        # save_checkpoint moves the previous checkpoint aside before moving the new one in: a crash
        # between the two renames leaves the previous one whole, under this name
        raise ValueError(f"--resume {cfg.resume}: its last save was cut short; the checkpoint before it is whole in "
                         f"{old}: pass --resume {old}")
    for name in ("train_config.json", "trainer_state.pt", "model.safetensors"):
        if not os.path.isfile(os.path.join(cfg.resume, name)):
            raise ValueError(f"--resume {cfg.resume}: no {name} there; pass a checkpoint folder train.py wrote, "
                             "e.g. runs/default/checkpoint")
    saved = json.load(open(os.path.join(cfg.resume, "train_config.json")))
    for key in ("model", "algo"):
        if saved.get(key) != getattr(cfg, key):
            raise ValueError(f"--resume {cfg.resume} continues a run of --{key} {saved.get(key)}; it cannot switch to "
                             f"--{key} {getattr(cfg, key)}: start a new run (no --resume) for that")


def keep_metrics_up_to(out_dir: str, step: int):
    """On resume into the run's own folder: drop rows logged after the checkpoint (steps that ran
    on after the last save and are about to run again), so no step appears twice."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(path):
        rows = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def restore(cfg: Config, actor: Learner, critic: Learner | None = None) -> tuple:
    """Load a checkpoint's optimiser, RNG and critic state -> (step, skipped_steps). The flags given
    now win: the learning rates and weight decay are set on the restored optimisers."""
    state = torch.load(os.path.join(cfg.resume, "trainer_state.pt"), weights_only=False)
    actor.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # float16 runs only: the gradient scaler's current factor
        actor.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if critic is not None:
        critic.net.load_state_dict(state["critic"])
        critic.optimizer.load_state_dict(state["critic_optimizer"])
        if state.get("critic_scaler"):
            critic.scaler.load_state_dict(state["critic_scaler"])
    for learner, lr in ((actor, cfg.lr), (critic, cfg.critic_lr)):
        for group in learner.optimizer.param_groups if learner is not None else []:
            group.update(lr=lr, weight_decay=cfg.weight_decay)
    if os.path.realpath(os.path.dirname(os.path.normpath(cfg.resume))) == os.path.realpath(cfg.out_dir):
        keep_metrics_up_to(cfg.out_dir, state["step"])
    print(f"resumed from {cfg.resume} at step {state['step']}")
    return state["step"], state.get("skipped_steps", 0)


# -----------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, reward_fn=None, model=None, tokenizer=None, problems=None):
    """Run cfg.steps steps; returns a summary dict. reward_fn(text, problem) -> float defaults to
    is_correct against the problem's gold answer. model/tokenizer/problems can be passed in (tests)."""
    # 0) every check that needs no model, before anything slow: a bad value costs a second
    given, cfg = cfg, resolve_defaults(cfg)
    check_config(cfg)
    check_out_dir(cfg)
    check_resume(cfg)
    problems, held_out = load_tasks(cfg, problems)
    claim_out_dir(cfg)
    reward_fn = reward_fn or (lambda text, p: float(is_correct(text, p.answer)))
    log = MetricsLogger(cfg)  # metrics.jsonl, and --log's TensorBoard or W&B
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = choose_precision(device, cfg.dtype)
    amp = lambda: autocast(device, amp_dtype)  # noqa: E731  a fresh autocast context (a no-op in float32)
    cuda_graph = cuda_graph_option(cfg.cuda_graph, cfg.device)  # None: sample() decides (on for CUDA)
    print(f"device {device}, precision: {str(amp_dtype)[6:] + ' autocast' if amp_dtype else 'float32'}"
          f"{' (measured faster here)' if cfg.dtype == 'auto' and device.type == 'cpu' and amp_dtype else ''}"
          f"{', gradient scaler' if amp_dtype == torch.float16 else ''}")
    print("config:", json.dumps(dataclasses.asdict(cfg)))  # alpha and critic_lr as resolved

    # 1) model (weights stay float32: Adam's small updates vanish in bfloat16), data, optimiser
    if model is None:
        model, tokenizer = load_model(cfg.resume or cfg.model, device=device, dtype=torch.float32)
    check_context(model, tokenizer, problems + held_out, cfg.max_new_tokens, "--max_new_tokens")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = lambda: torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # noqa: E731
    actor, critic = Learner(model, optimizer, scaler()), None
    if cfg.algo == "ppo":
        critic_net = Critic.from_policy(model).to(device)  # started from the policy's weights, as veRL does
        critic_opt = torch.optim.AdamW(critic_net.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
        critic = Learner(critic_net, critic_opt, scaler())
    plan = MicroBatchPlan(cfg, device, [actor] + ([critic] if critic else []))
    ref_model = None
    if cfg.kl_coef > 0:  # the KL reference is the starting model, for a resumed run too (never the checkpoint)
        ref_model = load_model(cfg.model, device=device, dtype=torch.float32)[0] if cfg.resume else copy.deepcopy(model)
        ref_model.eval().requires_grad_(False)
    start, skipped_steps = restore(cfg, actor, critic) if cfg.resume else (0, 0)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoint")
    save = lambda step: save_checkpoint(ckpt_dir, given, step, model, tokenizer, actor, critic, skipped_steps)  # noqa: E731

    def run_eval(step):
        model.eval()
        with amp():
            greedy = EvalSettings(n=1, ks=[1], temperature=0, max_new_tokens=cfg.max_new_tokens,
                                  batch_prompts=cfg.eval_batch, cuda_graph=cuda_graph, progress=cfg.progress)
            res = evaluate(model, tokenizer, held_out, greedy)
        log({"kind": "eval", "step": step, "accuracy": res["accuracy"], "accuracy_se": res["accuracy_se"],
             "num_problems": len(held_out), "mean_length": res["mean_length"]})
        print(f"step {step}: held-out greedy pass@1 {res['accuracy']:.3f} +- {res['accuracy_se']:.3f} on {len(held_out)} problems")
        return res

    t0 = time.time()
    watch = Watch(cfg)
    first = run_eval(start) if held_out and start == 0 else None
    from tqdm import tqdm

    bar = tqdm(range(start, cfg.steps), desc="train", disable=not cfg.progress, initial=start, total=cfg.steps)
    step = start
    try:
        for step in bar:
            t_step = time.time()
            # 2) rollout: G answers per prompt, sampled without gradients
            batch = batches_of_problems(problems, cfg.prompts_per_step, cfg.seed, step)
            model.eval()
            with amp():
                rollout = sample(model, tokenizer, [format_prompt(tokenizer, p.question) for p in batch],
                                 group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step, cuda_graph=cuda_graph)
            t_rollout = time.time() - t_step
            # 3) reward: grade every answer against its problem's gold answer
            rewards = torch.tensor([reward_fn(text, batch[i // cfg.group_size]) for i, text in enumerate(rollout.texts)],
                                   dtype=torch.float32, device=device)  # (N,)
            # 4) advantages (before the entropy term, which needs the training forward's H_t)
            model.train()
            if critic is not None:
                critic.net.train()  # train mode: gradient checkpointing (and any dropout) applies to it too
            t = Targets(adv=None)
            rows = plan.rows(rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1])  # no gradients: a training micro-batch is plenty
            if cfg.mini_batches > 1:  # later mini-batches need log-probs from before the first update
                t.old_logprobs = score_all(lambda r: score_responses(model, r, cfg.temperature)[0], rollout, rows, amp)
            if ref_model is not None:
                t.ref_logprobs = score_all(lambda r: score_responses(ref_model, r, cfg.temperature)[0], rollout, rows, amp)
            if critic is not None:
                t.old_values = score_all(critic.net, rollout, rows, amp)  # (N, R)
            t.adv, t.returns = compute_advantages(cfg, rollout, rewards, t.old_values)
            # 5) update: the actor (after the critic's warm-up, for PPO) and the critic
            stats = update(cfg, actor, critic, rollout, t, plan, amp, train_actor=cfg.algo == "grpo" or step >= cfg.critic_warmup)
            # 6) log, and say in plain words what looks wrong
            skipped_steps += stats["skipped_updates"]
            mask = rollout.response_mask
            groups = rewards.view(-1, cfg.group_size)
            record = {"kind": "train", "step": step + 1, "reward": rewards.mean().item(),
                      "zero_spread_groups": (groups.std(-1) == 0).float().mean().item(),
                      "entropy": masked_mean(rollout.entropies, mask).item(), "length": mask.sum(-1).mean().item(),
                      "truncated": 1 - rollout.stopped.float().mean().item(), "lr": cfg.lr, **stats,
                      "skipped_steps": skipped_steps, "rollout_s": t_rollout, "step_s": time.time() - t_step}
            if critic is not None:
                record["explained_variance"] = explained_variance(t.old_values, t.returns, mask)
            if device.type == "cuda":  # the number to watch when sizing a run for your GPU
                record["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                record.update(graph_stats(model))  # decode graphs recorded so far, and the seconds that took
            record["warnings"] = watch.check(record)
            log(record)
            postfix = dict(reward=f"{record['reward']:.2f}", H=f"{record['entropy']:.2f}", len=f"{record['length']:.0f}",
                           s=f"{record['step_s']:.0f}")
            if record.get("clip_frac"):  # 0 with one mini-batch (the ratio is 1): shown only when clipping acts
                postfix["clip"] = f"{record['clip_frac']:.3f}"
            bar.set_postfix(postfix)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save(step + 1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and held_out:
                run_eval(step + 1)
        step = cfg.steps
    except KeyboardInterrupt:
        print(f"\ninterrupted: saving a checkpoint at step {step} to {ckpt_dir}")
        save(step)
        plot_metrics(cfg.out_dir)
        log.close()
        release_out_dir(cfg)
        raise SystemExit(130)
    save(cfg.steps)
    plot_metrics(cfg.out_dir)
    summary = {"steps": cfg.steps, "minutes": (time.time() - t0) / 60, "checkpoint": ckpt_dir}
    if held_out:
        last = run_eval(cfg.steps)
        summary.update(final_accuracy=last["accuracy"], final_se=last["accuracy_se"])
        if first is not None:
            # two independent proportions: the standard error of their difference
            se = math.sqrt(first["accuracy_se"] ** 2 + last["accuracy_se"] ** 2)
            summary.update(start_accuracy=first["accuracy"], start_se=first["accuracy_se"], diff_se=se)
            print(f"held-out pass@1 {first['accuracy']:.3f} -> {last['accuracy']:.3f} "
                  f"(difference {last['accuracy'] - first['accuracy']:+.3f}, {((last['accuracy'] - first['accuracy']) / se if se else 0):.1f} standard errors)")
    log.close()
    print(f"done in {summary['minutes']:.1f} min; checkpoint in {ckpt_dir}, metrics and plots.png in {cfg.out_dir}")
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    release_out_dir(cfg)
    return summary


def main(argv=None):
    """The command line: one line naming the fix and exit code 2 for any bad input, no traceback."""
    try:
        overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = Config()
        if overrides.get("resume"):  # a resumed run starts from its own saved config; flags given now win
            path = os.path.join(overrides["resume"], "train_config.json")
            if not os.path.isfile(path):
                check_resume(Config(resume=overrides["resume"]))  # says what is missing, or where the whole checkpoint is
            names = {f.name for f in dataclasses.fields(Config)}
            cfg = Config(**{k: v for k, v in json.load(open(path)).items() if k in names})
        cfg = dataclasses.replace(cfg, **overrides)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill saves a checkpoint too, like Ctrl-C
        return train(cfg)
    except ValueError as e:  # our own clear messages (bad option, task, model, folder, ...)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

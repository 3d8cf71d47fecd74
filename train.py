"""
train.py -- GRPO (or PPO) with the entropy-shaped advantage of Cheng et al. (2025), on one device.

    python train.py                                    # the offline CPU demo: SmolLM2-135M on arithmetic
    python train.py --alpha 0                          # the same run as plain GRPO
    python train.py --algo ppo --alpha 0.1             # PPO with a critic, as in the paper's second set of runs
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
  3. Clip-higher: eps_low 0.2, eps_high 0.28. No KL penalty and no entropy loss by default
     (--kl_coef and --entropy_coef turn them on, the latter to compare with the paper's Table 3).
  4. GRPO advantages use the Bessel-corrected group std, as veRL and TRL; --scale_std false gives
     Dr. GRPO's mean-centred advantages.
  5. Scale: the paper trains 7B models on 512 prompts x 8 samples, 8K tokens, 16 updates per rollout,
     lr 1e-6. The CPU demo uses a 135M model, 4 prompts x 8 samples, 40 new tokens, one update per
     rollout and lr 1e-5 (a small model at 1e-6 barely moves in a few steps), so it fits 15 minutes.
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
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from advantage import entropy_shaped_advantages, explained_variance, gae_advantages, group_advantages, masked_mean, policy_loss, shaping_stats, value_loss
from evaluate import evaluate, is_correct, load_problems
from model import Critic, load_model, save_pretrained
from rollout import Rollout, format_prompt, sample, score_responses

# -----------------------------------------------------------------------------------------------
# Configuration: every field can be set from the command line as --name value


@dataclass
class Config:
    # --- I/O
    out_dir: str = "runs/default"  # metrics.jsonl, plots.png and checkpoint/ go here
    resume: str = ""  # a checkpoint folder to continue from (its saved config is the base)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    progress: bool = True  # tqdm bars
    log: str = ""  # also log to "tensorboard" (in out_dir/tensorboard) or "wandb" (offline); "" = metrics.jsonl only
    # --- model
    model: str = "smollm2-135m"  # alias, .gguf file, local folder or hub id (see model.load_model)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast over float32 weights)
    gradient_checkpointing: bool = False  # recompute activations in backward: for big models on one GPU
    # --- data
    task: str = "arith"  # arith[:level] | gsm8k | math500 | a local .jsonl/.json/.parquet file
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
    mini_batches: int = 1  # optimiser updates per rollout (the paper: 16)
    micro_batch: int = 8  # rows per forward/backward; gradients accumulate over a mini-batch
    eps_low: float = 0.2  # PPO clip range below 1
    eps_high: float = 0.28  # ... and above 1 (clip-higher, DAPO)
    kl_coef: float = 0.0  # k3 KL to the starting model; 0 = off, as in the paper
    entropy_coef: float = 0.0  # classic entropy regularisation (gradient through H); 0 = off
    scale_std: bool = True  # GRPO divides by the group std; False = Dr. GRPO
    # --- the entropy term (the paper's one line)
    alpha: float = 0.4  # 0.4 for GRPO, 0.1 for PPO; 0 = plain GRPO/PPO
    kappa: float = 2.0  # cap: psi <= |A| / kappa, so the sign of A never flips
    # --- PPO's critic (used with --algo ppo)
    critic_lr: float = 2e-5  # the paper: 2x the actor's lr
    critic_warmup: int = 2  # steps that train only the critic (the paper: 10)
    value_clip: float = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    # --- evaluation (greedy pass@1 on held-out problems, at the start and at the end)
    eval_task: str = ""  # "" = the test split of --task; or another task, e.g. math500 after training on MATH
    eval_problems: int = 128  # 0 = skip
    eval_every: int = 0  # also evaluate every this many steps; 0 = only start and end
    eval_batch: int = 64  # prompts per sampling batch in evaluation


def parse_args(argv) -> dict:
    """['--lr', '1e-6', ...] -> {'lr': 1e-06, ...}, each value checked against the field's type."""
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
            raise SystemExit(f"unknown option '{arg}'. Valid options: " + " ".join(f"--{n}" for n in fields))
        if value is None:
            raise SystemExit(f"option --{name} needs a value")
        kind = type(fields[name].default)
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                overrides[name] = value.lower() in ("true", "1")
            else:
                overrides[name] = kind(value)
        except ValueError:
            raise SystemExit(f"--{name} expects a {kind.__name__}, got '{value}'") from None
    return overrides


def check_config(cfg: Config):
    """Refuse settings that would fail later, or silently train something else, with the fix named."""
    problems = []
    if cfg.group_size < 2:
        problems.append("--group_size must be >= 2: GRPO compares answers within a group (the paper uses 8)")
    if cfg.kappa <= 1:
        problems.append("--kappa must be > 1 so the entropy bonus cannot flip an advantage's sign (the paper uses 2)")
    if cfg.alpha < 0:
        problems.append("--alpha must be >= 0 (0.4 for GRPO, 0.1 for PPO, 0 = off)")
    if cfg.lr <= 0 or cfg.critic_lr <= 0:
        problems.append("--lr and --critic_lr must be positive (the paper: 1e-6 and 2e-6)")
    if cfg.algo not in ("grpo", "ppo"):
        problems.append(f"--algo must be grpo or ppo, got '{cfg.algo}'")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"--dtype must be auto, float32 or bfloat16, got '{cfg.dtype}'")
    if cfg.steps < 0 or cfg.prompts_per_step < 1 or cfg.max_new_tokens < 1 or cfg.micro_batch < 1:
        problems.append("--steps must be >= 0; --prompts_per_step, --max_new_tokens and --micro_batch >= 1")
    if cfg.mini_batches < 1 or cfg.prompts_per_step % cfg.mini_batches:
        problems.append(f"--mini_batches must divide --prompts_per_step ({cfg.prompts_per_step}): a group stays in one mini-batch")
    if problems:
        raise SystemExit("config error: " + "; ".join(problems))


# -----------------------------------------------------------------------------------------------
# Set-up: device, precision, data


def choose_precision(device: torch.device, dtype: str):
    """bfloat16 autocast or float32, by what this processor is fast at.

    CPUs differ wildly: with native bf16 (AVX512-BF16, AMX) a bf16 matmul is 2-3x faster than
    float32; on an AVX2-only CPU it was 7x *slower*. So on CPU we time one second of matmuls.
    """
    if dtype != "auto":
        return dtype == "bfloat16"
    if device.type == "cuda":
        return True
    a, b = torch.randn(256, 576), torch.randn(576, 1536)

    def rate(x, y):
        x @ y  # warm-up
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.5:
            x @ y
            n += 1
        return n / (time.perf_counter() - t)

    return rate(a.bfloat16(), b.bfloat16()) > 1.3 * rate(a, b)


def batches_of_problems(problems, batch_size: int, seed: int, step: int):
    """The prompts of step `step`: epochs over a seeded shuffle, so a resumed run sees the same order."""
    per_epoch = len(problems) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [problems[j] for j in order[i * batch_size : (i + 1) * batch_size]]


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


def update(cfg, model, optimizer, rollout, adv, old_logprobs, ref_logprobs, autocast, critic=None, critic_opt=None, returns=None, old_values=None, train_actor=True):
    """Optimiser steps over mini-batches of the rollout; gradients accumulate over micro-batches."""
    N = rollout.response_ids.shape[0]
    stats = {}
    per_mb = N // cfg.mini_batches
    for first in range(0, N, per_mb):
        rows = range(first, first + per_mb)
        num_tokens = rollout.response_mask[rows.start : rows.stop].sum()  # the mini-batch's token count
        if train_actor:
            optimizer.zero_grad(set_to_none=True)
        if critic is not None:
            critic_opt.zero_grad(set_to_none=True)
        for m in range(rows.start, rows.stop, cfg.micro_batch):
            mb = slice(m, min(m + cfg.micro_batch, rows.stop))
            part = rollout_rows(rollout, mb)
            mask = part.response_mask
            if train_actor:
                with autocast():
                    logp, ent = score_responses(model, part, cfg.temperature)  # (n, R) each, with gradients
                # 1) the paper's term, with H_t of the current policy (detached inside)
                a = adv[mb]
                shaped = entropy_shaped_advantages(a, ent, cfg.alpha, cfg.kappa) if cfg.alpha > 0 else a
                # 2) the old log-probs: with a single update per rollout the policy has not moved yet,
                #    so they are this forward's own values (ratio exactly 1, no extra forward)
                old = logp.detach() if old_logprobs is None else old_logprobs[mb]
                ref = None if ref_logprobs is None else ref_logprobs[mb]
                loss, s = policy_loss(logp, old, shaped, mask, cfg.eps_low, cfg.eps_high, ref, cfg.kl_coef,
                                      ent, cfg.entropy_coef, num_tokens=num_tokens)
                loss.backward()
                s.update(shaping_stats(a, ent, mask, cfg.alpha, cfg.kappa))
                accumulate(stats, s, mask.sum().item())
            if critic is not None:
                with autocast():
                    v = critic(part)  # (n, R)
                vloss, s = value_loss(v.float(), old_values[mb], returns[mb], mask, cfg.value_clip, num_tokens=num_tokens)
                vloss.backward()
                s["value_loss"] = vloss.item() * num_tokens.item() / max(mask.sum().item(), 1)
                accumulate(stats, s, mask.sum().item())
        if train_actor:
            stats.setdefault("grad_norm", []).append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
            optimizer.step()
        if critic is not None:
            torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
            critic_opt.step()
    return {k: (sum(v) / len(v) if k == "grad_norm" else v[0] / max(v[1], 1)) for k, v in stats.items()}


def accumulate(stats, s, weight):
    """Token-weighted running sums: a micro-batch's mean counts as much as it has tokens."""
    for k, v in s.items():
        total = stats.setdefault(k, [0.0, 0.0])
        total[0] += float(v) * weight
        total[1] += weight


def rollout_rows(r: Rollout, rows: slice) -> Rollout:
    return Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.response_ids[rows], r.response_mask[rows],
                   r.logprobs[rows], r.entropies[rows], r.stopped[rows], r.texts[rows], r.group_size)


@torch.no_grad()
def score_all(fn, rollout: Rollout, micro_batch: int, autocast):
    """Run fn (a scorer of a Rollout) over the rollout in micro-batches without gradients."""
    outs = []
    for m in range(0, rollout.response_ids.shape[0], micro_batch):
        with autocast():
            outs.append(fn(rollout_rows(rollout, slice(m, m + micro_batch))))
    return torch.cat(outs).float()


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

    def __init__(self, cfg):
        # Checked here, before the model loads: a missing package should cost a second, not a model load.
        if cfg.log not in ("", *self.INSTALL):
            raise ValueError(f"--log must be tensorboard or wandb (or empty for metrics.jsonl only), got '{cfg.log}'")
        if cfg.log and importlib.util.find_spec(cfg.log) is None:
            raise ValueError(f"--log {cfg.log} needs the {cfg.log} package: {self.INSTALL[cfg.log]}")
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


def save_checkpoint(folder, cfg, step, model, tokenizer, optimizer, critic=None, critic_opt=None):
    """A folder transformers can load (config.json, model.safetensors, tokenizer), plus our state."""
    save_pretrained(model, tokenizer, folder)
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    if critic is not None:
        state.update(critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict())
    torch.save(state, os.path.join(folder, "trainer_state.pt"))
    with open(os.path.join(folder, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


# -----------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, reward_fn=None, model=None, tokenizer=None, problems=None):
    """Run cfg.steps steps; returns a summary dict. reward_fn(text, problem) -> float defaults to
    is_correct against the problem's gold answer. model/tokenizer/problems can be passed in (tests)."""
    check_config(cfg)
    reward_fn = reward_fn or (lambda text, p: float(is_correct(text, p.answer)))
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = MetricsLogger(cfg)  # metrics.jsonl, and --log's TensorBoard or W&B (its package checked now)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    use_bf16 = choose_precision(device, cfg.dtype)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()  # noqa: E731
    print(f"device {device}, precision: {'bfloat16 autocast' if use_bf16 else 'float32'}"
          f"{' (measured faster here)' if cfg.dtype == 'auto' and device.type == 'cpu' and use_bf16 else ''}")
    print("config:", json.dumps(dataclasses.asdict(cfg)))

    # 1) model (weights stay float32: Adam's small updates vanish in bfloat16), data, optimiser
    if model is None:
        model, tokenizer = load_model(cfg.resume or cfg.model, device=device, dtype=torch.float32)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    critic = critic_opt = None
    if cfg.algo == "ppo":
        critic = Critic.from_policy(model).to(device)  # started from the policy's weights, as veRL does
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    if problems is None:
        problems = load_problems(cfg.task, split="train", seed=cfg.seed)
    held_out = load_problems(cfg.eval_task or cfg.task, split="test", limit=cfg.eval_problems, seed=cfg.seed) if cfg.eval_problems else []
    start = 0
    if cfg.resume:
        state = torch.load(os.path.join(cfg.resume, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_opt.load_state_dict(state["critic_optimizer"])
        start = state["step"]
        print(f"resumed from {cfg.resume} at step {start}")
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoint")
    save = lambda step: save_checkpoint(ckpt_dir, cfg, step, model, tokenizer, optimizer, critic, critic_opt)  # noqa: E731

    def run_eval(step):
        model.eval()
        with autocast():
            res = evaluate(model, tokenizer, held_out, n=1, ks=[1], temperature=0, max_new_tokens=cfg.max_new_tokens,
                           batch_prompts=cfg.eval_batch, progress=cfg.progress)
        log({"kind": "eval", "step": step, "accuracy": res["accuracy"], "accuracy_se": res["accuracy_se"],
             "num_problems": len(held_out), "mean_length": res["mean_length"]})
        print(f"step {step}: held-out greedy pass@1 {res['accuracy']:.3f} +- {res['accuracy_se']:.3f} on {len(held_out)} problems")
        return res

    t0 = time.time()
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
            with autocast():
                rollout = sample(model, tokenizer, [format_prompt(tokenizer, p.question) for p in batch],
                                 group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step)
            t_rollout = time.time() - t_step
            # 3) reward: grade every answer against its problem's gold answer
            rewards = torch.tensor([reward_fn(text, batch[i // cfg.group_size]) for i, text in enumerate(rollout.texts)],
                                   dtype=torch.float32, device=device)  # (N,)
            # 4) advantages (before the entropy term, which needs the training forward's H_t)
            model.train()
            old_logprobs = ref_logprobs = old_values = None
            if cfg.mini_batches > 1:  # later mini-batches need log-probs from before the first update
                old_logprobs = score_all(lambda r: score_responses(model, r, cfg.temperature)[0], rollout, cfg.micro_batch, autocast)
            if ref_model is not None:
                ref_logprobs = score_all(lambda r: score_responses(ref_model, r, cfg.temperature)[0], rollout, cfg.micro_batch, autocast)
            if critic is not None:
                old_values = score_all(critic, rollout, cfg.micro_batch, autocast)  # (N, R)
            adv, returns = compute_advantages(cfg, rollout, rewards, old_values)
            # 5) update: the actor (after the critic's warm-up, for PPO) and the critic
            stats = update(cfg, model, optimizer, rollout, adv, old_logprobs, ref_logprobs, autocast, critic, critic_opt,
                           returns, old_values, train_actor=cfg.algo == "grpo" or step >= cfg.critic_warmup)
            # 6) log
            mask = rollout.response_mask
            groups = rewards.view(-1, cfg.group_size)
            record = {"kind": "train", "step": step + 1, "reward": rewards.mean().item(),
                      "zero_spread_groups": (groups.std(-1) == 0).float().mean().item(),
                      "entropy": masked_mean(rollout.entropies, mask).item(), "length": mask.sum(-1).mean().item(),
                      "truncated": 1 - rollout.stopped.float().mean().item(), "lr": cfg.lr, **stats,
                      "rollout_s": t_rollout, "step_s": time.time() - t_step}
            if critic is not None:
                record["explained_variance"] = explained_variance(old_values, returns, mask)
            if device.type == "cuda":  # the number to watch when sizing a run for your GPU
                record["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            log(record)
            bar.set_postfix(reward=f"{record['reward']:.2f}", H=f"{record['entropy']:.2f}", len=f"{record['length']:.0f}",
                            s=f"{record['step_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save(step + 1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and held_out:
                run_eval(step + 1)
        step = cfg.steps
    except KeyboardInterrupt:
        print(f"\ninterrupted: saving a checkpoint at step {step} to {ckpt_dir}")
        save(step)
        plot_metrics(cfg.out_dir)
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
    return summary


def main(argv=None):
    overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = Config()
    if overrides.get("resume"):  # a resumed run starts from its own saved config; flags given now win
        path = os.path.join(overrides["resume"], "train_config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--resume {overrides['resume']}: no train_config.json there; pass a checkpoint folder train.py wrote")
        cfg = Config(**json.load(open(path)))
    cfg = dataclasses.replace(cfg, **overrides)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill saves a checkpoint too, like Ctrl-C
    try:
        return train(cfg)
    except ValueError as e:  # our own clear messages (bad task, bad model, ...), without a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

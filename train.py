"""
train.py -- GRPO (or PPO) with the entropy-shaped advantage of Cheng et al. (2025), on one device.

    python train.py                                    # the offline CPU demo: SmolLM2-135M on arithmetic
    python train.py --alpha 0 --out_dir runs/plain     # the same run as plain GRPO (one folder holds one run)
    python train.py --algo ppo --out_dir runs/ppo      # PPO with a critic (alpha 0.1), the paper's second set of runs
    python train.py --resume runs/default/checkpoint   # continue a run exactly where it stopped
    python train.py --log tensorboard                  # curves also in TensorBoard: tensorboard --logdir runs
    python train.py --preset qwen05-gsm8k              # a GPU recipe from config/; --help lists every option and preset

One step of the loop is the whole pipeline, one function call per arrow (train() below):

    prompts -> sample (G answers each, with log-probs and entropies) -> grade (reward 1/0)
      -> advantages (GRPO group z-score, or GAE with a critic) -> + min(alpha*H, |A|/kappa)
      -> for each mini-batch: forward, clipped loss, backward, clip grad norm, optimiser step

This file holds the configuration, the loop and its update(), where the paper's line meets the
model. The boxes live in their own files: rollout.py samples, grader.py grades, advantage.py holds
the maths (the paper's line, the clipped loss), update.py the learners and the optimiser step;
tasks.py gives the problems, evaluate.py the held-out Pass@K; plumbing/ is the bookkeeping.

Our choices, and where we simplify against the paper (its Appendix B):
  1. The entropy term: psi_t = min(alpha * H_t.detach(), |A_t| / kappa) added to every response
     token's advantage, alpha 0.4 (GRPO) / 0.1 (PPO), kappa 2. H_t is the entropy of the *current*
     policy, taken from the training forward at the sampling temperature; no gradient flows through it.
  2. Loss aggregation: token-level mean over all response tokens of the batch (as the paper/DAPO),
     not a per-sequence mean, so long answers are not down-weighted.
  3. Clip-higher: eps_low 0.2, eps_high 0.28, and veRL's guards: dual-clip (a token with A < 0
     costs at most 3|A|), the log-ratio clamped to +-20, and an optimiser update whose gradient
     norm is not finite skipped (counted in skipped_updates). No KL penalty and no entropy loss by
     default (--kl_coef and --entropy_coef turn them on, the latter to compare with the paper's
     Table 3).
  4. GRPO advantages use the Bessel-corrected group std, as veRL and TRL; --scale_std false gives
     Dr. GRPO's mean-centred advantages.
  5. Scale: the paper trains 7B models on 512 prompts x 8 samples, 8K tokens, 16 updates per rollout,
     lr 1e-6. The CPU demo uses a 135M model, 4 prompts x 8 samples, 40 new tokens, one update per
     rollout and lr 1e-5 (a small model at 1e-6 barely moves in a few steps), so it fits 15 minutes.
     With one update per rollout the ratio is exactly 1 and clipping never acts (clip_frac 0): the
     update is REINFORCE with a token-mean loss; --mini_batches > 1 makes the clip matter.
  6. Reward 1 correct / 0 wrong (the paper uses +1/-1: identical after the group z-score); a
     cut-off answer (at max_new_tokens) is wrong: it never gave its final answer (grader.py: why).
  7. PPO: the critic is our decoder with a scalar head, started from the policy's weights, its own
     AdamW (lr 2x the actor's), a clipped value loss, GAE with gamma = lambda = 1, and
     `critic_warmup` steps that train only the critic. Simpler than veRL: one value per token from the
     same micro-batches, no separate critic mini-batch schedule, no value-head dropout.
  8. Training runs in float32 weights with bfloat16 autocast where the processor is faster at it
     (CUDA, CPUs with native bf16 matmuls: AVX512-BF16 or AMX), float32 otherwise, decided by what
     the processor is, never by a timing; the choice is printed at start and kept in summary.json.
"""

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from advantage import (entropy_shaped_advantages, explained_variance, gae_advantages,
                       group_advantages, masked_mean, policy_loss, zero_spread)
from evaluate import EvalSettings, cuda_graph_option, evaluate
from grader import grade_response
from fast.decode import graph_stats
from plumbing.checkpoints import check_resume, restore, save_checkpoint
from plumbing.command_line import check_config, check_context, parse_args
from plumbing.load import find_model, load_model
from plumbing.metrics import MetricsLogger, Watch, plot_metrics, summarise
from plumbing.precision import choose_precision
from plumbing.run_folder import check_out_dir, claim_out_dir, release_out_dir, resume_hint
from rollout import Rollout, format_prompt, sample, score_responses
from tasks import batches_of_problems, load_tasks
from update import (Learner, Means, OldScores, add_actor_stats, clipped_step, critic_loss_backward,
                    make_learners, micro_batch_plan, reference_model, score_old_policy)

# -----------------------------------------------------------------------------------------------
# Configuration: every field can be set from the command line as --name value, or from a preset


@dataclass
class Config:
    # --- I/O
    out_dir: str = "runs/default"  # metrics.jsonl, plots.png and checkpoint/ go here; one run per folder
    resume: str = ""  # a checkpoint folder to continue from (its saved config is the base)
    overwrite: bool = False  # replace the run already in out_dir (otherwise it is refused, never mixed)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep_optimizer: bool = False  # keep the optimiser state in the final checkpoint too (twice
    #                               the weights' size), so --resume ... --steps N can extend the run
    progress: bool = True  # tqdm bars
    log: str = ""  # also log to "tensorboard" (in out_dir/tensorboard) or "wandb" (offline); "" = metrics.jsonl only
    # --- model
    model: str = "smollm2-135m"  # alias, .gguf file, local folder or hub id (see plumbing/load.py)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: autocast over float32 weights (see plumbing/precision.py)
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
    max_new_tokens: int = 40  # response budget (the paper: 8K); an answer cut off by it scores 0
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
    eval_task: str = ""  # "" = the test split of --task (a local file: its hash-picked 10%, see tasks.load_tasks)
    eval_problems: int = 128  # 0 = skip
    eval_every: int = 0  # also evaluate every this many steps; 0 = only start and end
    eval_batch: int = 64  # prompts per sampling batch in evaluation


DEFAULT_ALPHA = {"grpo": 0.4, "ppo": 0.1}  # the paper's Appendix B


def resolve_defaults(cfg: Config) -> Config:
    """Fill in the defaults that follow the algorithm: alpha 0.4 (GRPO) or 0.1 (PPO), critic_lr 2x lr.
    (The config saved with a checkpoint keeps them unset, so a resumed --lr moves critic_lr too.)"""
    alpha = DEFAULT_ALPHA.get(cfg.algo, 0.4) if cfg.alpha is None else cfg.alpha
    return dataclasses.replace(cfg, alpha=alpha, critic_lr=2 * cfg.lr if cfg.critic_lr is None else cfg.critic_lr)


# -----------------------------------------------------------------------------------------------
# The boxes of one step, as train()'s loop calls them


def roll_out(cfg: Config, actor: Learner, tokenizer, batch: list, step: int) -> Rollout:
    """prompts -> G answers each, sampled without gradients, with their log-probs and entropies."""
    actor.net.eval()
    with actor.amp():
        return sample(actor.net, tokenizer, [format_prompt(tokenizer, p.question) for p in batch],
                      group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step, cuda_graph=cuda_graph_option(cfg.cuda_graph, cfg.device))


def grade(reward_fn, rollout: Rollout, batch: list, device) -> torch.Tensor:
    """Each answer's reward against its problem (answer i belongs to prompt i // G) -> (N,).
    None: 1.0 for a right answer that stopped before max_new_tokens, else 0.0 (a cut-off answer
    is wrong: grader.grade_response). A custom reward_fn(text, problem) -> float sees every answer,
    cut-off ones included, and decides for itself (a length or format reward may score them)."""
    G, stopped = rollout.group_size, rollout.stopped.tolist()
    scores = [float(grade_response(text, batch[i // G].answer, stopped[i])) if reward_fn is None
              else reward_fn(text, batch[i // G]) for i, text in enumerate(rollout.texts)]
    return torch.tensor(scores, dtype=torch.float32, device=device)


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


# -----------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, reward_fn=None, model=None, tokenizer=None, problems=None):
    """Run cfg.steps steps; returns a summary dict. reward_fn(text, problem) -> float: None = the
    default reward (see grade()). model/tokenizer/problems can be passed in (tests)."""
    # 0) every check, the problems, the seeds, the precision: all before the folder and the model
    given, cfg = cfg, resolve_defaults(cfg)
    problems, held_out, precision = start_run(cfg, problems)
    claim_out_dir(cfg)  # the folder's lock: from here on, every way out releases it
    log = None
    try:
        log = MetricsLogger(cfg)  # metrics.jsonl, and --log's TensorBoard or W&B
        return run_steps(cfg, given, problems, held_out, log, precision, reward_fn, model,
                         tokenizer)
    except KeyboardInterrupt:  # while loading or evaluating (in the steps it saves and exits)
        print(f"\ninterrupted: {resume_hint(cfg)}")
        raise SystemExit(130)
    finally:
        end_run(cfg, log)


def run_steps(cfg: Config, given: Config, problems, held_out, log, precision, reward_fn, model,
              tokenizer) -> dict:
    """train()'s work once the folder is ours: the model, the steps, the final evaluation."""
    # 1) the model (weights stay float32: Adam's small updates vanish in bfloat16), its optimiser,
    #    PPO's critic, the KL reference; a resumed run's optimiser and RNG state
    if model is None:
        model, tokenizer = load_model(cfg.resume or cfg.model, device=precision.device, dtype=torch.float32)
    check_context(model, tokenizer, problems + held_out, cfg.max_new_tokens, "--max_new_tokens")
    actor, critic = make_learners(cfg, model, precision)
    plan = micro_batch_plan(cfg, precision.device, [actor] + ([critic] if critic else []))
    ref_model = reference_model(cfg, model, precision.device)
    start, skipped = restore(cfg, actor, critic) if cfg.resume else (0, 0)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoint")
    t0, watch = time.time(), Watch(cfg)
    if held_out and start == 0:
        evaluate_held_out(cfg, actor, tokenizer, held_out, start, log)

    # 2) the loop: one call per arrow of the pipeline
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not cfg.progress, initial=start, total=cfg.steps)
    step = start
    try:
        for step in bar:
            t_step = time.time()
            batch = batches_of_problems(problems, cfg.prompts_per_step, cfg.seed, step)  # B prompts
            rollout = roll_out(cfg, actor, tokenizer, batch, step)  # -> G answers each, with log-probs, entropies
            t_rollout = time.time() - t_step
            rewards = grade(reward_fn, rollout, batch, precision.device)  # -> (N,) rewards, 1 right / 0 wrong
            # -> advantages A_t: GRPO's group z-score, or PPO's GAE against the critic's values
            old = score_old_policy(cfg, rollout, actor, critic, ref_model, plan)  # pi_old, V_old
            old.adv, old.returns = compute_advantages(cfg, rollout, rewards, old.values)
            # -> update(): per micro-batch the paper's line, the clipped loss, backward; then a step
            # PPO's first critic_warmup steps train only the critic: its values are noise at first
            if cfg.algo == "ppo" and step < cfg.critic_warmup:
                stats = update(cfg, None, critic, rollout, old, plan)
            else:
                stats = update(cfg, actor, critic, rollout, old, plan)
            # -> log, and say in plain words what looks wrong; save and evaluate now and then
            skipped += stats["skipped_updates"]  # the run's total (actor, critic), kept on resume
            stats.update(skipped_updates_total=skipped, rollout_s=t_rollout, step_s=time.time() - t_step)
            record = step_record(cfg, step + 1, rollout, rewards, old, stats, model)
            record["warnings"] = watch.check(record)
            log(record)
            show_progress(bar, record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_checkpoint(ckpt_dir, given, step + 1, model, tokenizer, actor, critic, skipped)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and held_out:
                evaluate_held_out(cfg, actor, tokenizer, held_out, step + 1, log)
    except KeyboardInterrupt:
        print(f"\ninterrupted: saving a checkpoint at step {step} to {ckpt_dir}")
        save_checkpoint(ckpt_dir, given, step, model, tokenizer, actor, critic, skipped)
        raise SystemExit(130)
    # 3) the end: a checkpoint, the held-out evaluation against the start's, summary.json
    save_checkpoint(ckpt_dir, given, cfg.steps, model, tokenizer, actor, critic, skipped)
    minutes = (time.time() - t0) / 60  # the training's time, without the final evaluation
    if held_out:
        evaluate_held_out(cfg, actor, tokenizer, held_out, cfg.steps, log)
    return summarise(cfg, precision, minutes, ckpt_dir)


def update(cfg: Config, actor: Learner | None, critic: Learner | None, rollout: Rollout,
           old: OldScores, plan) -> dict:
    """nanoGPT's micro-step block: an optimiser step per mini-batch of whole groups, its gradients
    summed over micro-batches (plan.split). actor None: only the critic learns (PPO's warm-up)."""
    N = rollout.response_ids.shape[0]
    stats, skipped = Means(), 0
    for first in range(0, N, N // cfg.mini_batches):
        rows = slice(first, first + N // cfg.mini_batches)  # a mini-batch of whole groups
        num_tokens = rollout.response_mask[rows].sum()  # the losses / this: a token mean
        for attempt in plan.attempts([actor, critic]):  # fast/: again, smaller, if out of memory
            with attempt:
                mini = Means()
                for part, part_old in plan.split(rollout, old, rows, probe=actor is not None):
                    mask = part.response_mask  # (n, R): a micro-batch of n rows
                    if actor is not None:
                        with actor.amp():  # the training forward: log pi_theta and H_t, (n, R) each
                            logp, ent = score_responses(actor.net, part, cfg.temperature)
                        # 1) the paper's line, A_t + min(alpha * H_t.detach(), |A_t| / kappa)
                        adv = entropy_shaped_advantages(part_old.adv, ent, cfg.alpha, cfg.kappa)
                        # 2) log pi_old: with one mini-batch, this forward's own (ratio exactly 1)
                        logp_old = logp.detach() if part_old.logprobs is None else part_old.logprobs
                        # 3) the clipped surrogate (+ KL, entropy_coef terms), a token-level mean
                        loss, s = policy_loss(logp, logp_old, adv, mask, cfg.eps_low,
                                              cfg.eps_high, part_old.ref_logprobs, cfg.kl_coef,
                                              ent, cfg.entropy_coef, num_tokens=num_tokens)
                        actor.scaler.scale(loss).backward()  # (float16: the loss scaled up)
                        add_actor_stats(mini, s, part_old.adv, ent, mask, cfg)
                    if critic is not None:
                        critic_loss_backward(cfg, critic, part, part_old, num_tokens, mini)
        stats.merge(mini)
        # 4) the clipped optimiser step, skipped when the gradient norm is not finite
        if actor is not None:
            skipped += clipped_step(actor, cfg.grad_clip, stats, "grad_norm")
        if critic is not None:
            skipped += clipped_step(critic, cfg.grad_clip, stats, "critic_grad_norm")
    return {**stats.means(), "skipped_updates": skipped, "micro_batch": plan.last_rows,
            "recompute": plan.recompute}


def start_run(cfg: Config, problems=None) -> tuple:
    """What train() does before it takes the folder -> (problems, held-out problems, precision).
    Every check first, so a bad value costs a second, not a model load."""
    check_config(cfg)
    check_out_dir(cfg)
    check_resume(cfg)
    problems, held_out = load_tasks(cfg, problems)
    find_model(cfg.resume or cfg.model)  # a missing model folder or file, before the lock and the logger
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    precision = choose_precision(cfg.device, cfg.dtype)  # on a CPU: by its bf16 instructions
    print(precision.describe())
    print("config:", json.dumps(dataclasses.asdict(cfg)))  # alpha and critic_lr as resolved
    return problems, held_out, precision


def end_run(cfg: Config, log):
    """On every way out: plots.png from metrics.jsonl, the logger closed, the lock freed."""
    try:
        plot_metrics(cfg.out_dir)
        if log is not None:
            log.close()
    finally:
        release_out_dir(cfg)


def step_record(cfg: Config, step: int, rollout: Rollout, rewards, old, stats: dict, model) -> dict:
    """The step's row of metrics.jsonl: what was sampled, how it was graded, the update's statistics
    (update.Means, with the loop's timings), PPO's explained variance, and GPU memory and graphs."""
    mask = rollout.response_mask
    record = {"kind": "train", "step": step, "reward": rewards.mean().item(),
              "zero_spread_groups": zero_spread(rewards, cfg.group_size).float().mean().item(),
              "entropy": masked_mean(rollout.entropies, mask).item(), "length": mask.sum(-1).mean().item(),
              "truncated": 1 - rollout.stopped.float().mean().item(), "lr": cfg.lr, **stats}
    if old.values is not None:
        record["explained_variance"] = explained_variance(old.values, old.returns, mask)
    if mask.device.type == "cuda":  # the number to watch when sizing a run for your GPU
        record["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        record.update(graph_stats(model))  # decode graphs recorded so far, and the seconds that took
    return record


def show_progress(bar, record: dict):
    """The progress bar's reward, entropy, length, seconds a step, and clip fraction when clipping acts."""
    postfix = dict(reward=f"{record['reward']:.2f}", H=f"{record['entropy']:.2f}", len=f"{record['length']:.0f}",
                   s=f"{record['step_s']:.0f}")
    if record.get("clip_frac"):  # 0 with one mini-batch (the ratio is 1): shown only when clipping acts
        postfix["clip"] = f"{record['clip_frac']:.3f}"
    bar.set_postfix(postfix)


def evaluate_held_out(cfg: Config, actor: Learner, tokenizer, held_out: list, step: int, log) -> dict:
    """Greedy pass@1 on the held-out problems and the share cut off: metrics.jsonl's "eval" row."""
    actor.net.eval()
    with actor.amp():
        greedy = EvalSettings(n=1, ks=[1], temperature=0, max_new_tokens=cfg.max_new_tokens, batch_prompts=cfg.eval_batch,
                              cuda_graph=cuda_graph_option(cfg.cuda_graph, cfg.device), progress=cfg.progress)
        res = evaluate(actor.net, tokenizer, held_out, greedy)
    row = {k: res[k] for k in ("accuracy", "accuracy_se", "mean_length", "truncated")}
    log({"kind": "eval", "step": step, **row, "num_problems": len(held_out)})
    cut = f"{100 * res['truncated']:.0f}% cut off at {cfg.max_new_tokens} tokens"
    print(f"step {step}: held-out greedy pass@1 {res['accuracy']:.3f} +- {res['accuracy_se']:.3f}"
          f" on {len(held_out)} problems, {cut}")
    return res


def main(argv=None):
    """The command line: one line naming the fix and exit code 2 for any bad input, no traceback."""
    try:
        overrides = parse_args(sys.argv[1:] if argv is None else argv, Config)  # --preset's values, then the flags
        cfg = Config()
        if overrides.get("resume"):  # a resumed run starts from its own saved config; flags given now win
            path = os.path.join(overrides["resume"], "train_config.json")
            if not os.path.isfile(path):
                check_resume(Config(resume=overrides["resume"]))  # says what is missing, or where the whole checkpoint is
            names = {f.name for f in dataclasses.fields(Config)}
            cfg = Config(**{k: v for k, v in json.load(open(path)).items() if k in names})
        cfg = dataclasses.replace(cfg, **overrides)
        # Ctrl-C and a kill save a checkpoint. SIGINT is set too: Python leaves it ignored in a
        # background job (`python train.py &` from a script)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        return train(cfg)
    except ValueError as e:  # our own clear messages (bad option, preset, task, model, folder, ...)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""
one_update.py -- the paper's mechanism in one update, for a class. From the same weights and the
same rollout, one update with alpha 0 (plain GRPO) and one with alpha 0.4 (the entropy advantage):
what each does to right answers, wrong answers and the token entropy, paired over seeds.

    python one_update.py                          # 8 seeds, SmolLM2-135M on arith, on CPU
    python one_update.py --seeds 16 --out out/one_update16   # more seeds, narrower intervals
    python one_update.py --help                   # every option

What the maths predicts. The paper's line adds psi = min(alpha * H, |A| / kappa) >= 0 to every
token's advantage (advantage.py). Where the cap binds (alpha * H > |A| / kappa; kappa 2) the shaped
advantage is A + |A| / 2: 1.5 A on a right answer (A > 0), 0.5 A on a wrong one (A < 0). Against
plain GRPO the update pushes right answers up harder and wrong answers down less, and both make the
policy surer of what it sampled. So, alpha 0.4 minus alpha 0, on the same rollout:
  1. right answers: the log-probability per token rises more (difference > 0)
  2. wrong answers: the log-probability per token falls less (difference > 0)
  3. the token entropy falls more (difference < 0), on the rollout's answers and on fixed probe
     answers. This is the paper's sign over a whole run (its Section 6: mean entropy 0.17 with the
     entropy advantage, 0.34 without, at step 2000); the bonus does not raise entropy. In one
     update it is faint: 1 and 2 follow from each answer's own gradient, while a bonus on the
     sampled token that does not depend on which token was sampled changes nothing at first
     order in lr, averaged over the sampling (E[grad log pi] = 0). Its sharpening is a second-
     order effect, so 8 seeds may well leave 0 inside the interval; the printout marks the row.
  4. the cap-binding share: of the tokens with A != 0, those where psi is the whole |A| / kappa
     (the 1.5 A and 0.5 A above). The larger it is, the more the two updates differ.

The steps, for each seed s (one_seed() below):
  1. draw B training prompts and sample G answers each from the start weights, seeded by s
  2. grade them; GRPO's group advantages A (train.py's roll_out, grade, compute_advantages)
  3. score the rollout under the start weights: every answer token's log-prob and entropy
  4. for alpha 0, then alpha 0.4: the start weights again, a fresh AdamW, and one update on the
     same rollout and the same A (train.update, the very function train.py's loop calls); then
     score the rollout's answers and the probe answers under the updated weights
  5. record each arm's changes, and their difference
Then, across seeds, each difference's mean and 95% interval, printed beside the prediction.

Our choices:
  - Right and wrong answers are those with A > 0 and A < 0. An answer in a group that is all right
    (or all wrong) has A = 0: no update pushes it, so it is in neither. A seed all of whose groups
    have A = 0 gives no gradient at all: it is left out, and the printout says so.
  - The probes: one answer to each of the first --probes held-out problems, sampled once from the
    start weights with a fixed seed: the same tokens for every seed.
  - The interval is Student's t over seeds (t_interval): each seed's difference is the mean effect
    of a whole update over hundreds of tokens, close to normal, and the seeds are independent. A
    percentile bootstrap over 8 values is too narrow: it claims 95% and covered 87% of the true
    means in a simulation (2,000 normal samples of 8); tests/test_one_update.py checks ours.
  - train.py's lr, 1e-5. The first AdamW step moves every weight by about lr whatever its gradient
    (m / sqrt(v) = g / |g| at step 1), so lr alone sets how far one update goes. At 1e-5 right
    answers already gain tenths of a nat per token; at 1e-4 about a nat, no longer a small step.
  - The size: 2 prompts x 8 answers of up to 40 tokens on arith, at temperature 1.0 (the paper's
    training temperature, where SmolLM2 got 6% to 25% of a rollout's answers right, so most groups
    have a reward spread). 8 seeds take about 11 minutes of CPU time: an estimated 6 to 7
    minutes on 2 idle cores (docs/class_demo.md).
"""

import dataclasses
import json
import math
import os
import sys
import time

import torch

import train
from advantage import entropy_shaped_advantages, masked_mean
from plumbing.command_line import OneLineParser, check_context, make_out_folder
from plumbing.load import find_model, load_model
from plumbing.precision import choose_precision
from rollout import Rollout, format_prompt, sample, score_responses
from tasks import batches_of_problems, load_tasks
from update import Learner, make_learners, micro_batch_plan, score_old_policy

SIZE = dict(task="arith", prompts_per_step=2, group_size=8, max_new_tokens=40, temperature=1.0)
PROBES, PROBE_SEED = 8, 12345  # held-out problems, one probe answer each; the seed sampling them
# Student's t, 97.5% quantile, for 1 to 30 degrees of freedom (any statistics book's table)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
# Each quantity: its printed name, and the sign of alpha 0.4 minus alpha 0 the maths predicts
QUANTITIES = {"right_logp": ("right answers' log-prob change", +1),
              "wrong_logp": ("wrong answers' log-prob change", +1),
              "rollout_entropy": ("rollout answers' entropy change", -1),
              "probe_entropy": ("probe answers' entropy change", -1)}


# -----------------------------------------------------------------------------------------------
# The statistics


def t_interval(values: list) -> dict:
    """The mean of independent values and its 95% Student-t interval, mean +- t * sd / sqrt(n).
    Beyond 30 degrees of freedom: the normal quantile and its first correction (0.003 off at most).

    >>> {k: round(v, 3) for k, v in t_interval([1.0, 2.0, 3.0]).items()}
    {'mean': 2.0, 'low': -0.484, 'high': 4.484, 'n': 3}
    """
    n = len(values)
    if n < 2:
        mean = values[0] if values else math.nan
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96 + (1.96**3 + 1.96) / (4 * (n - 1))
    half = t * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def token_mean(x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x (N, R) over the answer tokens (mask (N, R)) of the rows where rows (N,) is set."""
    return masked_mean(x, mask * rows[:, None].float()).item()


# -----------------------------------------------------------------------------------------------
# One seed: one rollout, two updates from the same start


@torch.no_grad()
def score(cfg, model, precision, rollout: Rollout) -> tuple:
    """(log-probs, entropies), each (N, R), of the rollout's answer tokens under the model now."""
    model.eval()
    with precision.autocast():
        logp, ent = score_responses(model, rollout, cfg.temperature)
    return logp.float(), ent.float()


def one_update(cfg, model, start: dict, precision, rollout: Rollout, adv: torch.Tensor) -> dict:
    """The start weights, a fresh AdamW, one update as train.py makes it -> the update's stats."""
    model.load_state_dict(start)
    actor, _ = make_learners(cfg, model, precision)  # a new AdamW: the same (empty) state each arm
    plan = micro_batch_plan(cfg, precision.device, [actor])
    old = score_old_policy(cfg, rollout, actor, None, None, plan)
    old.adv = adv  # (N, R): the same advantages for both arms
    return train.update(cfg, actor, None, rollout, old, plan)


def one_seed(cfg, model, tokenizer, start: dict, precision, problems: list, probes: Rollout,
             probe_h0: torch.Tensor, reward_fn) -> dict:
    """Steps 1-5 of the docstring for seed cfg.seed -> the seed's record."""
    # 1) B prompts and G answers each, sampled from the start weights with this seed's numbers
    model.load_state_dict(start)
    batch = batches_of_problems(problems, cfg.prompts_per_step, cfg.seed, 0)
    sampler = Learner(model, None, None, precision.autocast)  # roll_out reads only net and amp
    rollout = train.roll_out(cfg, sampler, tokenizer, batch, 0)
    # 2) rewards (N,) and GRPO's advantages (N, R): every token of answer i has A_i
    rewards = train.grade(reward_fn, rollout, batch, precision.device)
    adv, _ = train.compute_advantages(cfg, rollout, rewards)
    mask, a = rollout.response_mask, adv[:, 0]  # (N, R), (N,)
    right, wrong = a > 0, a < 0  # (N,) each: the answers the update pushes up, and down
    record = {"seed": cfg.seed, "reward": rewards.mean().item(), "right_answers": int(right.sum()),
              "wrong_answers": int(wrong.sum()), "used": bool(right.any())}
    if not record["used"]:  # every group all right or all wrong: A = 0 everywhere, no gradient
        return record
    # 3) the start's log-probs and entropies, and what the paper's line makes of A with them:
    #    psi only ever scales A, to 1.5 A (right) and 0.5 A (wrong) where the cap binds
    logp0, h0 = score(cfg, model, precision, rollout)
    shaped = entropy_shaped_advantages(adv, h0, cfg.alpha, cfg.kappa)  # (N, R), as train.update has it
    scale = shaped / adv.abs().clamp(min=1e-12)  # (N, R): 1 + psi/|A| (A > 0), psi/|A| - 1 (A < 0)
    record.update(shaped_over_adv_right=token_mean(scale, right, mask),
                  shaped_over_adv_wrong=token_mean(-scale, wrong, mask))
    # 4) the two updates from the same start, on the same rollout and the same advantages
    for name, alpha in (("alpha0", 0.0), ("alpha", cfg.alpha)):
        arm = dataclasses.replace(cfg, alpha=alpha)
        stats = one_update(arm, model, start, precision, rollout, adv)
        logp, h = score(cfg, model, precision, rollout)
        h_probes = score(cfg, model, precision, probes)[1] - probe_h0  # (P, R'): the change
        record[name] = {"right_logp": token_mean(logp - logp0, right, mask),
                        "wrong_logp": token_mean(logp - logp0, wrong, mask),
                        "rollout_entropy": token_mean(h - h0, right | wrong, mask),
                        "probe_entropy": masked_mean(h_probes, probes.response_mask).item(),
                        "grad_norm": stats["grad_norm"]}
        if name == "alpha":  # train.update's own statistics of the paper's line
            record.update(cap_frac=stats["cap_frac"], psi_ratio=stats["psi_ratio"])
    # 5) the paired differences
    record["difference"] = {q: record["alpha"][q] - record["alpha0"][q] for q in QUANTITIES}
    return record


# -----------------------------------------------------------------------------------------------
# All seeds, the results, the printout


def demonstrate(cfg, seeds: list, num_probes: int, out: str, reward_fn=None, model=None,
                tokenizer=None) -> dict:
    """Every seed, then the statistics; writes results.json and results.txt into `out` and returns
    the results. cfg: a train.Config whose alpha is the entropy arm's. reward_fn(text, problem) ->
    float (None: graded against the gold answer), model and tokenizer: for the tests."""
    t0, cpu0 = time.time(), time.process_time()
    # every check before anything slow: the task, the model's file or folder, the output folder
    problems, held_out = load_tasks(dataclasses.replace(cfg, eval_problems=num_probes))
    if model is None:
        find_model(cfg.model)
    make_out_folder(out)
    precision = choose_precision(cfg.device, cfg.dtype)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=precision.device, dtype=torch.float32)
    check_context(model, tokenizer, problems + held_out, cfg.max_new_tokens)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}  # every update's start
    model.eval()
    with precision.autocast():  # the probes: sampled once, the same answers for every seed
        prompts = [format_prompt(tokenizer, p.question) for p in held_out]
        probes = sample(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, seed=PROBE_SEED)
    probe_h0 = score(cfg, model, precision, probes)[1]
    records = []
    for i, s in enumerate(seeds):
        t = time.time()
        seed_cfg = dataclasses.replace(cfg, seed=s)
        records.append(one_seed(seed_cfg, model, tokenizer, start, precision, problems, probes,
                                probe_h0, reward_fn))
        print(f"seed {s} ({i + 1} of {len(seeds)}): {time.time() - t:.0f} s", flush=True)
    model.load_state_dict(start)  # the model as it was given
    minutes = {"wall": (time.time() - t0) / 60, "cpu": (time.process_time() - cpu0) / 60}
    results = summarise(cfg, records, len(held_out), minutes)
    text = printout(results)
    print(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(text + "\n")
    return results


def summarise(cfg, records: list, num_probes: int, minutes: dict) -> dict:
    """The settings, every seed's record and, for each quantity, each arm's mean change and the
    paired difference with its interval, the sign predicted and the sign measured."""
    used = [r for r in records if r["used"]]
    summary = {}
    for q, (label, sign) in QUANTITIES.items():
        diff = t_interval([r["difference"][q] for r in used])
        summary[q] = {"label": label, "alpha0": t_interval([r["alpha0"][q] for r in used]),
                      "alpha": t_interval([r["alpha"][q] for r in used]), "difference": diff,
                      "predicted_sign": sign,
                      "measured_sign": (diff["mean"] > 0) - (diff["mean"] < 0),
                      "excludes_zero": bool(diff["low"] > 0 or diff["high"] < 0)}
    summary["cap_frac"] = t_interval([r["cap_frac"] for r in used])
    names = ("model", "task", "prompts_per_step", "group_size", "max_new_tokens", "temperature",
             "top_p", "lr", "alpha", "kappa", "grad_clip")
    settings = {**{k: getattr(cfg, k) for k in names}, "probes": num_probes,
                "seeds": [r["seed"] for r in records]}
    return {"settings": settings, "seeds_used": len(used), "summary": summary, "records": records,
            "minutes": minutes}


def printout(results: dict) -> str:
    """The table a class reads: what the maths predicts beside what one update did."""
    st, s, n = results["settings"], results["summary"], results["seeds_used"]
    alpha = f"alpha {st['alpha']:g}"  # the entropy arm's
    sign = {1: "> 0", -1: "< 0", 0: "0"}
    lines = [f"One update of {st['model']} on {st['task']}, {st['prompts_per_step']} prompts x "
             f"{st['group_size']} answers (up to {st['max_new_tokens']} tokens, temperature "
             f"{st['temperature']:g}), lr {st['lr']:g}:",
             f"from the same weights and rollout, alpha 0 and {alpha}: {n} seeds.",
             "Per answer token, the mean over seeds of each arm's change and their difference:",
             "",
             f"{'':32} {'alpha 0':>8} {alpha:>9}  {'difference [95% t-interval]':<28} "
             f"{'predicted':>9}  measured"]
    for q in QUANTITIES:
        d, row = s[q]["difference"], s[q]
        interval = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        zero = "0 outside the interval" if row["excludes_zero"] else "0 inside the interval"
        means = f"{row['alpha0']['mean']:+8.4f} {row['alpha']['mean']:+9.4f}"
        predicted, measured = sign[row["predicted_sign"]], sign[row["measured_sign"]]
        predicted += "*" if q.endswith("entropy") else " "
        lines.append(f"{row['label']:32} {means}  {interval:<28} {predicted:>9}  "
                     f"{measured} ({zero})")
    lines.append("* the paper's sign over a whole run; one update moves the entropy only faintly")
    c = s["cap_frac"]
    lines += ["", f"cap-binding share {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}] of the "
              "answer tokens with A != 0:",
              "there the shaped advantage is 1.5 A on right answers and 0.5 A on wrong ones"]
    left_out = [r["seed"] for r in results["records"] if not r["used"]]
    if left_out:
        lines.append(f"left out: seed(s) {', '.join(map(str, left_out))}, whose groups were all "
                     "right or all wrong (no gradient)")
    m = results["minutes"]
    lines.append(f"{st['probes']} probe answers; {m['wall']:.1f} minutes ({m['cpu']:.1f} of CPU)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The command line


def parse(argv) -> tuple:
    """argv -> (train.Config, seeds, probes, out), the values' ranges and --out checked."""
    p = OneLineParser(description="One update with alpha 0 and one with alpha 0.4 from the same "
                      "weights and rollout, paired over seeds, beside what the maths predicts.")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0, 1, ...: a rollout each")
    p.add_argument("--alpha", type=float, default=0.4,
                   help="the entropy arm's (the other's is 0); 0: every difference is exactly 0")
    p.add_argument("--lr", type=float, default=train.Config.lr, help="AdamW's learning rate")
    p.add_argument("--model", default=train.Config.model, help="smollm2-135m, a folder, a .gguf")
    p.add_argument("--task", default=SIZE["task"], help="arith[:LEVEL], gsm8k, a file")
    p.add_argument("--prompts-per-step", type=int, default=SIZE["prompts_per_step"],
                   help="B prompts in a rollout")
    p.add_argument("--group-size", type=int, default=SIZE["group_size"], help="G answers a prompt")
    p.add_argument("--max-new-tokens", type=int, default=SIZE["max_new_tokens"],
                   help="an answer's budget in tokens")
    p.add_argument("--temperature", type=float, default=SIZE["temperature"],
                   help="the sampling temperature (the paper trains at 1.0)")
    p.add_argument("--probes", type=int, default=PROBES, help="held-out problems (an answer each)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="out/one_update", help="results.json, results.txt")
    p.add_argument("--overwrite", default="false", choices=["true", "false"],
                   help="replace the results already in --out")
    a = p.parse_args(argv)
    if a.seeds < 2 or a.probes < 1:
        raise ValueError(f"--seeds must be >= 2 (an interval needs two) and --probes >= 1, "
                         f"got {a.seeds} and {a.probes}")
    cfg = train.Config(model=a.model, task=a.task, prompts_per_step=a.prompts_per_step,
                       group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, lr=a.lr, alpha=a.alpha, device=a.device,
                       eval_problems=0, progress=False)
    cfg = train.resolve_defaults(cfg)
    train.check_config(cfg)  # train.py's own checks and messages (--group_size >= 2, ...)
    if os.path.isfile(os.path.join(a.out, "results.json")) and a.overwrite == "false":
        raise ValueError(f"--out {a.out} holds results already: pass --overwrite true to replace "
                         "them, or another --out")
    return cfg, list(range(a.seeds)), a.probes, a.out


def main(argv=None):
    """The command line: a bad option is one line naming the fix (exit code 2), no traceback."""
    try:
        cfg, seeds, probes, out = parse(sys.argv[1:] if argv is None else argv)
        demonstrate(cfg, seeds, probes, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

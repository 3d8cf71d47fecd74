"""
experiment.py -- the paper in miniature: plain GRPO (or PPO) against the same run with the entropy
advantage, from the same seed, data order and compute; then Pass@K of the start and of both ends.

    python experiment.py                      # the CPU demo: SmolLM2-135M on arith (~40 min on 2 cores)
    python experiment.py --algo ppo           # the same comparison for PPO (alpha 0.1, the paper's value)
    python experiment.py --steps 24 --eval_problems 64     # any train.py Config field works: --name value
    python experiment.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --steps 200 --prompts_per_step 32 \\
        --max_new_tokens 512 --lr 1e-6 --n 256 --eval_problems 200 --eval_batch 1    # a GPU run, n = 256
        # (offline: --task ../shared/data/gsm8k_train.jsonl --eval_task ../shared/data/gsm8k_test.jsonl)

Stages; each is skipped when its output exists, so after an interruption the same command goes on
(--overwrite true retrains both runs instead):
  1. train the plain run (alpha = 0) into OUT/plain (train.py's tqdm bar; a Ctrl-C saves a checkpoint
     there and the next run resumes it)
  2. train the entropy-advantage run (alpha 0.4 for GRPO, 0.1 for PPO, or --alpha) into OUT/entropy.
     The two Configs differ only in alpha (and out_dir), so train.py's seeded data order and per-step
     sampling seeds are shared: step 1's rollouts are identical, and the policies part from there.
  3. evaluate the starting model and both final checkpoints: n samples per held-out problem at the
     paper's settings (temperature 0.6, top-p 0.95) and one eval seed for all three -> OUT/eval_*
  4. passk.png (Pass@K for K = 1..n on a dense log grid), curves.png (reward, entropy, length and
     psi/|A| per step, both runs in each panel), results.json and results.md (a table to paste).

OUT is runs/experiment/<algo> unless --out_dir says otherwise. --n (samples per problem, default 64)
is the experiment's own option; every other one is a train.py Config field, and two of them are read
by stage 3 instead of by training (the runs themselves skip their greedy evaluations):
  --eval_problems   held-out problems (default 40 here)     --eval_batch   prompts per sampling call
                                                                           (each brings n rows; default 2)

Sizing of the CPU demo on 2 idle cores (an estimate; the README states the measured total).
Training: 2 runs x 12 steps x 30-50 s (4 x 8 answers of up to 40 tokens, one forward and backward)
= 12-20 min. Evaluation: 3 models x 20 calls of 2 problems x 64 rows x up to 40 tokens; one call
took 33 s of one core's time in bfloat16 (~155 tokens/s), so 20-25 s on two cores: 20-25 min.
Loading and plots: ~1 min. In all 35-46 min, OUT/minutes.json records each stage's wall time.
On a GPU, use n = 256 (the paper's K for AIME) and a few hundred held-out problems.

Simplifications, said plainly:
  1. One seed per arm, 12 steps of a 135M model: the demo shows the method's moving parts and what
     to measure, not the paper's effect sizes; the arms may not differ beyond noise. results.md gives
     Pass@1's standard error over problems: a gap under about two of them is noise.
  2. Evaluation answers within the training budget of new tokens (40 here; the paper's is 8K), on
     the test split of the training task (of a local file, its held-out 10%), or --eval_task.
"""

import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time

import torch

import train
from evaluate import default_ks, evaluate, load_summary, plot_curves
from model import load_model
from train import Config

CPU_DEMO = dict(steps=12, eval_problems=40, eval_batch=2)  # Config values the experiment changes by default
EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95  # the paper's evaluation settings

# -----------------------------------------------------------------------------------------------
# The command line: --n is ours, everything else goes through train.py's own parser and checks


def parse(argv) -> tuple:
    """argv -> (plain Config, entropy Config, n, base Config). The two runs differ only in alpha and out_dir;
    base (out_dir = OUT, eval_problems and eval_batch as given) is what the evaluation reads."""
    n, rest, it = 64, [], iter(argv)
    for arg in it:
        if arg != "--n" and not arg.startswith("--n="):
            rest.append(arg)
            continue
        value = arg[4:] if "=" in arg else next(it, "")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--n expects a positive int (samples per held-out problem), got '{value}'")
        n = int(value)
    overrides = train.parse_args(rest)  # unknown or mistyped options stop here, with the valid ones listed
    if overrides.get("resume"):
        raise ValueError("--resume is not an experiment option: rerun the same command and finished stages are skipped")
    algo = overrides.get("algo", "grpo")
    base = Config(**{**CPU_DEMO, "out_dir": os.path.join("runs", "experiment", algo), **overrides})
    base = dataclasses.replace(base, alpha=overrides.get("alpha", train.DEFAULT_ALPHA.get(algo, 0.4)))  # the paper's
    train.check_config(train.resolve_defaults(base))
    if os.path.exists(base.out_dir) and not os.path.isdir(base.out_dir):
        raise ValueError(f"--out_dir {base.out_dir} is a file: name a folder")
    if base.alpha == 0:
        raise ValueError(f"--alpha 0 would train the plain run twice: leave it out ({train.DEFAULT_ALPHA[algo]} for {algo}) "
                         "or give a positive value")
    if base.eval_problems < 1 or base.eval_batch < 1:
        raise ValueError("--eval_problems and --eval_batch must be >= 1: stage 3 needs held-out problems")
    run = lambda name, alpha: dataclasses.replace(base, alpha=alpha, out_dir=os.path.join(base.out_dir, name),  # noqa: E731
                                                  eval_problems=0)  # the experiment's evaluation replaces theirs
    return run("plain", 0.0), run("entropy", base.alpha), n, base


# -----------------------------------------------------------------------------------------------
# Stages 1-2: training (train.py does all the work; we only decide between skip, resume and start)


def train_stage(cfg: Config):
    """Train one run unless it finished already; resume it from its checkpoint if it was interrupted.
    With --overwrite true, train it afresh whatever the folder holds (train.py clears it)."""
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    summary = os.path.join(cfg.out_dir, "summary.json")
    if os.path.isfile(os.path.join(ckpt, "train_config.json")) and not cfg.overwrite:
        # a run trained with other settings is never reused, nor silently overwritten (it cost an hour)
        saved, wanted = json.load(open(os.path.join(ckpt, "train_config.json"))), dataclasses.asdict(cfg)
        diff = [f"{k}: {v} there, {wanted[k]} now" for k, v in saved.items()
                if k not in ("resume", "progress", "out_dir", "overwrite") and v != wanted.get(k)]
        if diff:
            raise ValueError(f"{cfg.out_dir} was trained with other settings ({'; '.join(diff)}): pass --overwrite true to retrain it, or another --out_dir")
        if os.path.isfile(summary):
            print(f"{cfg.out_dir}: finished earlier, skipped")
            return
        cfg = dataclasses.replace(cfg, resume=ckpt)  # a Ctrl-C checkpoint: go on from its step
    elif os.path.isfile(os.path.join(cfg.out_dir, "metrics.jsonl")) and not cfg.overwrite:  # (--overwrite: train.py clears)
        os.remove(os.path.join(cfg.out_dir, "metrics.jsonl"))  # rows of a run killed before any checkpoint
    train.train(cfg)


# -----------------------------------------------------------------------------------------------
# Stage 3: n samples per held-out problem, the same problems and seed for every model


def eval_stage(label: str, source: str, cfg: Config, n: int, folder: str, precision: dict) -> dict:
    """Evaluate one model into folder (samples.jsonl, summary.json, passk.png), or read the summary
    back when it is there, made with the same settings, and newer than the model it measures.
    (Unlike training, an evaluation is cheap to redo: other settings simply replace it.)"""
    task = cfg.eval_task or cfg.task  # as train.py: the test split of the training task unless told otherwise
    ks = sorted({round(2 ** (j / 4)) for j in range(4 * int(math.log2(n)) + 1)} | set(default_ks(n)))  # 1..n, even on log x
    wanted = {"n": n, "ks": ks, "num_problems": cfg.eval_problems, "max_new_tokens": cfg.max_new_tokens,
              "temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P, "task": task, "seed": cfg.seed, "label": label}
    # (the label names the model; a changed --model or alpha is refused earlier, by the training stages)
    summary = os.path.join(folder, "summary.json")
    model_file = os.path.join(source, "model.safetensors")  # a checkpoint retrained since makes its evaluation stale
    if os.path.isfile(summary) and not (os.path.isfile(model_file) and os.path.getmtime(model_file) > os.path.getmtime(summary)):
        result = load_summary(folder)
        if all(result.get(k) == v for k, v in wanted.items()):
            print(f"{folder}: evaluated earlier, skipped")
            return result
    problems = train.held_out_problems(cfg)  # as train.py: a local --task file gives its held-out share
    if len(problems) < cfg.eval_problems:  # arith:1 has ~30 test problems: ask for fewer rather than mislabel
        raise ValueError(f"{task} has only {len(problems)} test problems: pass --eval_problems {len(problems)}")
    if not precision:  # decided once, as train.py does: float32 weights, autocast where it is faster
        device = train.pick_device(cfg.device)
        precision.update(device=device, amp_dtype=train.choose_precision(device, cfg.dtype))
    model, tokenizer = load_model(source, device=precision["device"], dtype=torch.float32)
    with train.autocast(precision["device"], precision["amp_dtype"]):
        result = evaluate(model, tokenizer, problems, n, ks, EVAL_TEMPERATURE, EVAL_TOP_P, cfg.max_new_tokens,
                          cfg.eval_batch, cfg.seed, out_dir=folder, progress=cfg.progress,
                          info={"label": label, "task": task, "seed": cfg.seed, "source": source},
                          cuda_graph={"auto": None, "true": True, "false": False}[cfg.cuda_graph])
    del model
    gc.collect()
    return result


def timed(out: str, stage: str, fn):
    """Run a stage and add its wall time to OUT/minutes.json, even when it is interrupted: a stage
    resumed after lunch counts both parts, so the total is the compute a user waited for."""
    path = os.path.join(out, "minutes.json")
    minutes = json.load(open(path)) if os.path.isfile(path) else {}
    t0 = time.time()
    try:
        return fn()
    finally:
        minutes[stage] = minutes.get(stage, 0.0) + (time.time() - t0) / 60
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(minutes, f, indent=1)


# -----------------------------------------------------------------------------------------------
# Stage 4: plots and the table


def plot_training(runs: dict, path: str):
    """curves.png: one panel per metric, one line per run, over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "reward (mean)"), ("entropy", "token entropy (nats)"), ("length", "response length (tokens)"),
              ("psi_ratio", "psi / |A| (0 without the term)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for label, folder in runs.items():
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        by_step = {r["step"]: r for r in rows if r.get("kind") == "train"}  # the last row of a step wins
        for ax, (key, title) in zip(axes, panels):
            steps = [s for s in sorted(by_step) if by_step[s].get(key) is not None]  # PPO's warm-up has no psi
            ax.plot(steps, [by_step[s][key] for s in steps], marker=".", label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict, n: int) -> str:
    """A markdown table: Pass@K at powers of 2 (pass@1 with its standard error), mean length and entropy."""
    ks = default_ks(n)
    lines = ["| model | " + " | ".join(f"pass@{k}" for k in ks) + " | mean length | mean entropy |",
             "|---|" + "---:|" * (len(ks) + 2)]
    for label, r in results.items():
        cells = [f"{r['pass_at_k'][1]:.3f} ± {r['accuracy_se']:.3f}"] + [f"{r['pass_at_k'][k]:.3f}" for k in ks[1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['mean_length']:.1f} | {r['mean_entropy']:.3f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------


def main(argv=None):
    """The command line: a bad option or folder is one line naming the fix (exit code 2), no traceback."""
    try:
        run_all(*parse(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_all(plain: Config, entropy: Config, n: int, base: Config):
    """The four stages."""
    out, task = base.out_dir, base.eval_task or base.task
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill saves the training checkpoint, like Ctrl-C
    name = plain.algo.upper()
    labels = {"start": f"{os.path.basename(os.path.normpath(plain.model))} (start)", "plain": f"{name} (alpha 0)",
              "entropy": f"{name} + entropy advantage (alpha {entropy.alpha:g})"}
    print(f"[1/4] {labels['plain']} -> {plain.out_dir}")
    timed(out, "train plain", lambda: train_stage(plain))
    print(f"[2/4] {labels['entropy']} -> {entropy.out_dir}")
    timed(out, "train entropy", lambda: train_stage(entropy))
    results, precision = {}, {}
    for i, (key, source) in enumerate([("start", plain.model), ("plain", os.path.join(plain.out_dir, "checkpoint")),
                                       ("entropy", os.path.join(entropy.out_dir, "checkpoint"))]):
        print(f"[3/4] evaluate {labels[key]} ({i + 1} of 3): {base.eval_problems} {task} problems x {n} samples")
        folder = os.path.join(out, f"eval_{key}")
        results[labels[key]] = timed(out, f"evaluate {key}", lambda: eval_stage(labels[key], source, base, n, folder, precision))
    minutes = json.load(open(os.path.join(out, "minutes.json")))
    print("[4/4] plots and tables")
    plot_curves({label: r["pass_at_k"] for label, r in results.items()}, os.path.join(out, "passk.png"),
                f"Pass@K on {base.eval_problems} held-out {task} problems (n = {n}, T = {EVAL_TEMPERATURE})")
    plot_training({labels["plain"]: plain.out_dir, labels["entropy"]: entropy.out_dir}, os.path.join(out, "curves.png"))
    md = (table(results, n) + f"\n\n{base.eval_problems} held-out `{task}` problems x {n} samples, temperature "
          f"{EVAL_TEMPERATURE}, top-p {EVAL_TOP_P}, up to {plain.max_new_tokens} new tokens; pass@1 ± its standard error "
          f"over problems. Both runs: {plain.steps} steps of {plain.prompts_per_step} prompts x {plain.group_size} samples, "
          f"seed {plain.seed}, identical but for alpha. Total {sum(minutes.values()):.0f} minutes.\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    shared = {k: v for k, v in dataclasses.asdict(plain).items() if k not in ("alpha", "out_dir")}
    keep = ("pass_at_k", "accuracy", "accuracy_se", "mean_length", "mean_entropy", "truncated", "source")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"algo": plain.algo, "n": n, "alpha": {"plain": 0.0, "entropy": entropy.alpha}, "train_config": shared,
                   "eval": {"task": task, "problems": base.eval_problems, "temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P,
                            "max_new_tokens": plain.max_new_tokens, "seed": plain.seed},
                   "models": {label: {k: r[k] for k in keep} for label, r in results.items()},
                   "minutes": {**minutes, "total": sum(minutes.values())}}, f, indent=1)
    print(md + f"wrote passk.png, curves.png, results.md and results.json to {out}")


if __name__ == "__main__":
    main()

"""
experiment.py -- the paper's question in miniature: does the entropy advantage keep the large-K
coverage (Pass@K at large K) that plain GRPO gives up? Several seeds per arm, every arm of a seed
seeing the same problems in the same order, Pass@K for K = 1..n with 95% bootstrap intervals.

    python experiment.py                           # --size cpu: 2 seeds x 2 arms, n = 32 (see the sizes below)
    python experiment.py --size gpu                # 3 seeds x 2 arms, n = 256
    python experiment.py --arms plain,entropy,entreg   # a third arm: classic entropy regularisation (Table 3)
    python experiment.py --algo ppo                # the same comparison for PPO (alpha 0.1, the paper's value)
    python experiment.py --seeds 3 --steps 40      # any train.py Config field works: --name value
    python experiment.py --help                    # this experiment's own options

The arms (--arms, comma-separated, in this order in every table):
  plain     alpha 0: plain GRPO (or PPO)
  entropy   alpha 0.4 for GRPO, 0.1 for PPO (or --alpha): the paper's entropy advantage
  entreg    alpha 0 and an entropy bonus in the loss with gradient through H (--entropy_coef, default
            1e-3, veRL's former default; the paper's Table 3 does not give its value)
Within a seed the arms' Configs differ only in alpha and entropy_coef (and out_dir), so train.py's
seeded problem draw, data order and per-step sampling seeds are shared: step 1's rollouts are
identical across arms, and the policies part from there. Seeds are --seed, --seed + 1, ...

Stages; each is skipped when its output exists, so after an interruption the same command goes on
(--overwrite true retrains every run instead). They go seed by seed, so a run stopped early leaves
whole seeds, which the same command with --seeds k reports without training or sampling anything:
  1. train each seed's arms into OUT/seed<s>/<arm>, from OUT/start_model/ when --model is a GGUF file
     (parsed once: start_model); a Ctrl-C saves a checkpoint, and the rerun resumes it
  2. evaluate the starting model once (OUT/eval_start, first of all) and every final checkpoint
     (OUT/seed<s>/eval_<arm>): n samples per held-out problem at the paper's settings (temperature
     0.6, top-p 0.95). All models answer the same problems; the runs of one seed share its sampling
     seed. Each evaluation also samples a few answers token by token for entropy_view's statistics
     of pivotal and reflective words (entropy_stats.json).
  3. the report: passk.png (Pass@K per arm with its band, and each arm minus plain), curves.png (per
     step, mean over seeds and the range across seeds), results.md and results.json

The intervals (report.bootstrap): every seed answers the same problems, so a replicate draws the
seeds with replacement and one set of problems with replacement for all of them, and averages the
per-problem Pass@K (unbiased, from n samples); 2,000 replicates, the interval their 2.5th to 97.5th
percentile. Differences are paired (the same draws for both arms: what they share cancels); the
start, evaluated once, has a band over problems only. The verdict reads one K fixed in advance:
K = 32 (report.ENDPOINT_K; n if smaller), the largest both sizes evaluate; other K only describe.

OUT is runs/experiment/<algo>-<size> unless --out_dir says otherwise.

The sizes (train.py's other defaults stay: token-level loss, clip-higher 0.2/0.28, no KL, lr 1e-5).
Both use arith:3 (two-digit sums and differences, two digits by one) with up to 192 new tokens:
docs/results.md's task measurement says why (at 192 tokens the starting model has 5% of its answers
cut off, pass@1 0.12 and pass@64 0.625). Both train at temperature 0.6 and top-p 0.95, the
evaluation's settings, not the paper's 1.0: at 1.0 SmolLM2-135M rambles (29% of its answers cut
off, 0.8% right on 32 training problems x 8), so 94% of the groups would have no reward spread and
teach nothing; at 0.6 / 0.95 it is 7% cut off and 5.5% right (docs/results.md's table). The
entropies the arms see are of that tempered policy.
  cpu  2 seeds x 2 arms x 8 steps of 4 prompts x 8 answers in 2 mini-batches (so the ratio moves off
       1 and the clip acts); 10 held-out problems x n = 32; 35 minutes on 2 cores (2026-11-28). Not a
       test of the paper's claim: a plain run of 40 steps kept a level reward (docs/results.md).
  gpu  3 seeds x 2 arms x 12 steps of 32 prompts x 8 answers in 4 mini-batches; 48 held-out problems
       x n = 256. About 10.4 minutes on an H200 from a one-seed run's stages (docs/results.md: the
       start's evaluation 1.3 min, a run 0.8-1.0 min, a trained model's evaluation 0.6 min); not
       yet run whole. Plain's training reward was still rising at step 12 there (0.06 to 0.42).
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
from entropy_view import entropy_stats, sample_answers
from evaluate import EvalSettings, cuda_graph_option, default_ks, evaluate, load_summary
from plumbing.command_line import check_context, parse_args
from plumbing.load import DEFAULT_MODEL, load_model, save_pretrained
from plumbing.precision import choose_precision
from report import (DRAWS, PANELS, bootstrap, differs, levelling, per_problem_pass_at_k, per_step, plot_passk, plot_training,
                    tables, verdict)
from tasks import held_out_problems
from train import Config

EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95  # the paper's evaluation settings
ENTROPY_PROBLEMS, ENTROPY_ANSWERS = 4, 8  # answers sampled token by token for entropy_view's statistics
ARMS = ("plain", "entropy", "entreg")
ENTREG_COEF = 1e-3  # the entreg arm's --entropy_coef unless given

# The sizes: train.py Config values, then the experiment's own (seeds, n). Flags given win.
SIZES = {
    "cpu": dict(config=dict(task="arith:3", max_new_tokens=192, temperature=0.6, top_p=0.95, steps=8, prompts_per_step=4,
                            group_size=8, mini_batches=2, eval_problems=10, eval_batch=2),
                seeds=2, n=32),
    "gpu": dict(config=dict(task="arith:3", max_new_tokens=192, temperature=0.6, top_p=0.95, steps=12, prompts_per_step=32,
                            group_size=8, mini_batches=4, eval_problems=48, eval_batch=8),
                seeds=3, n=256),
}

HELP = f"""usage: python experiment.py [--size cpu|gpu] [--seeds K] [--arms plain,entropy[,entreg]] [--n N]
                          [any train.py Config field as --name value]

  --size   cpu (default): 2 seeds x 2 arms, 8 steps of 4 x 8 answers, 10 held-out problems, n = 32;
           measured at 35 minutes on 2 CPU cores.
           gpu: 3 seeds x 2 arms, 12 steps of 32 x 8 answers, 48 held-out problems, n = 256;
           estimated at 10.4 minutes on an H200 from one seed's stages (docs/results.md).
  --seeds  seeds per arm (--seed, --seed + 1, ...)
  --arms   comma-separated, from: {", ".join(ARMS)} (plain must be one: differences are against it)
  --n      samples per held-out problem (Pass@K for K = 1..n)

Every other option is a train.py Config field (the Config at the top of train.py), applied to every run;
--alpha is the entropy arm's, --entropy_coef the entreg arm's (default {ENTREG_COEF:g});
--eval_problems and --eval_batch size the experiment's evaluation. The sizes, as the flags they stand for:
""" + "\n".join(f"  {size}  " + " ".join(f"--{k} {v}" for k, v in {**p["config"], "seeds": p["seeds"], "n": p["n"]}.items())
                for size, p in SIZES.items())


# -----------------------------------------------------------------------------------------------
# The command line: --size, --seeds, --arms, --n are ours; everything else goes through train.py's parser


@dataclasses.dataclass
class Plan:
    base: Config  # out_dir = OUT; alpha = the entropy arm's, entropy_coef = the entreg arm's; eval_* as given
    arms: list  # e.g. ["plain", "entropy"]
    seeds: list  # e.g. [0, 1]
    n: int  # samples per held-out problem
    size: str


def take_own_options(argv) -> tuple:
    """Split off --size, --seeds, --arms, --n (as --name value or --name=value) -> ({name: text}, rest)."""
    own, rest, it = {}, [], iter(argv)
    for arg in it:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name not in ("size", "seeds", "arms", "n"):
            rest.append(arg)
            continue
        own[name] = arg.split("=", 1)[1] if "=" in arg else next(it, "")
    return own, rest


def positive_int(own: dict, name: str, default: int, what: str) -> int:
    value = own.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--{name} expects a positive int ({what}), got '{value}'")
    return int(value)


def parse(argv) -> Plan:
    """argv -> Plan, every value checked before anything slow starts."""
    own, rest = take_own_options(argv)
    size = own.get("size", "cpu")
    if size not in SIZES:
        raise ValueError(f"--size must be cpu or gpu, got '{size}'")
    preset = SIZES[size]
    seeds, n = positive_int(own, "seeds", preset["seeds"], "seeds per arm"), positive_int(own, "n", preset["n"], "samples per held-out problem")
    arms = own.get("arms", "plain,entropy").split(",")
    if any(a not in ARMS for a in arms) or len(set(arms)) != len(arms) or "plain" not in arms or len(arms) < 2:
        raise ValueError(f"--arms takes plain and one or more of entropy, entreg, comma-separated, got '{own['arms']}'")
    if any(a == "--preset" or a.startswith("--preset=") for a in rest):
        raise ValueError("--preset is train.py's (one run's recipe): the experiment's sizes are --size cpu or gpu, "
                         "and any other train.py option given here applies to every run")
    overrides = parse_args(rest, Config)  # unknown or mistyped options stop here, with the valid ones listed
    if overrides.get("resume"):
        raise ValueError("--resume is not an experiment option: rerun the same command and finished stages are skipped")
    algo = overrides.get("algo", "grpo")
    base = Config(**{**preset["config"], "out_dir": os.path.join("runs", "experiment", f"{algo}-{size}"),
                     "entropy_coef": ENTREG_COEF, **overrides})
    base = train.resolve_defaults(base)  # alpha: the paper's for the algorithm unless given
    train.check_config(base)
    if os.path.exists(base.out_dir) and not os.path.isdir(base.out_dir):
        raise ValueError(f"--out_dir {base.out_dir} is a file: name a folder")
    if "entropy" in arms and base.alpha == 0:
        raise ValueError(f"--alpha 0 would make the entropy arm plain: leave it out ({train.DEFAULT_ALPHA[algo]} for {algo}) "
                         "or give a positive value")
    if "entreg" in arms and base.entropy_coef == 0:
        raise ValueError(f"--entropy_coef 0 would make the entreg arm plain: leave it out ({ENTREG_COEF:g}) or give a positive value")
    if base.eval_problems < 1:
        raise ValueError("--eval_problems must be >= 1: the evaluation needs held-out problems")
    return Plan(base, arms, list(range(base.seed, base.seed + seeds)), n, size)


def run_config(plan: Plan, arm: str, seed: int) -> Config:
    """One training run. Within a seed the arms differ only in alpha, entropy_coef and out_dir."""
    b = plan.base
    return dataclasses.replace(b, seed=seed, out_dir=os.path.join(b.out_dir, f"seed{seed}", arm),
                               alpha=b.alpha if arm == "entropy" else 0.0,
                               entropy_coef=b.entropy_coef if arm == "entreg" else 0.0,
                               eval_problems=0)  # the experiment's evaluation replaces the runs' own


# -----------------------------------------------------------------------------------------------
# Stage 1: training (train.py does all the work; we only decide between skip, resume and start)


def start_model(base: Config) -> str:
    """Where the runs and the start's evaluation load the starting model: for a GGUF file (the built-in
    SmolLM2 is one) a folder in OUT, made once, since transformers parses a GGUF in about 20 s at every
    load and a folder in 0.5 s, and the experiment loads the start 1 + seeds x arms times."""
    if base.model != DEFAULT_MODEL and not base.model.endswith(".gguf"):
        return base.model
    folder = os.path.join(base.out_dir, "start_model", os.path.basename(base.model).removesuffix(".gguf"))  # (no .gguf: a folder)
    stamp = os.path.join(folder, "made_from.json")
    made_from = json.load(open(stamp))["model"] if os.path.isfile(stamp) else None
    if made_from not in (None, base.model):
        raise ValueError(f"{folder} was made from {made_from}: pass another --out_dir, or --model {made_from}")
    if made_from:
        return folder
    save_pretrained(*load_model(base.model, device="cpu", dtype=torch.float32), folder)
    with open(stamp, "w") as f:  # written last: a folder without it was cut short and is made again
        json.dump({"model": base.model}, f)
    return folder


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
# Stage 2: n samples per held-out problem, the same problems for every model


def eval_stage(label: str, source: str, plan: Plan, seed: int, folder: str, precision) -> dict:
    """Evaluate one model into folder (samples.jsonl, summary.json, entropy_stats.json), or read the
    summary back when it is there, made with the same settings, and newer than the model it measures.
    (Unlike training, an evaluation is cheap to redo: other settings simply replace it.)"""
    cfg, n = plan.base, plan.n
    task = cfg.eval_task or cfg.task  # as train.py: the test split of the training task unless told otherwise
    ks = sorted({round(2 ** (j / 4)) for j in range(4 * int(math.log2(n)) + 1)} | set(default_ks(n)) | {n})  # 1..n, even on log x
    wanted = {"n": n, "ks": ks, "num_problems": cfg.eval_problems, "max_new_tokens": cfg.max_new_tokens,
              "temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P, "task": task, "seed": seed, "label": label,
              "precision": precision.name}  # one made in another precision is redone
    # (the label names the model; a changed --model or alpha is refused earlier, by the training stages)
    summary, stats_file = os.path.join(folder, "summary.json"), os.path.join(folder, "entropy_stats.json")
    model_file = os.path.join(source, "model.safetensors")  # a checkpoint retrained since makes its evaluation stale
    if os.path.isfile(stats_file) and os.path.isfile(summary) and not (os.path.isfile(model_file) and os.path.getmtime(model_file) > os.path.getmtime(summary)):
        result = load_summary(folder)
        if all(result.get(k) == v for k, v in wanted.items()):
            print(f"{folder}: evaluated earlier, skipped")
            return result
    problems = held_out_problems(cfg)  # the base seed's: one problem set for every seed and arm
    if len(problems) < cfg.eval_problems:  # arith:1 has ~30 test problems: ask for fewer rather than mislabel
        raise ValueError(f"{task} has only {len(problems)} test problems: pass --eval_problems {len(problems)}")
    model, tokenizer = load_model(source, device=precision.device, dtype=torch.float32)
    check_context(model, tokenizer, problems, cfg.max_new_tokens, "--max_new_tokens")  # lengths vs the model's context
    graphs = cuda_graph_option(cfg.cuda_graph, cfg.device)
    with precision.autocast():
        settings = EvalSettings(n=n, ks=ks, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, max_new_tokens=cfg.max_new_tokens,
                                batch_prompts=cfg.eval_batch, seed=seed, cuda_graph=graphs, progress=cfg.progress)
        info = dict(label=label, task=task, seed=seed, source=source, precision=precision.name)
        result = evaluate(model, tokenizer, problems, settings, out_dir=folder, info=info)
        # token by token, for entropy_view's word groups (evaluate keeps only each answer's mean entropy)
        answers = sample_answers(model, tokenizer, problems[:ENTROPY_PROBLEMS], dataclasses.replace(settings, n=ENTROPY_ANSWERS))
    with open(stats_file, "w") as f:
        json.dump(entropy_stats([a.tokens for a in answers], [a.entropies for a in answers]), f, indent=1)
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


def main(argv=None):
    """The command line: a bad option or folder is one line naming the fix (exit code 2), no traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(HELP)
        return
    try:
        run_all(parse(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_all(plan: Plan):
    """The three stages."""
    base, out = plan.base, plan.base.out_dir
    task = base.eval_task or base.task
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill saves the training checkpoint, like Ctrl-C
    name = base.algo.upper()
    labels = {"plain": f"{name} (alpha 0)", "entropy": f"{name} + entropy advantage (alpha {base.alpha:g})",
              "entreg": f"{name} + entropy regularisation (coef {base.entropy_coef:g})"}
    start_label = f"{os.path.basename(os.path.normpath(base.model))} (start)"
    plan = dataclasses.replace(plan, base=dataclasses.replace(base, model=timed(out, "start model", lambda: start_model(base))))
    base = plan.base
    runs = {(arm, s): run_config(plan, arm, s) for s in plan.seeds for arm in plan.arms}
    precision, results = choose_precision(base.device, base.dtype), {}  # train.py's choice, once
    evals = [("start", None, base.model, os.path.join(out, "eval_start"))]
    evals += [(arm, s, os.path.join(cfg.out_dir, "checkpoint"), os.path.join(out, f"seed{s}", f"eval_{arm}")) for (arm, s), cfg in runs.items()]

    def evaluate_one(i, arm, s, source, folder):
        label = start_label if arm == "start" else f"{labels[arm]}, seed {s}"
        print(f"[2/3] evaluate {label} ({i + 1} of {len(evals)}): {base.eval_problems} {task} problems x {plan.n} samples")
        seed = base.seed if s is None else s
        results[arm, s] = timed(out, f"evaluate {arm}" + ("" if s is None else f" seed {s}"),
                                lambda: eval_stage(label, source, plan, seed, folder, precision))

    # The starting model first: its evaluation also checks the held-out prompts against the model's
    # context (check_context), which should fail in a minute, not after an hour of training.
    evaluate_one(0, *evals[0])
    for seed in plan.seeds:  # seed by seed: a run cut short leaves whole seeds, which --seeds k reports
        for i, ((arm, s), cfg) in enumerate(runs.items()):
            if s == seed:
                print(f"[1/3] train {labels[arm]}, seed {s} ({i + 1} of {len(runs)}) -> {cfg.out_dir}")
                timed(out, f"train {arm} seed {s}", lambda: train_stage(cfg))
        for i, ev in enumerate(evals):
            if ev[1] == seed:
                evaluate_one(i, *ev)
    ks = results["start", None]["ks"]
    print("[3/3] statistics, plots and tables")
    report(plan, labels, start_label, runs, evals, results, ks)


def report(plan: Plan, labels: dict, start_label: str, runs: dict, evals: list, results: dict, ks: list):
    """results.md, results.json, passk.png, curves.png."""
    base, out, n = plan.base, plan.base.out_dir, plan.n
    task = base.eval_task or base.task
    values = {"start": per_problem_pass_at_k(results["start", None], ks)[None]}  # (1, Q, K)
    values.update({arm: torch.stack([per_problem_pass_at_k(results[arm, s], ks) for s in plan.seeds]) for arm in plan.arms})
    curves = {(start_label if arm == "start" else labels[arm]): bootstrap(v) for arm, v in values.items()}
    diffs = {f"{labels[arm]} minus plain": bootstrap(values[arm] - values["plain"]) for arm in plan.arms if arm != "plain"}
    stats = {start_label: [json.load(open(os.path.join(out, "eval_start", "entropy_stats.json")))]}
    stats.update({labels[arm]: [json.load(open(os.path.join(out, f"seed{s}", f"eval_{arm}", "entropy_stats.json")))
                                for s in plan.seeds] for arm in plan.arms})
    folders = {labels[arm]: [runs[arm, s].out_dir for s in plan.seeds] for arm in plan.arms}
    minutes = json.load(open(os.path.join(out, "minutes.json")))
    plot_passk(curves, diffs, ks, os.path.join(out, "passk.png"),
               f"Pass@K, {base.eval_problems} held-out {task} problems, n = {n}, {len(plan.seeds)} seeds (95% bootstrap band)")
    plot_training(folders, os.path.join(out, "curves.png"))
    levelled, levelling_record = levelling(folders[labels["plain"]])  # has plain's training reward levelled off?
    answers = {label: [r for (a, _), r in results.items() if a == arm]  # each model's evaluations
               for arm, label in zip(values, curves)}
    md = (tables(curves, diffs, ks, n, stats, answers) + f"\n\n{base.eval_problems} held-out `{task}` problems x {n} samples, "
          f"temperature {EVAL_TEMPERATURE}, top-p {EVAL_TOP_P}, up to {base.max_new_tokens} new tokens. Each cell: the mean "
          f"over {len(plan.seeds)} seeds (the start: one evaluation) and problems, and its 95% bootstrap interval (seeds, "
          f"and problems crossed with them, resampled; differences paired). Entropy of word groups: {ENTROPY_PROBLEMS} "
          f"problems x {ENTROPY_ANSWERS} answers per model, mean over seeds (count: tokens in all seeds). Each run: "
          f"{base.steps} steps of {base.prompts_per_step} prompts x {base.group_size} answers in {base.mini_batches} "
          f"mini-batches, lr {base.lr:g}, seeds {', '.join(map(str, plan.seeds))}. Total {sum(minutes.values()):.0f} minutes.\n\n"
          f"{levelled}\n\n"
          f"Verdict: {verdict(diffs, ks)}\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    shared = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("alpha", "entropy_coef", "out_dir", "seed")}
    strip = lambda c: {k: c[k] for k in ("mean", "low", "high")}  # noqa: E731  (the replicates stay out of the file)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"algo": base.algo, "size": plan.size, "n": n, "ks": ks, "seeds": plan.seeds, "arms": plan.arms,
                   "alpha": base.alpha, "entropy_coef": base.entropy_coef, "train_config": shared,
                   "eval": {"task": task, "problems": base.eval_problems, "temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P,
                            "max_new_tokens": base.max_new_tokens, "bootstrap_draws": DRAWS},
                   "pass_at_k": {label: strip(c) for label, c in curves.items()},
                   "difference": {label: {**strip(d), **differs(d, ks)} for label, d in diffs.items()},
                   "models": {f"{arm} seed {s}": {k: results[arm, s][k] for k in
                                                  ("accuracy", "accuracy_se", "mean_length", "mean_entropy", "truncated", "correct_counts")}
                              for arm, s, _, _ in evals},
                   "per_step": {label: {key: dict(zip(("steps", "mean", "min", "max"), per_step(fs, key))) for key, _ in PANELS}
                                for label, fs in folders.items()},
                   "plain_reward": levelling_record,
                   "entropy_stats": {label: [{g: s["groups"][g] for g in ("pivotal", "reflective", "other", "all")} for s in per_seed]
                                     for label, per_seed in stats.items()},
                   "minutes": {**minutes, "total": sum(minutes.values())}}, f, indent=1)
    print(md + f"wrote passk.png, curves.png, results.md and results.json to {out}")


if __name__ == "__main__":
    main()

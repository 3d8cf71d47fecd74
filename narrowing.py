"""
narrowing.py -- the paper's premise on a laptop: does plain GRPO narrow what the model can reach?
(Its Table 2: GRPO raises Pass@1 and lowers Pass@K at large K, AIME24 Pass@256 66.7 -> 46.7.) Plain
GRPO trains many epochs over a small fixed pool of problems; Pass@1 and Pass@K on that same pool,
and on held-out problems beside it, are measured at the start and every E steps, with 95% intervals.

    python narrowing.py                # one seed: 32 arith:2 problems, 32 steps, evaluated every 16
    python narrowing.py --seeds 3      # the study: an interval over seeds as well as problems
    python narrowing.py --lr 3e-5 --out_dir runs/narrowing/lr3e-5   # a lever: any train.py option
    python narrowing.py --eps_high 0.2 --out_dir runs/narrowing/sym # symmetric clip, no clip-higher
    python narrowing.py --help         # the study's own options and its defaults

The stages; each is skipped when its output is there, so the same command run again goes on where
it stopped and redoes nothing (an --out_dir holding a study of other settings is refused, unless
--overwrite true, which clears it):
  1. the pool: --pool problems of --task (arith[:LEVEL]) from its training split, drawn with --seed,
     OUT/pool.jsonl, given to train.py as both --task and --eval_task (so none of it is held back);
     the held-out set: --eval_problems problems of the test split, OUT/held_out.jsonl
  2. the start, evaluated once on both sets (OUT/start/): --n answers per problem at the paper's
     evaluation settings, temperature 0.6 and top-p 0.95; every seed is compared with it
  3. per seed (--seed, --seed + 1, ...): plain GRPO (alpha 0 unless --alpha is given) in segments of
     --every steps, each a train.train() call resuming the last one's checkpoint, kept with its
     optimiser state (keep_optimizer): train.py's resume is exact, so the segments make the same
     run as one call of --steps steps. Each checkpoint is evaluated on both sets, into
     OUT/seed<s>/step<t>/; after the seed's last, it is deleted (metrics.jsonl stays; SmolLM2-135M's
     checkpoint is 1.6 GB with AdamW's moments).
  4. the report (results.md, results.json, printed): per checkpoint, Pass@1 and Pass@K at K = n as
     differences from the start with 95% intervals from report.bootstrap (seeds and problems
     crossed; the start subtracted problem by problem), beside the token entropy, length and share
     cut off of the evaluation's answers and the segment's training reward and entropy.

The verdict reads one place fixed in advance: the pool, the last step, K = n. "narrowed" only when
Pass@K falls below the start's beyond its 95% interval while Pass@1 rises beyond its own (the
held-out set's sentence is description). Reading every step and K for one that narrowed would find
one by chance. With one seed (the default) the interval is over problems only.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import sys

import torch

import train
from evaluate import EvalSettings, cuda_graph_option, evaluate, load_summary
from experiment import EVAL_TEMPERATURE, EVAL_TOP_P, positive_int, start_model, timed
from plumbing.checkpoints import read_trainer_state
from plumbing.command_line import check_context, parse_args
from plumbing.load import load_model
from plumbing.precision import choose_precision
from report import bootstrap, per_problem_pass_at_k
from tasks import load_problems
from train import Config

# The defaults: hand pilot (b) of docs/narrowing.md, its pool doubled; 3 evaluations, not 5: time
DEFAULTS = dict(task="arith:2", steps=32, prompts_per_step=4, group_size=8, mini_batches=4,
                lr=1.5e-5, max_new_tokens=64, temperature=0.6, top_p=0.95, alpha=0.0,
                eval_problems=16, eval_batch=4, out_dir=os.path.join("runs", "narrowing"))
OWN = dict(seeds=1, n=32, pool=32, every=16)  # the study's own options, and their defaults
SETS = ("pool", "held_out")

HELP = f"""usage: python narrowing.py [--seeds S] [--n N] [--pool P] [--every E]
                          [any train.py Config field as --name value]

  --seeds  seeds (--seed, --seed + 1, ...), default {OWN['seeds']}; 3 for an interval over seeds too
  --n      answers sampled per problem at each evaluation; Pass@K at K = n (default {OWN['n']})
  --pool   problems trained on, every step drawing from them (default {OWN['pool']})
  --every  steps between evaluations: E; --steps must be a multiple of it (default {OWN['every']})

Every other option is a train.py Config field, applied to every seed (--lr, --mini_batches,
--eps_high 0.2 for symmetric clipping, --max_new_tokens, --temperature, --task arith:LEVEL, ...);
--eval_problems is the size of the held-out set, --eval_batch the problems per sampling call,
--out_dir the study's folder, --overwrite true replaces a study of other settings there. Defaults:
  """ + " ".join(f"--{k} {v}" for k, v in DEFAULTS.items())


# -----------------------------------------------------------------------------------------------
# The command line: --seeds, --n, --pool, --every are ours; everything else is a train.py option


@dataclasses.dataclass
class Study:
    base: Config  # alpha 0 unless given; eval_problems = the held-out set's size
    seeds: list  # e.g. [0, 1, 2]
    n: int  # answers per problem at each evaluation
    pool: list  # the Problems trained on
    held_out: list  # the Problems of the test split evaluated beside them
    every: int  # E: steps per segment

    @property
    def steps(self) -> list:
        """The checkpoints evaluated: E, 2E, ..., S (the start, step 0, is evaluated once)."""
        return list(range(self.every, self.base.steps + 1, self.every))


def parse(argv) -> Study:
    """argv -> Study, every value checked (and the problems drawn) before anything slow starts."""
    own, rest, it = {}, [], iter(argv)
    for arg in it:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in OWN:
            own[name] = arg.split("=", 1)[1] if "=" in arg else next(it, "")
        else:
            rest.append(arg)
    seeds, n, size, every = (positive_int(own, k, OWN[k], what) for k, what in (
        ("seeds", "seeds"), ("n", "answers per problem"), ("pool", "problems trained on"),
        ("every", "steps between evaluations")))
    overrides = parse_args(rest, Config)  # unknown or mistyped options stop here, valid ones listed
    for name in ("resume", "eval_task"):
        if name in overrides:
            raise ValueError(f"--{name} is not a narrowing.py option: the study trains on its own "
                             "pool and goes on by itself when the same command runs again")
    base = train.resolve_defaults(Config(**{**DEFAULTS, **overrides}))
    train.check_config(base)
    if not re.fullmatch(r"arith(:\d+)?", base.task):
        raise ValueError(f"--task must be arith or arith:LEVEL (the pool and the held-out set "
                         f"are drawn from its two splits), got '{base.task}'")
    if base.steps < every or base.steps % every:
        raise ValueError(f"--steps {base.steps} must be a multiple of --every {every}: the study "
                         f"evaluates after steps {every}, {2 * every}, ...")
    if size < base.prompts_per_step:
        raise ValueError(f"--pool {size} is smaller than one step's --prompts_per_step "
                         f"{base.prompts_per_step}: raise --pool or lower --prompts_per_step")
    if base.eval_problems < 1:
        raise ValueError("--eval_problems must be >= 1: the held-out set stands beside the pool")
    if os.path.exists(base.out_dir) and not os.path.isdir(base.out_dir):
        raise ValueError(f"--out_dir {base.out_dir} is a file: name a folder")
    pool = load_problems(base.task, split="train", limit=size, seed=base.seed)
    held_out = load_problems(base.task, split="test", limit=base.eval_problems, seed=base.seed)
    asked = {"--pool": (pool, size), "--eval_problems": (held_out, base.eval_problems)}
    for flag, (got, want) in asked.items():
        if len(got) < want:  # arith:1 has about 30 problems a split
            raise ValueError(f"{base.task} has only {len(got)} for {flag}: pass {flag} {len(got)}")
    return Study(base, list(range(base.seed, base.seed + seeds)), n, pool, held_out, every)


def settings(study: Study) -> dict:
    """What makes two studies the same one: every setting but the number of seeds (a rerun with
    more seeds adds them) and how it is shown or replaced."""
    cfg = dataclasses.asdict(dataclasses.replace(study.base, overwrite=False, progress=True))
    return {**cfg, "n": study.n, "pool": len(study.pool), "every": study.every}


# -----------------------------------------------------------------------------------------------
# Stage 1: the folder and the pool


def claim(study: Study, out: str):
    """One study per folder: refuse one of other settings unless --overwrite true, which clears
    what a study writes there (the converted start model stays: start_model checks its source)."""
    path, wanted = os.path.join(out, "study.json"), settings(study)
    saved = json.load(open(path)) if os.path.isfile(path) else {}
    if not saved and os.path.isdir(out) and os.listdir(out) and not study.base.overwrite:
        raise ValueError(f"{out} holds something other than a study: pass another --out_dir")
    diff = [f"{k}: {saved.get(k)} there, {v} now" for k, v in wanted.items() if saved.get(k) != v]
    if saved and diff and not study.base.overwrite:
        raise ValueError(f"{out} holds a study of other settings ({'; '.join(diff)}): pass "
                         "--overwrite true to replace it, or another --out_dir")
    if study.base.overwrite and os.path.isdir(out):
        for name in os.listdir(out):
            if name in ("study.json", "pool.jsonl", "held_out.jsonl", "start", "results.md",
                        "results.json", "minutes.json") or re.fullmatch(r"seed\d+", name):
                target = os.path.join(out, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(wanted, f, indent=1)
    for name, problems in (("pool", study.pool), ("held_out", study.held_out)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:  # the pool is train.py's --task
            f.writelines(json.dumps(dataclasses.asdict(p)) + "\n" for p in problems)


# -----------------------------------------------------------------------------------------------
# Stage 2: n answers per problem of both sets, the start once, each checkpoint after it


def whole(folder: str) -> bool:
    """Is one set's evaluation there, whole (a Ctrl-C's is marked partial by evaluate)?"""
    summary = os.path.join(folder, "summary.json")
    return os.path.isfile(summary) and not load_summary(folder).get("partial")


def evaluate_model(study: Study, source: str, seed: int, folder: str, precision) -> dict:
    """{set: evaluate's summary} for the model in `source`, written to folder/pool and
    folder/held_out; a set whose whole summary is there already is read back, not sampled again."""
    cfg, results, todo = study.base, {}, []
    for name, problems in zip(SETS, (study.pool, study.held_out)):
        sub = os.path.join(folder, name)
        if whole(sub):
            results[name] = load_summary(sub)
        else:
            todo.append((name, problems, sub))
    if not todo:
        return results
    model, tokenizer = load_model(source, device=precision.device, dtype=torch.float32)
    both = study.pool + study.held_out
    check_context(model, tokenizer, both, cfg.max_new_tokens, "--max_new_tokens")  # vs its context
    graphs = cuda_graph_option(cfg.cuda_graph, cfg.device)
    s = EvalSettings(n=study.n, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, seed=seed,
                     max_new_tokens=cfg.max_new_tokens, batch_prompts=cfg.eval_batch,
                     cuda_graph=graphs, progress=cfg.progress)  # K = 1, 2, 4, ..., n
    with precision.autocast():
        for name, problems, sub in todo:
            print(f"evaluate {source}: {len(problems)} {name} problems x {study.n} answers")
            info = dict(source=source, set=name, seed=seed, precision=precision.name)
            results[name] = evaluate(model, tokenizer, problems, s, out_dir=sub, info=info)
    return results


# -----------------------------------------------------------------------------------------------
# Stage 3: a seed's segments, each resuming the last one's checkpoint


def run_config(study: Study, out: str, seed: int, steps: int) -> Config:
    """The run of one seed, up to `steps`: the pool is its task and its --eval_task (so train.py
    holds none of it back), and train.py's own greedy evaluation is off (ours replaces it)."""
    pool = os.path.join(out, "pool.jsonl")
    return dataclasses.replace(study.base, seed=seed, steps=steps, task=pool, eval_task=pool,
                               out_dir=os.path.join(out, f"seed{seed}", "run"), eval_problems=0,
                               keep_optimizer=True, overwrite=False, resume="")


def checkpoint_step(ckpt: str):
    """The step a checkpoint folder holds, or None when there is none."""
    if not os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        return None
    return read_trainer_state(ckpt, mmap=True, map_location="cpu")["step"]


def train_segment(cfg: Config):
    """Bring the run to cfg.steps: from the checkpoint when there is one (the last segment's, or a
    Ctrl-C's part of this one), else from the start (clearing what a run killed before its first
    checkpoint left). A checkpoint at cfg.steps already only waits for its evaluation."""
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    at = checkpoint_step(ckpt)
    if at == cfg.steps:
        return
    if at is not None and at > cfg.steps:
        raise ValueError(f"{ckpt} is at step {at}, past step {cfg.steps} whose evaluation is "
                         "missing: pass --overwrite true to run the study again")
    go_on = dict(resume=ckpt) if at is not None else dict(overwrite=True)  # (train.py clears)
    train.train(dataclasses.replace(cfg, **go_on))


def run_all(study: Study) -> dict:
    """The four stages; returns results.json's contents."""
    base, out = study.base, study.base.out_dir
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, a kill: a checkpoint
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    claim(study, out)
    study = dataclasses.replace(study, base=dataclasses.replace(
        base, model=timed(out, "start model", lambda: start_model(base))))
    precision = choose_precision(base.device, base.dtype)
    results = {"start": timed(out, "evaluate start", lambda: evaluate_model(
        study, study.base.model, base.seed, os.path.join(out, "start"), precision))}
    for seed in study.seeds:
        for step in study.steps:
            folder = os.path.join(out, f"seed{seed}", f"step{step}")
            cfg = run_config(study, out, seed, step)
            if not all(whole(os.path.join(folder, s)) for s in SETS):  # (else: read back below)
                print(f"seed {seed}: train to step {step} of {base.steps} -> {cfg.out_dir}")
                timed(out, f"train seed {seed}", lambda: train_segment(cfg))
            results[seed, step] = timed(out, f"evaluate seed {seed}", lambda: evaluate_model(
                study, os.path.join(cfg.out_dir, "checkpoint"), seed, folder, precision))
        shutil.rmtree(os.path.join(out, f"seed{seed}", "run", "checkpoint"), ignore_errors=True)
    return report(study, results)


# -----------------------------------------------------------------------------------------------
# Stage 4: differences from the start, their intervals, the verdict


def differences(start: dict, ends: list, n: int) -> dict:
    """One set's evaluations at one step -> Pass@1 and Pass@n, each as {mean, diff: {mean, low,
    high}}. start: the start's summary; ends: one summary per seed, the same problems in the same
    order. The start is subtracted problem by problem, so the bootstrap's shared problem draw
    pairs each checkpoint with it; seeds and problems are crossed (report.bootstrap)."""
    ks = [1, n]
    before = per_problem_pass_at_k(start, ks)  # (Q, 2)
    after = torch.stack([per_problem_pass_at_k(r, ks) for r in ends])  # (S, Q, 2)
    d = bootstrap(after - before[None])
    means = after.mean(dim=(0, 1)).tolist()
    return {name: {"mean": means[i], "diff": {k: d[k][i] for k in ("mean", "low", "high")}}
            for i, name in enumerate(("pass_at_1", "pass_at_k"))}


def verdict(pass_at_1: dict, pass_at_k: dict, k: int) -> str:
    """The sentence, from the last step's differences from the start ({mean, low, high} each):
    "narrowed" only when Pass@K fell beyond its 95% interval (high < 0) while Pass@1 rose beyond
    its own (low > 0); else "not narrowed", and which half was missing."""
    def said(name, d):
        return f"{name} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    rose, fell = pass_at_1["low"] > 0, pass_at_k["high"] < 0
    one, many = said("Pass@1", pass_at_1), said(f"Pass@{k}", pass_at_k)
    if rose and fell:
        return f"narrowed: {one} rose and {many} fell, each beyond its 95% interval"
    return (f"not narrowed: {one} {'rose' if rose else 'did not rise'} beyond its 95% interval; "
            f"{many} {'fell' if fell else 'did not fall'} beyond its own")


def training(out: str, seeds: list, step: int, every: int) -> dict:
    """The segment ending at `step`: mean training reward and token entropy, its steps and seeds."""
    files = [os.path.join(out, f"seed{s}", "run", "metrics.jsonl") for s in seeds]
    rows = [json.loads(line) for file in files for line in open(file)]
    rows = [r for r in rows if r.get("kind") == "train" and step - every < r["step"] <= step]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("reward", "entropy")}


def report(study: Study, results: dict) -> dict:
    """results.json and results.md in OUT, the table printed."""
    out, n, seeds = study.base.out_dir, study.n, study.seeds
    rows = []
    for step in [0] + study.steps:
        row = {"step": step, "training": training(out, seeds, step, study.every) if step else None}
        for name in SETS:
            start = results["start"][name]
            ends = [results[s, step][name] for s in seeds] if step else [start]
            cell = differences(start, ends, n)
            cell.update({k: sum(r[k] for r in ends) / len(ends)
                         for k in ("mean_entropy", "mean_length", "truncated")})
            row[name] = cell
        rows.append(row)
    ends = {s: (rows[-1][s]["pass_at_1"]["diff"], rows[-1][s]["pass_at_k"]["diff"]) for s in SETS}
    said = {s: verdict(*ends[s], n) for s in SETS}  # the last step's differences from the start
    minutes, b = json.load(open(os.path.join(out, "minutes.json"))), study.base
    result = {"settings": settings(study), "seeds": seeds, "endpoint_k": n, "rows": rows,
              "epochs": b.steps * b.prompts_per_step / len(study.pool), "steps": [0] + study.steps,
              "verdict": said["pool"], "held_out_verdict": said["held_out"],
              "minutes": {**minutes, "total": sum(minutes.values())}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(study, result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(md + f"\nwrote results.md and results.json to {out}")
    return result


def markdown(study: Study, result: dict) -> str:
    """Two tables (Pass@1 and Pass@n; entropy, length, cut-off share, training), the verdict."""
    n, b = study.n, study.base

    def cell(c, step):  # the start: its value; a checkpoint: its value, its change from the start
        d = c["diff"]
        change = f" ({d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])" if step else ""
        return f"{c['mean']:.3f}{change}"

    lines = [f"| step | pool Pass@1 | pool Pass@{n} | held-out Pass@1 | held-out Pass@{n} |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | " + " | ".join(cell(r[s][k], r["step"]) for s in SETS
                                               for k in ("pass_at_1", "pass_at_k")) + " |"
              for r in result["rows"]]
    lines += ["", "| step | training reward | training entropy | pool: entropy, length, cut off | "
              "held-out: entropy, length, cut off |", "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        t = r["training"]
        side = " | ".join(f"{r[s]['mean_entropy']:.3f}, {r[s]['mean_length']:.1f}, "
                          f"{100 * r[s]['truncated']:.1f}%" for s in SETS)
        trained = f"{t['reward']:.3f} | {t['entropy']:.3f}" if t else "- | -"
        lines.append(f"| {r['step']} | {trained} | {side} |")
    seeds = ", ".join(map(str, result["seeds"]))
    return "\n".join(lines) + (
        f"\n\nEach cell: the mean over seeds ({seeds}) and problems; after it, the difference from "
        f"the start and its 95% bootstrap interval (seeds and problems crossed). Pool: "
        f"{len(study.pool)} `{b.task}` training problems, {result['epochs']:g} epochs; held-out: "
        f"{len(study.held_out)} of its test split. {n} answers a problem at temperature "
        f"{EVAL_TEMPERATURE}, top-p {EVAL_TOP_P}, up to {b.max_new_tokens} new tokens; K = n, "
        f"fixed in advance. Training: {b.steps} steps of {b.prompts_per_step} prompts x "
        f"{b.group_size} answers, {b.mini_batches} mini-batches, lr {b.lr:g}, alpha {b.alpha:g}, "
        f"clip {b.eps_low:g}/{b.eps_high:g}, temperature {b.temperature:g}, top-p {b.top_p:g}, "
        f"evaluated every {study.every} steps. Entropy (nats), length (tokens), cut off (share at "
        f"the budget): the evaluation's answers; training: the mean over the segment's steps. "
        f"{result['minutes']['total']:.0f} minutes in all.\n\n"
        f"Verdict (pool, step {b.steps}, K = {n}): {result['verdict']}.\n"
        f"Held-out, the same rule, as description: {result['held_out_verdict']}.\n")


def main(argv=None):
    """The command line: a bad option or folder is one line naming the fix (exit code 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(HELP)
        return None
    try:
        return run_all(parse(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # in an evaluation (training's own Ctrl-C saves and exits 130)
        print("\ninterrupted: run the same command again to go on from here", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

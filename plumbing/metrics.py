"""
plumbing/metrics.py -- what a run reports while it runs: metrics.jsonl, TensorBoard or W&B, warnings, plots.

train.py's loop makes one record a step (reward, entropy, length, the update's statistics, timings)
and hands it to these:

    Watch           reads each record and says in plain words what looks wrong, with the fix
    MetricsLogger   appends it to metrics.jsonl (the record of truth), and with --log to TensorBoard or W&B
    plot_metrics()  plots.png from metrics.jsonl, at the end of a run (experiment.py's curves.png too)
    summarise()     summary.json from metrics.jsonl's evaluations at the start and the end
"""

import dataclasses
import importlib.util
import json
import math
import os

# -----------------------------------------------------------------------------------------------
# "Is it learning?": plain-language warnings while it runs, each with its fix


class Watch:
    """Reads each step's record and says what looks wrong. check() returns this step's warnings
    (they go into metrics.jsonl's `warnings`); a warning is printed when it starts, not every step.
    At the start of a run it says once what the token budget means for the reward."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.no_spread = self.no_reward = 0  # consecutive steps
        self.active = set()  # kinds of warning raised last step
        # Most answers may be cut off at first (the CPU demo's budget is short, for speed). That
        # is no fault to fix: they score 0, so the run learns to finish in time. Said once.
        n = cfg.max_new_tokens
        print(f"note: an answer cut off at --max_new_tokens {n} scores 0 (it never gave its "
              f"final answer), so the run learns to answer within {n} tokens; a short budget "
              "keeps a step fast (the paper's is 8K)")

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
        if record["truncated"] > 0.5 and self.no_spread >= 3:  # a fault when it leaves no signal
            found["truncated"] = (f"{100 * record['truncated']:.0f}% of the answers were cut off "
                                  f"at --max_new_tokens {cfg.max_new_tokens} (scored 0), leaving "
                                  "groups no reward spread: raise --max_new_tokens")
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
# Logging and plots


def log_metrics(out_dir: str, record: dict):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out_dir: str) -> list:
    """metrics.jsonl's rows; none when a run ended before its first (--steps 0, no evaluation)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []


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


RUNNING_MEAN = 4  # steps in plots.png's running mean of the training reward


def running_mean(values: list, window: int) -> list:
    """Each value averaged with the window - 1 values before it (fewer at the start)."""
    sums = [sum(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]
    return [total / min(i + 1, window) for i, total in enumerate(sums)]


def plot_metrics(out_dir: str):
    """plots.png: the training reward (each step, and its running mean: one step's few answers are
    noisy), entropy, response length, psi/|A|, the held-out greedy pass@1 with its standard error
    (the number to trust), and the critic's for PPO. Returns the figure (closed), for the tests."""
    rows = read_metrics(out_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    panels = [("reward", "training reward (mean of a step's answers)"),
              ("entropy", "token entropy (nats)"), ("length", "response length (tokens)"),
              ("psi_ratio", "psi / |A|")]
    if "value_loss" in train[-1]:
        panels += [("value_loss", "critic value loss"), ("explained_variance", "critic explained variance")]
    curves = {}
    for key, _ in panels:
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        curves[key] = ([p[0] for p in pts], [p[1] for p in pts], None, None)
    steps, rewards = curves["reward"][:2]
    smooth = {"reward": (steps, running_mean(rewards, RUNNING_MEAN), None, None)}
    if evals:
        acc, se = [r["accuracy"] for r in evals], [r["accuracy_se"] for r in evals]
        panels.insert(1, ("held_out", "held-out greedy pass@1 (+- 1 standard error)"))  # 2nd panel
        curves["held_out"] = ([r["step"] for r in evals], acc, [a - e for a, e in zip(acc, se)],
                              [a + e for a, e in zip(acc, se)])
    lines = {"each step": curves, f"running mean of {RUNNING_MEAN} steps": smooth}
    rows = 1 if len(panels) <= 4 else 2
    return plot_panels(os.path.join(out_dir, "plots.png"), panels, lines, rows, bars=("held_out",))


def plot_panels(path: str, panels: list, lines: dict, rows: int = 1, bars: tuple = ()):
    """The one way training curves are drawn (plots.png here, report.py's curves.png): a panel per
    (key, title) of `panels`, in `rows` rows, and in each a line per label of
    lines = {label: {key: (steps, values, low, high)}} that has the key, shaded from low to high
    (None: no band), or with error bars from low to high for the keys in `bars` (a few measured
    points, where a band would invent the values in between). Returns the figure, saved, closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = -(-len(panels) // rows)  # ceiling division
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    for label, curves in lines.items():
        for ax, (key, title) in zip(axes.flat, panels):
            if key not in curves:
                continue
            steps, values, low, high = curves[key]
            if key in bars:
                below = [v - lo for v, lo in zip(values, low)]
                above = [hi - v for v, hi in zip(values, high)]
                ax.errorbar(steps, values, yerr=[below, above], marker="o", capsize=3, label=label)
            else:
                line, = ax.plot(steps, values, marker=".", label=label)
                if low is not None:
                    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")  # the grid's spare cells
    if len(lines) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def summarise(cfg, precision, minutes: float, ckpt_dir: str) -> dict:
    """summary.json, written and returned; with evaluations at the start and the end, the change in
    standard errors. Both are read from metrics.jsonl's eval rows, the record of truth, so a run
    stopped and resumed into its folder still compares its end with its start."""
    evals = {r["step"]: r for r in read_metrics(cfg.out_dir) if r["kind"] == "eval"}  # step -> row
    first, last = evals.get(0), evals.get(cfg.steps)
    summary = {"steps": cfg.steps, "minutes": minutes, "checkpoint": ckpt_dir,
               "device": str(precision.device), "precision": precision.name}
    if last is not None:
        summary.update(final_accuracy=last["accuracy"], final_se=last["accuracy_se"],
                       final_truncated=last.get("truncated"))
    if first is not None and last is not None:
        # two independent proportions: the standard error of their difference
        se = math.sqrt(first["accuracy_se"] ** 2 + last["accuracy_se"] ** 2)
        summary.update(start_accuracy=first["accuracy"], start_se=first["accuracy_se"],
                       start_truncated=first.get("truncated"), diff_se=se)
        diff = last["accuracy"] - first["accuracy"]
        cut_off = (f"; cut off {100 * first['truncated']:.0f}% -> {100 * last['truncated']:.0f}%"
                   if "truncated" in first and "truncated" in last else "")  # (older runs' rows lack it)
        print(f"held-out pass@1 {first['accuracy']:.3f} -> {last['accuracy']:.3f} "
              f"(difference {diff:+.3f}, {(diff / se if se else 0):.1f} standard errors{cut_off})")
    print(f"done in {minutes:.1f} min; checkpoint in {ckpt_dir}, metrics and plots.png in "
          f"{cfg.out_dir}")
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary

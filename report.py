"""
report.py -- stage 3 of experiment.py: from the evaluations' correct counts to Pass@K with 95%
bootstrap intervals, the differences between arms, the plots and the tables of results.md.

Pure functions of numbers (bootstrap, differs, per_problem_pass_at_k) come first, so the tests can
pin them against hand-computed cases; then the plots and the markdown. experiment.py's `report`
calls them; nothing here trains or samples.
"""

import json
import os

import torch

from evaluate import default_ks, pass_at_k
from plumbing.metrics import plot_panels

DRAWS = 2000  # bootstrap replicates
# The verdict's one K, fixed before any run: the largest K both sizes evaluate (n = 32 and 256), a
# large K as the paper's claim is about. Reading ~21 values of K for any that differs would find one
# by chance more often than the 5% each interval allows; the other K are shown, not tested.
ENDPOINT_K = 32


# -----------------------------------------------------------------------------------------------
# Stage 3a: the statistics. Pass@K of one problem is the unbiased estimate from its n samples; a
# model's Pass@K is the mean over problems (and over seeds); the interval comes from resampling both.


def per_problem_pass_at_k(result: dict, ks: list) -> torch.Tensor:
    """An evaluation's correct counts -> (Q, K) per-problem Pass@K (Q problems, K values of K)."""
    return torch.tensor([[pass_at_k(result["n"], c, k) for k in ks] for c in result["correct_counts"]], dtype=torch.float64)


def bootstrap(values: torch.Tensor, draws: int = DRAWS, seed: int = 0, level: float = 0.95) -> dict:
    """values (S seeds, Q problems, K) -> the mean over seeds and problems, and its bootstrap interval.

    Seeds and problems are crossed: every seed answers the same Q problems. So one replicate draws S
    seeds with replacement and, once, Q problem indices with replacement, used for every drawn seed
    (Owen's "pigeonhole" bootstrap of a crossed design); it averages that S x Q block. The interval
    is the replicates' central `level` share. The draws depend only on (S, Q, draws, seed), so two
    arms bootstrapped with the same seed use the same draws: bootstrapping their difference array is
    the paired bootstrap of the difference.
    Why not draw problems independently per seed, as for a nested design: a problem's arm effect is
    shared by the seeds, and independent draws average it away, so the interval comes out too
    narrow. Why resample seeds too, though 2-3 seeds make only 3-10 distinct seed draws (and 2 halve
    the seed variance): seeds differ (each trains its own models), and leaving them out ignores
    that. In a one-off simulation (1,000 experiments a case; per-problem rates from
    Beta(0.36, 3.08), fitted to the start's GPU Pass@K curve; the arm closing a share 0.1u, u ~
    U(0, 2), of each problem's gap to 1, the same in every seed; K = 1) the 95% interval covered the
    true difference in 94-95% of the experiments at 48 problems x 256 samples and 2-3 seeds (the
    nested draw 79-87%, problems alone 94%), and in 96-97% at 10 problems x 32 (problems alone
    90-91%: few problems make a percentile interval narrow). With a seed effect on the arm too (a
    logit shift N(0, 0.2) per seed) it covered 76-94%, problems alone 57-84%: a spread between seeds
    is more than 2-3 seeds can measure, and the interval is then too narrow.
    tests/test_experiment.py reruns the 3-seed, 48-problem case.
    Worked cases: one seed, problems [0, 0, 1]: a replicate's mean is j/3 with j ~ Binomial(3, 1/3),
    so 8/27 of the replicates are 0 and 1/27 are 1; the 90% interval is [0, 2/3]. Two seeds with
    problems [0, 1] each: a replicate is j/2 with j ~ Binomial(2, 1/2), whichever seeds are drawn.
    """
    S, Q, _ = values.shape
    g = torch.Generator().manual_seed(seed)
    seed_idx = torch.randint(S, (draws, S), generator=g)  # (draws, S)
    problem_idx = torch.randint(Q, (draws, Q), generator=g)  # (draws, Q): shared by the drawn seeds
    block = values[seed_idx[:, :, None], problem_idx[:, None, :]]  # (draws, S, Q, K)
    replicates = block.mean(dim=(1, 2))  # (draws, K)
    tail = (1 - level) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=values.dtype), dim=0)
    return {"mean": values.mean(dim=(0, 1)).tolist(), "low": low.tolist(), "high": high.tolist(), "replicates": replicates}


def endpoint(ks: list) -> int:
    """The one K the verdict reads: ENDPOINT_K, or the largest K evaluated when n is smaller."""
    return min(ENDPOINT_K, max(ks))


def differs(diff: dict, ks: list) -> dict:
    """At the endpoint K only: {"endpoint_k": K, "differs": "higher" where the whole interval is
    > 0, "lower" where it is < 0, else "no"}. The other K are description, not tested."""
    i = ks.index(endpoint(ks))
    said = "higher" if diff["low"][i] > 0 else "lower" if diff["high"][i] < 0 else "no"
    return {"endpoint_k": ks[i], "differs": said}


def trend(values: torch.Tensor, draws: int = DRAWS, seed: int = 0, level: float = 0.95) -> dict:
    """values (S seeds, T steps) -> the least-squares slope per step, and its bootstrap interval:
    has a training curve levelled off (slope 0 within the interval) or is it still rising?

    One line per seed with its own height and a common slope (each seed's steps and values centred on
    their own means), so a seed that is better throughout does not tilt it. One replicate: draw S
    seeds with replacement and, within each drawn seed, T of its steps with replacement; the slope of
    those points (a replicate whose steps are all one step has none and is left out). Worked case:
    every seed exactly on a line of slope b, each at its own height: every replicate's slope is b,
    and so is the interval. Calibration, on pure noise (1,000 cases each, 6 steps): the 95% interval
    left out 0 in 3.2% of the cases at 3 seeds, 4.1% at 2 seeds, 9.3% at 1 seed (there, read it as
    a 90% interval; tests/test_experiment.py checks 2 seeds).
    """
    S, T = values.shape
    g = torch.Generator().manual_seed(seed)
    seed_idx = torch.randint(S, (draws, S), generator=g)  # (draws, S)
    step_idx = torch.randint(T, (draws, S, T), generator=g)  # (draws, S, T): steps drawn within each drawn seed

    def slope(x, y):  # (..., S, T) each -> (...)
        x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
        return (x * y).sum((-2, -1)) / (x * x).sum((-2, -1))  # nan where no seed's steps differ

    replicates = slope(step_idx.double(), values[seed_idx[:, :, None], step_idx])  # (draws,)
    tail = (1 - level) / 2
    low, high = torch.nanquantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    steps = torch.arange(T, dtype=torch.float64).expand(S, T)
    return {"slope": slope(steps, values.double()).item(), "low": low.item(), "high": high.item()}


def step_table(folders: list, key: str) -> tuple:
    """One metric of the seeds' runs -> (steps, (T, S) values) at the T steps every one of the S seeds logged."""
    runs = []
    for folder in folders:
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        runs.append({r["step"]: r[key] for r in rows if r.get("kind") == "train" and r.get(key) is not None})  # last row wins
    steps = sorted(set.intersection(*(set(r) for r in runs)))  # PPO's warm-up has no psi
    return steps, torch.tensor([[r[s] for r in runs] for s in steps], dtype=torch.float64).reshape(len(steps), len(runs))


def per_step(folders: list, key: str) -> tuple:
    """One metric of the seeds' runs -> (steps, mean over seeds, min, max) at the steps every seed logged."""
    steps, table = step_table(folders, key)  # (T, S)
    return steps, table.mean(1).tolist(), table.min(1).values.tolist(), table.max(1).values.tolist()


# -----------------------------------------------------------------------------------------------
# Stage 3b: plots and tables


PANELS = [("reward", "reward (mean)"), ("entropy", "token entropy (nats)"), ("psi_ratio", "psi / |A| (tokens with A != 0)"),
          ("length", "response length (tokens)"), ("zero_spread_groups", "groups with no reward spread"),
          ("clip_frac", "clip fraction")]


def plot_passk(curves: dict, diffs: dict, ks: list, path: str, title: str):
    """passk.png: left, Pass@K per model with its 95% band; right, each arm minus plain with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    for label, c in curves.items():
        line, = ax.plot(ks, c["mean"], label=label)
        ax.fill_between(ks, c["low"], c["high"], color=line.get_color(), alpha=0.2)
    for label, d in diffs.items():
        line, = dx.plot(ks, d["mean"], label=label)
        dx.fill_between(ks, d["low"], d["high"], color=line.get_color(), alpha=0.2)
    dx.axhline(0, color="black", lw=0.8)
    for a, ylabel in ((ax, "Pass@K"), (dx, "difference in Pass@K")):
        a.set_xscale("log", base=2)
        a.set_xlabel("K (samples per problem)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    dx.set_title("arm minus plain, paired (95% bootstrap band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(runs: dict, path: str):
    """curves.png: one panel per metric, one line per arm (mean over seeds), shaded: min to max over seeds."""
    plot_panels(path, PANELS, {label: {key: per_step(folders, key) for key, _ in PANELS} for label, folders in runs.items()},
                rows=2)


def interval(c: dict, i: int) -> str:
    return f"{c['mean'][i]:.3f} [{c['low'][i]:.3f}, {c['high'][i]:.3f}]"


def tables(curves: dict, diffs: dict, ks: list, n: int, stats: dict, answers: dict) -> str:
    """Markdown: Pass@K with intervals at powers of 2 beside each model's share of answers cut off
    at the budget and mean length (answers: label -> its evaluations' summaries, one per seed), the
    differences, entropy of pivotal and reflective tokens."""
    shown = default_ks(n)
    cols = [ks.index(k) for k in shown]

    def lengths(runs):  # fewer cut-off answers alone raise Pass@K: the confound, beside it
        cut, length = (sum(r[k] for r in runs) / len(runs) for k in ("truncated", "mean_length"))
        return f"{100 * cut:.1f}% | {length:.1f}"

    def row(label, c, last):  # last: the cut-off and length cells
        return f"| {label} | " + " | ".join(interval(c, i) for i in cols) + f" | {last} |"

    head = " | ".join(f"pass@{k}" for k in shown)
    lines = [f"| model | {head} | cut off at the budget | mean length (tokens) |",
             "|---|" + "---:|" * (len(shown) + 2)]
    lines += [row(label, c, lengths(answers[label])) for label, c in curves.items()]
    lines += [row(label, d, "|") for label, d in diffs.items()]  # (differences: no lengths)
    lines += ["", "| model | pivotal tokens: mean entropy (count) | reflective | other | all |", "|---|---:|---:|---:|---:|"]
    for label, per_seed in stats.items():
        def cell(group):
            ms = [s["groups"][group]["mean"] for s in per_seed if s["groups"][group]["mean"] is not None]
            count = sum(s["groups"][group]["count"] for s in per_seed)
            return f"{sum(ms) / len(ms):.3f} ({count})" if ms else f"- ({count})"
        lines.append(f"| {label} | {cell('pivotal')} | {cell('reflective')} | {cell('other')} | {cell('all')} |")
    return "\n".join(lines)


def levelling(folders: list) -> tuple:
    """Has plain GRPO's training reward levelled off (the paper trains until it has)? Its mean by
    quarter of the steps, and its trend over the second half -> (sentence, record for results.json)."""
    steps, reward = step_table(folders, "reward")  # (T, S)
    T = len(steps)
    quarters = [q.mean().item() for q in (reward[i * T // 4 : (i + 1) * T // 4] for i in range(4)) if len(q)]
    said = f"Plain's training reward by quarter of the steps (mean over seeds): {', '.join(f'{q:.3f}' for q in quarters)}."
    record = {"reward_by_quarter": quarters}
    if T - T // 2 >= 6:  # fewer steps: the replicates are too few distinct resamples to trust the interval
        second = reward[T // 2 :].T  # (S, T - T // 2)
        record["second_half"] = {"steps": [steps[T // 2], steps[-1]], **trend(second)}
        c = record["second_half"]
        state = "still rising" if c["low"] > 0 else "falling" if c["high"] < 0 else "no trend beyond its interval"
        said += (f" Over the second half (steps {steps[T // 2]}-{steps[-1]}) its slope is {c['slope']:+.4f} per step "
                 f"[{c['low']:+.4f}, {c['high']:+.4f}] (95% bootstrap over seeds and steps): {state}.")
    return said, record


def verdict(diffs: dict, ks: list) -> str:
    """The plain sentence, read at the endpoint K only: does each arm differ from plain beyond its
    95% interval, and which way. It ends with the confound the table's last columns show."""
    k = endpoint(ks)
    way = {"higher": "higher beyond", "lower": "lower beyond", "no": "no difference beyond"}
    said = [f"{label} {interval(d, ks.index(k))}, {way[differs(d, ks)['differs']]} its 95% interval"
            for label, d in diffs.items()]
    return (f"at K = {k}, the endpoint fixed in advance: {'; '.join(said)}. The other K are "
            "description, not tests. An arm with fewer answers cut off at the budget gains Pass@K "
            "from that alone: read it beside the table's cut-off shares and mean lengths.")

"""experiment.py: the bootstrap against worked cases; end to end on a tiny model with two seeds, fair
between its arms, resumable, and strict about settings."""

import dataclasses
import itertools
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import experiment
import report
import train
from grader import is_correct

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


# -----------------------------------------------------------------------------------------------
# The bootstrap, on cases whose replicate distribution can be written down


def shares(replicates: torch.Tensor, values: list) -> list:
    return [(replicates.flatten() - v).abs().lt(1e-9).double().mean().item() for v in values]


def test_bootstrap_over_problems_matches_the_binomial_case():
    """One seed, problems [0, 0, 1]: a replicate's mean is j/3 with j ~ Binomial(3, 1/3)."""
    b = report.bootstrap(torch.tensor([[[0.0], [0.0], [1.0]]], dtype=torch.float64), draws=20000, level=0.9)
    assert shares(b["replicates"], [0, 1 / 3, 2 / 3, 1]) == pytest.approx([8 / 27, 12 / 27, 6 / 27, 1 / 27], abs=0.012)
    assert b["mean"] == pytest.approx([1 / 3])
    assert (b["low"][0], b["high"][0]) == pytest.approx((0.0, 2 / 3))  # 26/27 = 96.3% of replicates are <= 2/3


def test_bootstrap_resamples_seeds_and_the_same_problems_for_every_seed():
    """Two seeds of one problem each, 0 and 1: only the seed draw varies, mean 0, 1/2, 1 with 1/4,
    1/2, 1/4. Two seeds whose problems are [0, 1] and [0, 1]: one problem draw serves both seeds, so
    a replicate is j/2 with j ~ Binomial(2, 1/2) (drawn per seed it would be j/4, j ~ Binomial(4,
    1/2)). A 2 x 3 case against the enumeration of all 2^2 seed draws x 3^3 problem draws."""
    b = report.bootstrap(torch.tensor([[[0.0]], [[1.0]]], dtype=torch.float64), draws=20000)
    assert shares(b["replicates"], [0, 0.5, 1]) == pytest.approx([0.25, 0.5, 0.25], abs=0.012)
    assert (b["low"][0], b["high"][0]) == (0.0, 1.0)
    b = report.bootstrap(torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]], dtype=torch.float64), draws=20000)
    got = shares(b["replicates"], [0, 0.25, 0.5, 0.75, 1])
    assert got == pytest.approx([1 / 4, 0, 1 / 2, 0, 1 / 4], abs=0.012)
    values = torch.tensor([[0.0, 0.3, 1.0], [0.1, 0.5, 0.9]], dtype=torch.float64)  # (S, Q)
    exact = {}
    for seeds in itertools.product(range(2), repeat=2):
        for problems in itertools.product(range(3), repeat=3):
            mean = round(sum(values[s, q].item() for s in seeds for q in problems) / 6, 9)
            exact[mean] = exact.get(mean, 0) + 1 / (4 * 27)
    b = report.bootstrap(values[:, :, None], draws=20000)
    assert shares(b["replicates"], list(exact)) == pytest.approx(list(exact.values()), abs=0.012)


def test_the_crossed_interval_covers_a_known_difference_where_the_nested_one_did_not():
    """Simulated experiments with a known truth, at the GPU size (3 seeds x 48 problems x 256
    samples): per-problem rates p ~ Beta(0.36, 3.08) (the start's GPU Pass@K curve), and the arm
    closing a share 0.1u, u ~ U(0, 2), of each problem's gap to 1, the same in every seed. At K = 1
    the true difference is E[0.1u(1 - p)] = 0.1 x 3.08 / 3.44. Over 1,000 experiments the crossed
    95% interval covers it in 94.8% (Monte Carlo standard error 0.7 points at 95%), the old draw,
    problems independently per seed, in 79.2% (s.e. 1.3 points): the bounds 90% and 87% are each
    more than 5 standard errors away."""
    import numpy as np

    def nested(values):  # the old draw: problems drawn independently for each drawn seed
        g = torch.Generator().manual_seed(0)
        seed_idx = torch.randint(S, (report.DRAWS, S), generator=g)  # (draws, S)
        problem_idx = torch.randint(Q, (report.DRAWS, S, Q), generator=g)  # (draws, S, Q)
        replicates = values[seed_idx[:, :, None], problem_idx].mean(dim=(1, 2))  # (draws, E)
        return torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=values.dtype), dim=0)

    S, Q, n, E = 3, 48, 256, 1000
    rng = np.random.default_rng(0)
    p = rng.beta(0.36, 3.08, (Q, E))  # (Q, E): E experiments, each with its own problems
    q = p + 0.1 * rng.uniform(0, 2, (Q, E)) * (1 - p)  # the arm's rates, shared by the seeds
    right = [rng.binomial(n, rate, (S, Q, E)) for rate in (q, p)]  # (S, Q, E) each: arm, plain
    diff = torch.from_numpy((right[0] - right[1]) / n)  # (S, Q, E): the difference in Pass@1
    truth = 0.1 * 3.08 / 3.44
    crossed = old = 0
    for e in range(0, E, 100):  # the experiments ride in bootstrap's K column, 100 at a time
        b = report.bootstrap(diff[:, :, e : e + 100])
        crossed += sum(lo <= truth <= hi for lo, hi in zip(b["low"], b["high"]))
        low, high = nested(diff[:, :, e : e + 100])
        old += ((low <= truth) & (truth <= high)).sum().item()
    assert crossed / E >= 0.90 and old / E <= 0.87, (crossed / E, old / E)


def test_a_paired_difference_cancels_what_the_arms_share():
    """Problems of very different difficulty, the second arm better by exactly 0.1 on each: paired, the
    interval of the difference is the single point 0.1; unpaired it would span most of [−1, 1]."""
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(3, 20, 2, generator=g, dtype=torch.float64) * 0.8
    diff = report.bootstrap(plain + 0.1 - plain)
    assert diff["low"] == pytest.approx([0.1, 0.1]) and diff["high"] == pytest.approx([0.1, 0.1])
    assert report.differs(diff, [1, 2]) == {"endpoint_k": 2, "differs": "higher"}
    a, b = report.bootstrap(plain), report.bootstrap(plain + 0.1)  # same draws: the replicates differ by 0.1
    assert torch.allclose(b["replicates"] - a["replicates"], torch.full_like(a["replicates"], 0.1))
    assert b["high"][0] - b["low"][0] > 0.1  # ... while each arm's own band is wider than the gap


def test_the_verdict_reads_the_endpoint_k_only_and_the_table_shows_the_cut_off_answers():
    """A difference beyond its interval at K = 1 only is no verdict: the endpoint is K = 32 (the
    largest K when n is smaller); the table puts each model's cut-off share and mean length beside
    its Pass@K."""
    def interval(mean, low, high):  # lists over K
        return {"mean": mean, "low": low, "high": high}

    def runs(*cut_and_length):  # one evaluation summary per seed
        return [{"truncated": cut, "mean_length": length} for cut, length in cut_and_length]

    ks = [1, 2, 4, 8, 16, 32, 64]
    small_k_only = interval([0.05] + [0.01] * 6, [0.01] + [-0.1] * 6, [0.09] + [0.1] * 6)
    assert report.endpoint(ks) == 32 and report.endpoint(ks[:5]) == 16
    assert report.differs(small_k_only, ks) == {"endpoint_k": 32, "differs": "no"}
    said = report.verdict({"entropy minus plain": small_k_only}, ks)
    assert said.startswith("at K = 32, the endpoint fixed in advance: entropy minus plain 0.010 "
                           "[-0.100, 0.100], no difference beyond its 95% interval.")
    assert "cut-off shares" in said
    at_32 = interval([0.0] * 5 + [0.2] * 2, [-0.1] * 5 + [0.1, -0.1], [0.1] * 5 + [0.3] * 2)
    assert ", higher beyond its 95% interval" in report.verdict({"entropy minus plain": at_32}, ks)
    below = interval([-0.2] * 7, [-0.3] * 7, [-0.1] * 7)
    assert report.differs(below, ks)["differs"] == "lower"
    curve = interval([0.1] * 7, [0.0] * 7, [0.2] * 7)
    answers = {"plain": runs((0.10, 80.0), (0.06, 86.0)), "entropy": runs((0.02, 63.0))}
    md = report.tables({"plain": curve, "entropy": curve}, {"diff": at_32}, ks, 64, {}, answers)
    head, rule, plain, entropy, diff = md.splitlines()[:5]
    assert head.endswith("| pass@64 | cut off at the budget | mean length (tokens) |")
    assert rule.count("|") == 11 and diff.endswith("| | |")
    assert plain.endswith("| 8.0% | 83.0 |") and entropy.endswith("| 2.0% | 63.0 |")


def test_trend_is_the_common_slope_of_the_seeds_lines():
    """Seeds exactly on lines of slope 0.02 at different heights: every replicate's slope, and so the
    interval, is 0.02. On noisy values the slope equals a least-squares fit with one intercept per seed
    (numpy's lstsq on dummy columns, an independent reference), and lies inside its interval."""
    import numpy as np

    lines = torch.tensor([[0.1 + 0.02 * t for t in range(6)], [0.5 + 0.02 * t for t in range(6)]], dtype=torch.float64)
    c = report.trend(lines)
    assert (c["slope"], c["low"], c["high"]) == pytest.approx((0.02, 0.02, 0.02), abs=1e-12)
    values = torch.rand(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (S, T)
    design = np.zeros((24, 4))
    for s in range(3):
        design[s * 8 : s * 8 + 8, s], design[s * 8 : s * 8 + 8, 3] = 1.0, np.arange(8)
    c = report.trend(values)
    assert c["slope"] == pytest.approx(np.linalg.lstsq(design, values.flatten().numpy(), rcond=None)[0][3], abs=1e-12)
    assert c["low"] < c["slope"] < c["high"] and c["low"] < 0 < c["high"]  # noise: no trend beyond the interval


def test_trends_interval_keeps_its_level_on_noise():
    """No trend, only noise: the 95% interval should leave out 0 in about 5% of the cases (measured 4.1% at
    this size in 1,000; here 300 cases, so up to 8% passes)."""
    g = torch.Generator().manual_seed(0)
    misses = [not (c["low"] <= 0 <= c["high"]) for c in
              (report.trend(torch.randn(2, 6, generator=g, dtype=torch.float64), seed=i) for i in range(300))]
    assert sum(misses) / 300 < 0.08


def test_levelling_says_whether_plains_reward_still_rises(tmp_path):
    """Two seeds, 12 steps, written as train.py writes metrics.jsonl: a reward rising by 0.05 a step (with
    +-0.01 of noise) is 'still rising'; one that rises and then stays flat is not."""
    def runs(curve):
        folders = []
        for s in range(2):
            folder = tmp_path / f"{curve.__name__}{s}"
            folder.mkdir()
            rows = [{"kind": "train", "step": t, "reward": curve(t) + (0.01 if (t + s) % 2 else -0.01)} for t in range(1, 13)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            folders.append(str(folder))
        return folders

    def rising(t):
        return 0.05 * t

    def flat(t):
        return min(t, 6) * 0.05

    said, record = report.levelling(runs(rising))
    assert record["reward_by_quarter"] == pytest.approx([0.1, 0.25, 0.4, 0.55])
    assert record["second_half"]["steps"] == [7, 12] and record["second_half"]["slope"] == pytest.approx(0.05, abs=0.01)
    assert said.endswith("still rising.")
    said, record = report.levelling(runs(flat))
    assert record["second_half"]["low"] < 0 < record["second_half"]["high"] and said.endswith("no trend beyond its interval.")


# -----------------------------------------------------------------------------------------------
# End to end on the tiny model: two seeds, two arms


def argv_for(folder, out, *extra):
    """Tiny settings: arith:1 answers are 0..18, so a random character model gets a few right by luck,
    sampling at temperature 1.0 (the sizes train at 0.6)."""
    return ["--model", folder, "--task", "arith:1", "--temperature", "1.0", "--top_p", "1.0",
            "--out_dir", str(out), "--steps", "2", "--prompts_per_step", "4",
            "--group_size", "8", "--mini_batches", "2", "--max_new_tokens", "6", "--eval_problems", "6", "--eval_batch", "3",
            "--n", "16", "--seeds", "2", "--arms", "plain,entropy", "--dtype", "float32", "--device", "cpu",
            "--progress", "false", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_folder):
    """One finished experiment, shared by the tests that only read it. The random model almost
    never draws its stop token within 6 tokens, so under the cut-off rule (tested in test_grader.py
    and test_train.py) its training would earn no reward at all; these tests are about the
    experiment's bookkeeping, so its training reward reads the last number of every answer."""
    out = tmp_path_factory.mktemp("experiment") / "grpo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "grade_response", lambda text, gold, stopped: is_correct(text, gold))
        experiment.main(argv_for(tiny_folder, out))
    return out


def test_writes_plots_tables_and_intervals_for_every_arm(done):
    for name in ("passk.png", "curves.png"):
        assert os.path.getsize(done / name) > 1000, name
    results = json.load(open(done / "results.json"))
    assert results["seeds"] == [0, 1] and results["arms"] == ["plain", "entropy"]
    assert len(results["pass_at_k"]) == 3 and len(results["difference"]) == 1  # start, two arms; entropy - plain
    assert results["ks"][0] == 1 and results["ks"][-1] == 16
    for label, c in results["pass_at_k"].items():
        assert all(lo - 1e-12 <= m <= hi + 1e-12 for lo, m, hi in zip(c["low"], c["mean"], c["high"])), label
        assert all(a <= b + 1e-12 for a, b in zip(c["mean"], c["mean"][1:])), label  # Pass@K grows with K
    assert len(results["models"]) == 1 + 2 * 2
    for key in ("reward", "entropy", "length", "zero_spread_groups", "clip_frac"):
        assert results["per_step"]["GRPO (alpha 0)"][key]["steps"] == [1, 2], key
    assert set(results["per_step"]["GRPO (alpha 0)"]["psi_ratio"]["steps"]) <= {1, 2}  # none in a step of only zero-spread groups
    assert all(s["all"]["count"] > 0 for per_seed in results["entropy_stats"].values() for s in per_seed)
    assert len(results["plain_reward"]["reward_by_quarter"]) == 2  # 2 steps: too few for a trend (6 in the second half)
    assert "second_half" not in results["plain_reward"]
    md = open(done / "results.md").read()
    assert "pass@16" in md and "minus plain" in md and "by quarter of the steps" in md
    assert "Verdict: at K = 16, the endpoint fixed in advance: " in md  # n = 16 < ENDPOINT_K
    assert [d["endpoint_k"] for d in results["difference"].values()] == [16]
    plain = [json.load(open(done / f"seed{s}" / "eval_plain" / "summary.json")) for s in (0, 1)]
    row = next(line for line in md.splitlines() if line.startswith("| GRPO (alpha 0) |"))
    assert "cut off at the budget | mean length (tokens) |" in md and row.endswith(
        f"| {50 * (plain[0]['truncated'] + plain[1]['truncated']):.1f}% | "
        f"{(plain[0]['mean_length'] + plain[1]['mean_length']) / 2:.1f} |")


def test_the_mean_agrees_with_a_recount_of_the_samples(done):
    """Pass@1 is the share of correct samples, Pass@n the share of problems with one: recounted from samples.jsonl."""
    results = json.load(open(done / "results.json"))
    per_seed = []
    for s in (0, 1):
        counts = {}
        for line in open(done / f"seed{s}" / "eval_plain" / "samples.jsonl"):
            r = json.loads(line)
            counts.setdefault(r["id"], []).append(r["correct"])
        assert len(counts) == 6 and all(len(c) == 16 for c in counts.values())
        per_seed.append((sum(sum(c) / 16 for c in counts.values()) / 6, sum(any(c) for c in counts.values()) / 6))
    curve = results["pass_at_k"]["GRPO (alpha 0)"]["mean"]
    assert curve[0] == pytest.approx(sum(p[0] for p in per_seed) / 2)
    assert curve[-1] == pytest.approx(sum(p[1] for p in per_seed) / 2)


def test_arms_of_a_seed_differ_only_in_alpha_and_share_their_first_rollouts(done):
    for s in (0, 1):
        plain = json.load(open(done / f"seed{s}" / "plain" / "checkpoint" / "train_config.json"))
        entropy = json.load(open(done / f"seed{s}" / "entropy" / "checkpoint" / "train_config.json"))
        assert {k for k in plain if plain[k] != entropy[k]} == {"alpha", "out_dir"}
        assert (plain["seed"], plain["alpha"], entropy["alpha"], plain["mini_batches"]) == (s, 0.0, 0.4, 2)
        first = [json.loads(open(done / f"seed{s}" / arm / "metrics.jsonl").readline()) for arm in ("plain", "entropy")]
        for key in ("reward", "entropy", "length", "zero_spread_groups"):  # same problems, same sampling seed, same weights
            assert first[0][key] == first[1][key], (s, key)
        assert first[0]["psi_ratio"] == 0 and first[1]["psi_ratio"] > 0
    seeds = [json.loads(open(done / f"seed{s}" / "plain" / "metrics.jsonl").readline()) for s in (0, 1)]
    assert (seeds[0]["entropy"], seeds[0]["length"]) != (seeds[1]["entropy"], seeds[1]["length"])  # ... and seeds differ
    # the term changes the update: the final models differ
    weights = [load_file(str(done / "seed0" / arm / "checkpoint" / "model.safetensors")) for arm in ("plain", "entropy")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_entreg_arm_differs_only_in_its_entropy_coefficient():
    plan = experiment.parse(["--arms", "plain,entropy,entreg", "--entropy_coef", "0.01"])
    cfgs = {arm: experiment.run_config(plan, arm, 0) for arm in plan.arms}
    assert [(c.alpha, c.entropy_coef) for c in cfgs.values()] == [(0.0, 0.0), (0.4, 0.0), (0.0, 0.01)]
    assert plan.seeds == [0, 1] and plan.n == 32 and plan.base.mini_batches == 2  # the cpu size
    gpu = experiment.parse(["--size", "gpu", "--seeds", "3", "--seed", "5"])
    assert (gpu.seeds, gpu.n, gpu.base.prompts_per_step) == ([5, 6, 7], 256, 32)
    assert gpu.base.out_dir == os.path.join("runs", "experiment", "grpo-gpu")


def test_a_rerun_skips_finished_stages_and_resumes_an_interrupted_run(done, tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    # 1) everything done: no training and no sampling happen
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    experiment.main(argv_for(tiny_folder, out))
    assert json.load(open(out / "results.json"))["pass_at_k"] == json.load(open(done / "results.json"))["pass_at_k"]
    # 2) seed 1's entropy run stopped by a Ctrl-C in step 2 (its checkpoint at step 1, no summary): it
    #    alone resumes from its checkpoint, and only its evaluation, now older than the checkpoint, is redone
    monkeypatch.undo()
    graded = []

    def ctrl_c_in_step_2(text, problem):  # step 1 grades 4 prompts x 8 answers
        graded.append(text)
        if len(graded) > 32:
            raise KeyboardInterrupt
        return float(is_correct(text, problem.answer))

    cfg = experiment.run_config(experiment.parse(argv_for(tiny_folder, out)), "entropy", 1)
    with pytest.raises(SystemExit):
        train.train(dataclasses.replace(cfg, overwrite=True), reward_fn=ctrl_c_in_step_2)
    resumed, evaluated = [], []
    real_train, real_evaluate = train.train, experiment.evaluate
    monkeypatch.setattr(train, "train", lambda cfg: resumed.append(cfg.resume) or real_train(cfg))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: evaluated.append(k["out_dir"]) or real_evaluate(*a, **k))
    experiment.main(argv_for(tiny_folder, out))
    assert resumed == [str(out / "seed1" / "entropy" / "checkpoint")]
    assert [json.loads(l)["step"] for l in open(out / "seed1" / "entropy" / "metrics.jsonl")] == [1, 2]
    assert evaluated == [str(out / "seed1" / "eval_entropy")]


def test_an_evaluation_made_in_another_precision_is_redone(done, tiny_folder, tmp_path, monkeypatch):
    """Every model of an experiment is evaluated in the start's precision: a summary that records
    another (an experiment continued on another machine) is evaluated again, and the new one says so."""
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    path = out / "seed0" / "eval_plain" / "summary.json"
    assert json.load(open(path))["precision"] == "float32"
    json.dump({**json.load(open(path)), "precision": "bfloat16 autocast"}, open(path, "w"))
    evaluated, real_evaluate = [], experiment.evaluate
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: evaluated.append(k["out_dir"]) or real_evaluate(*a, **k))
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    experiment.main(argv_for(tiny_folder, out))
    assert evaluated == [str(out / "seed0" / "eval_plain")]
    assert json.load(open(path))["precision"] == "float32"


def test_it_goes_seed_by_seed_and_reports_the_whole_seeds_of_a_run_cut_short(done, tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    order, real_timed = [], experiment.timed
    monkeypatch.setattr(experiment, "timed", lambda o, stage, fn: order.append(stage) or real_timed(o, stage, fn))
    experiment.main(argv_for(tiny_folder, out))  # everything done: only the order of the (skipped) stages is seen
    assert order == ["start model", "evaluate start"] + [f"{what} {arm} seed {s}" for s in (0, 1)
                                                         for what in ("train", "evaluate") for arm in ("plain", "entropy")]
    # a run stopped during seed 1: --seeds 1 reports seed 0 from what is there, with no training or sampling
    shutil.rmtree(out / "seed1" / "eval_entropy")
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"trained {cfg.out_dir}"))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: pytest.fail("sampled"))
    experiment.main(argv_for(tiny_folder, out, "--seeds", "1"))
    results = json.load(open(out / "results.json"))
    assert results["seeds"] == [0] and len(results["models"]) == 1 + 2
    right = [json.loads(line)["correct"] for line in open(done / "seed0" / "eval_entropy" / "samples.jsonl")]
    assert results["pass_at_k"]["GRPO + entropy advantage (alpha 0.4)"]["mean"][0] == pytest.approx(sum(right) / len(right))


def test_a_gguf_start_becomes_a_folder_once(tiny_folder, tmp_path, monkeypatch):
    """A GGUF start is parsed once (about 20 s for SmolLM2's) into a folder in OUT, which every run
    and evaluation then loads; a folder made from another file of the same name is refused."""
    parsed, real_load = [], experiment.load_model
    monkeypatch.setattr(experiment, "load_model", lambda source, **kw: parsed.append(source) or real_load(tiny_folder, **kw))
    cfg = train.Config(model="/models/start.gguf", out_dir=str(tmp_path))
    folder = experiment.start_model(cfg)
    assert folder == str(tmp_path / "start_model" / "start") and parsed == ["/models/start.gguf"]
    made, tiny = real_load(folder, device="cpu")[0].state_dict(), real_load(tiny_folder, device="cpu")[0].state_dict()
    assert made.keys() == tiny.keys() and all(torch.equal(made[k], tiny[k]) for k in made)
    assert experiment.start_model(cfg) == folder and len(parsed) == 1  # made once
    with pytest.raises(ValueError, match="was made from /models/start.gguf: pass another --out_dir"):
        experiment.start_model(train.Config(model="/elsewhere/start.gguf", out_dir=str(tmp_path)))
    assert experiment.start_model(train.Config(model=tiny_folder, out_dir=str(tmp_path))) == tiny_folder  # a folder stays


def test_other_training_settings_are_refused_and_other_eval_settings_redo_the_evaluation(done, tiny_folder, tmp_path,
                                                                                       monkeypatch):
    with pytest.raises(ValueError, match=r"plain was trained with other settings \(max_new_tokens: 6 there, 7 now\)"):
        experiment.run_all(experiment.parse(argv_for(tiny_folder, done, "--max_new_tokens", "7")))
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    experiment.main(argv_for(tiny_folder, out, "--n", "8"))  # the later --n wins
    results = json.load(open(out / "results.json"))
    assert results["n"] == 8 and results["ks"][-1] == 8


def test_ppo_gets_the_papers_alpha_and_its_own_folder():
    plan = experiment.parse(["--algo", "ppo"])
    assert (plan.base.alpha, plan.base.algo) == (0.1, "ppo")
    assert experiment.run_config(plan, "entropy", 0).out_dir == os.path.join("runs", "experiment", "ppo-cpu", "seed0", "entropy")
    assert experiment.parse(["--alpha", "0.2", "--n", "256"]).base.alpha == 0.2


def test_help_names_the_sizes(capsys):
    experiment.main(["--help"])
    text = capsys.readouterr().out
    assert "--size" in text and "cpu (default)" in text and "gpu:" in text and "--seeds" in text and "--arms" in text


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "0"], "would make the entropy arm plain"),
    (["--arms", "plain,entreg", "--entropy_coef", "0"], "would make the entreg arm plain"),
    (["--arms", "entropy,entreg"], "--arms takes plain"),
    (["--arms", "plain,plain"], "--arms takes plain"),
    (["--arms", "plain,entropi"], "--arms takes plain"),
    (["--size", "tpu"], "--size must be cpu or gpu"),
    (["--seeds", "0"], "--seeds expects a positive int"),
    (["--n", "0"], "--n expects a positive int"),
    (["--n", "many"], "--n expects a positive int"),
    (["--resume", "x"], "rerun the same command"),
    (["--eval_problems", "0"], "--eval_problems must be >= 1"),
    (["--stpes", "3"], "unknown option '--stpes'"),
    (["--algo", "dpo"], "--algo must be grpo or ppo"),
])
def test_bad_options_give_one_clear_message(argv, message):
    with pytest.raises(ValueError, match=message):
        experiment.parse(argv)


def test_overwrite_retrains_every_run_in_place(done, tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    trained = []
    monkeypatch.setattr(train, "train", lambda cfg: trained.append((cfg.out_dir, cfg.overwrite, cfg.resume)))
    experiment.main(argv_for(tiny_folder, out, "--overwrite", "true"))
    assert trained == [(str(out / f"seed{s}" / arm), True, "") for s in (0, 1) for arm in ("plain", "entropy")]

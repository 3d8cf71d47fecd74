"""experiment.py: the bootstrap against worked cases; end to end on a tiny model with two seeds, fair
between its arms, resumable, and strict about settings."""

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


def test_bootstrap_resamples_seeds_then_problems_within_each_seed():
    """Two seeds of one problem each, 0 and 1: only the seed draw varies, mean 0, 1/2, 1 with 1/4, 1/2, 1/4.
    Two seeds whose problems are [0, 1] and [0, 1]: problems are drawn per seed, mean j/4, j ~ Binomial(4, 1/2)."""
    b = report.bootstrap(torch.tensor([[[0.0]], [[1.0]]], dtype=torch.float64), draws=20000)
    assert shares(b["replicates"], [0, 0.5, 1]) == pytest.approx([0.25, 0.5, 0.25], abs=0.012)
    assert (b["low"][0], b["high"][0]) == (0.0, 1.0)
    b = report.bootstrap(torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]], dtype=torch.float64), draws=20000)
    assert shares(b["replicates"], [0, 0.25, 0.5, 0.75, 1]) == pytest.approx([1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16], abs=0.012)


def test_a_paired_difference_cancels_what_the_arms_share():
    """Problems of very different difficulty, the second arm better by exactly 0.1 on each: paired, the
    interval of the difference is the single point 0.1; unpaired it would span most of [−1, 1]."""
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(3, 20, 2, generator=g, dtype=torch.float64) * 0.8
    diff = report.bootstrap(plain + 0.1 - plain)
    assert diff["low"] == pytest.approx([0.1, 0.1]) and diff["high"] == pytest.approx([0.1, 0.1])
    assert report.differs(diff, [1, 2]) == {"above": [1, 2], "below": []}
    a, b = report.bootstrap(plain), report.bootstrap(plain + 0.1)  # same draws: the replicates differ by 0.1
    assert torch.allclose(b["replicates"] - a["replicates"], torch.full_like(a["replicates"], 0.1))
    assert b["high"][0] - b["low"][0] > 0.1  # ... while each arm's own band is wider than the gap


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
    assert "pass@16" in md and "minus plain" in md and "Which K differ:" in md and "by quarter of the steps" in md


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
    # 2) seed 1's entropy run lost its summary (as after a Ctrl-C): it alone resumes from its checkpoint,
    #    and only its evaluation, now older than the checkpoint, is redone
    monkeypatch.undo()
    os.remove(out / "seed1" / "entropy" / "summary.json")
    resumed, evaluated = [], []
    real_train, real_evaluate = train.train, experiment.evaluate
    monkeypatch.setattr(train, "train", lambda cfg: resumed.append(cfg.resume) or real_train(cfg))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: evaluated.append(k["out_dir"]) or real_evaluate(*a, **k))
    experiment.main(argv_for(tiny_folder, out))
    assert resumed == [str(out / "seed1" / "entropy" / "checkpoint")]
    assert evaluated == [str(out / "seed1" / "eval_entropy")]


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

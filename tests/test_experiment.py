"""experiment.py: end to end on a tiny model, fair between its arms, resumable, and strict about settings."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import experiment
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def argv_for(folder, out, *extra):
    """Tiny settings: arith:1 answers are 0..18, so a random character model gets a few right by luck."""
    return ["--model", folder, "--task", "arith:1", "--out_dir", str(out), "--steps", "2", "--prompts_per_step", "4",
            "--group_size", "8", "--max_new_tokens", "6", "--eval_problems", "6", "--eval_batch", "3", "--n", "16",
            "--dtype", "float32", "--device", "cpu", "--progress", "false", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_folder):
    """One finished experiment, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("experiment") / "grpo"
    experiment.main(argv_for(tiny_folder, out))
    return out


def test_writes_plots_and_three_models_with_monotone_pass_at_k(done):
    for name in ("passk.png", "curves.png"):
        assert os.path.getsize(done / name) > 1000, name
    results = json.load(open(done / "results.json"))
    assert len(results["models"]) == 3
    for label, r in results["models"].items():
        curve = [r["pass_at_k"][str(k)] for k in sorted(map(int, r["pass_at_k"]))]
        assert sorted(map(int, r["pass_at_k"]))[0] == 1 and sorted(map(int, r["pass_at_k"]))[-1] == 16
        assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:])), (label, curve)
    md = open(done / "results.md").read()
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + 3  # the header, a row per model
    assert "pass@16" in md


def test_numbers_agree_with_a_recount_of_the_samples(done):
    """Pass@1 is the mean share of correct samples and Pass@n the share of problems with any correct one:
    recounted from each evaluation's samples.jsonl, independently of the estimator."""
    results = json.load(open(done / "results.json"))["models"]
    some_correct = 0
    for key, (label, r) in zip(("start", "plain", "entropy"), results.items()):
        counts = {}
        for line in open(done / f"eval_{key}" / "samples.jsonl"):
            s = json.loads(line)
            counts.setdefault(s["id"], []).append(s["correct"])
        assert len(counts) == 6 and all(len(c) == 16 for c in counts.values())
        assert r["pass_at_k"]["1"] == pytest.approx(sum(sum(c) / 16 for c in counts.values()) / 6)
        assert r["pass_at_k"]["16"] == pytest.approx(sum(any(c) for c in counts.values()) / 6)
        some_correct += sum(map(sum, counts.values()))
    assert some_correct > 0  # otherwise every curve is flat at 0 and the monotone check above proves nothing


def test_the_two_runs_differ_only_in_alpha(done):
    plain = json.load(open(done / "plain" / "checkpoint" / "train_config.json"))
    entropy = json.load(open(done / "entropy" / "checkpoint" / "train_config.json"))
    assert {k for k in plain if plain[k] != entropy[k]} == {"alpha", "out_dir"}
    assert (plain["alpha"], entropy["alpha"], plain["eval_problems"]) == (0.0, 0.4, 0)
    # same data order and sampling seeds: step 1 starts from the same weights, so its rollouts are identical
    first = [json.loads(open(done / run / "metrics.jsonl").readline()) for run in ("plain", "entropy")]
    assert all(r["kind"] == "train" and r["step"] == 1 for r in first)  # no greedy eval rows in the runs
    for key in ("reward", "entropy", "length"):
        assert first[0][key] == first[1][key], key
    assert first[0]["psi_ratio"] == 0 and first[1]["psi_ratio"] > 0
    # ... and from there the term changes the update: the two final models differ
    weights = [load_file(str(done / run / "checkpoint" / "model.safetensors")) for run in ("plain", "entropy")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_rerun_skips_finished_stages_and_resumes_an_interrupted_run(done, tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    # 1) everything done: no training and no sampling happen
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    experiment.main(argv_for(tiny_folder, out))
    assert json.load(open(out / "results.json"))["models"] == json.load(open(done / "results.json"))["models"]
    # 2) the entropy run lost its summary (as after a Ctrl-C): it resumes from its checkpoint, and its
    #    evaluation, now older than the checkpoint, is redone
    monkeypatch.undo()
    os.remove(out / "entropy" / "summary.json")
    resumed, evaluated = [], []
    real_train, real_evaluate = train.train, experiment.evaluate
    monkeypatch.setattr(train, "train", lambda cfg: resumed.append(cfg.resume) or real_train(cfg))
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: evaluated.append(k["out_dir"]) or real_evaluate(*a, **k))
    experiment.main(argv_for(tiny_folder, out))
    assert resumed == [str(out / "entropy" / "checkpoint")]
    assert evaluated == [str(out / "eval_entropy")]


def test_other_training_settings_are_refused_and_other_eval_settings_redo_the_evaluation(done, tiny_folder, tmp_path,
                                                                                       monkeypatch):
    with pytest.raises(ValueError, match=r"plain was trained with other settings \(max_new_tokens: 6 there, 7 now\)"):
        experiment.run_all(*experiment.parse(argv_for(tiny_folder, done, "--max_new_tokens", "7")))
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    experiment.main(argv_for(tiny_folder, out, "--n", "8"))  # the later --n wins
    results = json.load(open(out / "results.json"))
    assert results["n"] == 8 and all(max(map(int, r["pass_at_k"])) == 8 for r in results["models"].values())


def test_ppo_gets_the_papers_alpha_and_its_own_folder():
    plain, entropy, n, base = experiment.parse(["--algo", "ppo"])
    out = base.out_dir
    assert (plain.alpha, entropy.alpha, plain.algo, n) == (0.0, 0.1, "ppo", 64)
    assert out == os.path.join("runs", "experiment", "ppo") and entropy.out_dir == os.path.join(out, "entropy")
    assert experiment.parse(["--alpha", "0.2", "--n", "256"])[1].alpha == 0.2


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "0"], "would train the plain run twice"),
    (["--n", "0"], "--n expects a positive int"),
    (["--n", "many"], "--n expects a positive int"),
    (["--resume", "x"], "rerun the same command"),
    (["--eval_problems", "0"], "--eval_problems and --eval_batch must be >= 1"),
    (["--stpes", "3"], "unknown option '--stpes'"),
    (["--algo", "dpo"], "--algo must be grpo or ppo"),
])
def test_bad_options_give_one_clear_message(argv, message):
    with pytest.raises(ValueError, match=message):
        experiment.parse(argv)


def test_overwrite_retrains_both_runs_in_place(done, tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    trained = []
    monkeypatch.setattr(train, "train", lambda cfg: trained.append((cfg.out_dir, cfg.overwrite, cfg.resume)))
    experiment.main(argv_for(tiny_folder, out, "--overwrite", "true"))
    assert trained == [(str(out / "plain"), True, ""), (str(out / "entropy"), True, "")]

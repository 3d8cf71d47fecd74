"""narrowing.py on a tiny model: the evaluation schedule (the start once, then every E steps for
each seed), segments that make the same run as one uninterrupted train(), a rerun that redoes
nothing, one-line refusals, and the verdict on hand-made numbers."""

import dataclasses
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file

import narrowing
import train
from grader import is_correct
from report import per_problem_pass_at_k

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

# What differs between two identical runs: wall times, and the warnings, whose streak counters
# start afresh in each train() call.
TIMINGS = ("rollout_s", "step_s", "warnings")


def argv_for(folder, out, *extra):
    """Tiny sizes: 2 seeds x 2 steps, evaluated after every step; 8 arith:1 problems in the pool, 4
    held out, n = 4. A random character model gets a few sums right by luck at temperature 1."""
    return ["--model", str(folder), "--task", "arith:1", "--pool", "8", "--eval_problems", "4",
            "--n", "4", "--every", "1", "--steps", "2", "--seeds", "2", "--prompts_per_step", "4",
            "--group_size", "4", "--mini_batches", "2", "--max_new_tokens", "4",
            "--temperature", "1.0", "--top_p", "1.0", "--lr", "1e-3", "--dtype", "float32",
            "--device", "cpu", "--progress", "false", "--out_dir", str(out), *extra]


class Count:
    """Wraps a function and records its calls (refuse: fail the test if it is called at all)."""

    def __init__(self, fn, refuse=False):
        self.fn, self.refuse, self.calls = fn, refuse, []

    def __call__(self, *args, **kwargs):
        assert not self.refuse, f"{self.fn.__name__} called on a rerun"
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def last_number_reward(text, gold, stopped):
    """The random model almost never draws its stop token within 4 tokens, so under the cut-off rule
    (tested in test_grader.py and test_train.py) its training would earn no reward and learn
    nothing; these tests are about the study's schedule and resume, so its training reward reads
    the last number of every answer, cut off or not."""
    return is_correct(text, gold)


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_folder):
    """One finished study, with its calls to evaluate and train recorded. Each seed's last
    checkpoint is moved to kept/ instead of deleted, for the test of resume against one run."""
    out = tmp_path_factory.mktemp("narrowing") / "study"

    def keep(path, **_):
        os.renames(path, out.parent / "kept" / os.path.relpath(path, out))

    with pytest.MonkeyPatch.context() as mp:
        evaluations, trainings = Count(narrowing.evaluate), Count(train.train)
        mp.setattr(narrowing, "evaluate", evaluations)
        mp.setattr(train, "train", trainings)
        mp.setattr(narrowing, "shutil", types.SimpleNamespace(rmtree=keep))  # narrowing's own only
        mp.setattr(train, "grade_response", last_number_reward)
        result = narrowing.main(argv_for(tiny_folder, out))
    return out, result, evaluations.calls, trainings.calls


def test_the_start_is_evaluated_once_then_every_E_steps_for_each_seed(done):
    out, result, evaluations, trainings = done
    assert result["steps"] == [0, 1, 2] and result["seeds"] == [0, 1] and result["endpoint_k"] == 4
    saved = json.load(open(out / "results.json"))
    assert saved["steps"] == [0, 1, 2] and [r["step"] for r in saved["rows"]] == [0, 1, 2]
    # both sets (pool, held-out) for the start, once, then for each of 2 seeds x 2 checkpoints
    folders = [kwargs["out_dir"] for _, kwargs in evaluations]
    sets = narrowing.SETS
    assert folders == [str(out / "start" / name) for name in sets] + [
        str(out / f"seed{s}" / f"step{t}" / name) for s in (0, 1) for t in (1, 2) for name in sets]
    # the pool is what is trained on and what the pool's evaluation answers; the held-out set apart
    pool = [json.loads(line)["question"] for line in open(out / "pool.jsonl")]
    held_out = [json.loads(line)["question"] for line in open(out / "held_out.jsonl")]
    assert len(pool) == 8 and len(held_out) == 4 and not set(pool) & set(held_out)
    assert all([p.question for p in args[2]] == pool for args, _ in evaluations[::2])
    assert all([p.question for p in args[2]] == held_out for args, _ in evaluations[1::2])
    # one train() call a segment, each going on from where the last stopped
    configs = [args[0] for args, _ in trainings]
    assert [(c.seed, c.steps, bool(c.resume)) for c in configs] == [
        (0, 1, False), (0, 2, True), (1, 1, False), (1, 2, True)]
    assert all(c.task == c.eval_task == str(out / "pool.jsonl") and c.alpha == 0 for c in configs)
    for s in (0, 1):  # the checkpoints are gone, the metrics stay
        assert not (out / f"seed{s}" / "run" / "checkpoint").exists()
        assert (out.parent / "kept" / f"seed{s}" / "run" / "checkpoint").is_dir()
        rows = [json.loads(line) for line in open(out / f"seed{s}" / "run" / "metrics.jsonl")]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]


def test_the_report_is_the_evaluations_differences_from_the_start(done):
    """Pass@1 and Pass@n at the last step recomputed from the saved summaries; the start's row is
    the start itself; the markdown has the table and the verdict."""
    out, result, _, _ = done
    start = json.load(open(out / "start" / "pool" / "summary.json"))
    ends = [json.load(open(out / f"seed{s}" / "step2" / "pool" / "summary.json")) for s in (0, 1)]
    before = per_problem_pass_at_k(start, [1, 4])  # (Q, 2)
    after = torch.stack([per_problem_pass_at_k(r, [1, 4]) for r in ends])  # (S, Q, 2)
    first, last = result["rows"][0]["pool"], result["rows"][-1]["pool"]
    for i, key in enumerate(("pass_at_1", "pass_at_k")):
        diff = last[key]["diff"]
        assert last[key]["mean"] == pytest.approx(after[..., i].mean().item())
        assert diff["mean"] == pytest.approx((after[..., i] - before[:, i]).mean().item())
        assert diff["low"] - 1e-12 <= diff["mean"] <= diff["high"] + 1e-12
        assert first[key]["diff"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert last["truncated"] == pytest.approx((ends[0]["truncated"] + ends[1]["truncated"]) / 2)
    assert result["rows"][0]["training"] is None
    assert set(result["rows"][1]["training"]) == {"reward", "entropy"}
    md = open(out / "results.md").read()
    assert "| step | pool Pass@1 | pool Pass@4 | held-out Pass@1 | held-out Pass@4 |" in md
    assert f"Verdict (pool, step 2, K = 4): {result['verdict']}." in md
    assert result["verdict"].split(":")[0] in ("narrowed", "not narrowed")


def test_resumed_segments_make_the_same_run_as_one_uninterrupted_train(done, tmp_path, monkeypatch):
    """Seed 0, trained in two segments of one step, against one train() call of two steps from the
    same Config: every logged number of every step, and every final weight, is the same."""
    out, _, _, _ = done
    model = json.load(open(out / "study.json"))["model"]
    cfg = narrowing.run_config(narrowing.parse(argv_for(model, tmp_path / "x")), str(out), 0, 2)
    monkeypatch.setattr(train, "grade_response", last_number_reward)  # as the study's runs had
    train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))

    def rows(folder):
        lines = open(folder / "metrics.jsonl")
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]

    segmented, whole = rows(out / "seed0" / "run"), rows(tmp_path / "whole")
    assert len(whole) == 2 and segmented == whole
    ends = [load_file(folder / "checkpoint" / "model.safetensors")
            for folder in (out.parent / "kept" / "seed0" / "run", tmp_path / "whole")]
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    start = load_file(os.path.join(model, "model.safetensors"))
    assert any(not torch.equal(start[k], ends[0][k]) for k in ends[0])  # (it did learn something)


def test_a_rerun_redoes_nothing(done, monkeypatch):
    out, result, _, _ = done
    for module, name in ((narrowing, "evaluate"), (train, "train"), (narrowing, "load_model")):
        monkeypatch.setattr(module, name, Count(getattr(module, name), refuse=True))
    again = narrowing.main(argv_for(json.load(open(out / "study.json"))["model"], out))
    assert again["rows"] == result["rows"] and again["verdict"] == result["verdict"]


def test_another_studys_folder_is_refused_in_one_line(done, capsys):
    out, _, _, _ = done
    with pytest.raises(SystemExit) as stop:
        narrowing.main(argv_for(json.load(open(out / "study.json"))["model"], out, "--lr", "3e-3"))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0
    assert "lr: 0.001 there, 0.003 now" in err and "--overwrite true" in err


@pytest.mark.parametrize("extra, says", [
    (["--every", "3"], "--steps 2 must be a multiple of --every 3"),
    (["--pool", "2"], "--pool 2 is smaller than one step's --prompts_per_step 4"),
    (["--pool", "0"], "--pool expects a positive int"),
    (["--pool", "500"], "arith:1 has only"),
    (["--task", "gsm8k"], "--task must be arith or arith:LEVEL"),
    (["--resume", "x"], "--resume is not a narrowing.py option"),
    (["--eval_task", "x.jsonl"], "--eval_task is not a narrowing.py option"),
    (["--lr", "fast"], "--lr expects a float"),
    (["--bogus", "1"], "unknown option '--bogus'"),
])
def test_bad_options_are_refused_in_one_line_before_anything_starts(tmp_path, capsys, extra, says):
    with pytest.raises(SystemExit) as stop:
        narrowing.main(argv_for(tmp_path / "no-model", tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0 and says in err, err
    assert not (tmp_path / "out").exists()


def test_the_verdict_on_hand_made_numbers():
    """20 problems, n = 8. The start gets 2 of 8 right on each: Pass@1 0.25, Pass@8 1. A model that
    gets 14 problems always right and 6 never: Pass@1 rose (+0.45) and Pass@8 fell (-0.3: 6 of 20
    problems lost, beyond the interval) -- narrowed. One that gets 6 of 8 on each: Pass@1 rose,
    Pass@8 stayed at 1 -- not narrowed. One that loses the 6 and keeps 2 of 8 on the rest: Pass@8
    fell, Pass@1 did not rise -- not narrowed."""
    def said(*seeds):
        d = narrowing.differences({"n": 8, "correct_counts": [2] * 20},
                                  [{"n": 8, "correct_counts": c} for c in seeds], 8)
        return narrowing.verdict(d["pass_at_1"]["diff"], d["pass_at_k"]["diff"], 8)

    narrowed = said([8] * 14 + [0] * 6)
    assert narrowed.startswith("narrowed: Pass@1 +0.450 [") and "Pass@8 -0.300 [" in narrowed
    assert said([8] * 14 + [0] * 6, [8] * 14 + [0] * 6).startswith("narrowed")  # two seeds alike
    sharper = said([6] * 20)
    assert sharper.startswith("not narrowed: Pass@1 +0.500 [+0.500, +0.500] rose")
    assert "Pass@8 +0.000 [+0.000, +0.000] did not fall" in sharper
    lost = said([2] * 14 + [0] * 6)
    assert lost.startswith("not narrowed: Pass@1 -0.075") and "did not rise" in lost
    # the rule at its edges: an interval that touches 0 is not beyond it
    up, down = {"mean": 0.1, "low": 1e-9, "high": 0.2}, {"mean": -0.1, "low": -0.2, "high": -1e-9}
    assert narrowing.verdict(up, down, 8).startswith("narrowed")
    assert narrowing.verdict({**up, "low": 0.0}, down, 8).startswith("not narrowed")
    assert narrowing.verdict(up, {**down, "high": 0.0}, 8).startswith("not narrowed")

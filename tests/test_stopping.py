"""Stopping and starting again: nothing overwritten, mixed or left behind. A finished run is not
run again, an evaluation's results are not replaced unasked, Ctrl-C (or SIGINT to a background job)
saves what there is and says so in one line, and no input leaves the folder's lock behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import rollout
import train
from conftest import ROOT
from plumbing import load, run_folder
from train import Config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def tiny_args(folder, out, *more):
    """train.py's command line for a fast run of the tiny model, with 2 held-out problems."""
    return ["--model", folder, "--out_dir", str(out), "--dtype", "float32", "--device", "cpu", "--progress", "false",
            "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "2", "--lr", "1e-3",
            "--steps", "1", "--eval_problems", "2", *more]


def files_of(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}


def one_line(err: str) -> str:
    """The one line said, past the progress bars (transformers' "Loading weights", our sampling)."""
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# --- train.py: a finished run is not resumed; a stopped one keeps its start -----------------------


def test_a_finished_run_is_refused_on_resume_and_left_byte_for_byte(tmp_path, tiny_folder, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_folder, out) + ["--keep_optimizer", "true"])  # so it can be extended
    before = files_of(out)
    ckpt = str(out / "checkpoint")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", ckpt])
    assert stop.value.code == 2
    assert "--steps N with N > 1" in one_line(capsys.readouterr().err)
    assert files_of(out) == before and not (out / run_folder.LOCK).exists()
    train.main(["--resume", ckpt, "--steps", "2"])  # told to train on, it does
    assert [(r["kind"], r["step"]) for r in runs_rows(out)] == [("eval", 0), ("train", 1), ("eval", 1),
                                                               ("train", 2), ("eval", 2)]


def ctrl_c_on_second_call(real):
    """`real`, wrapped to raise KeyboardInterrupt (a Ctrl-C) on its second call."""
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    return wrapped


def runs_rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_a_run_stopped_in_its_final_evaluation_finishes_it_on_resume(tmp_path, tiny_folder, monkeypatch):
    """Its checkpoint is at the last step but no summary.json was written: resumed with the same
    --steps, it runs the final evaluation (experiment.py relies on that)."""
    out = tmp_path / "run"
    real = train.evaluate_held_out

    def ctrl_c_in_the_final_evaluation(cfg, actor, tokenizer, held_out, step, log):
        if step == cfg.steps:
            raise KeyboardInterrupt
        return real(cfg, actor, tokenizer, held_out, step, log)

    monkeypatch.setattr(train, "evaluate_held_out", ctrl_c_in_the_final_evaluation)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_folder, out))
    assert stop.value.code == 130 and not (out / "summary.json").exists()
    monkeypatch.undo()
    train.main(["--resume", str(out / "checkpoint")])
    assert [(r["kind"], r["step"]) for r in runs_rows(out)] == [("eval", 0), ("train", 1), ("eval", 1)]
    assert "start_accuracy" in json.load(open(out / "summary.json"))


def test_a_run_interrupted_then_resumed_keeps_its_start_accuracy(tmp_path, tiny_folder, monkeypatch, capsys):
    out = tmp_path / "run"
    real = train.update

    monkeypatch.setattr(train, "update", ctrl_c_on_second_call(real))  # during the second step
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_folder, out, "--steps", "3"))
    assert stop.value.code == 130 and not (out / run_folder.LOCK).exists()
    monkeypatch.undo()
    capsys.readouterr()
    train.main(["--resume", str(out / "checkpoint")])
    start = runs_rows(out)[0]
    assert start["kind"] == "eval" and start["step"] == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["start_accuracy"] == start["accuracy"] and "diff_se" in summary
    assert "held-out pass@1" in capsys.readouterr().out  # the before/after line


# --- train.py: no traceback and no lock left, whatever the input ---------------------------------


def test_no_steps_and_no_evaluation_runs_cleanly(tmp_path, tiny_folder):
    out = tmp_path / "run"
    summary = train.main(tiny_args(tiny_folder, out, "--steps", "0", "--eval_problems", "0"))
    assert summary["steps"] == 0 and (out / "summary.json").exists() and not (out / run_folder.LOCK).exists()


@pytest.mark.parametrize("case", ["context", "offline hub id", "ctrl-c while loading"])
def test_failures_after_the_folder_is_claimed_leave_no_lock(case, tmp_path, tiny_folder, monkeypatch, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_folder, out)
    if case == "context":  # the tiny model has 512 positions
        args += ["--max_new_tokens", "100000"]
    elif case == "offline hub id":
        monkeypatch.setattr(load, "hub_reachable", lambda *a, **k: False)  # as without a network
        args += ["--model", "nobody/no-such-model-0.5B"]
    else:
        def ctrl_c(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(train, "load_model", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    captured = capsys.readouterr()
    assert not (out / run_folder.LOCK).exists()
    if case == "ctrl-c while loading":
        assert stop.value.code == 130 and "Traceback" not in captured.err
        assert "interrupted: no checkpoint was saved: run the same command again" in captured.out
    else:
        assert stop.value.code == 2
        assert ("context of 512" if case == "context" else "hub cannot be reached") in one_line(captured.err)


def test_sigint_stops_a_background_run_which_saves_and_exits_130(tmp_path, tiny_folder):
    """A shell script's `python train.py &` starts it with SIGINT ignored; train.py sets it again."""
    out = tmp_path / "run"
    args = tiny_args(tiny_folder, out, "--steps", "100000", "--eval_problems", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130, stderr
    assert "interrupted: saving a checkpoint" in stdout and "Traceback" not in stderr
    assert (out / "checkpoint" / "trainer_state.pt").exists() and not (out / run_folder.LOCK).exists()


# --- evaluate.py: results are never replaced unasked; Ctrl-C keeps what was sampled ---------------


def eval_args(folder, out, *more):
    return ["--model", folder, "--task", "arith:1", "--limit", "6", "--n", "2", "--max-new-tokens", "3",
            "--batch-prompts", "2", "--device", "cpu", "--out", str(out), *more]


def test_evaluate_refuses_a_folder_with_results_unless_told_to_replace_them(tmp_path, tiny_folder, capsys):
    out = tmp_path / "eval"
    evaluate.main(eval_args(tiny_folder, out))
    before = {f: (out / f).read_bytes() for f in ("summary.json", "samples.jsonl", "passk.png")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # refused before the model loads: this one does not exist
        evaluate.main(eval_args("/nonexistent/model-folder", out, "--seed", "1"))
    assert stop.value.code == 2
    assert "--overwrite true" in one_line(capsys.readouterr().err)
    assert {f: (out / f).read_bytes() for f in before} == before
    evaluate.main(eval_args(tiny_folder, out, "--seed", "1", "--overwrite", "true"))
    assert (out / "samples.jsonl").read_bytes() != before["samples.jsonl"]


def test_ctrl_c_in_evaluate_saves_the_problems_sampled_and_exits_130(tmp_path, tiny_folder, monkeypatch, capsys):
    out = tmp_path / "eval"
    real = rollout.sample

    monkeypatch.setattr(rollout, "sample", ctrl_c_on_second_call(real))  # the second batch
    with pytest.raises(SystemExit) as stop:
        evaluate.main(eval_args(tiny_folder, out))
    assert stop.value.code == 130
    line = one_line(capsys.readouterr().err)
    assert line.startswith("interrupted: 2 of 6 problems sampled") and str(out) in line
    summary = json.load(open(out / "summary.json"))
    assert summary["partial"] is True and summary["num_problems"] == 2 and summary["problems_asked"] == 6
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2  # 2 problems x n = 2

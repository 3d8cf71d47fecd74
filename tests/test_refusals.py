"""Bad input, across the five scripts: one line on stderr naming the fix, exit code 2, no traceback,
and nothing slow first. Every case points --model at a folder that does not exist: had the model been
loaded before the check, the message would be "no such model folder" and the case would fail."""

import json
import re

import pytest
import torch

import bench
import entropy_view
import evaluate
import experiment
import train

NO_MODEL = "/nonexistent/model-folder"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Broken task files and folders, named by what is wrong with them."""
    d = tmp_path_factory.mktemp("bad")
    good = [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(40)]
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{\"question\": \"3 + 3\", \n")
    (d / "null_answer.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"question": "1 + 1", "answer": None}) + "\n")
    (d / "no_answer.jsonl").write_text("".join(json.dumps({"question": r["question"], "result": r["answer"]}) + "\n" for r in good))
    (d / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[:3]))
    (d / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (d / "list.json").write_text(json.dumps({"question": "q", "answer": "a"}))
    (d / "tasks.txt").write_text("What is 1 + 1? 2\n")
    (d / "a_file").write_text("not a folder")
    (d / "old_run").mkdir()
    (d / "old_run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (d / "half_checkpoint").mkdir()
    (d / "half_checkpoint" / "train_config.json").write_text(json.dumps({"model": NO_MODEL}))
    (d / "out_folder").mkdir()
    return d


def T(*argv):  # train.py with a fresh output folder (filled in by the test)
    return (train.main, ["--model", NO_MODEL, "--progress", "false", *argv])


def E(*argv):
    return (evaluate.main, ["--model", NO_MODEL, *argv])


def V(*argv):
    return (entropy_view.main, ["--model", NO_MODEL, *argv])


def X(*argv):
    return (experiment.main, ["--model", NO_MODEL, *argv])


def B(*argv):
    return (bench.main, list(argv))


CASES = [  # (script and argv, the message expected); {d} is the folder of the files above
    # train.py: ranges, all checked before the model loads
    (T("--top_p", "0"), r"--top_p must be in \(0, 1\]"),
    (T("--top_p", "1.5"), r"--top_p must be in \(0, 1\]"),
    (T("--temperature", "-1"), "--temperature must be >= 0"),
    (T("--temperature", "nan"), "--temperature must be >= 0"),
    (T("--lr", "nan"), "--lr and --critic_lr must be positive"),
    (T("--lr", "0"), "--lr and --critic_lr must be positive"),
    (T("--critic_lr", "-1e-6"), "--lr and --critic_lr must be positive"),
    (T("--group_size", "1"), "--group_size must be >= 2"),
    (T("--kappa", "1"), "--kappa must be > 1"),
    (T("--alpha", "-0.1"), "--alpha must be >= 0"),
    (T("--alpha", "inf"), "--alpha must be >= 0"),
    (T("--algo", "dpo"), "--algo must be grpo or ppo"),
    (T("--dtype", "float64"), "--dtype must be"),
    (T("--steps", "-1"), "--steps must be >= 0"),
    (T("--prompts_per_step", "0"), "--prompts_per_step and --max_new_tokens >= 1"),
    (T("--max_new_tokens", "0"), "--prompts_per_step and --max_new_tokens >= 1"),
    (T("--mini_batches", "3"), "--mini_batches must divide --prompts_per_step"),
    (T("--save_every", "-1"), "--save_every, --eval_every and --eval_problems must be >= 0"),
    (T("--eval_batch", "0"), "--eval_batch >= 1"),
    (T("--grad_clip", "0"), "--grad_clip > 0"),
    (T("--eps_low", "1"), r"--eps_low must be in \[0, 1\)"),
    (T("--gamma", "2"), r"--gamma and --lam in \[0, 1\]"),
    (T("--seed", "-1"), "--seed must be >= 0"),
    (T("--steps", "ten"), "--steps expects an int, got 'ten'"),
    (T("--lerning_rate", "1e-6"), "unknown option '--lerning_rate'. Valid options: .*--lr"),
    (T("--lr"), "--lr expects a float, got nothing"),
    (T("--overwrite"), "--overwrite expects true or false, got nothing"),
    (T("--overwrite", "--steps", "3"), "--overwrite expects true or false, got '--steps'"),
    (T("--stpes", "3"), "unknown option '--stpes': did you mean --steps\\? Valid options: "),
    (T("--preset", "qwen-7b"), "unknown preset 'qwen-7b': use one of .*qwen05-gsm8k"),
    (T("--device", "tpu"), "--device must be cpu or cuda"),
    pytest.param(T("--device", "cuda"), "torch sees no GPU here: use --device cpu", marks=NO_GPU),
    pytest.param(T("--cuda_graph", "true"), "--cuda_graph true needs a CUDA device", marks=NO_GPU),
    (T("--cuda_graph", "yes"), "--cuda_graph must be auto, true or false"),
    (T("--recompute", "sometimes"), "--recompute must be auto, true or false"),
    (T("--micro_batch", "0"), "--micro_batch must be auto or a number of rows >= 1"),
    (T("--micro_batch", "big"), "--micro_batch must be auto or a number of rows >= 1"),
    (T("--dtype", "float8"), "--dtype must be auto, float32, bfloat16 or float16"),
    # train.py: the task file, the output folder, the checkpoint to resume
    (T("--task", "{d}/missing.jsonl"), "no such file"),
    (T("--task", "{d}/empty.jsonl"), "holds no problems"),
    (T("--task", "{d}/broken.jsonl"), r"broken.jsonl, line 3: not valid JSON"),
    (T("--task", "{d}/null_answer.jsonl"), r"null_answer, line 2: the answer \('answer'\) is missing or empty"),
    (T("--task", "{d}/no_answer.jsonl"), "no answer field found among .*result.*; name it with --answer-field"),
    (T("--task", "{d}/good.jsonl", "--answer_field", "nope"), "no answer field found"),
    (T("--task", "{d}/few.jsonl", "--eval_problems", "0"), "3 training problems, fewer than one step's --prompts_per_step 4"),
    (T("--task", "{d}/list.json"), "must hold a list of objects"),
    (T("--task", "{d}/tasks.txt"), "use a .jsonl, .json or .parquet file"),
    (T("--task", "no-such-task"), "unknown task 'no-such-task'"),
    (T("--task", "arith:9"), "arith has levels"),
    (T("--eval_task", "{d}/empty.jsonl"), "holds no problems"),
    (T("--out_dir", "{d}/a_file"), "is a file"),
    (T("--out_dir", "{d}/a_file/run"), "is a file"),
    (T("--out_dir", "{d}/old_run"), "holds another run .*--overwrite true"),
    (T("--resume", "{d}/nowhere"), "no train_config.json"),
    (T("--resume", "{d}/half_checkpoint"), "no trainer_state.pt there"),
    # evaluate.py
    (E("--n", "0"), "--n and --max-new-tokens must be positive"),
    (E("--max-new-tokens", "0"), "--n and --max-new-tokens must be positive"),
    (E("--temperature", "-1"), "--temperature must be a number >= 0"),
    (E("--top-p", "2"), r"--top-p must be in \(0, 1\]"),
    (E("--n", "2", "--k", "5"), "--k 5 exceeds --n 2"),
    (E("--k", "a,b"), "comma-separated integers"),
    (E("--n", "x"), "argument --n: invalid int value"),
    (E("--grader", "sympy"), "argument --grader: invalid choice"),
    (E("--batch-prompts", "0"), "--batch-prompts must be positive"),
    (E("--limit", "0"), "limit must be a positive number"),
    (E("--device", "tpu"), "--device must be cpu or cuda"),
    pytest.param(E("--cuda-graph", "true"), "--cuda-graph true needs a CUDA device", marks=NO_GPU),
    (E("--cuda-graph", "on"), "--cuda-graph must be auto, true or false"),
    (E("--out", "{d}/a_file"), "is a file"),
    (E("--task", "{d}/broken.jsonl"), "line 3: not valid JSON"),
    (E("--task", "{d}/null_answer.jsonl"), "line 2: the answer"),
    (E("--compare", "{d}/nowhere"), "holds no summary.json"),
    # entropy_view.py
    (V("--n", "0"), "--n and --max-new-tokens must be positive"),
    (V("--limit", "0"), "--limit must be a positive"),
    (V("--top-p", "0"), r"--top-p must be in \(0, 1\]"),
    (V("--task", "nonsense"), "unknown task 'nonsense'"),
    (V("--task", "{d}/no_answer.jsonl"), "name it with --answer-field"),
    (V("--out", "{d}/a_file"), "is a file"),
    (V("--device", "tpu"), "--device must be cpu or cuda"),
    pytest.param(V("--cuda-graph", "true"), "--cuda-graph true needs a CUDA device", marks=NO_GPU),
    # experiment.py
    (X("--alpha", "0"), "would make the entropy arm plain"),
    (X("--arms", "plain,entropi"), "--arms takes plain"),
    (X("--size", "tpu"), "--size must be cpu or gpu"),
    (X("--seeds", "0"), "--seeds expects a positive int"),
    (X("--n", "0"), "--n expects a positive int"),
    (X("--resume", "x"), "rerun the same command"),
    (X("--eval_problems", "0"), "--eval_problems must be >= 1"),
    (X("--stpes", "3"), "unknown option '--stpes'"),
    (X("--preset", "qwen05-gsm8k"), "--preset is train.py's"),
    (X("--top_p", "2"), r"--top_p must be in \(0, 1\]"),
    (X("--out_dir", "{d}/a_file"), "is a file"),
    # bench.py
    (B("--device", "tpu"), "argument --device: invalid choice"),
    (B("--out", "{d}/out_folder"), "is a folder: name a file"),
    (B("--out", "{d}/nowhere/bench.json"), "does not exist"),
    (B("--rows", "1,10"), "no row '10' on cpu; the rows are 1,1b,1c"),
    (B("--rows", "6a"), "no row '6a' on cpu"),  # a GPU row
    (B("--quick", "--fast"), "unrecognized arguments: --fast"),
    pytest.param(B("--device", "cuda"), "torch sees no GPU here", marks=NO_GPU),
]


@pytest.mark.parametrize("script, message", CASES)
def test_bad_input_is_refused_in_one_line(script, message, files, tmp_path, capsys):
    main, argv = script
    argv = [a.replace("{d}", str(files)) for a in argv]
    if main in (train.main, experiment.main) and "--out_dir" not in argv:
        argv = ["--out_dir", str(tmp_path / "run"), *argv]  # first: a case may end in an option without its value
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_missing_model_is_refused_before_the_out_folder_is_touched(tmp_path, capsys):
    """The model is the last check and comes before the folder's lock, the logger and the precision
    probe: a typo in --model with --overwrite true must not clear the run that was there."""
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    for model, message in [(NO_MODEL, "no such model folder"), ("typo.gguf", "no such GGUF file"),
                           ("smollm", "unknown model 'smollm'")]:
        with pytest.raises(SystemExit) as e:
            train.main(["--model", model, "--out_dir", str(old), "--overwrite", "true", "--progress", "false"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl"]  # no lock taken, nothing cleared


def test_the_table_is_long_enough():
    assert len(CASES) >= 40


# --- help, and both spellings of an option ------------------------------------------------------


@pytest.mark.parametrize("main", [train.main, evaluate.main, entropy_view.main, bench.main])
def test_help_exits_0_and_lists_every_option(main, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    if main is train.main:  # every Config field, with its default
        for f in train.dataclasses.fields(train.Config):
            assert re.search(rf"--{f.name} +\S", out), f.name
    else:
        assert "(default:" in out


@pytest.mark.parametrize("flag", ["--max_new_tokens", "--max-new-tokens"])
def test_both_spellings_reach_the_same_option(flag, capsys):
    """train.py says --max_new_tokens, evaluate.py --max-new-tokens: each script takes both."""
    for main, args in ((evaluate.main, ["--model", NO_MODEL]), (train.main, ["--model", NO_MODEL, "--progress", "false"])):
        with pytest.raises(SystemExit) as stop:
            main([*args, flag, "0"])
        assert stop.value.code == 2 and "max" in capsys.readouterr().err  # refused for its value, not its name


# --- the user's own folders ---------------------------------------------------------------------


def test_the_users_runs_and_results_are_neither_seen_nor_touched(tmp_path):
    """Following the README in order leaves a finished run in runs/default and an evaluation in
    out/eval of the folder where `python -m pytest` then starts. Here a stand-in of that folder holds
    both, and the refusal cases (several use the default --out_dir or --out) run from it in a pytest
    of their own: they must pass, and leave the folder as it was."""
    import subprocess
    import sys

    from conftest import ROOT

    user = tmp_path / "repo"
    (user / "runs" / "default").mkdir(parents=True)
    (user / "runs" / "default" / "metrics.jsonl").write_text('{"kind": "train", "step": 12}\n')
    (user / "runs" / "default" / "summary.json").write_text('{"steps": 12}\n')
    (user / "out" / "eval").mkdir(parents=True)
    (user / "out" / "eval" / "summary.json").write_text('{"pass_at_k": {"1": 0.5}}\n')
    def outputs():  # the scripts' folders (pytest's plugins may add their own beside them)
        return sorted(str(p.relative_to(user)) for d in ("runs", "out") for p in (user / d).rglob("*"))

    before = outputs()
    cases = [f"{ROOT}/tests/test_train.py::test_bad_config_values_give_one_clear_message",
             f"{ROOT}/tests/test_refusals.py::test_bad_input_is_refused_in_one_line"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                          str(tmp_path / "basetemp"), *cases], cwd=user, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert outputs() == before

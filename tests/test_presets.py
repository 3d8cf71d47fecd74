"""config/'s presets: each one parses and passes check_config; a flag given wins over it; an unknown
preset, an unknown key, a value of the wrong type and a line of code are refused in one line."""

import dataclasses
import json
import os
import re

import pytest

import train
from plumbing import command_line
from train import Config

PRESETS = sorted(command_line.preset_names())


def test_there_are_presets_and_help_lists_them(capsys):
    assert {"qwen05-gsm8k", "qwen-math-1.5b"} <= set(PRESETS)
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"  {name} " in out and command_line.preset_names()[name] in out


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_parses_and_passes_check_config(name):
    values = command_line.parse_args(["--preset", name], Config)
    assert values and set(values) <= {f.name for f in dataclasses.fields(Config)}
    train.check_config(train.resolve_defaults(Config(**values)))  # raises on a bad value


def test_the_gsm8k_preset_is_the_readme_recipe():
    values = command_line.read_preset("qwen05-gsm8k", Config)
    assert values == dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="gsm8k", out_dir="runs/qwen05-gsm8k",
                          max_new_tokens=512, prompts_per_step=64, group_size=8, mini_batches=4, lr=1e-6,
                          steps=200, eval_problems=500, eval_every=50)


def test_a_flag_given_wins_over_the_preset_wherever_it_stands():
    for argv in (["--preset", "qwen05-gsm8k", "--steps", "5", "--lr=2e-6"],
                 ["--steps", "5", "--preset=qwen05-gsm8k", "--lr", "2e-6"]):
        values = command_line.parse_args(argv, Config)
        assert values["steps"] == 5 and values["lr"] == 2e-6 and values["task"] == "gsm8k"


def test_a_preset_may_be_a_file_of_your_own(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("# my run\nlr = 3e-6  # a comment\nalpha = None\ncritic_lr = 1  # an int where a float goes\n"
                    "gradient_checkpointing = True\n")
    assert command_line.parse_args(["--preset", str(path)], Config) == dict(lr=3e-6, alpha=None, critic_lr=1.0,
                                                                      gradient_checkpointing=True)


@dataclasses.dataclass
class Edited:
    """A Config whose defaults someone edited: a flag's type is its annotation's, not its default's."""
    alpha: float | None = 0  # an int default on a float field
    steps: "int" = 12  # an annotation written as a string (as `from __future__ import annotations` does)
    overwrite: bool = False


def test_a_flags_type_is_its_annotation_not_its_default(tmp_path):
    assert command_line.parse_args(["--alpha", "0.4", "--steps", "3"], Edited) == dict(alpha=0.4, steps=3)
    assert command_line.parse_args(["--alpha", "none"], Edited) == dict(alpha=None)  # None: the paper's value
    assert command_line.parse_args(["--alpha", "none"], Config) == dict(alpha=None)
    with pytest.raises(ValueError, match="--steps expects an int, got 'none'"):
        command_line.parse_args(["--steps", "none"], Edited)  # only a field that allows None takes it
    path = tmp_path / "mine.py"
    path.write_text("alpha = 0.4\nsteps = 3\n")  # presets follow the same rule
    assert command_line.read_preset(str(path), Edited) == dict(alpha=0.4, steps=3)
    path.write_text("steps = None\n")
    with pytest.raises(ValueError, match="steps = None should be an int"):
        command_line.read_preset(str(path), Edited)


@pytest.mark.parametrize("text, message", [
    ("lerning_rate = 1e-6\n", r"mine.py line 1: unknown key 'lerning_rate'"),
    ("# ok\nsteps = '10'\n", r"mine.py line 2: steps = '10' should be an int: write a whole number"),
    ("steps = 10.5\n", "steps = 10.5 should be an int"),
    ("steps = True\n", "steps = True should be an int"),
    ("progress = 'false'\n", "progress = 'false' should be a bool: write True or False"),
    ("task = gsm8k\n", "task must be a plain value"),
    ("lr = 2 * 1e-6\n", "lr must be a plain value"),
    ("import os\n", "a preset holds only name = value lines"),
    ("lr = (\n", "line 1: not a name = value line"),
])
def test_a_bad_preset_is_refused_in_one_line_naming_the_fix(tmp_path, capsys, text, message):
    path = tmp_path / "mine.py"
    path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        train.main(["--preset", str(path), "--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was made


def test_train_runs_from_a_preset_with_a_flag_on_top(tmp_path, tiny_folder, one_thread):
    """The whole command line: the preset's values reach the run (its saved config), the flag wins."""
    path = tmp_path / "tiny.py"
    path.write_text(f"# a tiny run\nmodel = {tiny_folder!r}\nout_dir = {str(tmp_path / 'run')!r}\ndevice = 'cpu'\n"
                    "dtype = 'float32'\nprogress = False\nprompts_per_step = 2\ngroup_size = 4\nmax_new_tokens = 4\n"
                    "steps = 5\neval_problems = 0\n")
    train.main(["--preset", str(path), "--steps", "1"])
    saved = json.load(open(tmp_path / "run" / "checkpoint" / "train_config.json"))
    assert saved["steps"] == 1 and saved["group_size"] == 4 and saved["max_new_tokens"] == 4 and saved["model"] == tiny_folder

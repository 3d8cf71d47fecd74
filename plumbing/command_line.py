"""
plumbing/command_line.py -- the command line of every script: train.py's --name value flags,
presets and --help, check_config(), and the parser and checks the other scripts share.

train.py's options are read from one place, its Config: the fields are the options, their annotated
types check the values (`alpha: float | None` also takes none), and the comment next to each field
is its help text. experiment.py uses the same parser for the options it passes on to every run
(but not --preset: its own presets are --size).

    python train.py --lr 1e-6 --steps 40            # any Config field as --name value (or --name-with-dashes)
    python train.py --preset qwen05-gsm8k           # a recipe from config/ (see --help for the list)
    python train.py --preset qwen05-gsm8k --steps 5 # flags given on the command line win over the preset

A preset (nanoGPT's config/ files) is a small commented file of `name = value` lines, e.g.
config/qwen05-gsm8k.py. It is read, never run: each value must be a literal (a number, a string,
True/False or None), each name a Config field of the right type, or the preset is refused with the
line to fix. check_config() refuses a bad value before anything slow starts.

evaluate.py, entropy_view.py, bench.py and one_update.py use OneLineParser, argparse whose errors
are one line, and the checks every script makes before it spends time on a model. The rule they
serve: a typo costs a second, not a model load, and a bad --out never costs the results. So
options are checked in this order: ranges (check_sampling), output paths (check_out_file,
make_out_folder), then, once the model is loaded and before any sampling, the model's context
length (check_context). Each refusal is one line that names the fix.
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import typing

from plumbing.metrics import MetricsLogger

# the folder of named presets, beside train.py
PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")



# -----------------------------------------------------------------------------------------------
# --name value


def parse_args(argv, schema) -> dict:
    """['--lr', '1e-6', ...] -> {'lr': 1e-06, ...}, each value checked against the field's type in
    `schema` (train.Config). --preset NAME puts the preset's values underneath: a flag given wins.
    -h or --help prints config_help() and exits."""
    if "-h" in argv or "--help" in argv:
        print(config_help(schema))
        raise SystemExit(0)
    fields = [f.name for f in dataclasses.fields(schema)]
    preset, overrides = {}, {}
    it = iter(argv)
    for arg in it:
        name = arg[2:] if arg.startswith("--") else None
        if name is not None and "=" in name:
            name, value = name.split("=", 1)  # --name=value (the value's own dashes stay: --lr=1e-6)
        else:
            value = next(it, None)
        name = name and name.replace("-", "_")  # --max-new-tokens is --max_new_tokens
        if name not in fields and name != "preset":
            raise ValueError(unknown_option(arg, name, fields))
        if name == "preset":
            if value is None:
                raise ValueError("option --preset needs a value: a preset's name or a .py file")
            preset = read_preset(value, schema)
            continue
        kind, optional = field_type(schema, name)
        try:
            overrides[name] = from_text(value, kind, optional)
        except ValueError:
            got = "nothing" if value is None else f"'{value}'"
            raise ValueError(f"--{name} expects {type_words(kind, optional)}, got {got}") from None
    return {**preset, **overrides}


def unknown_option(arg: str, name, fields) -> str:
    """The message for an option that is not a field: the nearest field first, if one is near."""
    near = difflib.get_close_matches(name, fields, n=1) if name else []
    hint = f": did you mean --{near[0]}?" if near else "."
    options = " ".join(f"--{n}" for n in ["preset", *fields])
    return f"unknown option '{arg}'{hint} Valid options: {options}"


def field_type(schema, name: str) -> tuple:
    """(the type a field's values have, whether None is allowed too), read from its annotation,
    never its default: `alpha: float | None = 0` takes floats and None. Annotations written as
    strings (`from __future__ import annotations`) are resolved by typing.get_type_hints."""
    hint = typing.get_type_hints(schema)[name]
    args = typing.get_args(hint) or (hint,)  # float | None -> (float, NoneType); float -> (float,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
        raise TypeError(f"{schema.__name__}.{name}: {hint}: not bool, int, float or str (or X | None)")
    return kinds[0], len(kinds) < len(args)


def from_text(value, kind: type, optional: bool):
    """A flag's text as a value of its field's type: true/false (or 1/0) for a bool, "none" for None
    where the field allows it (alpha's None is "the paper's value"). ValueError if it is neither."""
    if value is None:
        raise ValueError
    if optional and value.lower() == "none":
        return None
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        return value.lower() in ("true", "1")
    return kind(value)


A_TYPE = {bool: "a bool", int: "an int", float: "a float", str: "a str"}


def type_words(kind: type, optional: bool) -> str:
    """What a flag takes, in words: 'true or false', 'an int', 'a float or none'."""
    return ("true or false" if kind is bool else A_TYPE[kind]) + (" or none" if optional else "")


# -----------------------------------------------------------------------------------------------
# Presets: config/NAME.py


def preset_names() -> dict:
    """{name: the first line of its comment} for each preset in config/, for --help."""
    names = {}
    for file in sorted(os.listdir(PRESETS)) if os.path.isdir(PRESETS) else []:
        if file.endswith(".py"):
            first = next((line for line in open(os.path.join(PRESETS, file)) if line.strip()), "")
            names[file[:-3]] = first.lstrip("# ").strip()
    return names


def read_preset(name: str, schema) -> dict:
    """A preset's {field: value}: NAME of a file in config/, or the path of a file of your own.
    Read with ast.literal_eval, one assignment at a time: a preset holds values, never code."""
    path = name if name.endswith(".py") and os.path.isfile(name) else os.path.join(PRESETS, name + ".py")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset '{name}': use one of {', '.join(preset_names()) or '(none)'} "
                         f"(the files in {os.path.relpath(PRESETS)}/), or the path of a .py file of name = value lines")
    where = os.path.relpath(path)
    try:
        tree = ast.parse(open(path).read(), where)
    except SyntaxError as e:
        raise ValueError(f"{where} line {e.lineno}: not a name = value line ({e.msg})") from None
    fields, values = [f.name for f in dataclasses.fields(schema)], {}
    for node in tree.body:
        at = f"{where} line {node.lineno}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{at}: a preset holds only name = value lines and comments")
        key = node.targets[0].id
        if key not in fields:
            raise ValueError(f"{at}: unknown key '{key}': the keys are train.py's options (python train.py --help)")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError):
            raise ValueError(f"{at}: {key} must be a plain value (a number, 'text', True/False or None), "
                             "not an expression") from None
        values[key] = checked(key, value, *field_type(schema, key), at)
    return values


def checked(key: str, value, kind: type, optional: bool, at: str):
    """A preset's value, if it has its field's type, from field_type (an int where a float is wanted
    is fine; None where the field allows it); else the fix."""
    if value is None and optional:
        return None
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        example = {bool: "True or False", int: "a whole number", float: "a number", str: f"'{value}' in quotes"}[kind]
        raise ValueError(f"{at}: {key} = {value!r} should be {A_TYPE[kind]}: write {example}")
    return value


# -----------------------------------------------------------------------------------------------
# The values checked, all together, before anything slow starts


def check_config(cfg):
    """Refuse settings that would fail later, or silently train something else, with the fix named.
    Takes a resolved Config (resolve_defaults); reads no file and loads nothing, so it is instant."""
    from evaluate import check_device, cuda_graph_option  # here: evaluate.py imports this file

    problems = []

    def need(ok, message):
        if not ok:  # (written as "ok", so a NaN, for which every comparison is False, is refused too)
            problems.append(message)

    need(cfg.group_size >= 2, "--group_size must be >= 2: GRPO compares answers within a group (the paper uses 8)")
    need(1 < cfg.kappa < math.inf, "--kappa must be > 1 so the entropy bonus cannot flip an advantage's sign (the paper uses 2)")
    need(0 <= cfg.alpha < math.inf, "--alpha must be >= 0 (0.4 for GRPO, 0.1 for PPO, 0 = off)")
    need(0 < cfg.lr < math.inf and 0 < cfg.critic_lr < math.inf, "--lr and --critic_lr must be positive (the paper: 1e-6 and 2e-6)")
    need(cfg.algo in ("grpo", "ppo"), f"--algo must be grpo or ppo, got '{cfg.algo}'")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"), f"--dtype must be auto, float32, bfloat16 or float16, got '{cfg.dtype}'")
    for name in ("cuda_graph", "recompute"):
        need(getattr(cfg, name) in ("auto", "true", "false"), f"--{name} must be auto, true or false, got '{getattr(cfg, name)}'")
    need(str(cfg.micro_batch) == "auto" or (str(cfg.micro_batch).isdigit() and int(cfg.micro_batch) >= 1),
         f"--micro_batch must be auto or a number of rows >= 1, got '{cfg.micro_batch}'")
    need(cfg.steps >= 0 and cfg.prompts_per_step >= 1 and cfg.max_new_tokens >= 1,
         "--steps must be >= 0; --prompts_per_step and --max_new_tokens >= 1")
    need(cfg.mini_batches >= 1 and cfg.prompts_per_step % cfg.mini_batches == 0,
         f"--mini_batches must divide --prompts_per_step ({cfg.prompts_per_step}): a group stays in one mini-batch")
    need(0 <= cfg.temperature < math.inf, f"--temperature must be >= 0 (the paper trains at 1.0), got {cfg.temperature}")
    need(0 < cfg.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    need(0 <= cfg.weight_decay < math.inf and 0 < cfg.grad_clip < math.inf,
         "--weight_decay must be >= 0 and --grad_clip > 0 (defaults 0 and 1)")
    need(0 <= cfg.eps_low < 1 and 0 <= cfg.eps_high < math.inf, "--eps_low must be in [0, 1) and --eps_high >= 0 (the paper: 0.2, 0.28)")
    need(0 <= cfg.kl_coef < math.inf and 0 <= cfg.entropy_coef < math.inf, "--kl_coef and --entropy_coef must be >= 0 (0 = off)")
    need(0 < cfg.value_clip < math.inf and 0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1 and cfg.critic_warmup >= 0,
         "--value_clip must be > 0, --gamma and --lam in [0, 1], --critic_warmup >= 0")
    need(cfg.save_every >= 0 and cfg.eval_every >= 0 and cfg.eval_problems >= 0 and cfg.eval_batch >= 1,
         "--save_every, --eval_every and --eval_problems must be >= 0 (0 = off), --eval_batch >= 1")
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    check_device(None if cfg.device == "auto" else cfg.device)
    MetricsLogger.check(cfg)
    cuda_graph_option(cfg.cuda_graph, cfg.device, "--cuda_graph")  # true without CUDA: refused here, before the model loads


# -----------------------------------------------------------------------------------------------
# --help


def config_help(schema) -> str:
    """Every option with its default and its comment, grouped as in Config, then the presets. Read
    from Config's own source, so the comment next to a field is the one place where a knob is explained."""
    lines = ["usage: python train.py [--preset NAME] [--name value ...]   "
             "(--name_with_underscores or --name-with-dashes; -h: this)"]
    for text in (line.strip() for line in inspect.getsource(schema).splitlines()[2:]):
        field = re.match(r"(\w+): [^=]+= (.+?)(?:\s+# (.*))?$", text)
        if text.startswith("# ---"):
            lines.append("\n" + text.lstrip("# -").strip())
        elif text.startswith("#"):  # a comment that goes on from the field above
            lines.append(" " * 36 + text.lstrip("# ").strip())
        elif field:
            name, default, comment = field.groups()
            lines.append(f"  --{name:<20} {default:<10} {comment or ''}".rstrip())
    lines.append(f"\npresets (--preset NAME: the values in {os.path.relpath(PRESETS)}/NAME.py; flags given win)")
    lines += [f"  {name:<31} {about}" for name, about in preset_names().items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The other scripts: checks made before the model loads, or right after it, before any sampling


def check_sampling(n: int, max_new_tokens: int, temperature: float, top_p: float):
    """The ranges of the sampling options evaluate.py and entropy_view.py share."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"--n and --max-new-tokens must be positive, got {n} and {max_new_tokens}")
    if not (0 <= temperature < math.inf):
        raise ValueError(f"--temperature must be a number >= 0 (0 = greedy; the paper evaluates at 0.6), got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1] (1 = off; the paper uses 0.95), got {top_p}")


def check_context(model, tokenizer, problems: list, max_new_tokens: int, option: str = "--max-new-tokens"):
    """Refuse a prompt plus max_new_tokens beyond the model's context (max_position_embeddings):
    it would allocate a KV cache of that size and then run until killed. Only the 16 longest
    questions (in characters) are tokenised: enough to find the longest prompt, and quick."""
    from rollout import format_prompt

    limit = (model.hf_config or {}).get("max_position_embeddings")
    if not limit or not problems:
        return
    longest = sorted(problems, key=lambda p: len(p.question))[-16:]
    P = max(len(tokenizer(format_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"]) for p in longest)
    if P + max_new_tokens > limit:
        raise ValueError(f"the longest prompt ({P} tokens) plus {option} {max_new_tokens} needs {P + max_new_tokens} "
                         f"positions, beyond the model's context of {limit}: lower {option} to at most {max(limit - P, 0)}"
                         " or drop the longest problems")


def check_out_file(path: str, what: str = "--out"):
    """An output path must be writable before any work, so results are never lost at the very end."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{what} {path} is a folder: name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: the folder {folder} does not exist; create it or name another path")


def make_out_folder(path: str, what: str = "--out"):
    """Create (or reuse) an output folder before any work; a file in its place is refused."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is a file: name a folder (or delete the file)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create it ({e.strerror}); name another folder") from None


# -----------------------------------------------------------------------------------------------
# The other scripts' parser


def _dashed(arg: str) -> str:
    """--max_new_tokens=5 -> --max-new-tokens=5; values and other arguments stay as they are."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("_", "-") + eq + value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option gives one line naming the fix (exit code 2), without the usage block;
    --help shows every default; and --max_new_tokens works as well as --max-new-tokens (train.py's
    spelling), so a flag copied from one script to another is never refused for its dashes."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_args([_dashed(a) for a in args], namespace)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

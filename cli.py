"""
cli.py -- the command-line pieces evaluate.py, entropy_view.py and bench.py share: a parser whose
errors are one line, and the checks every script makes before it spends time on a model.

The rule they serve: a typo costs a second, not a model load, and a bad --out never costs the
results. So options are checked in this order: ranges (check_sampling), output paths
(check_out_file, make_out_folder), then, once the model is loaded and before any sampling, the
model's context length (check_context). Each refusal is one line that names the fix.
"""

import argparse
import math
import os
import sys

# -----------------------------------------------------------------------------------------------
# Checks made before the model loads, or right after it, before any sampling


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
# The parser


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

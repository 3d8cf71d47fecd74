"""
evaluate.py -- problems, answer checking (the reward), and the unbiased Pass@K.

Where it sits in the pipeline:

    load_problems -> question -> rollout.sample -> [is_correct: the reward] -> advantage -> loss
                                          \\-> n samples per problem -> [pass_at_k] -> a Pass@K curve

The same grader gives train.py its reward and this file its evaluation, so whatever it gets wrong,
RL learns. Run it from the command line to measure a model the way the paper does (n samples per
problem at temperature 0.6, top-p 0.95, then the unbiased Pass@K of Chen et al. 2021):

    python evaluate.py --model smollm2-135m --task arith --n 64 --limit 50
    python evaluate.py --model out/ckpt --task ../shared/data/math500_test.jsonl --n 16 --k 1,4,16
    python evaluate.py --compare out/eval_base out/eval_grpo out/eval_entropy   # curves on one plot

Simplifications, said up front:
  1. Our grader is rule-based: it normalises two answers and compares numbers by value, tuples and
     intervals element by element, and anything else as a normalised string. It knows no algebra
     (x+1 and 1+x differ); `--grader math-verify` plugs in the symbolic checker when installed.
  2. `arith` is a built-in task generated from a seed, so that everything runs offline; the hub
     benchmarks (GSM8K, MATH-500, AIME24, AMC23) need the network or a local copy of the file.
  3. `--limit L` takes the first L problems (not a random subset), so two runs see the same ones.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass
from fractions import Fraction

# -----------------------------------------------------------------------------------------------
# Grading: extract the final answer from a response, normalise it, compare it with the gold one.
#
# Everything here is linear in the length of the text. A model in training emits whatever it
# likes (thousands of "{" or "\boxed{" in a row, 50,000 digits), and a regex with nested or
# overlapping quantifiers can take quadratic or exponential time on such input and stall a whole
# training step. So braces are matched by one scan with a stack, and the few regexes we use either
# run on strings we first cap in length or cannot backtrack (each quantified piece must start with
# a character the previous one cannot end with).

REL_TOL = 1e-6  # numbers within this relative distance are equal: 0.3333333 counts as 1/3, 0.333 does not
MAX_NUMBER_CHARS = 100  # longer "numbers" compare as strings (int("9" * 10**5) is slow, and no answer is that long)
MAX_ANSWER_CHARS = 1000  # longer answers compare as strings only

# Trailing words dropped after a number ("5.4 cents", "864 inches^2", "18 dollars"). Any plain word
# qualifies when what precedes it is a number, so "5 apples" == 5 too; "2k" is kept: no space, no word.
_TRAILING_WORD = re.compile(r"[A-Za-z]{2,}(\^\d)?\.?")
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")  # one pass, no backtracking
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SCIENTIFIC = re.compile(r"(-?(?:\d+\.?\d*|\.\d+))(?:\\times|\\cdot|\*)10\^\{?(-?\d+)\}?")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_LATEX_FRAC = re.compile(r"(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH_FRAC = re.compile(r"(-?)([^/]+)/([^/]+)")
_VARIABLE_PREFIX = re.compile(r"[A-Za-z](?:=|\\in)")  # "x=5" -> "5", "x\in[-2,7]" -> "[-2,7]"
_CHOICE = re.compile(r"\(([A-Ea-e])\)")  # "(C)" -> "C"
_ESCAPED_SPACE = re.compile(r"(?<!\\)\\ ")  # "\ " is a space, but "\\ " is a line break and a space
_BRACED_SCRIPT = re.compile(r"([\^_])\{(\w)\}")  # "^{2}" -> "^2", "_{5}" -> "_5"


def _match_braces(s: str) -> dict:
    """{position of '{': position of its '}'} for every balanced pair, in one scan.

    Escaped braces (\\{ and \\}, LaTeX's literal braces) are text, not structure.
    """
    match, stack = {}, []
    for m in re.finditer(r"[{}]", s):
        i = m.start()
        if i > 0 and s[i - 1] == "\\":
            continue
        if s[i] == "{":
            stack.append(i)
        elif stack:
            match[stack.pop()] = i
    return match


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} whose braces close (also `\\boxed 5`)."""
    starts = []
    for cmd in ("\\boxed", "\\fbox"):
        i = text.find(cmd)
        while i != -1:
            starts.append((i, i + len(cmd)))
            i = text.find(cmd, i + 1)
    if not starts:
        return None
    match = _match_braces(text)
    for _, j in sorted(starts, reverse=True):  # the last box wins; an unclosed one falls back to the one before
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{" and j in match:
            return text[j + 1 : match[j]]
        if j > 0 and text[j - 1] == " ":  # `\boxed 5`: the box holds one token
            end = j
            while end < len(text) and not text[end].isspace() and text[end] != "$":
                end += 1
            if end > j:
                return text[j:end]
    return None


def _answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of its sentence."""
    lower = text.lower()
    hits = [(lower.rfind(p), p) for p in ("answer is", "answer:")]
    i, phrase = max(hits)
    if i == -1:
        return None
    rest = text[i + len(phrase) :].split("\n", 1)[0].strip().lstrip(":").strip()
    cut = rest.find(". ")  # "3.5" keeps its point: a sentence ends in ". " or at the end of the line
    rest = rest if cut == -1 else rest[:cut]
    # "the answer is 8 * 8 = 64.": the value is what follows the last "=" (only in plain prose; a
    # boxed "5x + 4 = 0" is an equation and stays whole)
    return rest.rsplit("=", 1)[-1].strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer in a response: the last \\boxed{} (or \\fbox{}), else `#### x`, else
    "the answer is x", else the last number. None when there is nothing to grade."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    i = text.rfind("####")
    if i != -1:
        line = text[i + 4 :].strip().split("\n", 1)[0].strip()
        if line:
            return line
    phrase = _answer_phrase(text)
    if phrase is not None:
        return phrase
    last = None
    for last in _NUMBER_IN_TEXT.finditer(text):
        pass
    return last.group(0) if last else None


def _unwrap(s: str, cmd: str) -> str:
    """Drop `\\cmd{` and its matching `}`, keep what is inside (with a space in front, so that
    "5\\text{cm}" reads "5 cm"). One scan: all occurrences are found in the original string."""
    match, drop, i = None, {}, s.find(cmd + "{")
    while i != -1:
        match = match if match is not None else _match_braces(s)
        j = i + len(cmd)
        if j in match:
            drop[i] = j + 1  # skip "\cmd{" ...
            drop[match[j]] = match[j] + 1  # ... and its "}"
        i = s.find(cmd + "{", i + 1)
    if not drop:
        return s
    out, pos = [], 0
    for start in sorted(drop):
        if start < pos:
            continue
        out.append(s[pos:start] + (" " if s[start] == "\\" else ""))  # a space for "\cmd{", none for "}"
        pos = drop[start]
    out.append(s[pos:])
    return "".join(out)


def _brace_single_args(s: str, cmd: str, n_args: int) -> str:
    """Write the one-character arguments of \\frac12, \\frac{1}2, \\sqrt2 as {1}{2}, {2}, so each
    expression has one spelling. Braced arguments are left as they are (and scanned normally)."""
    wrap, i, match = set(), s.find(cmd), None
    while i != -1:
        j = i + len(cmd)
        for _ in range(n_args):
            if j < len(s) and s[j] == "{":
                match = match if match is not None else _match_braces(s)
                if j not in match:
                    break
                j = match[j] + 1
            elif j < len(s) and s[j].isalnum():
                wrap.add(j)
                j += 1
            else:
                break
        i = s.find(cmd, i + 1)
    if not wrap:
        return s
    return "".join("{" + c + "}" if k in wrap else c for k, c in enumerate(s))


def normalize_answer(ans: str) -> str:
    """One canonical spelling of an answer: no spaces, dollars, \\text{}, \\left/\\right, \\dfrac,
    degrees, percent, trailing period or trailing unit words. Pure string surgery, linear time."""
    s = ans.strip().replace("\u2212", "-").replace("\u00b0", "^\\circ").replace("\u03c0", "\\pi")
    boxed = _last_boxed(s)  # a gold answer may come boxed
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed
    for cmd in ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox"):
        s = _unwrap(s, cmd)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac")):
        s = s.replace(old, new)
    s = _ESCAPED_SPACE.sub(" ", s)
    for junk in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad",
                 "^{\\circ}", "^\\circ", "\\circ", "\\degree", "\\%", "%", "\\$", "$", "\\{", "\\}"):
        s = s.replace(junk, " " if junk == "\\quad" else "")
    s = s.strip().rstrip(".").strip()
    # trailing words after a number: "5.4 cents", "270/7 degrees", "864 inches^2"
    words = s.split()
    k = len(words)
    while k > 1 and _TRAILING_WORD.fullmatch(words[k - 1]):
        k -= 1
    if k < len(words) and _to_number(_squash(" ".join(words[:k]))) is not None:
        s = " ".join(words[:k])
    return _squash(s)


def _squash(s: str) -> str:
    """The last steps of normalising: remove whitespace, then fix the spelling of small pieces."""
    s = "".join(s.split())
    match, depth = (_match_braces(s) if s.startswith("{") else {}), 0
    while match.get(depth) == len(s) - 1 - depth:
        depth += 1  # "{{5}}" -> "5", one scan for all the layers
    s = s[depth : len(s) - depth]
    s = _brace_single_args(_brace_single_args(s, "\\sqrt", 1), "\\frac", 2)
    s = _BRACED_SCRIPT.sub(r"\1\2", s)
    prefix = _VARIABLE_PREFIX.match(s)
    if prefix and len(s) > prefix.end():
        s = s[prefix.end() :]
    choice = _CHOICE.fullmatch(s)
    return choice.group(1).upper() if choice else s


def _to_number(s: str) -> Fraction | None:
    """The value of a normalised answer if it is one number: 12, -3.5, 1,000, 1.5e3, 3/4,
    \\frac{3}{4}, -\\frac{1}{2}, 1\\frac{4}{5} (mixed), 2.5\\times10^{3}. Else None."""
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None  # bounded input: the regexes below never see more than 100 characters
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            exponent = s.lower().partition("e")[2]
            return Fraction(s) if abs(int(exponent or 0)) < 400 else None  # 1e999999 would build a huge integer
        if _THOUSANDS.fullmatch(s):
            return Fraction(s.replace(",", ""))
        if m := _SCIENTIFIC.fullmatch(s):
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)) if abs(int(m.group(2))) < 400 else None
        if m := _MIXED.fullmatch(s):
            value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -value if m.group(1) else value
        for pattern in (_LATEX_FRAC, _SLASH_FRAC):
            if m := pattern.fullmatch(s):
                num, den = _to_number(m.group(2)), _to_number(m.group(3))
                if num is None or den is None or den == 0:
                    return None
                return -num / den if m.group(1) else num / den
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _split_top_level(s: str):
    """"(a,b]" -> ("(", ["a", "b"], "]") when the outer brackets enclose the whole string;
    "a,b" -> ("", ["a", "b"], ""); None when there is no top-level comma."""
    opened = s[:1] in ("(", "[") and s[-1:] in (")", "]")
    body = s[1:-1] if opened else s
    parts, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                return None  # "(0,9)\cup(9,36)": the first bracket closes early, not one tuple
        elif c == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    if not parts or depth != 0:
        return None
    parts.append(body[start:])
    return (s[0], parts, s[-1]) if opened else ("", parts, "")


def _same(a: str, b: str) -> bool:
    """Are two normalised answers equal? Strings, then numbers, then tuples/intervals, then lists."""
    if a == b:
        return True
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False  # no real answer is this long; comparing lists of lists of it would be quadratic
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return x == y or abs(x - y) <= REL_TOL * max(abs(x), abs(y))
    ta, tb = _split_top_level(a), _split_top_level(b)
    if ta and tb and len(ta[1]) == len(tb[1]) <= 64 and (ta[0], ta[2]) == (tb[0], tb[2]):
        if ta[0]:  # a tuple or an interval: in order, and the brackets must agree, (3,4] != (3,4)
            return all(_same(p, q) for p, q in zip(ta[1], tb[1]))
        left = list(tb[1])  # a bare list of solutions "1,-2": any order
        for p in ta[1]:
            hit = next((q for q in left if _same(p, q)), None)
            if hit is None:
                return False
            left.remove(hit)
        return True
    return a.isalpha() and b.isalpha() and a.lower() == b.lower()  # text answers: "East" == "east"


def _math_verify(response: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("grader 'math-verify' needs its package: pip install math-verify") from None
    # timeouts off: math-verify implements them with signal.alarm, which only works on the main
    # thread; without them it runs anywhere (a data-loader thread, a notebook), just unguarded
    gold_parsed = parse("$" + gold + "$", parsing_timeout=None)
    if not gold_parsed:
        return False
    try:
        return bool(verify(gold_parsed, parse(response, parsing_timeout=None), timeout_seconds=None))
    except Exception:  # a response sympy cannot digest is a wrong answer, never a crash mid-training
        return False


def is_correct(response: str, gold: str, grader: str = "ours") -> bool:
    """The reward: does the response's final answer equal the gold answer?

    grader "ours" (the default, and the one to read) or "math-verify" (symbolic, optional package).
    A gold answer that cannot be parsed (empty, unbalanced braces) never makes a response correct.
    """
    if grader == "math-verify":
        return bool(gold) and _math_verify(response or "", str(gold))
    if grader != "ours":
        raise ValueError(f"unknown grader '{grader}': use 'ours' or 'math-verify'")
    if gold is None or not str(gold).strip():
        return False
    gold = str(gold)
    if gold.count("{") != gold.count("}"):
        return False
    pred = extract_answer(response or "")
    if pred is None:
        return False
    g, p = normalize_answer(gold), normalize_answer(pred)
    return bool(g) and _same(p, g)


# -----------------------------------------------------------------------------------------------
# Problems: the hub benchmarks, local files, and the built-in `arith` task


@dataclass
class Problem:
    question: str
    answer: str  # the gold final answer, as a string ("18", "\\frac{14}{3}")
    id: str


# name -> (hub id, config, {our split: hub split}). The paper reports AIME24, AMC23 and MATH-500;
# GSM8K is the usual small-model benchmark. aime_2024 keeps its 30 problems in a split named "train".
HUB_TASKS = {
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "math500": ("HuggingFaceH4/MATH-500", None, {"test": "test"}),
    "aime24": ("HuggingFaceH4/aime_2024", None, {"test": "train"}),
    "amc23": ("math-ai/amc23", None, {"test": "test"}),
}
QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "solution", "output", "target")  # in order of preference
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

ARITH_LEVELS = (1, 2, 3, 4)
ARITH_DEFAULT_LEVEL = 2  # sums and products of 2..12: SmolLM2-135M starts near 55% greedy and learns it in minutes
ARITH_DEFAULT_SIZE = {"train": 2000, "test": 200}
LOCAL_TEST_PERCENT = 10  # train.py on a single local task file holds out this share of its rows (see held_out_split)
ARITH_TEST_PERCENT = 50  # share of the problem space in the test split: half, so level 2 has ~130 held-out problems


def _gold_from(value) -> str:
    """Gold answer from a dataset field: the number after ####, the last \\boxed{}, or the value."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC23 stores 27.0
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    if "\\boxed" in text or "\\fbox" in text:
        return _last_boxed(text) or text
    return text


def _rows_to_problems(rows, columns, name, question_field=None, answer_field=None) -> list:
    """rows: [(where, dict)], where names the row for error messages ("line 7")."""
    q = question_field or next((f for f in QUESTION_FIELDS if f in columns), None)
    a = answer_field or next((f for f in ANSWER_FIELDS if f in columns), None)
    for field, role in ((q, "question"), (a, "answer")):
        if field is None or field not in columns:
            raise ValueError(f"{name}: no {role} field found among {columns}; name it with --{role}-field")
    id_field = next((f for f in ("id", "unique_id") if f in columns), None)
    problems = []
    for i, (where, r) in enumerate(rows):
        for field, role in ((q, "question"), (a, "answer")):
            # a missing or null gold answer would become the string "None", and a reply "None" would
            # be graded right: refuse the row instead
            if r.get(field) is None or not str(r[field]).strip():
                raise ValueError(f"{name}, {where}: the {role} ('{field}') is missing or empty; fill it in or delete the row")
        problems.append(Problem(str(r[q]), _gold_from(r[a]), str(r[id_field]) if r.get(id_field) is not None else f"{name}-{i}"))
    return problems


def _read_json_rows(path: str) -> list:
    """[(where, row)] from a .jsonl file (one object a line) or a .json file (a list of objects, or
    again one object a line). Read here rather than by `datasets`, so a broken line is named."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines under a .json name: read it line by line below
        if data is not None:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ValueError(f"{path}: a .json task file must hold a list of objects such as "
                                 '{"question": ..., "answer": ...}')
            return [(f"row {i + 1}", r) for i, r in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected one object such as " + '{"question": ..., "answer": ...}')
        rows.append((f"line {number}", row))
    return rows


def _load_hub(name: str, split: str):
    import datasets
    import huggingface_hub.constants as hub

    from model import hub_reachable

    repo, config, splits = HUB_TASKS[name]
    if split not in splits:
        raise ValueError(f"{name} has no '{split}' split, only {' and '.join(splits)}: evaluate on it (evaluate.py "
                         f"--split {' or '.join(splits)}, train.py --eval_task {name}) and train on another task")
    # Without a network `datasets` retries five times with back-off (about 25 s) before it fails.
    # One quick probe decides instead; offline, we switch both libraries to their offline mode for
    # this call, which still reads a copy that is already in the cache.
    offline = datasets.config.HF_HUB_OFFLINE or not hub_reachable(hub.ENDPOINT)
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = offline
    try:
        return datasets.load_dataset(repo, config, split=splits[split])
    except (ConnectionError, OSError) as e:
        local = f"--task ../shared/data/{name}_{split}.jsonl"
        if split == "train" and "test" in splits:  # a training run: its held-out problems need their own file
            local += f" --eval_task ../shared/data/{name}_test.jsonl"
        reason = "the Hugging Face hub cannot be reached" if offline else f"loading it failed ({type(e).__name__})"
        raise ValueError(f"cannot load {name} ({repo}): {reason}; pass a local file instead, e.g. {local}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _arith_item(level: int, rng: random.Random):
    """One (question, answer, key) of a level. The key names the problem up to wording and operand
    order, so "3 + 4" and "4 + 3" (or two word problems differing only in names) share one key."""
    if level in (1, 2, 3):
        if level == 1:
            op, lo, hi = rng.choice("+-"), 0, 9
        elif level == 2:
            op, lo, hi = rng.choice("+*"), 2, 12
        else:
            op, lo, hi = rng.choice("+-*"), 10, 99
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and a < b:
            a, b = b, a  # no negative answers: the small levels are for a small model
        if level == 3 and op == "*":
            b = rng.randint(2, 9)  # two digits by one digit: mental arithmetic, not long multiplication
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        key = (level, op, *(sorted((a, b)) if op in "+*" else (a, b)))
        return f"What is {a} {op} {b}?", answer, key
    name = rng.choice(["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal",
                       "Kira", "Leo", "Maya", "Noah", "Olga", "Priya", "Sam", "Tom", "Uma", "Zoe"])
    item = rng.choice(["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "cards"])
    t = rng.randrange(4)
    if t == 0:
        a, b = rng.randint(5, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} does {name} have now?"
        return q, a + b - c, (4, t, a, b, c)
    if t == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b - 1)
        q = f"{name} buys {a} bags of {item} with {b} {item} in each bag and gives away {c}. How many {item} are left?"
        return q, a * b - c, (4, t, a, b, c)
    if t == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a - 1)
        q = f"A box holds {a} {item}. {name} fills {b} boxes and has {c} {item} left over. How many {item} does {name} have?"
        return q, a * b + c, (4, t, a, b, c)
    b, each, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    q = (f"{name} shares {b * each} {item} equally among {b} friends, and then each friend finds {c} more. "
         f"How many {item} does each friend have now?")
    return q, each + c, (4, t, b, each, c)


@functools.lru_cache(maxsize=None)
def _in_test_split(key) -> bool:
    # A hash of the key, not the random stream, decides the split: train and test can never share a
    # problem, whatever the seeds, and the test split is the same set for every training run.
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16) % 100 < ARITH_TEST_PERCENT


def arith_problems(level: int = ARITH_DEFAULT_LEVEL, split: str = "test", n: int | None = None, seed: int = 0) -> list:
    """n distinct arithmetic problems of a level from the split's part of the problem space.
    Fewer when the level has fewer (level 1 has about 30 test problems)."""
    if level not in ARITH_LEVELS:
        raise ValueError(f"arith has levels {ARITH_LEVELS[0]}..{ARITH_LEVELS[-1]}, got {level}: use e.g. --task arith:2")
    if split not in ARITH_DEFAULT_SIZE:
        raise ValueError(f"arith splits are 'train' and 'test', got '{split}'")
    n = ARITH_DEFAULT_SIZE[split] if n is None else n
    rng = random.Random(f"arith/{level}/{split}/{seed}")  # a string seed: a separate stream per split
    problems, seen, misses = [], set(), 0
    while len(problems) < n and misses < 20_000:  # 20,000 draws with nothing new: the level is used up
        question, answer, key = _arith_item(level, rng)
        if question in seen or _in_test_split(key) != (split == "test"):
            misses += 1
            continue
        seen.add(question)
        misses = 0
        problems.append(Problem(question, str(answer), f"arith{level}-{split}-{len(problems)}"))
    return problems


def load_problems(source: str, split: str | None = None, limit: int | None = None, seed: int = 0,
                  question_field: str | None = None, answer_field: str | None = None) -> list:
    """Problems from a hub benchmark (gsm8k, math500, aime24, amc23), a local .jsonl/.json/.parquet
    file, or the built-in "arith" / "arith:LEVEL". split defaults to "test" (a file is its own split);
    seed only matters for arith; limit keeps the first `limit` problems."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems, got {limit}")
    split = split or "test"
    source = str(source)
    if source == "arith" or source.startswith("arith:"):
        level = source.partition(":")[2] or str(ARITH_DEFAULT_LEVEL)
        if not level.isdigit():
            raise ValueError(f"bad task '{source}': write arith or arith:LEVEL, e.g. arith:2")
        return arith_problems(int(level), split, limit, seed)
    if source in HUB_TASKS:
        rows = _load_hub(source, split)
        problems = _rows_to_problems([(f"row {i + 1}", r) for i, r in enumerate(rows)], list(rows.column_names),
                                     source, question_field, answer_field)
        return problems[:limit]
    if is_local_task(source):
        suffix = os.path.splitext(source)[1].lower()
        if not os.path.isfile(source):
            raise ValueError(f"no such file: {source}")
        if suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"cannot read {source}: use a .jsonl, .json or .parquet file")
        if suffix == ".parquet":
            import datasets

            table = datasets.load_dataset("parquet", data_files=source, split="train")
            rows, columns = [(f"row {i + 1}", r) for i, r in enumerate(table)], list(table.column_names)
        else:
            rows = _read_json_rows(source)
            columns = list(dict.fromkeys(k for _, r in rows for k in r))  # every key, in order of appearance
        if not rows:
            raise ValueError(f"{source} holds no problems: add rows such as " + '{"question": ..., "answer": ...}')
        name = os.path.splitext(os.path.basename(source))[0]
        return _rows_to_problems(rows, columns, name, question_field, answer_field)[:limit]
    raise ValueError(f"unknown task '{source}': use arith, arith:LEVEL, {', '.join(HUB_TASKS)}, "
                     "or a .jsonl/.json/.parquet file")


# -----------------------------------------------------------------------------------------------
# Pass@K: the chance that at least one of K samples is right, estimated from n >= K samples


def is_local_task(source: str) -> bool:
    """Does --task name a file (rather than arith or a hub benchmark)?"""
    return os.path.splitext(str(source))[1].lower() in LOCAL_SUFFIXES or os.path.exists(str(source))


def held_out_split(problems: list, percent: int = LOCAL_TEST_PERCENT) -> tuple:
    """(train, test) of a single local file: a hash of each question, not its position, picks the
    side, so the split is the same on every run and a repeated question never lands on both."""
    is_test = [int(hashlib.sha256(p.question.encode()).hexdigest()[:8], 16) % 100 < percent for p in problems]
    return [p for p, t in zip(problems, is_test) if not t], [p for p, t in zip(problems, is_test) if t]


# -----------------------------------------------------------------------------------------------
# Checks the scripts share: made before the model loads, or right after it, before any sampling


def check_device(device: str | None):
    """Refuse a device torch cannot use, with the fix (before a model load, not after it)."""
    import torch

    if device in (None, "auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu or cuda (or auto, cuda:N), got '{device}'")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU here: use --device cpu")


def cuda_graph_option(value: str, device: str | None):
    """--cuda-graph auto|true|false -> what sample() takes (None = auto: on for CUDA, off elsewhere)."""
    from model import pick_device

    if value not in ("auto", "true", "false"):
        raise ValueError(f"--cuda-graph must be auto, true or false, got '{value}'")
    on_cuda = pick_device(device).type == "cuda"
    if value == "true" and not on_cuda:
        raise ValueError("--cuda-graph true needs a CUDA device (CUDA graphs do not exist on a CPU): leave it at auto")
    return {"auto": None, "true": True, "false": False}[value]


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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@K from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Why not 1 - (1 - c/n)^k? Plugging the sample accuracy into a nonlinear function is biased
    (it underestimates Pass@K). The ratio of binomials is the exact probability that a random k of
    our n samples are all wrong, and it is unbiased (Chen et al. 2021). C(1024, 512) has 307 digits,
    so we never form it: the ratio equals prod_{i=n-c+1..n} (1 - k/i), a product of numbers in
    [0, 1] that cannot overflow.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"pass_at_k needs non-negative integers, got {name}={v}")
    if k < 1 or n < 1:
        raise ValueError(f"pass_at_k needs n >= 1 and k >= 1, got n={n}, k={k}")
    if c > n:
        raise ValueError(f"c={c} correct samples out of n={n}: c cannot exceed n")
    if k > n:
        raise ValueError(f"Pass@{k} needs at least {k} samples per problem, got n={n}: raise --n or lower --k")
    if n - c < k:
        return 1.0  # fewer than k wrong samples: every k-subset holds a correct one
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def pass_at_k_curve(correct_counts: list, n: int, ks: list) -> dict:
    """{k: mean Pass@k over problems}, from each problem's number of correct samples out of n."""
    if not correct_counts:
        raise ValueError("no problems to average over")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def default_ks(n: int) -> list:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else ks + [n]


# -----------------------------------------------------------------------------------------------
# The evaluation loop (train.py calls it for its held-out numbers) and its outputs


def evaluate(model, tokenizer, problems, n, ks=None, temperature=0.6, top_p=0.95, max_new_tokens=512,
             batch_prompts=4, seed=0, out_dir=None, progress=True, grader="ours", info=None, cuda_graph=None) -> dict:
    """Sample n answers per problem, grade them, and summarise. Greedy Pass@1: n=1, temperature=0.

    Returns pass_at_k {k: value}, accuracy (mean Pass@1) and its standard error over problems,
    mean response length (tokens), mean token entropy (nats, over all response tokens), the share of
    answers cut off by max_new_tokens, and correct_counts (per problem) for further statistics.
    With out_dir, also writes samples.jsonl, summary.json and passk.png there; `info` (model, task,
    training step...) is stored in the summary as it is.
    """
    import torch
    from tqdm import tqdm

    from rollout import format_prompt, sample

    ks = default_ks(n) if ks is None else sorted(set(ks))
    if not problems or batch_prompts < 1:
        raise ValueError(f"need at least one problem and batch_prompts >= 1, got {len(problems)} and {batch_prompts}")
    for k in ks:
        pass_at_k(n, 0, k)  # raises a clear error for k > n before any sampling
    counts, records = [], []
    tokens = entropy_sum = truncated = 0.0
    batches = range(0, len(problems), batch_prompts)
    for b in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        chunk = problems[b : b + batch_prompts]
        r = sample(model, tokenizer, [format_prompt(tokenizer, p.question) for p in chunk], group_size=n,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + b, cuda_graph=cuda_graph)
        lengths = r.response_mask.sum(-1)  # (N,) tokens per answer, the stop token included
        entropy_sums = (r.entropies * r.response_mask).sum(-1)  # (N,)
        tokens += lengths.sum().item()
        entropy_sum += entropy_sums.sum().item()
        truncated += (~r.stopped).sum().item()
        for i, p in enumerate(chunk):
            rows = range(i * n, (i + 1) * n)
            grades = [is_correct(r.texts[j], p.answer, grader) for j in rows]
            counts.append(sum(grades))
            for j, ok in zip(rows, grades):
                length = int(lengths[j])
                records.append({"id": p.id, "gold": p.answer, "response": r.texts[j],
                                "extracted": extract_answer(r.texts[j]), "correct": ok, "length": length,
                                "mean_entropy": entropy_sums[j].item() / max(length, 1),
                                "stopped": bool(r.stopped[j])})
    per_problem = torch.tensor(counts, dtype=torch.float64) / n  # (P,) accuracy of each problem
    result = {
        "n": n, "ks": ks, "num_problems": len(problems),
        "pass_at_k": pass_at_k_curve(counts, n, ks),
        "accuracy": per_problem.mean().item(),
        # spread of per-problem accuracies / sqrt(P): the error bar on Pass@1 that problem choice causes
        "accuracy_se": (per_problem.std().item() / math.sqrt(len(counts))) if len(counts) > 1 else 0.0,
        "mean_length": tokens / len(records),
        "mean_entropy": entropy_sum / max(tokens, 1),
        "truncated": truncated / len(records),
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "grader": grader,
        "correct_counts": counts, "problem_ids": [p.id for p in problems], **(info or {}),
    }
    if out_dir:
        save_results(result, records, out_dir)
    return result


def format_table(result: dict) -> str:
    lines = ["    K   Pass@K"] + [f"{k:5d}   {v:6.3f}" for k, v in result["pass_at_k"].items()]
    lines.append(f"accuracy {result['accuracy']:.3f} +- {result['accuracy_se']:.3f} | "
                 f"mean length {result['mean_length']:.1f} tokens | mean entropy {result['mean_entropy']:.3f} nats | "
                 f"truncated {100 * result['truncated']:.1f}%")
    return "\n".join(lines)


def plot_curves(curves: dict, path: str, title: str = "Pass@K"):
    """One line per run: {label: {k: pass@k}} -> a PNG with K on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: write the file and go
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (samples per problem)")
    ax.set_ylabel("Pass@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_results(result: dict, records: list, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**result, "pass_at_k": {str(k): v for k, v in result["pass_at_k"].items()}}, f, indent=1)
    plot_curves({os.path.basename(os.path.normpath(out_dir)): result["pass_at_k"]}, os.path.join(out_dir, "passk.png"))


def load_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} holds no summary.json: pass folders written by evaluate.py --out")
    with open(path) as f:
        summary = json.load(f)
    summary["pass_at_k"] = {int(k): v for k, v in summary["pass_at_k"].items()}
    return summary


def compare(run_dirs: list, out_path: str) -> str:
    """Draw the Pass@K curves of saved runs on one plot; return a table of them."""
    runs = {os.path.basename(os.path.normpath(d)) or d: load_summary(d) for d in run_dirs}
    plot_curves({label: s["pass_at_k"] for label, s in runs.items()}, out_path, "Pass@K, compared")
    ks = sorted(set().union(*(s["pass_at_k"] for s in runs.values())))
    width = max(10, *(len(label) + 2 for label in runs))
    lines = ["    K" + "".join(f"{label:>{width}}" for label in runs)]
    for k in ks:
        cells = [f"{s['pass_at_k'][k]:.3f}" if k in s["pass_at_k"] else "-" for s in runs.values()]
        lines.append(f"{k:5d}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The command line


def _parse_ks(text: str) -> list:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--k takes comma-separated integers such as 1,2,4,8, got '{text}'") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--k values must be positive integers, got '{text}'")
    return ks


def main(argv=None):
    p = OneLineParser(description="Sample n answers per problem and report the unbiased Pass@K.")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub id, a model folder or a .gguf file")
    p.add_argument("--task", default="arith", help="arith[:LEVEL], gsm8k, math500, aime24, amc23, or a .jsonl/.json/.parquet file")
    p.add_argument("--split", default="test", help="test or train (a local file is its own split)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first L problems only")
    p.add_argument("--question-field", default=None, help="field holding the question in a local file")
    p.add_argument("--answer-field", default=None, help="field holding the gold answer in a local file")
    p.add_argument("--n", type=int, default=64, help="samples per problem")
    p.add_argument("--k", default=None, help="comma-separated K values (default 1, 2, 4, ... up to n)")
    p.add_argument("--temperature", type=float, default=0.6, help="the paper evaluates at 0.6 (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; the paper uses 0.95")
    p.add_argument("--max-new-tokens", type=int, default=512, help="response budget in tokens (a longer answer is cut off, graded wrong)")
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts per sampling call (each has n rows)")
    p.add_argument("--grader", default="ours", choices=["ours", "math-verify"],
                   help="ours (rule-based, the training reward) or math-verify (symbolic; pip install math-verify)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (batch b samples with seed + b); arith's problem seed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--cuda-graph", default="auto", help="auto | true | false: replay decode steps as CUDA graphs (auto: on CUDA)")
    p.add_argument("--out", default="out/eval", help="folder for samples.jsonl, summary.json, passk.png")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="plot saved runs' Pass@K together; no model needed")
    args = p.parse_args(argv)
    try:
        if args.compare:
            make_out_folder(args.out)
            path = os.path.join(args.out, "passk_compare.png")
            print(compare(args.compare, path))
            print(f"wrote {path}")
            return
        # every check that needs no model comes first: a typo should cost a second, not a model load
        check_sampling(args.n, args.max_new_tokens, args.temperature, args.top_p)
        if args.batch_prompts < 1:
            raise ValueError(f"--batch-prompts must be positive, got {args.batch_prompts}")
        check_device(args.device)
        cuda_graph = cuda_graph_option(args.cuda_graph, args.device)
        ks = default_ks(args.n) if args.k is None else _parse_ks(args.k)
        if ks[-1] > args.n:
            raise ValueError(f"--k {ks[-1]} exceeds --n {args.n}: Pass@K needs at least K samples per problem")
        make_out_folder(args.out)  # now, not after the sampling: a bad --out must not cost the results
        problems = load_problems(args.task, args.split, args.limit, args.seed, args.question_field, args.answer_field)
        if not problems:
            raise ValueError(f"{args.task} gave no problems")
        from model import load_model

        model, tokenizer = load_model(args.model, device=args.device)
        check_context(model, tokenizer, problems, args.max_new_tokens)
        print(f"{args.task} ({args.split}): {len(problems)} problems x {args.n} samples, temperature "
              f"{args.temperature}, top-p {args.top_p}, up to {args.max_new_tokens} new tokens, model {args.model}")
        result = evaluate(model, tokenizer, problems, args.n, ks, args.temperature, args.top_p, args.max_new_tokens,
                          args.batch_prompts, args.seed, out_dir=args.out, grader=args.grader,
                          info={"model": args.model, "task": args.task, "split": args.split}, cuda_graph=cuda_graph)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    print(f"wrote samples.jsonl, summary.json and passk.png to {args.out}")


if __name__ == "__main__":
    main()

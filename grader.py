r"""
grader.py -- the reward: is a response's final answer the gold answer?

Where it sits in the pipeline:

    question -> rollout.sample -> response text -> [grade_response: 1 or 0] -> advantage -> loss
                                                \-> evaluate.py: n samples per problem -> Pass@K

One grader serves both training (train.py's reward) and evaluation (evaluate.py's Pass@K), so
whatever it gets wrong, RL learns: a grader that marks "5 apples" wrong against "5" teaches the model
to drop the unit, one that marks "50" right against "-50" teaches it nothing about signs. Both call
grade_response, which first asks whether the answer finished: one cut off by max_new_tokens never
gave its final answer, and step 1's last-number fallback would read an intermediate number ("...so
12 + 5 = 17, then 17 * 2") as the answer, so it is wrong. Then is_correct, in four steps, one
section each:

  1. extract   the final answer from free text: the last \boxed{} (or \fbox{}), else `#### x`,
               else "the answer is x", else the last number in the text;
  2. normalise both answers to one spelling: no spaces, dollars, \text{}, \left/\right, degrees,
               percent or trailing units; \dfrac -> \frac, \frac12 -> \frac{1}{2}, "x=5" -> "5";
  3. compare   the two spellings: equal strings, else equal numbers (1/2 == 0.5 == \frac{1}{2},
               within REL_TOL), else tuples and intervals element by element (brackets must agree),
               bare lists in any order, and one-word text answers whatever their case;
  4. decide    (is_correct): a gold answer we cannot parse never makes a response correct.

Simplifications, said up front:
  1. Rule-based: it knows no algebra (x+1 and 1+x differ, \sqrt{8} and 2\sqrt{2} differ).
     `grader="math-verify"` plugs in Hugging Face's symbolic checker when that package is installed.
  2. A percent sign is dropped, not applied (25\% equals 25, not 0.25), and any plain word after a
     number counts as a unit ("5 apples" equals 5).
  3. The cases it must get right are a table in tests/test_grader.py, one line per case grouped by
     kind (boxed, fractions, units, thousands separators, ...): a new bug report becomes a new line.
  4. A cut-off answer is wrong: a rule of ours. veRL's default rewards grade the decoded text
     whatever its length: its naive reward manager (verl/workers/reward_manager/naive.py) checks
     no truncation, and its GSM8K and MATH scores rarely find an answer in a cut-off text anyway
     (verl/utils/reward_score/gsm8k.py takes the last "#### x" in the last 300 characters;
     math_reward.py, math.py in older releases, the last \boxed{}). The paper, built on veRL,
     reports no rule of its own; DAPO penalises answers near the limit (the overlong buffer of
     verl/workers/reward_manager/dapo.py). Our last-number fallback finds an answer in almost any
     text, hence the rule.

Everything here is linear in the length of the text. A model in training emits whatever it likes
(thousands of "{" or "\boxed{" in a row, 50,000 digits), and a regex with nested or overlapping
quantifiers can take quadratic or exponential time on such input and stall a whole training step.
So braces are matched by one scan with a stack, and the few regexes we use either run on strings we
first cap in length or cannot backtrack (each quantified piece must start with a character the
previous one cannot end with).

>>> is_correct(r"so the total is \boxed{\dfrac{1}{2}}", "0.5")
True
>>> grade_response("3 + 4 = 7, and 7", "7", stopped=False)  # cut off: the 7 is not a final answer
False
>>> extract_answer("18 - 3 = 15 eggs are left\n#### 15"), normalize_answer(r"\$1,\!000.")
('15', '1,000')
"""

import re
from fractions import Fraction

# -----------------------------------------------------------------------------------------------
# Tolerances and the patterns the steps below use

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

# -----------------------------------------------------------------------------------------------
# The reward: a finished answer, then is_correct's four steps (each step's functions follow)


def grade_response(response: str, gold: str, stopped: bool, grader: str = "ours") -> bool:
    """The verdict training's default reward and evaluate.py share: right only when the answer
    finished before max_new_tokens (rollout's `stopped`) and is_correct against the gold answer."""
    return bool(stopped) and is_correct(response, gold, grader)


def is_correct(response: str, gold: str, grader: str = "ours") -> bool:
    """The reward: does the response's final answer equal the gold answer?

    grader "ours" (the default, and the one to read) or "math-verify" (symbolic, optional package).
    A gold answer that cannot be parsed (empty, unbalanced braces) never makes a response correct.
    """
    if grader == "math-verify":
        return bool(gold) and _math_verify(response or "", str(gold))
    if grader != "ours":
        raise ValueError(f"unknown grader '{grader}': use 'ours' or 'math-verify'")
    # 4) decide, gold first: a gold answer we cannot parse (missing, unbalanced braces) scores 0 for any response
    if gold is None or not str(gold).strip():
        return False
    gold = str(gold)
    if gold.count("{") != gold.count("}"):
        return False
    pred = extract_answer(response or "")  # 1) extract
    if pred is None:
        return False  # nothing to grade: no box, no "####", no "answer is", no number
    g, p = normalize_answer(gold), normalize_answer(pred)  # 2) normalise both sides the same way
    return bool(g) and _same(p, g)  # 3) compare


# -----------------------------------------------------------------------------------------------
# 1) Extract: the final answer in a response


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


def last_boxed(text: str) -> str | None:
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
    boxed = last_boxed(text)
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


# -----------------------------------------------------------------------------------------------
# 2) Normalise: one spelling for each answer, by string surgery in linear time


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
    boxed = last_boxed(s)  # a gold answer may come boxed
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


# -----------------------------------------------------------------------------------------------
# 3) Compare: numbers by value, tuples and intervals in order, lists in any order


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


# -----------------------------------------------------------------------------------------------
# The symbolic alternative (grader="math-verify"): optional, and not the training default


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

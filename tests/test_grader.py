"""grader.py: the reward as a table of cases in the manner of Math-Verify's regression suite, the
MATH-500 reference solutions, hostile input graded in linear time, and the math-verify option."""

import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

from grader import extract_answer, grade_response, is_correct  # noqa: E402

# -----------------------------------------------------------------------------------------------
# The table: (gold, prediction, expected), one line per case, grouped by kind. A bug report becomes
# a new line here: the gold answer as the dataset spells it, the model's whole response, and the
# grade it deserves.

CASES = {
    "boxed, nested braces": [
        ("5", r"so \boxed{5}", True),
        (r"\frac{14}{3}", r"\boxed{\frac{14}{3}}", True),
        (r"\frac{14}{3}", r"\boxed{\dfrac{14}{3}}", True),
        (r"\frac{\sqrt3}{2}", r"the value is \boxed{\frac{\sqrt{3}}{2}}.", True),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", True),
        ("12", r"\fbox{12}", True),
        ("7", r"\boxed {7}", True),
        ("7", r"\boxed 7", True),
        ("x^2+1", r"$\boxed{x^{2}+1}$", True),
        ("5", r"\boxed{{5}}", True),
        (r"\{1\pm\sqrt{5},-2\}", r"\boxed{\{1\pm\sqrt{5},-2\}}", True),
    ],
    "several boxes: the last wins": [
        ("4", r"\boxed{3} no wait, \boxed{4}", True),
        ("3", r"\boxed{3} no wait, \boxed{4}", False),
        ("1", r"\boxed{1} and then \boxed{2", True),  # an unclosed last box falls back to the one before
    ],
    "####, 'the answer is', last number": [
        ("18", "so she makes 18 dollars\n#### 18", True),
        ("1000", "#### 1,000", True),
        ("42", "The answer is 42.", True),
        ("0.5", "Therefore the final answer is: $\\frac{1}{2}$.", True),
        ("64", "The answer is 8 * 8 = 64.", True),
        ("12", "The answer is 12 apples. Then I stop.", True),
        ("7", "3 + 4 = 7", True),
        ("8", "it is 7 or maybe 8", True),
        ("7", "it is 7 or maybe 8", False),
        ("-3", "the result is -3", True),
        ("5", "pages 3-5 were read", True),  # a hyphen after a digit is not a minus sign
    ],
    "fractions: \\frac, \\dfrac, \\tfrac, a/b, \\frac12, mixed numbers": [
        ("1/2", r"\boxed{\frac12}", True),
        (r"\frac{5}{9}", r"\boxed{\frac 59}", True),
        ("0.75", r"\boxed{\tfrac{3}{4}}", True),
        (r"\frac{3}{4}", r"\boxed{3/4}", True),
        (r"\frac34", r"\boxed{\frac{6}{8}}", True),
        ("-0.5", r"\boxed{-\frac{1}{2}}", True),
        (r"-\frac12", r"\boxed{\frac{-1}{2}}", True),
        ("9/5", r"\boxed{1\frac{4}{5}}", True),
        ("137.5", r"\boxed{137 \frac{1}{2}}", True),
        (r"\frac{270}7\text{ degrees}", r"\boxed{\frac{270}7}", True),
    ],
    "decimals vs fractions, scientific notation": [
        (r"\frac{1}{2}", r"\boxed{0.5}", True),
        ("0.5", r"\boxed{.5}", True),
        (r"\frac13", r"\boxed{0.3333333}", True),
        (r"\frac13", r"\boxed{0.33}", False),
        ("5/4", r"\boxed{1.25}", True),
        ("2.5", r"\boxed{2.50}", True),
        ("1500", r"\boxed{1.5e3}", True),
        ("1500", r"\boxed{1.5\times10^{3}}", True),
        (".0000672", r"\boxed{6.72 \times 10^{-5}}", True),
    ],
    "thousands separators": [
        ("1000", r"\boxed{1,000}", True),
        ("10080", r"\boxed{10,\!080}", True),
        (r"11,\! 111,\! 111,\! 100", r"\boxed{11,111,111,100}", True),
        ("1,000", "#### 1000", True),
        ("1000000", r"\boxed{1,000,000}", True),
        ("10000", r"\boxed{10\,000}", True),
        ("100", r"\boxed{1,000}", False),
        ("12", r"\boxed{1,2}", False),  # a list of two numbers, not twelve
    ],
    "negative numbers": [
        ("-50", r"\boxed{-50}", True),
        ("-50", "\\boxed{\u221250}", True),  # the Unicode minus sign
        ("-50", r"\boxed{50}", False),
        (r"-\sqrt{3}", r"\boxed{-\sqrt{3}}", True),
    ],
    "units and money": [
        (r"5.4 \text{ cents}", r"\boxed{5.4 \text{ cents}}", True),
        (r"5.4 \text{ cents}", r"\boxed{5.4}", True),
        (r"864 \mbox{ inches}^2", r"\boxed{864}", True),
        (r"15\mbox{ cm}^2", r"\boxed{15\text{cm}^2}", True),
        ("18.90", r"\boxed{\$18.90}", True),
        (r"\$18.90", r"\boxed{18.9}", True),
        ("18", "She makes $18 every day.\n#### $18", True),
        (r"\$32,\!348", r"\boxed{32,348}", True),
        ("18", r"\boxed{18 \text{ dollars}}", True),
        ("2k", r"\boxed{2}", False),  # "2k" is algebra, not 2 with a unit
    ],
    "percent": [
        ("25", r"\boxed{25\%}", True),
        (r"25\%", r"\boxed{25}", True),
        ("40", "The answer is 40%.", True),
        (r"25\%", r"\boxed{0.25}", False),  # the percent sign is dropped, not applied
    ],
    "degrees": [
        ("90", r"\boxed{90^\circ}", True),
        (r"90^\circ", r"\boxed{90^{\circ}}", True),
        (r"90^\circ", "\\boxed{90\u00b0}", True),
        (r"30^\circ", r"\boxed{30 \text{ degrees}}", True),
        (r"30^\circ", r"\boxed{60^\circ}", False),
    ],
    "tuples and intervals": [
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \frac{\pi}{2})}", True),
        ("(6,31,-1)", r"\boxed{(6,31,-1)}", True),
        (r"\left( \frac{3}{2}, -13 \right)", r"\boxed{(1.5,-13)}", True),
        (r"\left( \frac{3}{2}, -13 \right)", r"\boxed{(-13, 1.5)}", False),  # a tuple is ordered
        ("(3,4]", r"\boxed{(3,4]}", True),
        ("(3,4]", r"\boxed{(3,4)}", False),
        ("(3,4]", r"\boxed{[3,4]}", False),
        (r"(-\infty, 0]", r"\boxed{(-\infty, 0]}", True),
        (r"(0,9) \cup (9,36)", r"\boxed{(0,9) \cup (9,36)}", True),
        (r"x \in [-2,7]", r"\boxed{[-2, 7]}", True),
        (r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"\boxed{\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]}", True),
        ("1,-2", r"\boxed{-2, 1}", True),  # a bare list of solutions: any order
        ("3, 5, 7", r"\boxed{3, 5, 7}", True),
        ("3, 5, 7", r"\boxed{3, 5}", False),
    ],
    "text answers, choices, expressions": [
        (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", True),
        (r"\text{Evelyn}", r"\boxed{evelyn}", True),
        (r"\text{west}", r"\boxed{\text{east}}", False),
        (r"\text{(C)}", r"\boxed{\text{(C)}}", True),
        (r"\text{(C)}", r"\boxed{C}", True),
        (r"\text{(C)}", r"\boxed{(B)}", False),
        ("5", r"\boxed{x=5}", True),
        ("x=5", r"\boxed{5}", True),
        ("y = 2x + 3", r"\boxed{y = 2x+3}", True),
        ("p - q", r"\boxed{p-q}", True),
        (r"11\sqrt2", r"\boxed{11\sqrt{2}}", True),
        ("6 - 5i", r"\boxed{6-5i}", True),
        ("52_8", r"\boxed{52_{8}}", True),
        (r"\begin{pmatrix}-2\\-14\\-7\end{pmatrix}", r"\boxed{\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}}", True),
    ],
    "LaTeX spacing and decoration": [
        ("1/2", r"\boxed{\displaystyle \frac{1}{2}}", True),
        (r"3 \sqrt{5}", r"\boxed{3 \, \sqrt{5}}", True),
        ("4", r"$ \boxed{ 4 } $", True),
        ("5", r"\boxed{5.}", True),
        ("7", r"\boxed{\textbf{7}}", True),
    ],
    "wrong answers that look close": [
        ("100", r"\boxed{1000}", False),
        ("1000", r"\boxed{100}", False),
        ("3/2", r"\boxed{2/3}", False),
        (r"\frac{3}{2}", r"\boxed{\frac{2}{3}}", False),
        ("5", r"\boxed{-5}", False),
        ("5", r"\boxed{0.5}", False),
        ("21", r"\boxed{12}", False),
        ("3.2", r"\boxed{3.21}", False),
        ("1", r"\boxed{1.0001}", False),
        ("51", r"\boxed{\sqrt{51}}", False),
        ("3.14", r"\boxed{\pi}", False),
        ("x-1", r"\boxed{x+1}", False),
    ],
    "no answer at all": [
        ("5", "", False),
        ("5", "I don't know.", False),
        ("5", r"\boxed{}", False),
        ("5", None, False),
        ("5", "The answer is unclear", False),
    ],
    "unparseable gold never makes a response correct": [
        ("", r"\boxed{5}", False),
        ("", "", False),
        (r"\frac{1}{2", r"\boxed{\frac{1}{2}", False),
        ("$$", r"\boxed{}", False),
        (" ", r"\boxed{ }", False),
        (None, None, False),
        (r"\frac{1}{0}", r"\boxed{\frac{1}{0}}", True),  # equal strings, though no number: a string match
    ],
}
TABLE = [(kind, *case) for kind, cases in CASES.items() for case in cases]


def test_table_is_big_enough():
    assert len(TABLE) >= 80, len(TABLE)


@pytest.mark.parametrize("kind,gold,prediction,expected", TABLE, ids=[f"{k[:12]}-{i}" for i, (k, *_) in enumerate(TABLE)])
def test_grader_table(kind, gold, prediction, expected):
    assert is_correct(prediction, gold) is expected


# A cut-off answer (stopped False: it ran into max_new_tokens) is wrong whatever number it ends
# on, since it never gave its final answer; the same text that stopped is graded as usual. These
# are the verdicts of grade_response, which training's default reward and evaluate.py both call.
CUT_OFF = [  # (gold, response, stopped, expected)
    ("17", "We add 12 + 5 = 17 and then we need to solve a", False, False),
    ("17", "We add 12 + 5 = 17 and then we need to solve a", True, True),
    ("45", "20 + 25 = 45 for a total sum of", False, False),
    ("45", "20 + 25 = 45 for a total sum of", True, True),
    ("8", r"so the answer is \boxed{8}", False, False),  # a closed box too: no exception
    ("8", r"so the answer is \boxed{8}", True, True),
    ("8", r"so the answer is \boxed{9}", True, False),
    ("8", "", False, False),
]


@pytest.mark.parametrize("gold,response,stopped,expected", CUT_OFF)
def test_a_cut_off_answer_is_wrong(gold, response, stopped, expected):
    assert grade_response(response, gold, stopped) is expected


# -----------------------------------------------------------------------------------------------
# Extraction alone, the benchmark's own solutions, hostile input, and the symbolic alternative


@pytest.mark.parametrize("text,answer", [
    (r"a \boxed{\frac{1}{\sqrt{2}}} b", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{1} \fbox{2}", "2"),
    ("#### 72\n", "72"),
    ("So the answer is 3.5 cm. Done", "3.5 cm"),
    ("no digits here", None),
    ("", None),
    ("x = 1, then x = 12.5.", "12.5"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def _math500():
    path = SHARED_DATA / "math500_test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return [json.loads(line) for line in path.open()]


def test_math500_reference_solutions_grade_right():
    rows = _math500()
    right = sum(is_correct(r["solution"], r["answer"]) for r in rows)
    print(f"MATH-500: {right}/{len(rows)} reference solutions graded correct against their own answer")
    assert right / len(rows) >= 0.99


def test_math500_reference_solutions_grade_wrong_against_other_answers():
    rows = _math500()
    squash = lambda s: "".join(s.split())  # noqa: E731
    pairs = []
    for i, r in enumerate(rows):  # the next problem whose answer is spelled differently
        other = next(rows[(i + d) % len(rows)] for d in range(1, len(rows)) if squash(rows[(i + d) % len(rows)]["answer"]) != squash(r["answer"]))
        pairs.append((r["solution"], other["answer"]))
    wrong = sum(not is_correct(sol, ans) for sol, ans in pairs)
    print(f"MATH-500: {wrong}/{len(pairs)} reference solutions graded wrong against another problem's answer")
    assert wrong / len(pairs) >= 0.99


ADVERSARIAL = {
    "open braces": "{" * 200_000,
    "close braces": "}" * 200_000,
    "unclosed boxes": "\\boxed{" * 28_572,
    "nested boxes": "\\boxed{" * 25_000 + "}" * 25_000,
    "digits": "7" * 200_000,
    "digits and commas": "1," * 100_000,
    "one huge thousands number": "1" + ",000" * 50_000,
    "backslashes": "\\" * 200_000,
    "fracs": "\\frac1" * 33_333,
    "unclosed text": "\\text{" * 33_333,
    "answer is": "the answer is " * 14_286,
    "dollars": "$" * 200_000,
    "a huge box": "\\boxed{" + "1" * 200_000 + "}",
    "a box of tuples": "\\boxed{" + "(1," * 66_666 + "}",
    "a box of words": "\\boxed{5 " + "ab " * 66_666 + "}",
    "a box of braces": "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
    "a huge exponent": "\\boxed{1e" + "9" * 5_000 + "}",
    "a list of long tuples": "\\boxed{" + ",".join("(" + ",".join(["1"] * 1500) + ")" for _ in range(64)) + "}",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_input_is_graded_fast(name):
    text = ADVERSARIAL[name]
    assert len(text) >= 190_000 or name == "a huge exponent"
    start = time.perf_counter()
    for gold in ("1", "(1,2)", r"\frac{1}{2}"):
        assert is_correct(text, gold) in (True, False)
    assert time.perf_counter() - start < 1.0


def test_no_input_raises():
    rng = random.Random(0)
    alphabet = ["{", "}", "\\", "boxed", "frac", "text", "$", "(", ")", "[", "]", ",", ".", "-", "/", "=", "%",
                "1", "23", "0", " ", "\n", "####", "answer is", "^", "_", "e", "x", "\u2212", "\u00b0", "cm"]
    for _ in range(3000):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        gold = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert is_correct(response, gold) in (True, False)
        assert is_correct(response, response) in (True, False)


def test_math_verify_grader_runs_off_the_main_thread():
    pytest.importorskip("math_verify")
    results = {}

    def work():  # signal.alarm would raise here: the grader must not use it
        results["a"] = is_correct(r"so \boxed{\frac{1}{2}}", "0.5", grader="math-verify")
        results["b"] = is_correct(r"so \boxed{x+1}", "1+x", grader="math-verify")
        results["c"] = is_correct(r"so \boxed{3}", "4", grader="math-verify")

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert results == {"a": True, "b": True, "c": False}


def test_math_verify_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ValueError, match="pip install math-verify"):
        is_correct(r"\boxed{1}", "1", grader="math-verify")
    with pytest.raises(ValueError, match="unknown grader"):
        is_correct(r"\boxed{1}", "1", grader="sympy")

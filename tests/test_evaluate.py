"""evaluate.py: the grader as a table of cases, Pass@K against brute force, the loaders, the CLI."""

import itertools
import json
import math
import operator
import os
import random
import re
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

import evaluate as ev  # noqa: E402
from evaluate import extract_answer, is_correct, load_problems, pass_at_k, pass_at_k_curve  # noqa: E402

# -----------------------------------------------------------------------------------------------
# The grader: one line per case, grouped by kind, in the manner of Math-Verify's regression suite

B = "\\boxed"
CASES = {
    "boxed, nested braces": [
        (r"so \boxed{5}", "5", True),
        (r"\boxed{\frac{14}{3}}", r"\frac{14}{3}", True),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
        (r"the value is \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt3}{2}", True),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\fbox{12}", "12", True),
        (r"\boxed {7}", "7", True),
        (r"\boxed 7", "7", True),
        (r"$\boxed{x^{2}+1}$", "x^2+1", True),
        (r"\boxed{{5}}", "5", True),
        (r"\boxed{\{1\pm\sqrt{5},-2\}}", r"\{1\pm\sqrt{5},-2\}", True),
    ],
    "several boxes: the last wins": [
        (r"\boxed{3} no wait, \boxed{4}", "4", True),
        (r"\boxed{3} no wait, \boxed{4}", "3", False),
        (r"\boxed{1} and then \boxed{2", "1", True),  # an unclosed last box falls back to the one before
    ],
    "####, 'the answer is', last number": [
        ("so she makes 18 dollars\n#### 18", "18", True),
        ("#### 1,000", "1000", True),
        ("The answer is 42.", "42", True),
        ("Therefore the final answer is: $\\frac{1}{2}$.", "0.5", True),
        ("The answer is 8 * 8 = 64.", "64", True),
        ("The answer is 12 apples. Then I stop.", "12", True),
        ("3 + 4 = 7", "7", True),
        ("it is 7 or maybe 8", "8", True),
        ("it is 7 or maybe 8", "7", False),
        ("the result is -3", "-3", True),
        ("pages 3-5 were read", "5", True),  # a hyphen after a digit is not a minus sign
    ],
    "fractions: \\frac, \\dfrac, \\tfrac, a/b, \\frac12, mixed numbers": [
        (r"\boxed{\frac12}", "1/2", True),
        (r"\boxed{\frac 59}", r"\frac{5}{9}", True),
        (r"\boxed{\tfrac{3}{4}}", "0.75", True),
        (r"\boxed{3/4}", r"\frac{3}{4}", True),
        (r"\boxed{\frac{6}{8}}", r"\frac34", True),
        (r"\boxed{-\frac{1}{2}}", "-0.5", True),
        (r"\boxed{\frac{-1}{2}}", r"-\frac12", True),
        (r"\boxed{1\frac{4}{5}}", "9/5", True),
        (r"\boxed{137 \frac{1}{2}}", "137.5", True),
        (r"\boxed{\frac{270}7}", r"\frac{270}7\text{ degrees}", True),
    ],
    "decimals vs fractions, scientific notation": [
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{.5}", "0.5", True),
        (r"\boxed{0.3333333}", r"\frac13", True),
        (r"\boxed{0.33}", r"\frac13", False),
        (r"\boxed{1.25}", "5/4", True),
        (r"\boxed{2.50}", "2.5", True),
        (r"\boxed{1.5e3}", "1500", True),
        (r"\boxed{1.5\times10^{3}}", "1500", True),
        (r"\boxed{6.72 \times 10^{-5}}", ".0000672", True),
    ],
    "thousands separators": [
        (r"\boxed{1,000}", "1000", True),
        (r"\boxed{10,\!080}", "10080", True),
        (r"\boxed{11,111,111,100}", r"11,\! 111,\! 111,\! 100", True),
        ("#### 1000", "1,000", True),
        (r"\boxed{1,000,000}", "1000000", True),
        (r"\boxed{10\,000}", "10000", True),
        (r"\boxed{1,000}", "100", False),
        (r"\boxed{1,2}", "12", False),  # a list of two numbers, not twelve
    ],
    "negative numbers": [
        (r"\boxed{-50}", "-50", True),
        ("\\boxed{\u221250}", "-50", True),  # the Unicode minus sign
        (r"\boxed{50}", "-50", False),
        (r"\boxed{-\sqrt{3}}", r"-\sqrt{3}", True),
    ],
    "units and money": [
        (r"\boxed{5.4 \text{ cents}}", r"5.4 \text{ cents}", True),
        (r"\boxed{5.4}", r"5.4 \text{ cents}", True),
        (r"\boxed{864}", r"864 \mbox{ inches}^2", True),
        (r"\boxed{15\text{cm}^2}", r"15\mbox{ cm}^2", True),
        (r"\boxed{\$18.90}", "18.90", True),
        (r"\boxed{18.9}", r"\$18.90", True),
        ("She makes $18 every day.\n#### $18", "18", True),
        (r"\boxed{32,348}", r"\$32,\!348", True),
        (r"\boxed{18 \text{ dollars}}", "18", True),
        (r"\boxed{2}", "2k", False),  # "2k" is algebra, not 2 with a unit
    ],
    "percent": [
        (r"\boxed{25\%}", "25", True),
        (r"\boxed{25}", r"25\%", True),
        ("The answer is 40%.", "40", True),
        (r"\boxed{0.25}", r"25\%", False),  # the percent sign is dropped, not applied
    ],
    "degrees": [
        (r"\boxed{90^\circ}", "90", True),
        (r"\boxed{90^{\circ}}", r"90^\circ", True),
        ("\\boxed{90\u00b0}", r"90^\circ", True),
        (r"\boxed{30 \text{ degrees}}", r"30^\circ", True),
        (r"\boxed{60^\circ}", r"30^\circ", False),
    ],
    "tuples and intervals": [
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\boxed{(6,31,-1)}", "(6,31,-1)", True),
        (r"\boxed{(1.5,-13)}", r"\left( \frac{3}{2}, -13 \right)", True),
        (r"\boxed{(-13, 1.5)}", r"\left( \frac{3}{2}, -13 \right)", False),  # a tuple is ordered
        (r"\boxed{(3,4]}", "(3,4]", True),
        (r"\boxed{(3,4)}", "(3,4]", False),
        (r"\boxed{[3,4]}", "(3,4]", False),
        (r"\boxed{(-\infty, 0]}", r"(-\infty, 0]", True),
        (r"\boxed{(0,9) \cup (9,36)}", r"(0,9) \cup (9,36)", True),
        (r"\boxed{[-2, 7]}", r"x \in [-2,7]", True),
        (r"\boxed{\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]}", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", True),
        (r"\boxed{-2, 1}", "1,-2", True),  # a bare list of solutions: any order
        (r"\boxed{3, 5, 7}", "3, 5, 7", True),
        (r"\boxed{3, 5}", "3, 5, 7", False),
    ],
    "text answers, choices, expressions": [
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
        (r"\boxed{evelyn}", r"\text{Evelyn}", True),
        (r"\boxed{\text{east}}", r"\text{west}", False),
        (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
        (r"\boxed{C}", r"\text{(C)}", True),
        (r"\boxed{(B)}", r"\text{(C)}", False),
        (r"\boxed{x=5}", "5", True),
        (r"\boxed{5}", "x=5", True),
        (r"\boxed{y = 2x+3}", "y = 2x + 3", True),
        (r"\boxed{p-q}", "p - q", True),
        (r"\boxed{11\sqrt{2}}", r"11\sqrt2", True),
        (r"\boxed{6-5i}", "6 - 5i", True),
        (r"\boxed{52_{8}}", "52_8", True),
        (r"\boxed{\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}}", r"\begin{pmatrix}-2\\-14\\-7\end{pmatrix}", True),
    ],
    "LaTeX spacing and decoration": [
        (r"\boxed{\displaystyle \frac{1}{2}}", "1/2", True),
        (r"\boxed{3 \, \sqrt{5}}", r"3 \sqrt{5}", True),
        (r"$ \boxed{ 4 } $", "4", True),
        (r"\boxed{5.}", "5", True),
        (r"\boxed{\textbf{7}}", "7", True),
    ],
    "wrong answers that look close": [
        (r"\boxed{1000}", "100", False),
        (r"\boxed{100}", "1000", False),
        (r"\boxed{2/3}", "3/2", False),
        (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", False),
        (r"\boxed{-5}", "5", False),
        (r"\boxed{0.5}", "5", False),
        (r"\boxed{12}", "21", False),
        (r"\boxed{3.21}", "3.2", False),
        (r"\boxed{1.0001}", "1", False),
        (r"\boxed{\sqrt{51}}", "51", False),
        (r"\boxed{\pi}", "3.14", False),
        (r"\boxed{x+1}", "x-1", False),
    ],
    "no answer at all": [
        ("", "5", False),
        ("I don't know.", "5", False),
        (r"\boxed{}", "5", False),
        (None, "5", False),
        ("The answer is unclear", "5", False),
    ],
    "unparseable gold never makes a response correct": [
        (r"\boxed{5}", "", False),
        ("", "", False),
        (r"\boxed{\frac{1}{2}", r"\frac{1}{2", False),
        (r"\boxed{}", "$$", False),
        (r"\boxed{ }", " ", False),
        (None, None, False),
        (r"\boxed{\frac{1}{0}}", r"\frac{1}{0}", True),  # equal strings, though no number: a string match
    ],
}
TABLE = [(kind, *case) for kind, cases in CASES.items() for case in cases]


def test_table_is_big_enough():
    assert len(TABLE) >= 80, len(TABLE)


@pytest.mark.parametrize("kind,response,gold,expected", TABLE, ids=[f"{k[:12]}-{i}" for i, (k, *_) in enumerate(TABLE)])
def test_grader_table(kind, response, gold, expected):
    assert is_correct(response, gold) is expected


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


# -----------------------------------------------------------------------------------------------
# Pass@K


def brute_force_pass_at_k(n, c, k):
    """Exact: the share of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_for_every_small_case():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_monotone_and_finite_at_scale():
    for n, c in [(12, 3), (64, 1), (256, 5), (1024, 1), (1024, 37), (1024, 1000)]:
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in values)
        assert all(a <= b for a, b in zip(values, values[1:]))
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)  # one correct of 1024, half of them drawn
    assert pass_at_k(1024, 0, 1024) == 0.0 and pass_at_k(1024, 1, 1024) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 0, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, 0), (4, 1, 1.5), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_curve_averages_over_problems():
    # n=4: a problem with 1 correct has Pass@1 1/4, Pass@2 1/2, Pass@4 1; with 0 correct, all 0; with 4, all 1
    curve = pass_at_k_curve([1, 0, 4], 4, [1, 2, 4])
    assert curve == pytest.approx({1: (0.25 + 0 + 1) / 3, 2: (0.5 + 0 + 1) / 3, 4: (1 + 0 + 1) / 3})
    assert ev.default_ks(64) == [1, 2, 4, 8, 16, 32, 64] and ev.default_ks(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        pass_at_k_curve([], 4, [1])


# -----------------------------------------------------------------------------------------------
# Problems


def test_local_jsonl_with_hash_answers(tmp_path):
    path = tmp_path / "mini_gsm8k.jsonl"
    rows = [{"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 1,000 + 1?", "answer": "#### 1,001"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(str(path))
    assert [(p.question, p.answer, p.id) for p in problems] == [
        (rows[0]["question"], "5", "mini_gsm8k-0"), (rows[1]["question"], "1,001", "mini_gsm8k-1")]
    assert len(load_problems(str(path), limit=1)) == 1


def test_local_json_with_boxed_solutions(tmp_path):
    path = tmp_path / "mini_math.json"
    rows = [{"problem": "Half of one?", "solution": r"It is $\boxed{\frac{1}{2}}$.", "unique_id": "a/1"},
            {"problem": "Two and two?", "solution": r"First \boxed{3}, no: \boxed{4}", "unique_id": "a/2"}]
    path.write_text(json.dumps(rows))
    problems = load_problems(str(path))
    assert [(p.question, p.answer, p.id) for p in problems] == [
        ("Half of one?", r"\frac{1}{2}", "a/1"), ("Two and two?", "4", "a/2")]


def test_local_parquet_with_named_fields(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "mini.parquet"
    pd.DataFrame({"prompt_text": ["q1", "q2"], "target_value": [27.0, 4.5], "id": [7, 8]}).to_parquet(path)
    problems = load_problems(str(path), question_field="prompt_text", answer_field="target_value")
    assert [(p.question, p.answer, p.id) for p in problems] == [("q1", "27", "7"), ("q2", "4.5", "8")]
    with pytest.raises(ValueError, match="--question-field"):
        load_problems(str(path))  # no usual field name: the message says which option names it


def test_shared_benchmark_files_load():
    if not (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        pytest.skip("no ../shared/data")
    gsm = load_problems(str(SHARED_DATA / "gsm8k_test.jsonl"), limit=3)
    assert [p.answer for p in gsm] == ["18", "3", "70000"]
    amc = load_problems(str(SHARED_DATA / "amc23_test.jsonl"), limit=1)
    assert amc[0].answer == "27"


def test_unreachable_hub_fails_fast_with_one_sentence(monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    import model

    monkeypatch.setattr(model, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(ValueError) as err:
        load_problems("gsm8k")
    message = str(err.value)
    assert "\n" not in message and "--task ../shared/data/gsm8k_test.jsonl" in message and "reached" in message
    assert datasets.config.HF_HUB_OFFLINE == before  # the offline switch is put back
    with pytest.raises(ValueError, match="--split test"):
        load_problems("math500", split="train")


ARITH_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
WORD_PROBLEMS = [  # (pattern, answer from its numbers): an independent reading of each template
    (r"has (\d+) \w+, buys (\d+) more and then gives (\d+) to", lambda a, b, c: a + b - c),
    (r"buys (\d+) bags of \w+ with (\d+) \w+ in each bag and gives away (\d+)\.", lambda a, b, c: a * b - c),
    (r"A box holds (\d+) \w+\. \w+ fills (\d+) boxes and has (\d+)", lambda a, b, c: a * b + c),
    (r"shares (\d+) \w+ equally among (\d+) friends, and then each friend finds (\d+)", lambda t, b, c: t // b + c),
]


def solve(question):
    """(the answer, the problem up to wording and operand order) computed without evaluate.py."""
    if m := ARITH_QUESTION.fullmatch(question):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        value = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](a, b)
        return value, (op, frozenset([a, b]) if op != "-" else (a, b))
    for t, (pattern, f) in enumerate(WORD_PROBLEMS):
        if m := re.search(pattern, question):
            numbers = tuple(int(x) for x in m.groups())
            return f(*numbers), (t, numbers)
    raise AssertionError(f"unrecognised question: {question}")


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_arith_gold_answers_are_right_and_splits_disjoint(level):
    train = load_problems(f"arith:{level}", split="train", limit=500)
    test = load_problems(f"arith:{level}", split="test", limit=200)
    assert len(test) >= 25 and len(train) >= 50  # level 1 is small: 86 train, 69 test problems
    for p in train + test:
        value, _ = solve(p.question)
        assert int(p.answer) == value >= 0, p
    assert len({p.question for p in test}) == len(test)  # no repeats inside a split
    assert not {solve(p.question)[1] for p in train} & {solve(p.question)[1] for p in test}


def test_arith_is_deterministic_and_seeded():
    assert load_problems("arith", split="train", limit=50) == load_problems("arith", split="train", limit=50)
    assert load_problems("arith", split="train", limit=50) != load_problems("arith", split="train", limit=50, seed=1)
    assert load_problems("arith") == load_problems("arith:2")  # level 2 is the default
    # the test split is the same *set* whatever the seed: a hash of the problem decides the split
    a = {p.question for p in load_problems("arith:2", seed=0)}
    assert a == {p.question for p in load_problems("arith:2", seed=5)}
    level1 = load_problems("arith:1", split="train")
    assert all(int(m.group(1)) < 10 and int(m.group(3)) < 10 for m in map(ARITH_QUESTION.fullmatch, (p.question for p in level1)))


@pytest.mark.parametrize("task,match", [("gsm9k", "unknown task"), ("openai/gsm8k", "unknown task"),
                                        ("nope/missing.jsonl", "no such file"),
                                        ("arith:9", "levels"), ("arith:x", "arith:LEVEL")])
def test_bad_tasks_raise_clear_errors(task, match):
    with pytest.raises(ValueError, match=match):
        load_problems(task)


# -----------------------------------------------------------------------------------------------
# The evaluation loop and the command line


def test_evaluate_bookkeeping_with_a_scripted_sampler(monkeypatch, tmp_path):
    """A fake sampler whose answers we choose: the counts, Pass@K and averages must follow."""
    import torch

    import rollout

    problems = [ev.Problem("q0", "3", "p0"), ev.Problem("q1", "5", "p1"), ev.Problem("q2", "7", "p2")]
    right = {"q0": 1, "q1": 0, "q2": 4}  # correct samples out of n = 4

    def fake_sample(model, tokenizer, prompts, group_size=1, **kw):
        texts, lengths = [], []
        for prompt in prompts:
            p = next(p for p in problems if prompt.endswith(p.question))
            texts += [f"\\boxed{{{p.answer}}}" if j < right[p.question] else r"\boxed{0}" for j in range(group_size)]
            lengths += [2 + j for j in range(group_size)]
        R = max(lengths)
        mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
        return rollout.Rollout(None, None, None, mask, None, 0.5 * mask, torch.tensor([n < R for n in lengths]), texts, group_size)

    monkeypatch.setattr(rollout, "sample", fake_sample)
    monkeypatch.setattr(rollout, "format_prompt", lambda tok, q: "prompt: " + q)
    result = ev.evaluate(None, None, problems, n=4, ks=[1, 2, 4], batch_prompts=2, out_dir=str(tmp_path), progress=False)
    assert result["correct_counts"] == [1, 0, 4]
    assert result["pass_at_k"] == pytest.approx({1: 5 / 12, 2: 1.5 / 3, 4: 2 / 3})
    accs = [0.25, 0.0, 1.0]
    mean = sum(accs) / 3
    assert result["accuracy"] == pytest.approx(mean)
    assert result["accuracy_se"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2 / 3))
    assert result["mean_length"] == pytest.approx(3.5) and result["mean_entropy"] == pytest.approx(0.5)
    assert result["truncated"] == pytest.approx(0.25)  # the rows of length 5 (of 5 columns) did not stop
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert len(samples) == 12 and sum(s["correct"] for s in samples) == 5
    summary = ev.load_summary(str(tmp_path))
    assert summary["pass_at_k"] == pytest.approx(result["pass_at_k"]) and (tmp_path / "passk.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least 8 samples"):
        ev.evaluate(None, None, problems, n=4, ks=[8], progress=False)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--task", "gsm9k"], "unknown task"),
    (["--task", "no/such/file.jsonl"], "no such file"),
    (["--n", "4", "--k", "1,8"], "exceeds --n 4"),
    (["--k", "one"], "comma-separated"),
])
def test_cli_bad_options_give_one_clear_line(args, message):
    out = run_cli(*args, "--model", "no-model-is-loaded-before-the-options-are-checked")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 1-layer Llama with the real SmolLM2 tokenizer (its chat template and stop tokens)."""
    import torch

    model = pytest.importorskip("model")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        gguf = model._smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=1024)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_end_to_end_and_compare(tiny_model_dir, tmp_path, capsys):
    out_a, out_b = tmp_path / "run_a", tmp_path / "run_b"
    for out, seed in ((out_a, "0"), (out_b, "1")):
        ev.main(["--model", str(tiny_model_dir), "--task", "arith:1", "--limit", "3", "--n", "4", "--k", "1,2,4",
                 "--max-new-tokens", "6", "--out", str(out), "--seed", seed, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "Pass@K" in printed and "mean entropy" in printed and "mean length" in printed
    summary = json.loads((out_a / "summary.json").read_text())
    assert summary["ks"] == [1, 2, 4] and summary["num_problems"] == 3 and summary["task"] == "arith:1"
    assert summary["mean_length"] == pytest.approx(6, abs=1)  # a random model rarely stops
    samples = [json.loads(line) for line in (out_a / "samples.jsonl").open()]
    assert len(samples) == 12 and {"response", "correct", "length", "mean_entropy"} <= set(samples[0])
    assert (out_a / "passk.png").stat().st_size > 0
    ev.main(["--compare", str(out_a), str(out_b), "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "run_a" in table and "run_b" in table and (tmp_path / "cmp" / "passk_compare.png").is_file()


def test_greedy_evaluate_is_reproducible(tiny_model_dir):
    from model import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    problems = load_problems("arith:1", limit=2)
    runs = [ev.evaluate(model, tokenizer, problems, n=1, ks=[1], temperature=0, max_new_tokens=4, progress=False)
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]["pass_at_k"].keys() == {1}


def test_a_missing_gold_answer_or_a_broken_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?", "answer": null}\n')
    with pytest.raises(ValueError, match=r"t, line 3: the answer \('answer'\) is missing or empty"):
        load_problems(str(path))  # never the gold answer "None", which a reply "None" would match
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?" "answer": "4"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: not valid JSON"):
        load_problems(str(path))
    lines = tmp_path / "lines.json"  # JSON lines under a .json name read as before
    lines.write_text('{"question": "1+1?", "answer": 2}\n{"question": "2+2?", "answer": 4}\n')
    assert [p.answer for p in load_problems(str(lines))] == ["2", "4"]

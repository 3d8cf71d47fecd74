"""tasks.py: local files (jsonl, json, parquet), the hub's offline failure, arith's gold answers and
its disjoint splits, and clear errors for bad tasks."""

import json
import operator
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

from tasks import load_problems  # noqa: E402

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

    from plumbing import load

    monkeypatch.setattr(load, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(ValueError) as err:
        load_problems("gsm8k")
    message = str(err.value)
    assert "\n" not in message and "reached" in message
    assert "download its test split as a .jsonl file" in message
    assert "--task gsm8k_test.jsonl" in message
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
    """(the answer, the problem up to wording and operand order) computed without tasks.py."""
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

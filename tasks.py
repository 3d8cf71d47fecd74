"""
tasks.py -- the problems: hub benchmarks, local files, and the built-in `arith` task.

Where it sits in the pipeline:

    [load_problems -> Problem(question, answer, id)] -> format_prompt -> rollout.sample -> grader -> ...

Every task becomes a list of Problem: a question for the prompt, a gold answer for the grader
(grader.py), and an id for the records. train.py draws its training prompts from one task and its
held-out problems from another (or from a hashed share of the same file); evaluate.py measures Pass@K
on any of them. Its last section is train.py's side of that: load_tasks (the training and the
held-out problems, checked before the model loads) and batches_of_problems (each step's prompts).

    load_problems("arith:2", split="test", limit=8)            # built in: offline, generated from a seed
    load_problems("gsm8k", split="train")                      # the hub (or its cache)
    load_problems("my_math500.jsonl")                          # a local .jsonl/.json/.parquet file

Simplifications, said up front:
  1. `arith` is generated from a seed, so that everything runs offline; the hub benchmarks (GSM8K,
     MATH-500, AIME24, AMC23) need the network or a local copy of the file.
  2. `limit` takes the first L problems (not a random subset), so two runs see the same ones.
  3. A dataset's gold answer is read the simple way: the number after ####, else the last \\boxed{},
     else the field as it is.
"""

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass

import torch

from grader import last_boxed

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
ARITH_DEFAULT_LEVEL = 2  # sums and products of 2..12: SmolLM2-135M's greedy pass@1 rose from 0.25 to 0.80 in the README's 12-step run
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
        return last_boxed(text) or text
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

    from plumbing.load import hub_reachable

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
        fix = f"download its {split} split as a .jsonl file and pass its path: "
        fix += f"--task {name}_{split}.jsonl"
        if split == "train" and "test" in splits:  # a training run: its held-out problems need their own file
            fix += f" --eval_task {name}_test.jsonl (its test split, for the held-out problems)"
        reason = "the Hugging Face hub cannot be reached" if offline else f"loading it failed ({type(e).__name__})"
        raise ValueError(f"cannot load {name} ({repo}): {reason}; {fix}") from None
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
# Local files as tasks: which --task names a file, and train.py's held-out share of a single file


def is_local_task(source: str) -> bool:
    """Does --task name a file (rather than arith or a hub benchmark)?"""
    return os.path.splitext(str(source))[1].lower() in LOCAL_SUFFIXES or os.path.exists(str(source))


def held_out_split(problems: list, percent: int = LOCAL_TEST_PERCENT) -> tuple:
    """(train, test) of a single local file: a hash of each question, not its position, picks the
    side, so the split is the same on every run and a repeated question never lands on both."""
    is_test = [int(hashlib.sha256(p.question.encode()).hexdigest()[:8], 16) % 100 < percent for p in problems]
    return [p for p, t in zip(problems, is_test) if not t], [p for p, t in zip(problems, is_test) if t]


# -----------------------------------------------------------------------------------------------
# The problems: which ones train, which ones are held out


def batches_of_problems(problems, batch_size: int, seed: int, step: int):
    """The prompts of step `step`: epochs over a seeded shuffle, so a resumed run sees the same order."""
    per_epoch = len(problems) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [problems[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def load_tasks(cfg, problems=None) -> tuple:
    """(training problems, held-out problems), checked before the model loads. A single local file
    has no test split: a fixed share of its rows is held out and never trained on (held_out_split)."""
    if problems is None:
        if is_local_task(cfg.task) and not cfg.eval_task:
            problems = held_out_split(load_problems(cfg.task, **fields_of(cfg)))[0]
        else:
            problems = load_problems(cfg.task, split="train", seed=cfg.seed, **fields_of(cfg))
    held_out = held_out_problems(cfg) if cfg.eval_problems else []
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.task}: {len(problems)} training problems, fewer than one step's --prompts_per_step "
                         f"{cfg.prompts_per_step}: lower it or add problems")
    if cfg.eval_problems and not held_out:
        raise ValueError(f"{cfg.eval_task or cfg.task} gave no held-out problems: pass --eval_task FILE, or --eval_problems 0")
    return problems, held_out


def held_out_problems(cfg) -> list:
    """The first eval_problems of the test split of --eval_task, else of --task; of a single local
    file, of its held-out share. "Held-out" is never the training set. (experiment.py uses it too.)"""
    if is_local_task(cfg.task) and not cfg.eval_task:
        return held_out_split(load_problems(cfg.task, **fields_of(cfg)))[1][: cfg.eval_problems]
    return load_problems(cfg.eval_task or cfg.task, split="test", limit=cfg.eval_problems, seed=cfg.seed, **fields_of(cfg))


def fields_of(cfg) -> dict:
    """The field names of a local task file, where given."""
    return dict(question_field=cfg.question_field or None, answer_field=cfg.answer_field or None)

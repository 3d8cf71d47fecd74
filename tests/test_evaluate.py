"""evaluate.py: Pass@K against brute force, the evaluation loop's bookkeeping, the CLI end to end.
(The grader's cases are in test_grader.py, the problem loaders' in test_tasks.py.)"""

import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate as ev  # noqa: E402
from evaluate import EvalSettings, pass_at_k, pass_at_k_curve  # noqa: E402
from tasks import Problem, load_problems  # noqa: E402

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
# The evaluation loop and the command line


def test_evaluate_bookkeeping_with_a_scripted_sampler(monkeypatch, tmp_path):
    """A fake sampler whose answers we choose: the counts, Pass@K and averages must follow."""
    import torch

    import rollout

    problems = [Problem("q0", "3", "p0"), Problem("q1", "5", "p1"), Problem("q2", "7", "p2")]
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
    result = ev.evaluate(None, None, problems, EvalSettings(n=4, ks=[1, 2, 4], batch_prompts=2, progress=False), out_dir=str(tmp_path))
    assert result["correct_counts"] == [1, 0, 3]  # q2's fourth answer is right but cut off: wrong
    assert result["pass_at_k"] == pytest.approx({1: 4 / 12, 2: 1.5 / 3, 4: 2 / 3})
    accs = [0.25, 0.0, 0.75]
    mean = sum(accs) / 3
    assert result["accuracy"] == pytest.approx(mean)
    assert result["accuracy_se"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2 / 3))
    assert result["mean_length"] == pytest.approx(3.5) and result["mean_entropy"] == pytest.approx(0.5)
    assert result["truncated"] == pytest.approx(0.25)  # the rows of length 5 (of 5 columns) did not stop
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert len(samples) == 12 and sum(s["correct"] for s in samples) == 4
    cut = next(s for s in samples if s["id"] == "p2" and not s["stopped"])
    assert cut["extracted"] == "7" and cut["correct"] is False  # the right number, cut off: wrong
    summary = ev.load_summary(str(tmp_path))
    assert summary["pass_at_k"] == pytest.approx(result["pass_at_k"]) and (tmp_path / "passk.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least 8 samples"):
        ev.evaluate(None, None, problems, EvalSettings(n=4, ks=[8], progress=False))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True, timeout=120)


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

    load = pytest.importorskip("plumbing.load")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        gguf = load._smollm2_gguf()
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
    from plumbing.load import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    problems = load_problems("arith:1", limit=2)
    greedy = EvalSettings(n=1, ks=[1], temperature=0, max_new_tokens=4, progress=False)
    runs = [ev.evaluate(model, tokenizer, problems, greedy) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]["pass_at_k"].keys() == {1}

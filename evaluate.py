"""
evaluate.py -- measure a model the way the paper does: n samples per problem, graded, then the
unbiased Pass@K.

Where it sits in the pipeline:

    tasks.load_problems -> rollout.sample (n answers per problem) -> grader.grade_response
                        -> [pass_at_k: the chance one of K answers is right] -> a Pass@K curve

train.py calls evaluate() for its held-out numbers (greedy, n = 1); experiment.py for its Pass@K
curves. The paper samples at temperature 0.6 and top-p 0.95 and reports the unbiased Pass@K of
Chen et al. 2021. From the command line:

    python evaluate.py --model smollm2-135m --task arith --n 64 --limit 50
    python evaluate.py --model out/ckpt --task my_math500.jsonl --n 16 --k 1,4,16  # a local file
    python evaluate.py --compare out/eval_base out/eval_grpo out/eval_entropy   # curves on one plot

Simplifications, said up front:
  1. The grader is rule-based (grader.py): no algebra; `--grader math-verify` plugs in the symbolic
     checker when installed. An answer cut off at --max-new-tokens is graded wrong, as in training
     (grader.grade_response), and the share cut off is printed beside the accuracy.
  2. `--limit L` takes the first L problems (not a random subset), so two runs see the same ones.
  3. The error bar on Pass@1 is the standard error over problems (the spread of per-problem
     accuracies / sqrt(number of problems)): how far the number would move on another draw of
     problems like these. Pass@K for K > 1 gets no error bar.
"""

import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass

from grader import extract_answer, grade_response
from plumbing.command_line import OneLineParser, check_context, check_sampling, make_out_folder
from tasks import load_problems

# -----------------------------------------------------------------------------------------------
# Device options the scripts share: checked before the model loads


def check_device(device: str | None):
    """Refuse a device torch cannot use, with the fix (before a model load, not after it)."""
    import torch

    if device in (None, "auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu or cuda (or auto, cuda:N), got '{device}'")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU here: use --device cpu")


def cuda_graph_option(value: str, device: str | None, option: str = "--cuda-graph"):
    """--cuda-graph auto|true|false -> what sample() takes (None = auto: on for CUDA, off elsewhere).
    `option` is the flag's name in the error (train.py spells it --cuda_graph)."""
    from plumbing.load import pick_device

    if value not in ("auto", "true", "false"):
        raise ValueError(f"{option} must be auto, true or false, got '{value}'")
    on_cuda = pick_device(device).type == "cuda"
    if value == "true" and not on_cuda:
        raise ValueError(f"{option} true needs a CUDA device (CUDA graphs do not exist on a CPU): "
                         "leave it at auto (on for CUDA, off elsewhere)")
    return {"auto": None, "true": True, "false": False}[value]


# -----------------------------------------------------------------------------------------------
# Pass@K: the chance that at least one of K samples is right, estimated from n >= K samples


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


@dataclass
class EvalSettings:
    """How evaluate() samples and grades. Greedy Pass@1 is EvalSettings(n=1, ks=[1], temperature=0)."""

    n: int  # answers sampled per problem
    ks: list | None = None  # the K of Pass@K (default 1, 2, 4, ... up to n)
    temperature: float = 0.6  # the paper evaluates at 0.6 (0 = greedy)
    top_p: float = 0.95  # nucleus sampling, the paper's 0.95 (1 = off)
    max_new_tokens: int = 512  # response budget: a longer answer is cut off and graded wrong
    batch_prompts: int = 4  # problems per sampling call, each with n rows
    seed: int = 0  # the batch starting at problem b samples with seed + b
    grader: str = "ours"  # or "math-verify" (see grader.is_correct)
    cuda_graph: bool | None = None  # rollout.sample's option: None = on for CUDA
    progress: bool = True  # a progress bar over the batches


def sample_problems(model, tokenizer, problems: list, s: EvalSettings):
    """Yield (batch of problems, its Rollout) with s.n answers per problem: the one way evaluate.py
    and entropy_view.py sample a list of problems. Rows i*n .. i*n+n-1 answer the batch's problem i."""
    from tqdm import tqdm

    from rollout import format_prompt, sample

    for b in tqdm(range(0, len(problems), s.batch_prompts), desc="sampling", unit="batch", disable=not s.progress):
        batch = problems[b : b + s.batch_prompts]
        yield batch, sample(model, tokenizer, [format_prompt(tokenizer, p.question) for p in batch], group_size=s.n,
                            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed + b,
                            cuda_graph=s.cuda_graph)


def grade_answers(batch: list, r, n: int, grader: str) -> list:
    """One sampled batch's answers (n per problem, in the problems' order) -> a record each: the
    answer, what the grader read from it, whether it counts (a cut-off answer is graded wrong, as
    in training: grader.grade_response), its length and mean token entropy (samples.jsonl)."""
    lengths = r.response_mask.sum(-1)  # (N,) tokens per answer, the stop token included
    entropy_sums = (r.entropies * r.response_mask).sum(-1)  # (N,)
    stopped = r.stopped.tolist()  # (N,): False = cut off by max_new_tokens
    records = []
    for j, text in enumerate(r.texts):
        p, length = batch[j // n], int(lengths[j])
        records.append({"id": p.id, "gold": p.answer, "response": text,
                        "extracted": extract_answer(text),
                        "correct": grade_response(text, p.answer, stopped[j], grader),
                        "length": length, "mean_entropy": entropy_sums[j].item() / max(length, 1),
                        "stopped": stopped[j]})
    return records


def evaluate(model, tokenizer, problems: list, s: EvalSettings, out_dir: str | None = None, info: dict | None = None) -> dict:
    """Sample s.n answers per problem, grade them, and summarise.

    Returns pass_at_k {k: value}, accuracy (mean Pass@1) and its standard error over problems,
    mean response length (tokens), mean token entropy (nats, over all response tokens),
    `truncated`: the share of answers cut off by max_new_tokens (graded wrong, as in training:
    grader.grade_response), and correct_counts (per problem) for further statistics.
    With out_dir, also writes samples.jsonl, summary.json and passk.png there; `info` (model, task,
    training step...) is stored in the summary as it is. On Ctrl-C the whole problems sampled so far
    are written there, summary.json marked "partial", and KeyboardInterrupt is raised again.
    """
    import torch

    n = s.n
    ks = default_ks(n) if s.ks is None else sorted(set(s.ks))
    if not problems or s.batch_prompts < 1:
        raise ValueError(f"need at least one problem and batch_prompts >= 1, got {len(problems)} and {s.batch_prompts}")
    for k in ks:
        pass_at_k(n, 0, k)  # raises a clear error for k > n before any sampling
    counts, records, entropy_sum = [], [], 0.0
    for batch, r in until_ctrl_c(sample_problems(model, tokenizer, problems, s)):
        entropy_sum += (r.entropies * r.response_mask).sum(-1).sum().item()  # over every response token
        graded = grade_answers(batch, r, n, s.grader)  # one record per answer, n per problem in a row
        records += graded
        counts += [sum(g["correct"] for g in graded[i * n : (i + 1) * n]) for i in range(len(batch))]
    tokens = sum(g["length"] for g in records)
    truncated = sum(not g["stopped"] for g in records)
    done = problems[: len(counts)]  # every problem, unless a Ctrl-C stopped the sampling early
    if not done:
        raise KeyboardInterrupt  # nothing sampled, nothing to save
    per_problem = torch.tensor(counts, dtype=torch.float64) / n  # (Q,): the accuracy of each of the Q problems
    result = {
        "n": n, "ks": ks, "num_problems": len(done),
        "pass_at_k": pass_at_k_curve(counts, n, ks),
        "accuracy": per_problem.mean().item(),
        # spread of per-problem accuracies / sqrt(number of problems): the error bar on Pass@1 that problem choice causes
        "accuracy_se": (per_problem.std().item() / math.sqrt(len(counts))) if len(counts) > 1 else 0.0,
        "mean_length": tokens / len(records),
        "mean_entropy": entropy_sum / max(tokens, 1),
        "truncated": truncated / len(records),
        "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "grader": s.grader,
        "correct_counts": counts, "problem_ids": [p.id for p in done], **(info or {}),
    }
    if len(done) < len(problems):  # a Ctrl-C: what was done is saved, marked partial, then we stop
        result.update(partial=True, problems_asked=len(problems))
    if out_dir:
        save_results(result, records, out_dir)
    if result.get("partial"):
        saved = f"{len(done)} of {len(problems)} problems sampled, saved to {out_dir} (partial)"
        raise KeyboardInterrupt(saved if out_dir else "")
    return result


def until_ctrl_c(batches):
    """Yield from `batches` until Ctrl-C, then stop without a word: evaluate() keeps the problems
    sampled so far (the batch cut off mid-way is dropped), saves them, and raises the stop again."""
    try:
        yield from batches
    except KeyboardInterrupt:
        return


def format_table(result: dict) -> str:
    lines = ["    K   Pass@K"] + [f"{k:5d}   {v:6.3f}" for k, v in result["pass_at_k"].items()]
    cut = 100 * result["truncated"]
    lines.append(f"accuracy {result['accuracy']:.3f} +- {result['accuracy_se']:.3f} | "
                 f"mean length {result['mean_length']:.1f} tokens | mean entropy {result['mean_entropy']:.3f} nats | "
                 f"{cut:.1f}% cut off at {result['max_new_tokens']} tokens (graded wrong)")
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


def make_parser() -> OneLineParser:
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
    p.add_argument("--overwrite", default="false", choices=["true", "false"], type=str.lower,
                   help="true: replace the results in --out (otherwise such a folder is refused)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="plot saved runs' Pass@K together; no model needed")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    # Ctrl-C and a kill save the problems sampled so far; SIGINT set explicitly, as Python leaves it
    # ignored in a background job (`python evaluate.py &` from a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
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
        held = [f for f in ("summary.json", "samples.jsonl") if os.path.isfile(f"{args.out}/{f}")]
        if held and args.overwrite != "true":  # results are never replaced unasked
            raise ValueError(f"--out {args.out} holds an earlier evaluation ({', '.join(held)}): "
                             "pass another --out, or --overwrite true to replace it")
        make_out_folder(args.out)  # now, not after the sampling: a bad --out must not cost the results
        problems = load_problems(args.task, args.split, args.limit, args.seed, args.question_field, args.answer_field)
        if not problems:
            raise ValueError(f"{args.task} gave no problems")
        from plumbing.load import load_model

        model, tokenizer = load_model(args.model, device=args.device)
        check_context(model, tokenizer, problems, args.max_new_tokens)
        print(f"{args.task} ({args.split}): {len(problems)} problems x {args.n} samples, temperature "
              f"{args.temperature}, top-p {args.top_p}, up to {args.max_new_tokens} new tokens, model {args.model}")
        settings = EvalSettings(n=args.n, ks=ks, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_prompts=args.batch_prompts, seed=args.seed,
                                grader=args.grader, cuda_graph=cuda_graph)
        result = evaluate(model, tokenizer, problems, settings, out_dir=args.out,
                          info={"model": args.model, "task": args.task, "split": args.split})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # one line, no traceback: what was saved, and where
        print(f"\ninterrupted: {str(e) or 'nothing sampled yet, nothing saved'}", file=sys.stderr)
        sys.exit(130)
    print(format_table(result))
    print(f"wrote samples.jsonl, summary.json and passk.png to {args.out}")


if __name__ == "__main__":
    main()

"""
bench.py -- how fast and how lean our sampler and training step are, against `transformers`.

    python bench.py                      # CPU, SmolLM2-135M, rows 1-4 (under 10 minutes on 2 cores)
    python bench.py --quick              # every row at toy sizes on a tiny random model (under a minute)
    python bench.py --device cuda        # row 5: the Qwen2.5-0.5B shape with random weights, bf16
    python bench.py --device cuda --compile   # row 5 also times the CUDA-graph decode step

Each row runs two things in the same process, on the same weights and the same batch: ours and the
obvious alternative. Each is warmed up, then the two are timed in turn (A, B, A, B, ...) so that a
busy machine slows both alike, and we report the medians. The absolute numbers depend on the
machine; the ratio is the result. The table is printed and written as JSON (--out).

    1   sampler vs transformers' generate: 2 prompts x 8 samples, 128 new tokens, EOS ignored
    2   shared prefill (each prompt once, its KV cache copied to its G rows) vs per-row prefill
    3   KV cache vs recomputing the whole sequence every step, at 64 and at 256 new tokens
    4   training step (our forward at response positions, chunked logits, GRPO loss, backward) vs
        transformers' model with full logits -> log_softmax -> gather -> the same loss: time, peak memory
    5   CUDA only: rows 1 and 4 for the Qwen2.5-0.5B architecture with random weights in bfloat16
        (the config is written below: nothing to download), 64 rows x 512 new tokens

Simplifications: the rows that need no real text (quick mode, row 5) use random weights and a
tokenizer with one token per byte, built here in a few lines, so they run with no download. Row 4's
rollout is random tokens with ragged prompt and response lengths: speed and memory do not depend on
what the tokens say.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch

from advantage import policy_loss
from model import KVCache, Transformer, _hf_load, _smollm2_gguf
from rollout import Rollout, logprobs_and_entropy, pick_next_token, sample, score_responses

# -----------------------------------------------------------------------------------------------
# Sizes: the full run and the toy run. One dict per mode keeps every number in one place.

FULL = dict(
    r1_prompts=2, r1_group=8, r1_prompt_len=60, r1_new=128, r1_repeats=3,
    r2_prompts=4, r2_prompt_len=256, r2_group=8, r2_new=32, r2_repeats=3,
    r3_rows=1, r3_prompt_len=32, r3_new=(64, 256), r3_repeats=(3, 1),
    r4_rows=16, r4_prompt_len=64, r4_response_len=192, r4_repeats=2,
    r5_prompts=8, r5_group=8, r5_prompt_len=64, r5_new=512, r5_repeats=3, r5_train_rows=8,
)
QUICK = dict(
    r1_prompts=2, r1_group=2, r1_prompt_len=12, r1_new=8, r1_repeats=2,
    r2_prompts=2, r2_prompt_len=24, r2_group=2, r2_new=4, r2_repeats=2,
    r3_rows=1, r3_prompt_len=8, r3_new=(4, 8), r3_repeats=(2, 2),
    r4_rows=4, r4_prompt_len=8, r4_response_len=16, r4_repeats=2,
    r5_prompts=2, r5_group=2, r5_prompt_len=16, r5_new=8, r5_repeats=2, r5_train_rows=4,
)


def qwen25_05b_config(**shrink):
    """The Qwen2.5-0.5B architecture (its config.json, written out); `shrink` overrides sizes for toys."""
    from transformers import Qwen2Config

    cfg = dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},  # Qwen2 has q/k/v bias always
    )
    cfg.update(shrink)
    return Qwen2Config(**cfg)


TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


# -----------------------------------------------------------------------------------------------
# Models and text


def byte_tokenizer():
    """A tokenizer with one token per byte plus <|endoftext|> (id 256), made offline.

    For random weights text means nothing, so any tokenizer will do as long as its ids fit the
    vocabulary; this one needs no file, so the GPU machine downloads nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins, one per byte
    inner = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_qwen(device, dtype, **shrink):
    """(transformers model, our model) of the Qwen2.5 architecture with the same random weights."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2ForCausalLM(qwen25_05b_config(**shrink))
    hf = hf.to(dtype).eval()
    return hf, Transformer.from_hf(hf).eval()


def smollm2(device):
    """(transformers model, our model, tokenizer) of SmolLM2-135M-Instruct, float32.

    Our model shares the weight tensors with transformers' (from_hf takes them, it does not copy):
    that is fair for time, and the memory we report is what a step allocates, so it is fair there too.
    """
    path = _smollm2_gguf()
    hf, tok = _hf_load(os.path.dirname(path), gguf_file=os.path.basename(path))
    hf = hf.to(device).eval()
    return hf, Transformer.from_hf(hf).eval(), tok


def text_prompts(n, length, tokenizer, seed=0):
    """n prompts of about `length` tokens each (lengths differ, so left padding is exercised)."""
    words = ("the farmer sells eggs at the market for three dollars a dozen and buys seed with "
             "half of what he earns how many dollars does he keep after two weeks of sales").split()
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        target = length - 4 * i  # a few tokens shorter each
        text = ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text += words[int(torch.randint(len(words), (1,), generator=g))] + " "
        prompts.append(text)
    return prompts


# -----------------------------------------------------------------------------------------------
# Timing and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare_times(ours, baseline, repeats, device, warmup=True):
    """Median seconds of ours() and baseline(), timed alternately after one warm-up call of each."""
    if warmup:
        ours(), baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(seconds(ours, device))
        t_base.append(seconds(baseline, device))
    return statistics.median(t_ours), statistics.median(t_base)


def peak_memory(fn, device):
    """Peak bytes of tensors that fn() allocates, above what was allocated before it (weights etc.).

    On CUDA the caching allocator counts this for us (max_memory_allocated). On CPU torch keeps no
    such count, and the process's resident size is a poor stand-in: malloc keeps freed pages and
    the model load leaves its own peak behind. So we run fn under the profiler with profile_memory,
    which records the bytes each torch op allocates and frees, and replay those records in time
    order: the running sum is the live-tensor curve, its maximum the peak. (Scratch memory an op
    frees before it returns is not seen; it is small next to the tensors a training step keeps.)
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def result(row, what, ours, baseline, unit, target, higher_is_better=True, note=""):
    """One table row. ratio: how many times better ours is (speed: ours/baseline or baseline/ours by
    unit; memory: ours/baseline, where lower is better)."""
    ratio = ours / baseline if unit in ("tok/s", "MB") else baseline / ours
    goal = float(target.split()[-1].rstrip("x"))
    met = ratio >= goal if higher_is_better else ratio <= goal
    return dict(row=row, what=what, ours=ours, baseline=baseline, unit=unit, ratio=ratio, target=target, met=met, note=note)


# -----------------------------------------------------------------------------------------------
# The baselines we write ourselves


def hf_generate(hf, tokenizer, prompts, group_size, new_tokens, temperature):
    """transformers' generate on the same rows as sample(prompts, group_size): each prompt repeated
    G times, left-padded; plain sampling (no top-k/top-p), EOS ignored so every row makes new_tokens."""
    from transformers import GenerationConfig

    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(hf.device)
    mask = enc["attention_mask"].repeat_interleave(group_size, 0).to(hf.device)
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)

    def run():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        assert out.shape[1] == ids.shape[1] + new_tokens, "generate stopped early: EOS was not ignored"

    return run


@torch.no_grad()
def sample_without_cache(model, prompt_ids, prompt_mask, new_tokens, temperature, seed=0):
    """Row 3's baseline: the sampler's loop with no KV cache, so every step runs the whole sequence
    so far through the model (O(T^2) over a response). Like sample(), it takes the last position's
    logits only and records log-probs and entropies."""
    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    ids, mask = prompt_ids, prompt_mask
    tokens = []
    for _ in range(new_tokens):
        logits = model.lm_head(model.hidden_states(ids, mask)[:, -1]).float()  # (N, V)
        token = pick_next_token(logits, temperature, 1.0, 0, generator)  # (N,)
        logprobs_and_entropy(logits, token, temperature)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
    return torch.stack(tokens, 1)  # (N, new_tokens)


def random_rollout(n, prompt_len, response_len, vocab, device, seed=0):
    """A rollout of random tokens, prompts left-padded to prompt_len and responses right-padded to
    response_len, with ragged lengths between half and all of each (as real rollouts are)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(prompt_len // 2, prompt_len + 1, (n,), generator=g)
    r_len = torch.randint(response_len // 2, response_len + 1, (n,), generator=g)
    p_len[0], r_len[0] = prompt_len, response_len  # the longest row sets the padded shape
    cols_p, cols_r = torch.arange(prompt_len), torch.arange(response_len)
    prompt_mask = (cols_p[None] >= prompt_len - p_len[:, None]).long()  # (N, P) left padding
    response_mask = (cols_r[None] < r_len[:, None]).float()  # (N, R) right padding
    r = Rollout(
        prompt_ids=torch.randint(vocab, (n, prompt_len), generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(vocab, (n, response_len), generator=g) * response_mask.long(),
        response_mask=response_mask,
        logprobs=torch.zeros(n, response_len),
        entropies=torch.zeros(n, response_len),
        stopped=torch.ones(n, dtype=torch.bool),
        texts=[""] * n,
        group_size=1,
    )
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "entropies", "stopped"):
        setattr(r, field, getattr(r, field).to(device))
    return r


def training_steps(ours, hf, rollout, temperature=1.0):
    """(our step, transformers' step): forward, the GRPO loss on the response tokens, backward.

    Advantages are random (one per response, as GRPO's); the old log-probs are the current ones,
    as on the first update after a rollout, so the PPO ratio starts at 1.
    """
    g = torch.Generator().manual_seed(1)
    N, P = rollout.prompt_ids.shape
    adv = torch.randn(N, 1, generator=g).to(rollout.logprobs.device).expand_as(rollout.logprobs)  # (N, R)
    mask = rollout.response_mask
    with torch.no_grad():
        old = score_responses(ours, rollout, temperature)[0]  # (N, R)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        logp, _ = score_responses(ours, rollout, temperature)  # (N, R): response positions only
        policy_loss(logp, old, adv, mask)[0].backward()

    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)  # (N, P + R)
    attn = torch.cat([rollout.prompt_mask, rollout.response_mask.long()], 1)

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=ids, attention_mask=attn).logits  # (N, P + R, V): every position
        logp = torch.log_softmax(logits.float() / temperature, -1)[:, P - 1 : -1]  # (N, R, V)
        logp = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)  # (N, R)
        policy_loss(logp, old, adv, mask)[0].backward()

    return ours_step, hf_step


# -----------------------------------------------------------------------------------------------
# The rows


def row_sampler(row, hf, model, tok, n_prompts, G, prompt_len, new, repeats, target, device):
    prompts = text_prompts(n_prompts, prompt_len, tok)
    ours = lambda: sample(model, tok, prompts, group_size=G, max_new_tokens=new, temperature=1.0, ignore_eos=True)  # noqa: E731
    base = hf_generate(hf, tok, prompts, G, new, 1.0)
    t_ours, t_base = compare_times(ours, base, repeats, device)
    n_tokens = n_prompts * G * new
    return result(row, f"sampler vs generate: {n_prompts} prompts of ~{prompt_len} tokens x {G}, {new} new tokens (tok/s)",
                  n_tokens / t_ours, n_tokens / t_base, "tok/s", target)


def row_shared_prefill(hf, model, tok, S, device):
    n, L, G, new, reps = S["r2_prompts"], S["r2_prompt_len"], S["r2_group"], S["r2_new"], S["r2_repeats"]
    prompts = text_prompts(n, L, tok)
    per_row = [p for p in prompts for _ in range(G)]  # the same rows, each prompt G times
    run = lambda ps, g, k: lambda: sample(model, tok, ps, group_size=g, max_new_tokens=k, ignore_eos=True)  # noqa: E731
    t_ours, t_base = compare_times(run(prompts, G, new), run(per_row, 1, new), reps, device)
    # the prefill's share of the per-row rollout: the same call with a single new token
    _, t_prefill = compare_times(run(prompts, G, 1), run(per_row, 1, 1), reps, device, warmup=False)
    share = t_prefill / t_base
    ideal = 1 / (1 - share * (1 - 1 / G))  # if only the prefill got G times cheaper
    return result("2", f"shared vs per-row prefill: {n} prompts of ~{L} tokens x {G}, {new} new tokens (s)",
                  t_ours, t_base, "s", ">= 1.0x",
                  note=f"prefill is {share:.0%} of the per-row rollout; {ideal:.2f}x if only the prefill shrank")


def row_kv_cache(hf, model, tok, S, device):
    rows = []
    prompts = text_prompts(S["r3_rows"], S["r3_prompt_len"], tok)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    for new, reps, label in zip(S["r3_new"], S["r3_repeats"], "ab"):
        ours = lambda: sample(model, tok, prompts, max_new_tokens=new, ignore_eos=True, seed=0)  # noqa: E731
        base = lambda: sample_without_cache(model, ids, mask, new, 1.0)  # noqa: E731
        # warm up on a few tokens only: the long baseline is the slowest thing in this file
        sample_without_cache(model, ids, mask, 4, 1.0), ours()
        t_ours, t_base = compare_times(ours, base, reps, device, warmup=False)
        target = ">= 5.0x" if label == "b" else ">= 1.0x"
        rows.append(result(f"3{label}", f"KV cache vs recompute: {S['r3_rows']} x ~{S['r3_prompt_len']}-token prompt, {new} new tokens (s)",
                           t_ours, t_base, "s", target))
    return rows


def row_training(row, hf, model, N, P, R, repeats, device):
    rollout = random_rollout(N, P, R, model.config.vocab_size, device)
    model.train(), hf.train()
    ours_step, hf_step = training_steps(model, hf, rollout)
    # the profiled call of each doubles as its warm-up
    mem_ours, mem_base = peak_memory(ours_step, device), peak_memory(hf_step, device)
    t_ours, t_base = compare_times(ours_step, hf_step, repeats, device, warmup=False)
    model.eval(), hf.eval()
    model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    shape = f"{N} x {P + R} tokens ({P} prompt + {R} response, ragged)"
    return [
        result(f"{row}a", f"training step vs transformers (full logits): {shape} (s)", t_ours, t_base, "s", ">= 1.0x"),
        result(f"{row}b", f"training step peak memory vs transformers: {shape} (MB)", mem_ours / 2**20, mem_base / 2**20,
               "MB", "<= 0.7x", higher_is_better=False),
    ]


# -----------------------------------------------------------------------------------------------
# The run


def print_table(rows):
    head = f"{'row':<4} {'what':<86} {'ours':>10} {'baseline':>10} {'ratio':>7} {'target':>8} {'met?':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['row']:<4} {r['what']:<86} {r['ours']:>10.4g} {r['baseline']:>10.4g} {r['ratio']:>6.2f}x {r['target']:>8} {'yes' if r['met'] else 'NO':>5}")
        if r["note"]:
            print(f"{'':<5}{r['note']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (rows 1-4, SmolLM2-135M) or cuda (row 5)")
    parser.add_argument("--quick", action="store_true", help="toy sizes on a tiny random model: every row in under a minute")
    parser.add_argument("--compile", action="store_true", help="cuda: also time the CUDA-graph decode step")
    parser.add_argument("--out", default="bench.json", help="where to write the table as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU: run on a machine with one, or use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got '{args.device}'")
    S = QUICK if args.quick else FULL
    start = time.time()
    rows = []
    if device.type == "cpu":
        if args.quick:
            hf, model = random_qwen(device, torch.float32, **TOY)
            tok, model_name = byte_tokenizer(), "toy Qwen2 (random weights)"
        else:
            hf, model, tok = smollm2(device)
            model_name = "SmolLM2-135M-Instruct"
        print(f"{model_name}, float32, {torch.get_num_threads()} threads")
        rows.append(row_sampler("1", hf, model, tok, S["r1_prompts"], S["r1_group"], S["r1_prompt_len"], S["r1_new"],
                                S["r1_repeats"], ">= 1.5x", device))
        rows.append(row_shared_prefill(hf, model, tok, S, device))
        rows += row_kv_cache(hf, model, tok, S, device)
        rows += row_training("4", hf, model, S["r4_rows"], S["r4_prompt_len"], S["r4_response_len"], S["r4_repeats"], device)
    else:
        hf, model = random_qwen(device, torch.bfloat16, **(TOY if args.quick else {}))
        tok, model_name = byte_tokenizer(), "Qwen2.5-0.5B architecture (random weights)" + (" toy" if args.quick else "")
        print(f"{model_name}, bfloat16, {torch.cuda.get_device_name()}")
        rows.append(row_sampler("5", hf, model, tok, S["r5_prompts"], S["r5_group"], S["r5_prompt_len"], S["r5_new"],
                                S["r5_repeats"], ">= 2.0x", device))
        rows += row_training("5", hf, model, S["r5_train_rows"], S["r5_prompt_len"], S["r5_new"], S["r5_repeats"], device)
    print()
    print_table(rows)
    elapsed = time.time() - start
    print(f"\n{elapsed:.0f} s in all; written to {args.out}")
    info = dict(
        date=time.strftime("%Y-%m-%d"), device=str(device), model=model_name, quick=args.quick,
        card=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        torch=torch.__version__, threads=torch.get_num_threads(), seconds=elapsed, rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main()

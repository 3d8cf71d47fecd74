"""
bench.py -- how fast and how lean our sampler and training step are, against `transformers`.

    python bench.py                  # CPU: SmolLM2-135M, rows 1-4, 8 and 9 (about 17 minutes on 2 cores)
    python bench.py --quick          # rows 1-4, 6, 7, 8 and 9 at toy sizes on a tiny random model (about a minute)
    python bench.py --device cuda    # rows 5-7: SmolLM2 and Qwen2.5-0.5B shapes, random weights, bfloat16
    python bench.py --device cuda --quick    # rows 5-7 at toy sizes: a smoke test before the real run
    python bench.py --rows 1,1c      # only these rows: what to rerun after changing the sampler

Every row runs two things in one process, on the same weights and the same batch: ours, and the
obvious alternative. Each is warmed up, then the two are timed in turn (A, B, A, B, ...) so that a
busy machine slows both alike, and we report medians. The absolute numbers depend on the machine;
the ratio is the result. The table is printed and written as JSON (--out).

    1   sampler vs transformers' generate: 2 prompts x 8 samples, 128 new tokens, EOS ignored;
        1b: the same with both models in bfloat16; 1c: the same at temperature 0.6 and top-p 0.95,
        the evaluation's settings (fast.sampling.nucleus_draw)
    2   shared prefill (each prompt once, its KV cache copied to its G rows) vs per-row prefill
    3   KV cache vs recomputing the whole sequence every step, at 64 and at 256 new tokens
    4   training step (our forward at response positions, chunked logits, GRPO loss, backward) vs
        transformers' model with full logits -> log_softmax -> gather -> the same loss: time, peak memory
    5   CUDA only, the Qwen2.5-0.5B architecture with random weights in bfloat16 (the config is
        written below: nothing to download): row 1 at 64 rows x 512 new tokens, eager (5a) and with
        each decode step replayed as a CUDA graph (5b, the default on CUDA), and row 4 for one
        micro-batch without recomputation (5c, 5d: what --recompute auto picks when memory allows)
    6   a whole GRPO step of train.py (rollout, reward, advantages, update with --micro_batch auto)
        against the obvious loop built from transformers: generate, then a forward and backward with
        the same loss in micro-batches of 32 rows; 32 prompts x 8 samples x 256 new tokens, on the
        SmolLM2-135M (6a) and Qwen2.5-0.5B (6b) architectures, both in train.py's precision (float32
        weights under the autocast it picks: bfloat16 on GPUs from the A100 on). GPU rows; --quick
        runs them on toys.
    7   evaluate() (16 problems x 64 samples x 128 new tokens, graded) against generate() on the same
        rows, graded the same way. A GPU row; --quick runs it on a toy.
    8   an evaluation's sampling (2 arith:3 problems x 32 answers, up to 192 tokens, stopping at the
        end token) with the rows that have stopped dropped from each step, vs computing every row
        until the last one stops. A CPU row.
    9   one update of train.py at the experiment's CPU size (4 arith:3 prompts x 8 answers, 2
        mini-batches, micro-batches of 8) with each micro-batch cut to the columns its rows use, the
        longest answers together, vs micro-batches as wide as the rollout. A CPU row.

Simplifications: the rows on random weights (quick mode, rows 5-7) use a tokenizer with one token per
byte, built here in a few lines, so nothing is downloaded. Row 4's rollout is random tokens with
ragged lengths: speed and memory do not depend on what the tokens say.
"""

import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from advantage import policy_loss
from evaluate import check_device
from fast.sampling import pick_next_token
from model import response_outputs
from plumbing.command_line import OneLineParser, check_out_file
from plumbing.load import _hf_load, _smollm2_gguf, model_from_hf
from plumbing.precision import choose_precision
from rollout import Rollout, logprobs_and_entropy, sample, score_responses

# -----------------------------------------------------------------------------------------------
# Sizes of the full run and of the toy run (--quick), all in one place

FULL = dict(
    r1_prompts=2, r1_group=8, r1_prompt_len=60, r1_new=128, r1_repeats=3,
    r2_prompts=4, r2_group=8, r2_prompt_len=256, r2_new=32, r2_repeats=2,
    r3_prompt_len=32, r3_new=(64, 256), r3_repeats=(3, 1),
    r4_rows=16, r4_prompt_len=64, r4_response_len=192, r4_repeats=3,
    r5_prompts=8, r5_group=8, r5_prompt_len=64, r5_new=512, r5_repeats=2, r5_train_rows=8,
    r6_prompts=32, r6_group=8, r6_prompt_len=64, r6_new=256, r6_repeats=2,
    r7_problems=16, r7_samples=64, r7_prompt_len=64, r7_new=128, r7_repeats=2,
    r8_prompts=2, r8_group=32, r8_new=192, r8_repeats=2,
    r9_prompts=4, r9_group=8, r9_new=192, r9_repeats=1,
)
QUICK = dict(
    r1_prompts=2, r1_group=2, r1_prompt_len=12, r1_new=8, r1_repeats=2,
    r2_prompts=2, r2_group=2, r2_prompt_len=24, r2_new=4, r2_repeats=2,
    r3_prompt_len=8, r3_new=(4, 8), r3_repeats=(2, 2),
    r4_rows=4, r4_prompt_len=8, r4_response_len=16, r4_repeats=2,
    r5_prompts=2, r5_group=2, r5_prompt_len=16, r5_new=8, r5_repeats=2, r5_train_rows=4,
    r6_prompts=2, r6_group=4, r6_prompt_len=12, r6_new=8, r6_repeats=1,
    r7_problems=2, r7_samples=4, r7_prompt_len=12, r7_new=8, r7_repeats=1,
    r8_prompts=1, r8_group=4, r8_new=8, r8_repeats=1,
    r9_prompts=2, r9_group=4, r9_new=8, r9_repeats=1,
)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def qwen25_05b_config(**shrink):
    """The Qwen2.5-0.5B architecture (its config.json, written out); `shrink` overrides sizes for toys."""
    from transformers import Qwen2Config

    cfg = dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )  # (Qwen2 always has a bias on q, k and v)
    cfg.update(shrink)
    return Qwen2Config(**cfg)


# -----------------------------------------------------------------------------------------------
# Models and text


def smollm2_config(**shrink):
    """The SmolLM2-135M architecture (a Llama: 30 layers, 9 query and 3 key/value heads, tied embeddings)."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    cfg.update(shrink)
    return LlamaConfig(**cfg)


def byte_tokenizer():
    """A tokenizer with one token per byte plus <|endoftext|> (id 256), made offline.

    On random weights text means nothing, so any tokenizer whose ids fit the vocabulary will do;
    this one needs no file, so the GPU machine downloads nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins, one per byte
    inner = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_qwen(device, dtype, **shrink):
    """(transformers model, our model) of the Qwen2.5 architecture, with the same random weights."""
    return random_model(qwen25_05b_config(**shrink), device, dtype)


def random_model(config, device, dtype):
    """(transformers model, our model) of a config, with the same random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config)
    hf = hf.to(dtype).eval()
    return hf, model_from_hf(hf).eval()


def smollm2():
    """(transformers model, our model, tokenizer) of SmolLM2-135M-Instruct, float32, on the CPU.

    Our model holds the same weights as transformers': it shares the embedding and the norms, and
    in float32 on a CPU keeps its own copy of the projections, stored column-major (model.py,
    column_major_weights_), which is part of what row 1 measures. The memory we report is what a
    step adds, so the copy does not count against either side.
    """
    path = _smollm2_gguf()
    hf, tok = _hf_load(os.path.dirname(path), gguf_file=os.path.basename(path))
    return hf.eval(), model_from_hf(hf).eval(), tok


def text_prompts(n, length, tokenizer, seed=0):
    """n prompts of about `length` tokens (0, 4, 8 or 12 fewer, in turn, so that left padding is exercised)."""
    words = ("the farmer sells eggs at the market for three dollars a dozen and buys seed with "
             "half of what he earns how many dollars does he keep after two weeks of sales").split()
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        text = ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < length - 4 * (i % 4):
            text += words[int(torch.randint(len(words), (1,), generator=g))] + " "
        prompts.append(text)
    return prompts


# -----------------------------------------------------------------------------------------------
# Timing and memory


def seconds(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_times(ours, baseline, repeats, device):
    """Median seconds of ours() and of baseline(), timed in turn (call them warm)."""
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(seconds(ours, device))
        t_base.append(seconds(baseline, device))
    return statistics.median(t_ours), statistics.median(t_base)


def peak_memory(fn, device):
    """Peak memory that fn() adds, in bytes, above what was in use before it (weights etc.).

    On CUDA the caching allocator counts it for us (max_memory_allocated). On a CPU torch keeps no
    such count, so we ask Linux for the process's peak resident memory (VmHWM in /proc/self/status,
    which writing "5" to /proc/self/clear_refs resets to the current size). That follows the
    tensors, scratch buffers inside ops included, only if freed memory goes back to the system at
    once; see cpu_training_step_memory for how we make sure of that.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status("VmRSS")
    fn()
    return _proc_status("VmHWM") - before


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # in kB there
    raise ValueError(f"/proc/self/status has no {key}: CPU memory is measured on Linux only")


def cpu_training_step_memory(hf_config, N, P, R):
    """Peak memory of one CPU training step, ours and transformers', measured in a fresh process.

    glibc's malloc keeps the memory of freed tensors below a size threshold (which it raises as
    the program runs, up to 32 MB) in its heap, to reuse, and the process's resident size then
    depends on fragmentation more than on what the step holds. So a child process first sets the
    threshold to 1 MB, which makes every larger tensor come from the system and go back to it
    when freed, then builds the model with random weights of the same shapes (memory does not
    depend on their values) and measures a step of each. The parent's timings keep malloc's defaults.
    Returns (ours, transformers') in bytes.
    """
    config = {k: v for k, v in hf_config.to_dict().items() if k != "quantization_config"}
    spec = json.dumps(dict(config=config, N=N, P=P, R=R))
    code = f"import bench; bench._training_step_memory_child({spec!r})"
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"measuring the memory of a training step failed:\n{child.stderr[-3000:]}")
    ours, transformers = child.stdout.split()[-2:]
    return int(ours), int(transformers)


def _training_step_memory_child(spec):
    from transformers import AutoConfig, AutoModelForCausalLM

    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)
    spec = json.loads(spec)
    config = dict(spec["config"])
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).train()
    ours = model_from_hf(hf).train()
    rollout = random_rollout(spec["N"], spec["P"], spec["R"], ours.config.vocab_size, torch.device("cpu"))
    ours_step, hf_step = training_steps(ours, hf, rollout)
    ours_bytes = peak_memory(ours_step, torch.device("cpu"))
    ours.zero_grad(set_to_none=True)  # (hf_step frees its own gradients, not ours)
    print(ours_bytes, peak_memory(hf_step, torch.device("cpu")))


def result(row, what, ours, baseline, unit, target, note=""):
    """One row of the table. ratio = how many times better ours is for speed (tok/s: ours/baseline;
    seconds: baseline/ours), or ours/baseline for memory (MB), where lower is better."""
    ratio = ours / baseline if unit in ("tok/s", "MB") else baseline / ours
    goal = float(target.split()[-1].rstrip("x"))
    met = ratio <= goal if target.startswith("<=") else ratio >= goal
    return dict(row=row, what=what, ours=ours, baseline=baseline, unit=unit, ratio=ratio, target=target, met=met, note=note)


# -----------------------------------------------------------------------------------------------
# The baselines we write ourselves


def hf_generate(hf, tokenizer, prompts, group_size, new_tokens, keep=False, temperature=1.0, top_p=1.0):
    """transformers' generate on the rows sample(prompts, group_size) makes: each prompt G times,
    left-padded; sampling at `temperature` (no top-k), EOS ignored, so every row makes new_tokens
    tokens. Returns a function that runs it (and, with keep, returns the ids and attention mask)."""
    from transformers import GenerationConfig

    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(hf.device)
    mask = enc["attention_mask"].repeat_interleave(group_size, 0).to(hf.device)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)

    def run():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert out.shape[1] == ids.shape[1] + new_tokens, "generate stopped early: EOS was not ignored"
        if keep:
            return out, torch.cat([mask, torch.ones_like(out[:, ids.shape[1] :])], 1)

    return run


@torch.no_grad()
def sample_without_cache(model, prompt_ids, prompt_mask, new_tokens, temperature=1.0, seed=0):
    """Row 3's baseline: the sampler's loop without a KV cache, so every step runs the whole
    sequence so far through the model (O(T^2) over a response). Like sample(), it makes the logits
    of the last position only and records log-probs and entropies. Returns the tokens (N, new_tokens)."""
    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    ids, mask = prompt_ids, prompt_mask
    tokens = []
    for _ in range(new_tokens):
        logits = model.lm_head(model.hidden_states(ids, mask)[:, -1]).float()  # (N, V)
        token, _ = pick_next_token(logits, temperature, 1.0, 0, generator)  # (N,)
        logprobs_and_entropy(logits, token, temperature)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
    return torch.stack(tokens, 1)


def random_rollout(n, prompt_len, response_len, vocab, device, seed=0):
    """A rollout of random tokens: prompts left-padded to prompt_len, responses right-padded to
    response_len, each between half and all of that long (real rollouts are ragged too)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(prompt_len // 2, prompt_len + 1, (n,), generator=g)
    r_len = torch.randint(response_len // 2, response_len + 1, (n,), generator=g)
    p_len[0], r_len[0] = prompt_len, response_len  # the longest row sets the padded shape
    prompt_mask = (torch.arange(prompt_len)[None] >= prompt_len - p_len[:, None]).long()  # (N, P)
    response_mask = (torch.arange(response_len)[None] < r_len[:, None]).float()  # (N, R)
    return Rollout(
        prompt_ids=(torch.randint(vocab, (n, prompt_len), generator=g) * prompt_mask).to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=(torch.randint(vocab, (n, response_len), generator=g) * response_mask.long()).to(device),
        response_mask=response_mask.to(device),
        logprobs=torch.zeros(n, response_len, device=device),
        entropies=torch.zeros(n, response_len, device=device),
        stopped=torch.ones(n, dtype=torch.bool, device=device),
        texts=[""] * n,
        group_size=1,
    )


def hf_log_probs(hf):
    """transformers' model as forward(ids, mask) -> (N, P + R, V) log-softmax at every position: the
    baseline's way, the full logits of prompt and response (ours makes them at response positions only)."""
    return lambda ids, mask: torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)


def training_steps(ours, hf, rollout):
    """(our step, transformers' step): forward, the GRPO loss on the response tokens, backward.

    Advantages are random (one per response, as GRPO's); the old log-probs are the current ones,
    as on the first update after a rollout, so the PPO ratio starts at 1. Temperature 1.
    """
    N = rollout.prompt_ids.shape[0]
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(N, 1, generator=g).to(rollout.logprobs.device).expand_as(rollout.logprobs)  # (N, R)
    mask = rollout.response_mask
    with torch.no_grad():
        old = score_responses(ours, rollout)[0]  # (N, R)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        logp, _ = score_responses(ours, rollout)  # (N, R): logits at response positions only, in chunks
        policy_loss(logp, old, adv, mask)[0].backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logp = response_outputs(hf_log_probs(hf), rollout)  # (N, R, V), from (N, P + R, V)
        logp = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)  # (N, R)
        policy_loss(logp, old, adv, mask)[0].backward()

    return ours_step, hf_step


# -----------------------------------------------------------------------------------------------
# The rows


def row_sampler(row, hf, model, tok, n_prompts, G, prompt_len, new, repeats, target, device, temperature=1.0, top_p=1.0):
    """Row 1 (and 1c, 5a): tokens per second of sample(), decoding eagerly, and of generate() on the same rows."""
    prompts = text_prompts(n_prompts, prompt_len, tok)
    ours = lambda k: lambda: sample(model, tok, prompts, group_size=G, max_new_tokens=k, ignore_eos=True, cuda_graph=False,  # noqa: E731
                                    temperature=temperature, top_p=top_p)
    base = lambda k: hf_generate(hf, tok, prompts, G, k, temperature=temperature, top_p=top_p)  # noqa: E731
    ours(4)(), base(4)()  # warm-up on a few tokens
    t_ours, t_base = compare_times(ours(new), base(new), repeats, device)
    n_tokens = n_prompts * G * new
    settings = "" if top_p == 1 else f", temperature {temperature}, top-p {top_p}"
    what = f"sampler vs generate, {str(model.dtype)[6:]}{settings}: {n_prompts} prompts of ~{prompt_len} tokens x {G}, {new} new tokens (tok/s)"
    return result(row, what, n_tokens / t_ours, n_tokens / t_base, "tok/s", target), t_base


def row_cuda_graph(hf, model, tok, S, t_generate, device):
    """Row 5b: sample(cuda_graph=True) against the generate() time row 5a measured."""
    n_prompts, G, new = S["r5_prompts"], S["r5_group"], S["r5_new"]
    prompts = text_prompts(n_prompts, S["r5_prompt_len"], tok)
    ours = lambda: sample(model, tok, prompts, group_size=G, max_new_tokens=new, ignore_eos=True, cuda_graph=True)  # noqa: E731
    what = f"CUDA-graph sampler vs generate: {n_prompts} prompts x {G}, {new} new tokens (tok/s)"
    try:
        ours()  # warm-up
        t_ours = statistics.median(seconds(ours, device) for _ in range(S["r5_repeats"]))
    except Exception as e:  # an optional path: say why it failed and let the other rows stand
        print(f"row 5b (cuda_graph=True) failed: {type(e).__name__}: {e}")
        return result("5b", what + " FAILED", float("nan"), new * n_prompts * G / t_generate, "tok/s", ">= 4.0x",
                      note=f"failed: {type(e).__name__}: {str(e)[:200]}")
    n_tokens = n_prompts * G * new
    return result("5b", what, n_tokens / t_ours, n_tokens / t_generate, "tok/s", ">= 4.0x")


def row_shared_prefill(model, tok, S, device):
    """Row 2: B prompts x G samples with one prefill per prompt, against the same rows each prefilled."""
    n, G, L, new, repeats = S["r2_prompts"], S["r2_group"], S["r2_prompt_len"], S["r2_new"], S["r2_repeats"]
    prompts = text_prompts(n, L, tok)
    per_row = [p for p in prompts for _ in range(G)]  # the same rows: each prompt G times, in group order
    run = lambda ps, g, k: lambda: sample(model, tok, ps, group_size=g, max_new_tokens=k, ignore_eos=True)  # noqa: E731
    run(prompts[:1], G, 2)(), run(per_row[:G], 1, 2)()  # warm-up
    t_ours, t_base = compare_times(run(prompts, G, new), run(per_row, 1, new), repeats, device)
    # the prefill's share of each rollout: the same call making a single token is (almost) all prefill
    t_ours_1, t_base_1 = compare_times(run(prompts, G, 1), run(per_row, 1, 1), 1, device)
    share = t_base_1 / t_base
    note = (f"prefill is {share:.0%} of the per-row rollout and {t_ours_1 / t_ours:.0%} of ours; "
            f"sharing it can save at most {share * (1 - 1 / G):.0%} of the time, a ratio of {1 / (1 - share * (1 - 1 / G)):.2f}x")
    what = f"shared vs per-row prefill: {n} prompts of ~{L} tokens x {G}, {new} new tokens (s)"
    return result("2", what, t_ours, t_base, "s", ">= 1.0x", note=note)


def row_kv_cache(model, tok, S, device):
    """Row 3: sample() against the same loop without a cache, one prompt, two response lengths."""
    prompts = text_prompts(1, S["r3_prompt_len"], tok)
    enc = tok(prompts, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    sample(model, tok, prompts, max_new_tokens=4, ignore_eos=True), sample_without_cache(model, ids, mask, 4)  # warm-up
    rows = []
    for new, repeats, label, target in zip(S["r3_new"], S["r3_repeats"], "ab", (">= 1.0x", ">= 5.0x")):
        ours = lambda: sample(model, tok, prompts, max_new_tokens=new, ignore_eos=True)  # noqa: E731
        base = lambda: sample_without_cache(model, ids, mask, new)  # noqa: E731
        t_ours, t_base = compare_times(ours, base, repeats, device)
        what = f"KV cache vs recompute: 1 prompt of {ids.shape[1]} tokens, {new} new tokens (s)"
        rows.append(result(f"3{label}", what, t_ours, t_base, "s", target,
                           note="" if repeats > 1 else "one run of each (the baseline alone takes about a minute)"))
    return rows


def row_training(row, memory_row, hf, model, N, P, R, repeats, device):
    """Rows 4a/4b (and 5c/5d): one training step, ours against transformers': time, peak memory."""
    rollout = random_rollout(N, P, R, model.config.vocab_size, device)
    model.train(), hf.train()
    ours_step, hf_step = training_steps(model, hf, rollout)
    if device.type == "cuda":  # the first call of each measures its memory and warms it up
        mem_ours, mem_base = peak_memory(ours_step, device), peak_memory(hf_step, device)
    else:
        mem_ours, mem_base = cpu_training_step_memory(hf.config, N, P, R)
    # No separate warm-up on a CPU: a step this size takes its gigabytes afresh from the system
    # every time, so a second call is no warmer than the first, and the median of 3 absorbs what is.
    t_ours, t_base = compare_times(ours_step, hf_step, repeats, device)
    model.eval(), hf.eval()
    model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    shape = f"{N} x ({P} + {R}) tokens, ragged"
    return [
        result(row, f"training step vs transformers' (full logits): {shape} (s)", t_ours, t_base, "s", ">= 1.0x"),
        result(memory_row, f"training step's peak memory vs transformers': {shape} (MB)",
               mem_ours / 2**20, mem_base / 2**20, "MB", "<= 0.7x"),
    ]


def pseudo_rewards(texts, device):
    """A reward for random weights: 1 for an even number of characters. Arbitrary, but it gives groups
    a spread, so the update has advantages to work with, as a real one would."""
    return torch.tensor([float(len(t) % 2 == 0) for t in texts], device=device)


def row_grpo_step(row, hf, model, tok, S, device, name):
    """Row 6: one whole GRPO step of train.py against the obvious loop built from transformers."""
    import train
    from advantage import group_advantages
    from update import OldScores, make_learners, micro_batch_plan

    B, G, new = S["r6_prompts"], S["r6_group"], S["r6_new"]
    prompts = text_prompts(B, S["r6_prompt_len"], tok)
    cfg = train.resolve_defaults(train.Config(prompts_per_step=B, group_size=G, max_new_tokens=new, lr=1e-6))
    # train.py's precision and learner: float32 weights under the autocast it picks (bfloat16 on
    # these GPUs), AdamW; the baseline runs under the same autocast
    precision = choose_precision(device.type, "auto")
    actor, _ = make_learners(cfg, model, precision)
    plan = micro_batch_plan(cfg, device, [actor])

    def ours():  # train.py's loop body: rollout -> reward -> advantages (+ the paper's term inside update) -> update
        model.eval()
        with actor.amp():  # as train.roll_out
            rollout = sample(model, tok, prompts, group_size=G, max_new_tokens=new, temperature=cfg.temperature)
        rewards = pseudo_rewards(rollout.texts, device)
        model.train()
        adv, _ = train.compute_advantages(cfg, rollout, rewards)
        train.update(cfg, actor, None, rollout, OldScores(adv), plan)  # (its forwards under actor.amp)

    generate = hf_generate(hf, tok, prompts, G, new, keep=True)
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr)

    def base():  # generate, grade, the group z-score, then forward and backward with the same loss
        hf.eval()
        with precision.autocast():
            ids, attn = generate()  # (N, P + new): the prompts (left-padded) and the responses
        P = ids.shape[1] - new
        texts = tok.batch_decode(ids[:, P:], skip_special_tokens=True)
        adv = group_advantages(pseudo_rewards(texts, device), G)[:, None].expand(-1, new)  # (N, R)
        mask = torch.ones(ids.shape[0], new, device=device)  # EOS ignored: every token counts
        hf.train()
        for m in range(0, ids.shape[0], 32):
            part = slice(m, m + 32)
            rows = SimpleNamespace(prompt_ids=ids[part, :P], prompt_mask=attn[part, :P],  # generate's rows, cut
                                   response_ids=ids[part, P:], response_mask=attn[part, P:])  # where the prompt ends
            with precision.autocast():
                logp = response_outputs(hf_log_probs(hf), rows).gather(-1, ids[part, P:, None]).squeeze(-1)  # (rows, R)
            policy_loss(logp, logp.detach(), adv[part], mask[part], num_tokens=mask.sum())[0].backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours(), base()  # warm-up: records the decode graphs, measures the micro-batch
    t_ours, t_base = compare_times(ours, base, S["r6_repeats"], device)
    model.eval(), hf.eval()
    what = f"GRPO step vs transformers loop, {name}: {B} prompts x {G}, {new} new tokens (s)"
    note = f"ours: micro-batches of {plan.last_rows} rows, recompute {'on' if plan.recompute else 'off'}"
    return result(row, what, t_ours, t_base, "s", ">= 4.0x", note=note)


def row_evaluate(hf, model, tok, S, device):
    """Row 7: evaluate() against generate() on the same rows, both graded the same way."""
    from evaluate import EvalSettings, evaluate
    from grader import is_correct
    from rollout import format_prompt
    from tasks import Problem

    n, new = S["r7_samples"], S["r7_new"]
    questions = text_prompts(S["r7_problems"], S["r7_prompt_len"], tok, seed=1)
    problems = [Problem(q, "42", f"bench-{i}") for i, q in enumerate(questions)]
    settings = EvalSettings(n=n, max_new_tokens=new, batch_prompts=len(problems), progress=False)
    ours = lambda: evaluate(model, tok, problems, settings)  # noqa: E731
    generate = hf_generate(hf, tok, [format_prompt(tok, q) for q in questions], n, new, keep=True,
                           temperature=0.6, top_p=0.95)

    def base():
        ids, _ = generate()
        texts = tok.batch_decode(ids[:, -new:], skip_special_tokens=True)
        return [is_correct(t, "42") for t in texts]

    ours(), base()  # warm-up
    t_ours, t_base = compare_times(ours, base, S["r7_repeats"], device)
    n_tokens = len(problems) * n * new
    what = f"evaluate() vs generate: {len(problems)} problems x {n} samples, {new} new tokens, graded (tok/s)"
    return result("7", what, n_tokens / t_ours, n_tokens / t_base, "tok/s", ">= 8.0x",
                  note="generate ignores EOS here, ours stops a row at EOS: with random weights almost none does")


def row_drop_stopped(model, tok, S, device):
    """Row 8: sampling as an evaluation does (real stop tokens, temperature 0.6, top-p 0.95), with the
    rows that have stopped dropped from the batch (fast.decode.EagerDecoder), against computing every row
    until the last one stops. Both make the same answers; only the time differs."""
    from fast import decode
    from rollout import format_prompt
    from tasks import load_problems

    n, G, new, repeats = S["r8_prompts"], S["r8_group"], S["r8_new"], S["r8_repeats"]
    prompts = [format_prompt(tok, p.question) for p in load_problems("arith:3", "test", n)]
    default = decode.COMPACT_WHEN

    def run(share):
        def go():
            decode.COMPACT_WHEN = share  # 0: never drop a row
            try:
                return sample(model, tok, prompts, group_size=G, max_new_tokens=new, temperature=0.6, top_p=0.95, seed=0)
            finally:
                decode.COMPACT_WHEN = default
        return go

    lengths = run(default)().lengths  # (N,), also the warm-up
    t_ours, t_base = compare_times(run(default), run(0.0), repeats, device)
    what = f"dropping stopped rows vs computing all: {n} arith:3 prompts x {G}, up to {new} new tokens (s)"
    note = f"answers of {lengths.mean():.0f} tokens on average, the longest {lengths.max():.0f}"
    return result("8", what, t_ours, t_base, "s", ">= 1.0x", note=note)


def row_cut_micro_batches(model, tok, S, device):
    """Row 9: one update of train.py (score_old_policy, then update: the CPU size's step, 4 arith:3
    prompts x 8 answers in 2 mini-batches, micro-batches of 8 rows) with fast/micro_batches.py's
    plan (each micro-batch cut to the columns its rows use, the longest answers together), against
    the reference's (update.MicroBatches: micro-batches as wide as the rollout, in the rollout's
    order; update.FAST off). Same gradients (tests/test_train.py); lr 0, so the weights stay as
    they are for both."""
    import train
    import update
    from rollout import format_prompt
    from tasks import load_problems

    n, G, new, repeats = S["r9_prompts"], S["r9_group"], S["r9_new"], S["r9_repeats"]
    prompts = [format_prompt(tok, p.question) for p in load_problems("arith:3", "train", n)]
    ro = sample(model, tok, prompts, group_size=G, max_new_tokens=new, temperature=0.6, top_p=0.95, seed=3)
    cfg = train.resolve_defaults(train.Config(group_size=G, prompts_per_step=n, mini_batches=2, temperature=0.6, lr=0.0))
    actor = update.Learner(model, torch.optim.AdamW(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False))
    adv = torch.randn(n * G, 1, generator=torch.Generator().manual_seed(1)).expand_as(ro.logprobs) * ro.response_mask

    def run(fast):
        def go():
            update.FAST = fast
            try:
                plan = update.micro_batch_plan(cfg, device, [actor])
                old = update.score_old_policy(cfg, ro, actor, None, None, plan)
                old.adv = adv
                train.update(cfg, actor, None, ro, old, plan)
            finally:
                update.FAST = True
        return go

    run(True)()  # warm-up
    t_ours, t_base = compare_times(run(True), run(False), repeats, device)
    model.eval()
    lengths = ro.lengths
    what = f"micro-batches cut to their rows vs as wide as the rollout: one update, {n} arith:3 prompts x {G} answers (s)"
    note = f"answers of {lengths.mean():.0f} tokens on average, the longest {lengths.max():.0f}, prompts of {ro.prompt_ids.shape[1]}"
    return result("9", what, t_ours, t_base, "s", ">= 1.0x", note=note)


# -----------------------------------------------------------------------------------------------
# The run


def profile_row1(S, device):
    """torch.profiler over 32 decode steps of row 1's rows, ours and generate's: the operators by
    their share of the CPU time. (Prefill and set-up are taken out by profiling a 1-token call too.)"""
    from torch.profiler import ProfilerActivity, profile

    hf, model, tok = (*random_qwen(device, torch.float32, **TOY), byte_tokenizer()) if S is QUICK else smollm2()
    prompts = text_prompts(S["r1_prompts"], S["r1_prompt_len"], tok)
    runs = {"ours": lambda k: lambda: sample(model, tok, prompts, group_size=S["r1_group"], max_new_tokens=k,
                                             ignore_eos=True, cuda_graph=False),
            "generate": lambda k: hf_generate(hf, tok, prompts, S["r1_group"], k)}
    shares = {}
    for name, run in runs.items():
        run(4)()  # warm-up
        totals = []
        for k in (1, 33):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(k)()
            totals.append({e.key: e.self_cpu_time_total for e in prof.key_averages()})
        decode = {op: t - totals[0].get(op, 0) for op, t in totals[1].items()}  # 32 decode steps' worth
        whole = sum(max(t, 0) for t in decode.values())
        shares[name] = {op: t / whole for op, t in sorted(decode.items(), key=lambda kv: -kv[1])[:8]}
        print(f"{name}: {whole / 32 / 1000:.1f} ms of CPU time per decode step")
        for op, share in shares[name].items():
            print(f"  {op:<55} {100 * share:5.1f}%")
    return shares


def progress(rows, start):
    """One line per finished row while the run goes on (the table comes at the end)."""
    for r in rows:
        print(f"  row {r['row']:<3} ours {r['ours']:.4g} {r['unit']}, baseline {r['baseline']:.4g} {r['unit']}, "
              f"{r['ratio']:.2f}x  ({time.time() - start:.0f} s so far)", flush=True)
    return rows


def print_table(rows):
    head = f"{'row':<4} {'what':<84} {'ours':>9} {'baseline':>9} {'ratio':>7} {'target':>8} {'met?':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['row']:<4} {r['what']:<84} {r['ours']:>9.4g} {r['baseline']:>9.4g} {r['ratio']:>6.2f}x "
              f"{r['target']:>8} {'yes' if r['met'] else 'NO':>5}")
        if r["note"]:
            print(f"{'':<5}{r['note']}")


ROWS = {"cpu": ("1", "1b", "1c", "2", "3a", "3b", "4a", "4b", "8", "9"), "cuda": ("5a", "5b", "5c", "5d", "6a", "6b", "7")}


def wanted_rows(rows: str, device: str, quick: bool):
    """--rows "1,1c" (or "all") -> a test wanted(*names): does any of a function's rows belong to the run?
    (A row function that times two rows, such as 4a and 4b, runs when either is asked for.)"""
    known = ROWS[device] + (("6", "7") if quick and device == "cpu" else ())
    only = set(known) if rows == "all" else {r.strip() for r in rows.split(",")}
    unknown = sorted(only - set(known))
    if unknown:
        raise ValueError(f"--rows: no row {', '.join(map(repr, unknown))} on {device}{' --quick' if quick else ''}; the rows are {','.join(known)}")
    return lambda *names: bool(only & set(names))


def main(argv=None):
    parser = OneLineParser(description="Speed and memory against transformers (see the docstring).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: rows 1-4, 8 and 9 on SmolLM2-135M; cuda: rows 5-7")
    parser.add_argument("--profile", action="store_true", help="instead of the rows: where row 1's decode steps spend their time")
    parser.add_argument("--quick", action="store_true", help="toy sizes on a tiny random model, to check that every row runs")
    parser.add_argument("--out", default="bench.json", help="where to write the table as JSON")
    parser.add_argument("--rows", default="all", help="only these rows, comma-separated: 1,1c or 6a,7 (all: the device's rows)")
    args = parser.parse_args(argv)
    try:  # before anything is timed: a bad option or --out costs a second, not the whole benchmark
        check_device(args.device)
        check_out_file(args.out)
        wanted = wanted_rows(args.rows, args.device, args.quick)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    S = QUICK if args.quick else FULL
    if args.profile:
        return profile_row1(S, device)
    start = time.time()
    rows = []
    if device.type == "cpu":
        if args.quick:
            (hf, model), tok, name = random_qwen(device, torch.float32, **TOY), byte_tokenizer(), "toy Qwen2 (random weights)"
        else:
            (hf, model, tok), name = smollm2(), "SmolLM2-135M-Instruct"
        print(f"{name}, float32, CPU with {torch.get_num_threads()} threads\n")
        r1 = (S["r1_prompts"], S["r1_group"], S["r1_prompt_len"], S["r1_new"], S["r1_repeats"], ">= 1.5x", device)
        if wanted("1"):
            rows += progress([row_sampler("1", hf, model, tok, *r1)[0]], start)
        if wanted("1b"):  # the same with both models in bfloat16, which train.py picks on CPUs with native bf16
            hf16 = copy.deepcopy(hf).to(torch.bfloat16)
            rows += progress([row_sampler("1b", hf16, model_from_hf(hf16).eval(), tok, *r1)[0]], start)
            del hf16
        if wanted("1c"):  # row 1 at the evaluation's settings (evaluate.py, the experiment): the top-p choice
            rows += progress([row_sampler("1c", hf, model, tok, *r1, temperature=0.6, top_p=0.95)[0]], start)
        if wanted("2"):
            rows += progress([row_shared_prefill(model, tok, S, device)], start)
        if wanted("3a", "3b"):
            rows += progress(row_kv_cache(model, tok, S, device), start)
        if wanted("4a", "4b"):
            rows += progress(row_training("4a", "4b", hf, model, S["r4_rows"], S["r4_prompt_len"], S["r4_response_len"],
                                          S["r4_repeats"], device), start)
        # (--quick: the GPU rows' code paths on the toy; their full sizes would take an hour on a CPU)
        if args.quick and wanted("6"):
            rows += progress([row_grpo_step("6", hf, model, tok, S, device, "toy")], start)
        if args.quick and wanted("7"):
            rows += progress([row_evaluate(hf, model, tok, S, device)], start)
        if wanted("8"):
            rows += progress([row_drop_stopped(model, tok, S, device)], start)
        if wanted("9"):  # (last: it trains the model, at lr 0, and sets its recompute as train.py's CPU plan does)
            rows += progress([row_cut_micro_batches(model, tok, S, device)], start)
    else:
        # Both architectures at once (a few GB on the card). The rows with targets come first, the
        # eager sampler (5a, 5b, informative) last, so that a run cut short still has what matters.
        (hf, model), tok = random_qwen(device, torch.bfloat16, **(TOY if args.quick else {})), byte_tokenizer()
        name = "Qwen2.5-0.5B architecture (random weights)" if not args.quick else "toy Qwen2 (random weights)"
        print(f"{name}, bfloat16, {torch.cuda.get_device_name()}\n")
        model.set_recompute(False)  # what --recompute auto picks when a mini-batch fits (it does here)
        if wanted("5c", "5d"):
            rows += progress(row_training("5c", "5d", hf, model, S["r5_train_rows"], S["r5_prompt_len"], S["r5_new"],
                                          S["r5_repeats"], device), start)
        if wanted("7"):
            rows += progress([row_evaluate(hf, model, tok, S, device)], start)
        for row, config, what in [("6b", qwen25_05b_config, "Qwen2.5-0.5B shape"), ("6a", smollm2_config, "SmolLM2-135M shape")]:
            if wanted(row):
                hf6, model6 = random_model(config(**(TOY if args.quick else {})), device, torch.float32)  # as train.py loads
                rows += progress([row_grpo_step(row, hf6, model6, tok, S, device, what)], start)
                del hf6, model6
        if wanted("5a", "5b"):  # (5b's baseline is 5a's generate)
            row, t_generate = row_sampler("5a", hf, model, tok, S["r5_prompts"], S["r5_group"], S["r5_prompt_len"], S["r5_new"],
                                          S["r5_repeats"], ">= 2.0x", device)
            rows += progress([row], start)
            rows += progress([row_cuda_graph(hf, model, tok, S, t_generate, device)], start)
        rows.sort(key=lambda r: r["row"])
    elapsed = time.time() - start
    print()
    print_table(rows)
    print(f"\n{elapsed:.0f} s in all; written to {args.out}")
    info = dict(
        date=time.strftime("%Y-%m-%d"), model=name, quick=args.quick, torch=torch.__version__, threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        seconds=elapsed, rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main()

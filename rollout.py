"""
rollout.py -- batched sampling with a KV cache: G answers for each of B prompts.

Where it sits in the pipeline:

    question -> [format_prompt] -> [sample: tokens, log-probs, entropies] -> reward -> advantage -> loss

Rollouts are most of the wall-clock time of RL for reasoning, so the sampler does three things a
plain loop would not:
  1. prefill each prompt once, then copy its KV cache to its G sample rows (the G samples of a
     GRPO group share the prompt, so recomputing it G times is pure waste);
  2. decode one token per step for all N = B*G rows at once, reusing the cache (a step at position t
     costs O(t), not the O(t^2) of recomputing the whole sequence);
  3. left-pad prompts of different lengths, with a mask and per-row positions, so every row's
     response starts in the same column and one step serves all rows.
Alongside each sampled token it records what training needs: its log-prob and the entropy of the
distribution it was drawn from (the paper's H_t), both in nats at the sampling temperature.
`sample` below is that loop, plainly: one eager step per token, top-p by sorting the vocabulary.
By default (fast=True) it hands the call to fast/sampling.py, which makes the same tokens, log-probs
and entropies for the same seed, sooner; fast=False runs the plain loop.

    prompts = [format_prompt(tok, "What is 7 * 8?")]
    r = sample(model, tok, prompts, group_size=4, max_new_tokens=64)
    r.texts, r.entropies, r.response_mask
"""

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from model import KVCache, response_outputs

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the problem step by step, then give the final answer "
    "in \\boxed{}, for example \\boxed{42}."
)
# Tokens that end an answer besides tokenizer.eos_token: the chat end-of-turn markers of the
# families we support (ChatML in Qwen and SmolLM2, Llama 3's end of turn).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@dataclass
class Rollout:
    """B prompts x G samples = N rows; the G samples of prompt i are rows i*G .. i*G+G-1."""

    prompt_ids: torch.Tensor  # (N, P) long, left-padded
    prompt_mask: torch.Tensor  # (N, P) long, 1 = real token
    response_ids: torch.Tensor  # (N, R) long, right-padded with the pad id after the stop token
    response_mask: torch.Tensor  # (N, R) float, 1 up to and including the stop token
    logprobs: torch.Tensor  # (N, R) float32, log pi(o_t) at the sampling temperature, 0 on padding
    entropies: torch.Tensor  # (N, R) float32, H_t of that distribution (nats), 0 on padding
    stopped: torch.Tensor  # (N,) bool; False = the row ran into max_new_tokens
    texts: list  # N decoded responses, special tokens dropped
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (N,) response lengths in tokens


def format_prompt(tokenizer, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text the model continues: the chat template when the tokenizer has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system_prompt + "\n\n" if system_prompt else "") + f"Question: {question}\nAnswer:"


def stop_token_ids(tokenizer) -> list:
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------------------------
# The maths of one step: shared with train.py, so sampler and trainer agree to the last digit


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log pi(token) and H = -sum_v pi(v) log pi(v) of softmax(logits / temperature), in nats.

    logits (..., V), tokens (...) -> two tensors (...). Both are of the full softmax at this
    temperature, before any top-p/top-k truncation: that is the policy pi whose gradient training
    takes, so the PPO ratio pi_new / pi_old compares like with like (veRL does the same).
    temperature 0 (greedy) is recorded at temperature 1.
    """
    logits = logits.float()
    if temperature not in (0, 1):  # (at 1 we skip the division: it would copy the largest tensor we make)
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)  # (..., V)
    entropy = -(logp.exp() * logp).sum(-1)  # (...)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def score_responses(model, rollout, temperature: float = 1.0, chunk_rows: int = 4):
    """Log-probs and entropies of the rollout's response tokens under `model`, with gradients.

    This is the training forward (and the one that produces the PPO ratio's old log-probs):
    returns logp (N, R) and entropy (N, R) at the sampling temperature, 0 on padding.
    Memory: the logits (N, R, V) are the largest tensor in the program (16 x 256 x 151936 floats is
    2.5 GB for Qwen). We never make them for prompt positions, nor for the padding after a response
    that stopped early (often half of (N, R): R is the longest response). The real response tokens
    are taken out as one flat list, and their logits made `chunk_rows` rows' worth (chunk_rows * R
    tokens) at a time. With model.recompute (train.py's --recompute) each chunk runs inside
    torch.utils.checkpoint, which keeps only the hidden states for backward and recomputes that
    chunk's logits there: one chunk of logits is alive at any moment, at the price of one extra
    LM-head matmul in the backward pass. Without it, backward keeps every chunk's logits.
    """
    real = rollout.response_mask.bool()  # (N, R)
    h = response_outputs(model.hidden_states, rollout)  # (N, R, D): position t predicts response token t
    h, tokens = h[real], rollout.response_ids[real]  # (n_real, D), (n_real,): the real response tokens, padding dropped

    def chunk(h_part, tokens_part):
        return logprobs_and_entropy(model.lm_head(h_part), tokens_part, temperature)

    logps, ents = [h.new_zeros(0, dtype=torch.float32)], [h.new_zeros(0, dtype=torch.float32)]  # (so no tokens still cats)
    step = chunk_rows * real.shape[1]
    for i in range(0, tokens.shape[0], step):
        part = slice(i, i + step)
        if torch.is_grad_enabled() and model.recompute:
            lp, en = checkpoint(chunk, h[part], tokens[part], use_reentrant=False)
        else:
            lp, en = chunk(h[part], tokens[part])
        logps.append(lp)
        ents.append(en)
    zeros = torch.zeros(real.shape, dtype=torch.float32, device=h.device)  # (N, R)
    return zeros.masked_scatter(real, torch.cat(logps)), zeros.masked_scatter(real, torch.cat(ents))  # (N, R) each


# -----------------------------------------------------------------------------------------------
# The sampler


@torch.no_grad()
def sample(model, tokenizer, prompts, group_size=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
           top_k=0, seed=None, ignore_eos=False, fast=True, cuda_graph=None):
    """Sample `group_size` responses for each prompt (formatted strings). Returns a Rollout.

    ignore_eos=True never stops at an end token: every row gets exactly max_new_tokens tokens, all
    inside the response mask (bench.py uses it so that we and `generate` make as many tokens).
    fast=True (the default) hands the call to fast/sampling.py: for the same seed the same tokens,
    log-probs and entropies as the loop below, sooner on a CPU and a GPU alike. fast=False runs the
    loop below, the one to read. One switch for the whole fast sampler, not one per trick in it:
    its tricks only pay together (the rounds exist for the CUDA graph, the spare rows for the
    rounds), and it is checked against this loop as one. cuda_graph picks the fast sampler's decode
    step (see fast.sampling.sample; None = a CUDA graph on a CUDA device); this loop has none.
    """
    _check_args(prompts, group_size, max_new_tokens, temperature, top_p, top_k)
    if fast:  # (imported here, not at the top: fast/sampling.py builds on this file)
        from fast.sampling import sample as fast_sample

        return fast_sample(model, tokenizer, prompts, group_size, max_new_tokens, temperature,
                           top_p, top_k, seed, ignore_eos, cuda_graph)
    if cuda_graph:
        raise ValueError("cuda_graph=True is the fast sampler's: pass fast=True with it")
    device, G = model.device, group_size
    generator = _seeded_generator(seed, device)
    pad_id, stop_ids = _pad_and_stop_ids(tokenizer, ignore_eos, device)

    # 1) left-pad the prompts (each ends in column P-1) and run them through the model once
    prompt_ids, prompt_mask = _left_pad(tokenizer, prompts, pad_id, device)  # (B, P) each
    B, P = prompt_ids.shape
    # under autocast (train.py's bfloat16 mode) the keys and values come in the autocast dtype
    amp = torch.is_autocast_enabled(device.type)
    cache_dtype = torch.get_autocast_dtype(device.type) if amp else model.dtype
    cache = KVCache(model.config, B, P + max_new_tokens, device=device, dtype=cache_dtype)
    h = model.hidden_states(prompt_ids, prompt_mask, cache)[:, -1:]  # (B, 1, D): the last position
    logits = model.lm_head(h)[:, 0].float()  # (B, V): each prompt's first next-token logits

    # 2) the G samples of a prompt share it: copy its KV cache and its logits to its G rows
    rows = torch.arange(B, device=device).repeat_interleave(G)  # (N,), N = B*G: each row's prompt
    cache, logits = cache.take_rows(rows), logits[rows]  # a cache of N rows; (N, V)

    # 3) one token per step for all N rows: draw it, record its log-prob and entropy, feed it back
    tokens, logps, ents = [], [], []  # one (N,) tensor per step
    done = torch.zeros(B * G, dtype=torch.bool, device=device)  # (N,): rows that emitted a stop
    for t in range(max_new_tokens):
        if t:  # one step over the cache: the last token's keys and values go in at position P+t-1
            logits = model(tokens[-1][:, None], cache=cache)[:, -1].float()  # (N, V)
        # Qwen pads its vocabulary past the tokenizer's: those ids are never drawn, but they stay
        # in the recorded softmax, the one training's forward recomputes
        token = draw_token(logits[:, :len(tokenizer)], temperature, top_p, top_k, generator)  # (N,)
        logp, ent = logprobs_and_entropy(logits, token, temperature)  # (N,) each
        token = token.masked_fill(done, pad_id)  # rows that already stopped only emit padding
        tokens.append(token)
        logps.append(logp.masked_fill(done, 0.0))
        ents.append(ent.masked_fill(done, 0.0))
        done = done | torch.isin(token, stop_ids)
        if done.all():
            break

    # 4) pack the record that training consumes
    return _pack(tokenizer, prompt_ids, prompt_mask, (tokens, logps, ents), stop_ids, G)


def draw_token(logits, temperature, top_p, top_k, generator):
    """(N, V) logits -> (N,) token ids. temperature 0: the most likely (greedy). Otherwise one
    uniform number u per row, and the first token whose running sum of probabilities reaches u:
    over the tokens in id order, or with top-p most likely first, every token past the set at 0.
    (fast.sampling.pick_next_token draws the same tokens for the same u, without sorting all V.)"""
    if temperature == 0:
        return logits.argmax(-1)
    if top_k > 0:  # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    z = logits.float() / temperature  # (N, V)
    if top_p < 1:  # most likely first; a token is out when the mass before it already exceeds top_p
        z_sorted, order = z.sort(dim=-1, descending=True)  # (N, V) each
        # the softmax as exp(z - logsumexp z): the fast path's way, to the last bit
        probs = (z_sorted - z.logsumexp(-1, keepdim=True)).exp()  # (N, V), most likely first
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    else:
        probs, order = z.softmax(-1), None  # (N, V), in token-id order
    N = z.shape[0]
    u = 1 - torch.rand(N, 1, generator=generator, dtype=torch.float64, device=z.device)  # (N, 1)
    cdf = probs.double().cumsum(-1)  # (N, V): in float64 the tail's tiny probabilities count
    index = torch.searchsorted(cdf, u * cdf[:, -1:])  # (N, 1): u * the total (1, up to rounding)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def _check_args(prompts, group_size, max_new_tokens, temperature, top_p, top_k):
    if not prompts:
        raise ValueError("prompts is empty: pass a list of at least one formatted prompt (see format_prompt)")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string: wrap it as [prompt]")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive number of tokens, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def _seeded_generator(seed, device):
    """The call's one source of random numbers: seeded, or (seed None) by the operating system."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _pad_and_stop_ids(tokenizer, ignore_eos, device):
    """The padding id (the tokenizer's, else its first end token) and the ids that end an answer,
    (S,) long on `device` (none with ignore_eos)."""
    end_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    return pad_id, torch.tensor([] if ignore_eos else end_ids, dtype=torch.long, device=device)


def _left_pad(tokenizer, prompts, pad_id, device):
    """Step 1: the prompts' token ids (B, P), left-padded so that every prompt ends in column P-1, and
    their mask (B, P), 1 = real token. P is the longest prompt's length."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt: every prompt needs at least one token")
    B, P = len(prompts), max(len(e) for e in encoded)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for i, e in enumerate(encoded):
        prompt_ids[i, P - len(e) :] = torch.tensor(e)
        prompt_mask[i, P - len(e) :] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


def _pack(tokenizer, prompt_ids, prompt_mask, steps, stop_ids, group_size) -> Rollout:
    """Step 4: the Rollout, from the prompts (B, P) and the decode loop's lists of (N,) tokens,
    log-probs and entropies, one entry per step. Trims the steps decoded after every row had stopped."""
    tokens, logps, ents = steps
    G = group_size
    response_ids = torch.stack(tokens, 1)  # (N, R)
    is_stop = torch.isin(response_ids, stop_ids)  # (N, R)
    # the mask is 1 up to and including the first stop token: count stops strictly before t
    response_mask = ((is_stop.long().cumsum(-1) - is_stop.long()) == 0).float()  # (N, R)
    R = int(response_mask.any(0).nonzero().max()) + 1  # steps decoded after every row had stopped hold only padding
    response_ids, response_mask, logps, ents = response_ids[:, :R], response_mask[:, :R], logps[:R], ents[:R]
    stopped = is_stop.any(-1)
    ids_cpu, mask_cpu = response_ids.cpu(), response_mask.bool().cpu()  # one copy, not one per row
    texts = tokenizer.batch_decode([ids[m].tolist() for ids, m in zip(ids_cpu, mask_cpu)], skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0),
        prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.stack(logps, 1) * response_mask,
        entropies=torch.stack(ents, 1) * response_mask,
        stopped=stopped,
        texts=texts,
        group_size=G,
    )

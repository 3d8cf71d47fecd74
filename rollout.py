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

    prompts = [format_prompt(tok, "What is 7 * 8?")]
    r = sample(model, tok, prompts, group_size=4, max_new_tokens=64)
    r.texts, r.entropies, r.response_mask
"""

import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from decode import EagerDecoder, decode_graph
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


def pick_next_token(logits, temperature, top_p, top_k, generator, window=None, spare_rows=0, stopped=None):
    """(N, V) logits -> (N,) sampled token ids, and (N,) bool or None: whether each row's top-p set
    fitted in `window` (see nucleus_draw; None: no window was used). temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1), None
    if top_k > 0:  # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        return nucleus_draw(logits, temperature, top_p, generator, window, spare_rows, stopped)
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    return inverse_cdf_draw(logits.softmax(-1), generator), None


# How many of the most likely tokens sample() lets nucleus_draw look at first, and, in rounds of
# several steps (a GPU's), how many rows it also sorts whole at every step (see nucleus_draw).
TOP_P_WINDOW, TOP_P_SPARE_ROWS = 64, 16


def nucleus_draw(logits, temperature, top_p, generator, window=None, spare_rows=0, stopped=None):
    """Top-p: draw from the smallest set of most likely tokens whose probability reaches top_p.
    Returns (N,) token ids and (N,) bool: did each row's set fit in the window (None without one).

    The tokens are put in order of probability, most likely first; those after the set (the mass
    before them already exceeds top_p) get probability 0; the draw runs over that order, and the
    token id is looked up at the end.
    Why a window: sorting the whole vocabulary is the slow part, as long as the forward on a CPU
    and longer on a GPU. But the set is small: a few tokens at temperature 0.6 (docs/speed.md,
    row 1c, counts the sets and times both ways). So we take the `window` most likely tokens (topk,
    cheap). A row whose set fits draws what the full sort would draw for the same random number
    (same probabilities, same order); one whose set spills draws from the window alone, which is
    wrong, and says so in `fits`: sample() then draws that step again with the full sort and the
    same random numbers (it looks at `fits` when it next asks the device anything).
    Why spare rows: on a GPU "again" means a whole round of steps for every row, and the more rows,
    the likelier one spills. So the `spare_rows` rows the window covers least, `stopped` rows last,
    are sorted whole too ((spare_rows, V): cheap): up to that many spilled rows a step draw right.
    """
    N, V = logits.shape
    z = logits.float() / temperature  # (N, V)
    lse = z.logsumexp(-1, keepdim=True)  # (N, 1): the full softmax's normaliser
    u = 1 - torch.rand(N, 1, generator=generator, dtype=torch.float64, device=z.device)  # (N, 1): each row's number
    if window is None or window >= V:
        top, order = z.sort(dim=-1, descending=True)  # (N, V)
        return _draw_in_order((top - lse).exp(), order, top_p, u), None
    top, order = z.topk(window, dim=-1)  # (N, W) each, most likely first
    probs = (top - lse).exp()  # (N, W): probabilities, most likely first
    token = _draw_in_order(probs, order, top_p, u)  # (N,)
    mass = probs.sum(-1)  # (N,): the probability inside the window
    fits = mass > top_p  # the set closes inside the window
    if spare_rows:
        need = mass if stopped is None else mass.masked_fill(stopped, 2.0)  # (N,): stopped rows last in line
        rows = need.topk(min(spare_rows, N), largest=False).indices  # (S,): the rows covered least
        top, order = z[rows].sort(dim=-1, descending=True)  # (S, V)
        token = token.index_copy(0, rows, _draw_in_order((top - lse[rows]).exp(), order, top_p, u[rows]))
        fits = fits.index_fill(0, rows, True)
    return token, fits


def _draw_in_order(probs, order, top_p, u):
    """(N,) tokens from each row's most likely tokens' probabilities `probs` (N, K), most likely first,
    with their token ids `order` (N, K): those after the top-p set get 0; row i draws with u[i]."""
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # mass before it already > top_p: out
    return order.gather(-1, inverse_cdf_draw(probs, u=u)[:, None]).squeeze(-1)  # (N,)


def inverse_cdf_draw(probs, generator=None, block=256, u=None):
    """(N, V) probabilities -> (N,) token ids: one uniform number u per row (drawn from `generator`
    unless given, (N, 1) float64 in (0, 1]), and the first token whose running sum of probabilities
    reaches u * (the row's total).

    Why not torch.multinomial: it draws a random number for every vocabulary entry, which on a CPU
    costs more than the rest of the sampling step together (12 ms a step for 16 x 49152).
    Why float64: the tail's tiny probabilities keep their digits, and logits that differ only in
    their last bits (the CUDA-graph path and the eager one) draw the same tokens. A float32 running
    sum rounds each of the V boundaries by up to 6e-8, and the two paths then parted in 1 of 216
    draws of tests/test_rollout.py's comparison (docs/speed.md, row 1).
    Why two stages: a float64 running sum over all V entries makes (N, V) tensors of 8-byte numbers,
    15 MB a step at 16 rows, and the allocator handed that memory back to the kernel and took it
    again every step (thousands of page faults a step on a CPU). So we first pick a block of `block`
    tokens by the running sum of the blocks' float64 masses, then the token inside that block by the
    running sum of its own probabilities: the same boundaries, in float64, for (N, V / block) + (N, block)
    numbers. It draws the token a full running sum would, except when u falls within float64
    rounding (1e-16) of a boundary.
    """
    N, V = probs.shape
    if V % block:  # pad with zero-probability entries, which are never drawn
        probs = torch.nn.functional.pad(probs, (0, block - V % block))
    blocks = probs.view(N, -1, block)  # (N, K, block), K = number of blocks
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # (N, K)
    if u is None:
        u = 1 - torch.rand(N, 1, generator=generator, dtype=torch.float64, device=probs.device)  # (N, 1) in (0, 1]
    target = u * block_cdf[:, -1:]  # (N, 1): u * total, since the sum is 1 only up to rounding
    b = torch.searchsorted(block_cdf, target).clamp(max=block_cdf.shape[1] - 1)  # (N, 1): first block reaching it
    # (block b has positive mass: the previous boundary lies strictly below target)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)  # (N, 1): mass of blocks 0..b-1
    inside = blocks.gather(1, b.unsqueeze(-1).expand(N, 1, block)).squeeze(1)  # (N, block)
    inner_cdf = inside.cumsum(-1, dtype=torch.float64)  # (N, block)
    # rest is in (0, block b's mass]; the min guards the last bit, where the two sums of block b may
    # round apart, and lands on the block's last token of positive probability
    rest = torch.minimum(target - before, inner_cdf[:, -1:])  # (N, 1)
    return (b * block + torch.searchsorted(inner_cdf, rest)).squeeze(-1)  # (N,)


# -----------------------------------------------------------------------------------------------
# The sampler


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


@torch.no_grad()
def sample(model, tokenizer, prompts, group_size=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, seed=None,
           ignore_eos=False, cuda_graph=None):
    """Sample `group_size` responses for each prompt (formatted strings). Returns a Rollout.

    ignore_eos=True never stops at an end token: every row gets exactly max_new_tokens tokens, all
    inside the response mask (bench.py uses it so that we and `generate` make the same number of tokens).
    cuda_graph: None (default) = on for a model on a CUDA device, off elsewhere; True decodes over a
    bucketed static cache and replays each step as a CUDA graph (see DecodeGraph); False decodes
    eagerly. On a CPU, True runs the same static-cache path without recording (there are no graphs
    there): the tests use it to check that path against the eager one.
    """
    _check_args(prompts, group_size, max_new_tokens, temperature, top_p, top_k)
    device = model.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    end_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    stop_ids = torch.tensor([] if ignore_eos else end_ids, dtype=torch.long, device=device)
    n_real_vocab = len(tokenizer)  # Qwen pads its embedding to a multiple of 128: those rows are never sampled

    # 1) tokenize and left-pad, so that every prompt ends in the same column
    prompt_ids, prompt_mask = _left_pad(tokenizer, prompts, pad_id, device)  # (B, P) each
    N = prompt_ids.shape[0] * group_size
    # 2) prefill each prompt once, and 3) give its KV cache to its G sample rows
    logits, step = _prefill(model, prompt_ids, prompt_mask, group_size, max_new_tokens, cuda_graph)  # (N, V)

    # 4) decode in rounds: the host queues a round's steps without waiting for the device, then asks
    #    once: have all rows stopped, did every row's top-p set fit the window (nucleus_draw)? If not,
    #    the round runs again from its start with the full sort and the same random numbers. (A
    #    CPU's rounds are one step: asking costs it nothing, and a step it did not need would.)
    record = ([], [], [])  # per step: tokens, log-probs, entropies, each (N,)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    spare = TOP_P_SPARE_ROWS if step.check_every > 1 else 0
    draw = lambda logits, window, done: pick_next_token(logits[:, :n_real_vocab], temperature, top_p, top_k, generator, window, spare, done)  # noqa: E731
    decode_round = functools.partial(_decode_round, step, record, draw, temperature, pad_id, stop_ids)
    window = TOP_P_WINDOW
    while True:
        k = min(step.check_every, max_new_tokens - len(record[0]))  # steps in this round
        start = (logits.clone() if k > 1 else logits, done, generator.get_state(), step.mark())  # (k > 1: steps overwrite logits)
        logits, done, fits = decode_round(logits, done, k, window)
        finished, spilled = torch.stack([done.all(), ~fits.all()]).tolist()  # the host waits here, once a round
        if spilled:
            logits, done, rng, mark = start
            generator.set_state(rng)
            step.rewind(mark)
            for column in record:
                del column[-k:]
            logits, done, _ = decode_round(logits, done, k, None)  # no window: the full sort
            finished = bool(done.all())
            window = window if k == 1 else None  # sets this wide (random weights?) spill again: sort from now on
        if finished or len(record[0]) == max_new_tokens:
            break
        logits = step(record[0][-1], done)  # (N, V): the next round's first logits

    # 5) pack the record that training consumes
    return _pack(tokenizer, prompt_ids, prompt_mask, record, stop_ids, group_size)


def _decode_round(step, record, draw, temperature, pad_id, stop_ids, logits, done, k, window):
    """k decode steps from `logits` (N, V), appended to `record`; the host never waits on the device.
    Returns the last step's logits, `done` (N,) and `fits` (N,): every row's top-p set fitted the window."""
    fits = torch.ones_like(done)
    for j in range(k):
        if j:
            logits = step(record[0][-1], done)  # (N, V)
        token, fit = draw(logits, window, done)  # (N,)
        # The record is of the full softmax, the same one training's forward recomputes; only the
        # choice leaves out the padded vocabulary rows, by looking at a view without them.
        logp, ent = logprobs_and_entropy(logits, token, temperature)  # (N,), (N,)
        if fit is not None:
            fits = fits & (fit | done)  # a row that stopped earlier emits padding whatever it drew
        token = token.masked_fill(done, pad_id)  # rows that already stopped only emit padding
        for column, x in zip(record, (token, logp.masked_fill(done, 0.0), ent.masked_fill(done, 0.0))):
            column.append(x)
        done = done | torch.isin(token, stop_ids)
    return logits, done, fits


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


def _prefill(model, prompt_ids, prompt_mask, group_size, max_new_tokens, cuda_graph):
    """Steps 2 and 3: run each prompt through the model once, then copy its KV cache to its G sample
    rows. Returns the first decode step's logits (N, V) and `step`, which decodes one token for every
    row: (N,) tokens, (N,) done -> (N, V) logits."""
    (B, P), G, device = prompt_ids.shape, group_size, model.device
    N = B * G
    # under autocast (train.py's bfloat16 mode) the keys and values come out in the autocast dtype
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
    cache = KVCache(model.config, B, P if cuda_graph else P + max_new_tokens, device=device, dtype=cache_dtype)
    h = model.hidden_states(prompt_ids, prompt_mask, cache)[:, -1:]  # (B, 1, D): only the last position is needed
    logits = model.lm_head(h)[:, 0].float().repeat_interleave(G, dim=0)  # (N, V): each prompt's logits to its G rows
    if cuda_graph:  # into a graph's static cache (DecodeGraph.load copies each prompt to its G rows)
        graph = decode_graph(model, N, P + max_new_tokens, cache_dtype)
        graph.load(cache, G)
        return logits, graph
    rows = torch.arange(B, device=device).repeat_interleave(G)  # (N,): the prompt of each sample row
    return logits, EagerDecoder(model, cache.take_rows(rows), logits)  # a G-fold copy, then eager steps over it


def _pack(tokenizer, prompt_ids, prompt_mask, steps, stop_ids, group_size) -> Rollout:
    """Step 5: the Rollout, from the prompts (B, P) and the decode loop's lists of (N,) tokens,
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

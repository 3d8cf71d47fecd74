"""
fast/sampling.py -- rollout.sample's fast path: for the same seed, the reference loop's tokens,
log-probabilities and entropies (rollout.py), sooner.

rollout.sample(fast=True), the default, checks its arguments and hands the call to `sample` here.
What it does that the reference loop does not, none of which changes a number:
  * the decode step runs on one of fast/decode.py's engines: EagerDecoder, which drops the rows that
    have stopped (a CPU's step costs in proportion to its rows), or DecodeGraph, which replays the
    step as a CUDA graph (a GPU's step is otherwise mostly Python launching kernels);
  * top-p looks at a window of the most likely tokens instead of sorting the whole vocabulary, and
    sorts whole only the rows whose top-p set spills out of it (nucleus_draw);
  * the inverse-CDF draw sums the probabilities in two stages, in float64 (inverse_cdf_draw);
  * on a GPU the host queues a round of 8 steps before it asks the device anything, and decodes a
    round again when a row's set spilled (sample's rounds, with the engines' mark() and rewind()).
Why the numbers agree: every sampled step draws one uniform number u per row, (N, 1) float64, from
the call's one generator, and takes the first token whose running sum of probabilities reaches
u * (the total), in the same order as the reference (token ids, or most likely first under top-p);
a round decoded again first puts the generator back, so it draws the same numbers again.
tests/test_rollout.py compares the two paths.
"""

import functools

import torch

from fast.decode import EagerDecoder, decode_graph
from model import KVCache
from rollout import _left_pad, _pack, _pad_and_stop_ids, _seeded_generator, logprobs_and_entropy


# -----------------------------------------------------------------------------------------------
# The draw: one token per row from (N, V) logits


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
# The sampler: rollout.sample's call, in rounds of decode steps


@torch.no_grad()
def sample(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos,
           cuda_graph=None):
    """rollout.sample's call, decoded fast (rollout.sample checks the arguments, then calls this).

    cuda_graph: None = on for a model on a CUDA device, off elsewhere; True decodes over a bucketed
    static cache and replays each step as a CUDA graph (see DecodeGraph); False decodes eagerly,
    dropping the rows that have stopped (EagerDecoder). On a CPU, True runs the same static-cache
    path without recording (there are no graphs there): the tests use it to check that path.
    """
    device = model.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    generator = _seeded_generator(seed, device)
    pad_id, stop_ids = _pad_and_stop_ids(tokenizer, ignore_eos, device)
    n_real_vocab = len(tokenizer)  # Qwen pads its embedding to a multiple of 128: those rows are never sampled

    # 1) left-pad and prefill the prompts once, 2) give each prompt's KV cache to its G sample rows
    prompt_ids, prompt_mask = _left_pad(tokenizer, prompts, pad_id, device)  # (B, P) each
    N = prompt_ids.shape[0] * group_size
    logits, step = _prefill(model, prompt_ids, prompt_mask, group_size, max_new_tokens, cuda_graph)  # (N, V)

    # 3) decode in rounds: the host queues a round's steps without waiting for the device, then asks
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

    # 4) pack the record that training consumes
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


def _prefill(model, prompt_ids, prompt_mask, group_size, max_new_tokens, cuda_graph):
    """Steps 1 and 2: run each prompt through the model once, then copy its KV cache to its G sample
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



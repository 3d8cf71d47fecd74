"""rollout.py: the sampler against transformers' generate, a full forward, and its own invariants."""

import pytest
import torch
from conftest import tiny_hf_model

from fast import decode, sampling
from fast.sampling import inverse_cdf_draw, pick_next_token
from plumbing.load import model_from_hf
from model import KVCache
from rollout import draw_token, format_prompt, logprobs_and_entropy, sample, score_responses, stop_token_ids

QUESTIONS = ["What is 7 * 8?", "A farmer has 12 cows and buys 35 more, then sells 4. How many cows are left?", "2+2?"]


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tok = smollm2
    return [format_prompt(tok, q) for q in QUESTIONS]


def test_format_prompt_uses_chat_template_or_plain_text(smollm2):
    _, tok = smollm2
    p = format_prompt(tok, "What is 1+1?")
    assert "<|im_start|>user\nWhat is 1+1?<|im_end|>" in p and p.endswith("<|im_start|>assistant\n")
    assert "\\boxed{}" in p

    class Plain:
        chat_template = None

    assert format_prompt(Plain(), "What is 1+1?", system_prompt="Be brief.") == "Be brief.\n\nQuestion: What is 1+1?\nAnswer:"


def test_greedy_equals_transformers_generate(smollm2_hf, smollm2, prompts):
    hf_model, tok = smollm2_hf
    model, _ = smollm2
    ours = sample(model, tok, prompts[:1], max_new_tokens=24, temperature=0)
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = hf_model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]
    n = int(ours.response_mask[0].sum())
    assert ours.response_ids[0, :n].tolist() == ref[:n].tolist()


def test_left_padded_batch_equals_each_prompt_alone(smollm2, prompts):
    model, tok = smollm2
    batch = sample(model, tok, prompts, max_new_tokens=20, temperature=0)
    assert len(set(map(len, [tok.encode(p) for p in prompts]))) == 3  # three different lengths
    for i, p in enumerate(prompts):
        alone = sample(model, tok, [p], max_new_tokens=20, temperature=0)
        n = int(alone.response_mask[0].sum())
        assert batch.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert batch.texts[i] == alone.texts[0]


def test_recorded_logprobs_and_entropies_match_a_full_forward(smollm2, prompts):
    model, tok = smollm2
    T = 0.7
    r = sample(model, tok, prompts[:2], group_size=3, max_new_tokens=16, temperature=T, top_p=0.9, seed=1)
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)  # (N, P + R)
    mask = torch.cat([r.prompt_mask, r.response_mask.long()], 1)
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)[:, P - 1 : -1]  # (N, R, V): position t predicts token t+1
    logp, ent = logprobs_and_entropy(logits, r.response_ids, T)
    m = r.response_mask
    assert (logp * m - r.logprobs).abs().max().item() <= 1e-4
    assert (ent * m - r.entropies).abs().max().item() <= 1e-4
    assert (r.entropies[m.bool()] > 0).all()
    # the training forward (response positions only, chunked, with gradients) agrees too
    lp2, ent2 = score_responses(model, r, T, chunk_rows=4)
    assert (lp2 - r.logprobs).abs().max().item() <= 1e-4 and (ent2 - r.entropies).abs().max().item() <= 1e-4
    lp2.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_entropy_is_minus_sum_p_log_p():
    logits = torch.randn(5, 7, 11)
    tokens = torch.randint(0, 11, (5, 7))
    for T in (1.0, 0.6, 1.7):
        logp, ent = logprobs_and_entropy(logits, tokens, T)
        p = torch.softmax(logits / T, -1)
        assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)
        assert torch.allclose(logp, p.gather(-1, tokens[..., None]).squeeze(-1).log(), atol=1e-5)


def test_top_k_1_equals_greedy(smollm2, prompts):
    model, tok = smollm2
    greedy = sample(model, tok, prompts[:2], max_new_tokens=12, temperature=0)
    topk1 = sample(model, tok, prompts[:2], max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(greedy.response_ids, topk1.response_ids)


@pytest.mark.parametrize("V", [49152, 1000, 257, 256, 7])
def test_two_stage_draw_equals_one_full_running_sum(V):
    """inverse_cdf_draw (a block by its mass, then a token inside it) picks the token a single float64
    running sum over the whole vocabulary picks for the same uniform numbers, never one of
    probability 0, whatever V is modulo the block size."""
    torch.manual_seed(V)
    logits = torch.randn(3000, V) * 4
    logits[:, ::3] = float("-inf")  # zero-probability entries, as top-p and top-k leave them
    probs = logits.softmax(-1)  # (N, V)
    drawn = inverse_cdf_draw(probs, torch.Generator().manual_seed(1))
    cdf = probs.double().cumsum(-1)  # (N, V): the reference, one running sum
    u = 1 - torch.rand(3000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # the same numbers
    assert torch.equal(drawn, torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1))
    assert (probs.gather(1, drawn[:, None]) > 0).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(pick_next_token(logits, 1.0, 0.75, 0, g)[0].tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(pick_next_token(logits, 1.0, 0.4, 0, g)[0].tolist()) == {0}
    assert set(pick_next_token(logits, 1.0, 1.0, 0, g)[0].tolist()) == {0, 1, 2, 3}
    assert set(pick_next_token(logits, 1.0, 1.0, 2, g)[0].tolist()) == {0, 1}  # top-k 2


def _reference_nucleus(logits, temperature, top_p):
    """(N, V) -> (N, V) bool: the top-p set by brute force, one row at a time in plain Python."""
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    for i, row in enumerate((logits.double() / temperature).softmax(-1)):
        mass = 0.0
        for v in row.argsort(descending=True).tolist():
            keep[i, v] = True
            mass += row[v].item()
            if mass > top_p:
                break
    return keep


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: the set fits the window; flat: it does not
def test_nucleus_window_draws_what_the_full_sort_draws(scale):
    """With a window of the 64 most likely tokens (sampling.TOP_P_WINDOW), nucleus_draw must draw
    exactly the tokens the full sort draws for the same random numbers where a row's top-p set fits
    in it, say which rows' sets do not, and the full sort must draw only from the top-p set, with
    the set's renormalised probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5000) * scale  # (N, V)
    ref = _reference_nucleus(logits, 0.7, 0.9)
    assert (ref.sum(-1) <= 64).all() if scale > 1 else (ref.sum(-1) > 64).all()
    rows = logits.repeat(1000, 1)  # (4000, V): each of the 4 rows 1000 times
    windowed, fits = sampling.nucleus_draw(rows, 0.7, 0.9, torch.Generator().manual_seed(3), window=64)
    sorted_all, no_window = sampling.nucleus_draw(rows, 0.7, 0.9, torch.Generator().manual_seed(3))
    assert no_window is None and torch.equal(fits, (ref.sum(-1) <= 64).repeat(1000))
    if scale > 1:
        assert torch.equal(windowed, sorted_all)
    drawn = sorted_all.view(1000, 4)  # (draws, rows)
    for i in range(4):
        assert ref[i, drawn[:, i]].all()  # never a token outside the set
        if scale > 1:  # a few tokens each: their frequencies against the renormalised probabilities
            p = (logits[i].double() / 0.7).softmax(-1) * ref[i]
            p = p / p.sum()
            freq = torch.bincount(drawn[:, i], minlength=5000).double() / 1000
            assert (freq - p).abs().max().item() < 0.05  # 1000 draws: 4.5 standard errors at p = 0.5


def test_spare_rows_draw_right_where_sets_spill():
    """nucleus_draw's spare rows: the rows the window covers least are sorted whole, so that up to
    that many rows whose top-p sets spill out of the window still draw what the full sort draws."""
    torch.manual_seed(1)
    logits = torch.randn(6, 3000) * 8  # peaked: sets of a few tokens
    logits[[1, 4]] = torch.randn(2, 3000) * 0.05  # flat: sets of ~2,700 tokens, far past a window of 64
    draw = lambda **kw: sampling.nucleus_draw(logits, 0.7, 0.9, torch.Generator().manual_seed(3), **kw)  # noqa: E731
    full, _ = draw()
    token, fits = draw(window=64)
    assert fits.tolist() == [True, False, True, True, False, True] and torch.equal(token[fits], full[fits])
    token, fits = draw(window=64, spare_rows=2)
    assert fits.all() and torch.equal(token, full)
    token, fits = draw(window=64, spare_rows=1)  # one spare row: one of the two flat rows is still wrong
    assert (~fits).sum() == 1 and (~fits[[1, 4]]).sum() == 1 and torch.equal(token[fits], full[fits])
    assert fits[4]  # (row 4 is the flatter: the spare row went to it)
    # a row that stopped (its draw is thrown away) gets no spare row, however flat: now row 1 takes it
    token, fits = draw(window=64, spare_rows=1, stopped=torch.tensor([False, False, False, False, True, False]))
    assert fits.tolist() == [True, True, True, True, False, True] and torch.equal(token[[0, 1, 2, 3, 5]], full[[0, 1, 2, 3, 5]])


@pytest.mark.parametrize("window, spare_rows, redone", [(64, 16, 0), (2, 16, 0), (2, 0, 1)])
def test_rounds_redone_where_a_set_spilled_give_the_one_step_answers(smollm2, prompts, monkeypatch, window, spare_rows, redone):
    """A GPU decodes in rounds of 8 steps and learns only at a round's end that more rows' top-p sets
    spilled out of the window than its spare rows could take; it then decodes the round again with
    the full sort, and sorts for the rest of the call (fast.sampling.sample). Forced on a CPU's static
    path (6 rows: 16 spare rows take them all; 0 take none), that must give exactly what one-step
    rounds give (a CPU's way, checking at once) and what the full sort alone gives: the same
    tokens, log-probs and entropies."""
    model, tok = smollm2
    kw = dict(group_size=3, max_new_tokens=20, temperature=0.7, top_p=0.95, seed=5)
    monkeypatch.setattr(sampling, "TOP_P_WINDOW", window)
    monkeypatch.setattr(sampling, "TOP_P_SPARE_ROWS", spare_rows)
    at_once = sample(model, tok, prompts[:2], cuda_graph=True, **kw)
    monkeypatch.setattr(decode, "CHECK_STOP_EVERY", {"cpu": 8})
    rewinds, rewind = [], decode.DecodeGraph.rewind

    def counted_rewind(graph, mark):
        rewinds.append(mark)
        rewind(graph, mark)

    monkeypatch.setattr(decode.DecodeGraph, "rewind", counted_rewind)
    rounds = sample(model, tok, prompts[:2], cuda_graph=True, **kw)
    assert len(rewinds) == redone  # (window 2, no spare rows: the first round, then the full sort)
    monkeypatch.setattr(sampling, "TOP_P_WINDOW", None)
    full_sort = sample(model, tok, prompts[:2], cuda_graph=True, **kw)
    for r in (rounds, full_sort):
        assert torch.equal(r.response_ids, at_once.response_ids) and r.texts == at_once.texts
        assert torch.equal(r.logprobs, at_once.logprobs) and torch.equal(r.entropies, at_once.entropies)


def test_seed_repeats_exactly_and_groups_share_their_prompt(smollm2, prompts):
    model, tok = smollm2
    a = sample(model, tok, prompts[:2], group_size=4, max_new_tokens=10, seed=7)
    b = sample(model, tok, prompts[:2], group_size=4, max_new_tokens=10, seed=7)
    c = sample(model, tok, prompts[:2], group_size=4, max_new_tokens=10, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    # rows i*G .. i*G+G-1 belong to prompt i; shared prefill = the same rows sampled from G copies
    assert torch.equal(a.prompt_ids[:4], a.prompt_ids[:1].expand(4, -1))
    copies = sample(model, tok, [prompts[0]] * 4 + [prompts[1]] * 4, group_size=1, max_new_tokens=10, seed=7)
    assert torch.equal(a.response_ids, copies.response_ids)


def test_stop_tokens_and_length_limit(smollm2, prompts):
    model, tok = smollm2
    stops = set(stop_token_ids(tok))
    r = sample(model, tok, prompts, group_size=2, max_new_tokens=48, temperature=0.7, seed=0)
    for i in range(len(r.texts)):
        n = int(r.response_mask[i].sum())
        if r.stopped[i]:
            assert r.response_ids[i, n - 1].item() in stops  # the stop token is inside the mask
            assert not set(r.response_ids[i, : n - 1].tolist()) & stops
            assert (r.logprobs[i, n:] == 0).all() and (r.entropies[i, n:] == 0).all()
        else:
            assert n == 48
    short = sample(model, tok, prompts[:1], max_new_tokens=3, temperature=0)
    assert not short.stopped[0] and short.response_mask.sum().item() == 3


def test_stopped_rows_leave_the_batch_without_changing_the_sample(smollm2, prompts, monkeypatch):
    """EagerDecoder drops rows that have stopped; the rest must decode exactly as in the full batch."""
    model, tok = smollm2
    kw = dict(group_size=4, max_new_tokens=48, temperature=0.7, seed=0, cuda_graph=False)
    calls = []
    take_rows = KVCache.take_rows
    monkeypatch.setattr(KVCache, "take_rows", lambda self, rows: calls.append(len(rows)) or take_rows(self, rows))
    dropping = sample(model, tok, prompts, **kw)
    assert len(calls) >= 2 and calls[-1] < calls[0]  # the G-fold copy, then at least one smaller batch
    monkeypatch.setattr(decode, "COMPACT_WHEN", 0.0)  # never drop a row
    full = sample(model, tok, prompts, **kw)
    assert torch.equal(dropping.response_ids, full.response_ids) and dropping.texts == full.texts
    assert torch.allclose(dropping.logprobs, full.logprobs, atol=1e-5)
    assert torch.allclose(dropping.entropies, full.entropies, atol=1e-5)


def test_padded_vocab_rows_are_never_sampled(smollm2):
    """Qwen pads its embedding matrix past the tokenizer's vocabulary: those ids must never appear."""
    _, tok = smollm2
    V = len(tok) + 64
    model = model_from_hf(tiny_hf_model("llama", vocab_size=V, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight[len(tok) :] = 0
        model.lm_head.weight[len(tok) :, 0] = 1e3  # make the padded rows overwhelmingly likely
    r = sample(model, tok, ["hello"], group_size=4, max_new_tokens=8, seed=0)
    assert r.response_ids.max().item() < len(tok)
    # the recorded entropies stay finite and equal the training forward's (full softmax) values
    assert torch.isfinite(r.entropies).all() and torch.isfinite(r.logprobs).all()
    with torch.no_grad():
        logp, ent = score_responses(model, r, 1.0)
    # (log-probs here are near -1000, next to the huge padded logits: compare them relatively)
    assert torch.allclose(logp, r.logprobs, rtol=1e-5, atol=1e-4) and torch.allclose(ent, r.entropies, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(fast=False, cuda_graph=True), "cuda_graph=True is the fast sampler's"),
    ],
)
def test_bad_sampling_arguments(smollm2, kwargs, message):
    model, tok = smollm2
    args = dict(prompts=["hi"], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample(model, tok, **args)


# --- the fast sampler (fast/sampling.py, the default) against the reference loop (fast=False) ---


@pytest.mark.parametrize("temperature, top_p, top_k",
                         [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 0), (0.8, 1.0, 20), (0.6, 0.95, 5)])
@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: top-p sets fit the window; flat: they spill
def test_the_fast_draw_is_the_reference_draw(temperature, top_p, top_k, scale):
    """For the same generator, pick_next_token draws draw_token's tokens: without a window, and with
    one (64 tokens, 16 spare rows) in every row it says fitted, whose sets the spare rows or the
    window hold; the rows it says spilled are drawn again with the full sort by fast.sampling.sample."""
    torch.manual_seed(int(scale))
    logits = torch.randn(400, 3000) * scale  # (N, V)
    ref = draw_token(logits, temperature, top_p, top_k, torch.Generator().manual_seed(9))
    full, _ = pick_next_token(logits, temperature, top_p, top_k, torch.Generator().manual_seed(9))
    window, fits = pick_next_token(logits, temperature, top_p, top_k, torch.Generator().manual_seed(9), 64, 16)
    assert torch.equal(full, ref)
    if fits is None:  # no top-p set to fit: no window either
        assert torch.equal(window, ref) and (top_p == 1 or temperature == 0)
    else:
        assert torch.equal(window[fits], ref[fits])
        assert fits.sum() == (16 if scale < 1 and not top_k else 400)  # flat sets: the spare rows fit


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.95, 0), (0.8, 1.0, 20)])
def test_the_fast_sampler_gives_the_reference_loops_numbers(smollm2, prompts, monkeypatch, temperature, top_p, top_k):
    """sample() as train.py and evaluate.py call it on a CPU (fast=True, the default: rows that stop
    leave the batch, top-p through the window) against the plain loop (fast=False) on SmolLM2: the
    same tokens and texts for the same seed, log-probs and entropies to rounding (3 prompts x 4
    answers over 48 tokens, some stop; the static cache's path is compared in float32 below)."""
    model, tok = smollm2
    kw = dict(group_size=4, max_new_tokens=48, temperature=temperature, top_p=top_p, top_k=top_k, seed=2)
    ref = sample(model, tok, prompts, fast=False, **kw)
    calls, take_rows = [], KVCache.take_rows
    monkeypatch.setattr(KVCache, "take_rows", lambda self, rows: calls.append(len(rows)) or take_rows(self, rows))
    fast = sample(model, tok, prompts, **kw)
    assert torch.equal(fast.response_ids, ref.response_ids) and fast.texts == ref.texts
    assert torch.equal(fast.response_mask, ref.response_mask) and torch.equal(fast.stopped, ref.stopped)
    # the same tokens; their log-probs and entropies to rounding: the fast path drops stopped rows,
    # and with several threads a matmul over fewer rows may sum in another order (last bits)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast.entropies, ref.entropies, rtol=0, atol=1e-4)
    assert ref.stopped.sum() < 3 or calls[-1] < 12  # 3 of 12 rows stopped: the fast path dropped rows


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_the_fast_samplers_redone_steps_give_the_reference_loops_numbers(monkeypatch, amp):
    """Random weights: flat distributions whose top-p sets spill far out of the window. With a
    2-token window the fast sampler redraws each spilled step at once with the full sort (eagerly,
    a CPU's way); in a GPU's rounds of 8 steps over the static cache, with no spare rows, it decodes
    its first round again (one rewind) and sorts from then on. Both must give the reference loop's
    tokens, log-probs and entropies: in float32, and eagerly under bfloat16 autocast (train.py's
    way). (Under bfloat16 the static cache's longer, bucketed rows round the attention's sums
    otherwise, so its logits are not the reference's to the bit: the rounds are checked in float32.)"""
    model, tok = model_from_hf(tiny_hf_model("qwen2", vocab_size=len(_char_tok()))).eval(), _char_tok()
    kw = dict(group_size=4, max_new_tokens=30, temperature=0.7, top_p=0.9, seed=4)
    qs = ["7*8=?", "1+1", "12*12=?"]
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        ref = sample(model, tok, qs, fast=False, **kw)
        monkeypatch.setattr(sampling, "TOP_P_WINDOW", 2)
        paths = [sample(model, tok, qs, cuda_graph=False, **kw)]
        monkeypatch.setattr(sampling, "TOP_P_SPARE_ROWS", 0)
        monkeypatch.setitem(decode.CHECK_STOP_EVERY, "cpu", 8)
        rewinds, rewind = [], decode.DecodeGraph.rewind
        counted = lambda graph, mark: rewinds.append(mark) or rewind(graph, mark)  # noqa: E731
        monkeypatch.setattr(decode.DecodeGraph, "rewind", counted)
        if amp is None:
            paths.append(sample(model, tok, qs, cuda_graph=True, **kw))
            assert len(rewinds) == 1
    for fast in paths:
        assert torch.equal(fast.response_ids, ref.response_ids) and fast.texts == ref.texts
        assert torch.allclose(fast.logprobs, ref.logprobs, atol=1e-5)
        assert torch.allclose(fast.entropies, ref.entropies, atol=1e-5)


# --- the graph path's static, bucketed cache (on a CPU it runs without recording a graph) ------


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_static_bucketed_cache_equals_eager_decoding(smollm2, prompts, temperature, top_p):
    """cuda_graph=True decodes 3 x 3 = 9 rows in a 16-row bucket over a cache rounded up to 256
    slots; tokens must be identical and log-probs and entropies equal to float32 rounding."""
    model, tok = smollm2
    kw = dict(group_size=3, max_new_tokens=24, temperature=temperature, top_p=top_p, seed=11)
    eager = sample(model, tok, prompts[:3], cuda_graph=False, **kw)
    static = sample(model, tok, prompts[:3], cuda_graph=True, **kw)
    assert torch.equal(eager.response_ids, static.response_ids) and eager.texts == static.texts
    assert torch.equal(eager.response_mask, static.response_mask)
    assert torch.allclose(eager.logprobs, static.logprobs, atol=1e-5)
    assert torch.allclose(eager.entropies, static.entropies, atol=1e-5)


def test_one_graph_per_bucket_is_reused_across_calls(prompts):
    """Calls whose rows and lengths fall in the same bucket share one static cache (on CUDA, one
    recorded graph); a stale cache from a longer earlier call must not leak into a later one."""
    model = model_from_hf(tiny_hf_model("llama", vocab_size=len(_char_tok()))).eval()
    tok = _char_tok()
    long_first = sample(model, tok, ["7*8=?" * 9, "1+1"], group_size=4, max_new_tokens=30, seed=0, cuda_graph=True)
    assert len(decode._GRAPHS[model]) == 1
    for rows, new in [(6, 20), (7, 5), (8, 30)]:  # all in the (8 rows, 256 slots) bucket
        qs = ["2+2", "3*3=?"][: 1 + (rows > 4)]
        g = rows // len(qs)
        a = sample(model, tok, qs, group_size=g, max_new_tokens=new, seed=rows, cuda_graph=True)
        b = sample(model, tok, qs, group_size=g, max_new_tokens=new, seed=rows, cuda_graph=False)
        assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len(decode._GRAPHS[model]) == 1 and long_first.response_ids.shape[0] == 8
    sample(model, tok, ["2+2"], group_size=9, max_new_tokens=4, seed=0, cuda_graph=True)  # 9 rows: a 16-row bucket
    assert sorted(k[:2] for k in decode._GRAPHS[model]) == [(8, 256), (16, 256)]
    assert decode.graph_stats(model)["cuda_graphs"] == 2


def test_static_path_under_autocast_casts_the_weights_once_per_call(prompts):
    """Under autocast the static path multiplies with bfloat16 copies of the projections, cast once
    per sample call (decode.cast_weights), not at every step: the same tokens as eager decoding
    under autocast, and after an in-place change of the weights (an optimiser step) the next call
    decodes with the new ones (copies cast once and never refreshed would not)."""
    model = model_from_hf(tiny_hf_model("llama", vocab_size=len(_char_tok()))).eval()
    tok = _char_tok()
    kw = dict(group_size=4, max_new_tokens=12, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = sample(model, tok, ["7*8=?", "1+1"], cuda_graph=True, **kw)
    copies = decode._WEIGHT_COPIES[model][torch.bfloat16]
    assert copies["lm_head.weight"].dtype == torch.bfloat16 and len(copies) == 1 + 7 * model.config.n_layers
    with torch.no_grad():
        for layer in model.model.layers:  # in place, as an optimiser step does (and visibly)
            layer.mlp.down_proj.weight.mul_(8.0)
    # a new autocast block, as train.py opens for each rollout: autocast's own cache of casts
    # (which eager decoding and every prefill use) lives as long as its block
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static = sample(model, tok, ["7*8=?", "1+1"], cuda_graph=True, **kw)
        eager = sample(model, tok, ["7*8=?", "1+1"], cuda_graph=False, **kw)
    assert torch.equal(static.response_ids, eager.response_ids)
    # bfloat16 sums over another cache length: apart by a few units of the last place; the change
    # of weights moved the log-probs by whole tenths (stale copies would keep them where they were)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-2)
    assert (static.logprobs - before.logprobs).abs().max() > 0.1


def test_a_graph_recorded_under_autocast_is_not_reused_without_it(prompts):
    """A bfloat16 model's cache is bfloat16 with or without autocast, but a graph recorded under
    autocast reads cast copies that only a call under autocast refreshes: a call without autocast
    gets a graph of its own (decode_graph's key) and decodes with the weights as they are now."""
    model = model_from_hf(tiny_hf_model("llama", vocab_size=len(_char_tok()))).to(torch.bfloat16).eval()
    tok = _char_tok()
    kw = dict(group_size=4, max_new_tokens=12, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(model, tok, ["7*8=?", "1+1"], cuda_graph=True, **kw)
    with torch.no_grad():
        for layer in model.model.layers:  # in place, as an optimiser step does
            layer.mlp.down_proj.weight.mul_(8.0)
    static = sample(model, tok, ["7*8=?", "1+1"], cuda_graph=True, **kw)
    eager = sample(model, tok, ["7*8=?", "1+1"], cuda_graph=False, **kw)
    assert torch.equal(static.response_ids, eager.response_ids)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-2)  # (stale copies: off by tenths)
    assert len(decode._GRAPHS[model]) == 2


@pytest.mark.parametrize("kind, amp", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16), ("llama", torch.float16)])
def test_cuda_graph_path_under_autocast_scores_like_a_full_forward(kind, amp, monkeypatch):
    """train.py's way of sampling on a GPU (here too on a CPU, in its rounds of 8 steps): float32
    weights under autocast (bfloat16; float16 on cards before compute capability 8.0), each step
    reading projections cast once per call (Qwen's q/k/v biases too), top-p through the window. The
    log-probs and entropies it records must be what a full forward under the same autocast gives
    for the same tokens, rounding apart (measured on a CPU: 0.05 at most; copies left stale by the
    weights' change between the calls: 2.6 and more), and no round spills (the final norm x 8 makes
    the top-p sets small: the window's way, not the full sort's)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setitem(decode.CHECK_STOP_EVERY, device, 8)
    rewinds, rewind = [], decode.DecodeGraph.rewind
    monkeypatch.setattr(decode.DecodeGraph, "rewind", lambda graph, mark: rewinds.append(mark) or rewind(graph, mark))
    model, tok = model_from_hf(tiny_hf_model(kind, vocab_size=len(_char_tok()))).to(device).eval(), _char_tok()
    kw = dict(group_size=8, max_new_tokens=40, temperature=0.6, top_p=0.95, seed=3, cuda_graph=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    for call in range(2):
        if call:  # between the calls, as an optimiser step would (but larger): the graph must see it
            g = torch.Generator(device).manual_seed(1)
            with torch.no_grad():
                for layer in model.model.layers:
                    for w in (layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight):
                        w.add_(torch.randn(w.shape, generator=g, device=device) * 2 * w.std())
        with torch.autocast(device, dtype=amp), torch.no_grad():
            r = sample(model, tok, ["7*8=?", "1+1", "12*12=?"], **kw)
            logp, ent = score_responses(model, r, 0.6)
        real = r.response_mask.bool()
        assert (r.logprobs[real] - logp[real]).abs().max() < 0.25 and (r.entropies[real] - ent[real]).abs().max() < 0.25
    assert rewinds == [] and len(decode._GRAPHS[model]) == 1


def test_a_decode_step_under_autocast_casts_no_weights():
    """What a CUDA graph records under autocast (autocast's cache off): every op of one decode step,
    counted on a CPU. The weights come cast already (cast_weights) and each norm hands its
    projections one bfloat16 copy, so the casts left per layer are the two norms' and the rotated
    q and k: 4, where casting each weight and each projection's input made it 14 (17 with biases)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.casts += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    model = model_from_hf(tiny_hf_model("qwen2", vocab_size=len(_char_tok()))).eval()  # with q, k, v biases
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        prompt = KVCache(model.config, 2, 5, dtype=torch.bfloat16)
        model(torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long), cache=prompt)
        graph = decode.DecodeGraph(model, 2, 256, torch.bfloat16, record=False)
        graph.load(prompt, 1)
        with CountCasts() as counter:
            graph(torch.zeros(2, dtype=torch.long))
    assert counter.casts == 4 * model.config.n_layers + 3, counter.casts  # + positions, final norm, logits


def _char_tok():
    from conftest import char_tokenizer

    return char_tokenizer()


# --- on a GPU: the recorded graphs (skipped without CUDA; bench.py --device cuda times them) -----
# Random weights of the SmolLM2 shape and a byte tokenizer: nothing to download or install there.

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random_smollm2_on_cuda():
    import bench

    hf, model = bench.random_model(bench.smollm2_config(), "cuda", torch.float32)
    del hf
    return model, bench.byte_tokenizer()


@CUDA
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.95)])
def test_cuda_graph_replay_equals_eager_decoding_on_cuda(temperature, top_p, monkeypatch):
    """In float32, the replayed graph gives the eager path's tokens exactly and its log-probs to 1e-5
    (greedy and seeded; 4 prompts x 3 = 12 rows in a 16-row bucket, 64 tokens). At top-p 0.95 the
    random weights' top-p sets are far larger than the 64-token window: with 4 spare rows for 12
    rows, the graph path's first round of 8 steps is decoded again with the full sort and the rest
    sorts (fast.sampling.sample), while eager decoding redoes each step at once."""
    monkeypatch.setattr(sampling, "TOP_P_SPARE_ROWS", 4)
    model, tok = _random_smollm2_on_cuda()
    qs = [format_prompt(tok, q) for q in QUESTIONS + ["What is 12 * 12?"]]
    kw = dict(group_size=3, max_new_tokens=64, temperature=temperature, top_p=top_p, seed=5)
    eager = sample(model, tok, qs, cuda_graph=False, **kw)
    graph = sample(model, tok, qs, cuda_graph=True, **kw)
    assert torch.equal(eager.response_ids, graph.response_ids)
    assert torch.allclose(eager.logprobs, graph.logprobs, atol=1e-5)
    assert torch.allclose(eager.entropies, graph.entropies, atol=1e-5)


@CUDA
def test_cuda_graph_under_autocast_follows_the_weights():
    """train.py samples float32 weights under bfloat16 autocast, then the optimiser changes them in
    place: a graph recorded before the change must decode with the new weights (it would not if it
    had captured autocast's cached bfloat16 copies, which are freed when the autocast block ends)."""
    model, tok = _random_smollm2_on_cuda()
    model.train()  # parameters that require grad: the ones autocast caches casts of
    qs = [format_prompt(tok, q) for q in QUESTIONS]
    kw = dict(group_size=4, max_new_tokens=16, temperature=0.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        before = sample(model, tok, qs, cuda_graph=True, **kw)  # records the graph
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # as an optimiser step would, in place (and visibly)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graph = sample(model, tok, qs, cuda_graph=True, **kw)
        eager = sample(model, tok, qs, cuda_graph=False, **kw)
    assert not torch.equal(graph.response_ids, before.response_ids)  # the change is visible...
    assert torch.equal(graph.response_ids, eager.response_ids)  # ...and the graph decodes with it
    # bfloat16 logits: the graph attends over a bucketed cache, eager over the exact one, so sums
    # round apart by a few units of bfloat16's last place (2**-7 near 1; 0.008 seen on an H200).
    # Stale weights would be off by whole nats.
    assert torch.allclose(graph.logprobs, eager.logprobs, atol=5e-2)


def test_a_models_graphs_go_with_the_model():
    """_GRAPHS holds each model's graphs (and their caches) only as long as the model lives."""
    import gc

    model = model_from_hf(tiny_hf_model("llama", vocab_size=len(_char_tok()))).eval()
    sample(model, _char_tok(), ["1+1"], group_size=2, max_new_tokens=3, seed=0, cuda_graph=True)
    assert model in decode._GRAPHS
    n = len(decode._GRAPHS)
    del model
    gc.collect()
    assert len(decode._GRAPHS) == n - 1

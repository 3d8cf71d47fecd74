"""bench.py runs every row (toy sizes), and the fast paths it measures compute what the slow ones do."""

import copy
import json
import math

import pytest
import torch

import bench
from fast.sampling import pick_next_token
from plumbing.load import model_from_hf
from model import KVCache
from rollout import sample, score_responses


@pytest.fixture(scope="module")
def toy():
    """(transformers model, our model sharing its weights, byte tokenizer): the --quick setup."""
    hf, model = bench.random_qwen(torch.device("cpu"), torch.float32, **bench.TOY)
    return hf, model, bench.byte_tokenizer()


def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--out", str(out)])
    info = json.loads(out.read_text())
    assert [r["row"] for r in info["rows"]] == ["1", "1b", "1c", "2", "3a", "3b", "4a", "4b", "6", "7", "8", "9"]
    for r in info["rows"]:
        for key in ("ours", "baseline", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["row"], key, r[key])
        assert isinstance(r["met"], bool) and r["target"].startswith((">=", "<="))


def test_rows_runs_only_the_rows_asked_for(tmp_path):
    """--rows picks rows; a function that times two rows (3a and 3b) runs for either."""
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--rows", "1c,3b,7", "--out", str(out)])
    assert [r["row"] for r in json.loads(out.read_text())["rows"]] == ["1c", "3a", "3b", "7"]


def test_result_ratio_points_the_right_way():
    assert bench.result("x", "", 200.0, 100.0, "tok/s", ">= 1.5x")["ratio"] == 2.0  # more tokens per second
    assert bench.result("x", "", 1.0, 3.0, "s", ">= 1.5x")["ratio"] == 3.0  # fewer seconds
    mem = bench.result("x", "", 60.0, 100.0, "MB", "<= 0.7x")
    assert mem["ratio"] == 0.6 and mem["met"]


def test_byte_tokenizer_round_trips_and_fits_qwen():
    tok = bench.byte_tokenizer()
    ids = tok("héllo, 12+3", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("héllo, 12+3".encode()) and tok.decode(ids) == "héllo, 12+3"
    assert len(tok) == 257 and tok.eos_token_id == tok.pad_token_id == 256
    cfg = bench.qwen25_05b_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (896, 24, 2, 151936)
    from plumbing.load import config_from_hf

    ours = config_from_hf(cfg)
    assert ours.qkv_bias and ours.tie_embeddings and ours.rope_theta == 1e6 and ours.head_dim == 64


def test_cpu_memory_of_a_training_step_sees_the_logits():
    """Measured in a child process: transformers' step holds at least its full logits and their
    log-softmax (2 x N x T x V floats); ours, which never makes the full logits, stays below it."""
    config = bench.qwen25_05b_config(**dict(bench.TOY, vocab_size=32768))
    N, P, R = 8, 16, 48
    ours, transformers = bench.cpu_training_step_memory(config, N, P, R)
    logits_bytes = N * (P + R) * config.vocab_size * 4  # 64 MiB
    assert transformers >= 2 * logits_bytes
    assert 0 < ours < transformers


# --- the fast paths compute the same function as the plain ones ------------------------------


def test_training_gradients_equal_transformers(toy):
    """score_responses (padding skipped, chunked logits, recomputed norms and SwiGLU) + the loss gives
    the same gradients as transformers' model with full logits: the two steps row 4 times."""
    hf, _, _ = toy
    ours = model_from_hf(hf)  # the same weights (projections copied column-major); separate .grad
    rollout = bench.random_rollout(5, 7, 9, ours.config.vocab_size, torch.device("cpu"))
    ours.train(), hf.train()
    ours_step, hf_step = bench.training_steps(ours, hf, rollout)
    ours_step(), hf_step()
    names = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = names[name].grad
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4), name
    ours.eval(), hf.eval()
    ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)


def test_score_responses_chunks_do_not_change_the_result(toy):
    _, model, _ = toy
    rollout = bench.random_rollout(6, 5, 11, model.config.vocab_size, torch.device("cpu"), seed=3)
    with torch.no_grad():
        one = score_responses(model, rollout, temperature=0.7, chunk_rows=1)
        all_rows = score_responses(model, rollout, temperature=0.7, chunk_rows=100)
    for a, b in zip(one, all_rows):
        assert torch.allclose(a, b, atol=1e-6)
        assert (a[rollout.response_mask == 0] == 0).all()  # padding stays 0


def test_inverse_cdf_sampling_follows_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    g = torch.Generator().manual_seed(0)
    tokens, _ = pick_next_token(probs.log().repeat(100_000, 1), 1.0, 1.0, 0, g)
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    assert (freq - probs).abs().max() < 0.006  # 4 sigma of a 100k-sample frequency
    assert freq[4] == 0  # a token of probability 0 never comes up
    hot, _ = pick_next_token(torch.tensor([[0.0, 2.0, 1.0]]).repeat(20_000, 1), 0.5, 1.0, 0, g)  # temperature 0.5
    expect = torch.softmax(torch.tensor([0.0, 2.0, 1.0]) / 0.5, -1)
    assert (torch.bincount(hot, minlength=3) / len(hot) - expect).abs().max() < 0.015


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_decodes_like_the_growing_one(toy, padded):
    """The CUDA-graph cache (attends over every slot, position on the device) gives the same logits
    as the ordinary one, prefill and decode, with left padding and after copying rows to a group."""
    _, model, _ = toy
    x = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    nxt = torch.randint(0, 256, (6, 5))
    outs = []
    for static in (False, True):
        cache = KVCache(model.config, 2, 20, static=static)
        with torch.no_grad():
            steps = [model(x, mask, cache=cache)[:, -1].repeat_interleave(3, 0)]
            cache = cache.take_rows(torch.tensor([0, 0, 0, 1, 1, 1]))
            steps += [model(nxt[:, t : t + 1], cache=cache)[:, -1] for t in range(5)]
        outs.append(torch.stack(steps, 1))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_sampling_without_a_cache_is_the_same_sampler(toy):
    """Row 3's baseline makes the same tokens as sample() (greedy), so the row compares like with like."""
    _, model, tok = toy
    prompt = "the farmer sells eggs"
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    ours = sample(model, tok, [prompt], max_new_tokens=12, temperature=0, ignore_eos=True)
    base = bench.sample_without_cache(model, enc["input_ids"], enc["attention_mask"], 12, temperature=0)
    assert torch.equal(ours.response_ids, base)


def test_ignore_eos_makes_every_token(toy):
    _, model, tok = toy
    eos_model = copy.deepcopy(model)
    eos_model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)  # untied, with a bias
    with torch.no_grad():
        eos_model.lm_head.weight.zero_()
        eos_model.lm_head.bias.fill_(-10.0)
        eos_model.lm_head.bias[tok.eos_token_id] = 10.0  # EOS is always the likeliest token
    stops = sample(eos_model, tok, ["hi there"], group_size=2, max_new_tokens=6, temperature=0)
    assert stops.response_ids.shape[1] == 1 and stops.stopped.all()
    full = sample(eos_model, tok, ["hi there"], group_size=2, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert full.response_ids.shape == (2, 6) and (full.response_ids == tok.eos_token_id).all()
    assert full.response_mask.all() and not full.stopped.any()


def test_profile_splits_a_decode_step_by_operator():
    """--profile: for each sampler, the operators' shares of 32 decode steps' CPU time (top 8)."""
    shares = bench.main(["--profile", "--quick"])
    assert set(shares) == {"ours", "generate"}
    for top in shares.values():
        assert 0 < len(top) <= 8 and 0 < sum(top.values()) <= 1 + 1e-9
        assert list(top.values()) == sorted(top.values(), reverse=True)

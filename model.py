"""
model.py -- a from-scratch decoder of the Qwen2 family, with an explicit KV cache.

Where it sits in the pipeline:

    question -> prompt -> [model.py: logits] -> rollout.py (sampling) -> reward -> advantage -> loss

One small class covers the checkpoints people run for RL on reasoning:
  * Qwen2 / Qwen2.5 / Qwen2.5-Math   bias on the q, k, v projections
  * Qwen3                             RMSNorm on q and k of every head, no qkv bias
  * Llama-style (SmolLM2, Llama 2/3 with plain RoPE)   no bias, no q/k norm
They are the same network: token embedding -> L x [RMSNorm -> grouped-query attention with rotary
positions -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head. Two flags
(`qkv_bias`, `qk_norm`) are all that separate them.

Our parameter names match Hugging Face's, so a transformers model's state dict loads into ours one
to one (plumbing.load.model_from_hf); plumbing/load.py finds a checkpoint and saves it back.

    model, tok = plumbing.load.load_model("smollm2-135m")   # the offline default (a GGUF file)
    logits = model(input_ids)                        # (B, T) -> (B, T, V)

Shapes: inside this file B is the rows of one call and T its tokens (rollout.py calls it with B
prompts of P tokens to prefill, then N = B x G rows of 1 token per decode step); D is the width
(hidden_size), V the vocabulary, H and Hkv the query and key/value heads, hd head_dim.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # width of the SwiGLU MLP
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention: n_heads is a multiple of this)
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 / Qwen2.5: True
    qk_norm: bool = False  # Qwen3: True
    tie_embeddings: bool = False  # small models reuse the embedding matrix as the LM head


# -----------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Decoding one token needs the keys and values of all earlier tokens; recomputing them each step
    costs O(T^2) over a response, keeping them costs memory: (B, n_kv_heads, max_len, head_dim) per
    layer for K and for V. `mask` remembers which cached positions are real tokens (False for left
    padding and for slots not written yet), so later steps ignore the padding and count positions per row.

    prefill: model(prompt_ids, attention_mask, cache)   writes positions [0, P)
    decode:  model(next_token[:, None], cache=cache)     writes position P, then P+1, ...

    static=True serves CUDA graphs (the fast sampler's `cuda_graph` option, fast/sampling.py). A
    graph replays the same kernels on the same shapes and addresses every step, so a static cache
    differs in two ways:
    attention reads all max_len slots (those not written yet are masked out, like padding) instead
    of a slice that grows by one each step, and the next free slot is a tensor on the device
    (`position`), which the replayed kernels advance themselves, rather than the Python int `length`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32, static=False):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.length = 0  # positions filled so far, the same for every row (padding included)
        self.position = torch.zeros(1, dtype=torch.long, device=device) if static else None  # (1,): `length`, on the device

    def reserve(self, T: int):
        """The slots a call of T tokens writes, (T,) long, and how many slots its attention reads."""
        arange = torch.arange(T, device=self.mask.device)
        if self.position is not None:
            self.slots, self.span = self.position + arange, self.mask.shape[1]
        else:
            if self.length + T > self.mask.shape[1]:
                raise ValueError(f"KV cache is full ({self.mask.shape[1]} positions); allocate a larger max_len")
            self.slots, self.span = self.length + arange, self.length + T
        return self.slots, self.span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values (B, Hkv, T, hd) of one layer in the reserved slots; return all so far."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, : self.span], self.v[layer][:, :, : self.span]  # (B, Hkv, S, hd) views

    def advance(self, T: int):
        self.length += T
        if self.position is not None:
            self.position += T  # in place: a CUDA graph records this too

    def take_rows(self, rows: torch.Tensor) -> "KVCache":
        """A cache holding rows `rows` (n,) of this one, in that order (a copy).

        rows = [0, 0, 1, 1]: one prompt prefilled once serves its 2 samples (rollout.sample);
        rows = the ones still decoding: rows that stopped leave the batch (fast.decode.EagerDecoder)."""
        new = KVCache.__new__(KVCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.mask = self.mask.index_select(0, rows)
        new.length = self.length
        new.position = None if self.position is None else self.position.clone()
        return new


# -----------------------------------------------------------------------------------------------
# Building blocks


def maybe_recompute(on: bool, fn, *inputs):
    """fn(*inputs); with `on` (and gradients), autograd keeps only the inputs and recomputes the rest.

    The cheap elementwise parts of a block (RMSNorm, SwiGLU's silu(gate) * up) would otherwise keep
    extra full-size tensors alive until backward: the normalised x of each norm, silu(gate) of
    each MLP. Recomputing them costs a few elementwise passes and saves 2 x (B, T, D) + (B, T, I)
    per layer, a fifth of the training step's peak memory. Worth it only where memory is short:
    on an H100 the recomputation cost more time than the memory it freed was worth, so train.py's
    `--recompute auto` turns it on only when a mini-batch would not fit otherwise.
    """
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=False)
    return fn(*inputs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.recompute = True  # set for the whole model with Transformer.set_recompute

    def forward(self, x):
        return maybe_recompute(self.recompute, self._normalise, x)

    def _normalise(self, x):
        # x * rsqrt(mean(x^2) + eps) in float32 even in bfloat16 (the mean of 1000 squares loses digits
        # there; HF does the same, so logits match): F.rms_norm, on a GPU one kernel instead of five.
        y = self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)  # (..., D)
        # Under autocast q, k and v would each cast y to bfloat16: one cast here, the same numbers.
        amp = torch.is_autocast_enabled(x.device.type)
        return y.to(torch.get_autocast_dtype(x.device.type)) if amp else y


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos and signed sin of the rotation angles position * theta^(-2i/d), for positions (B, T).

    HF checkpoints rotate the pairs (x_i, x_{i+hd/2}) ("rotate half" layout), so both come out
    (B, 1, T, hd) with the hd/2 angles repeated; sin carries a minus on the first half (see apply_rotary).
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B, T, hd)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, hd) each


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle: attention then sees relative offsets.

    x_i' = x_i cos - x_{i+hd/2} sin and x_{i+hd/2}' = x_{i+hd/2} cos + x_i sin. Rolling x by hd/2
    swaps its halves, and the minus lives in `sin`: one roll, two products and a sum (the usual
    split / negate / concatenate takes up to twice as long on a CPU).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all heads, before the rotation
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, x, cos, sin, attn_mask, layer, cache):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd): every key so far, this step's included
        # Grouped-query attention: each K/V head serves g = n_heads / n_kv_heads query heads.
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        if T == 1 and g > 1 and attn_mask is not None:
            # A decode step has one query per row, so the g query heads that share a K/V head can be
            # stacked as g query positions of that head (all with the same mask): plain attention,
            # no grouped-query path. That path is 6x slower for this shape on CPUs in bfloat16, and
            # on GPUs can fall back to copying each K/V head g times.
            y = F.scaled_dot_product_attention(q.reshape(B, -1, g, hd), k, v, attn_mask=attn_mask)  # (B, Hkv, g, hd)
            return self.o_proj(y.reshape(B, 1, -1))
        # attn_mask None means "plain causal, no padding", which lets torch pick its fastest kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=g > 1)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.recompute = True

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        return self.down_proj(maybe_recompute(self.recompute, swiglu, gate, up))


def swiglu(gate, up):
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, layer, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The trunk: embedding, blocks, final norm (named `model` inside Transformer, as in HF)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


# -----------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # trade compute for memory in training (recompute each block)
        self.recompute = True  # recompute RMSNorm, SwiGLU and the LM head in backward (see set_recompute)
        self.hf_config = None  # the transformers config dict we came from; written back on save

    def column_major_weights_(self):
        """Store each projection's (out, in) weight as the transpose of a contiguous (in, out) matrix:
        same values, shapes and state_dict, another order in memory (GPT-2's checkpoints use it).

        Why: a decode step multiplies a few rows (N, D) by every weight once, and a CPU's
        matrix-product kernel is faster when the weight lies in memory as the (in, out) matrix that
        x @ W reads; training loses nothing measurable (docs/speed.md, row 1, times both). In
        bfloat16 the usual layout is faster and GPUs are not measured, so model_from_hf
        applies it to float32 on a CPU only (under CPU bfloat16 autocast the cast copies keep it:
        not measured). The LM head is left alone: no difference at its shape, and a tied head is
        the embedding, looked up by rows.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                m.weight.data = m.weight.data.t().contiguous().t()  # (out, in) view of (in, out) memory
        return self

    def set_recompute(self, on: bool):
        """Recompute the cheap parts in backward (RMSNorm, SwiGLU: see maybe_recompute; the LM head:
        see rollout.score_responses) instead of keeping their outputs: less memory, a little more time."""
        for m in self.modules():
            if isinstance(m, (Transformer, RMSNorm, MLP)):
                m.recompute = on

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """(B, T) token ids -> (B, T, D) final hidden states.

        attention_mask (B, T): 1 for real tokens, 0 for padding (left padding for prompts, right
        padding after a response's stop token). Positions are counted per row over real tokens
        only, so a left-padded prompt gets the same positions as the prompt alone.
        """
        B, T = input_ids.shape
        device = input_ids.device
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        # 1) positions: real tokens before this call (from the cache) + running count in this call
        if cache is None:
            q_idx, n_before, key_real = torch.arange(T, device=device), 0, real  # (T,) absolute index of each query
        else:
            q_idx, S = cache.reserve(T)  # (T,) the cache slots this call writes; attention reads slots [0, S)
            n_before = cache.mask.sum(-1, keepdim=True)  # (B, 1): slots not written yet are False
            cache.mask.index_copy_(1, q_idx, real)
            key_real = cache.mask[:, :S]  # (B, S)
        positions = (n_before + real.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        # 2) which keys each query may see: causal, not padding. A padded query sees only itself,
        #    so its softmax is never over an empty set (its output is garbage and never used).
        if cache is None and attention_mask is None:
            attn_mask = None  # plain causal attention: the fast path used in training without padding
        else:
            k_idx = torch.arange(key_real.shape[1], device=device)[None, :]  # (1, S)
            attn_mask = ((k_idx <= q_idx[:, None]) & key_real[:, None, :]) | (k_idx == q_idx[:, None])  # (B, T, S)
            attn_mask = attn_mask[:, None]  # (B, 1, T, S), broadcast over heads
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, attn_mask, i, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, i, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """(B, T) -> logits (B, T, V) in float32 (softmax over a 50-150k vocabulary wants the digits)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache)).float()

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype


# -----------------------------------------------------------------------------------------------
# Reading a response: the one place that lines up a model's outputs with the response tokens


def response_outputs(forward, rollout):
    """forward(ids, mask) over each prompt followed by its response -> its outputs (N, R, ...) at the
    R positions that predict the response tokens.

    `rollout` has prompt_ids, prompt_mask (N, P) and response_ids, response_mask (N, R). A causal
    model's position t predicts token t + 1, so the last prompt position predicts the first response
    token, and the very last position (what would follow the response) is dropped: slice [P-1, -1).
    """
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)  # (N, P + R)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask.long()], 1)  # (N, P + R), 1 = real token
    P = rollout.prompt_ids.shape[1]
    return forward(ids, mask)[:, P - 1 : -1]  # (N, R, ...)


# -----------------------------------------------------------------------------------------------
# PPO's critic


class Critic(nn.Module):
    """A value model V(state) for PPO: our decoder with a scalar head in place of the LM head.

    Started from the policy's weights (as veRL does), so it begins with the policy's understanding
    of the text; it has its own parameters and optimiser, so its loss never moves the policy.
    The value head starts at zero: the critic first predicts a return of 0 everywhere.
    """

    def __init__(self, policy: Transformer):
        super().__init__()
        self.body = copy.deepcopy(policy)
        del self.body.lm_head  # (a tied head is only a reference to the embedding, which stays)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def set_recompute(self, on: bool):
        self.body.set_recompute(on)

    @staticmethod
    def from_policy(policy: Transformer) -> "Critic":
        return Critic(policy).to(device=policy.device)

    def forward(self, rollout):
        """Values (N, R) at the rollout's response positions (the state before each response token)."""
        h = response_outputs(self.body.hidden_states, rollout)  # (N, R, D), aligned with the log-probs
        return self.value_head(h).squeeze(-1) * rollout.response_mask  # (N, R)

"""
fast/decode.py -- one decode step for every row of a batch: the inner loop of the fast sampler.

fast/sampling.py's sample prefills the prompts, then calls `step(tokens, done) -> logits` once per
new token (where rollout.sample's reference loop calls the model itself). Two engines serve that call:
  * EagerDecoder runs the model as ordinary PyTorch, on any device, and drops the rows that have
    stopped from the batch (cheap on a CPU, where a step's cost grows with its rows);
  * DecodeGraph records one step as a CUDA graph and replays it (on a GPU, where launching a step's
    thousand small kernels from Python costs more than running them).
Both give the reference loop's tokens (tests/test_rollout.py compares them).
"""

import time
import weakref

import torch
from torch import nn
from torch.func import functional_call

from model import KVCache


# -----------------------------------------------------------------------------------------------
# The decode step, eagerly: rows that have stopped leave the batch

# The G answers to a prompt differ in length, and a batch decodes until its longest answer ends:
# in an evaluation at 128 rows, the last tenth of the rows can keep the batch going for half of its
# steps. On a CPU a step's cost grows with the rows it computes (at 128 rows it is ~8 times that at
# 16), so computing only the rows still decoding makes such a tail cheap. Every row keeps its place
# in the (N, V) logits the loop reads; a stopped row's logits are stale, but the loop only ever
# writes padding for it. (A CUDA graph fixes its rows, so DecodeGraph below always computes all.)
COMPACT_WHEN = 0.75  # drop the stopped rows once at most this share of the batch is still decoding


class EagerDecoder:
    """step(token (N,), done (N,)) -> logits (N, V), computing only the rows not done.

    Dropping rows asks the device how many are still decoding, so the host waits for it every step
    anyway: fast.sampling.sample's rounds are one step long here (check_every), and never need undoing."""

    check_every = 1

    def __init__(self, model, cache: KVCache, logits: torch.Tensor):
        self.model, self.cache = model, cache
        self.rows = torch.arange(logits.shape[0], device=logits.device)  # (n,): the row each cache row serves
        self.logits = logits  # (N, V), updated in place

    def __call__(self, token: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        active = ~done[self.rows]  # (n,)
        if 0 < active.sum() <= COMPACT_WHEN * len(self.rows):  # (a host sync: a GPU takes the graph path)
            keep = active.nonzero().squeeze(1)  # (n',)
            self.cache, self.rows = self.cache.take_rows(keep), self.rows[keep]
        out = self.model(token[self.rows, None], cache=self.cache)[:, -1]  # (n, V)
        return self.logits.index_copy_(0, self.rows, out.float())

    def mark(self):
        return None  # (rounds of one step hold no decode step to undo)

    def rewind(self, mark):
        pass


# -----------------------------------------------------------------------------------------------
# The decode step on a GPU: recorded once as a CUDA graph, replayed every token

# A decode step of a small model is about a thousand small kernels, and launching them one by one
# from Python takes longer than the GPU needs to run them (docs/speed.md has an H200's numbers). A
# CUDA graph records the kernels of one step once and replays them with a single launch. It fixes
# shapes and memory addresses, so
#   * the tokens go in through a buffer we copy into, the logits come out in a buffer the graph
#     owns (overwritten by the next replay), and the KV cache is static (see KVCache);
#   * a graph serves one (rows, cache length) shape. So that a whole run records a handful of graphs
#     and not one per step, both are rounded up to buckets (rows to a power of two, the cache to a
#     multiple of 256 slots); spare rows decode padding that nobody reads, and spare cache slots are
#     masked out like padding. The graphs are kept per model and reused by every later call:
#     training steps and evaluation batches of the same bucket replay the same graph.
GRAPH_LENGTH_STEP = 256
_GRAPHS = weakref.WeakKeyDictionary()  # model -> {(rows, length, dtype): DecodeGraph}; gone with the model
_WEIGHT_COPIES = weakref.WeakKeyDictionary()  # model -> {dtype: {name: weight}}: see cast_weights
CHECK_STOP_EVERY = {"cpu": 1, "cuda": 8}  # decode steps in one of sample's rounds, between two looks at the device


def graph_bucket(n_rows: int, length: int) -> tuple:
    """(rows, cache length) of the graph that serves n_rows rows and `length` cache slots.

    >>> graph_bucket(24, 300), graph_bucket(1024, 512)
    ((32, 512), (1024, 512))
    """
    return 1 << (n_rows - 1).bit_length(), -(-length // GRAPH_LENGTH_STEP) * GRAPH_LENGTH_STEP


class DecodeGraph:
    """One decode step of `rows` rows over a static cache of `length` slots, recorded as a CUDA graph.

    load() puts a prefilled prompt cache in (each prompt's keys and values copied to its G rows);
    calling it replays the graph: tokens (N,) -> logits (N, V). record=False runs the same step
    eagerly on the same static cache: what the tests compare on a CPU, where graphs do not exist.
    mark() and rewind() let sample() decode a round of steps again (see fast.sampling.sample).
    """

    def __init__(self, model, rows: int, length: int, dtype, record: bool = True):
        device = model.device
        self.cache = KVCache(model.config, rows, length, device=device, dtype=dtype, static=True)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (rows, 1): the graph's input
        self.model = weakref.ref(model)  # (weak: _GRAPHS must not keep the model it is keyed by alive)
        self.weights = cast_weights(model)  # {} unless under autocast: see cast_weights
        self.record_seconds = 0.0
        self.graph = None
        if not record:
            return
        t0 = time.perf_counter()
        # Under autocast the graph must not use autocast's cache of bfloat16 weight copies: that
        # cache is freed when the `with` block ends, and the graph would go on reading freed memory
        # (and never see the optimiser's updates). It reads self.weights instead (see cast_weights).
        amp = torch.is_autocast_enabled("cuda")
        amp_ctx = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False)
        # One eager step first, on a side stream: libraries set themselves up lazily on first use,
        # which is not allowed during a capture. It writes one slot and advances the cache; load()
        # resets both before every use.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp_ctx:
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), amp_ctx:
            self.logits = self._forward()  # recorded, not run: (rows, V)
        torch.cuda.synchronize()
        self.record_seconds = time.perf_counter() - t0

    def _forward(self):
        """One decode step of every row over the static cache: (rows, V) logits. The model's own
        parameters, except the projections' weights when self.weights holds cast copies of them."""
        return functional_call(self.model(), self.weights, (self.tokens,), {"cache": self.cache}, tie_weights=False)[:, -1]

    def load(self, prompt_cache: KVCache, group_size: int):
        """Row i*G+g of the static cache gets prompt i's keys, values and mask; every other slot is
        masked out (left over from an earlier call, but never read), and the next slot is P."""
        B, P, G = prompt_cache.mask.shape[0], prompt_cache.length, group_size
        N = B * G
        for static, prefilled in zip(self.cache.k + self.cache.v, prompt_cache.k + prompt_cache.v):
            # (B, G, Hkv, P, hd) view of the first N rows <- (B, 1, Hkv, P, hd): no G-fold copy in between
            static[:N].unflatten(0, (B, G))[:, :, :, :P].copy_(prefilled[:, None, :, :P])
        self.cache.mask.zero_()
        self.cache.mask[:N].unflatten(0, (B, G))[:, :, :P].copy_(prompt_cache.mask[:, None, :P])
        self.cache.position.fill_(P)
        self.cache.length = P
        self.tokens.zero_()  # spare rows decode token 0 over an empty (all masked) prompt
        cast_weights(self.model())  # this call's weights into self.weights: the optimiser changed them since

    def __call__(self, tokens: torch.Tensor, done=None) -> torch.Tensor:
        """tokens (N,) -> logits (N, V). Every row is computed: `done` is there to match EagerDecoder."""
        N = tokens.shape[0]
        self.tokens[:N, 0].copy_(tokens)
        if self.graph is None:
            return self._forward()[:N]
        self.graph.replay()
        return self.logits[:N]  # (N, V), a view of the graph's output buffer

    @property
    def check_every(self) -> int:
        return CHECK_STOP_EVERY.get(self.tokens.device.type, 1)

    def mark(self) -> torch.Tensor:
        """Where decoding stands: the next free slot, (1,) on the device (read without waiting for it)."""
        return self.cache.position.clone()

    def rewind(self, mark: torch.Tensor):
        """Back to a mark: the slots written since are masked out again and the next slot is the
        marked one (their keys and values stay, unread, until the steps decoded again overwrite them)."""
        slots = torch.arange(self.cache.mask.shape[1], device=mark.device)  # (L,)
        self.cache.mask.masked_fill_(slots >= mark, False)
        self.cache.position.copy_(mark)


def cast_weights(model) -> dict:
    """Under autocast: {name: each projection's weight and bias in the autocast dtype}, cast from the
    model's weights now, for the graph to multiply with. Without autocast: {} (the graph reads the
    model's own parameters).

    Why: under autocast every projection casts its float32 weight to bfloat16 before multiplying,
    at every step: for Qwen2.5-0.5B that is 241 cast kernels and 3 GB of memory traffic per step,
    three times what the multiplications read. The weights change only between sample calls (the
    optimiser steps between rollouts), so DecodeGraph.load casts them once per call instead: the
    same bfloat16 numbers. Embedding and norms stay float32, as under autocast. One set of copies
    per model and dtype, shared by all its graphs (each graph reads them at fixed addresses).
    With the norms' single casts (model.RMSNorm) this removes about two fifths of a decode step's
    operations (docs/speed.md counts them); tests/test_rollout.py counts the casts left.
    """
    device = model.device.type
    if not torch.is_autocast_enabled(device):
        return {}
    dtype = torch.get_autocast_dtype(device)
    per_dtype = _WEIGHT_COPIES.setdefault(model, {})
    if dtype not in per_dtype:
        per_dtype[dtype] = {f"{name}.{p_name}": torch.empty_like(p, dtype=dtype)  # (strides kept: see column_major_weights_)
                            for name, m in model.named_modules() if isinstance(m, nn.Linear)
                            for p_name, p in m.named_parameters(recurse=False)}
    copies = per_dtype[dtype]
    with torch.no_grad():
        for name, w in copies.items():
            w.copy_(model.get_parameter(name))
    return copies


def decode_graph(model, n_rows: int, length: int, dtype) -> DecodeGraph:
    """The model's graph for this bucket: recorded on first use, then reused."""
    graphs = _GRAPHS.setdefault(model, {})
    device = model.device.type
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    # autocast is in the key: a graph recorded under it computes in its dtype and reads the cast
    # copies, which load() refreshes only under autocast (a bfloat16 model's cache is bfloat16 both ways)
    key = (*graph_bucket(n_rows, length), dtype, amp)
    if key not in graphs:
        graphs[key] = DecodeGraph(model, key[0], key[1], dtype, record=device == "cuda")
    return graphs[key]


def graph_stats(model) -> dict:
    """How many decode graphs this model has recorded, and the seconds that took (train.py logs it)."""
    graphs = _GRAPHS.get(model, {})
    return {"cuda_graphs": len(graphs), "graph_record_s": sum(g.record_seconds for g in graphs.values())}

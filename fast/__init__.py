"""
fast/ -- the fast paths: code that changes no number, only how quickly or in how much memory the
numbers are made.

A student never needs to open this folder to follow the method. The reference path (rollout.py's
`sample`, train.py's loop) is what the paper's algorithm is; each module here does the same work
faster and is chosen by one switch where the reference path would run. The tests prove that each
gives the reference's tokens, log-probabilities, entropies and gradients.

    sampling.py   rollout.sample's fast path (its switch: fast=True, the default): the top-p
                  window with spare rows, the two-stage inverse-CDF draw, rounds of decode steps
                  with mark/rewind on a GPU
    decode.py     its decode step: eagerly with the rows that have stopped dropped from the batch
                  (EagerDecoder), or replayed as a CUDA graph (DecodeGraph, cast_weights, graph_stats)
    micro_batches.py  the update's fast path (its switch: update.FAST, on by default): micro-batches
                  cut to their rows' real tokens, longest answers first, sized by a GPU memory
                  probe, with recomputation and a smaller retry when memory runs out
"""

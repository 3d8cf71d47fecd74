"""
fast/micro_batches.py -- how a mini-batch is cut into micro-batches, the fast way: the same
gradients as the reference (update.MicroBatches: a fixed number of rows at a time, in order, as
wide as the rollout), in less time and memory. train.py's update() asks its plan for the
micro-batches of each mini-batch; update.micro_batch_plan picks this one unless update.FAST is off.

Three things make it fast, none of them changes a number (tests/test_train.py compares):
  1. rows of similar length travel together (longest_first), and each micro-batch is cut to the
     columns its rows use (rollout_rows): short answers cost what they cost;
  2. on a GPU, the number of rows is sized by memory: the first micro-batch is a probe whose peak
     memory per token gives the most rows that fit, and recomputation in backward goes on only when
     a whole mini-batch would not fit without it (MicroBatchPlan);
  3. out of GPU memory all the same, the mini-batch is redone with half the rows (attempts).
"""

from contextlib import contextmanager

import torch

from rollout import Rollout

# A rollout is as wide as its longest prompt plus its longest answer, and most rows are padding at
# one end or the other: in the experiment's CPU size, answers of 60 to 100 tokens share a rollout
# with a few cut off at 192. A micro-batch needs only the columns some of its rows use, so each one
# is cut to those, and micro-batches are made of rows of similar length (longest first), so that
# short answers travel together and cost what they cost. The numbers do not change: positions
# count real tokens only and attention never looks at padding.


def longest_first(r: Rollout, rows: slice) -> torch.Tensor:
    """The rollout's rows in `rows`, as (n,) indices, the longest answers first (ties: in order).
    First also means that the micro-batch the memory probe measures is the widest (MicroBatchPlan)."""
    return torch.arange(r.response_ids.shape[0], device=r.response_ids.device)[rows][
        r.response_mask[rows].sum(-1).argsort(descending=True, stable=True)]


def used_columns(r: Rollout, rows: torch.Tensor) -> tuple:
    """(p0, R) for some rows ((n,) indices): the first prompt column one of them uses (left padding
    before it) and the end of their longest answer (as rollout._pack cuts the rollout)."""
    return int(r.prompt_mask[rows].any(0).nonzero().min()), int(r.response_mask[rows].any(0).nonzero().max()) + 1


def rollout_rows(r: Rollout, rows: torch.Tensor) -> Rollout:
    """Some rows of a rollout ((n,) indices), as a Rollout without the columns that are padding in
    all of them: the prompts' shared left padding and the answers' shared right padding."""
    p0, R = used_columns(r, rows)
    prompt_mask, response_mask = r.prompt_mask[rows], r.response_mask[rows]  # (n, P), (n, R)
    return Rollout(r.prompt_ids[rows, p0:], prompt_mask[:, p0:], r.response_ids[rows, :R], response_mask[:, :R],
                   r.logprobs[rows, :R], r.entropies[rows, :R], r.stopped[rows], [r.texts[i] for i in rows.tolist()],
                   r.group_size)


# -----------------------------------------------------------------------------------------------
# Micro-batches sized by memory

CPU_MICRO_BATCH = 8  # rows. A CPU has no launch overhead to amortise, so the size barely matters:
#                     8 was the fastest of 4 to 32, and recomputation only cost time, so a CPU
#                     never recomputes under auto (docs/speed.md times both).
PROBE_ROWS = 8  # rows of the first GPU micro-batch, whose peak memory is measured
MEMORY_SHARE = 0.8  # of the free GPU memory, what one micro-batch's activations may take


class MicroBatchPlan:
    """How many rows go through one forward and backward, and whether backward recomputes RMSNorm,
    SwiGLU and the LM head instead of keeping them: fixed by --micro_batch and --recompute, or sized
    by memory with `auto`.

    Why: a GPU wants the largest micro-batch that fits. On an H200, 128 rows x 128 tokens took 6.52 s
    in micro-batches of 8 rows, 1.09 s in micro-batches of 32 and 0.51 s in one of 128.
    auto on a GPU: the run's first training micro-batch (PROBE_ROWS rows) is also a probe: its peak
    memory per token (a row's tokens without the padding its micro-batch shares), against the memory
    free, gives the most rows of the mini-batch's width (its rows' tokens without shared padding; no
    micro-batch of it is wider) that fit in MEMORY_SHARE of it. --recompute auto probes without
    recomputation, the faster way; if a whole mini-batch would then not fit in one micro-batch,
    recomputation goes on and the probe is repeated. Should memory run out all the same, the
    micro-batch is halved and the mini-batch redone.
    auto on a CPU: CPU_MICRO_BATCH rows, and no recomputation (there it only cost time).
    """

    def __init__(self, cfg, device, learners: list):
        self.fixed = None if str(cfg.micro_batch) == "auto" else int(cfg.micro_batch)
        self.gpu = device.type == "cuda"
        self.recompute_auto = cfg.recompute == "auto"
        self.nets = [learner.net for learner in learners]
        self.optimizers = [learner.optimizer for learner in learners]
        self.bytes_per_token = None  # measured by the probe (GPU, auto)
        self.cap = None  # the most rows after an out-of-memory error
        self.last_rows = None
        self.set_recompute(cfg.recompute == "true")

    def split(self, rollout: Rollout, old, rows: slice, probe: bool):
        """The micro-batches of one mini-batch (`rows` of the rollout): (part, its old scores) each,
        rows of similar length cut to the columns they use. probe: the actor learns, so the first
        micro-batch of a GPU run with auto sizes is measured (its forward and backward run between
        this generator's yield and its next step)."""
        order = longest_first(rollout, rows)  # (n,) the mini-batch's rows
        p0, R = used_columns(rollout, order)
        mini_batch_width = rollout.prompt_ids.shape[1] - p0 + R  # its tokens a row, without shared
        m = 0  # padding: no micro-batch of it is wider
        while m < len(order):
            mb = order[m : m + self.rows(mini_batch_width)]  # a micro-batch: rows of similar length
            part = rollout_rows(rollout, mb)  # ... without the columns that are padding in all of them
            width = part.prompt_ids.shape[1] + part.response_ids.shape[1]  # the tokens a row costs here
            with self.measure(len(mb), width, len(order), mini_batch_width, probe):
                yield part, old.at(mb, part.response_ids.shape[1])
            m += len(mb)

    @torch.no_grad()
    def score(self, fn, rollout: Rollout, amp) -> torch.Tensor:
        """fn (a scorer: Rollout -> (n, R') per-token values) over the whole rollout, rows of similar
        length at a time, without gradients -> (N, R), 0 in the columns a part did not have."""
        width = rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]
        rows = self.rows(width)  # no gradients: a training micro-batch is plenty
        order = longest_first(rollout, slice(None))  # (N,)
        out = torch.zeros(rollout.response_ids.shape, device=rollout.response_ids.device)  # (N, R)
        for m in range(0, len(order), rows):
            idx = order[m : m + rows]  # (n,)
            with amp():
                part = fn(rollout_rows(rollout, idx))  # (n, R')
            out[idx, : part.shape[1]] = part.float()
        return out

    def attempts(self, learners: list):
        """Tries at one mini-batch, each a context to run it in: one, unless the GPU's memory runs
        out; then its gradients are dropped and it is tried again with half the rows."""
        while True:
            failed = []
            yield self.out_of_memory_caught(failed)
            if not failed:
                return
            self.after_out_of_memory(learners)  # now that the exception (and its tensors) is gone

    @staticmethod
    @contextmanager
    def out_of_memory_caught(failed: list):
        try:
            yield
        except torch.OutOfMemoryError:
            failed.append(True)

    def set_recompute(self, on: bool):
        self.recompute = on
        for net in self.nets:
            net.set_recompute(on)

    def rows(self, tokens_per_row: int) -> int:
        """Rows for the next micro-batch (the caller stops at the end of the mini-batch)."""
        if self.fixed:
            rows = self.fixed
        elif not self.gpu:
            rows = CPU_MICRO_BATCH
        elif self.bytes_per_token is None:
            rows = PROBE_ROWS
        else:
            rows = max(1, int(MEMORY_SHARE * self.free_bytes() / (self.bytes_per_token * tokens_per_row)))
        self.last_rows = min(rows, self.cap or rows)
        return self.last_rows

    def free_bytes(self) -> int:
        """GPU memory a micro-batch's activations may use: free on the device, plus what torch's
        allocator holds unused, minus what the step will still claim: gradients not yet made, and
        AdamW's two moments (8 bytes a parameter) before its first step."""
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        for net, opt in zip(self.nets, self.optimizers):
            params = list(net.parameters())
            free -= sum(p.numel() * p.element_size() for p in params if p.grad is None)
            if not opt.state:
                free -= sum(2 * p.numel() * 4 for p in params)
        return max(free, 0)

    @contextmanager
    def measure(self, rows: int, tokens_per_row: int, mini_batch_rows: int, mini_batch_width: int, probe: bool):
        """Around one micro-batch's forward and backward: with auto on a GPU, the first is the probe.
        rows x tokens_per_row: the micro-batch's size; the mini-batch's, for the recompute decision."""
        if not (probe and self.gpu and self.fixed is None and self.bytes_per_token is None):
            yield
            return
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        self.bytes_per_token = (torch.cuda.max_memory_allocated() - base) / (rows * tokens_per_row)
        if self.recompute_auto and not self.recompute and self.rows(mini_batch_width) < mini_batch_rows:
            self.set_recompute(True)  # a mini-batch would not fit in one micro-batch: recompute, and
            self.bytes_per_token = None  # measure again (the next micro-batch is a probe once more)

    def after_out_of_memory(self, learners: list):
        """Out of memory in a mini-batch: drop its gradients and halve the micro-batch (auto), else stop."""
        if self.fixed or (self.last_rows or 1) <= 1:
            raise ValueError(f"out of GPU memory with micro-batches of {self.last_rows} rows: use --micro_batch auto, "
                             "a smaller --micro_batch, --recompute true or --gradient_checkpointing true")
        for learner in learners:
            if learner is not None:
                learner.optimizer.zero_grad(set_to_none=True)
        self.cap = self.last_rows // 2
        torch.cuda.empty_cache()
        print(f"out of GPU memory at {self.last_rows} rows per micro-batch: redoing the mini-batch with {self.cap}")

"""
trl_entropy.py -- the paper's one line inside TRL's GRPOTrainer: the way out of this repository to
many GPUs, DeepSpeed and vLLM, with the method unchanged.

    A_t <- A_t + min(alpha * H_t.detach(), |A_t| / kappa)        (Cheng et al. 2025, arXiv 2506.14758)

Use the class in your own TRL script (the file needs only torch and trl; copy it anywhere):

    from trl_entropy import EntropyAdvantageGRPOTrainer, paper_config
    trainer = EntropyAdvantageGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                                          args=paper_config(output_dir="runs/trl"), train_dataset=my_prompts,
                                          alpha=0.4, kappa=2.0)
    trainer.train()

or run this file, which trains on one of our tasks with our grader as the reward. One GPU:

    python trl_entropy.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --output_dir runs/trl-gsm8k

and eight GPUs (accelerate starts one process per GPU; every GRPOConfig field is a flag; not run by us):

    accelerate launch --num_processes 8 trl_entropy.py --model Qwen/Qwen2.5-Math-1.5B --task math_train.jsonl \
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 3000 --output_dir runs/trl-math

On a CPU add `--use_cpu true --bf16 false` (the test runs the command line that way on a tiny model).

What we verified and what we did not (tests/test_trl_entropy.py, trl 1.16.0, CPU, one process): the
advantages that reach TRL's loss equal `advantage.entropy_shaped_advantages` on response tokens;
alpha = 0 gives TRL's own loss exactly; the batch TRL hands in is left as it was; `entropies` is the
entropy of softmax(logits / temperature), the distribution the rollout sampled from. Untested here:
several processes, DeepSpeed, vLLM generation, and other TRL versions (the class overrides two
private methods; see the note at the end of the class).

How our names map to TRL's: response = completion, group_size = num_generations, kl_coef = beta,
eps_low / eps_high = epsilon / epsilon_high, prompts_per_step x group_size = the generation batch.
"""

import torch
from trl import GRPOConfig, GRPOTrainer

# -----------------------------------------------------------------------------------------------
# The trainer: TRL's loss, with the advantages shaped in flight
#
# Where the line has to go. TRL's `_compute_loss(model, inputs)` does, in order:
#   1) one forward of the policy over prompt + completion, through `_get_per_token_logps_and_entropies`,
#      which returns the log-probs and the entropies H_t of the *current* policy;
#   2) `advantages = inputs["advantages"]`: one number per completion, shape (B,), or (B, T) if a
#      subclass put one there (TRL unsqueezes only 1-D advantages, exactly to allow this);
#   3) the clipped surrogate, the loss aggregation, the metrics.
# The paper's term needs H_t from step 1 and must be in place before step 2. Copying the ~250 lines
# of `_compute_loss` to insert one line would freeze us to one TRL release; instead we let the stock
# method run and hook the forward it calls: when step 1 returns, we replace the advantages of the
# batch that step 2 is about to read.


class EntropyAdvantageGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss uses A_t + min(alpha * H_t.detach(), |A_t| / kappa) on every completion token."""

    def __init__(self, *args, alpha: float = 0.4, kappa: float = 2.0, **kwargs):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (got {alpha}): 0.4 with GRPO as in the paper, 0 = TRL's own loss")
        if kappa <= 1:
            raise ValueError(f"kappa must be > 1 (got {kappa}) so the bonus cannot flip an advantage's sign; the paper uses 2")
        super().__init__(*args, **kwargs)
        self.alpha, self.kappa = alpha, kappa
        self._batch = None  # the batch of the loss being computed right now; None at any other time

    def _compute_loss(self, model, inputs):
        # A shallow copy, so we can swap its "advantages" entry without touching the caller's dict:
        # with num_iterations > 1 TRL buffers the batch and feeds it to the loss again, and a shaped
        # batch fed back would be shaped twice.
        self._batch = dict(inputs)
        try:
            return super()._compute_loss(model, self._batch)
        finally:
            self._batch = None  # an exception in the loss must not leave a batch for a later forward

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, *rest = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        # TRL calls this forward elsewhere too (old and reference log-probs, without entropies). Only
        # the loss's own forward finds self._batch set, and it takes it, so the shaping happens once.
        batch, self._batch = self._batch, None
        if batch is not None and entropies is not None and self.alpha > 0:
            batch["advantages"] = self.shape_advantages(batch["advantages"], entropies, batch["completion_mask"])
        return (logps, entropies, *rest)

    def shape_advantages(self, adv, entropies, completion_mask):
        """(B,) or (B, T) advantages, (B, T) entropies and mask -> (B, T) shaped advantages."""
        mask = completion_mask.bool()  # (B, T): 1 on completion tokens, 0 on the padding after them
        if adv.dim() == 1:  # GRPO: one advantage per completion, the same for all its tokens
            adv = adv.unsqueeze(1).expand_as(entropies)  # (B, T)
        # psi_t = min(alpha * H_t, |A_t| / kappa). Detached: H_t only sets how hard this token is pushed;
        # the gradient must not try to raise the entropy (that would be entropy regularisation, TRL's
        # `entropy_coef`, which is the paper's baseline, not its method).
        psi = torch.minimum(self.alpha * entropies.detach(), adv.abs() / self.kappa)  # (B, T)
        # where(), not psi * mask: the entropy at a padded position can be anything, even nan
        psi = torch.where(mask, psi, 0.0)
        self._log_shaping(psi, adv, mask)
        return adv + psi

    def _log_shaping(self, psi, adv, mask):
        """psi_mean (over completion tokens) and psi_ratio (mean psi/|A| where A != 0), summed over processes."""
        has_adv = mask & (adv != 0)  # groups whose rewards were all equal carry no advantage to shape
        sums = torch.stack([psi[mask].sum(), mask.sum(), (psi[has_adv] / adv[has_adv].abs()).sum(), has_adv.sum()]).float()
        sums = self.accelerator.reduce(sums, reduction="sum")  # one number for the whole step, not one per GPU
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy_adv/psi_mean"].append((sums[0] / sums[1].clamp(min=1)).item())
        self._metrics[mode]["entropy_adv/psi_ratio"].append((sums[2] / sums[3].clamp(min=1)).item())

    # Version note. Read and run against trl 1.16.0. Older (0.x) releases may unsqueeze the advantages
    # unconditionally, or send `use_liger_loss` runs through a fused loss that never calls
    # `_compute_loss`; there, copy `_compute_loss` and add psi before the clipped surrogate.


# The paper's Appendix B in TRL's words: no KL (beta 0), clip-higher (epsilon 0.2 / epsilon_high 0.28),
# the token-level loss mean ("dapo"), no entropy regularisation, every token trained, lr 1e-6, 8 samples.
PAPER_SETTINGS = dict(beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", entropy_coef=0.0,
                      top_entropy_quantile=1.0, learning_rate=1e-6, temperature=1.0, num_generations=8)


def paper_config(**overrides) -> GRPOConfig:
    """GRPOConfig with PAPER_SETTINGS; any field can be overridden (on CPU: use_cpu=True, bf16=False)."""
    return GRPOConfig(**{**PAPER_SETTINGS, **overrides})


# -----------------------------------------------------------------------------------------------
# The command line: one of our tasks, our grader as the reward


def reward_function(max_completion_length: int, eos_token_id: int):
    """train.py's default reward for TRL: 1 for a right answer that finished, 0 otherwise. A
    completion cut off at max_completion_length is wrong, as in train.py and evaluate.py
    (grader.grade_response). TRL hands the reward each completion's token ids up to and including
    its first stop token, so one shorter than the budget, or ending on EOS, finished."""
    from grader import grade_response

    def correct(completions, answer, completion_ids, **kwargs):  # TRL passes the dataset's columns by name
        stopped = [len(ids) < max_completion_length or (len(ids) > 0 and ids[-1] == eos_token_id)
                   for ids in completion_ids]
        return [float(grade_response(c, a, s)) for c, a, s in zip(completions, answer, stopped)]

    return correct


def main(argv=None):
    """Train on --task with train.py's default reward (grader.grade_response). Flags: ours below, and every GRPOConfig field."""
    from dataclasses import dataclass

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import TrlParser

    # this repository's files: only the command line needs them
    from tasks import load_problems
    from rollout import format_prompt

    @dataclass
    class ScriptArguments:
        model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id or a local folder (e.g. a checkpoint train.py saved)
        task: str = "gsm8k"  # as train.py's --task: arith, gsm8k, math500 or a local .jsonl/.json/.parquet file
        limit: int = 0  # use only the first this many training problems; 0 = all
        alpha: float = 0.4  # the entropy term; 0 = TRL's own GRPO
        kappa: float = 2.0

    parser = TrlParser((ScriptArguments, GRPOConfig))
    parser.set_defaults(output_dir="runs/trl", **PAPER_SETTINGS)  # TRL's own defaults differ (e.g. no clip-higher)
    script, config = parser.parse_args_and_config(argv)
    tokenizer = AutoTokenizer.from_pretrained(script.model)
    problems = load_problems(script.task, split="train", limit=script.limit or None)
    # Prompts as finished text (our chat template and system prompt), so TRL and train.py see the same input.
    data = Dataset.from_list([{"prompt": format_prompt(tokenizer, p.question), "answer": p.answer} for p in problems])

    correct = reward_function(config.max_completion_length, tokenizer.eos_token_id)
    trainer = EntropyAdvantageGRPOTrainer(model=script.model, reward_funcs=correct, args=config, train_dataset=data,
                                          processing_class=tokenizer, alpha=script.alpha, kappa=script.kappa)
    trainer.train()
    trainer.save_model(config.output_dir)
    return trainer


if __name__ == "__main__":
    main()

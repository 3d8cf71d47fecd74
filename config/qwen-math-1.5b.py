# Qwen2.5-Math-1.5B on MATH, the paper's recipe where it fits one 80 GB GPU (docs/one-gpu.md)
#
#   python train.py --preset qwen-math-1.5b                                            # the entropy run (alpha 0.4)
#   python train.py --preset qwen-math-1.5b --alpha 0 --out_dir runs/qwen-math-1.5b-plain  # its plain-GRPO baseline
#   python train.py --preset qwen-math-1.5b --prompts_per_step 16                      # on a 40 GB GPU
#
# Scaled down from the paper: 32 prompts x 8 answers per step instead of 512 x 8 (one GPU, not a
# cluster), 3,000 response tokens instead of 8K (Qwen2.5-Math's context is 4K tokens), 4 mini-batches
# per rollout instead of 16. 1.54B parameters: 23 GiB of training state; 28 KiB of KV cache per token,
# so 256 rows x 3,300 tokens is 23 GiB.
# Read as values, never run: only `name = value` lines, each a train.py option (python train.py --help).

model = "Qwen/Qwen2.5-Math-1.5B"
# MATH's train split as JSONL (`problem`, `solution` with a \boxed{} answer), made once with
# datasets.load_dataset("DigitalLearningGmbH/MATH-lighteval", split="train").to_json("math_train.jsonl")
task = "math_train.jsonl"
eval_task = "math500"  # held out: MATH-500, the paper's benchmark
out_dir = "runs/qwen-math-1.5b"

# rollout: 32 prompts x 8 answers = 256 rows a step, answers up to 3,000 tokens
max_new_tokens = 3000
prompts_per_step = 32
group_size = 8

# optimisation: 4 optimiser steps per rollout, at the paper's learning rate; long answers need
# whole blocks recomputed in backward to fit
mini_batches = 4
gradient_checkpointing = True
lr = 1e-6
steps = 500

# evaluation: greedy pass@1 on MATH-500 at the start, every 100 steps, and at the end
eval_problems = 500
eval_every = 100

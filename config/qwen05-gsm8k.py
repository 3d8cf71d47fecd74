# Qwen2.5-0.5B-Instruct on GSM8K, on one GPU (docs/one-gpu.md)
#
#   python train.py --preset qwen05-gsm8k                                          # the entropy run (alpha 0.4)
#   python train.py --preset qwen05-gsm8k --alpha 0 --out_dir runs/qwen05-gsm8k-plain   # its plain-GRPO baseline
#
# 0.49B parameters: 7.4 GiB of training state (16 bytes a parameter); 12 KiB of KV cache per token,
# so 512 rows x 576 tokens is 3.4 GiB. On a 24 GB card add --gradient_checkpointing true.
# Read as values, never run: only `name = value` lines, each a train.py option (python train.py --help).

model = "Qwen/Qwen2.5-0.5B-Instruct"
task = "gsm8k"
out_dir = "runs/qwen05-gsm8k"

# rollout: 64 prompts x 8 answers = 512 rows a step, answers up to 512 tokens
max_new_tokens = 512
prompts_per_step = 64
group_size = 8

# optimisation: 4 optimiser steps per rollout (so the clip acts), at the paper's learning rate
mini_batches = 4
lr = 1e-6
steps = 200

# evaluation: greedy pass@1 on 500 GSM8K test problems at the start, every 50 steps, and at the end
eval_problems = 500
eval_every = 50

"""
plumbing/ -- the bookkeeping around the method: code a run needs, and the method does not.

A student never needs to open this folder to follow the method. train.py's loop, update.py,
advantage.py and rollout.py are the algorithm; what lives here is what makes one run of it a
program you can start, stop and read back:

    precision.py     --device and --dtype: where the run computes, and under which autocast
    run_folder.py    one run per folder: refuse a folder that holds another run, its lock
    checkpoints.py   save a checkpoint, check a --resume, restore a run exactly where it stopped
    metrics.py       what a run reports: metrics.jsonl, TensorBoard or W&B, warnings, plots
    command_line.py  train.py's --name value flags, presets and --help, check_config, and the
                     parser and checks evaluate.py, entropy_view.py and bench.py share
    load.py          model files in and out: a hub id, a folder or a .gguf file; save_pretrained
"""

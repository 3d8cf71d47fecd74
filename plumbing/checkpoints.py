"""
plumbing/checkpoints.py -- a run's checkpoint: saved, checked before a resume, restored.

    save_checkpoint()   a folder transformers can load, plus the RNG state and, to resume from,
                        the optimiser's (a final checkpoint: only with --keep_optimizer)
    check_resume()      refuse a --resume that cannot continue, before anything slow starts
    restore()           continue a run from its checkpoint, exactly where it stopped

Each function takes train.py's Config as `cfg`.
"""

import dataclasses
import json
import os
import pickle
import random
import shutil

import torch

from plumbing.load import save_pretrained
from update import Learner


def save_checkpoint(folder, cfg, step, model, tokenizer, actor: Learner, critic: Learner | None = None, skipped_total=0):
    """A folder transformers can load (config.json, model.safetensors, tokenizer), plus our state.

    What a resume needs besides the weights, the optimiser state and PPO's critic (its weights
    and optimiser), is kept in every checkpoint before the last step (--save_every, Ctrl-C), which
    exists to resume; the final one (step cfg.steps) keeps it only with --keep_optimizer: AdamW
    keeps two numbers per weight, so that is twice the model's size, more with a critic, and a
    finished run is mostly used for its weights. trainer_state.pt holds tensors and plain values
    only, so a resume reads it with weights_only.

    Written into folder + ".tmp" and renamed into place only when complete: a save interrupted
    (a second Ctrl-C, a full disk) leaves the previous checkpoint whole. cfg is saved as given, with
    alpha and critic_lr unset where they were, so a resume re-derives them. skipped_total: the
    optimiser updates (actor's and critic's) skipped so far, for a gradient norm not finite."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier interrupted save
    save_pretrained(model, tokenizer, tmp)
    # python's RNG state is a tuple (version, 625 ints, gauss): plain values, as weights_only wants
    state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "skipped_updates_total": skipped_total}
    resumable = step < cfg.steps or cfg.keep_optimizer
    if resumable:
        state.update(optimizer=actor.optimizer.state_dict(), scaler=actor.scaler.state_dict())
    if resumable and critic is not None:
        state.update(critic=critic.net.state_dict(), critic_optimizer=critic.optimizer.state_dict(),
                     critic_scaler=critic.scaler.state_dict())
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    # a folder cannot be replaced in one rename: move the old one aside, the new one in, then delete
    if os.path.isdir(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def check_resume(cfg):
    """A checkpoint folder train.py wrote, of the same model and algorithm: those two cannot change
    mid-run (the weights and the optimiser state belong to them), and with steps left to run (or its
    final evaluation, when that was cut short). Every other flag given now applies."""
    if not cfg.resume:
        return
    old = os.path.normpath(cfg.resume) + ".old"
    if not os.path.exists(cfg.resume) and os.path.isfile(os.path.join(old, "trainer_state.pt")):
        # save_checkpoint moves the previous checkpoint aside before moving the new one in: a crash
        # between the two renames leaves the previous one whole, under this name
        raise ValueError(f"--resume {cfg.resume}: its last save was cut short; the checkpoint before it is whole in "
                         f"{old}: pass --resume {old}")
    for name in ("train_config.json", "trainer_state.pt", "model.safetensors"):
        if not os.path.isfile(os.path.join(cfg.resume, name)):
            raise ValueError(f"--resume {cfg.resume}: no {name} there; pass a checkpoint folder train.py wrote, "
                             "e.g. runs/default/checkpoint")
    saved = json.load(open(os.path.join(cfg.resume, "train_config.json")))
    for key in ("model", "algo"):
        if saved.get(key) != getattr(cfg, key):
            raise ValueError(f"--resume {cfg.resume} continues a run of --{key} {saved.get(key)}; it cannot switch to "
                             f"--{key} {getattr(cfg, key)}: start a new run (no --resume) for that")
    # mmap: the tensors stay on disk, only the structure is read (the step, which keys are there)
    state = read_trainer_state(cfg.resume, mmap=True, map_location="cpu")
    # a finished run (its summary.json written) has nothing left to do: resumed, it would only
    # evaluate again, log a second final row and write a new summary over the first. A run stopped
    # in its final evaluation may finish it.
    step, run_dir = state["step"], os.path.dirname(os.path.normpath(cfg.resume))
    finished = os.path.isfile(os.path.join(run_dir, "summary.json"))
    if step > cfg.steps or (step == cfg.steps and finished):
        raise ValueError(f"--resume {cfg.resume}: that run is at step {step}, "
                         f"{'past' if step > cfg.steps else 'finished at'} --steps {cfg.steps}; "
                         f"to train it further pass --steps N with N > {step}")
    if "optimizer" not in state and step < cfg.steps:  # steps to train need the optimiser's moments
        raise ValueError(f"--resume {cfg.resume}: a final checkpoint has no optimiser state "
                         "(unless trained with --keep_optimizer true): start a new run from its "
                         f"weights with --model {cfg.resume}, or train it again with "
                         "--keep_optimizer true")


def read_trainer_state(folder: str, **load_options) -> dict:
    """trainer_state.pt, read as tensors and plain values only (weights_only): unpickling any other
    object runs code its author chose, and checkpoints get shared."""
    try:
        path = os.path.join(folder, "trainer_state.pt")
        return torch.load(path, weights_only=True, **load_options)
    except pickle.UnpicklingError:
        raise ValueError(f"--resume {folder}: its trainer_state.pt holds pickled objects, "
                         "not only tensors and plain values, and loading them could run any "
                         "code: resume only from checkpoints train.py wrote, or start a new run "
                         f"from its weights with --model {folder}") from None


def keep_metrics_up_to(out_dir: str, step: int):
    """On resume into the run's own folder: drop rows logged after the checkpoint (steps that ran
    on after the last save and are about to run again), so no step appears twice."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(path):
        rows = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def restore(cfg, actor: Learner, critic: Learner | None = None) -> tuple:
    """Load a checkpoint's optimiser, RNG and critic state -> (step, skipped_updates_total). The
    flags given now win: the learning rates and weight decay are set on the restored optimisers."""
    state = read_trainer_state(cfg.resume)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "optimizer" in state:  # not in a final checkpoint: then only its cut-short final evaluation is left
        actor.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # float16 runs only: the gradient scaler's current factor
        actor.scaler.load_state_dict(state["scaler"])
    if critic is not None and "critic" in state:
        critic.net.load_state_dict(state["critic"])
        critic.optimizer.load_state_dict(state["critic_optimizer"])
        if state.get("critic_scaler"):
            critic.scaler.load_state_dict(state["critic_scaler"])
    for learner, lr in ((actor, cfg.lr), (critic, cfg.critic_lr)):
        for group in learner.optimizer.param_groups if learner is not None else []:
            group.update(lr=lr, weight_decay=cfg.weight_decay)
    if os.path.realpath(os.path.dirname(os.path.normpath(cfg.resume))) == os.path.realpath(cfg.out_dir):
        keep_metrics_up_to(cfg.out_dir, state["step"])
    print(f"resumed from {cfg.resume} at step {state['step']}")
    skipped = state.get("skipped_updates_total", state.get("skipped_steps", 0))  # older: that name
    return state["step"], skipped

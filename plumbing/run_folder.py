"""
plumbing/run_folder.py -- one run per folder: a run's out_dir, refused while it holds another run,
and locked while a run writes to it.

train() uses it in this order: check_out_dir (before anything slow starts: the refusal costs a
second), claim_out_dir (create it, take its lock), and on every way out release_out_dir;
resume_hint says what to run next after a Ctrl-C. Each function takes train.py's Config as `cfg`.
"""

import os
import shutil

RUN_FILES = ("metrics.jsonl", "checkpoint", "summary.json")  # what marks a folder as holding a run
LOCK = "train.lock"  # holds the PID of the run writing to the folder


def lock_holder(out_dir: str) -> int | None:
    """The PID of another live run holding out_dir's lock, or None (no lock, or a stale one)."""
    try:
        pid = int(open(os.path.join(out_dir, LOCK)).read().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None  # ours: left by an earlier train() in this same process
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None  # its run died without cleaning up: the lock is stale, take it over
    except PermissionError:
        pass  # it exists, under another user
    return pid


def check_out_dir(cfg):
    """One run per folder: refuse a file, a folder another live run writes to, and a folder that holds
    another run, unless we resume that run (--resume OUT/checkpoint) or replace it (--overwrite)."""
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out_dir {out} is a file: name a folder")
    pid = lock_holder(out)
    if pid is not None:
        raise ValueError(f"another run (PID {pid}) is writing to {out}: wait for it to end, or pass another --out_dir")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    resuming_here = cfg.resume and os.path.realpath(os.path.dirname(os.path.normpath(cfg.resume))) == os.path.realpath(out)
    if found and not (resuming_here or cfg.overwrite):
        raise ValueError(f"{out} holds another run ({', '.join(found)}): continue it with --resume "
                         f"{os.path.join(out, 'checkpoint')}, replace it with --overwrite true, or pass another --out_dir")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out_dir {out}: {parent} is {'a file' if not os.path.isdir(parent) else 'not writable'}; "
                         "pass another --out_dir")


def claim_out_dir(cfg):
    """Create out_dir, take its lock and, with --overwrite, clear the run that was there."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite:
        for name in RUN_FILES + ("plots.png", "checkpoint.tmp", "checkpoint.old"):
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    with open(os.path.join(cfg.out_dir, LOCK), "w") as f:
        f.write(str(os.getpid()))


def resume_hint(cfg) -> str:
    """After a Ctrl-C outside the steps (while loading or evaluating): what to run next."""
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    if os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        return f"the last checkpoint is whole: continue with --resume {ckpt}"
    if cfg.resume or not os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")):
        return "no checkpoint was saved: run the same command again"
    return f"no checkpoint was saved: start again with --overwrite true (it clears {cfg.out_dir})"


def release_out_dir(cfg):
    try:
        os.remove(os.path.join(cfg.out_dir, LOCK))
    except OSError:
        pass


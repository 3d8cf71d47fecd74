"""
runs.py -- the bookkeeping around train.py's loop: where it computes, on what, what it keeps, how it resumes.

Nothing here is the algorithm (that is advantage.py and train.py); this is what one run needs
around it, in the order train() uses it:

    choose_precision()        --device and --dtype -> a Precision: the device, and the autocast to run under
    check_out_dir() ...       one run per folder: refuse a folder that holds another run, lock ours
    load_tasks()              the training problems and the held-out ones, never the same
    batches_of_problems()     each step's prompts, in an order a resumed run repeats
    check_resume(), restore() continue a run from its checkpoint, exactly where it stopped
    save_checkpoint()         a folder transformers can load, plus the RNG state and, to resume
                              from, the optimiser's (a final checkpoint: only with --keep_optimizer)

What a run reports while it runs (metrics.jsonl, warnings, plots) is metrics.py. Each function here
takes train.py's Config as `cfg` where it needs settings.
"""

import dataclasses
import json
import os
import pickle
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tasks import held_out_split, is_local_task, load_problems
from load import pick_device, save_pretrained
from update import Learner

# -----------------------------------------------------------------------------------------------
# Device and precision


@dataclass
class Precision:
    """Where the run computes, and in what: float32 weights (Adam's small updates vanish in bfloat16)
    under autocast to amp_dtype, or plain float32 (amp_dtype None)."""

    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self):
        """A fresh autocast context (a no-op in float32). train.py, experiment.py and update.py use it."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    @property
    def name(self) -> str:
        """"float32" or e.g. "bfloat16 autocast": what summary.json records."""
        return f"{str(self.amp_dtype)[6:]} autocast" if self.amp_dtype else "float32"

    def describe(self) -> str:
        """The line train.py prints at start."""
        scaler = ", gradient scaler" if self.amp_dtype == torch.float16 else ""
        return f"device {self.device}, precision: {self.name}{scaler}"


def choose_precision(device: str, dtype: str) -> Precision:
    """--device (see model.pick_device) and --dtype -> Precision; its autocast dtype is what this
    processor is fast at, unless --dtype names one (float32: none).

    GPUs, by compute capability: 8.0 and up (A100, H100, RTX 30xx/40xx) compute in bfloat16.
    7.x (V100, T4: free Colab and many classrooms) has float16 tensor cores but no bfloat16, so
    float16 autocast with a gradient scaler (see update.Learner): float16 keeps 3 more digits than bfloat16
    but overflows past 65504, which the forward avoids where it matters (norms, softmax and the
    loss run in float32) and the scaler handles for gradients. Below 7.0 (P100, K80) float32:
    without tensor cores float16 buys no speed, only the overflow risk.
    CPUs differ wildly, and the processor's features decide, never a timing (a timing taken under
    load picks otherwise than one taken idle, and the same command then gives other numbers): with
    native bfloat16 matmuls (AVX512-BF16 or AMX) bfloat16 autocast was about 2x faster than float32
    on an AMX Xeon; without them (an AVX2-only CPU) about 7x *slower*, so float32 there.
    (float16 on a CPU is there to be asked for, --dtype float16, not picked: few CPUs are fast at it.)
    """
    device = pick_device(device)
    if dtype != "auto":
        return Precision(device, None if dtype == "float32" else getattr(torch, dtype))
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return Precision(device, torch.bfloat16 if major >= 8 else torch.float16 if major >= 7 else None)
    return Precision(device, torch.bfloat16 if cpu_multiplies_bfloat16() else None)


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has native bfloat16 matmul instructions, AVX512-BF16 or AMX (torch's own
    checks; a torch without them: False, float32)."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)

# -----------------------------------------------------------------------------------------------
# The problems: which ones train, which ones are held out


def batches_of_problems(problems, batch_size: int, seed: int, step: int):
    """The prompts of step `step`: epochs over a seeded shuffle, so a resumed run sees the same order."""
    per_epoch = len(problems) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [problems[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def load_tasks(cfg, problems=None) -> tuple:
    """(training problems, held-out problems), checked before the model loads. A single local file
    has no test split: a fixed share of its rows is held out and never trained on (held_out_split)."""
    if problems is None:
        if is_local_task(cfg.task) and not cfg.eval_task:
            problems = held_out_split(load_problems(cfg.task, **fields_of(cfg)))[0]
        else:
            problems = load_problems(cfg.task, split="train", seed=cfg.seed, **fields_of(cfg))
    held_out = held_out_problems(cfg) if cfg.eval_problems else []
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.task}: {len(problems)} training problems, fewer than one step's --prompts_per_step "
                         f"{cfg.prompts_per_step}: lower it or add problems")
    if cfg.eval_problems and not held_out:
        raise ValueError(f"{cfg.eval_task or cfg.task} gave no held-out problems: pass --eval_task FILE, or --eval_problems 0")
    return problems, held_out


def held_out_problems(cfg) -> list:
    """The first eval_problems of the test split of --eval_task, else of --task; of a single local
    file, of its held-out share. "Held-out" is never the training set. (experiment.py uses it too.)"""
    if is_local_task(cfg.task) and not cfg.eval_task:
        return held_out_split(load_problems(cfg.task, **fields_of(cfg)))[1][: cfg.eval_problems]
    return load_problems(cfg.eval_task or cfg.task, split="test", limit=cfg.eval_problems, seed=cfg.seed, **fields_of(cfg))


def fields_of(cfg) -> dict:
    """The field names of a local task file, where given."""
    return dict(question_field=cfg.question_field or None, answer_field=cfg.answer_field or None)


# -----------------------------------------------------------------------------------------------
# Checkpoints, and one run per folder


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

"""train.py: it learns, it resumes exactly, it writes what it promises, it refuses bad settings."""

import json
import math
import os
import re

import pytest
import torch

import tasks
import train
import update
from fast import micro_batches
from plumbing import checkpoints, precision, run_folder
from plumbing.load import load_model
from train import Config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def tiny_config(tmp_path, folder, **kw):
    base = dict(model=folder, out_dir=str(tmp_path / "run"), dtype="float32", device="cpu", progress=False,
                prompts_per_step=4, group_size=4, max_new_tokens=4, steps=2, eval_problems=0, lr=1e-3)
    base.update(kw)
    return Config(**base)


def is_digit(text, problem):
    """A trivially learnable reward: answer with one of the 10 digit tokens (chance: 10 in 80)."""
    return float(text[:1].isdigit())


def test_grpo_learns_a_trivial_reward(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, steps=30, lr=1e-2, max_new_tokens=1, prompts_per_step=4, group_size=8)
    train.train(cfg, reward_fn=is_digit)
    rewards = [json.loads(l)["reward"] for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
    assert sum(rewards[:3]) / 3 < 0.4  # near chance (1/8) at the start
    assert sum(rewards[-3:]) / 3 > 0.9, rewards


def test_one_step_changes_every_parameter(tmp_path, tiny_folder):
    model, tok = load_model(tiny_folder, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tiny_config(tmp_path, tiny_folder, steps=1, group_size=8, max_new_tokens=6)
    reward = lambda text, p: float(len(text) % 2)  # noqa: E731 - any reward with spread in a group
    train.train(cfg, reward_fn=reward, model=model, tokenizer=tok)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_resume_continues_exactly(tmp_path, tiny_folder):
    reward = lambda text, p: float(len(text) % 3 == 0)  # noqa: E731
    train.train(tiny_config(tmp_path / "a", tiny_folder, steps=3), reward_fn=reward)
    train.train(tiny_config(tmp_path / "b", tiny_folder, steps=1, keep_optimizer=True), reward_fn=reward)
    b = tmp_path / "b" / "run"
    cfg = Config(**{**json.load(open(b / "checkpoint" / "train_config.json")), "resume": str(b / "checkpoint"), "steps": 3})
    train.train(cfg, reward_fn=reward)
    a_model, _ = load_model(str(tmp_path / "a" / "run" / "checkpoint"), device="cpu")
    b_model, _ = load_model(str(b / "checkpoint"), device="cpu")
    for (n, p), (_, q) in zip(a_model.named_parameters(), b_model.named_parameters()):
        assert torch.equal(p, q), n
    last = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl")][-1]  # noqa: E731
    assert last(tmp_path / "a" / "run")["reward"] == last(b)["reward"]


def test_command_line_run_writes_metrics_plot_and_a_loadable_checkpoint(tmp_path, tiny_folder, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cli"
    train.main(["--model", tiny_folder, "--out_dir", str(out), "--steps", "2", "--prompts_per_step", "2",
                "--group_size", "4", "--max_new_tokens", "8", "--eval_problems", "4", "--dtype", "float32",
                "--progress", "false"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["kind"] for r in rows] == ["eval", "train", "train", "eval"]
    assert all(0 <= r["truncated"] <= 1 for r in rows if r["kind"] == "eval")  # by the accuracy
    summary = json.load(open(out / "summary.json"))
    assert "start_truncated" in summary and "final_truncated" in summary
    assert capsys.readouterr().out.count("% cut off at 8 tokens") == 2  # start's and end's lines
    for key in ["reward", "zero_spread_groups", "entropy", "psi_mean", "cap_frac", "psi_ratio", "length", "truncated",
                "clip_frac", "grad_norm", "lr", "rollout_s", "step_s"]:
        assert key in rows[1], key
    assert os.path.getsize(out / "plots.png") > 1000
    ckpt = out / "checkpoint"
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ours, _ = load_model(str(ckpt), device="cpu")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    saved = json.load(open(ckpt / "train_config.json"))
    assert saved["steps"] == 2 and saved["group_size"] == 4
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)  # a final one: no --keep_optimizer
    summary = json.load(open(out / "summary.json"))
    assert (summary["precision"], summary["device"]) == ("float32", "cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group_size", "1"], "group_size must be >= 2"),
        (["--kappa", "1"], "kappa must be > 1"),
        (["--lr", "-1e-6"], "lr and --critic_lr must be positive"),
        (["--alpha", "-0.1"], "alpha must be >= 0"),
        (["--lerning_rate", "1e-6"], "unknown option '--lerning_rate'. Valid options: .*--lr"),
        (["--steps", "ten"], "--steps expects an int, got 'ten'"),
        (["--task", "no-such-task", "--model", "/nonexistent/folder"], "no such model folder|unknown task"),
        (["--resume", "/nonexistent"], "no train_config.json"),
    ],
)
def test_bad_config_values_give_one_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--progress", "false"])
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_unknown_task_is_named(tmp_path, tiny_folder, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", tiny_folder, "--task", "no-such-task", "--out_dir", str(tmp_path), "--progress", "false"])
    assert "no-such-task" in capsys.readouterr().err


# --- PPO with a critic (the paper's second algorithm) ------------------------------------------


def test_critic_values_have_response_shape_and_their_loss_falls(tiny_folder):
    from advantage import value_loss
    from model import Critic
    from rollout import sample

    policy, tok = load_model(tiny_folder, device="cpu")
    critic = Critic.from_policy(policy)
    r = sample(policy, tok, ["Question: 1+1?\nAnswer:", "Question: 2*3?\nAnswer:"], group_size=3, max_new_tokens=5, seed=0)
    returns = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])[:, None] * r.response_mask  # (N, R): one return per prompt
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        v = critic(r)
        assert v.shape == r.response_ids.shape
        loss, _ = value_loss(v, v.detach(), returns, r.response_mask, clip=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert all(p.grad is None for p in policy.parameters())  # the critic's loss never reaches the policy


def test_ppo_learns_a_trivial_reward(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, algo="ppo", alpha=0.1, steps=30, lr=1e-2, critic_lr=1e-2, critic_warmup=2,
                      max_new_tokens=1, prompts_per_step=4, group_size=8)
    train.train(cfg, reward_fn=is_digit)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[:3]) / 3 < 0.4
    assert sum(rewards[-3:]) / 3 > 0.9, rewards
    for key in ["value_loss", "explained_variance", "value_clip_frac"]:
        assert key in rows[-1], key


def test_ppo_command_line_run_and_resume_restore_the_critic(tmp_path, tiny_folder):
    out = tmp_path / "ppo"
    args = ["--model", tiny_folder, "--algo", "ppo", "--alpha", "0.1", "--prompts_per_step", "2", "--group_size", "4",
            "--max_new_tokens", "6", "--eval_problems", "0", "--dtype", "float32", "--progress", "false", "--critic_warmup", "1",
            "--keep_optimizer", "true"]  # the finished run is extended
    train.main(args + ["--out_dir", str(out), "--steps", "2"])
    assert os.path.getsize(out / "plots.png") > 1000
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert "critic" in state and "critic_optimizer" in state
    # resume: an uninterrupted 3-step run equals 2 steps + 1 resumed step, critic included
    train.main(args + ["--out_dir", str(tmp_path / "full"), "--steps", "3"])
    train.main(["--resume", str(out / "checkpoint"), "--steps", "3", "--out_dir", str(out)])
    a = torch.load(tmp_path / "full" / "checkpoint" / "trainer_state.pt", weights_only=True)
    b = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k in a["critic"]:
        assert torch.equal(a["critic"][k], b["critic"][k]), k


# --- correct statistics, safe updates (issue 11) -------------------------------------------------


def test_psi_ratio_and_cap_share_are_means_over_the_tokens_with_an_advantage(tiny_folder):
    """Two groups of 4 rows, the second with equal rewards (A = 0), one micro-batch per group: update()
    must report what shaping_stats says over the whole batch, not half of it."""
    from advantage import shaping_stats
    from rollout import sample, score_responses

    model, tok = load_model(tiny_folder, device="cpu")
    rollout = sample(model, tok, ["Question: 1+1?\nAnswer:", "Question: 2*3?\nAnswer:"], group_size=4,
                     max_new_tokens=6, seed=0)
    cfg = train.resolve_defaults(Config(group_size=4, micro_batch=4, prompts_per_step=2, alpha=0.1))  # the cap binds on some tokens
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # A = 1.5, -0.5 (caps .75, .25), then 0
    adv, _ = train.compute_advantages(cfg, rollout, rewards)
    model.train()
    with torch.no_grad():
        _, ent = score_responses(model, rollout, cfg.temperature)  # the entropies the update will see
    whole = shaping_stats(adv, ent, rollout.response_mask, cfg.alpha, cfg.kappa)
    actor = update.Learner(model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu", enabled=False))
    plan = update.micro_batch_plan(cfg, torch.device("cpu"), [actor])
    stats = train.update(cfg, actor, None, rollout, update.OldScores(adv), plan)
    assert 0 < whole["cap_frac"] < 1
    for key in ("psi_ratio", "cap_frac", "psi_mean"):
        assert stats[key] == pytest.approx(whole[key], abs=1e-5), key
    assert stats["skipped_updates"] == 0


def test_a_non_finite_step_is_skipped_counted_and_warned(tmp_path, tiny_folder, capsys):
    model, tok = load_model(tiny_folder, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tiny_config(tmp_path, tiny_folder, steps=2, keep_optimizer=True)  # extended below
    train.train(cfg, reward_fn=lambda text, p: float("nan"), model=model, tokenizer=tok)  # NaN advantages, NaN gradients
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped_updates_total"] for r in rows] == [1, 2]  # cumulative
    assert [r["grad_norm"] for r in rows] == [None, None]  # no update had a finite norm to average
    assert any("skipped" in w for w in rows[0]["warnings"])
    assert "update(s) skipped" in capsys.readouterr().out
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # never applied
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["skipped_updates_total"] == 2
    # a checkpoint saved before the counter's rename still resumes with its count
    state["skipped_steps"] = state.pop("skipped_updates_total")
    torch.save(state, tmp_path / "run" / "checkpoint" / "trainer_state.pt")
    train.main(["--resume", str(tmp_path / "run" / "checkpoint"), "--steps", "3"])
    last = json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])  # graded: no NaN
    assert (last["step"], last["skipped_updates"], last["skipped_updates_total"]) == (3, 0, 2)


def test_equal_rewards_of_any_value_are_zero_spread_and_move_nothing(tmp_path, tiny_folder):
    """A reward_fn that gives every answer 0.7: no group has a spread, so A = 0 exactly, the loss
    has no gradient and AdamW's step is 0 (weight_decay 0); the record counts the group. (One group
    of 8: in float32 both the mean and the std of eight 0.7s are off by a rounding error.)"""
    model, tok = load_model(tiny_folder, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tiny_config(tmp_path, tiny_folder, steps=1, prompts_per_step=1, group_size=8)
    train.train(cfg, reward_fn=lambda text, p: 0.7, model=model, tokenizer=tok)
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["zero_spread_groups"] == 1.0 and row["skipped_updates"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_grad_norm_is_the_mean_of_the_applied_updates(tiny_folder, monkeypatch):
    """Two mini-batches, the second with NaN advantages: its update is skipped, and the logged
    grad_norm is the first one's norm, not inf or NaN (norms: what clip_grad_norm_ returned)."""
    from rollout import sample

    model, tok = load_model(tiny_folder, device="cpu")
    prompts = ["Question: 1+1?\nAnswer:", "Question: 2*3?\nAnswer:"]
    rollout = sample(model, tok, prompts, group_size=4, max_new_tokens=6, seed=0)
    cfg = train.resolve_defaults(Config(group_size=4, prompts_per_step=2, mini_batches=2))
    rewards = torch.tensor([1.0, 0, 0, 0] + [float("nan")] * 4)  # a group a mini-batch; one broken
    adv, _ = train.compute_advantages(cfg, rollout, rewards)
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    record = lambda *a, **k: norms.append(clip(*a, **k)) or norms[-1]  # noqa: E731
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    actor = update.Learner(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    plan = update.micro_batch_plan(cfg, torch.device("cpu"), [actor])
    stats = train.update(cfg, actor, None, rollout, update.OldScores(adv), plan)
    assert len(norms) == 2 and math.isfinite(norms[0]) and not math.isfinite(norms[1])
    assert stats["skipped_updates"] == 1 and stats["grad_norm"] == pytest.approx(norms[0].item())


def test_defaults_follow_the_algorithm_and_are_printed(tmp_path, tiny_folder, capsys):
    r = train.resolve_defaults
    assert (r(Config()).alpha, r(Config(algo="ppo")).alpha, r(Config(algo="ppo", alpha=0.3)).alpha) == (0.4, 0.1, 0.3)
    assert (r(Config(lr=1e-6)).critic_lr, r(Config(lr=1e-6, critic_lr=5e-6)).critic_lr) == (2e-6, 5e-6)
    train.train(tiny_config(tmp_path, tiny_folder, algo="ppo", steps=1, lr=3e-4), reward_fn=is_digit)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("config:"))
    assert json.loads(line[len("config:"):])["alpha"] == 0.1 and json.loads(line[len("config:"):])["critic_lr"] == 6e-4
    saved = json.load(open(tmp_path / "run" / "checkpoint" / "train_config.json"))
    assert saved["alpha"] is None and saved["critic_lr"] is None  # saved as given: a resume re-derives them


def test_the_critic_trains_in_train_mode(tmp_path, tiny_folder, monkeypatch):
    from model import Critic

    modes, forward = [], Critic.forward
    monkeypatch.setattr(Critic, "forward", lambda self, r: modes.append(self.training) or forward(self, r))
    train.train(tiny_config(tmp_path, tiny_folder, algo="ppo", steps=1), reward_fn=is_digit)
    assert modes and all(modes)


# --- nothing lost, nothing mixed ------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, steps=1)
    train.train(cfg, reward_fn=is_digit)
    with pytest.raises(ValueError, match="holds another run .*--resume .*--overwrite true"):
        train.train(cfg, reward_fn=is_digit)
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, overwrite=True), reward_fn=is_digit)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]  # replaced, not appended


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, tiny_folder):
    import subprocess

    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen(["sleep", "30"])
    try:
        (out / run_folder.LOCK).write_text(str(live.pid))
        with pytest.raises(ValueError, match=f"another run \\(PID {live.pid}\\) is writing to"):
            train.train(tiny_config(tmp_path, tiny_folder, steps=1), reward_fn=is_digit)
    finally:
        live.kill()
        live.wait()
    (out / run_folder.LOCK).write_text(str(live.pid))  # that process is gone now: a stale lock
    train.train(tiny_config(tmp_path, tiny_folder, steps=1), reward_fn=is_digit)
    assert not (out / run_folder.LOCK).exists()  # released at the end


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, tiny_folder, monkeypatch):
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, keep_optimizer=True), reward_fn=is_digit)
    ckpt = tmp_path / "run" / "checkpoint"
    before = {f: (ckpt / f).read_bytes() for f in os.listdir(ckpt)}

    def fail(*a, **k):  # model.safetensors is written by then: the save dies midway
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        model, tok = load_model(tiny_folder, device="cpu")
        actor = update.Learner(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False))
        checkpoints.save_checkpoint(str(ckpt), Config(), 5, model, tok, actor)
    assert {f: (ckpt / f).read_bytes() for f in os.listdir(ckpt)} == before
    monkeypatch.undo()
    train.main(["--resume", str(ckpt), "--steps", "2"])  # and it resumes


def test_a_save_cut_between_its_two_renames_names_the_whole_checkpoint(tmp_path, tiny_folder, capsys):
    """The old checkpoint is moved aside, then the new one moved in: cut in between, only
    checkpoint.old is there. --resume of the usual path says where the whole one is, and it resumes."""
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, keep_optimizer=True), reward_fn=is_digit)
    ckpt = tmp_path / "run" / "checkpoint"
    os.rename(ckpt, str(ckpt) + ".old")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(ckpt), "--steps", "2"])
    assert f"pass --resume {ckpt}.old" in capsys.readouterr().err
    train.main(["--resume", str(ckpt) + ".old", "--steps", "2", "--progress", "false"])
    assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 2


class Payload:
    """An object pickled into a checkpoint: unpickling it runs its __reduce__, here a harmless
    open(path, "w") that leaves a file behind; a shared checkpoint's could run anything."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_holding_pickled_objects_is_refused_in_one_line(tmp_path, tiny_folder, capsys):
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, keep_optimizer=True), reward_fn=is_digit)
    path = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)  # what train.py writes loads as tensors and plain values
    ran = tmp_path / "the payload ran"
    torch.save({**state, "x": Payload(str(ran))}, path)
    capsys.readouterr()  # (the first run's output)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(path.parent), "--steps", "2", "--progress", "false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds pickled objects" in err and f"--model {path.parent}" in err, err
    assert not ran.exists()


def test_a_final_checkpoint_keeps_the_weights_not_the_optimiser(tmp_path, tiny_folder, monkeypatch, capsys):
    """An intermediate checkpoint (--save_every, Ctrl-C) keeps what a resume needs: the optimiser
    state and PPO's critic; a final one keeps the weights, tokenizer and configs (twice smaller
    and more for a real model), and a resume from it is refused in one line naming the fix."""
    saved, save = [], train.save_checkpoint

    def save_and_look(folder, *args, **kw):
        save(folder, *args, **kw)
        state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=True)
        saved.append((set(state), os.path.getsize(os.path.join(folder, "trainer_state.pt")),
                      os.path.getsize(os.path.join(folder, "model.safetensors"))))

    monkeypatch.setattr(train, "save_checkpoint", save_and_look)
    train.train(tiny_config(tmp_path, tiny_folder, algo="ppo", critic_warmup=0, steps=2, save_every=1), reward_fn=is_digit)
    (middle, middle_bytes, weights), *_, (final, final_bytes, _) = saved  # step 1's (--save_every), the final one
    assert {"optimizer", "critic", "critic_optimizer"} <= middle
    assert final == {"step", "torch_rng", "python_rng", "skipped_updates_total"}
    assert final_bytes < 0.05 * middle_bytes and middle_bytes > 2 * weights  # AdamW: 2 numbers a weight; RNG 10 KB
    ckpt, _ = tmp_path / "run" / "checkpoint", capsys.readouterr()
    assert {"config.json", "model.safetensors", "train_config.json", "trainer_state.pt"} <= set(os.listdir(ckpt))
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(ckpt), "--steps", "3", "--progress", "false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no optimiser state" in err and f"--model {ckpt}" in err and "--keep_optimizer true" in err, err


def test_resume_applies_new_flags_and_refuses_what_it_cannot_honour(tmp_path, tiny_folder, capsys):
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, kl_coef=0.1, keep_optimizer=True), reward_fn=is_digit)
    ckpt = str(tmp_path / "run" / "checkpoint")
    for flag, value in (("--model", "other-model"), ("--algo", "ppo")):
        with pytest.raises(SystemExit):
            train.main(["--resume", ckpt, flag, value])
        assert f"cannot switch to {flag} {value}" in capsys.readouterr().err
    train.main(["--resume", ckpt, "--steps", "2", "--lr", "0.5"])
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.5]
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    # the KL reference is the starting model: 0 at the first step, and not 0 at the resumed one
    # (had it been reloaded from the checkpoint, policy and reference would agree there exactly)
    assert rows[0]["kl_ref"] == 0 and rows[1]["kl_ref"] > 0


def test_a_local_task_file_holds_out_a_fixed_share_never_trained_on(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(200)))
    cfg = train.resolve_defaults(Config(task=str(path), eval_problems=100))
    problems, held_out = tasks.load_tasks(cfg)
    assert 5 <= len(held_out) <= 40 and len(problems) + len(held_out) == 200
    assert not {p.question for p in problems} & {p.question for p in held_out}
    assert tasks.load_tasks(cfg)[1] == held_out  # the same split on every run


def test_the_default_reward_gives_a_cut_off_right_answer_0():
    from rollout import Rollout
    from tasks import Problem

    texts = ["12 + 5 = 17, so", "12 + 5 = 17, so", r"so \boxed{17}", r"so \boxed{16}"]  # 3 right
    stopped = torch.tensor([False, True, True, False])  # the first ran into max_new_tokens
    rollout = Rollout(None, None, None, None, None, None, stopped, texts, group_size=4)
    batch = [Problem("What is 12 + 5?", "17", "p0")]
    assert train.grade(None, rollout, batch, "cpu").tolist() == [0.0, 1.0, 1.0, 0.0]
    # a custom reward_fn sees every answer, cut-off ones included, and decides for itself
    custom = train.grade(lambda text, p: float("17" in text), rollout, batch, "cpu")
    assert custom.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_warnings_say_what_looks_wrong(tmp_path, tiny_folder, capsys):
    """Reward 0 for 5 steps (so no spread either), answers cut off, a near-greedy policy; then temperature 0."""
    cfg = tiny_config(tmp_path, tiny_folder, steps=5, max_new_tokens=1, temperature=0.01)
    train.train(cfg, reward_fn=lambda text, p: 0.0)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    said = capsys.readouterr().out
    # entropy from step 1; no spread from 3, and with it the cut-off warning; reward 0 at 5
    assert [len(r["warnings"]) for r in rows] == [1, 1, 3, 3, 4]
    assert said.count("note: an answer cut off at --max_new_tokens 1 scores 0") == 1  # at start
    for words in ("no signal", "were cut off at --max_new_tokens 1", "collapsed", "reward 0 for 5 steps"):
        assert any(words in w for w in rows[-1]["warnings"]), words
        assert said.count(words) == 1, words  # printed once, when it starts
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, temperature=0.0, overwrite=True), reward_fn=is_digit)
    assert any("--temperature 0" in w for w in json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["warnings"])


def test_a_prompt_beyond_the_context_is_refused_with_the_lengths(tmp_path, tiny_folder):
    # the tiny model has 512 positions
    with pytest.raises(ValueError, match=r"longest prompt \(\d+ tokens\) plus --max_new_tokens 600 .* context of 512"):
        train.train(tiny_config(tmp_path, tiny_folder, max_new_tokens=600), reward_fn=is_digit)


# --- precision, micro-batches and recomputation (issue 10) --------------------------------------


def cpu_features(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def test_the_cpu_precision_never_depends_on_a_clock(monkeypatch):
    """The same command, the same numbers: a CPU busy with other work (matmuls that look slow, here
    a clock that runs on by a set time per call after the last matmul, by its dtype) or idle
    (fast) gets the same precision; a probe timing bfloat16 against float32 picked bfloat16 in one
    case and float32 in the other."""
    import time

    cpu_features(monkeypatch, False, False)
    last, matmul = {}, torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: last.update(dtype=a.dtype) or matmul(a, b))
    chosen = []
    for bf16_seconds in (0.05, 0.5):  # a bfloat16 matmul 2x faster than float32's 0.1 s, then 5x slower
        now = [0.0]

        def clock():
            now[0] += bf16_seconds if last.get("dtype") == torch.bfloat16 else 0.1
            return now[0]

        monkeypatch.setattr(time, "perf_counter", clock)
        chosen.append(precision.choose_precision("cpu", "auto").amp_dtype)
    assert chosen == [None, None]  # this CPU has no bfloat16 instructions: float32, however fast it looks


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "float32"), (True, False, "bfloat16 autocast"),
                                                         (False, True, "bfloat16 autocast")])
def test_the_cpu_precision_follows_its_bfloat16_instructions(monkeypatch, avx512_bf16, amx, expected):
    """bfloat16 autocast where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), else float32;
    a --dtype given wins, and a torch without these checks gets float32."""
    cpu_features(monkeypatch, avx512_bf16, amx)
    assert precision.choose_precision("cpu", "auto").name == expected
    assert precision.choose_precision("cpu", "float32").name == "float32"
    assert precision.choose_precision("cpu", "bfloat16").name == "bfloat16 autocast"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert precision.choose_precision("cpu", "auto").name == "float32"


def test_the_precision_chosen_is_printed_and_kept_in_the_summary(tmp_path, tiny_folder, monkeypatch, capsys):
    cpu_features(monkeypatch, False, True)  # an AMX Xeon
    summary = train.train(tiny_config(tmp_path, tiny_folder, dtype="auto", steps=1), reward_fn=is_digit)
    assert "device cpu, precision: bfloat16 autocast" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "summary.json")) == summary
    assert (summary["device"], summary["precision"]) == ("cpu", "bfloat16 autocast")


def test_float16_with_a_gradient_scaler_learns_on_cpu(tmp_path, tiny_folder):
    """--dtype float16 (what T4 and V100 get) runs the gradient-scaler path; CPUs run it too, so the
    suite tests it: the scaler's factor is saved with the checkpoint, and the model still learns."""
    cfg = tiny_config(tmp_path, tiny_folder, dtype="float16", steps=30, lr=1e-2, max_new_tokens=1, group_size=8,
                      keep_optimizer=True)
    train.train(cfg, reward_fn=is_digit)
    rewards = [json.loads(l)["reward"] for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
    assert sum(rewards[-3:]) / 3 > 0.9, rewards
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # an enabled scaler (a disabled one saves {})


def test_auto_micro_batch_on_cpu_is_the_measured_size_and_recompute_stays_off(tmp_path, tiny_folder):
    train.train(tiny_config(tmp_path, tiny_folder, steps=1, prompts_per_step=4, group_size=4), reward_fn=is_digit)
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["micro_batch"] == micro_batches.CPU_MICRO_BATCH and row["recompute"] is False


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_token_mean(tiny_folder, monkeypatch):
    """An out-of-memory error in a mini-batch (faked here: more than 3 rows "do not fit") drops its
    gradients and redoes it with half the rows; the step equals one taken with that size from the start."""
    import rollout as rollout_module
    from rollout import sample

    model, tok = load_model(tiny_folder, device="cpu")
    ro = sample(model, tok, ["1+1?", "2*3?"], group_size=4, max_new_tokens=6, seed=0)
    adv = train.compute_advantages(train.resolve_defaults(Config(group_size=4)), ro, torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1]))[0]
    real_score = rollout_module.score_responses

    def score_or_oom(net, part, temperature):
        if part.response_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("fake: too many rows")
        return real_score(net, part, temperature)

    grads = {}
    for micro_batch in ("auto", "2"):
        net = load_model(tiny_folder, device="cpu")[0].train()
        cfg = train.resolve_defaults(Config(group_size=4, prompts_per_step=2, micro_batch=micro_batch))
        actor = update.Learner(net, torch.optim.SGD(net.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False))
        plan = update.micro_batch_plan(cfg, torch.device("cpu"), [actor])
        monkeypatch.setattr(train, "score_responses", score_or_oom)
        before = [p.detach().clone() for p in net.parameters()]
        stats = train.update(cfg, actor, None, ro, update.OldScores(adv), plan)
        grads[micro_batch] = [b - p.detach() for b, p in zip(before, net.parameters())]  # lr 1: the step is the gradient
        assert stats["micro_batch"] == 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads["auto"], grads["2"]))


def ragged_rollout(model, tok):
    """8 rows: prompts of 2 lengths (left padding), answers cut to 1..6 tokens (right padding)."""
    from rollout import sample

    ro = sample(model, tok, ["1+1?", "What is 12 * 3? Think."], group_size=4, max_new_tokens=6, seed=0)
    lengths = torch.tensor([6, 1, 3, 2, 5, 2, 1, 4])
    cut = torch.arange(6)[None, :] >= lengths[:, None]  # (8, 6)
    ro.response_mask = ro.response_mask.masked_fill(cut, 0.0)
    ro.response_ids = ro.response_ids.masked_fill(cut, tok.pad_token_id or 0)
    return ro


def test_micro_batches_drop_only_padding_columns(tiny_folder):
    """rollout_rows keeps every real token of its rows and cuts only columns that are padding in all of
    them; the log-probs of the cut micro-batch equal those of the whole rollout's forward."""
    from rollout import score_responses

    model, tok = load_model(tiny_folder, device="cpu")
    ro = ragged_rollout(model, tok)
    with torch.no_grad():
        full = score_responses(model, ro)[0]  # (8, 6)
    for rows in ([0, 4], [1, 6], [3, 2, 5]):  # the long prompt's rows only; answers of 1 token; mixed
        idx = torch.tensor(rows)
        part = micro_batches.rollout_rows(ro, idx)
        assert part.prompt_mask.sum() == ro.prompt_mask[idx].sum() and part.response_mask.sum() == ro.response_mask[idx].sum()
        assert part.response_ids.shape[1] == int(ro.response_mask[idx].sum(-1).max())  # cut to the longest answer
        assert part.prompt_mask[:, 0].any()  # no column of left padding shared by all of them is left
        with torch.no_grad():
            logp = score_responses(model, part)[0]  # (n, R')
        assert torch.allclose(logp, full[idx, : logp.shape[1]], atol=1e-5)
    assert micro_batches.rollout_rows(ro, torch.tensor([1, 6])).response_ids.shape[1] == 1
    assert micro_batches.longest_first(ro, slice(0, 4)).tolist() == [0, 2, 3, 1]
    assert micro_batches.longest_first(ro, slice(4, 8)).tolist() == [4, 7, 5, 6]


@pytest.mark.parametrize("fast", [True, False])
def test_update_is_the_same_whatever_the_micro_batch_and_equals_the_whole_loss(tiny_folder, fast, monkeypatch):
    """On ragged rows, the gradient of update() with micro-batches of 1, 3 and 8 rows (fast/'s: cut and
    sorted by length; the reference's: in order, as wide as the rollout) equals the gradient of the
    policy loss over the whole rollout in one forward (SGD, lr 1: the step is the gradient); the
    plan's score() gives the whole forward's old log-probs, row for row."""
    from contextlib import nullcontext

    from advantage import policy_loss
    from rollout import score_responses

    monkeypatch.setattr(update, "FAST", fast)
    model, tok = load_model(tiny_folder, device="cpu")
    ro = ragged_rollout(model, tok)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.0])[:, None].expand(8, 6) * ro.response_mask
    model.train()
    logp, _ = score_responses(model, ro)
    policy_loss(logp, logp.detach(), adv, ro.response_mask)[0].backward()
    reference = [p.grad.clone() for p in model.parameters()]
    plan = update.micro_batch_plan(Config(micro_batch="3"), torch.device("cpu"), [])
    with torch.no_grad():
        old = plan.score(lambda r: score_responses(model, r)[0], ro, nullcontext)  # (8, 6)
    assert torch.allclose(old, logp.detach() * ro.response_mask, atol=1e-5)
    for micro_batch in ("1", "3", "8"):
        net = load_model(tiny_folder, device="cpu")[0].train()
        cfg = train.resolve_defaults(Config(group_size=4, prompts_per_step=2, micro_batch=micro_batch, alpha=0.0, grad_clip=1e9))
        actor = update.Learner(net, torch.optim.SGD(net.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False))
        before = [p.detach().clone() for p in net.parameters()]
        train.update(cfg, actor, None, ro, update.OldScores(adv), update.micro_batch_plan(cfg, torch.device("cpu"), [actor]))
        step = [b - p.detach() for b, p in zip(before, net.parameters())]
        assert all(torch.allclose(s, r, atol=1e-6) for s, r in zip(step, reference)), micro_batch


def test_gpu_probe_sizes_micro_batches_and_turns_recompute_on_only_when_needed(monkeypatch):
    """The GPU logic of MicroBatchPlan, with torch.cuda's memory counters faked: a probe of 8 rows x
    100 tokens that peaks 8 MB above its start costs 10 kB a token; with 1.25 GB free, 80% of it fits
    1,000 rows of 100 tokens. A mini-batch of 2,000 rows then needs recomputation; of 500, not; of 600
    rows 200 tokens wide (the probe's micro-batch was narrower), it does: 500 rows of 200 fit."""
    for mini_batch_rows, width, expect_recompute in ((500, 100, False), (2000, 100, True), (600, 200, True)):
        cuda = {"allocated": 10**9, "peak": 10**9 + 8 * 10**6}
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: cuda["allocated"])
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: cuda["peak"])
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: cuda["allocated"])
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(1.25e9), int(80e9)))
        net = torch.nn.Linear(2, 2)
        net.set_recompute = lambda on: setattr(net, "recomputing", on)
        opt = torch.optim.AdamW(net.parameters())
        opt.state[next(net.parameters())] = {}  # as after a first step: AdamW's moments exist
        for p in net.parameters():
            p.grad = torch.zeros_like(p)  # ... and so do the gradients: nothing more to set aside
        plan = micro_batches.MicroBatchPlan(Config(), torch.device("cuda"), [update.Learner(net, opt, None)])
        assert plan.rows(100) == micro_batches.PROBE_ROWS and net.recomputing is False
        with plan.measure(micro_batches.PROBE_ROWS, 100, mini_batch_rows, width, probe=True):
            pass
        assert net.recomputing is expect_recompute and plan.recompute is expect_recompute
        if not expect_recompute:
            assert plan.bytes_per_token == 10_000 and plan.rows(100) == 1000
        else:
            assert plan.bytes_per_token is None and plan.rows(100) == micro_batches.PROBE_ROWS  # the probe again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_short_run_on_cuda_uses_graphs_and_sizes_its_micro_batches(tmp_path, tiny_folder, algo):
    """The CUDA defaults end to end: graphs recorded once per bucket, a measured micro-batch; with
    2 mini-batches, so that log pi_old is scored before the update (score_all), and PPO's critic."""
    train.train(tiny_config(tmp_path, tiny_folder, device="cuda", dtype="auto", steps=3, eval_problems=4,
                            task="arith", max_new_tokens=8, mini_batches=2, algo=algo), reward_fn=is_digit)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
    assert len(rows) == 3 and all(r["skipped_updates"] == 0 for r in rows) and math.isfinite(rows[-1]["approx_kl"])  # (PPO: after its critic's warm-up)
    assert rows[-1]["cuda_graphs"] <= 2 and rows[-1]["graph_record_s"] > 0  # one bucket for training, one for evaluation
    assert all(r["micro_batch"] >= 1 for r in rows) and rows[-1]["micro_batch"] >= rows[0]["micro_batch"]


def saved_rollout():
    """8 rows (2 groups of 4) of fixed random tokens: prompts of 2 to 5 tokens (left padding),
    answers of 1 to 6 (right padding). Built from a seed, not sampled, so no sampler change moves it."""
    from rollout import Rollout

    g = torch.Generator().manual_seed(7)
    N, P, R = 8, 5, 6
    plen, rlen = torch.tensor([5, 3, 5, 4, 2, 5, 3, 4]), torch.tensor([6, 1, 3, 2, 5, 2, 1, 4])
    prompt_mask = (torch.arange(P)[None] >= (P - plen)[:, None]).long()  # (N, P)
    response_mask = (torch.arange(R)[None] < rlen[:, None]).float()  # (N, R)
    prompt_ids = torch.randint(3, 70, (N, P), generator=g) * prompt_mask
    response_ids = torch.randint(3, 70, (N, R), generator=g) * response_mask.long()
    zeros = torch.zeros(N, R)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, zeros, zeros, torch.ones(N, dtype=torch.bool),
                   ["x"] * N, group_size=4)


def fingerprint(step: torch.Tensor) -> tuple:
    """Two numbers that move with any change to a flat parameter step: its L1 norm and a sum weighted -1 .. 1."""
    step = step.double()
    return float(step.abs().sum()), float((step * torch.linspace(-1, 1, step.numel(), dtype=torch.float64)).sum())


# What one update gave on saved_rollout() before the loop's micro-step block moved into train.py
# (update.py's update(), commit 360eafb): its statistics, and the fingerprints of the actor's step
# and the critic's. The new loop gave the same parameters to the bit on this rollout.
TODAYS_UPDATE = {
    "grpo": ({"approx_kl": 2.6648243874660693e-05, "cap_frac": 0.2916666741172473, "grad_norm": 2.4542025327682495,
              "kl_ref": 2.673765084182378e-05, "psi_mean": 0.3790534610549609, "psi_ratio": 0.45537493874629337},
             (30.251847021922003, -0.10247996812992788), None),
    "ppo": ({"approx_kl": 2.5875865655204205e-05, "cap_frac": 0.625000017384688, "critic_grad_norm": 1.8971288204193115,
             "grad_norm": 2.5920246839523315, "kl_ref": 2.6007493943325244e-05, "psi_mean": 0.3990677036345005,
             "psi_ratio": 0.44076495865980786, "value_loss": 0.3101973030716181},
            (30.312720496818656, -0.06664152311644886), (28.562083289434668, -0.019500691257503422)),
}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_the_update_gives_todays_numbers_on_a_saved_rollout(tiny_folder, algo, fast, monkeypatch):
    """train.py's loop, from the rollout on (score_old_policy, compute_advantages, update), on a saved
    rollout with every term on (2 mini-batches, micro-batches of 3 rows, alpha 0.1 (its cap binds on
    some tokens, not all), KL, entropy_coef; PPO's critic): the statistics and the step of the update made before the micro-step block moved into
    train.py, with fast/'s micro-batches (the default) and with the reference's."""
    import copy

    monkeypatch.setattr(update, "FAST", fast)
    model, _ = load_model(tiny_folder, device="cpu")
    cfg = train.resolve_defaults(Config(algo=algo, group_size=4, prompts_per_step=2, mini_batches=2, micro_batch="3",
                                        kl_coef=0.1, entropy_coef=0.01, lr=1e-3, alpha=0.1))
    actor, critic = update.make_learners(cfg, model, precision.choose_precision("cpu", "float32"))
    learners = [actor] + ([critic] if critic else [])
    critic_before = torch.cat([p.detach().flatten() for p in critic.net.parameters()]) if critic else None
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    ro, before = saved_rollout(), torch.cat([p.detach().flatten() for p in model.parameters()])
    plan = update.micro_batch_plan(cfg, torch.device("cpu"), learners)
    old = update.score_old_policy(cfg, ro, actor, critic, ref_model, plan)
    old.adv, old.returns = train.compute_advantages(cfg, ro, torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1]), old.values)
    stats = train.update(cfg, actor, critic, ro, old, plan)
    expected, actor_step, critic_step = TODAYS_UPDATE[algo]
    # fast/'s plan adds the same numbers in the same order as before (here: the same bits); the
    # reference's micro-batches hold other rows, so its sums round differently, by about 1e-7
    tol = dict(rel=1e-5) if fast else dict(rel=1e-5, abs=1e-5)
    assert {k: stats[k] for k in expected} == pytest.approx(expected, **tol)
    assert stats["skipped_updates"] == 0 and stats["clip_frac"] == 0  # (the ratio barely leaves 1 here)
    assert fingerprint(before - torch.cat([p.detach().flatten() for p in model.parameters()])) == pytest.approx(actor_step, **tol)
    if critic:
        after = torch.cat([p.detach().flatten() for p in critic.net.parameters()])
        assert fingerprint(critic_before - after) == pytest.approx(critic_step, **tol)

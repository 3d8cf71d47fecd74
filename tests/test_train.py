"""train.py: it learns, it resumes exactly, it writes what it promises, it refuses bad settings."""

import json
import os
import re

import pytest
import torch

import train
from model import load_model
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
    train.train(tiny_config(tmp_path / "b", tiny_folder, steps=1), reward_fn=reward)
    b = tmp_path / "b" / "run"
    cfg = Config(**{**json.load(open(b / "checkpoint" / "train_config.json")), "resume": str(b / "checkpoint"), "steps": 3})
    train.train(cfg, reward_fn=reward)
    a_model, _ = load_model(str(tmp_path / "a" / "run" / "checkpoint"), device="cpu")
    b_model, _ = load_model(str(b / "checkpoint"), device="cpu")
    for (n, p), (_, q) in zip(a_model.named_parameters(), b_model.named_parameters()):
        assert torch.equal(p, q), n
    last = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl")][-1]  # noqa: E731
    assert last(tmp_path / "a" / "run")["reward"] == last(b)["reward"]


def test_command_line_run_writes_metrics_plot_and_a_loadable_checkpoint(tmp_path, tiny_folder):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cli"
    train.main(["--model", tiny_folder, "--out_dir", str(out), "--steps", "2", "--prompts_per_step", "2",
                "--group_size", "4", "--max_new_tokens", "8", "--eval_problems", "4", "--dtype", "float32",
                "--progress", "false"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["kind"] for r in rows] == ["eval", "train", "train", "eval"]
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
    assert "optimizer" in torch.load(ckpt / "trainer_state.pt", weights_only=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group_size", "1"], "group_size must be >= 2"),
        (["--kappa", "1"], "kappa must be > 1"),
        (["--lr", "-1e-6"], "lr and --critic_lr must be positive"),
        (["--alpha", "-0.1"], "alpha must be >= 0"),
        (["--lerning_rate", "1e-6"], "unknown option '--lerning_rate'. Valid options: .*--lr"),
        (["--steps", "ten"], "--steps expects a int, got 'ten'"),
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
            "--max_new_tokens", "6", "--eval_problems", "0", "--dtype", "float32", "--progress", "false", "--critic_warmup", "1"]
    train.main(args + ["--out_dir", str(out), "--steps", "2"])
    assert os.path.getsize(out / "plots.png") > 1000
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert "critic" in state and "critic_optimizer" in state
    # resume: an uninterrupted 3-step run equals 2 steps + 1 resumed step, critic included
    train.main(args + ["--out_dir", str(tmp_path / "full"), "--steps", "3"])
    train.main(["--resume", str(out / "checkpoint"), "--steps", "3", "--out_dir", str(out)])
    a = torch.load(tmp_path / "full" / "checkpoint" / "trainer_state.pt", weights_only=False)
    b = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k in a["critic"]:
        assert torch.equal(a["critic"][k], b["critic"][k]), k

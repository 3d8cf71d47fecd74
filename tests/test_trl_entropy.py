"""trl_entropy.py: two real GRPOTrainer steps on a tiny random model, against our own advantage.py.

trl is in requirements.txt (it installs in seconds: accelerate, datasets and transformers are there
already); without it these tests skip with the command that installs it. About 2 s in all on 2 cores.
"""

import copy

import pytest
import torch
from datasets import Dataset

pytest.importorskip("trl", reason="trl is not installed: pip install trl==1.16.0 (trl_entropy.py was read against it)")

from advantage import entropy_shaped_advantages  # noqa: E402
from conftest import char_tokenizer, tiny_hf_model  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import trl_entropy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPERATURE = 0.7  # not 1, so a forgotten division by the temperature would show


def recording(base):
    """`base` with every loss call recorded: the batch TRL hands in (as given, and afterwards), the
    advantages the stock loss read, the entropies of its forward, a reference entropy, and the loss."""

    class Recording(base):
        calls = []
        _call = None

        def _compute_loss(self, model, inputs):
            call = {"inputs": inputs, "adv_object": inputs["advantages"],
                    "before": {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()}}
            with torch.no_grad():  # reference H_t: the entropy of softmax(logits / T), from a plain forward
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                T = inputs["completion_ids"].shape[1]
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1]  # position t predicts token t
                logp = torch.log_softmax(logits.float() / TEMPERATURE, -1)
                call["ref_entropy"] = -(logp.exp() * logp).sum(-1)  # (B, T)
            self._call = call
            loss = super()._compute_loss(model, inputs)
            self._call, call["loss"] = None, loss.detach()
            self.calls.append(call)
            return loss

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            # EntropyAdvantageGRPOTrainer's batch in flight (the stock trainer reads the caller's own)
            batch = getattr(self, "_batch", None) or (self._call or {}).get("inputs")
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if kwargs.get("compute_entropy") and self._call is not None:  # the loss's forward
                self._call["entropies"] = out[1].detach()
                self._call["adv_read"] = batch["advantages"]  # what _compute_loss reads right after this
            return out

    return Recording


def run_two_steps(tmp_path, base, **trainer_kwargs):
    """Two optimiser steps of 2 prompts x 4 completions, from the same random weights every time."""
    tok = char_tokenizer()
    model = tiny_hf_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, seed=0)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    data = Dataset.from_list([{"prompt": f"Question: {a}+{b}?\nAnswer:"} for a in range(2, 6) for b in range(2, 4)])

    def reward(completions, **kwargs):  # any reward with spread inside a group: the parity of the characters' codes
        return [float(sum(map(ord, c)) % 2) for c in completions]

    args = trl_entropy.paper_config(output_dir=str(tmp_path / base.__name__), use_cpu=True, bf16=False, max_steps=2,
                                    per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                                    temperature=TEMPERATURE, learning_rate=1e-2, logging_steps=1, report_to="none",
                                    save_strategy="no", seed=0, disable_tqdm=True)
    cls = recording(base)
    cls.calls = []
    trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok, **trainer_kwargs)
    trainer.train()
    return trainer, cls.calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trl")
    return {"stock": run_two_steps(tmp, GRPOTrainer),
            "alpha0": run_two_steps(tmp, trl_entropy.EntropyAdvantageGRPOTrainer, alpha=0.0),
            "alpha": run_two_steps(tmp, trl_entropy.EntropyAdvantageGRPOTrainer, alpha=0.4, kappa=2.0)}


# --- the checks ---------------------------------------------------------------------------------


def test_two_steps_ran(runs):
    for name, (trainer, calls) in runs.items():
        assert trainer.state.global_step == 2 and len(calls) == 2, name


def test_shaped_advantages_equal_ours_on_response_tokens_and_reach_the_loss(runs):
    for call in runs["alpha"][1]:
        adv, H, mask = call["before"]["advantages"], call["entropies"], call["before"]["completion_mask"].bool()
        expected = entropy_shaped_advantages(adv, H, alpha=0.4, kappa=2.0)  # (B, T), advantage.py
        assert call["adv_read"].shape == H.shape
        assert torch.allclose(call["adv_read"][mask], expected[mask], atol=1e-6, rtol=0)
        assert torch.all(call["adv_read"][~mask] == adv[:, None].expand_as(H)[~mask])  # padding: no bonus
        assert (expected - adv[:, None])[mask].abs().max() > 0.01  # the term did something
        # The loss TRL computed: ratio 1 (one update per rollout), so the "dapo" loss is
        # -sum(A_t over response tokens) / (response tokens in the batch). Checked with our advantages.
        tokens = call["before"]["num_items_in_batch"]
        assert torch.allclose(call["loss"], -expected[mask].sum() / tokens, rtol=1e-5, atol=1e-7)


def test_alpha_zero_is_trls_own_loss_exactly(runs):
    stock, ours = runs["stock"], runs["alpha0"]
    for a, b in zip(stock[1], ours[1]):
        assert torch.equal(a["before"]["completion_ids"], b["before"]["completion_ids"])  # the same samples
        assert torch.equal(a["loss"], b["loss"])
    for (n, p), (_, q) in zip(stock[0].model.named_parameters(), ours[0].model.named_parameters()):
        assert torch.equal(p, q), n
    # and the alpha 0.4 run, from the same samples, computed a different loss
    assert torch.equal(stock[1][0]["before"]["completion_ids"], runs["alpha"][1][0]["before"]["completion_ids"])
    assert not torch.equal(stock[1][0]["loss"], runs["alpha"][1][0]["loss"])


def test_the_callers_batch_is_untouched(runs):
    for call in runs["alpha"][1]:
        assert call["inputs"]["advantages"] is call["adv_object"] and call["adv_object"].dim() == 1
        assert call["inputs"].keys() == call["before"].keys()
        for k, v in call["before"].items():
            assert torch.equal(call["inputs"][k], v) if torch.is_tensor(v) else call["inputs"][k] == v, k


def test_entropies_are_those_of_the_sampling_distribution(runs):
    for call in runs["alpha"][1]:
        mask = call["before"]["completion_mask"].bool()
        assert torch.allclose(call["entropies"][mask], call["ref_entropy"][mask], atol=1e-4)


@pytest.mark.parametrize("kw, message", [({"alpha": -0.1}, "alpha must be >= 0"), ({"kappa": 1.0}, "kappa must be > 1")])
def test_bad_alpha_or_kappa_is_refused_with_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        trl_entropy.EntropyAdvantageGRPOTrainer(model=None, **kw)


def test_the_command_line_trains_one_step_on_our_task(tmp_path, tiny_folder):
    out = tmp_path / "cli"
    trainer = trl_entropy.main(["--model", tiny_folder, "--task", "arith", "--limit", "8", "--max_steps", "1",
                                "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6",
                                "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
                                "--output_dir", str(out), "--disable_tqdm", "true"])
    assert trainer.state.global_step == 1 and trainer.alpha == 0.4 and trainer.args.epsilon_high == 0.28
    assert any("entropy_adv/psi_mean" in row for row in trainer.state.log_history)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("text, ids, expected", [
    ("7 * 8 = 56", [5, 6, 2], 1.0),           # finished before the budget of 4 tokens: graded
    ("7 * 8 = 56", [5, 6, 7, 2], 1.0),        # finished on its last allowed token (2 = EOS)
    ("7 * 8 = 56", [5, 6, 7, 8], 0.0),        # cut off at the budget: wrong, right number or not
    ("7 * 8 = 54", [5, 6, 2], 0.0),           # finished, wrong
])
def test_the_trl_reward_grades_a_cut_off_answer_wrong_as_train_py_does(text, ids, expected):
    correct = trl_entropy.reward_function(max_completion_length=4, eos_token_id=2)
    assert correct(completions=[text], answer=["56"], completion_ids=[ids], trainer_state=None) == [expected]

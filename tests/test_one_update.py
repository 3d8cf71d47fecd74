"""one_update.py, the class demonstration: the pairing (alpha 0 against alpha 0 differs by exactly
nothing), the paper's line where its cap binds everywhere (1.5 A and 0.5 A), the interval's
coverage, the results file, and the refusals of its command line; on a tiny model with a
controllable reward."""

import json
import math
import os

import pytest
import torch

import one_update
import train
from plumbing.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def lower_case_first(text, problem):
    """A reward a random model earns about a third of the time: the answer starts with a-z."""
    return float(text[:1].islower())


def run(tmp_path, folder, seeds=3, **kw):
    base = dict(model=folder, device="cpu", dtype="float32", prompts_per_step=2, group_size=4,
                max_new_tokens=6, temperature=1.0, lr=1e-3, alpha=0.4, eval_problems=0,
                progress=False)
    cfg = train.resolve_defaults(train.Config(**{**base, **kw}))
    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    results = one_update.demonstrate(cfg, list(range(seeds)), 2, str(out),
                                     reward_fn=lower_case_first, model=model, tokenizer=tokenizer)
    return results, out


def test_alpha_zero_against_alpha_zero_differs_by_exactly_nothing(tmp_path, tiny_folder):
    """Both arms plain: the same start, rollout, advantages and optimiser state give the same
    update, so every paired difference is exactly 0 and its interval [0, 0] holds 0. (A broken
    pairing, such as the second arm starting from the first arm's weights, would not.)"""
    results, _ = run(tmp_path, tiny_folder, alpha=0.0)
    used = [r for r in results["records"] if r["used"]]
    assert len(used) >= 2
    for q in one_update.QUANTITIES:
        s, d = results["summary"][q], results["summary"][q]["difference"]
        assert s["alpha0"]["mean"] != 0  # the update did move things ...
        assert all(r["difference"][q] == 0.0 for r in used)  # ... the same way in both arms
        assert (d["low"], d["mean"], d["high"]) == (0, 0, 0)
        assert s["measured_sign"] == 0 and not s["excludes_zero"]


def test_where_the_cap_binds_everywhere_right_gets_1_5_a_and_wrong_0_5_a(tmp_path, tiny_folder):
    """alpha 100: alpha * H exceeds |A| / 2 on every token, so psi = |A| / 2 throughout: right
    answers get 1.5 A, wrong ones 0.5 A, and train.update's own cap-binding share is 1. There the
    update pushes right answers up harder and wrong ones down less than plain GRPO's, on every
    seed of this model. With alpha 0.1 the cap binds on some tokens only: scales between."""
    results, _ = run(tmp_path / "all", tiny_folder, alpha=100.0)
    used = [r for r in results["records"] if r["used"]]
    assert len(used) >= 2
    for r in used:
        scales = (r["shaped_over_adv_right"], r["shaped_over_adv_wrong"], r["cap_frac"])
        assert scales == pytest.approx((1.5, 0.5, 1.0))
        assert r["difference"]["right_logp"] > 0 and r["difference"]["wrong_logp"] > 0
    assert results["summary"]["cap_frac"]["mean"] == pytest.approx(1.0)
    some, _ = run(tmp_path / "some", tiny_folder, alpha=0.1)
    assert 0 < some["summary"]["cap_frac"]["mean"] < 1
    for r in (r for r in some["records"] if r["used"]):
        assert 1 <= r["shaped_over_adv_right"] <= 1.5 and 0.5 <= r["shaped_over_adv_wrong"] <= 1


def test_the_t_interval_covers_the_true_mean_95_percent_of_the_time():
    """Normal data of known mean: 4,000 samples of 8 (the demonstration's seeds) and 1,000 of 40
    (beyond the table: the approximation). Coverage within 1.2 points of 95% (its standard error
    at 4,000 is 0.34 points). The table against scipy's quantiles where scipy is installed."""
    g = torch.Generator().manual_seed(0)
    for n, reps in ((8, 4000), (40, 1000)):
        data = 0.3 + 2.0 * torch.randn(reps, n, generator=g, dtype=torch.float64)
        hits = [(c["low"] <= 0.3 <= c["high"]) for c in map(one_update.t_interval, data.tolist())]
        assert sum(hits) / reps == pytest.approx(0.95, abs=0.012 if n == 8 else 0.02)
    assert one_update.t_interval([1.0, 1.0, 1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert math.isnan(one_update.t_interval([2.0])["low"])
    stats = pytest.importorskip("scipy.stats")
    quantiles = [stats.t.ppf(0.975, df) for df in range(1, 31)]
    assert one_update.T975 == pytest.approx(quantiles, abs=6e-4)


def test_the_results_file_holds_every_seed_and_every_quantity(tmp_path, tiny_folder):
    results, out = run(tmp_path, tiny_folder, seeds=2)
    saved = json.load(open(out / "results.json"))
    assert saved["settings"]["seeds"] == [0, 1] and saved["settings"]["probes"] == 2
    assert len(saved["records"]) == 2
    assert saved["seeds_used"] == sum(r["used"] for r in saved["records"]) >= 1
    arm = {"right_logp", "wrong_logp", "rollout_entropy", "probe_entropy", "grad_norm"}
    for r in saved["records"]:
        if r["used"]:
            assert set(r["alpha0"]) == set(r["alpha"]) == arm
            assert set(r["difference"]) == set(one_update.QUANTITIES)
    for q in one_update.QUANTITIES:
        assert set(saved["summary"][q]) == {"label", "alpha0", "alpha", "difference",
                                            "predicted_sign", "measured_sign", "excludes_zero"}
        assert set(saved["summary"][q]["difference"]) == {"mean", "low", "high", "n"}
    assert {"wall", "cpu"} == set(saved["minutes"])
    text = (out / "results.txt").read_text()
    assert all(label in text for label, _ in one_update.QUANTITIES.values())
    assert "cap-binding share" in text


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1"], "--seeds must be >= 2"),
    (["--group-size", "1"], "--group_size must be >= 2"),
    (["--alpha", "-1"], "--alpha must be >= 0"),
    (["--steps", "3"], "unrecognized arguments: --steps"),
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--model", "/nonexistent/model-folder"], "no such model folder"),
])
def test_bad_input_is_one_line_exit_code_2_and_leaves_no_folder(argv, message, tmp_path, capsys):
    """Refused before anything slow: the model is never loaded, and --out is not even made."""
    with pytest.raises(SystemExit) as stop:
        one_update.main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_results_is_refused_unless_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        one_update.main(["--out", str(out)])
    assert stop.value.code == 2 and "--overwrite true" in capsys.readouterr().err
    cfg, seeds, probes, where = one_update.parse(["--out", str(out), "--overwrite", "true",
                                                  "--seeds", "3"])
    assert (seeds, probes, where) == ([0, 1, 2], one_update.PROBES, str(out))
    assert (cfg.alpha, cfg.lr, cfg.group_size) == (0.4, 1e-5, 8)
    assert os.path.isfile(out / "results.json")  # nothing is deleted before the run writes

"""train.py --log: the numbers of metrics.jsonl also reach TensorBoard (read back from its event
files) and W&B; a missing package is named with its install command before any model loads."""

import importlib.util
import json
import sys
import types

import pytest

import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run_args(folder, out, *extra):
    return ["--model", folder, "--out_dir", str(out), "--steps", "2", "--prompts_per_step", "2", "--group_size", "4",
            "--max_new_tokens", "6", "--eval_problems", "4", "--dtype", "float32", "--progress", "false", *extra]


def jsonl_numbers(out):
    """{(kind/name, step): value} from metrics.jsonl: the reference the other loggers must match."""
    want = {}
    for row in map(json.loads, open(out / "metrics.jsonl")):
        for k, v in row.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                want[(f"{row['kind']}/{k}", row["step"])] = v
    return want


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tiny_folder):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train.main(tiny_run_args(tiny_folder, out, "--log", "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()  # 0 = keep every value
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = jsonl_numbers(out)
    assert ("train/reward", 2) in want and ("eval/accuracy", 0) in want and ("train/psi_mean", 1) in want
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-6), key  # TensorBoard stores float32


def test_wandb_gets_the_same_numbers_offline(tmp_path, tiny_folder, monkeypatch):
    """A stand-in `wandb` module records what train.py sends (the real package needs no account offline,
    but it is not in requirements.txt)."""
    calls = {"log": [], "finish": 0}

    class Run:
        def log(self, numbers, step):
            calls["log"].append((numbers, step))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
    fake.init = lambda **kw: calls.update(init=kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "wb"
    train.main(tiny_run_args(tiny_folder, out, "--log", "wandb"))
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"]["log"] == "wandb"
    assert calls["finish"] == 1
    got = {(tag, step): v for numbers, step in calls["log"] for tag, v in numbers.items()}
    assert got == jsonl_numbers(out)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_package_is_named_before_the_model_loads(backend, monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    # the model folder does not exist: had train.py loaded it first, that error would be the one raised
    with pytest.raises(SystemExit) as stop:
        train.main(["--log", backend, "--model", "/nonexistent/folder", "--out_dir", str(tmp_path / "run"), "--progress", "false"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --log {backend} needs the {backend} package: pip install {backend}\n"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_an_unknown_backend_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--log", "mlflow", "--out_dir", str(tmp_path), "--progress", "false"])
    assert stop.value.code == 2 and "--log must be tensorboard or wandb" in capsys.readouterr().err


def test_plots_show_the_held_out_result_and_a_running_mean_of_the_reward(tmp_path):
    """plots.png: the eval rows as held-out pass@1 with error bars of one standard error, and the
    noisy training reward with its running mean beside the raw points."""
    from matplotlib.container import ErrorbarContainer

    from plumbing.metrics import RUNNING_MEAN, plot_metrics

    rewards = [0.19, 0.5, 0.25, 0.41, 0.31, 0.6, 0.19]
    rows = [{"kind": "eval", "step": 0, "accuracy": 0.25, "accuracy_se": 0.04, "truncated": 0.84}]
    rows += [{"kind": "train", "step": s + 1, "reward": r, "entropy": 0.5, "length": 30.0,
              "psi_ratio": 0.4, "truncated": 0.5} for s, r in enumerate(rewards)]
    rows += [{"kind": "eval", "step": 7, "accuracy": 0.75, "accuracy_se": 0.03, "truncated": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_metrics(str(tmp_path))
    assert (tmp_path / "plots.png").stat().st_size > 1000
    held_out = next(ax for ax in fig.axes if "held-out" in ax.get_title())
    bars = [c for c in held_out.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    data_line, _, (segments,) = bars[0]
    assert data_line.get_xydata().tolist() == [[0, 0.25], [7, 0.75]]
    spans = sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segments.get_segments())
    assert spans == [(0.21, 0.29), (0.72, 0.78)]  # accuracy +- one standard error
    reward = next(ax for ax in fig.axes if "reward" in ax.get_title())
    labelled = {line.get_label(): line.get_ydata().tolist() for line in reward.lines}
    assert labelled["each step"] == rewards
    window = [rewards[max(0, i + 1 - RUNNING_MEAN) : i + 1] for i in range(len(rewards))]
    means = [sum(w) / len(w) for w in window]
    assert labelled[f"running mean of {RUNNING_MEAN} steps"] == pytest.approx(means)
    assert [t.get_text() for t in reward.get_legend().get_texts()] == list(labelled)

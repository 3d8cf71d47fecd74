"""The README's example runs as printed."""

import re

from conftest import ROOT


def test_readme_example_runs_as_printed(capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "load_model(" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" nats | " in line for line in lines)  # 4 answers with their mean entropy
    assert all(float(line.split(" nats")[0]) > 0 for line in lines)

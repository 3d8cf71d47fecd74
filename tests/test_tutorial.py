"""tutorial.ipynb: committed without outputs, and it runs top to bottom (a failing cell fails the suite).

The notebook checks itself as it goes: by-hand entropy, advantages, the paper's line and Pass@K are
asserted equal to the project's functions, and one training step must raise the log-probability of
the right answers against the wrong ones. Executing it is the slowest test here (about 1 to 4
minutes on 2 CPU cores, depending on what else runs); the SmolLM2 weights package is required.
"""

import json
import time

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "tutorial.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code cells"
    dirty = [i for i, c in enumerate(code) if c["outputs"] or c["execution_count"] is not None]
    assert not dirty, f"code cells {dirty} carry outputs: clear them before committing (Jupyter: Edit > Clear Outputs of All Cells)"


def test_every_step_has_its_markdown_before_the_code():
    """Maths before code: the notebook never runs two code cells without words between them, past the set-up."""
    nb = json.loads(NOTEBOOK.read_text())
    kinds = "".join("c" if c["cell_type"] == "code" else "m" for c in nb["cells"])
    assert kinds.startswith("m"), kinds
    assert kinds.count("m") >= 10, kinds
    assert "$$" in "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_the_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat", reason="pip install nbclient ipykernel (in requirements.txt)")
    nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel (in requirements.txt)")
    pytest.importorskip("ipykernel", reason="pip install ipykernel (in requirements.txt)")
    from plumbing.load import _smollm2_gguf

    try:
        _smollm2_gguf()
    except ValueError as e:
        pytest.skip(f"the tutorial runs SmolLM2: {e}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t = time.time()
    # a failing cell raises CellExecutionError, naming the cell and its traceback
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    print(f"tutorial.ipynb ran in {time.time() - t:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for cell in nb.cells:  # every plot drew, inline
        if "plt.show()" in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    assert any("srcdoc=" in o.get("data", {}).get("text/html", "") for o in outputs)  # the coloured tokens

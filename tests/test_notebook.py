"""The tutorial notebook runs from top to bottom (so it never rots) and shows its pictures."""

import pathlib
import re
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_tutorial_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is the kernel of the interpreter running the tests (jupyter_client starts
    # it with sys.executable); the notebook runs in a scratch folder.
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - t0
    print(f"tutorial notebook: {seconds:.1f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # sample images, reconstructions, the perturbation grid
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "test accuracy" in text
    # the pictures come from the shipped model: its accuracy on the notebook's 500 test images
    shipped = re.search(r"test accuracy ([\d.]+)% on the same 500 images", text)
    assert shipped and float(shipped.group(1)) > 85.0, text[-2000:]
    assert "grid: (16, 11, 1, 28, 28)" in text

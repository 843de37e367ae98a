"""The notebooks execute top to bottom (nbclient) and are stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_defense_vs_attack.ipynb", "03_your_own_parts.ipynb",
                                  "04_keyboard.ipynb", "05_decentralized.ipynb"])
def test_notebook_runs(name, tmp_path):
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code"), "store notebooks without outputs"
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    # The kernel sees the devices a user's kernel sees (one CPU device), not the test session's 8 virtual ones.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    client.execute(env={**os.environ, "XLA_FLAGS": flags})  # raises CellExecutionError on any failing cell
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []))
    if name.startswith("02"):
        assert "epsilon" in text and "PSNR" in text
    elif name.startswith("04"):
        assert text.count("Bayes bound") == 2 and text.count("exposure of typed secrets") == 2
    elif name.startswith("05"):
        assert text.count("final test accuracy") == 3 and text.count("loss-threshold AUC by hops: 0:") == 2
        assert text.count("inversion PSNR") == 4 and "ring     round 1: observers [1, 4] of nodes [2, 5], start exact " \
            "[True, True]" in text
    elif name.startswith("03"):
        assert text.count("confidence AUC") == 2 and "loss-threshold AUC" in text
    else:
        assert "final test accuracy" in text

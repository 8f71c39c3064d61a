"""The fine-tuning example notebook runs top to bottom (it trains through a 2-server loopback swarm)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "finetune_ptune.ipynb"


@pytest.mark.timeout(600)
def test_finetune_notebook_reduces_the_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_SWARM_EXAMPLE_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "loss " in printed and " -> " in printed

"""The example notebooks run top to bottom (nbclient), as CI runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.integration


def _run(name: str) -> list[str]:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = ""
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{name}: {cell.source!r} raised {out.get('ename')}: " \
                                                  f"{out.get('evalue')}"
            if out["output_type"] == "stream":
                assert out["name"] != "stderr" or "WARNING" in out["text"], f"{name}: {cell.source!r}: {out['text']}"
                text += out["text"]
            elif "data" in out:
                text += out["data"].get("text/plain", "")
        texts.append(text)
    return texts


@pytest.mark.real_model
def test_quickstart_runs(smollm2_dir: str) -> None:
    out = "\n".join(_run("quickstart.ipynb"))  # SmolLM2 through three local servers
    assert "30 blocks, 3 server(s) online, all blocks covered" in out and "24 tokens in" in out
    assert "The capital of France is Paris." in out and "disconnected" in out


def test_contribute_runs() -> None:
    out = "\n".join(_run("contribute.ipynb"))
    assert "MISSING blocks [4, 5, 6, 7]" in out
    assert "serving (" in out  # automatic placement: where the swarm is thinnest, as many blocks as fit
    assert "all blocks covered" in out and "(this kernel)" in out and "stopped serving" in out

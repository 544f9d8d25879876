"""Execute notebooks/compare.ipynb (nbclient) on a tiny synthetic study written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_compare import write_study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare.ipynb"


def test_compare_notebook_runs_on_a_tiny_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    study = write_study(tmp_path / "study")
    # The kernel inherits this process's environment: the notebook reads the study path from it.
    monkeypatch.setenv("PEFTBENCH_STUDY", str(study))
    monkeypatch.setenv("PEFTBENCH_BASELINE", "vera")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert f"{study}: 10 runs" in text and "baseline vera" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # learning curves + three Pareto fronts
    for method in ("lora", "vera", "full", "qlora"):
        assert method in text
    assert "bitsandbytes needs a GPU" in text

"""``examples/notebook.ipynb`` runs headless, top to bottom, and draws its plot.

The notebook starts its own Ray (``address="local"``) in the kernel process,
so this test does not use the ``ray_session`` fixture: a Ray already running in
the test process is neither joined nor disturbed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"
CELL_TIMEOUT_S = 150
PROBE = "import sys; print(sys.prefix)"


def _outputs(nb: Any, kind: str) -> list[Any]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == kind]  # fmt: skip


def _stream_text(nb: Any, name: str) -> str:
    return "".join(o.text for o in _outputs(nb, "stream") if o.name == name)


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.timeout(180)
def test_notebook_runs_headless_and_plots() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # First, prove the kernel runs this interpreter's environment (jupyter_client
    # swaps a kernelspec's bare "python" for sys.executable; a stray spec would not).
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

    assert nb.cells[0].outputs[0].text.strip() == sys.prefix
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
    assert len(images) == 1, "expected the Monte Carlo vs Black-Scholes figure"
    stdout, stderr = _stream_text(nb, "stdout"), _stream_text(nb, "stderr")
    # With the notebook extra (ipywidgets), progress bars are widgets and neither
    # tqdm nor Ray complains about missing notebook packages.
    bars = [o for o in _outputs(nb, "display_data")
            if "application/vnd.jupyter.widget-view+json" in o.data
            and "/16" in o.data.get("text/plain", "")]  # fmt: skip
    assert bars, "no progress bar widget"
    assert "Missing packages" not in stderr and "IProgress not found" not in stderr, stderr
    assert "Europeans within 3 standard errors" in stdout
    assert "same prices as the pool: True" in stdout
    assert "the bridge fetched the shared data 1 time(s)" in stdout
    assert "bridge exited with code 0" in stdout

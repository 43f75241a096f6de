"""``examples/notebook.ipynb`` runs headless, top to bottom, and draws its plot;
the saved copy shows its outputs, finished progress bars included.

The notebook starts its own Ray (``address="local"``) in the kernel process,
so this test does not use the ``ray_session`` fixture: a Ray already running in
the test process is neither joined nor disturbed.
"""

from __future__ import annotations

import re
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
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_SAVED_BYTES = 300_000  # outputs and the plot, no more


def _outputs(nb: Any, kind: str) -> list[Any]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == kind]  # fmt: skip


def _stream_text(nb: Any, name: str) -> str:
    return "".join(o.text for o in _outputs(nb, "stream") if o.name == name)


def _bars(nb: Any) -> list[str]:
    """The text fallback of each progress bar widget (what GitHub shows)."""
    return [o.data["text/plain"] for o in _outputs(nb, "display_data")
            if WIDGET in o.data and re.search(r"\d+%\|", o.data.get("text/plain", ""))]  # fmt: skip


def _progress_models(nb: Any) -> list[dict[str, Any]]:
    """The saved state of each progress bar's model (what Jupyter renders)."""
    models = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return [m["state"] for m in models.get("state", {}).values()
            if m["model_name"] in ("IntProgressModel", "FloatProgressModel")]  # fmt: skip


def _finished(bar: str, total: int) -> bool:
    return re.search(rf"100%\|.*\| {total}/{total} ", bar) is not None


def test_the_documented_command_is_installed_by_the_notebook_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    command = re.compile(r"jupyter nbconvert [^\n#]*?(\S+\.ipynb)")
    found = [path for doc in docs for path in command.findall(doc.read_text())]
    assert found, "no `jupyter nbconvert` command in the README or docs/"
    assert all((ROOT / path).is_file() for path in found), found
    # nbconvert brings the `jupyter` command (jupyter-core) and its `jupyter-nbconvert`.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    notebook = project["optional-dependencies"]["notebook"]
    assert {re.split(r"[<>=!~ ]", r)[0] for r in notebook} >= {"nbconvert", "ipykernel"}


def test_a_closed_bar_saves_its_finished_state() -> None:
    # The client's bar (RayPool's is the same): tqdm writes a widget's text
    # fallback once, at 0%; a saved notebook must show the bar as it ended.
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from ray_alpcrun.client.batching import progress_bar\n"
        "bar = progress_bar([b'a', b'b', b'c'])\n"
        "bar.update(3)\n"
        "bar.close()"
    )])  # fmt: skip
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=60).execute()
    bars = _bars(nb)
    assert len(bars) == 1, nb.cells[0].outputs
    assert _finished(bars[0], 3), bars[0]
    assert [(m["value"], m["max"], m["bar_style"]) for m in _progress_models(nb)] == [
        (3, 3, "success")
    ]


def test_the_saved_notebook_shows_its_outputs_and_finished_bars() -> None:
    assert NOTEBOOK.stat().st_size < MAX_SAVED_BYTES
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not _outputs(nb, "error")
    assert [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
    bars = _bars(nb)
    assert len(bars) == 2 and all(_finished(bar, 16) for bar in bars), bars  # pool, client
    models = _progress_models(nb)
    assert len(models) == 2 and all(m["value"] == m["max"] == 16 for m in models), models


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
    bars = _bars(nb)
    assert len(bars) == 2 and all(_finished(bar, 16) for bar in bars), bars  # pool, client
    assert [m["value"] for m in _progress_models(nb)] == [16, 16]
    assert "Missing packages" not in stderr and "IProgress not found" not in stderr, stderr
    assert "Europeans within 3 standard errors" in stdout
    assert "same prices as the pool: True" in stdout
    assert "the bridge fetched the shared data 1 time(s)" in stdout
    assert "bridge exited with code 0" in stdout

"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel (nbclient, kernel `python3`), as a user
running "Restart & Run All" would: a cell that raises fails the test, naming the cell and its traceback.

Each notebook gets its own kernel process, started in notebooks/ with this process's environment: the root
conftest.py's XLA_FLAGS (the simulated 8-device CPU mesh, which 04_sharding.ipynb also sets itself, and
`--xla_backend_optimization_level=0`: the tiny models run in microseconds, while XLA's LLVM backend spends most of
every compile optimising code that runs a handful of times, and compiling is most of what these notebooks do).
The numerics are the model's and are tested elsewhere; here a cell passes when it runs and its own assertions
hold. The committed notebooks are not rewritten: outputs stay as they were saved.

Cells tagged `teardown` (the server notebook's "stop the server" cell) run even when an earlier cell failed, so
no server process outlives its test.
"""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; the slowest cells (first compiles, the server's start-up) take well under a minute


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names[:6] == [
        "01_quickstart.ipynb",
        "02_inside_the_model.ipynb",
        "03_moe.ipynb",
        "04_sharding.ipynb",
        "05_multimodal.ipynb",
        "06_server.ipynb",
    ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path):
    assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]  # set by the root conftest.py
    nb = nbformat.read(path, as_version=4)
    cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert cells, f"{path.name} has no code cells"
    teardown = {i for i, c in cells if "teardown" in c.metadata.get("tags", [])}
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.reset_execution_trackers()
    done: set[int] = set()
    with client.setup_kernel():
        try:
            for i, cell in cells:
                done.add(i)
                client.execute_cell(cell, i)  # raises CellExecutionError with the cell's traceback
        finally:
            for i in sorted(teardown - done):
                try:
                    client.execute_cell(nb.cells[i], i)
                except Exception:  # noqa: BLE001 (the first failure is the one to report)
                    pass

"""Every notebook in notebooks/ is committed clean and runs top to bottom.

Each notebook runs in a fresh kernel, in a temporary working directory, at
a tiny size: the cell tagged "parameters" gets the values of TINY appended,
so they override its defaults. Any cell error fails the test with the
cell's traceback. The quickstart and TPU notebooks train on real
Fashion-MNIST, read from Debian's dataset-fashion-mnist package (or
$SANER_JAX_FASHION_MNIST_DIR), and skip without it; the toy example makes
its own data.
"""

from __future__ import annotations

import ast
import os
import pathlib

import nbformat
import pytest
from conftest import SMOKE_MODEL
from nbclient import NotebookClient

from saner_jax.train import data

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TINY = {
  "quickstart.ipynb": dict(train_examples=64, test_examples=64, epochs=1, batch_size=32),
  "tpu_reproduction.ipynb": dict(
    dataset="fashion_mnist",
    epochs=1,
    runs=["sgd", "saner"],
    overrides=dict(model=SMOKE_MODEL, train_examples=64, test_examples=64, batch_size=32, eval_batch_size=64),
  ),
  "toy_example.ipynb": dict(train_examples=64, test_examples=64, epochs=2, grid_size=20, ratio_epoch=1),
}
ON_FASHION_MNIST = {"quickstart.ipynb", "tpu_reproduction.ipynb"}
FASHION_MNIST_DIR = pathlib.Path(
  os.environ.get(data.DATASETS["fashion_mnist"].idx_env_var) or data.DEBIAN_FASHION_MNIST_DIR
)
needs_fashion_mnist = pytest.mark.skipif(
  not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
  reason=f"no Fashion-MNIST IDX files in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _ids(paths):
  return [p.name for p in paths]


def _parameters_cell(notebook):
  tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  return tagged[0]


def test_every_notebook_has_tiny_parameters():
  assert sorted(TINY) == _ids(NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.kernelspec.name == "python3"
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"clear the outputs of:\n{cell.source}"
  # The tiny values must override names the notebook defines, or they would do nothing.
  defined = {
    target.id
    for node in ast.parse(_parameters_cell(notebook).source).body
    if isinstance(node, ast.Assign)
    for target in node.targets
  }
  assert set(TINY[path.name]) <= defined, set(TINY[path.name]) - defined


@pytest.mark.parametrize(
  "path",
  [pytest.param(p, marks=needs_fashion_mnist if p.name in ON_FASHION_MNIST else ()) for p in NOTEBOOKS],
  ids=_ids(NOTEBOOKS),
)
def test_notebook_runs_tiny(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  cell = _parameters_cell(notebook)
  cell.source += "\n\n# Injected by tests/test_notebooks.py\n" + "".join(
    f"{name} = {value!r}\n" for name, value in TINY[path.name].items()
  )
  # The kernel inherits this environment: the checkout is importable, so the
  # notebook installs nothing, and JAX stays on the CPU.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the traceback, on any cell error
  printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
  assert "DeprecationWarning: saner_jax" not in printed, "the notebook imports a moved name:\n" + printed[-2000:]


RENDERED_DIR = REPO / "docs" / "notebooks"


@pytest.mark.parametrize("name", ["quickstart", "toy_example"])
def test_the_docs_render_each_cpu_notebook_with_the_same_cells_and_their_outputs(name):
  rendered = nbformat.read(RENDERED_DIR / f"{name}.ipynb", as_version=4)
  clean = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
  rerun = f"docs/notebooks/{name}.ipynb is out of date with notebooks/; run python scripts/render_notebooks.py {name}"
  assert [(c.cell_type, c.source) for c in rendered.cells] == [(c.cell_type, c.source) for c in clean.cells], rerun
  code = [c for c in rendered.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), rerun  # every cell ran, in a full run
  assert any(o.get("data", {}).get("image/png") for c in code for o in c.outputs)  # the figures are there
  assert not any(o.output_type == "error" for c in code for o in c.outputs)

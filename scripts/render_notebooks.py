"""Runs the CPU-sized notebooks at full size and writes them, outputs included, for the docs site.

notebooks/ holds them clean (tests/test_notebooks.py checks it), so that
Colab users and diffs see code only; the docs show docs/notebooks/<name>.ipynb,
the same cells with the figures and tables of a full run on this CPU. The
TPU notebook is not run here: the docs show it clean.

  python scripts/render_notebooks.py                 # every notebook in RENDERED
  python scripts/render_notebooks.py toy_example     # one

tests/test_notebooks.py fails when a rendered copy's cells differ from its
notebook's, naming this command.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
RENDERED = ("quickstart", "toy_example")  # those that run on a CPU in minutes


def render(name: str) -> pathlib.Path:
  source, target = REPO / "notebooks" / f"{name}.ipynb", REPO / "docs" / "notebooks" / f"{name}.ipynb"
  notebook = nbformat.read(source, as_version=4)
  # The kernel inherits this environment: the checkout is importable and JAX stays on the CPU.
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  os.environ["JAX_PLATFORMS"] = "cpu"
  with tempfile.TemporaryDirectory() as workdir:  # whatever the notebook writes stays out of the checkout
    client = NotebookClient(notebook, timeout=3600, kernel_name="python3", resources={"metadata": {"path": workdir}})
    client.execute()
  notebook.metadata.pop("widgets", None)
  partial = target.with_name(target.name + ".tmp")
  nbformat.write(notebook, partial)
  if target.is_symlink():
    target.unlink()
  partial.replace(target)  # never a half-written notebook in the docs
  return target


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(RENDERED)} (default: all)")
  names = parser.parse_args(argv).names or list(RENDERED)
  unknown = sorted(set(names) - set(RENDERED))
  if unknown:
    print(f"error: no CPU-sized notebook {unknown}; choose from {list(RENDERED)}", file=sys.stderr)
    return 2
  for name in names:
    started = time.perf_counter()
    print(f"running notebooks/{name}.ipynb ...", flush=True)
    target = render(name)
    print(f"wrote {target.relative_to(REPO)} in {time.perf_counter() - started:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

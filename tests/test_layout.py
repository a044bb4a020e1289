"""The tiers in the tree: the core imports with the toolkit's dependencies blocked; old imports still work."""

import subprocess
import sys
import textwrap
import warnings

import pytest

_BLOCKED = ("flax", "tensorflow", "tensorflow_datasets", "orbax", "sklearn", "matplotlib", "yaml")


def test_core_imports_without_the_toolkit_dependencies():
  script = textwrap.dedent(
    f"""
      import importlib.abc, sys

      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in {_BLOCKED!r}:
            raise ImportError("blocked: " + name)
          return None

      sys.meta_path.insert(0, Block())
      import jax, optax
      import saner_jax
      from saner_jax import analysis, diagnostics, parallel, perturbations, saner, sharpness
      params = {{"w": jax.numpy.ones(3)}}
      tx = optax.chain(saner_jax.saner(0.5), optax.sgd(0.1))
      tx.update(params, tx.init(params), params, clean_grads=params)
      print(sorted(m for m in sys.modules if m.split(".")[0] in {_BLOCKED!r}))
      """
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
  "old, new",
  [(f"saner_jax.{name}", f"saner_jax.train.{name}") for name in ("data", "noise", "models")]
  + [("saner_jax.train.report", "saner_jax.train.reporting")],
)
def test_moved_modules_keep_their_old_import_for_a_release(old, new):
  script = f"import warnings; warnings.simplefilter('error')\nimport {old}"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert f"{old} moved to {new}" in result.stderr
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    moved = __import__(old, fromlist=["_"])
  assert moved is __import__(new, fromlist=["_"])

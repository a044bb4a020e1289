"""The tiers in the tree: the core imports with the toolkit's dependencies blocked, imports form no circle,
the core loads JAX on first use, and the toolkit's config and ``--help`` load none of JAX, flax or orbax."""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "saner_jax"

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
      from saner_jax import analysis, diagnostics, parallel, perturbations, saner, two_pass
      params = {{"w": jax.numpy.ones(3)}}
      tx = optax.chain(saner_jax.saner(0.5), optax.sgd(0.1))
      tx.update(params, tx.init(params), params, clean_grads=params)
      print(sorted(m for m in sys.modules if m.split(".")[0] in {_BLOCKED!r}))
      """
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the package by dotted name (a package by its ``__init__``)."""
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


MODULES = _modules()


def _is_type_checking(node: ast.stmt) -> bool:
  return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(body: list[ast.stmt], deferred: bool) -> list[ast.Import | ast.ImportFrom]:
  """The imports a module runs: those at module level (in ``if`` and ``try`` too, not under
  ``TYPE_CHECKING``), plus with ``deferred`` those inside functions."""
  found: list[ast.Import | ast.ImportFrom] = []
  for node in body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      found.append(node)
    elif _is_type_checking(node) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not deferred):
      continue
    else:
      for field in ("body", "orelse", "finalbody", "handlers"):
        found += _import_nodes(getattr(node, field, []), deferred)
  return found


def _imports(name: str, deferred: bool) -> set[str]:
  """The package's modules that importing ``name`` imports directly. A module's own enclosing packages are
  left out: Python has initialised them before the module runs."""
  path = MODULES[name]
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  targets = set()
  for node in _import_nodes(ast.parse(path.read_text()).body, deferred):
    if isinstance(node, ast.Import):
      targets |= {alias.name for alias in node.names}
      continue
    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
    module = ".".join(base + ([node.module] if node.module else []))
    submodules = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
    targets |= submodules or {module}
  enclosing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
  return (targets & MODULES.keys()) - enclosing - {name}


def _circles(deferred: bool) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), i.e. the import circles."""
  graph = {name: _imports(name, deferred) for name in MODULES}
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  circles = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    for target in graph[node]:
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
      if len(component) > 1:
        circles.append(sorted(component))

  for name in sorted(graph):
    if name not in index:
      visit(name)
  return circles


def test_the_import_walk_sees_the_edges_it_must():
  # The walk is what the circle tests rely on: pin it on imports written three ways.
  assert "saner_jax.saner" in _imports("saner_jax.diagnostics", deferred=False)  # from saner_jax.saner import ...
  assert "saner_jax._validation" in _imports(
    "saner_jax.diagnostics", deferred=False
  )  # from saner_jax import _validation
  assert "saner_jax.train.loop" not in _imports("saner_jax.train.cli", deferred=False)  # only inside functions
  assert "saner_jax.train.loop" in _imports("saner_jax.train.cli", deferred=True)
  assert "saner_jax.train.loop" not in _imports("saner_jax.train", deferred=True)  # under TYPE_CHECKING


def test_no_import_circle_at_import_time():
  assert _circles(deferred=False) == []


# Deferred (function-level) imports that still close a circle: the data
# loader dispatches to the folder datasets built on it. The engine
# (saner_jax.train.engine) sits below the trainer and the pipelines, so they
# no longer import each other; no other module may join a circle.
DEFERRED_CIRCLE = {"saner_jax.train.data", "saner_jax.train.folders"}


def test_deferred_imports_close_no_new_circle():
  for circle in _circles(deferred=True):
    assert set(circle) <= DEFERRED_CIRCLE, f"a new import circle: {circle}"


def test_the_engine_is_below_the_trainer_and_the_pipelines():
  for name in ("saner_jax.train.pipelines.recipes", "saner_jax.train.streaming", "saner_jax.train.engine"):
    assert "saner_jax.train.loop" not in _imports(name, deferred=True), name
  assert "saner_jax.train.engine" in _imports("saner_jax.train.pipelines.recipes", deferred=False)


def test_the_core_imports_nothing_of_the_toolkit_or_the_kernels():
  core = [name for name in MODULES if not name.startswith(("saner_jax.train", "saner_jax.cpu_conv"))]
  assert "saner_jax.two_pass" in core
  for name in core:
    reached = {
      target for target in _imports(name, deferred=True) if target.startswith(("saner_jax.train", "saner_jax.cpu_conv"))
    }
    assert not reached, f"{name} imports {sorted(reached)}"


def _loaded_by(code: str) -> list[str]:
  """The top-level packages among JAX, flax, orbax, matplotlib and TensorFlow that ``code`` loads, in a fresh process."""
  watched = "{'jax', 'flax', 'orbax', 'matplotlib', 'tensorflow'}"
  script = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {watched}))"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_reading_a_config_loads_no_jax():
  # Reading, not validating: the model's input check still lives with the flax models.
  code = "from saner_jax.train import config\nassert config.from_mapping(config.load_yaml('fashion_mnist_quick')).model"
  assert _loaded_by(code) == []


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["tune", "--help"]])
def test_help_loads_no_jax(argv):
  # JAX alone takes most of a second to import; --help and the choices it lists need none of it.
  code = f"from saner_jax.train import cli\ntry:\n  cli.main({argv!r})\nexcept SystemExit:\n  pass"
  assert _loaded_by(code) == []


def test_the_training_loop_loads_on_first_use():
  assert _loaded_by(
    "import saner_jax.train as t\nassert t.train is __import__('saner_jax.train.loop').train.loop.train"
  ) == ["flax", "jax", "orbax"]


def test_the_core_loads_jax_on_first_use():
  assert _loaded_by("import saner_jax\nassert saner_jax.__version__") == []
  assert _loaded_by("import saner_jax\nassert callable(saner_jax.sam)") == ["jax"]


def test_saner_names_the_transform_after_its_module_is_imported():
  # The core's other modules import saner_jax.saner (the module); the package's name stays the function.
  code = (
    "import saner_jax, saner_jax.diagnostics\n"
    "from saner_jax.saner import saner as transform\n"
    "assert saner_jax.saner is transform, saner_jax.saner\n"
    "assert {'saner', 'sam', 'parallel'} <= set(dir(saner_jax))"
  )
  assert _loaded_by(code) == ["jax"]


def test_the_lazy_packages_export_exactly_what_they_load():
  import saner_jax
  import saner_jax.cpu_conv
  import saner_jax.train.pipelines

  assert set(saner_jax.__all__) == set(saner_jax._SUBMODULES) | set(saner_jax._NAMES)
  assert set(saner_jax.cpu_conv.__all__) == {"MODES", *saner_jax.cpu_conv._NAMES}
  assert set(saner_jax.train.pipelines.__all__) == set(saner_jax.train.pipelines._MODULES)
  assert all(getattr(saner_jax, name) is not None for name in saner_jax.__all__)
  # One helper owns the lazy loading of all three.
  for package in (saner_jax, saner_jax.cpu_conv, saner_jax.train.pipelines):
    assert package.__getattr__.__module__ == "saner_jax._lazy", package.__name__
    with pytest.raises(AttributeError, match=f"module '{package.__name__}' has no attribute 'nope'"):
      package.nope  # noqa: B018


def test_the_run_directory_names_its_files_in_one_place():
  """saner_jax.train.run_dir owns the names of a run's and a comparison's files; no other module spells them."""
  names = ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png", "checkpoints", "compare.md")
  names += ("compare.png", "wandb_run_id", ".lock")
  package = pathlib.Path(__file__).resolve().parents[1] / "saner_jax"
  for path in sorted((package / "train").rglob("*.py")):
    if path.name == "run_dir.py":
      continue
    source = path.read_text()
    spelled = [name for name in names if f'"{name}"' in source or f"'{name}'" in source]
    assert not spelled, f"{path.relative_to(package)} names {spelled}; use saner_jax.train.run_dir"

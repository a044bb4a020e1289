"""The API reference (docs/api.md) documents every public name of the core."""

import pathlib
import re
import types

import saner_jax

API = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
# Names given to autodoc directives, and modules documented with all their members.
DIRECTIVES = set(re.findall(r"^\.\. auto\w+:: (\S+)$", API, flags=re.MULTILINE))
WITH_MEMBERS = set(re.findall(r"^\.\. automodule:: (\S+)\n   :members:$", API, flags=re.MULTILINE))


def _public_names() -> list[str]:
  names = []
  for name in saner_jax.__all__:
    value = getattr(saner_jax, name)
    if not isinstance(value, types.ModuleType):
      names.append(f"saner_jax.{name}")
      continue
    names.append(value.__name__)  # the module's own docstring
    for member, obj in vars(value).items():
      defined_here = getattr(obj, "__module__", None) == value.__name__
      if not member.startswith("_") and callable(obj) and defined_here and member not in saner_jax.__all__:
        names.append(f"{value.__name__}.{member}")
  return names


def test_api_reference_documents_every_public_name():
  def documented(name: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return name in DIRECTIVES or module in WITH_MEMBERS

  missing = [name for name in _public_names() if not documented(name)]
  assert not missing, f"docs/api.md does not document {missing}"


README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_is_sam_then_saner_then_decay_then_momentum_sgd():
  import jax
  import jax.numpy as jnp
  import numpy as np

  (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
  ns: dict = {}
  exec(example, ns)
  kx, kw, kb = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (32, 5))
  batch = (x, jnp.arange(32) % 3)
  params = {"w": jax.random.normal(kw, (5, 3)) / 3, "b": jax.random.normal(kb, (3,)) / 3}
  opt_state, sam_state = ns["tx"].init(params), ns["sam"].init(params)
  new_params, opt_state, sam_state = ns["step"](params, opt_state, sam_state, batch)

  # The same step written out: SAM's point, the group-B mask, alpha 0.5, decay 5e-4 after it, and
  # heavy-ball momentum's first step, which is plain SGD at lr 0.1.
  loss = ns["loss_fn"]
  g = jax.grad(loss)(params, batch)
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
  g_sam = jax.grad(loss)(jax.tree.map(lambda w, v: w + 0.1 * v / (norm + 1e-12), params, g), batch)
  d = jax.tree.map(lambda s, c: jnp.where((s * c > 0) & (jnp.abs(s) < jnp.abs(c)), 0.5 * s, s), g_sam, g)
  want = jax.tree.map(lambda w, u: w - 0.1 * (u + 5e-4 * w), params, d)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, want)
  # The mask did something here: some coordinates are in group B.
  assert any(
    bool(jnp.any((s * c > 0) & (jnp.abs(s) < jnp.abs(c)))) for s, c in zip(jax.tree.leaves(g_sam), jax.tree.leaves(g))
  )


def test_readme_starts_with_the_two_commands_and_stays_short():
  assert README.startswith("```bash\nbash scripts/main_job.sh ")
  assert "\nbash scripts/test.sh " in README.split("```")[1]
  assert len(README.splitlines()) <= 130


def test_readme_links_point_at_files_that_exist():
  root = pathlib.Path(__file__).resolve().parents[1]
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
  local = [link for link in links if not link.startswith(("http://", "https://"))]
  assert "docs/index.md" in local
  missing = [link for link in local if not (root / link).exists()]
  assert not missing, f"README links to missing files: {missing}"

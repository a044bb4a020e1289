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

"""Package attributes loaded on first use (PEP 562), for the packages that defer their modules.

``saner_jax``, ``saner_jax.cpu_conv`` and ``saner_jax.train.pipelines`` name
modules that need JAX; what needs none of them (the CLI's ``--help``, reading a
config) should not pay for importing it. The scientific-python ``lazy_loader``
package does the same, but the core depends on jax, optax and chex only, and this
is the dozen lines it needs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(
  package: str,
  submodules: Iterable[str] = (),
  names: Mapping[str, str] | None = None,
  fallback: Callable[[str], Any] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for ``package``.

  ``submodules`` load as attributes; ``names`` maps each exported name to the
  submodule that defines it, and a loaded name is kept in the package, so
  later lookups skip ``__getattr__``. ``fallback(name)`` answers any other
  name (a deprecated alias) or raises AttributeError itself.
  """
  submodules, names = frozenset(submodules), dict(names or {})

  def __getattr__(name: str) -> Any:
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    if name in names:
      value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
      setattr(sys.modules[package], name, value)
      return value
    if fallback is not None:
      return fallback(name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__() -> list[str]:
    module = sys.modules[package]
    return sorted(set(vars(module)) | set(getattr(module, "__all__", ())))

  return __getattr__, __dir__

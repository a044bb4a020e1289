"""Aliases for modules that moved, so that old imports keep working for one release."""

from __future__ import annotations

import importlib
import sys
import warnings


def redirect(old: str, new: str) -> None:
  """Makes ``import old`` return the module ``new``, with a DeprecationWarning."""
  warnings.warn(
    f"{old} moved to {new} in saner_jax 0.2.0; import it from there (the old name goes in 0.3.0)",
    DeprecationWarning,
    stacklevel=3,
  )
  sys.modules[old] = importlib.import_module(new)

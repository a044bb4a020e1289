"""The training toolkit: configs, the on-device pipeline, steps, loop and CLI.

Needs the ``train`` extra (flax, tensorflow-datasets, orbax, matplotlib).
The package imports lazily: ``import saner_jax.train.config`` and
``python -m saner_jax.train --help`` load neither flax nor orbax, which
:func:`train` (from :mod:`saner_jax.train.loop`) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from saner_jax.train.config import ConfigError, TrainConfig

if TYPE_CHECKING:
  from saner_jax.train.loop import train

__all__ = ["ConfigError", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
  # PEP 562: the training loop (flax, orbax) loads when first asked for.
  if name == "train":
    return importlib.import_module("saner_jax.train.loop").train
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))

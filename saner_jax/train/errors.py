"""The toolkit's one-line user error, and the checks that raise it, in a leaf module every other one may import."""

from __future__ import annotations

from typing import Any, NoReturn


class ConfigError(ValueError):
  """A user's mistake: a bad flag or config value, data file, checkpoint or run directory.

  The message is one line that names the problem (the flag, where one is at
  fault) and the fix; the CLI prints it as ``error: ...`` without a traceback.
  """


# The checks a registry entry (saner_jax.train.registry) runs on its own config fields.
def fail(field: str, message: str) -> NoReturn:
  """Raises the one-line ConfigError ``--field: message``."""
  raise ConfigError(f"--{field}: {message}")


def at_least(config: Any, low: int, *fields: str) -> None:
  """Fails on the first of the config's ``fields`` below ``low``."""
  for field in fields:
    if getattr(config, field) < low:
      fail(field, f"must be >= {low}, got {getattr(config, field)}")


def in_unit_interval(config: Any, *fields: str) -> None:
  """Fails on the first of the config's ``fields`` outside [0, 1]."""
  for field in fields:
    if not 0.0 <= getattr(config, field) <= 1.0:
      fail(field, f"must be in [0, 1], got {getattr(config, field)}")

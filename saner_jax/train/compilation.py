"""JAX's persistent compilation cache, kept under saner_jax's cache directory.

A train step takes seconds to compile on a CPU (ResNet-20 SAM: about 3 s);
with the cache, a rerun, a resumed run or a comparison's second seed loads
the compiled step from disk instead. The cache is JAX's own
(``jax_compilation_cache_dir``); entries are keyed by the computation, the
compile options, jax/jaxlib versions and the devices, so a stale entry is
never used.
"""

from __future__ import annotations

import pathlib

import jax

from saner_jax.cpu_conv import cache_dir

__all__ = ["default_directory", "enable_compilation_cache"]


def default_directory() -> pathlib.Path:
  """``<saner_jax cache dir>/jax_compilation_cache``; the cache dir follows ``$SANER_JAX_CACHE_DIR``."""
  return cache_dir() / "jax_compilation_cache"


def enable_compilation_cache(directory: str | pathlib.Path | None = None) -> pathlib.Path:
  """Turns JAX's persistent compilation cache on; returns its directory.

  A directory already set (``JAX_COMPILATION_CACHE_DIR``, or
  ``jax.config.update("jax_compilation_cache_dir", ...)``) is kept, so
  the user's own setting wins; otherwise ``directory``, or
  :func:`default_directory`. Every compiled function is cached, not only
  those that take over a second to compile (JAX's default, changed
  only where it is still the default): the training
  loop's small functions add up, and loading one costs milliseconds. Call
  it before the first compilation: JAX opens the cache once per process.
  """
  # jax.config.values reads the same value as the attribute jax.config.<name>, which
  # JAX sets at runtime and its types do not declare (and jax.config.read refuses these).
  current = jax.config.values["jax_compilation_cache_dir"]
  if current:
    return pathlib.Path(current)
  path = pathlib.Path(directory) if directory is not None else default_directory()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  if jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 1.0:  # JAX's default, not the user's choice
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path

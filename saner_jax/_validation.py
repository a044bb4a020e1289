"""Argument checks shared by the core transforms.

They run in Python at construction or trace time, never inside a compiled
step, so they cost nothing per step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def resolve(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Evaluates a float-or-schedule hyperparameter at ``count``."""
  return value(count) if callable(value) else jnp.asarray(value)


def check_scalar_range(
  name: str,
  value: optax.ScalarOrSchedule,
  low: float,
  high: float = math.inf,
) -> None:
  """Raises ValueError when a float, or a schedule's first value, is out of range.

  A schedule is probed at step 0 only: later values are the caller's choice.
  Traced values (inside ``inject_hyperparams`` or ``jit``) cannot be checked
  in Python and are left alone.
  """
  probe = value(0) if callable(value) else value
  if isinstance(probe, jax.core.Tracer):
    return
  try:
    scalar = float(probe)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a float or an optax schedule, got {value!r}") from e
  if not (low <= scalar <= high) or math.isnan(scalar):
    where = "" if not callable(value) else " (the schedule's value at step 0)"
    bound = f"[{low}, {high}]" if high != math.inf else f">= {low}"
    raise ValueError(f"{name} must be {bound}, got {scalar}{where}")


def check_same_structure(name: str, tree: Any, reference: Any, reference_name: str = "updates") -> None:
  """Raises ValueError naming the first leaf where two pytrees disagree."""
  # Any: jaxlib ships PyTreeDef without a stub, so mypy cannot see its __eq__.
  tree_def: Any = jax.tree_util.tree_structure(tree)
  ref_def: Any = jax.tree_util.tree_structure(reference)
  if tree_def != ref_def:
    raise ValueError(
      f"{name} must have the same tree structure as {reference_name}; got\n"
      f"  {name}: {tree_def}\n  {reference_name}: {ref_def}"
    )
  paths = jax.tree_util.tree_leaves_with_path(tree)
  for (path, leaf), ref_leaf in zip(paths, jax.tree_util.tree_leaves(reference)):
    if jnp.shape(leaf) != jnp.shape(ref_leaf):
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)} but "
        f"{reference_name}{jax.tree_util.keystr(path)} has shape "
        f"{jnp.shape(ref_leaf)}"
      )


def widened(tree: Any) -> Any:
  """Each leaf in ``promote_types(dtype, float32)``: float16/bfloat16 to float32, float64 kept.

  Norms, inner products and cosines are taken in this dtype, so they never
  lose digits to a low-precision gradient nor drop float64 to float32.
  """
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)

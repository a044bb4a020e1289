"""Cheap per-step diagnostics of sharpness-aware training.

Every function here is a handful of fused element-wise ops and reductions,
meant to run inside the jitted train step on every step.

References:
  Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
  Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026: the groups A, B and C,
  and the memorisation of noisy labels
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from saner_jax import _validation
from saner_jax.saner import GROUPS, group_mask


def _leaves_sum(fn: Callable[..., jax.Array], *trees: optax.Updates) -> jax.Array:
  return functools.reduce(operator.add, (jnp.sum(fn(*leaves)) for leaves in zip(*map(jax.tree.leaves, trees))))


def group_fractions(perturbed_grads: optax.Updates, clean_grads: optax.Updates) -> dict[str, jax.Array]:
  """Fraction of all coordinates in each of SANER's groups A, B and C.

  The three need not sum to one: coordinates with a zero gradient, equal
  gradients or a NaN belong to no group.

  Examples:
    >>> import jax.numpy as jnp
    >>> from saner_jax import diagnostics
    >>> g_sam = {"w": jnp.array([0.5, 2.0, -1.0, 0.0])}
    >>> g = {"w": jnp.ones(4)}
    >>> {k: float(v) for k, v in diagnostics.group_fractions(g_sam, g).items()}
    {'A': 0.25, 'B': 0.25, 'C': 0.25}
  """
  _validation.check_same_structure("perturbed_grads", perturbed_grads, clean_grads, "clean_grads")
  total = sum(x.size for x in jax.tree.leaves(clean_grads))
  if total == 0:
    raise ValueError("group_fractions needs at least one gradient coordinate")
  return {
    group: _leaves_sum(lambda p, c, group=group: group_mask(p, c, group), perturbed_grads, clean_grads) / total
    for group in GROUPS
  }


def gradient_cosine(a: optax.Updates, b: optax.Updates) -> jax.Array:
  """Cosine similarity of two gradient pytrees; 0 if either is 0.

  Taken in the gradients' dtype promoted to at least float32 (float64 stays
  float64).

  NaN when either holds a NaN or inf, so a broken step is not reported as
  orthogonal.

  Examples:
    >>> import jax.numpy as jnp
    >>> from saner_jax import diagnostics
    >>> print(diagnostics.gradient_cosine(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])))
    0.70710677
  """
  a32, b32 = _validation.widened(a), _validation.widened(b)
  denominator = optax.tree.norm(a32) * optax.tree.norm(b32)
  return jnp.where(denominator == 0, 0.0, optax.tree.vdot(a32, b32) / denominator)


def gradient_diagnostics(perturbed_grads: optax.Updates, clean_grads: optax.Updates) -> dict[str, jax.Array]:
  """Group fractions, cosine(g, g_sam), both norms and a non-finite count.

  ``nonfinite`` counts the coordinates where either gradient is NaN or inf;
  a training loop should stop, or skip the step, when it is not zero. A NaN
  coordinate is in no group (an inf one is grouped by its sign and size), and
  either makes the cosine NaN and a norm NaN or inf. Norms are in at least
  float32 (float64 gradients keep float64).

  Examples:
    >>> import jax.numpy as jnp
    >>> from saner_jax import diagnostics
    >>> g_sam = {"w": jnp.array([0.5, 2.0, -1.0, jnp.nan])}
    >>> g = {"w": jnp.ones(4)}
    >>> report = diagnostics.gradient_diagnostics(g_sam, g)
    >>> sorted(report)
    ['clean_grad_norm', 'cosine', 'group_A', 'group_B', 'group_C', 'nonfinite', 'perturbed_grad_norm']
    >>> int(report["nonfinite"]), float(report["group_B"]), float(report["clean_grad_norm"])
    (1, 0.25, 2.0)
  """
  fractions = group_fractions(perturbed_grads, clean_grads)
  return {
    **{f"group_{g}": fraction for g, fraction in fractions.items()},
    "cosine": gradient_cosine(clean_grads, perturbed_grads),
    "clean_grad_norm": optax.tree.norm(_validation.widened(clean_grads)),
    "perturbed_grad_norm": optax.tree.norm(_validation.widened(perturbed_grads)),
    "nonfinite": _leaves_sum(lambda p, c: ~(jnp.isfinite(p) & jnp.isfinite(c)), perturbed_grads, clean_grads),
  }


def fit_counts(
  predictions: jax.Array,
  labels: jax.Array,
  true_labels: jax.Array,
  noise_mask: jax.Array,
  valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Counts, over one batch, of how the model fits clean and noisy samples.

  Examples:
    Samples 2 and 3 are noisy (true label 0); the model memorised sample 2's
    wrong label and predicted sample 3's true one:

    >>> import jax.numpy as jnp
    >>> from saner_jax import diagnostics
    >>> counts = diagnostics.fit_counts(
    ...   predictions=jnp.array([0, 1, 2, 0]),
    ...   labels=jnp.array([0, 0, 2, 1]),
    ...   true_labels=jnp.array([0, 1, 0, 0]),
    ...   noise_mask=jnp.array([False, False, True, True]),
    ... )
    >>> {k: int(v) for k, v in counts.items()}
    {'clean': 2, 'clean_correct': 1, 'noisy': 2, 'noisy_memorised': 1, 'noisy_true': 1}

  Args:
    predictions: predicted classes, shape ``[batch]``.
    labels: the training labels, noisy where ``noise_mask``.
    true_labels: the labels before noise was injected.
    noise_mask: True where the training label was corrupted.
    valid: optional mask, False on padding rows, which are then not counted.

  Returns:
    ``clean``, ``clean_correct`` (predicted the label), ``noisy``,
    ``noisy_memorised`` (predicted the wrong, given label) and
    ``noisy_true`` (predicted the true label): integer counts to sum over an
    epoch and divide.
  """
  valid = jnp.ones(jnp.shape(labels), bool) if valid is None else valid.astype(bool)
  noisy = noise_mask.astype(bool) & valid
  clean = ~noise_mask.astype(bool) & valid
  hit_label = predictions == labels
  hit_true = predictions == true_labels
  return {
    "clean": jnp.sum(clean),
    "clean_correct": jnp.sum(clean & hit_label),
    "noisy": jnp.sum(noisy),
    "noisy_memorised": jnp.sum(noisy & hit_label),
    "noisy_true": jnp.sum(noisy & hit_true),
  }

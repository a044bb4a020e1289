"""Pieces every noise-robust pipeline shares: soft targets and label metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-sample ``-sum_k targets_k log softmax(logits)_k``, in float32.

  >>> import jax.numpy as jnp
  >>> float(soft_cross_entropy(jnp.zeros((1, 4)), jnp.array([[0.5, 0.5, 0, 0]]))[0])  # log 4
  1.386...
  """
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sharpen(probs: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """MixMatch's sharpening ``p_k^(1/T) / sum_j p_j^(1/T)`` over the last axis.

  >>> import jax.numpy as jnp
  >>> print(sharpen(jnp.array([0.25, 0.75]), 0.5).round(6))  # (1, 9) / 10
  [0.1 0.9]
  """
  powered = probs ** (1.0 / temperature)
  return powered / jnp.sum(powered, axis=-1, keepdims=True)


def selection_counts(selected: jax.Array | np.ndarray, noise_mask: jax.Array | np.ndarray) -> dict[str, jax.Array]:
  """Counts to judge a clean/noisy split against the known noise mask.

  ``selected``: True where the pipeline judged the sample clean. Summed over
  an epoch, ``selected_clean / selected`` is the label precision of the set
  judged clean and ``selected_clean / clean`` its recall.
  """
  selected = selected.astype(bool)
  clean = ~noise_mask.astype(bool)
  return {
    "selected": jnp.sum(selected),
    "selected_clean": jnp.sum(selected & clean),
    "clean_total": jnp.sum(clean),
    "judged": jnp.asarray(selected.size),
  }

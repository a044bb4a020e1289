"""Progressive label correction (PLC; Zhang et al., "Learning with
feature-dependent label noise: a progressive approach", ICLR 2021,
arXiv 2103.07756), in the authors' (lhchau/saner) form.

After a warm-up, each epoch ends with a correction pass: a label is replaced
by the network's prediction where the network disagrees with it by a
log-probability gap of at least ``tau``; ``tau`` starts strict and is
lowered by ``tau_step`` after each pass, down to ``tau_end``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WARMUP_EPOCHS = 10
TAU_START = 0.9
TAU_END = 0.5
TAU_STEP = 0.05


def tau(
  epoch: int,
  warmup_epochs: int = WARMUP_EPOCHS,
  start: float = TAU_START,
  end: float = TAU_END,
  step: float = TAU_STEP,
) -> float | None:
  """The threshold of the correction after epoch ``epoch`` (from 1), or None before the warm-up ends.

  The first correction follows epoch ``warmup_epochs`` (the authors'
  ``epoch >= warmup_epochs``) with ``start``; each later one is ``step``
  lower, never below ``end``.

  >>> [tau(e, 10) for e in (9, 10, 11, 18, 30)]
  [None, 0.9, 0.85, 0.5, 0.5]
  """
  if epoch < warmup_epochs:
    return None
  # Rounded so that 0.9 - 8 x 0.05 lands on 0.5, not 0.5000000000000001.
  return max(end, round(start - (epoch - warmup_epochs) * step, 10))


def correct_labels(logits: jax.Array, labels: jax.Array, threshold) -> tuple[jax.Array, jax.Array]:
  r"""One correction: ``y -> argmax p`` where ``argmax p != y`` and ``log p_max - log p_y >= tau``.

  Returns ``(new_labels, flipped)``.

  >>> import jax.numpy as jnp
  >>> logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
  >>> # gaps log(0.7 / 0.2) = 1.25 and log(0.5 / 0.4) = 0.22; the third agrees
  >>> new, flipped = correct_labels(logits, jnp.array([1, 1, 2]), 0.9)
  >>> new.tolist(), flipped.tolist()
  ([0, 1, 2], [True, False, False])
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  predicted = jnp.argmax(log_probs, axis=-1)
  gap = jnp.max(log_probs, axis=-1) - jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  flipped = (predicted != labels) & (gap >= threshold)
  return jnp.where(flipped, predicted, labels).astype(labels.dtype), flipped

"""Co-teaching (Han et al., "Co-teaching: robust training of deep neural
networks with extremely noisy labels", NeurIPS 2018, arXiv 1804.06872).

Two networks see the same batch; each keeps the fraction ``1 - forget_rate(e)``
of it on which its loss is smallest, and the OTHER network trains on those
samples only. The forget rate grows to its final value over the first
``num_gradual`` epochs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORGET_RATE = 0.2
NUM_GRADUAL = 10
EXPONENT = 1.0


def forget_rate(
  epoch: int, final_rate: float = FORGET_RATE, num_gradual: int = NUM_GRADUAL, exponent: float = EXPONENT
) -> float:
  r"""The forget rate of epoch ``epoch`` (numbered from 1, as the authors do).

  .. math:: r_e = r \,\big(\min(e, n) / n\big)^{c}

  with ``r = final_rate``, ``n = num_gradual``, ``c = exponent``; ``n = 0``
  forgets ``r`` from the first epoch.

  >>> [round(forget_rate(e, 0.2, 10), 3) for e in (1, 5, 10, 30)]
  [0.02, 0.1, 0.2, 0.2]
  """
  if num_gradual <= 0:
    return final_rate
  return final_rate * (min(epoch, num_gradual) / num_gradual) ** exponent


def num_remembered(batch_size: int, rate: float) -> int:
  """How many of a batch's samples are kept at forget rate ``rate``: ``int((1 - rate) B)``, at least 1.

  >>> num_remembered(128, 0.02), num_remembered(128, 0.2)
  (125, 102)
  """
  return max(1, min(batch_size, int((1.0 - rate) * batch_size)))


def small_loss_mask(losses: jax.Array, keep: int | jax.Array) -> jax.Array:
  """True on the ``keep`` samples of smallest loss (ties by position); ``keep`` may be traced.

  >>> import jax.numpy as jnp
  >>> small_loss_mask(jnp.array([0.3, 0.1, 2.0, 0.2]), 2).tolist()
  [False, True, False, True]
  """
  ranks = jnp.argsort(jnp.argsort(losses, stable=True), stable=True)
  return ranks < keep


def exchange(masks: jax.Array) -> jax.Array:
  """``[2, B]`` selections of networks (0, 1) -> the samples each network trains on: the other's."""
  return masks[::-1]

"""Joint Optimization (Tanaka et al., "Joint optimization framework for
learning with noisy labels", CVPR 2018, arXiv 1803.11364).

Stage 1 trains on per-sample soft labels ``s`` with

    L = L_c + alpha L_p + beta L_e

and, from epoch ``update_start`` on, replaces each soft label at the end of
every epoch with the network's prediction averaged over the last ``window``
epochs. Stage 2 trains a fresh network on the final soft labels with soft
cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saner_jax.train.pipelines.common import soft_cross_entropy

ALPHA = 1.2
BETA = 0.8
WINDOW = 10
# The authors' stage 1 updates the labels from its 103rd epoch (of 200) on.
UPDATE_START = 103


def loss(logits: jax.Array, soft_labels: jax.Array, alpha=ALPHA, beta=BETA) -> jax.Array:
  r"""The stage-1 loss of a batch, with a uniform prior ``p``.

  .. math::
     L_c = -\frac1B \sum_i \sum_k s_{ik} \log q_{ik}, \quad
     L_p = -\sum_k p_k \log \bar q_k, \quad
     L_e = -\frac1B \sum_i \sum_k q_{ik} \log q_{ik}

  with ``q = softmax(logits)`` and ``q-bar`` its batch mean. ``L_p`` is
  Tanaka et al.'s ``KL(p || q-bar)`` up to the constant ``-H(p)`` (the
  authors' form).

  >>> import jax.numpy as jnp
  >>> # uniform predictions over 2 classes: L_c = L_p = L_e = log 2
  >>> round(float(loss(jnp.zeros((2, 2)), jnp.array([[1.0, 0.0], [0.0, 1.0]]))), 6)  # 3 log 2
  2.079442
  """
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
  q = jnp.exp(log_q)
  prior = jnp.full(q.shape[-1], 1.0 / q.shape[-1])
  l_c = jnp.mean(soft_cross_entropy(logits, soft_labels))
  l_p = -jnp.sum(prior * jnp.log(jnp.mean(q, axis=0)))
  l_e = -jnp.mean(jnp.sum(q * log_q, axis=-1))
  return l_c + alpha * l_p + beta * l_e


def record_predictions(history: jax.Array, epoch: int | jax.Array, indices: jax.Array, probs: jax.Array) -> jax.Array:
  """Writes a batch's predictions into slot ``(epoch - 1) mod window`` of the ``[window, N, C]`` history."""
  slot = (epoch - 1) % history.shape[0]
  return history.at[slot, indices].set(probs.astype(history.dtype))


def update_soft_labels(history: jax.Array, soft_labels: jax.Array, epoch: int, update_start: int = UPDATE_START):
  """The soft labels after epoch ``epoch``: the history's mean from ``update_start`` on, else unchanged.

  >>> import jax.numpy as jnp
  >>> history = jnp.array([[[0.8, 0.2]], [[0.4, 0.6]]])  # 2 epochs x 1 sample x 2 classes
  >>> print(update_soft_labels(history, jnp.array([[0.0, 1.0]]), epoch=5, update_start=5))
  [[0.6 0.4]]
  >>> print(update_soft_labels(history, jnp.array([[0.0, 1.0]]), epoch=4, update_start=5))
  [[0. 1.]]
  """
  return history.mean(axis=0) if epoch >= update_start else soft_labels

"""Hard bootstrapping (Reed et al., "Training deep neural networks on noisy
labels with bootstrapping", ICLR 2015 workshop, arXiv 1412.6596)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saner_jax.train.pipelines.common import soft_cross_entropy

BETA = 0.8  # the authors' (and Reed et al.'s hard-bootstrapping) weight of the given label


def hard_bootstrap_loss(logits: jax.Array, labels: jax.Array, beta: float | jax.Array = BETA) -> jax.Array:
  r"""Per-sample hard-bootstrapping loss.

  .. math::
     \ell = -\sum_k \big[\beta\, t_k + (1 - \beta)\, z_k\big] \log q_k

  with ``q = softmax(logits)``, ``t`` the one-hot given label and ``z`` the
  one-hot of ``argmax q``, a fixed target (no gradient flows through the
  argmax). ``beta = 1`` is cross-entropy.

  >>> import jax.numpy as jnp
  >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  >>> # label 1, prediction 0: -(0.8 log 0.25 + 0.2 log 0.5)
  >>> round(float(hard_bootstrap_loss(logits, jnp.array([1]))[0]), 6)
  1.247665
  """
  num_classes = logits.shape[-1]
  predicted = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(logits), axis=-1), num_classes)
  target = beta * jax.nn.one_hot(labels, num_classes) + (1.0 - beta) * predicted
  return soft_cross_entropy(logits, target)

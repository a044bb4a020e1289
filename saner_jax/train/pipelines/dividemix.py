"""DivideMix (Li, Socher and Hoi, "DivideMix: learning with noisy labels as
semi-supervised learning", ICLR 2020, arXiv 2002.07394).

Each epoch after the warm-up, every network's per-sample losses on the
training set are fitted with a two-component Gaussian mixture; the posterior
of the low-mean component is the probability ``w`` that a sample is clean.
Co-divide: each network trains on the split of the OTHER network, samples
with ``w > p_threshold`` as labelled, the rest as unlabelled. Labelled
targets are co-refined with the network's own prediction, unlabelled ones
co-guessed from both networks, both sharpened; the batch is then mixed
(MixMatch's mixup) and trained with cross-entropy on the labelled part and
a squared error, weighted by ``lambda_u``, on the unlabelled part.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from saner_jax.train.pipelines.common import sharpen, soft_cross_entropy

P_THRESHOLD = 0.5
LAMBDA_U = 25.0
TEMPERATURE = 0.5
MIXUP_ALPHA = 4.0
WARMUP_EPOCHS = 10


def normalise_losses(losses: np.ndarray) -> np.ndarray:
  """Min-max scaling to [0, 1], as DivideMix does before fitting the mixture.

  >>> normalise_losses(np.array([1.0, 2.0, 5.0])).tolist()
  [0.0, 0.25, 1.0]
  """
  losses = np.asarray(losses, np.float64)
  span = losses.max() - losses.min()
  return (losses - losses.min()) / span if span > 0 else np.zeros_like(losses)


def clean_probability(losses: np.ndarray, seed: int) -> np.ndarray:
  """The posterior of the low-mean component of a 2-component GMM on the normalised losses.

  scikit-learn's :class:`~sklearn.mixture.GaussianMixture` with DivideMix's
  settings (``max_iter=10, tol=1e-2, reg_covar=5e-4``); ``seed`` fixes its
  k-means initialisation, so a resumed run fits the same mixture. Ten EM
  iterations often stop short of ``tol`` by design; scikit-learn's
  ConvergenceWarning about it, printed every epoch, is silenced.
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.mixture import GaussianMixture

  x = normalise_losses(losses).reshape(-1, 1)
  gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    gmm.fit(x)
  return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_[:, 0]))].astype(np.float32)


def co_refine(probs: jax.Array, labels: jax.Array, clean_prob: jax.Array, temperature) -> jax.Array:
  r"""Label co-refinement of labelled samples: ``sharpen(w y + (1 - w) p, T)``.

  ``w`` is the other network's clean probability, ``y`` the one-hot given
  label and ``p`` this network's prediction.

  >>> import jax.numpy as jnp
  >>> # w = 0.5: (0.5 (1, 0) + 0.5 (0.5, 0.5)) = (0.75, 0.25) -> sharpened (0.9, 0.1)
  >>> print(co_refine(jnp.array([[0.5, 0.5]]), jnp.array([0]), jnp.array([0.5]), 0.5).round(6))
  [[0.9 0.1]]
  """
  w = clean_prob[:, None]
  return sharpen(w * jax.nn.one_hot(labels, probs.shape[-1]) + (1.0 - w) * probs, temperature)


def co_guess(probs: jax.Array, other_probs: jax.Array, temperature) -> jax.Array:
  """Co-guessing for unlabelled samples: the sharpened mean of both networks' predictions."""
  return sharpen(0.5 * (probs + other_probs), temperature)


def mixup(key: jax.Array, inputs: jax.Array, targets: jax.Array, alpha: float):
  r"""MixMatch's mixup of a batch with a shuffled copy of itself.

  ``lam ~ Beta(alpha, alpha)``, ``lam' = max(lam, 1 - lam)`` so each mixed
  sample stays closer to its first source (whose labelled/unlabelled role it
  keeps), then ``x' = lam' x + (1 - lam') x[perm]`` and likewise the targets.
  Returns ``(mixed_inputs, mixed_targets, lam')``.
  """
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha)
  lam = jnp.maximum(lam, 1.0 - lam)
  perm = jax.random.permutation(perm_key, inputs.shape[0])
  mixed = lam * inputs.astype(jnp.float32) + (1.0 - lam) * inputs[perm].astype(jnp.float32)
  return mixed.astype(inputs.dtype), lam * targets + (1.0 - lam) * targets[perm], lam


def mixed_loss(logits: jax.Array, targets: jax.Array, labelled: jax.Array, lambda_u) -> jax.Array:
  r"""DivideMix's loss on a mixed batch, plus its uniform-prior penalty.

  .. math::
     L = \frac{1}{|X|}\sum_{i \in X} H(t_i, q_i)
       + \lambda_u \frac{1}{|U| C}\sum_{i \in U} \lVert q_i - t_i \rVert^2
       + \sum_k \pi_k \log \frac{\pi_k}{\bar q_k}

  ``X`` are the mixed samples whose first source was labelled, ``U`` the
  others, ``q = softmax(logits)``, ``pi`` uniform and ``q-bar`` the batch's
  mean prediction. An empty part contributes nothing.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32))
  labelled = labelled.astype(jnp.float32)
  unlabelled = 1.0 - labelled
  loss_x = jnp.sum(labelled * soft_cross_entropy(logits, targets)) / jnp.maximum(jnp.sum(labelled), 1.0)
  squared = jnp.mean((probs - targets) ** 2, axis=-1)
  loss_u = jnp.sum(unlabelled * squared) / jnp.maximum(jnp.sum(unlabelled), 1.0)
  prior = jnp.full(probs.shape[-1], 1.0 / probs.shape[-1])
  penalty = jnp.sum(prior * jnp.log(prior / jnp.mean(probs, axis=0)))
  return loss_x + lambda_u * loss_u + penalty

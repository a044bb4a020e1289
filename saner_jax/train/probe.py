r"""The paper's mechanism, logged during training on a fixed probe batch.

With ``--log_decomposition true`` every epoch ends with the clean/noisy
gradient decomposition (:func:`saner_jax.analysis.clean_noisy_decomposition`)
of one probe batch, and with ``--sharpness_every N`` every N-th epoch (and
the last) with the Hessian's top eigenvalue and trace on it
(:func:`saner_jax.analysis.hessian_top_eigenvalue`,
:func:`saner_jax.analysis.hessian_trace`). Nothing runs on the other steps.

- The probe batch is ``--probe_examples`` training examples drawn once from
  the run's seed (its own random stream, so the training draws do not move),
  with their noisy training labels and noise mask, without augmentation.
- The decomposition takes the run's perturbation and its state (SAM's, at
  ``--rho``, for SGD runs), BatchNorm in train mode as in the training step,
  and SANER's target ``--alpha``; under m-sharpness it uses one perturbation
  of the whole probe batch. GSAM's decomposition is not applied: "SAM" there
  means the perturbed gradient.
- Sharpness is the Hessian of the mean training loss on the probe batch with
  BatchNorm's running statistics (eval mode), as PyHessian computes it.
- Both use the model with XLA's convolutions, whose rules support the
  forward-over-reverse Hessian-vector products (the oneDNN ones define
  reverse mode only); the parameters are the same.

In metrics.jsonl a quantity that cannot be measured (NaN in the analysis
functions, e.g. a probe batch without noisy samples), and sharpness on the
epochs it is not computed, are ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import saner_jax
from saner_jax import analysis
from saner_jax.train import device_input
from saner_jax.train.config import TrainConfig
from saner_jax.train.data import DatasetSpec

DECOMPOSITION_PREFIX = "decomp_"
SHARPNESS_KEYS = ("sharpness_lambda_max", "sharpness_trace")


def probe_indices(config: TrainConfig, train_size: int) -> np.ndarray:
  """The probe batch's training indices, sorted: a pure function of the seed."""
  rng = np.random.default_rng([config.seed, 0x5A1E])
  return np.sort(rng.choice(train_size, min(config.probe_examples, train_size), replace=False))


def _as_record(values: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
  out: dict[str, float | None] = {}
  for key, value in jax.device_get(values).items():
    number = float(value)
    out[prefix + key] = number if math.isfinite(number) else None
  return out


def make_probe(
  config: TrainConfig,
  optimizer: Any,
  num_classes: int,
  data: device_input.DeviceData,
  spec: DatasetSpec | None = None,
  **loose: Any,
) -> Callable[[Any, int], dict[str, float | None]]:
  """``measure(state, epoch) -> record entries``; an empty dict when nothing is logged.

  ``spec`` is the dataset's (its normalisation); 0.2.0's ``mean=``/``std=``
  keywords still work until 0.4.0, with a DeprecationWarning.
  """
  from saner_jax.train import models
  from saner_jax.train.step import label_cross_entropy, resolve_spec

  spec = resolve_spec(config, spec, loose, "make_probe")
  if not (config.log_decomposition or config.sharpness_every):
    return lambda state, epoch: {}
  model = models.create_model(config.model, num_classes, width=config.model_width, dtype=config.compute_dtype)
  batch = device_input.gather(data, jnp.asarray(probe_indices(config, data.size)))
  images = device_input.normalize(batch.images, spec.mean, spec.std, config.compute_dtype)
  perturbation = optimizer.perturbation or saner_jax.sam(config.rho)

  def per_example(params: Any, batch_stats: Any) -> jax.Array:
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch.labels)

  # A pure function of its arguments, the batch and the statistics among them, so that the sharpness
  # analysis keeps its compiled products for every measurement (cache=True).
  def eval_loss(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    # Without mutable, apply returns the output alone (flax types it as output or (output, variables)).
    logits = cast(jax.Array, model.apply({"params": params, "batch_stats": batch_stats}, images, train=False))
    return label_cross_entropy(logits, labels)

  split = analysis.clean_noisy_decomposition(per_example, perturbation, alpha=config.alpha)

  @jax.jit
  def decompose(state: Any) -> dict[str, jax.Array]:
    perturbation_state = state.perturbation_state if optimizer.perturbation else perturbation.init(state.params)
    return split(state.params, perturbation_state, batch.noise_mask, state.batch_stats)

  # Not jitted as a whole: the analysis functions then loop in Python over one
  # compiled product, which XLA's CPU backend runs far faster than a while loop.
  def sharpness(state: Any, key: jax.Array) -> dict[str, jax.Array]:
    eigen_key, trace_key = jax.random.split(key)
    args = (eval_loss, state.params, state.batch_stats, images, batch.labels)
    return {
      "lambda_max": analysis.hessian_top_eigenvalue(
        *args, key=eigen_key, max_iterations=config.sharpness_iterations, cache=True
      ),
      "trace": analysis.hessian_trace(*args, key=trace_key, num_samples=config.hutchinson_samples, cache=True),
    }

  def measure(state: Any, epoch: int) -> dict[str, float | None]:
    record: dict[str, float | None] = {}
    if config.log_decomposition:
      record.update(_as_record(decompose(state), DECOMPOSITION_PREFIX))
    if config.sharpness_every:
      due = epoch % config.sharpness_every == 0 or epoch == config.epochs
      key = jax.random.fold_in(jax.random.key(config.seed), epoch)
      record.update(_as_record(sharpness(state, key), "sharpness_") if due else dict.fromkeys(SHARPNESS_KEYS))
    return record

  return measure

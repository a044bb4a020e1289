"""The optimizer a config describes, and the jitted train and eval steps.

One train step is: gather and augment the batch on device -> clean pass ->
perturbation -> perturbed pass -> [GSAM] -> [SANER, on all parameters or the
head only | group substitution] -> weight decay -> SGD momentum, with the metrics of the step summed into a running total on
device, so the host never waits on a step.

Data parallelism: the step runs on a one-axis device mesh. The gathered
batch is split over its ``"data"`` axis (``with_sharding_constraint``) while
params, optimizer state and the dataset stay replicated, and
:func:`saner_jax.sharpness_aware_grad` forms the perturbation in the
config's ``perturbation_mode``. On one device the constraints are no-ops.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import saner_jax
from saner_jax import diagnostics, parallel
from saner_jax.saner import Group
from saner_jax.train import device_input
from saner_jax.train.config import TrainConfig
from saner_jax.train.data import DatasetSpec


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  perturbation_state: optax.OptState


class Optimizer(NamedTuple):
  """The pieces of a run's optimizer; ``perturbation`` is None for SGD."""

  tx: optax.GradientTransformationExtraArgs
  perturbation: optax.GradientTransformation | None
  lr: optax.Schedule
  alpha: optax.Schedule | None


def _count_nonfinite(tree) -> jax.Array:
  return jnp.asarray(sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)))


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """Per-step learning rate; multistep decays at whole epochs like torch's MultiStepLR."""
  total = config.epochs * steps_per_epoch
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total)
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.lr)
  boundaries: dict[int, float] = {}
  for fraction in config.lr_milestones:
    epoch = int(config.epochs * fraction)
    if epoch == 0:  # torch's MultiStepLR never reaches a milestone at epoch 0
      continue
    step = epoch * steps_per_epoch
    boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay
  return optax.piecewise_constant_schedule(config.lr, boundaries)


def head_mask(params) -> dict[str, bool]:
  """``optax.masked``'s mask of the classifier: True on the top-level ``head`` module only."""
  if "head" not in params:
    raise ValueError(f"--saner_params head: the model has no 'head' parameters (it has {sorted(params)})")
  return {name: name == "head" for name in params}


def sam_policy(config: TrainConfig) -> saner_jax.SharpnessPolicy | None:
  """The config's policy for the second pass (:mod:`saner_jax.policies`); None for every step.

  The random policy's draws are seeded from the run's seed (and the step),
  so a resumed run continues them.
  """
  if config.sam_policy == "every":
    return saner_jax.every_k_steps(config.sam_every)
  if config.sam_policy == "random":
    return saner_jax.random_steps(config.sam_prob, key=jax.random.fold_in(jax.random.key(config.seed), 21))
  if config.sam_policy == "adaptive":
    return saner_jax.adaptive_steps(config.sam_c)
  return None


def build_optimizer(config: TrainConfig, steps_per_epoch: int) -> Optimizer:
  """The optax chain and perturbation of a config (authors' order: reweight, then L2).

  The perturbation and any transform heading the chain come from the
  family's registry entry (:mod:`saner_jax.train.optimizers`).
  """
  entry = config.perturbation_entry
  perturbation = entry.build(config)
  policy = sam_policy(config)
  if perturbation is not None and policy is not None:
    perturbation = saner_jax.with_policy(perturbation, policy)
  lr = lr_schedule(config, steps_per_epoch)
  parts = [] if entry.update is None else [entry.update(config)]
  alpha = None
  if config.uses_saner:
    if config.saner_group == "B":
      alpha = saner_jax.alpha_warmup(config.alpha, config.alpha_warmup_epochs * steps_per_epoch, steps_per_epoch)
    else:  # the ablation groups may amplify (alpha > 1): no warm-up there
      alpha = optax.constant_schedule(config.alpha)
    group = cast(Group, config.saner_group)  # validate() has checked it is A, B or C (and saner() checks again)
    reweight = saner_jax.saner(alpha, group=group, reuse_mask=config.saner_reuse_mask)
    if config.saner_params == "head":  # the authors' SANERLAST
      # optax masks clean_grads itself with mask_compatible_extra_args.
      reweight = optax.masked(reweight, head_mask, mask_compatible_extra_args=True)
    parts.append(reweight)
  if config.substitute_groups:
    parts.append(saner_jax.substitute_groups(config.substitute_groups, outside=config.substitute_outside))
  if config.sam_one_pass_scale != 1:  # the loss gradient's weight only: weight decay stays as it is
    parts.append(saner_jax.scale_one_pass_steps(config.sam_one_pass_scale))
  parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(lr, momentum=config.momentum or None))
  return Optimizer(optax.chain(*parts), perturbation, lr, alpha)


def init_state(model: nn.Module, optimizer: Optimizer, key: jax.Array, image_shape) -> TrainState:
  from saner_jax.train import models

  params, batch_stats = models.init_model(model, key, image_shape)

  # One compiled program: op by op, each zeros_like of the optimizer's state
  # would compile on its own (a dozen programs for ResNet-8). The states are
  # zeros and copies, so compiling them together changes no value.
  @jax.jit
  def assemble(params, batch_stats) -> TrainState:
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=optimizer.tx.init(params),
      perturbation_state=optimizer.perturbation.init(params) if optimizer.perturbation else (),
    )

  return assemble(params, batch_stats)


METRIC_KEYS = (
  "loss_sum",
  "examples",
  "correct",
  "clean",
  "clean_correct",
  "noisy",
  "noisy_memorised",
  "noisy_true",
  "group_A",
  "group_B",
  "group_C",
  "cosine",
  "nonfinite",
  "steps",
  "sam_steps",
)


def zero_metrics() -> dict[str, jax.Array]:
  return {k: jnp.zeros([], jnp.float32) for k in METRIC_KEYS}


def epoch_metrics(sums: dict[str, float], two_pass: bool) -> dict[str, float | None]:
  """An epoch's record fields from its summed step metrics (:data:`METRIC_KEYS`).

  Rates are None, not NaN, where nothing was counted (no noisy samples);
  the group fractions and cosine are None for one-pass SGD, and are means
  over the epoch's sharpness-aware steps (``sam_share`` of its steps; None
  where it took none).
  """

  def ratio(num, den):
    return sums[num] / sums[den] if sums[den] else None

  fields = {
    "train_loss": ratio("loss_sum", "examples"),
    "train_acc": ratio("correct", "examples"),
    "clean_acc": ratio("clean_correct", "clean"),
    "noisy_memorised": ratio("noisy_memorised", "noisy"),
    "noisy_true": ratio("noisy_true", "noisy"),
  }
  clean, noisy = fields["clean_acc"], fields["noisy_memorised"]
  fields["fit_gap"] = None if clean is None or noisy is None else clean - noisy
  # Sums from before the policies counted no sharpness-aware steps: every step was one.
  sam_steps = sums.get("sam_steps", sums["steps"])
  for key in ("group_A", "group_B", "group_C", "cosine"):
    fields[key] = sums[key] / sam_steps if two_pass and sam_steps else None
  fields["sam_share"] = sam_steps / sums["steps"] if two_pass and sums["steps"] else None
  return fields


Objective = Callable[[jax.Array, Any], jax.Array]


def label_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The default objective: mean cross-entropy with integer labels, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


_LOOSE_SPEC_ARGS = ("mean", "std", "flip", "crop_padding")


def resolve_spec(config: TrainConfig, spec: DatasetSpec | None, loose: dict[str, Any], caller: str) -> DatasetSpec:
  """The dataset spec a step builder uses, accepting the old loose keywords for one release.

  Up to 0.2.0 the builders took ``mean``, ``std``, ``flip`` and
  ``crop_padding`` one by one; those keywords still work, with a
  DeprecationWarning, and override the fields of ``config.spec``.
  """
  unknown = sorted(set(loose) - set(_LOOSE_SPEC_ARGS))
  if unknown:
    raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}")
  if not loose:
    if spec is None:
      raise TypeError(f"{caller}() needs the dataset spec: pass config.spec")
    return spec
  if spec is not None:
    raise TypeError(f"{caller}(): pass the dataset spec or the old {'/'.join(loose)} keywords, not both")
  warnings.warn(
    f"{caller}({', '.join(k + '=' for k in loose)}) is deprecated (saner_jax 0.3.0) and goes in 0.4.0;"
    " pass the dataset spec (config.spec) instead",
    DeprecationWarning,
    stacklevel=3,
  )
  fields = {k: tuple(v) if k in ("mean", "std") else v for k, v in loose.items()}
  return dataclasses.replace(config.spec, **fields)


def make_batch_fn(config: TrainConfig, spec: DatasetSpec | None = None, *, mesh: Mesh | None = None, **loose: Any):
  """``batch(data, permutation, batch_index, key, step) -> (indices, batch, images)``.

  Gathers batch ``batch_index`` of the epoch's ``permutation`` (split over
  the mesh's ``"data"`` axis, so each device gathers its slice), augments it
  with randomness from ``(key, step)`` as ``spec`` allows (its crop padding,
  its flip) and normalises it with the spec's mean and std.
  """
  spec = resolve_spec(config, spec, loose, "make_batch_fn")
  mesh = parallel.data_mesh() if mesh is None else mesh
  batch_sharding = NamedSharding(mesh, P("data"))

  def batch_fn(data: device_input.DeviceData, permutation, batch_index, key, step):
    indices = jax.lax.dynamic_slice(permutation, (batch_index * config.batch_size,), (config.batch_size,))
    batch = jax.lax.with_sharding_constraint(device_input.gather(data, indices), batch_sharding)
    images = batch.images
    if config.augment:
      images = device_input.random_crop_flip(jax.random.fold_in(key, step), images, spec.crop_padding, spec.flip)
    return indices, batch, device_input.normalize(images, spec.mean, spec.std, config.compute_dtype)

  return batch_fn


# The loss's aux is (batch_stats, logits): running averages are averaged over
# the pieces a step splits the batch into, logits put back in batch order.
AUX_REDUCERS = ("mean", "concat")


def batch_stats_forward(model: nn.Module, sub_batches: int = 1, micro_batches: int = 1) -> Callable:
  r"""``forward(params, batch_stats, images) -> batch_stats``: running statistics updated by a train-mode forward.

  The images are normalised in the pieces the two passes normalised them
  in: ``sub_batches`` contiguous sub-batches (m-sharpness, and one per
  device in the per-device mode), each split into ``micro_batches`` strided
  micro-batches (accumulation, one at a time with ``lax.map``). Each piece
  :math:`p` moves the running averages to :math:`m r + (1 - m) s_p` (flax's
  ``momentum`` :math:`m`, :math:`s_p` the piece's batch statistics); the
  result is their mean, as :func:`saner_jax.sharpness_aware_grad` merges
  the two passes' (``aux_reducers="mean"``). No gradient is taken.
  """

  def one(params, batch_stats, images):
    _, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return updates["batch_stats"]

  def forward(params, batch_stats, images):
    def on_sub_batches(x):  # [sub_batches, n, ...] -> the statistics, stacked over sub-batches if several
      if sub_batches == 1:
        return one(params, batch_stats, x[0])
      return jax.vmap(one, in_axes=(None, None, 0))(params, batch_stats, x)

    x = images.reshape(sub_batches, images.shape[0] // sub_batches, *images.shape[1:])
    if micro_batches == 1:
      stats = on_sub_batches(x)
    else:  # micro-batch i of a sub-batch holds its examples i, i + k, ...
      x = x.reshape(sub_batches, x.shape[1] // micro_batches, micro_batches, *x.shape[2:])
      stats = jax.lax.map(on_sub_batches, jnp.moveaxis(x, 2, 0))
    axes = int(sub_batches > 1) + int(micro_batches > 1)
    return jax.tree.map(lambda s: s.mean(tuple(range(axes))) if axes else s, stats)

  return forward


def make_update(
  model: nn.Module, optimizer: Optimizer, config: TrainConfig, *, objective: Objective = label_cross_entropy, mesh=None
) -> Callable:
  """``update(state, images, targets) -> (state, loss, logits, gradient_stats)``: one optimizer step.

  ``objective(logits, targets)`` is the batch loss; ``targets`` is any
  pytree with the batch as leading axis (split like the images under
  m-sharpness and accumulation). The step is the config's: clean pass ->
  perturbation -> perturbed pass -> [GSAM] -> [SANER] -> weight decay ->
  SGD momentum; ``logits`` are the clean pass's, in batch order.

  BatchNorm's running statistics (``config.bn_stats``): ``clean`` keeps the
  clean pass's; ``perturbed`` (the SANER authors' order) keeps the perturbed
  pass's, then updates them again with a third, forward-only pass at the new
  weights (:func:`batch_stats_forward`). Both passes normalise with batch
  statistics either way, so the weights, the loss and the logits are the
  same; only what evaluation normalises with differs. SGD keeps its one
  pass's.
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  authors_bn = config.bn_stats == "perturbed" and optimizer.perturbation is not None
  if authors_bn:
    sub_batches = config.m_sharpness * (mesh.shape["data"] if config.perturbation_mode == "per_device" else 1)
    refresh = batch_stats_forward(model, sub_batches, config.grad_accum_steps)

  def loss_fn(params, batch_stats, batch):
    images, targets = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return objective(logits, targets), (updates["batch_stats"], logits)

  if optimizer.perturbation is None:
    two_pass = None
    value_and_grad = saner_jax.accumulated_value_and_grad(
      loss_fn, config.grad_accum_steps, has_aux=True, batch_argnum=2, aux_reducers=AUX_REDUCERS
    )
  else:
    two_pass = saner_jax.sharpness_aware_grad(
      loss_fn,
      optimizer.perturbation,
      has_aux=True,
      m_sharpness=config.m_sharpness,
      accumulation_steps=config.grad_accum_steps,
      batch_argnum=2,
      mesh=mesh,
      mode=config.perturbation_mode,
      aux_reducers=AUX_REDUCERS,
    )

  def update(state: TrainState, images, targets):
    if two_pass is None:
      (loss, (batch_stats, logits)), grads = value_and_grad(state.params, state.batch_stats, (images, targets))
      updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
      perturbation_state = state.perturbation_state
      gradient_stats = {"nonfinite": _count_nonfinite(grads)}
    else:
      result = two_pass(state.params, state.perturbation_state, state.batch_stats, (images, targets))
      loss = result.loss
      batch_stats, logits = result.aux
      if authors_bn:
        batch_stats = result.perturbed_aux[0]
      updates, opt_state = optimizer.tx.update(
        result.perturbed_grads,
        state.opt_state,
        state.params,
        clean_grads=result.clean_grads,
        sharpness_aware=result.sharpness_aware,
      )
      perturbation_state = result.perturbation_state
      taken = jnp.asarray(result.sharpness_aware, jnp.float32)
      # Group fractions and cosine of the sharpness-aware steps only (a one-pass step has g_sam = g).
      gradient_stats = {
        k: v * taken if k != "nonfinite" else v
        for k, v in diagnostics.gradient_diagnostics(result.perturbed_grads, result.clean_grads).items()
      }
      gradient_stats["sam_steps"] = taken
    params = optax.apply_updates(state.params, updates)
    if authors_bn and jax.tree.leaves(batch_stats):  # a model without BatchNorm needs no third pass
      batch_stats = refresh(params, batch_stats, images)
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      perturbation_state=perturbation_state,
    )
    # Finite gradients can still step the weights to inf: count those too, so
    # the loop never checkpoints a broken state.
    gradient_stats = {k: v for k, v in gradient_stats.items() if k in METRIC_KEYS}
    gradient_stats["nonfinite"] = gradient_stats.get("nonfinite", 0) + _count_nonfinite(
      (new_state.params, new_state.batch_stats)
    )
    return new_state, loss, logits, gradient_stats

  return update


def add_step_metrics(metrics, loss, logits, batch: device_input.DeviceData, extra) -> dict[str, jax.Array]:
  """``metrics`` plus one step's: loss, fit counts against the given labels, and ``extra`` counts."""
  predictions = jnp.argmax(logits, axis=-1)
  size = batch.labels.shape[0]
  step_metrics = {
    "loss_sum": loss * size,
    "examples": size,
    "correct": jnp.sum(predictions == batch.labels),
    "steps": 1,
    **diagnostics.fit_counts(predictions, batch.labels, batch.true_labels, batch.noise_mask),
    **extra,
  }
  return {k: metrics[k] + jnp.asarray(step_metrics.get(k, 0), jnp.float32) for k in metrics}


def make_train_step(
  model: nn.Module,
  optimizer: Optimizer,
  config: TrainConfig,
  spec: DatasetSpec | None = None,
  *,
  mesh: Mesh | None = None,
  objective: Objective = label_cross_entropy,
  **loose: Any,
) -> Callable:
  """``step(state, metrics, data, permutation, batch_index, key) -> (state, metrics)``.

  ``mesh`` (default: every device, :func:`saner_jax.data_mesh`) has the axis
  ``"data"`` the batch is split over; SGD ignores ``perturbation_mode``.
  ``objective(logits, labels)`` is the loss (default: cross-entropy). ``spec``
  is the dataset's: its augmentation and normalisation.
  """
  spec = resolve_spec(config, spec, loose, "make_train_step")
  batch_fn = make_batch_fn(config, spec, mesh=mesh)
  update = make_update(model, optimizer, config, objective=objective, mesh=mesh)

  def step(state: TrainState, metrics, data: device_input.DeviceData, permutation, batch_index, key):
    _, batch, images = batch_fn(data, permutation, batch_index, key, state.step)
    new_state, loss, logits, gradient_stats = update(state, images, batch.labels)
    return new_state, add_step_metrics(metrics, loss, logits, batch, gradient_stats)

  return step


def make_eval_step(
  model: nn.Module, config: TrainConfig, spec: DatasetSpec | None = None, *, mesh: Mesh | None = None, **loose: Any
) -> Callable:
  """``eval(params, batch_stats, images, labels, valid) -> correct count`` over a whole test set.

  One call evaluates every image: a ``lax.map`` over batches of
  ``config.eval_batch_size`` (the image count must divide by it; pad and
  mark the padding invalid), so the host waits once per evaluation, not
  once per batch. Each batch is split over the mesh's ``"data"`` axis when
  its size divides by the axis, and evaluated whole on every device otherwise.
  """
  spec = resolve_spec(config, spec, loose, "make_eval_step")
  mesh = parallel.data_mesh() if mesh is None else mesh
  batch_size = config.eval_batch_size
  sharding = NamedSharding(mesh, P("data")) if batch_size % mesh.shape["data"] == 0 else None

  def correct_in_batch(params, batch_stats, batch):
    images, labels, valid = batch
    if sharding is not None:
      images = jax.lax.with_sharding_constraint(images, sharding)
    x = device_input.normalize(images, spec.mean, spec.std, config.compute_dtype)
    # Without mutable, apply returns the output alone (flax types it as output or (output, variables)).
    logits = cast(jax.Array, model.apply({"params": params, "batch_stats": batch_stats}, x, train=False))
    return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)

  def evaluate(params, batch_stats, images, labels, valid):
    if images.shape[0] % batch_size:
      raise ValueError(f"{images.shape[0]} test images do not split into batches of {batch_size}; pad them")
    batches = jax.tree.map(lambda x: x.reshape(-1, batch_size, *x.shape[1:]), (images, labels, valid))
    return jnp.sum(jax.lax.map(lambda batch: correct_in_batch(params, batch_stats, batch), batches))

  return evaluate

"""The pipelines as trainer recipes: ``python -m saner_jax.train --pipeline NAME``.

Each recipe plugs into :func:`saner_jax.train.loop.train` and shares the
trainer's data, noise, models, optimizers (any of the SAM family, with or
without SANER), data parallelism, metrics and checkpoints. Everything a
pipeline carries across epochs (the second network, the mixture's inputs
and outputs, corrected or soft labels) is part of its state, which every
checkpoint saves, so a killed run resumes exactly.

The two-network pipelines keep both networks stacked on a leading axis of
size 2 and train them in one jitted step, under :func:`jax.vmap`. Network
0 is the one evaluated and whose fit to the training labels is logged, as
the authors do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saner_jax.train import device_input, engine
from saner_jax.train import step as step_lib
from saner_jax.train.pipelines import bootstrap, co_teaching, common, dividemix, joint_optimization, plc

SELECTION_KEYS = ("selected", "selected_clean", "clean_total", "judged")


def _first(tree):
  """Network 0 of a stacked pair."""
  return jax.tree.map(lambda x: x[0], tree)


def _per_network(config, fn, in_axes=0):
  """``fn`` over a stacked pair of networks, inside one jitted step.

  :func:`jax.vmap`, except under m-sharpness: that already vmaps the
  convolutions over sub-batches of weights, and JAX cannot batch a
  convolution over its weights twice; a :func:`jax.lax.map` loop over the
  two networks does it then. ``in_axes``: 0 (stacked) or None (shared), per
  argument, as for vmap.
  """
  if config.m_sharpness == 1:
    return jax.vmap(fn, in_axes=in_axes)

  def looped(*args):
    axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
    pair = lambda x: jnp.broadcast_to(x, (2, *jnp.shape(x)))
    stacked = jax.tree.map(
      lambda axis, arg: jax.tree.map(pair, arg) if axis is None else arg, axes, args, is_leaf=lambda x: x is None
    )
    return jax.lax.map(lambda a: fn(*a), stacked)

  return looped


def _zero_metrics(run, keys=()) -> dict[str, jax.Array]:
  metrics = {**step_lib.zero_metrics(), **{k: jnp.zeros([], jnp.float32) for k in keys}}
  return jax.device_put(metrics, run.replicated)


def _batch_fn(run):
  return step_lib.make_batch_fn(run.config, run.data.info, mesh=run.mesh)


def _init_nets(run, optimizer, networks: int, key=None):
  """Fresh train state(s); with two networks, network 0 starts as the plain trainer's would."""
  key = run.keys.init if key is None else key
  init = lambda k: step_lib.init_state(run.model, optimizer, k, run.data.image_shape)
  if networks == 1:
    return init(key)
  # Stacked in one compiled program, not one per leaf shape.
  stack = jax.jit(lambda *nets: jax.tree.map(lambda *xs: jnp.stack(xs), *nets))
  return stack(init(key), init(jax.random.fold_in(key, 1)))


def _train_logits(model, params, batch_stats, images):
  """Logits in training mode (batch statistics), no state update: what a selection sees."""
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"])
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def _train_set_logits(run, networks: int):
  """``logits(params, batch_stats) -> [(2,) N, C]``: the training set, un-augmented, in eval mode."""
  info, config, model = run.data.info, run.config, run.model
  data, n, size = run.data.train, run.data.train.size, run.config.eval_batch_size

  @jax.jit
  def chunk(params, batch_stats, all_images, indices):
    images = device_input.normalize(all_images[indices], info.mean, info.std, config.compute_dtype)
    apply = lambda p, s: model.apply({"params": p, "batch_stats": s}, images, train=False).astype(jnp.float32)
    return jax.vmap(apply)(params, batch_stats) if networks == 2 else apply(params, batch_stats)

  def logits(params, batch_stats):
    # Fixed-size chunks (one compile); the last wraps around and is cut.
    parts = [
      chunk(params, batch_stats, data.images, np.arange(start, start + size) % n)[..., : min(size, n - start), :]
      for start in range(0, n, size)
    ]
    return jnp.concatenate(parts, axis=-2)

  return logits


def _optimizer_fields(optimizer, local_step: int) -> dict[str, Any]:
  return {
    "lr": float(optimizer.lr(local_step)),
    "alpha": float(optimizer.alpha(local_step)) if optimizer.alpha else None,
  }


def _selection_fields(sums) -> dict[str, Any]:
  """Label precision and recall of the samples judged clean, and their share."""
  ratio = lambda a, b: sums[a] / sums[b] if sums[b] else None
  return {
    "clean_precision": ratio("selected_clean", "selected"),
    "clean_recall": ratio("selected_clean", "clean_total"),
    "clean_fraction": ratio("selected", "judged"),
  }


def _network0_stats(stats) -> dict[str, jax.Array]:
  """Network 0's gradient statistics; non-finite values counted over both."""
  return {**_first(stats), "nonfinite": jnp.sum(stats["nonfinite"])}


def _epoch(run, step, state, epoch, keys=()):
  """Runs one epoch of ``step``; returns the state, the summed metrics and the trainer's fields."""
  state, sums = engine.run_epoch(run, step, state, epoch, _zero_metrics(run, keys))
  return state, sums, step_lib.epoch_metrics(sums, two_pass=run.optimizer.perturbation is not None)


def _evaluate(run, networks: int):
  """``evaluate(nets, split) -> accuracy`` of network 0 on ``split``."""
  eval_step = jax.jit(step_lib.make_eval_step(run.model, run.config, run.data.info, mesh=run.mesh))
  pick = jax.jit(_first) if networks == 2 else (lambda tree: tree)  # one program, not two per leaf
  return lambda nets, split: engine.evaluate(run, eval_step, pick(nets.params), pick(nets.batch_stats), split)


def _on_nets(evaluate):
  return lambda state, split: evaluate(state.nets, split)


def _jit_step(run, step):
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=run.replicated)


# ---------------------------------------------------------------------------
# Hard bootstrapping and PLC: one network, another loss or other labels


class LabelsState(NamedTuple):
  """One network and the labels it trains on (PLC's corrected labels)."""

  nets: step_lib.TrainState
  labels: jax.Array  # int32 [N]


def bootstrap_recipe(run):
  """Hard bootstrapping: the plain trainer with Reed et al.'s loss."""
  beta = run.config.bootstrap_beta
  objective = lambda logits, labels: jnp.mean(bootstrap.hard_bootstrap_loss(logits, labels, beta))
  return engine.supervised(run, objective=objective)


def plc_recipe(run):
  """Progressive label correction: cross-entropy on the current labels, a correction pass after each epoch."""
  config = run.config
  batch_fn = _batch_fn(run)
  update = step_lib.make_update(run.model, run.optimizer, config, mesh=run.mesh)
  train_set_logits = _train_set_logits(run, networks=1)

  def step(state: LabelsState, metrics, data, permutation, batch_index, key):
    indices, batch, images = batch_fn(data, permutation, batch_index, key, state.nets.step)
    nets, loss, logits, stats = update(state.nets, images, state.labels[indices])
    return state._replace(nets=nets), step_lib.add_step_metrics(metrics, loss, logits, batch, stats)

  step = _jit_step(run, step)
  correct = jax.jit(plc.correct_labels)

  def epoch(state: LabelsState, epoch: int):
    state, _, fields = _epoch(run, step, state, epoch)
    tau = plc.tau(epoch, config.pipeline_warmup_epochs, config.tau_start, config.tau_end, config.tau_step)
    flips = None
    if tau is not None:
      labels, flipped = correct(train_set_logits(state.nets.params, state.nets.batch_stats), state.labels, tau)
      state, flips = state._replace(labels=labels), int(jnp.sum(flipped))
    label_accuracy = float(jnp.mean(state.labels == run.data.train.true_labels))
    fields.update(_optimizer_fields(run.optimizer, int(state.nets.step) - 1))
    return state, {**fields, "tau": tau, "label_flips": flips, "label_accuracy": label_accuracy}

  init = lambda: device_input.place(
    LabelsState(_init_nets(run, run.optimizer, 1), run.data.train.labels), run.replicated
  )
  return engine.Recipe(init=init, epoch=epoch, evaluate=_on_nets(_evaluate(run, 1)))


# ---------------------------------------------------------------------------
# Joint Optimization: soft labels, two stages


class SoftLabelsState(NamedTuple):
  nets: step_lib.TrainState
  soft_labels: jax.Array  # float32 [N, C]
  history: jax.Array  # float32 [window, N, C]: the last epochs' predictions
  epoch: jax.Array  # int32: the epoch being trained (its history slot)


def joint_optimization_recipe(run):
  """Stage 1: Tanaka et al.'s loss on soft labels updated every epoch; stage 2: a fresh network on them."""
  config = run.config
  stage1 = config.jo_stage1_epochs_resolved
  spe = run.steps_per_epoch
  optimizers = [
    step_lib.build_optimizer(dataclasses.replace(config, epochs=n), spe) for n in (stage1, config.epochs - stage1)
  ]
  batch_fn = _batch_fn(run)
  jo_loss = lambda logits, soft: joint_optimization.loss(logits, soft, config.jo_alpha, config.jo_beta)
  retrain_loss = lambda logits, soft: jnp.mean(common.soft_cross_entropy(logits, soft))
  updates = [
    step_lib.make_update(run.model, optimizers[0], config, objective=jo_loss, mesh=run.mesh),
    step_lib.make_update(run.model, optimizers[1], config, objective=retrain_loss, mesh=run.mesh),
  ]

  def make_step(stage: int):
    def step(state: SoftLabelsState, metrics, data, permutation, batch_index, key):
      indices, batch, images = batch_fn(data, permutation, batch_index, key, state.nets.step)
      nets, loss, logits, stats = updates[stage](state.nets, images, state.soft_labels[indices])
      history = state.history
      if stage == 0:  # the clean pass's predictions, as the authors record them
        history = joint_optimization.record_predictions(history, state.epoch, indices, jax.nn.softmax(logits))
      state = state._replace(nets=nets, history=history)
      return state, step_lib.add_step_metrics(metrics, loss, logits, batch, stats)

    return _jit_step(run, step)

  steps = [make_step(0), make_step(1)]

  def epoch(state: SoftLabelsState, epoch: int):
    stage = int(epoch > stage1)
    if epoch == stage1 + 1:  # stage 2 starts from a fresh network and optimizer, on the final soft labels
      fresh = _init_nets(run, optimizers[1], 1, key=jax.random.fold_in(run.keys.init, 2))
      state = state._replace(nets=device_input.place(fresh._replace(step=state.nets.step), run.replicated))
    state = state._replace(epoch=device_input.place(np.int32(epoch), run.replicated))  # as keep in co_teaching
    state, _, fields = _epoch(run, steps[stage], state, epoch)
    if stage == 0:
      soft = joint_optimization.update_soft_labels(state.history, state.soft_labels, epoch, config.jo_update_start)
      state = state._replace(soft_labels=soft)
    local_step = int(state.nets.step) - 1 - stage * stage1 * spe
    fields.update(_optimizer_fields(optimizers[stage], local_step))
    accuracy = float(jnp.mean(jnp.argmax(state.soft_labels, -1) == run.data.train.true_labels))
    return state, {**fields, "stage": stage + 1, "label_accuracy": accuracy}

  def init():
    n, c = run.data.train.size, run.data.num_classes
    soft = jax.nn.one_hot(run.data.train.labels, c)
    history = jnp.zeros((config.jo_window, n, c), jnp.float32)
    state = SoftLabelsState(_init_nets(run, optimizers[0], 1), soft, history, jnp.zeros([], jnp.int32))
    return device_input.place(state, run.replicated)

  return engine.Recipe(init=init, epoch=epoch, evaluate=_on_nets(_evaluate(run, 1)))


# ---------------------------------------------------------------------------
# Co-teaching: two networks, each trained on the other's small-loss samples


class CoTeachingState(NamedTuple):
  nets: step_lib.TrainState  # stacked: every leaf has a leading axis of size 2
  keep: jax.Array  # int32: samples of each batch kept this epoch


def _weighted_cross_entropy(logits, targets):
  labels, weights = targets
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)


def co_teaching_recipe(run):
  config = run.config
  batch_fn = _batch_fn(run)
  update = _per_network(
    config,
    step_lib.make_update(run.model, run.optimizer, config, objective=_weighted_cross_entropy, mesh=run.mesh),
    in_axes=(0, None, (None, 0)),
  )
  logits_of_both = jax.vmap(lambda p, s, x: _train_logits(run.model, p, s, x), in_axes=(0, 0, None))

  def step(state: CoTeachingState, metrics, data, permutation, batch_index, key):
    nets = state.nets
    _, batch, images = batch_fn(data, permutation, batch_index, key, nets.step[0])
    logits = logits_of_both(nets.params, nets.batch_stats, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels[None])
    selected = jax.vmap(co_teaching.small_loss_mask, in_axes=(0, None))(losses, state.keep)
    weights = co_teaching.exchange(selected).astype(jnp.float32)
    nets, loss, clean_logits, stats = update(nets, images, (batch.labels, weights))
    counts = common.selection_counts(selected.reshape(-1), jnp.tile(batch.noise_mask, 2))
    metrics = step_lib.add_step_metrics(metrics, loss[0], clean_logits[0], batch, {**_network0_stats(stats), **counts})
    return state._replace(nets=nets), metrics

  step = _jit_step(run, step)

  def epoch(state: CoTeachingState, epoch: int):
    rate = co_teaching.forget_rate(epoch, config.forget_rate, config.num_gradual, config.forget_exponent)
    keep = co_teaching.num_remembered(config.batch_size, rate)
    # Placed like the state the step returns: an unplaced array would retrace and recompile it.
    state = state._replace(keep=device_input.place(np.int32(keep), run.replicated))
    state, sums, fields = _epoch(run, step, state, epoch, SELECTION_KEYS)
    fields.update(_optimizer_fields(run.optimizer, int(state.nets.step[0]) - 1))
    return state, {**fields, "forget_rate": rate, **_selection_fields(sums)}

  init = lambda: device_input.place(
    CoTeachingState(_init_nets(run, run.optimizer, 2), jnp.asarray(config.batch_size, jnp.int32)), run.replicated
  )
  return engine.Recipe(init=init, epoch=epoch, evaluate=_on_nets(_evaluate(run, 2)))


# ---------------------------------------------------------------------------
# DivideMix: two networks, a mixture split, co-refinement, co-guessing, mixup


class DivideMixState(NamedTuple):
  nets: step_lib.TrainState  # stacked pair
  losses: jax.Array  # float32 [2, N]: each network's per-sample losses, the mixture's inputs
  clean_prob: jax.Array  # float32 [2, N]: each network's mixture posterior of "clean"


def _dividemix_targets(config, probs, labels, other_prob):
  """Each network's training targets ``[2, B, C]`` and labelled masks ``[2, B]``."""
  labelled = other_prob > config.p_threshold
  refine = jax.vmap(dividemix.co_refine, in_axes=(0, None, 0, None))
  refined = refine(probs, labels, other_prob, config.sharpen_temperature)
  guessed = dividemix.co_guess(probs[0], probs[1], config.sharpen_temperature)
  return jnp.where(labelled[..., None], refined, guessed[None]), labelled


def dividemix_recipe(run):
  config = run.config
  batch_fn = _batch_fn(run)

  def objective(logits, targets):
    mixed_targets, labelled = targets  # _dividemix_targets' pair
    return dividemix.mixed_loss(logits, mixed_targets, labelled, config.lambda_u)

  update = _per_network(
    config, step_lib.make_update(run.model, run.optimizer, config, objective=objective, mesh=run.mesh)
  )
  warmup_update = _per_network(
    config, step_lib.make_update(run.model, run.optimizer, config, mesh=run.mesh), in_axes=(0, None, None)
  )
  logits_of_both = jax.vmap(lambda p, s, x: _train_logits(run.model, p, s, x), in_axes=(0, 0, None))
  mix = jax.vmap(dividemix.mixup, in_axes=(0, 0, 0, None))
  train_set_logits = _train_set_logits(run, networks=2)

  def warmup_step(state: DivideMixState, metrics, data, permutation, batch_index, key):
    _, batch, images = batch_fn(data, permutation, batch_index, key, state.nets.step[0])
    nets, loss, logits, stats = warmup_update(state.nets, images, batch.labels)
    metrics = step_lib.add_step_metrics(metrics, loss[0], logits[0], batch, _network0_stats(stats))
    return state._replace(nets=nets), metrics

  def step(state: DivideMixState, metrics, data, permutation, batch_index, key):
    nets = state.nets
    indices, batch, images = batch_fn(data, permutation, batch_index, key, nets.step[0])
    logits = logits_of_both(nets.params, nets.batch_stats, images)
    # Co-divide: each network learns from the other's split.
    other_prob = state.clean_prob[::-1][:, indices]
    targets, labelled = _dividemix_targets(config, jax.nn.softmax(logits), batch.labels, other_prob)
    mix_keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, nets.step[0]), 1), 2)
    images_2 = jnp.broadcast_to(images, (2, *images.shape))
    mixed_images, mixed_targets, _ = mix(mix_keys, images_2, targets, config.mixup_alpha)
    nets, loss, _, stats = update(nets, mixed_images, (mixed_targets, labelled))
    # The fit to the labels is judged on the batch itself, not its mixture.
    metrics = step_lib.add_step_metrics(metrics, loss[0], logits[0], batch, _network0_stats(stats))
    return state._replace(nets=nets), metrics

  steps = {"warmup": _jit_step(run, warmup_step), "train": _jit_step(run, step)}
  per_sample_loss = jax.jit(
    jax.vmap(optax.softmax_cross_entropy_with_integer_labels, in_axes=(0, None)),
  )

  def divide(state: DivideMixState, epoch: int) -> DivideMixState:
    losses = per_sample_loss(train_set_logits(state.nets.params, state.nets.batch_stats), run.data.train.labels)
    host_losses = np.asarray(jax.device_get(losses))
    # The mixture's k-means initialisation, seeded by (seed, epoch, network).
    seeds = np.random.SeedSequence([config.seed, epoch]).generate_state(2)
    prob = np.stack([dividemix.clean_probability(host_losses[k], seed=int(seeds[k])) for k in (0, 1)])
    return state._replace(
      losses=device_input.place(losses, run.replicated), clean_prob=device_input.place(prob, run.replicated)
    )

  def epoch(state: DivideMixState, epoch: int):
    warm = epoch <= config.pipeline_warmup_epochs
    selection = dict.fromkeys(("clean_precision", "clean_recall", "clean_fraction"))
    if not warm:
      state = divide(state, epoch)
      selected = np.asarray(state.clean_prob) > config.p_threshold
      noise_mask = np.broadcast_to(np.asarray(run.data.train.noise_mask), selected.shape)
      counts = jax.device_get(common.selection_counts(selected, noise_mask))
      selection = _selection_fields({k: float(v) for k, v in counts.items()})
    state, _, fields = _epoch(run, steps["warmup" if warm else "train"], state, epoch)
    fields.update(_optimizer_fields(run.optimizer, int(state.nets.step[0]) - 1))
    return state, {**fields, **selection}

  def init():
    n = run.data.train.size
    state = DivideMixState(_init_nets(run, run.optimizer, 2), jnp.zeros((2, n)), jnp.ones((2, n)))
    return device_input.place(state, run.replicated)

  return engine.Recipe(init=init, epoch=epoch, evaluate=_on_nets(_evaluate(run, 2)))


RECIPES = {
  "bootstrap": bootstrap_recipe,
  "co_teaching": co_teaching_recipe,
  "dividemix": dividemix_recipe,
  "plc": plc_recipe,
  "joint_optimization": joint_optimization_recipe,
}

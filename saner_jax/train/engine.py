"""The run machinery the trainer and the noise-robust pipelines share.

A :class:`Run` holds what one training run's pieces share (config, mesh,
data, model, optimizer, keys); a :class:`Recipe` is what a pipeline plugs
into the trainer (:func:`saner_jax.train.loop.train`): its state's
``init``, its ``epoch`` and its ``evaluate``. The default recipe,
:func:`supervised`, trains one network with the config's optimizer. This
module sits below both the trainer's orchestration (:mod:`.loop`) and the
pipelines (:mod:`.pipelines.recipes`, :mod:`.streaming`), which import it
and not each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax import _cli_signals
from saner_jax.train import device_input, probe
from saner_jax.train import step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig
from saner_jax.train.run_dir import RunDir


class EvalSet(NamedTuple):
  """A held-out set on the devices, padded to whole evaluation batches."""

  data: device_input.DeviceData
  valid: jax.Array  # False on the padding
  examples: int  # without the padding


@dataclasses.dataclass
class PreparedData:
  train: device_input.DeviceData
  test: device_input.DeviceData
  test_valid: jax.Array
  test_examples: int  # without the padding
  num_classes: int
  image_shape: tuple[int, int, int]
  realised_noise_rate: float
  info: Any  # the dataset's saner_jax.train.data.DatasetSpec
  val: EvalSet | None = None  # the validation set (--val_examples), None without one
  val_noise_rate: float | None = None  # the realised noise rate of its labels (0 with --val_clean)

  def eval_set(self, split: str) -> EvalSet:
    """``"test"`` or ``"val"``."""
    if split == "test":
      return EvalSet(self.test, self.test_valid, self.test_examples)
    if split == "val" and self.val is not None:
      return self.val
    raise ValueError(f"no {split!r} set in this run (the splits are 'test', and 'val' with --val_examples)")


def _eval_set(images: np.ndarray, labels: np.ndarray, batch: int, sharding: NamedSharding | None) -> EvalSet:
  pad = -len(labels) % batch
  valid = np.concatenate([np.ones(len(labels), bool), np.zeros(pad, bool)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
  labels = np.concatenate([labels, np.zeros(pad, np.int32)])
  return EvalSet(
    device_input.to_device(images, labels, sharding=sharding), device_input.place(valid, sharding), len(valid) - pad
  )


def split_indices(size: int, train_examples: int | None, val_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The training subset and the validation set: disjoint, sorted indices into the train split.

  One seeded permutation of the split: its first ``train_examples`` are the
  training subset and the next ``val_examples`` the validation set, so that
  holding out a validation set does not change the training data of a run
  with ``train_examples``. Without ``train_examples``, the validation set is
  the permutation's last ``val_examples`` and the rest trains.
  """
  if train_examples is None or train_examples >= size:
    if not val_examples:
      return np.arange(size), np.arange(0)
    train_examples = size - val_examples
  order = np.random.default_rng(seed).permutation(size)
  return np.sort(order[:train_examples]), np.sort(order[train_examples : train_examples + val_examples])


def prepare_data(config: TrainConfig, sharding: NamedSharding | None = None) -> PreparedData:
  """Loads the dataset, draws the seeded subset and validation set, and injects the label noise.

  The validation set's labels get the training labels' noise (same mode and
  rate, its own draw), unless ``config.val_clean``. ``sharding`` places the
  arrays (replicated in :func:`train`).
  """
  from saner_jax.train import data, noise

  info = config.spec
  source = cast(data.Source, config.data_source)  # validate() has checked it against data.SOURCES
  train = data.load_dataset(info, "train", data_dir=config.data_dir, source=source)
  test = data.load_dataset(info, "test", data_dir=config.data_dir, source=source)
  for field, split in (("train_examples", train), ("test_examples", test)):
    wanted = getattr(config, field)
    if wanted is not None and wanted > len(split):  # the published sizes were checked; a data_dir may hold fewer
      raise ConfigError(f"--{field}: {wanted} exceeds the {len(split)} examples of the data read; omit it to use all")
  if config.val_examples and config.val_examples + (config.train_examples or 1) > len(train):
    raise ConfigError(
      f"--val_examples: {config.val_examples} and --train_examples {config.train_examples} exceed the "
      f"{len(train)} examples of the data read; lower either"
    )
  train_idx, val_idx = split_indices(len(train), config.train_examples, config.val_examples, config.seed)
  test_idx = np.arange(len(test.labels))
  if config.test_examples is not None and config.test_examples < len(test_idx):
    test_idx = test_idx[: config.test_examples]

  if config.noise_mode == "real" and config.noise_label_key not in train.noisy_label_sets:
    raise ConfigError(
      f"--noise_label_key: {config.noise_label_key!r} is not a label set of "
      f"{config.dataset}; it has {sorted(train.noisy_label_sets)}"
    )

  def noisy_labels(indices: np.ndarray, seed: Any) -> Any:
    real = train.noisy_label_sets[config.noise_label_key][indices] if config.noise_mode == "real" else None
    return noise.inject_noise(
      train.labels[indices],
      num_classes=train.num_classes,
      mode=config.noise_mode,
      rate=config.noise_rate,
      seed=seed,
      dataset=config.dataset,
      images=train.images[indices],
      real_labels=real,
    )

  noisy = noisy_labels(train_idx, config.seed)
  if config.batch_size > len(train_idx):
    raise ConfigError(f"--batch_size: {config.batch_size} exceeds the {len(train_idx)} training examples")
  val, val_rate = None, None
  if len(val_idx):
    # Its own draw of the same noise: (seed, 1) is a seed no training run uses.
    val_noisy = noisy_labels(val_idx, [config.seed, 1])
    val_labels = val_noisy.true_labels if config.val_clean else val_noisy.labels
    val_rate = 0.0 if config.val_clean else float(val_noisy.rate)
    val = _eval_set(train.images[val_idx], val_labels, config.eval_batch_size, sharding)

  test_set = _eval_set(test.images[test_idx], test.labels[test_idx], config.eval_batch_size, sharding)
  return PreparedData(
    train=device_input.to_device(
      train.images[train_idx], noisy.labels, noisy.true_labels, noisy.noise_mask, sharding=sharding
    ),
    test=test_set.data,
    test_valid=test_set.valid,
    test_examples=test_set.examples,
    num_classes=train.num_classes,
    image_shape=tuple(train.images.shape[1:]),
    realised_noise_rate=float(noisy.rate),
    info=info,
    val=val,
    val_noise_rate=val_rate,
  )


class RunKeys(NamedTuple):
  """A run's random keys, all derived from its seed."""

  init: jax.Array
  shuffle: jax.Array  # with the epoch: each epoch's order
  augment: jax.Array  # with the step: each step's crops and flips


@dataclasses.dataclass(frozen=True)
class Run:
  """What the pieces of one run share; :func:`setup` builds it."""

  config: TrainConfig
  mesh: Mesh
  out_dir: pathlib.Path
  data: PreparedData
  model: Any  # a flax.linen.Module
  convolutions: Any  # saner_jax.cpu_conv.choose's choice, with its reason
  optimizer: step_lib.Optimizer
  keys: RunKeys
  display: str  # "bar", "lines" or "none" (always "none" off process 0)
  started: float  # time.perf_counter() before the data loaded
  input_path: str = "device"  # or "stream" (saner_jax.train.streaming), chosen by choose_input
  input_reason: str = ""

  @property
  def files(self) -> RunDir:
    """The run directory's files (:class:`saner_jax.train.run_dir.RunDir`)."""
    return RunDir(self.out_dir)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def primary(self) -> bool:
    """Whether this process writes the logs (process 0)."""
    return jax.process_index() == 0

  @property
  def steps_per_epoch(self) -> int:
    return self.data.train.size // self.config.batch_size  # drop the ragged last batch


class Recipe(NamedTuple):
  """What a training pipeline plugs into :func:`train`.

  Attributes:
    init: ``() -> state``, the initial state: any pytree of arrays placed on
      the run's devices. It is what checkpoints save and restore, so a
      pipeline keeps everything it carries across epochs in it.
    epoch: ``(state, epoch) -> (state, fields)`` trains epoch ``epoch``
      (numbered from 1); ``fields`` (floats or None) go into the epoch's
      metrics record. Randomness should derive from the run's keys and the
      epoch or step, so that a resumed run repeats an uninterrupted one.
    evaluate: ``(state, split) -> accuracy`` on ``split``, ``"test"``, or
      ``"val"`` when the run holds out a validation set
      (:meth:`PreparedData.eval_set`).
    iterator: the input pipeline's Grain iterator, saved with each
      checkpoint and restored on resume; None for the on-device path.
  """

  init: Callable[[], Any]
  epoch: Callable[[Any, int], tuple[Any, dict[str, Any]]]
  evaluate: Callable[[Any, str], float]
  iterator: Any = None


class Steps(NamedTuple):
  """The jitted functions of the supervised recipe."""

  train: Callable  # (state, metrics, data, permutation, batch_index, key) -> (state, metrics)
  eval: Callable  # (params, batch_stats, images, labels, valid) -> correct count


def compile_steps(run: Run, objective: step_lib.Objective = step_lib.label_cross_entropy) -> Steps:
  """The train and eval steps of :mod:`saner_jax.train.step` on the run's mesh, jitted.

  ``objective(logits, labels)`` is the training loss (default: cross-entropy).
  """
  spec = run.data.info
  # Replicated outputs keep the state where the next step (and orbax's
  # restore, which copies the shardings of the state) expects it.
  train_step = step_lib.make_train_step(run.model, run.optimizer, run.config, spec, mesh=run.mesh, objective=objective)
  eval_step = step_lib.make_eval_step(run.model, run.config, spec, mesh=run.mesh)
  return Steps(
    train=jax.jit(train_step, donate_argnums=(0, 1), out_shardings=run.replicated),
    eval=jax.jit(eval_step),
  )


@functools.cache
def _permuter(sharding: NamedSharding) -> Callable:
  """The jitted epoch permutation, its output placed by ``sharding``."""
  return jax.jit(device_input.epoch_permutation, static_argnums=2, out_shardings=sharding)


def run_epoch(run: Run, train_step: Callable, state: Any, epoch: int, metrics: dict) -> tuple[Any, dict[str, float]]:
  """One pass of ``train_step`` over the training set in the epoch's seeded order.

  ``metrics`` are the zeroed running sums the step adds to (at least
  :data:`saner_jax.train.step.METRIC_KEYS`); returns the state and the sums.
  Raises FloatingPointError when a loss, gradient or weight turned non-finite.
  """
  train_set = run.data.train
  permutation = _permuter(run.replicated)(run.keys.shuffle, epoch, train_set.size)
  batches = range(run.steps_per_epoch)
  if run.display == "bar":
    from tqdm.auto import tqdm

    batches = tqdm(batches, desc=f"epoch {epoch}/{run.config.epochs}", leave=False)
  for i in batches:
    _cli_signals.check()  # an interrupt a callback swallowed (no-op outside the CLI)
    state, metrics = train_step(state, metrics, train_set, permutation, i, run.keys.augment)
  sums = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if sums["nonfinite"] or not math.isfinite(sums["loss_sum"]):
    raise FloatingPointError(f"epoch {epoch}: non-finite loss, gradients or weights")
  return state, sums


def train_epoch(run: Run, steps: Steps, state: step_lib.TrainState, epoch: int) -> tuple[step_lib.TrainState, dict]:
  """One epoch of the supervised step; returns the state and the record fields."""
  metrics = jax.device_put(step_lib.zero_metrics(), run.replicated)
  state, sums = run_epoch(run, steps.train, state, epoch, metrics)
  optimizer = run.optimizer
  last_step = int(state.step) - 1
  return state, {
    **step_lib.epoch_metrics(sums, two_pass=optimizer.perturbation is not None),
    "lr": float(optimizer.lr(last_step)),
    "alpha": float(optimizer.alpha(last_step)) if optimizer.alpha else None,
  }


def evaluate(run: Run, eval_step: Callable, params: Any, batch_stats: Any, split: str = "test") -> float:
  """Accuracy of one network on ``split`` ("test" or "val"): one call of the compiled ``eval_step``."""
  held_out = run.data.eval_set(split)
  correct = eval_step(params, batch_stats, held_out.data.images, held_out.data.labels, held_out.valid)
  return float(correct) / held_out.examples


def supervised(run: Run, objective: step_lib.Objective = step_lib.label_cross_entropy) -> Recipe:
  """The default recipe: one network trained by the config's optimizer (:mod:`saner_jax.train.step`).

  ``objective(logits, labels)`` is its loss (default: cross-entropy).
  """
  steps = compile_steps(run, objective)
  measure = probe.make_probe(run.config, run.optimizer, run.data.num_classes, run.data.train, run.data.info)

  def epoch(state, epoch):
    state, fields = train_epoch(run, steps, state, epoch)
    return state, {**fields, **measure(state, epoch)}  # the mechanism probe, only when asked for

  def init():
    state = step_lib.init_state(run.model, run.optimizer, run.keys.init, run.data.image_shape)
    return device_input.place(state, run.replicated)

  return Recipe(
    init=init,
    epoch=epoch,
    evaluate=lambda state, split: evaluate(run, steps.eval, state.params, state.batch_stats, split),
  )

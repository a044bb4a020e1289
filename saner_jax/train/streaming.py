"""Streaming input pipeline: Grain reads, decodes and augments each batch on the host.

For datasets whose decoded images do not fit on the device (Mini-WebVision's
66k images at 224 px take 10 GB, Clothing1M's million 150 GB). The on-device
path (:mod:`saner_jax.train.device_input`) stays the default for those that fit;
:func:`choose` decides and says why.

One Grain iterator covers the whole run. Its elements are the run's
"slots": slot ``k`` is example ``j = k mod b`` of this process's part
(``b`` = batch / processes) of global step ``s = k div b``; in epoch
``e = s div steps_per_epoch + 1`` that is position
``p = (s mod steps_per_epoch) * batch + process_index * b + j`` of the
epoch's order, a permutation drawn from ``(seed, e)``. A host augmentation
(random-resized crop and flip, for photographs) draws from ``(seed, s, p)``;
the padded crop and flip of small images runs on the device from
``(seed, step)`` as in the on-device path. Every batch is therefore a pure
function of ``(seed, epoch, step)``, whatever the number of decoding
processes, and each process reads only its own part of each batch.

The iterator's position is saved in each orbax checkpoint (item ``input``),
so a resumed run continues at the next batch. Batches are decoded by
``--stream_workers`` processes (Grain's ``mp_prefetch``) and threads, and the
next two are placed on the devices while the current one trains.

The order differs from the on-device path's (numpy's permutation, not
``jax.random``'s), so the two paths train on the same data in different
orders and do not give bit-identical runs.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax.train import data as data_lib
from saner_jax.train import device_input, engine, folders
from saner_jax.train import step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig

# The on-device path is chosen when the decoded uint8 train and test images
# take at most this share of one device's memory (or of _CPU_DEVICE_BYTES).
DEVICE_SHARE = 0.25
_CPU_DEVICE_BYTES = 16 * 2**30


def _absl_flags_parsed() -> None:
  """Grain reads absl flags in its workers; a program that never parsed them (this one) marks them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class ImageSource:
  """Random access to one split's images as uint8 ``[H, W, 3]`` (or the stored shape); picklable for Grain.

  Either in-memory ``images`` (TFDS and IDX datasets) or image ``paths`` of
  a folder dataset, decoded at ``size``.
  """

  def __init__(self, images=None, paths=(), size=0, random_resized_crop=False, flip=True, layout="image_folder"):
    self.images, self.paths = images, tuple(paths)
    self.size, self.random_resized_crop, self.flip, self.layout = size, random_resized_crop, flip, layout

  def __len__(self) -> int:
    return len(self.images) if self.images is not None else len(self.paths)

  @property
  def augments_on_host(self) -> bool:
    """Whether training images get the random-resized crop and flip here rather than the device's padded crop."""
    return self.images is None and self.random_resized_crop

  def shape(self) -> tuple[int, int, int]:
    if self.images is None:
      return self.size, self.size, 3
    height, width, channels = self.images.shape[1:]  # [N, H, W, C], as ArrayDataset checks
    return height, width, channels

  def get(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Image ``i``; with ``rng`` (training, on-host augmentation) randomly cropped and flipped."""
    if self.images is not None:
      return self.images[i]
    image = folders.open_rgb(self.paths[i], self.layout)
    if rng is not None and self.random_resized_crop:
      return folders.random_resized_crop(image, self.size, rng, self.flip)
    return folders.resize_center(image, self.size, self.random_resized_crop)


@dataclasses.dataclass
class StreamSplit:
  """A split the streaming pipeline reads: images by index, and the labels of the noise bookkeeping."""

  source: ImageSource
  labels: np.ndarray
  true_labels: np.ndarray
  noise_mask: np.ndarray

  @property
  def size(self) -> int:
    return len(self.labels)


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  """The streaming pipeline's order of epoch ``epoch`` (from 1): a pure function of ``(seed, epoch)``."""
  return np.random.default_rng([seed, 0x57AE, epoch]).permutation(size)


class TrainElement:
  """Grain's map function: slot ``k`` of the run to one augmented example (the module docstring's formula)."""

  def __init__(self, split: StreamSplit, seed: int, steps_per_epoch: int, batch: int, local: int, offset: int):
    self.split, self.seed, self.steps_per_epoch = split, seed, steps_per_epoch
    self.batch, self.local, self.offset = batch, local, offset
    self._order: tuple[int, np.ndarray] | None = None

  def __getstate__(self):
    return {**self.__dict__, "_order": None}  # workers draw their own

  def order(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, epoch_order(self.seed, epoch, self.split.size))
    return self._order[1]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    step, j = divmod(int(k), self.local)
    epoch, b = divmod(step, self.steps_per_epoch)
    position = b * self.batch + self.offset + j
    i = int(self.order(epoch + 1)[position])
    source = self.split.source
    rng = np.random.default_rng([self.seed, step, position]) if source.augments_on_host else None
    return {
      "images": source.get(i, rng),
      "labels": self.split.labels[i],
      "true_labels": self.split.true_labels[i],
      "noise_mask": self.split.noise_mask[i],
    }


class EvalElement:
  """Grain's map function for evaluation: position ``k`` to an unaugmented image, zeros past the end."""

  def __init__(self, source: ImageSource, labels: np.ndarray):
    self.source, self.labels = source, labels

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    k = int(k)
    if k >= len(self.labels):
      return {"images": np.zeros(self.source.shape(), np.uint8), "labels": np.int32(0), "valid": np.bool_(False)}
    return {"images": self.source.get(k), "labels": self.labels[k], "valid": np.bool_(True)}


def workers(config: TrainConfig) -> int:
  """Decoding processes per host: ``--stream_workers``, or the CPU count up to 16."""
  return config.stream_workers if config.stream_workers is not None else min(16, os.cpu_count() or 1)


def _threads() -> int:
  return min(16, os.cpu_count() or 1)


def train_iterator(
  config: TrainConfig, split: StreamSplit, steps_per_epoch: int, *, process_index: int, process_count: int
):
  """The run's Grain iterator of this process's batches (dicts of numpy arrays), from the first step."""
  import grain

  _absl_flags_parsed()
  local = config.batch_size // process_count
  element = TrainElement(split, config.seed, steps_per_epoch, config.batch_size, local, process_index * local)
  dataset = grain.MapDataset.range(config.epochs * steps_per_epoch * local).map(element).batch(local)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=_threads(), prefetch_buffer_size=2 * local))
  n = workers(config)
  if n:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=n))
  return iter(iter_dataset)


def eval_batches(source: ImageSource, labels: np.ndarray, batch: int, workers_: int = 0) -> Iterator[dict]:
  """The whole split in batches of ``batch``, the last padded (``valid`` False), in order."""
  import grain

  _absl_flags_parsed()
  padded = -(-len(labels) // batch) * batch
  dataset = grain.MapDataset.range(padded).map(EvalElement(source, labels)).batch(batch)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=_threads(), prefetch_buffer_size=batch))
  if workers_:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers_))
  return iter(iter_dataset)


def to_devices(batches: Iterator[dict], sharding: NamedSharding, ahead: int = 2) -> Iterator[device_input.DeviceData]:
  """Host batches (this process's part) as global arrays split by ``sharding``, ``ahead`` of them in flight."""
  queue: collections.deque = collections.deque()

  def put(host: dict) -> device_input.DeviceData:
    fields = (host["images"], host["labels"], host["true_labels"], host["noise_mask"])
    return device_input.DeviceData(*(jax.make_array_from_process_local_data(sharding, np.asarray(x)) for x in fields))

  for host in batches:
    queue.append(put(host))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ---------------------------------------------------------------------------
# Choosing the input path, and preparing the streamed splits


def _device_bytes() -> int:
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # CPU devices do not report memory
    stats = {}
  return int(stats.get("bytes_limit", _CPU_DEVICE_BYTES))


def choose(config: TrainConfig) -> tuple[str, str]:
  """``("device" | "stream", why)``: ``--input_pipeline``, or for auto the decoded size against the device's memory."""
  if config.input_pipeline != "auto":
    return config.input_pipeline, f"--input_pipeline {config.input_pipeline}"
  spec = config.spec
  if (
    config.pipeline != "none"
    or config.noise_mode == "instance"
    or config.log_decomposition
    or config.sharpness_every
    or config.val_examples
  ):
    return "device", "auto: the chosen pipeline, noise, probe or validation set needs the on-device path"
  train = config.train_examples or spec.sizes["train"]
  test = config.test_examples or spec.sizes["test"]
  need = (train + test) * int(np.prod(spec.image_shape))
  budget = DEVICE_SHARE * _device_bytes()
  gib = f"{need / 2**30:.2f} GiB of uint8 images"
  if need <= budget:
    return "device", f"auto: {gib} fit in {DEVICE_SHARE:.0%} of a device's {budget / DEVICE_SHARE / 2**30:.0f} GiB"
  return "stream", f"auto: {gib} exceed {DEVICE_SHARE:.0%} of a device's {budget / DEVICE_SHARE / 2**30:.0f} GiB"


def train_indices(config: TrainConfig, size: int) -> np.ndarray:
  """The training examples used: all, or ``train_examples`` of them drawn from the seed (as the on-device path does)."""
  rng = np.random.default_rng(config.seed)
  idx = np.arange(size)
  if config.train_examples is not None and config.train_examples < size:
    idx = np.sort(rng.permutation(size)[: config.train_examples])
  return idx


@dataclasses.dataclass
class StreamData:
  """What :func:`prepare` gives the loop in place of ``engine.PreparedData`` (the same attributes)."""

  train: StreamSplit
  test: StreamSplit
  test_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  realised_noise_rate: float
  info: Any
  test_valid: Any = None
  val: Any = None  # no --val_examples on this path
  val_noise_rate: float | None = None


def _split(config: TrainConfig, spec, split: data_lib.Split):
  """``(source, labels, noisy_label_sets)`` of one split, decoding nothing for folder datasets."""
  if spec.layout is not None:
    index = folders.read_index(spec, split, config.data_dir)
    source = ImageSource(
      paths=index.paths, size=spec.image_shape[0], random_resized_crop=spec.random_resized_crop,
      flip=spec.flip, layout=spec.layout,
    )  # fmt: skip
    return source, index.labels, {}
  # validate() has checked data_source against data.SOURCES.
  data_source = cast(data_lib.Source, config.data_source)
  arrays = data_lib.load_dataset(spec, split, data_dir=config.data_dir, source=data_source)
  return ImageSource(images=arrays.images), arrays.labels, arrays.noisy_label_sets


def _subset(source: ImageSource, idx: np.ndarray) -> ImageSource:
  if source.images is not None:
    return ImageSource(images=source.images[idx])
  return ImageSource(
    paths=[source.paths[i] for i in idx], size=source.size, random_resized_crop=source.random_resized_crop,
    flip=source.flip, layout=source.layout,
  )  # fmt: skip


def prepare(config: TrainConfig) -> StreamData:
  """The streamed splits: the seeded training subset with its noise, and the test split; no image decoded.

  The same subset and noise as the on-device path's ``engine.prepare_data``.
  """
  from saner_jax.train import noise

  spec = config.spec
  train_source, train_labels, label_sets = _split(config, spec, "train")
  test_source, test_labels, _ = _split(config, spec, "test")
  for field, n in (("train_examples", len(train_labels)), ("test_examples", len(test_labels))):
    wanted = getattr(config, field)
    if wanted is not None and wanted > n:
      raise ConfigError(f"--{field}: {wanted} exceeds the {n} examples of the data read; omit it to use all")
  train_idx = train_indices(config, len(train_labels))
  real = label_sets[config.noise_label_key][train_idx] if config.noise_mode == "real" else None
  if config.noise_mode == "real" and config.noise_label_key not in label_sets:
    raise ConfigError(f"--noise_label_key: {config.noise_label_key!r} is not a label set of {config.dataset}")
  noisy = noise.inject_noise(
    train_labels[train_idx], num_classes=spec.num_classes, mode=config.noise_mode, rate=config.noise_rate,
    seed=config.seed, dataset=config.dataset, real_labels=real,
  )  # fmt: skip
  if config.batch_size > len(train_idx):
    raise ConfigError(f"--batch_size: {config.batch_size} exceeds the {len(train_idx)} training examples")
  n_test = len(test_labels) if config.test_examples is None else config.test_examples
  test_idx = np.arange(n_test)
  train = StreamSplit(_subset(train_source, train_idx), noisy.labels, noisy.true_labels, noisy.noise_mask)
  test_labels = test_labels[test_idx]
  test = StreamSplit(_subset(test_source, test_idx), test_labels, test_labels, np.zeros(n_test, bool))
  return StreamData(
    train=train, test=test, test_examples=n_test, num_classes=spec.num_classes,
    image_shape=train.source.shape(), realised_noise_rate=float(noisy.rate), info=spec,
  )  # fmt: skip


# ---------------------------------------------------------------------------
# The supervised recipe on streamed batches


def make_step(run, host_augmented: bool):
  """``step(state, metrics, batch, key) -> (state, metrics)`` on one streamed batch: the on-device path's step
  without the gather (the batch arrives split over the devices)."""
  config, spec = run.config, run.data.info
  update = step_lib.make_update(run.model, run.optimizer, config, mesh=run.mesh)

  def step(state, metrics, batch: device_input.DeviceData, key):
    images = batch.images
    if config.augment and not host_augmented:
      images = device_input.random_crop_flip(jax.random.fold_in(key, state.step), images, spec.crop_padding, spec.flip)
    x = device_input.normalize(images, spec.mean, spec.std, config.compute_dtype)
    new_state, loss, logits, gradient_stats = update(state, x, batch.labels)
    return new_state, step_lib.add_step_metrics(metrics, loss, logits, batch, gradient_stats)

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=run.replicated)


def predictions(run, params, batch_stats, source: ImageSource, labels: np.ndarray) -> np.ndarray:
  """The model's classes for every image of ``source`` (evaluation mode, no augmentation), on the host."""
  predict = _predictor(run)
  out = []
  # Every process decodes whole evaluation batches (replicated): evaluation is short next to training.
  for batch in eval_batches(source, labels, run.config.eval_batch_size):
    images = jax.device_put(batch["images"], run.replicated)
    out.append(np.asarray(jax.device_get(predict(params, batch_stats, images)))[batch["valid"]])
  return np.concatenate(out) if out else np.zeros(0, np.int32)


_PREDICTORS: dict[int, Any] = {}


def _predictor(run):
  key = id(run)
  if key not in _PREDICTORS:
    spec, config = run.data.info, run.config

    def predict(params, batch_stats, images):
      x = device_input.normalize(images, spec.mean, spec.std, config.compute_dtype)
      return jnp.argmax(run.model.apply({"params": params, "batch_stats": batch_stats}, x, train=False), -1)

    _PREDICTORS.clear()
    _PREDICTORS[key] = jax.jit(predict)
  return _PREDICTORS[key]


def supervised(run):
  """The default recipe on streamed batches; its Grain iterator is saved with each checkpoint."""
  config, train = run.config, run.data.train
  step = make_step(run, train.source.augments_on_host)
  iterator = train_iterator(
    config, train, run.steps_per_epoch, process_index=jax.process_index(), process_count=jax.process_count()
  )
  batch_sharding = NamedSharding(run.mesh, P("data"))

  def epoch(state, epoch):
    metrics = jax.device_put(step_lib.zero_metrics(), run.replicated)
    # Exactly one epoch's batches are taken from the iterator, so that the
    # position saved with the epoch's checkpoint is that of the next batch
    # to train on, not of those placed on the devices ahead of it.
    for batch in to_devices(itertools.islice(iterator, run.steps_per_epoch), batch_sharding):
      state, metrics = step(state, metrics, batch, run.keys.augment)
    sums = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if sums["nonfinite"] or not np.isfinite(sums["loss_sum"]):
      raise FloatingPointError(f"epoch {epoch}: non-finite loss, gradients or weights")
    last_step = int(state.step) - 1
    return state, {
      **step_lib.epoch_metrics(sums, two_pass=run.optimizer.perturbation is not None),
      "lr": float(run.optimizer.lr(last_step)),
      "alpha": float(run.optimizer.alpha(last_step)) if run.optimizer.alpha else None,
    }

  def init():
    state = step_lib.init_state(run.model, run.optimizer, run.keys.init, run.data.image_shape)
    return device_input.place(state, run.replicated)

  def evaluate(state, split="test"):
    if split != "test":
      raise ValueError(f"the streaming path evaluates the test split only, not {split!r}")
    test = run.data.test
    predicted = predictions(run, state.params, state.batch_stats, test.source, test.labels)
    return float(np.mean(predicted == test.labels))

  return engine.Recipe(init=init, epoch=epoch, evaluate=evaluate, iterator=iterator)


# ---------------------------------------------------------------------------
# Real-noise datasets


def real_noise_note(config: TrainConfig) -> str | None:
  """What the trainer can report for a dataset whose labels are noisy with no noise mask; None otherwise."""
  spec = config.spec
  if not spec.real_noise or config.noise_mode != "none":
    return None
  extra = (
    "; on the training examples with a verified label, memorisation (verified_*)" if spec.layout == "clothing1m" else ""
  )
  return (
    f"{config.dataset} has real label noise and no noise mask: reporting test accuracy and the agreement "
    f"with the given labels (train_acc), not clean accuracy or memorisation{extra}"
  )


def with_real_noise_fields(run, recipe):
  """``recipe`` with the fields a real-noise dataset cannot measure set to None, and Clothing1M's verified-subset
  memorisation added (for recipes whose state has ``params`` and ``batch_stats``)."""
  config = run.config
  if real_noise_note(config) is None:
    return recipe
  spec = config.spec
  verified = None
  if spec.layout == "clothing1m":
    index = folders.read_index(spec, "train", config.data_dir)
    idx = train_indices(config, len(index))
    where = folders.verified_subset(index, idx)
    chosen = idx[where]
    source = ImageSource(
      paths=[index.paths[i] for i in chosen], size=spec.image_shape[0], random_resized_crop=spec.random_resized_crop,
      layout=spec.layout,
    )  # fmt: skip
    verified = (source, index.labels[chosen], index.clean_labels[chosen])  # type: ignore[index]

  def epoch(state, n):
    state, fields = recipe.epoch(state, n)
    fields = {**fields, "clean_acc": None, "noisy_memorised": None, "noisy_true": None, "fit_gap": None}
    if verified is not None and hasattr(state, "params"):
      fields.update(verified_fields(predictions(run, state.params, state.batch_stats, verified[0], verified[1]),
                                    verified[1], verified[2]))  # fmt: skip
    return state, fields

  return engine.Recipe(recipe.init, epoch, recipe.evaluate, recipe.iterator)


def verified_fields(predicted: np.ndarray, given: np.ndarray, verified: np.ndarray) -> dict[str, float | None]:
  """Memorisation where both labels exist (Clothing1M's verified subset).

  ``verified_clean_acc``: predictions equal to the label where the given and
  verified labels agree; ``verified_noisy_memorised``: equal to the given
  (wrong) label where they differ; ``verified_noisy_true``: equal to the
  verified label there; ``verified_noise_rate``: the share that differ.
  """
  wrong = given != verified
  n = len(given)

  def rate(hits, where):
    return float(np.mean(hits[where])) if where.any() else None

  return {
    "verified_examples": float(n),
    "verified_noise_rate": float(np.mean(wrong)) if n else None,
    "verified_clean_acc": rate(predicted == given, ~wrong),
    "verified_noisy_memorised": rate(predicted == given, wrong),
    "verified_noisy_true": rate(predicted == verified, wrong),
  }

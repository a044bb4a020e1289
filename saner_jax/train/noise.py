"""Seeded label-noise injection, in numpy, with the noise mask and realised rate.

``inject_noise(labels, num_classes=..., mode=..., rate=..., seed=...)``
returns :class:`NoisyLabels`: the noisy labels, the true ones, a boolean
mask of where they differ, and the realised noise rate. Modes:

=============  ===========================================================
``none``       labels unchanged.
``symmetric``  exactly ``round(rate * N)`` samples, chosen uniformly, each
               moved to one of the other ``K - 1`` classes uniformly.
``uniform``    each label, with probability ``rate``, redrawn uniformly
               over all ``K`` classes; it may come back unchanged, so the
               realised rate is about ``rate * (K - 1) / K``.
``asymmetric`` class ``c`` moves to ``asymmetric_map(dataset)[c]``: exactly
               ``round(rate * n_c)`` samples of each class that has a
               different target (documented maps, see below).
``pair_flip``  the same with the target ``(c + 1) mod K`` for every class.
``instance``   instance-dependent (Xia et al., 2020): each sample gets its
               own flip probability, and its wrong label follows a random
               projection of its image.
``real``       given human labels (CIFAR-N's ``worse_label``, ...).
=============  ===========================================================

Every draw comes from ``np.random.default_rng(seed)``, and in an order that
does not depend on ``rate``: for a fixed seed, the samples corrupted at a
lower rate are a subset of those corrupted at a higher one, with the same
wrong labels (symmetric, uniform, asymmetric, pair_flip).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from saner_jax.train import data, registry
from saner_jax.train.errors import fail, in_unit_interval

if TYPE_CHECKING:
  from saner_jax.train.config import TrainConfig

_log = logging.getLogger(__name__)

# The modes built into inject_noise; the synthetic ones between them are registry entries
# (saner_jax.train.registry.NoiseMode), registered at the end of this module.
NO_NOISE, REAL_NOISE = "none", "real"


def modes() -> tuple[str, ...]:
  """Every noise mode: ``none``, the registered synthetic modes in registration order, ``real``."""
  return (NO_NOISE, *registry.noise_modes(), REAL_NOISE)


class NoiseRequest(NamedTuple):
  """What a synthetic mode's ``draw`` gets (:class:`saner_jax.train.registry.NoiseMode`).

  Attributes:
    true: int32 ``[N]``, the true labels.
    num_classes: K.
    rate: the nominal rate, already checked against the mode's ``max_rate``.
    rng: the seeded generator every draw comes from.
    dataset: the dataset's name, or None (the class-map modes need it).
    images: ``[N, ...]`` images, or None (instance noise needs them).
  """

  true: np.ndarray
  num_classes: int
  rate: float
  rng: np.random.Generator
  dataset: str | None
  images: np.ndarray | None


# Standard deviation of the per-sample flip rates of instance noise (Xia et
# al., 2020, use 0.1).
INSTANCE_RATE_STD = 0.1

# CIFAR-100's 20 super-classes (coarse labels, in coarse-label index order)
# and their five fine classes each, as listed on the dataset's page
# https://www.cs.toronto.edu/~kriz/cifar.html with the fine names spelt as in
# the dataset's fine_label_names.
CIFAR100_SUPERCLASSES: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
})  # fmt: skip


def _cifar100_next_in_superclass() -> dict[str, str]:
  """Each fine class to the next one of its super-class, in fine-label order.

  Within a super-class the five classes, sorted by fine label index, form a
  cycle: the last one goes to the first.
  """
  index = {name: i for i, name in enumerate(data.DATASETS["cifar100"].class_names)}
  out: dict[str, str] = {}
  for members in CIFAR100_SUPERCLASSES.values():
    ordered = sorted(members, key=index.__getitem__)
    out.update(zip(ordered, ordered[1:] + ordered[:1]))
  return out


# Asymmetric (class-conditional) noise: source class -> target class, by
# class name; classes not listed keep their labels.
ASYMMETRIC_MAPS: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
    # Patrini et al., 2017: truck -> automobile, bird -> airplane,
    # deer -> horse, cat <-> dog.
    "cifar10": types.MappingProxyType({
        "truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat",
    }),
    # Next class within the super-class (see _cifar100_next_in_superclass).
    "cifar100": types.MappingProxyType(_cifar100_next_in_superclass()),
    # Ma et al., 2018 and later work: 7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8.
    "mnist": types.MappingProxyType({"7": "1", "2": "7", "5": "6", "6": "5", "3": "8"}),
    # Our choice: swaps of the visually closest pairs.
    "fashion_mnist": types.MappingProxyType({
        "T-shirt/top": "Shirt", "Shirt": "T-shirt/top",
        "Pullover": "Coat", "Coat": "Pullover",
        "Sandal": "Sneaker", "Sneaker": "Sandal",
    }),
})  # fmt: skip

# CIFAR-N holds CIFAR's images and true labels, so CIFAR's maps apply.
_MAP_ALIASES = {"cifar10_n": "cifar10", "cifar100_n": "cifar100"}


def asymmetric_map(dataset: str) -> np.ndarray:
  """Target class of each class under asymmetric noise, int32 ``[K]``.

  ``out[c] == c`` for the classes that keep their labels.

  Raises:
    ValueError: no map is defined for ``dataset``.
  """
  base = _MAP_ALIASES.get(dataset, dataset)
  if base not in ASYMMETRIC_MAPS:
    known = sorted([*ASYMMETRIC_MAPS, *_MAP_ALIASES])
    raise ValueError(
      f"no asymmetric noise map for dataset {dataset!r}; maps exist for {known}. "
      "Use mode='pair_flip' or 'symmetric', or pass dataset= with one of those."
    )
  names = data.DATASETS[base].class_names
  index = {name: i for i, name in enumerate(names)}
  target = np.arange(len(names), dtype=np.int32)
  for source, dest in ASYMMETRIC_MAPS[base].items():
    target[index[source]] = index[dest]
  return target


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
  """Training labels after noise injection.

  Attributes:
    labels: int32 ``[N]``, the labels to train on.
    true_labels: int32 ``[N]``, the labels before noise.
    noise_mask: bool ``[N]``, True exactly where ``labels != true_labels``.
      A sample that ``uniform`` noise redrew to its own class is not in the
      mask: the mask says "this label is wrong", not "this sample was drawn".
    rate: realised noise rate, ``noise_mask.mean()``.
    mode: the noise mode, one of :func:`modes`.
    nominal_rate: the requested rate; 0.0 for ``none``, None for ``real``.
  """

  labels: np.ndarray
  true_labels: np.ndarray
  noise_mask: np.ndarray
  rate: float
  mode: str
  nominal_rate: float | None

  def __post_init__(self):
    for name, dtype in (("labels", np.int32), ("true_labels", np.int32), ("noise_mask", np.bool_)):
      value = getattr(self, name)
      if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
        raise TypeError(f"{name} must be a 1-D {np.dtype(dtype)} numpy array")
    if not self.labels.shape == self.true_labels.shape == self.noise_mask.shape:
      raise ValueError(
        f"labels {self.labels.shape}, true_labels {self.true_labels.shape} and "
        f"noise_mask {self.noise_mask.shape} must have the same shape"
      )
    if not np.array_equal(self.noise_mask, self.labels != self.true_labels):
      raise ValueError("noise_mask must equal labels != true_labels")
    realised = float(self.noise_mask.mean()) if self.noise_mask.size else 0.0
    if not math.isclose(self.rate, realised, abs_tol=1e-12):
      raise ValueError(f"rate {self.rate} is not the realised rate {realised}")
    if self.mode not in modes():
      raise ValueError(f"mode must be one of {modes()}, got {self.mode!r}")

  def subset(self, indices: np.ndarray | Sequence[int]) -> NoisyLabels:
    """The samples at ``indices``, with their own realised rate."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    return _make(self.labels[idx], self.true_labels[idx], self.mode, self.nominal_rate)

  def summary(self) -> str:
    """One line for logs: mode, nominal and realised rates, counts."""
    nominal = "n/a" if self.nominal_rate is None else f"{self.nominal_rate:g}"
    return (
      f"{self.mode} label noise: nominal rate {nominal}, realised rate {self.rate:.4f} "
      f"({int(self.noise_mask.sum())} of {self.labels.size} labels differ from the true ones)"
    )


def _make(labels: np.ndarray, true: np.ndarray, mode: str, nominal: float | None) -> NoisyLabels:
  mask = labels != true
  return NoisyLabels(
    labels=labels,
    true_labels=true,
    noise_mask=mask,
    rate=float(mask.mean()) if mask.size else 0.0,
    mode=mode,
    nominal_rate=nominal,
  )


def max_rate(mode: str, num_classes: int) -> float:
  """The highest rate at which the true class stays the most likely label.

  Beyond it each class's labels are mostly one wrong class (class-map and
  instance modes) or the true class is the least likely label (symmetric):
  the noise stops being noise. At the bound itself the true label ties.
  """
  entry = registry.noise_modes().get(mode)
  return 1.0 if entry is None else entry.max_rate(num_classes)


def _as_labels(name: str, values, n: int | None, num_classes: int) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
  if n is not None and array.shape[0] != n:
    raise ValueError(f"{name} must have {n} entries like labels, got {array.shape[0]}")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{name} must hold integers, got {array.dtype}")
  if array.size and (array.min() < 0 or array.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{array.min()}, {array.max()}]")
  return array.astype(np.int32)


def _check_rate(mode: str, rate, num_classes: int) -> float:
  if rate is None:
    raise ValueError(f"rate is required for mode {mode!r}")
  try:
    value = float(rate)
  except (TypeError, ValueError):
    raise TypeError(f"rate must be a float, got {rate!r}") from None
  if not 0.0 <= value <= 1.0:  # NaN fails too
    raise ValueError(f"rate must be in [0, 1], got {rate}")
  bound = max_rate(mode, num_classes)
  if value > bound:
    hint = " (for random labels use mode='uniform', rate=1)" if mode == "symmetric" else ""
    raise ValueError(
      f"rate {value} is too high for mode {mode!r} with {num_classes} classes: above "
      f"{bound:g} the true class is no longer the most likely label{hint}"
    )
  return value


def _symmetric(true, num_classes, rate, rng):
  n = true.shape[0]
  order = rng.permutation(n)
  # An offset in 1..K-1 added mod K reaches every other class once, never c.
  offsets = rng.integers(1, num_classes, size=n)
  chosen = order[: round(rate * n)]
  labels = true.copy()
  labels[chosen] = (true[chosen] + offsets[: chosen.size]) % num_classes
  return labels


def _uniform(true, num_classes, rate, rng):
  n = true.shape[0]
  redraw = rng.random(n) < rate
  fresh = rng.integers(0, num_classes, size=n)
  return np.where(redraw, fresh, true).astype(np.int32)


def _class_map(true, target, rate, rng):
  labels = true.copy()
  for c in range(target.shape[0]):
    members = np.flatnonzero(true == c)
    # Drawn for every class, flipping or not, so one class's draw does not
    # depend on which other classes have a map entry.
    order = rng.permutation(members.size)
    if target[c] != c:
      labels[members[order[: round(rate * members.size)]]] = target[c]
  return labels


def _instance(true, images, num_classes, rate, rng):
  """Instance-dependent noise after Xia et al. (2020), "Part-dependent label noise".

  1. Flip rates ``q_n`` from a normal(rate, 0.1) truncated to
     ``[0, 2 * rate]``: symmetric about ``rate``, so ``E[q_n] = rate`` exactly
     (Xia et al. truncate to [0, 1], which raises the mean at low rates).
  2. Per class ``c`` a projection ``W_c`` ``[D, K]`` with standard normal
     entries; ``x_n`` is the flattened image standardised over its own
     pixels (zero mean, unit variance; Xia et al. normalise per dataset
     channel), so every image gets logits of the same scale.
  3. ``p_n = softmax(x_n W_{y_n})`` with the true class masked out; with
     probability ``q_n`` the label becomes a draw from ``p_n``.

  The logits have a scale of about ``sqrt(D)``, so ``p_n`` is close to one
  class: the wrong label is nearly a function of the image.
  """
  n = true.shape[0]
  features = images.reshape(n, -1)
  dist = statistics.NormalDist(rate, INSTANCE_RATE_STD)
  # Inverse-CDF sampling of the truncated normal; the bounds' CDFs are > 0
  # and < 1 because rate <= 0.5 keeps them within 5 standard deviations.
  u = rng.uniform(dist.cdf(0.0), dist.cdf(2 * rate), size=n)
  flip_rate = np.fromiter(map(dist.inv_cdf, u.tolist()), np.float64, n)
  flips = rng.random(n) < flip_rate
  pick = rng.random(n)
  labels = true.copy()
  for c in range(num_classes):
    projection = rng.standard_normal((features.shape[1], num_classes), dtype=np.float32)
    members = np.flatnonzero(flips & (true == c))
    if not members.size:
      continue
    x = features[members].astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    # A constant image has no direction: its zero logits give a uniform draw.
    x /= np.maximum(x.std(axis=1, keepdims=True), 1e-6)
    logits = (x @ projection).astype(np.float64)
    logits[:, c] = -np.inf
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    # First class whose CDF exceeds u * total; a zero-probability class (the
    # true one) never does, since its CDF equals its predecessor's.
    labels[members] = np.argmax(cdf > pick[members, None] * cdf[:, -1:], axis=1)
  return labels


def _asymmetric(request: NoiseRequest) -> np.ndarray:
  if request.dataset is None:
    raise ValueError("mode 'asymmetric' needs dataset= to choose its class map")
  target = asymmetric_map(request.dataset)
  if target.shape[0] != request.num_classes:
    raise ValueError(
      f"the asymmetric map of {request.dataset!r} has {target.shape[0]} classes, num_classes is {request.num_classes}"
    )
  return _class_map(request.true, target, request.rate, request.rng)


def _pair_flip(request: NoiseRequest) -> np.ndarray:
  target = (np.arange(request.num_classes, dtype=np.int32) + 1) % request.num_classes
  return _class_map(request.true, target, request.rate, request.rng)


def _instance_request(request: NoiseRequest) -> np.ndarray:
  true, images = request.true, request.images
  if images is None:
    raise ValueError("mode 'instance' needs images")
  images = np.asarray(images)
  if images.shape[0] != true.shape[0] or images.ndim < 2:
    raise ValueError(f"images must have shape [{true.shape[0]}, ...] like labels, got {images.shape}")
  return _instance(true, images, request.num_classes, request.rate, request.rng)


def inject_noise(
  labels: np.ndarray | Sequence[int],
  *,
  num_classes: int,
  mode: str,
  rate: float | None = None,
  seed: int | Sequence[int] = 0,
  dataset: str | None = None,
  images: np.ndarray | None = None,
  real_labels: np.ndarray | None = None,
) -> NoisyLabels:
  """Corrupts labels with seeded noise and reports the realised rate.

  Args:
    labels: the true labels, integers in ``[0, num_classes)``, shape ``[N]``.
    num_classes: K, at least 2.
    mode: one of :func:`modes` (see the module docstring).
    rate: the nominal noise rate in ``[0, 1]``, required by the synthetic
      modes, and at most ``max_rate(mode, num_classes)``; ignored by
      ``none`` and ``real``.
    seed: seed of ``np.random.default_rng``; the same arguments and seed give
      the same labels.
    dataset: a dataset name, needed by ``asymmetric`` to pick its map.
    images: ``[N, ...]`` images (any numeric dtype), needed by ``instance``.
    real_labels: ``[N]`` human labels, needed by ``real``.

  Arguments a mode does not use are ignored, so a caller may always pass them.

  Returns:
    ``NoisyLabels``; its ``rate`` is the realised rate, also logged at INFO.

  Raises:
    ValueError: an unknown mode, a bad rate (the message names ``rate``),
      labels out of range, a missing input the mode needs, or
      ``asymmetric`` for a dataset without a map.
  """
  if mode not in modes():
    raise ValueError(f"unknown noise mode {mode!r}; modes: {', '.join(modes())}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"num_classes must be an int, got {num_classes!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  true = _as_labels("labels", labels, None, num_classes)
  if true.size == 0:
    raise ValueError("labels is empty")
  n = true.shape[0]

  if mode == NO_NOISE:
    result = _make(true.copy(), true, mode, 0.0)
  elif mode == REAL_NOISE:
    if real_labels is None:
      raise ValueError("mode 'real' needs real_labels (e.g. CIFAR-N's worse_label)")
    result = _make(_as_labels("real_labels", real_labels, n, num_classes), true, mode, None)
  else:
    value = _check_rate(mode, rate, num_classes)
    request = NoiseRequest(true, num_classes, value, np.random.default_rng(seed), dataset, images)
    # A registered draw is a user's code: its labels are checked like the caller's.
    noisy = _as_labels(f"the labels mode {mode!r} drew", registry.noise_modes()[mode].draw(request), n, num_classes)
    result = _make(noisy, true, mode, value)
  _log.info(result.summary())
  return result


def transition_matrix(
  true_labels: np.ndarray,
  noisy_labels: np.ndarray,
  num_classes: int,
  *,
  normalize: bool = True,
) -> np.ndarray:
  """Empirical noise transition matrix ``T[i, j] = P(noisy = j | true = i)``.

  Args:
    true_labels: ``[N]`` integers in ``[0, num_classes)``.
    noisy_labels: ``[N]`` integers in ``[0, num_classes)``.
    num_classes: K.
    normalize: divide each row by its count; False returns the counts.

  Returns:
    float64 ``[K, K]``; a class with no samples has a row of zeros.
  """
  true = _as_labels("true_labels", true_labels, None, num_classes)
  noisy = _as_labels("noisy_labels", noisy_labels, true.shape[0], num_classes)
  counts = (
    np.bincount(true.astype(np.int64) * num_classes + noisy, minlength=num_classes * num_classes)
    .reshape(num_classes, num_classes)
    .astype(np.float64)
  )
  if not normalize:
    return counts
  totals = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def check_config(config: TrainConfig, spec: data.DatasetSpec) -> None:
  """The noise flags' checks, for the trainer's config: the rate, then the mode's own check.

  Raises:
    ConfigError: a one-line error naming the flag and the fix.
  """
  in_unit_interval(config, "noise_rate")
  entry = registry.noise_modes().get(config.noise_mode)
  if entry is not None:
    highest = entry.max_rate(spec.num_classes)
    if config.noise_rate > highest:
      fail(
        "noise_rate",
        f"{config.noise_mode} noise on {spec.num_classes} classes is defined up to {highest:.3g}, "
        f"got {config.noise_rate}",
      )
    if entry.check is not None:
      entry.check(config, spec)
  if config.noise_mode == REAL_NOISE:
    if not spec.noisy_label_keys:
      fail("noise_mode", f"'real' needs human labels; {config.dataset} has none (use cifar10_n or cifar100_n)")
    if config.noise_label_key not in spec.noisy_label_keys:
      fail("noise_label_key", f"{config.dataset} has {list(spec.noisy_label_keys)}, got {config.noise_label_key!r}")


def _needs_a_class_map(config: TrainConfig, spec: data.DatasetSpec) -> None:
  try:
    asymmetric_map(config.dataset)
  except ValueError as e:
    fail("noise_mode", str(e))


def _half(num_classes: int) -> float:
  """Class-map and instance noise: above 1/2 a class's labels are mostly one wrong class."""
  return 0.5


# The built-in synthetic modes, in the order --help lists them.
for _entry in (
  registry.NoiseMode(
    "symmetric",
    lambda request: _symmetric(request.true, request.num_classes, request.rate, request.rng),
    # Above (K - 1) / K the true class becomes the least likely label.
    max_rate=lambda num_classes: (num_classes - 1) / num_classes,
  ),
  registry.NoiseMode("uniform", lambda request: _uniform(request.true, request.num_classes, request.rate, request.rng)),
  registry.NoiseMode("asymmetric", _asymmetric, max_rate=_half, check=_needs_a_class_map),
  registry.NoiseMode("pair_flip", _pair_flip, max_rate=_half),
  registry.NoiseMode("instance", _instance_request, max_rate=_half),
):
  registry.register_noise_mode(_entry)

"""The toolkit's extension points: registries of perturbations, pipelines, noise modes, models and datasets.

An entry owns everything the trainer knows about it: how to build it, the
config fields only it reads (which may then be set only with it), the checks
of their values, and what it adds to a run's figure and to ``compare``'s
table. The config, the optimizer factory, the trainer and the reports read
the entries; none of them lists the perturbations or the pipelines itself.

Adding one is one call, in your own code or next to a built-in's::

  from saner_jax.train import registry

  registry.register_perturbation(
    registry.Perturbation("my_sam", build=lambda config: my_sam(config.rho))
  )
  # python -m saner_jax.train --optimizer my_sam --saner true ...

Reading a registry loads no flax: builders and recipes are called only when a
run is built. ``data.DATASETS`` and ``models.MODELS`` are live, read-only
views of the dataset and model registries.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  import numpy as np
  import optax

  from saner_jax.train.config import TrainConfig
  from saner_jax.train.data import DatasetSpec
  from saner_jax.train.engine import Recipe, Run
  from saner_jax.train.noise import NoiseRequest

Check = Callable[["TrainConfig"], None]
# (metric key, title): a panel of the run's figure, or a column of compare's table.
Report = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """An ascent family, ``--optimizer NAME``.

  Attributes:
    name: the ``--optimizer`` value.
    build: the config's perturbation, a transform of :mod:`saner_jax.perturbations`'
      kind (the ascent direction for the second pass); None for a one-pass step.
    update: a transform put first in the update chain, before SANER and weight
      decay (GSAM's projection), or None.
    fields: the config fields only this family reads; set with another, they are refused.
    check: raises :class:`~saner_jax.train.config.ConfigError` for bad values of ``fields``.
    two_pass: whether the step takes the second, perturbed pass; False only for plain SGD,
      which SANER, the group substitutions and the ``--sam_policy`` need.
  """

  name: str
  build: Callable[[TrainConfig], optax.GradientTransformation | None]
  update: Callable[[TrainConfig], optax.GradientTransformation] | None = None
  fields: tuple[str, ...] = ()
  check: Check | None = None
  two_pass: bool = True


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A noise-robust training pipeline, ``--pipeline NAME``.

  Attributes:
    name: the ``--pipeline`` value.
    recipe: the trainer recipe (:class:`saner_jax.train.engine.Recipe`) of a run.
    fields: the config fields only this pipeline reads; set without it, they are refused.
    check: raises :class:`~saner_jax.train.config.ConfigError` for bad values of ``fields``.
    panels: the figure panels of the metrics it logs, ``(key, title)``.
    columns: the ``compare`` table columns of its final metrics, ``(key, title)``.
  """

  name: str
  recipe: Callable[[Run], Recipe]
  fields: tuple[str, ...] = ()
  check: Check | None = None
  panels: Report = ()
  columns: Report = ()


def _any_rate(num_classes: int) -> float:
  return 1.0


@dataclasses.dataclass(frozen=True)
class NoiseMode:
  """A synthetic label-noise mode, ``--noise_mode NAME`` and ``noise.inject_noise(mode=NAME)``.

  ``none`` and ``real`` (given human labels) are built into ``inject_noise``
  and reserved.

  Attributes:
    name: the ``--noise_mode`` value.
    draw: the noisy labels, int ``[N]``, of a :class:`saner_jax.train.noise.NoiseRequest`
      (the true labels, the class count, the rate, a seeded numpy generator, and the dataset
      name and images for the modes that need them); every random draw from its generator.
    max_rate: ``max_rate(K)``, the highest rate at which the true class stays the most
      likely label with ``K`` classes; a higher ``--noise_rate`` is refused.
    check: raises :class:`~saner_jax.train.config.ConfigError` for a run this mode cannot
      make, called with the config and the dataset's spec (a dataset without a class map).
  """

  name: str
  draw: Callable[[NoiseRequest], np.ndarray]
  max_rate: Callable[[int], float] = _any_rate
  check: Callable[[TrainConfig, DatasetSpec], None] | None = None


@dataclasses.dataclass(frozen=True)
class Model:
  """A network, ``--model NAME``.

  Attributes:
    name: the ``--model`` value.
    build: ``build(num_classes=, dtype=, conv_general_dilated=)`` returning a flax linen module
      applied as ``model.apply(variables, images, train=...)`` to NHWC images, with its BatchNorm
      statistics in the ``batch_stats`` collection, every convolution through
      ``conv_general_dilated`` (None: XLA's), computing in ``dtype`` and returning float32
      logits. A ``min_input_size`` attribute on the module, where it has one, is the smallest
      image side it takes. Called only when a run is built: a builder that imports flax inside
      keeps ``--help`` and reading a config free of it.
  """

  name: str
  build: Callable[..., Any]


_PERTURBATIONS: dict[str, Perturbation] = {}
_PIPELINES: dict[str, Pipeline] = {}
_NOISE_MODES: dict[str, NoiseMode] = {}
_MODELS: dict[str, Model] = {}
_DATASETS: dict[str, DatasetSpec] = {}
_TABLES: dict[str, dict[str, Any]] = {
  "perturbation": _PERTURBATIONS,
  "pipeline": _PIPELINES,
  "noise_mode": _NOISE_MODES,
  "model": _MODELS,
  "dataset": _DATASETS,
}
# The module whose import registers each kind's built-in entries; each is loaded on its kind's first use.
_BUILT_IN = {
  "perturbation": "saner_jax.train.optimizers",
  "pipeline": "saner_jax.train.pipelines",
  "noise_mode": "saner_jax.train.noise",
  "model": "saner_jax.train.model_entries",
  "dataset": "saner_jax.train.data",
}


def _register(table: dict[str, Any], entry: Any, kind: str, reserved: Iterable[str], replace: bool) -> None:
  if not entry.name.isidentifier():
    raise ValueError(
      f"a {kind} name must be an identifier (it is a flag value and part of run names), got {entry.name!r}"
    )
  if entry.name in reserved or (entry.name in table and not replace):
    raise ValueError(f"{kind} {entry.name!r} is already registered; pass replace=True to replace it")
  table[entry.name] = entry


def register_perturbation(entry: Perturbation, *, replace: bool = False) -> Perturbation:
  """Adds ``entry`` under ``--optimizer entry.name``; returns it. ``saner`` is reserved (SAM with SANER)."""
  _load_built_ins("perturbation")
  _register(_PERTURBATIONS, entry, "perturbation", ("saner",), replace)
  return entry


def register_pipeline(entry: Pipeline, *, replace: bool = False) -> Pipeline:
  """Adds ``entry`` under ``--pipeline entry.name``; returns it. ``none`` is reserved (plain training)."""
  _load_built_ins("pipeline")
  _register(_PIPELINES, entry, "pipeline", ("none",), replace)
  return entry


def register_noise_mode(entry: NoiseMode, *, replace: bool = False) -> NoiseMode:
  """Adds ``entry`` under ``--noise_mode entry.name``; returns it. ``none`` and ``real`` are reserved."""
  _load_built_ins("noise_mode")
  _register(_NOISE_MODES, entry, "noise mode", ("none", "real"), replace)
  return entry


def register_model(entry: Model, *, replace: bool = False) -> Model:
  """Adds ``entry`` under ``--model entry.name``; returns it."""
  _load_built_ins("model")
  _register(_MODELS, entry, "model", (), replace)
  return entry


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
  """Adds a dataset under ``--dataset spec.name``; returns it.

  The spec says where the examples come from (a TFDS name, IDX files or a
  folder layout), their classes, image shape, normalisation and
  augmentation (:class:`saner_jax.train.data.DatasetSpec`).
  """
  _load_built_ins("dataset")
  _register(_DATASETS, spec, "dataset", (), replace)
  return spec


def unregister(kind: str, name: str) -> None:
  """Removes an entry registered earlier (a test's or a notebook's); ``kind``: one of perturbation,
  pipeline, noise_mode, model or dataset."""
  _TABLES[kind].pop(name, None)


_loaded: set[str] = set()


def _load_built_ins(kind: str) -> None:
  if kind not in _loaded:
    _loaded.add(kind)
    importlib.import_module(_BUILT_IN[kind])


def _entries(kind: str) -> dict[str, Any]:
  """A copy of one registry, its built-ins loaded first."""
  _load_built_ins(kind)
  return dict(_TABLES[kind])


def perturbations() -> dict[str, Perturbation]:
  """Every registered perturbation by name, the built-ins first."""
  return _entries("perturbation")


def pipelines() -> dict[str, Pipeline]:
  """Every registered pipeline by name, the built-ins first (``none``, plain training, is not one)."""
  return _entries("pipeline")


def noise_modes() -> dict[str, NoiseMode]:
  """Every registered synthetic noise mode by name, the built-ins first (not ``none`` nor ``real``)."""
  return _entries("noise_mode")


def models() -> dict[str, Model]:
  """Every registered model by name, the built-ins first."""
  return _entries("model")


def datasets() -> dict[str, DatasetSpec]:
  """Every registered dataset by name, the built-ins first."""
  return _entries("dataset")


class View(Mapping[str, Any]):
  """A live, read-only mapping over one registry: entries added later show up in it.

  ``value`` turns an entry into what the mapping holds (``models.MODELS``
  holds the builders).
  """

  def __init__(self, kind: str, value: Callable[[Any], Any] = lambda entry: entry) -> None:
    self._kind, self._value = kind, value

  def _table(self) -> dict[str, Any]:
    _load_built_ins(self._kind)
    return _TABLES[self._kind]

  def __getitem__(self, name: str) -> Any:
    return self._value(self._table()[name])

  def __iter__(self) -> Iterator[str]:
    return iter(list(self._table()))

  def __len__(self) -> int:
    return len(self._table())

  def __repr__(self) -> str:
    return f"<registry view of the {self._kind}s: {', '.join(self._table())}>"


def owned_fields(kind: str) -> dict[str, tuple[str, ...]]:
  """``{config field: the entries that own it}`` of ``kind``, "perturbations" or "pipelines".

  >>> owned_fields("pipelines")["pipeline_warmup_epochs"]
  ('dividemix', 'plc')
  """
  entries = perturbations() if kind == "perturbations" else pipelines()
  owners: dict[str, tuple[str, ...]] = {}
  for entry in entries.values():
    for field in entry.fields:
      owners[field] = (*owners.get(field, ()), entry.name)
  return owners


def report(attribute: str) -> Report:
  """The pipelines' ``panels`` or ``columns``, each key once, in registration order."""
  seen: dict[str, str] = {}
  for entry in pipelines().values():
    for key, title in getattr(entry, attribute):
      seen.setdefault(key, title)
  return tuple(seen.items())

"""Run configuration: one flat dataclass, YAML presets and flag overrides.

A run is reproduced by its ``config.yaml`` alone: the trainer writes the
resolved config next to its logs, and ``--config that.yaml`` runs it again.
Defaults are the authors' (DESIGN.md §1): lr 0.1, momentum 0.9, weight decay
5e-4, batch 128, 200 epochs, multistep decay at 50% and 75%, rho 0.1,
alpha 0.5 warmed up over 50 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import typing
from typing import Any

import yaml

from saner_jax.cpu_conv import MODES as CPU_CONV_MODES
from saner_jax.parallel import PERTURBATION_MODES

PERTURBATIONS = ("sgd", "sam", "asam", "friendly_sam", "vasso", "gsam")
# "saner" alone is shorthand for SAM with SANER on, the paper's default.
OPTIMIZERS = PERTURBATIONS + ("saner",)
LR_SCHEDULES = ("multistep", "cosine", "constant")
SANER_PARAMS = ("all", "head")
DTYPES = ("float32", "bfloat16")
PRESET_DIR = pathlib.Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
  """A bad config value; the message names the field (and flag)."""


@dataclasses.dataclass
class TrainConfig:
  """Every knob of a training run. Field names are also the CLI flags."""

  # Data.
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  data_source: str = "auto"  # "auto": TFDS if prepared, else IDX files (see saner_jax.train.data)
  train_examples: int | None = None  # a seeded subset of the training set
  test_examples: int | None = None
  noise_mode: str = "symmetric"
  noise_rate: float = 0.4
  noise_label_key: str = "worse_label"  # CIFAR-N's set, for noise_mode "real"
  augment: bool = True
  # Model.
  model: str = "resnet18"
  dtype: str = "float32"
  # oneDNN's convolutions instead of XLA's (saner_jax.cpu_conv.choose): XLA's
  # CPU kernel gradient is slow. "auto" takes them on one CPU device in float32
  # where they build, "false" never, "true" insists (an error where they cannot run).
  cpu_conv: str = "auto"
  # Optimizer.
  optimizer: str = "saner"
  saner: bool = False  # SANER on top of the chosen perturbation
  alpha: float = 0.5
  alpha_warmup_epochs: int = 50
  saner_group: str = "B"
  # Which parameters SANER reweights: "all", or "head", the classifier's
  # Dense layer only (the authors' SANERLAST); the rest keep SAM's gradient.
  saner_params: str = "all"
  # The paper's mechanism ablations (saner_jax.substitute_groups), instead of
  # SANER: the clean gradient on these groups (letters from "ABC", e.g. "B"
  # is the paper's SGD-GrB), or, with substitute_outside, SAM's gradient on
  # them only and the clean gradient everywhere else (the authors' SAMONLY).
  substitute_groups: str | None = None
  substitute_outside: bool = False
  rho: float = 0.1
  asam_eta: float = 0.0
  fsam_sigma: float = 1.0
  fsam_lmbda: float = 0.9
  vasso_theta: float = 0.2
  gsam_alpha: float = 0.01
  m_sharpness: int = 1
  # Data parallelism (saner_jax.parallel): "synced" forms one perturbation
  # from the global-batch gradient, the single-device algorithm on any number
  # of devices; "per_device" perturbs each device's shard with its own
  # gradient (m-sharpness with m = devices x m_sharpness). SGD ignores it.
  perturbation_mode: str = "synced"
  # Micro-batches per step: one perturbation from the clean gradient summed
  # over all of them, the memory of one micro-batch.
  grad_accum_steps: int = 1
  # Noise-robust pipeline (saner_jax.train.pipelines, docs/pipelines.md);
  # "none" is plain training. Each pipeline's fields default to the authors'
  # values and may only be set with their pipeline.
  pipeline: str = "none"
  pipeline_warmup_epochs: int = 10  # dividemix, plc: epochs of plain training first
  bootstrap_beta: float = 0.8  # bootstrap: weight of the given label
  forget_rate: float = 0.2  # co_teaching: final share of each batch dropped
  num_gradual: int = 10  # co_teaching: epochs to reach forget_rate
  forget_exponent: float = 1.0  # co_teaching: shape of that ramp
  p_threshold: float = 0.5  # dividemix: clean probability above which a sample is labelled
  lambda_u: float = 25.0  # dividemix: weight of the unlabelled loss
  sharpen_temperature: float = 0.5  # dividemix: T of the sharpening
  mixup_alpha: float = 4.0  # dividemix: Beta(alpha, alpha) of the mixup weight
  tau_start: float = 0.9  # plc: first correction threshold (log-probability gap)
  tau_end: float = 0.5  # plc: lowest threshold
  tau_step: float = 0.05  # plc: decrease after each correction
  jo_alpha: float = 1.2  # joint_optimization: weight of the prior term L_p
  jo_beta: float = 0.8  # joint_optimization: weight of the entropy term L_e
  jo_window: int = 10  # joint_optimization: epochs of predictions averaged into a soft label
  jo_update_start: int = 103  # joint_optimization: first epoch whose end updates the soft labels
  jo_stage1_epochs: int | None = None  # joint_optimization: stage-1 epochs (None: half of epochs); the rest retrain
  lr: float = 0.1
  lr_schedule: str = "multistep"
  lr_milestones: tuple[float, ...] = (0.5, 0.75)
  lr_decay: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 128
  eval_batch_size: int = 1000
  epochs: int = 200
  seed: int = 0
  # jax.distributed.initialize() before anything else, for multi-host runs
  # (saner_jax.train.loop.initialize_distributed).
  distributed: bool = False
  # JAX's persistent compilation cache under saner_jax's cache directory
  # ($SANER_JAX_CACHE_DIR, default ~/.cache/saner_jax): reruns, resumed runs and
  # a comparison's later runs load compiled steps instead of compiling them.
  compilation_cache: bool = True
  # Output.
  out_dir: str = "runs/default"
  checkpoint: bool = True
  # The paper's mechanism on a fixed probe batch of training examples
  # (saner_jax.train.probe): the clean/noisy gradient decomposition every
  # epoch, and the Hessian's top eigenvalue (power iteration) and trace
  # (Hutchinson) every sharpness_every epochs and at the last (0: never).
  log_decomposition: bool = False
  sharpness_every: int = 0
  probe_examples: int = 256  # at most the training set
  sharpness_iterations: int = 20
  hutchinson_samples: int = 10
  progress: str = "auto"  # "auto": a bar on a terminal, plain lines otherwise

  def __post_init__(self):
    if isinstance(self.cpu_conv, bool):  # TrainConfig(cpu_conv=False), as before it had "auto"
      self.cpu_conv = str(self.cpu_conv).lower()

  @property
  def perturbation(self) -> str:
    """The ascent family, with the "saner" shorthand resolved to SAM."""
    return "sam" if self.optimizer == "saner" else self.optimizer

  @property
  def spec(self):
    """The :class:`saner_jax.train.data.DatasetSpec` of ``dataset``, the one place the toolkit looks it up."""
    from saner_jax.train import data

    try:
      return data.get_spec(self.dataset)
    except ValueError as e:
      raise ConfigError(f"--dataset: {e}") from None

  @property
  def noise_description(self) -> str:
    if self.noise_mode == "real":
      return f"real noise ({self.noise_label_key})"
    if self.noise_mode == "none":
      return "no noise"
    return f"{self.noise_mode} noise {self.noise_rate:.0%}"

  @property
  def compute_dtype(self):
    import jax.numpy as jnp

    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

  @property
  def uses_saner(self) -> bool:
    return self.saner or self.optimizer == "saner"

  @property
  def run_name(self) -> str:
    """``sgd``, ``sam``, ``saner``, ``asam+saner``, ``saner_head``, ``sam+grB``, ``sam+onlyB``...

    :func:`run_name_values` reads these names back into config values.
    """
    if self.substitute_groups:
      return f"{self.optimizer}+{'only' if self.substitute_outside else 'gr'}{self.substitute_groups}"
    name = "saner" if self.optimizer == "saner" else (f"{self.optimizer}+saner" if self.saner else self.optimizer)
    return f"{name}_head" if self.uses_saner and self.saner_params == "head" else name

  def validate(self) -> TrainConfig:
    """Checks each field; raises ConfigError naming the flag."""
    from saner_jax.train import data, models, noise  # the training layer's own deps

    def fail(field, message):
      raise ConfigError(f"--{field}: {message}")

    def one_of(field, choices):
      if getattr(self, field) not in choices:
        fail(field, f"unknown value {getattr(self, field)!r}; choose one of {sorted(choices)}")

    one_of("dataset", data.DATASETS)
    one_of("model", models.MODELS)
    one_of("optimizer", OPTIMIZERS)
    one_of("lr_schedule", LR_SCHEDULES)
    one_of("dtype", DTYPES)
    one_of("saner_group", ("A", "B", "C"))
    one_of("noise_mode", noise.MODES)
    one_of("data_source", data.SOURCES)
    one_of("progress", ("auto", "bar", "lines", "none"))
    one_of("perturbation_mode", PERTURBATION_MODES)
    one_of("cpu_conv", CPU_CONV_MODES)
    for field in _FLOAT_FIELDS:  # nan passes every comparison below, inf some of them
      if not math.isfinite(getattr(self, field)):
        fail(field, f"must be a finite number, got {getattr(self, field)}")
    if not 0 <= self.seed < 2**32:
      fail("seed", f"must be in [0, 2**32), got {self.seed}")
    if not 0.0 <= self.noise_rate <= 1.0:
      fail("noise_rate", f"must be in [0, 1], got {self.noise_rate}")
    info = self.spec
    if self.noise_mode not in ("none", "real"):
      highest = noise.max_rate(self.noise_mode, info.num_classes)
      if self.noise_rate > highest:
        fail(
          "noise_rate",
          f"{self.noise_mode} noise on {info.num_classes} classes is defined up to {highest:.3g}, got {self.noise_rate}",
        )
    if self.noise_mode == "asymmetric":
      try:
        noise.asymmetric_map(self.dataset)
      except ValueError as e:
        fail("noise_mode", str(e))
    if self.noise_mode == "real":
      if not info.noisy_label_keys:
        fail("noise_mode", f"'real' needs human labels; {self.dataset} has none (use cifar10_n or cifar100_n)")
      if self.noise_label_key not in info.noisy_label_keys:
        fail("noise_label_key", f"{self.dataset} has {list(info.noisy_label_keys)}, got {self.noise_label_key!r}")
    if self.saner_group == "B" and not 0.0 <= self.alpha <= 1.0:
      fail("alpha", f"must be in [0, 1] for group B, got {self.alpha}")
    if self.alpha < 0:
      fail("alpha", f"must be >= 0, got {self.alpha}")
    if self.saner and self.optimizer == "sgd":
      fail("saner", "SANER reweights SAM's second gradient; it needs a SAM-family optimizer, not sgd")
    one_of("saner_params", SANER_PARAMS)
    if self.saner_params != "all" and not self.uses_saner:
      fail(
        "saner_params", f"{self.saner_params!r} chooses where SANER acts; turn SANER on (--optimizer saner or --saner)"
      )
    self._validate_substitution(fail)
    for field in ("rho", "asam_eta", "fsam_sigma", "gsam_alpha", "lr", "weight_decay", "lr_decay"):
      if getattr(self, field) < 0:
        fail(field, f"must be >= 0, got {getattr(self, field)}")
    for field in ("momentum", "fsam_lmbda", "vasso_theta"):
      if not 0.0 <= getattr(self, field) <= 1.0:
        fail(field, f"must be in [0, 1], got {getattr(self, field)}")
    if self.sharpness_every < 0:
      fail("sharpness_every", f"must be >= 0 (0: never), got {self.sharpness_every}")
    for field in (
      "batch_size",
      "eval_batch_size",
      "epochs",
      "m_sharpness",
      "grad_accum_steps",
      "probe_examples",
      "sharpness_iterations",
      "hutchinson_samples",
    ):
      if getattr(self, field) < 1:
        fail(field, f"must be >= 1, got {getattr(self, field)}")
    if self.alpha_warmup_epochs < 0:
      fail("alpha_warmup_epochs", f"must be >= 0, got {self.alpha_warmup_epochs}")
    if self.batch_size % self.m_sharpness:
      fail("m_sharpness", f"must divide batch_size {self.batch_size}, got {self.m_sharpness}")
    if self.batch_size % (self.m_sharpness * self.grad_accum_steps):
      fail(
        "grad_accum_steps",
        f"m_sharpness x grad_accum_steps = {self.m_sharpness} x {self.grad_accum_steps} "
        f"must divide batch_size {self.batch_size}",
      )
    if any(not 0.0 < m < 1.0 for m in self.lr_milestones):
      fail("lr_milestones", f"must be fractions of training in (0, 1), got {self.lr_milestones}")
    for field, split in (("train_examples", "train"), ("test_examples", "test")):
      value = getattr(self, field)
      if value is not None and not 1 <= value <= info.sizes[split]:
        fail(field, f"must be in [1, {info.sizes[split]}], the size of {self.dataset}'s {split} split; got {value}")
    train_size = self.train_examples or info.sizes["train"]
    if self.batch_size > train_size:
      fail("batch_size", f"{self.batch_size} exceeds the {train_size} training examples")
    try:
      models.check_input(self.model, info.image_shape)
    except ValueError as e:
      fail("model", str(e))
    self._validate_pipeline(fail)
    return self

  def _validate_substitution(self, fail) -> None:
    from saner_jax.saner import _check_groups

    if self.substitute_groups is None:
      if self.substitute_outside:
        fail("substitute_outside", "needs --substitute_groups, e.g. B")
      return
    try:
      _check_groups(self.substitute_groups, self.substitute_outside)
    except (TypeError, ValueError) as e:
      fail("substitute_groups", str(e))
    if not self.substitute_groups and not self.substitute_outside:
      fail("substitute_groups", "is empty, which substitutes nothing; give letters from ABC or leave it out")
    if self.perturbation == "sgd":
      fail("substitute_groups", "substitutes SAM's second gradient; it needs a SAM-family optimizer, not sgd")
    if self.uses_saner:
      fail(
        "substitute_groups", "replaces SANER's reweighting; use --optimizer sam (or another SAM variant) without SANER"
      )

  def _validate_pipeline(self, fail) -> None:
    from saner_jax.train.pipelines import PIPELINES

    if self.pipeline not in PIPELINES:
      fail("pipeline", f"unknown value {self.pipeline!r}; choose one of {sorted(PIPELINES)}")
    for field, owners in PIPELINE_FIELDS.items():
      if self.pipeline not in owners and getattr(self, field) != _FIELDS[field].default:
        fail(
          field, f"applies to --pipeline {' or '.join(owners)} only, not {self.pipeline!r}; drop it or set --pipeline"
        )
    if not 0.0 <= self.forget_rate < 1.0:
      fail("forget_rate", f"must be in [0, 1), got {self.forget_rate}")
    for field in ("bootstrap_beta", "p_threshold"):
      if not 0.0 <= getattr(self, field) <= 1.0:
        fail(field, f"must be in [0, 1], got {getattr(self, field)}")
    for field in (
      "pipeline_warmup_epochs",
      "num_gradual",
      "forget_exponent",
      "lambda_u",
      "tau_step",
      "jo_alpha",
      "jo_beta",
    ):
      if getattr(self, field) < 0:
        fail(field, f"must be >= 0, got {getattr(self, field)}")
    for field in ("sharpen_temperature", "mixup_alpha"):
      if getattr(self, field) <= 0:
        fail(field, f"must be > 0, got {getattr(self, field)}")
    if self.tau_end > self.tau_start:
      fail("tau_end", f"must be <= tau_start {self.tau_start}, got {self.tau_end}")
    if self.jo_window < 1:
      fail("jo_window", f"must be >= 1, got {self.jo_window}")
    if self.pipeline == "joint_optimization" and not 1 <= self.jo_stage1_epochs_resolved < self.epochs:
      fail(
        "jo_stage1_epochs", f"must leave both stages an epoch: in [1, {self.epochs - 1}], got {self.jo_stage1_epochs}"
      )

  @property
  def jo_stage1_epochs_resolved(self) -> int:
    """Joint Optimization's stage-1 length; None means half of ``epochs``."""
    return self.epochs // 2 if self.jo_stage1_epochs is None else self.jo_stage1_epochs

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["lr_milestones"] = list(self.lr_milestones)
    return out


def run_name_values(name: str) -> dict[str, Any]:
  """Config values of a run name (:attr:`TrainConfig.run_name`'s inverse).

  ``OPT``, ``OPT+saner``, ``saner``, any of these with ``_head`` (SANER on the
  classifier only), ``OPT+grX`` (the clean gradient on groups X) and
  ``OPT+onlyX`` (SAM's gradient on groups X only). The ``saner_params`` of a
  SANER run without ``_head`` is left to the base config.
  """
  optimizer, plus, suffix = name.partition("+")
  values: dict[str, Any] = {"saner": False, "substitute_groups": None, "substitute_outside": False}
  head = (suffix or optimizer).endswith("_head")
  if head and plus:
    suffix = suffix.removesuffix("_head")
  elif head:
    optimizer = optimizer.removesuffix("_head")
  substitution = next((p for p in ("gr", "only") if suffix.startswith(p) and len(suffix) > len(p)), None)
  if suffix == "saner":
    values["saner"] = True
  elif substitution and not head:  # the letters are checked by validate()
    values["substitute_outside"] = substitution == "only"
    values["substitute_groups"] = suffix.removeprefix(substitution)
  elif suffix:
    raise ConfigError(f"--runs: {name!r} is not OPT, OPT+saner, OPT+grX or OPT+onlyX (X letters from ABC)")
  values["optimizer"] = optimizer
  if head:
    values["saner_params"] = "head"
  elif not (values["saner"] or optimizer == "saner"):
    values["saner_params"] = "all"
  return values


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The pipeline-specific fields and the pipelines they belong to.
PIPELINE_FIELDS = {
  "pipeline_warmup_epochs": ("dividemix", "plc"),
  "bootstrap_beta": ("bootstrap",),
  **dict.fromkeys(("forget_rate", "num_gradual", "forget_exponent"), ("co_teaching",)),
  **dict.fromkeys(("p_threshold", "lambda_u", "sharpen_temperature", "mixup_alpha"), ("dividemix",)),
  **dict.fromkeys(("tau_start", "tau_end", "tau_step"), ("plc",)),
  **dict.fromkeys(("jo_alpha", "jo_beta", "jo_window", "jo_update_start", "jo_stage1_epochs"), ("joint_optimization",)),
}
_TYPES = typing.get_type_hints(TrainConfig)
_FLOAT_FIELDS = tuple(name for name, hint in _TYPES.items() if hint is float)


def _coerce(name: str, value: Any) -> Any:
  """Converts a YAML or flag value to the field's type, naming the field."""
  hint = _TYPES[name]
  args = typing.get_args(hint)
  optional = type(None) in args
  base = next((a for a in args if a is not type(None)), hint) if args else hint
  if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
    if optional:
      return None
    raise ConfigError(f"--{name}: may not be empty")
  try:
    if typing.get_origin(hint) is tuple or typing.get_origin(base) is tuple:
      if isinstance(value, str):
        items = value.split(",")
      else:  # a YAML list, or one number (`lr_milestones: 0.5`)
        items = value if isinstance(value, (list, tuple)) else [value]
      return tuple(float(v) for v in items)
    if base is bool:
      if isinstance(value, bool):
        return value
      if str(value).lower() in ("1", "true", "yes", "on"):
        return True
      if str(value).lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(value)
    if base is str and isinstance(value, bool):  # YAML reads `cpu_conv: true` as a bool
      return str(value).lower()
    if base is int:
      if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
      return int(value)
    return base(value)
  except (TypeError, ValueError):
    raise ConfigError(f"--{name}: expected {getattr(base, '__name__', base)}, got {value!r}") from None


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
  """A config from ``base`` with ``values`` overriding; unknown keys raise."""
  unknown = sorted(set(values) - set(_FIELDS))
  if unknown:
    raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(_FIELDS)}")
  config = dataclasses.replace(base or TrainConfig())
  for name, value in values.items():
    setattr(config, name, _coerce(name, value))
  return config


def preset_names() -> list[str]:
  """The presets shipped in saner_jax/train/configs, without the ``_*.yaml`` bases they build on."""
  paths = (p.relative_to(PRESET_DIR).with_suffix("") for p in PRESET_DIR.rglob("*.yaml"))
  return sorted(p.as_posix() for p in paths if not p.name.startswith("_"))


def resolve_preset(path_or_name: str) -> pathlib.Path:
  """A config path, or the name of a preset shipped in saner_jax/train/configs.

  Presets in subfolders are named by their relative path without ".yaml",
  e.g. "paper/cifar10_sym25_resnet18".
  """
  path = pathlib.Path(path_or_name)
  if path.is_file():
    return path
  preset = PRESET_DIR / f"{path_or_name.removesuffix('.yaml')}.yaml"
  if preset.is_file() and not preset.name.startswith("_"):
    return preset
  if preset.is_file():
    raise ConfigError(
      f"--config: {path_or_name!r} is the shared base of other presets, not a preset; run one of {preset_names()}"
    )
  raise ConfigError(f"--config: no file {path_or_name!r} and no preset of that name; presets: {preset_names()}")


def load_yaml(path_or_name: str) -> dict[str, Any]:
  """A config file's keys, over those of the preset its ``base:`` key names.

  ``base: paper/_base`` (a preset name, relative to saner_jax/train/configs)
  is read first, its own ``base:`` before it, and the file's keys override it.
  """
  return _load_with_bases(resolve_preset(path_or_name), ())


def _load_with_bases(path: pathlib.Path, children: tuple[pathlib.Path, ...]) -> dict[str, Any]:
  where = f"{path} (the base of {children[-1]})" if children else str(path)
  try:
    values = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"--config: {where} is not valid YAML: {e}") from None
  if not isinstance(values, dict):
    raise ConfigError(f"--config: {where} must hold a mapping of config keys (`key: value` lines)")
  if "base" not in values:
    return values
  base = values.pop("base")
  base_path = PRESET_DIR / f"{str(base).removesuffix('.yaml')}.yaml"
  if not isinstance(base, str) or not base_path.is_file():
    raise ConfigError(
      f"--config: {path} has base {base!r}, which is no preset; name one relative to {PRESET_DIR}, "
      "e.g. base: paper/_base"
    )
  chain = (*children, path)
  if base_path.resolve() in {p.resolve() for p in chain}:
    cycle = " -> ".join(str(p) for p in (*chain, base_path))
    raise ConfigError(f"--config: the base: keys form a cycle ({cycle}); remove the base: key that closes it")
  return {**_load_with_bases(base_path, chain), **values}


def add_flags(parser: argparse.ArgumentParser) -> None:
  """One ``--field`` flag per config field, all defaulting to "not given"."""
  parser.add_argument("--config", help="a YAML config file or a preset name")
  for name in _FIELDS:
    parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE")


def from_args(args: argparse.Namespace) -> TrainConfig:
  """Preset/config file first, then flags on top."""
  values = load_yaml(args.config) if getattr(args, "config", None) else {}
  flags = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
  return from_mapping({**values, **flags})

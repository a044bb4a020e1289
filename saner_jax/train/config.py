"""Run configuration: one flat dataclass in sections, YAML presets and flag overrides.

A run is reproduced by its ``config.yaml`` alone: the trainer writes the
resolved config next to its logs, grouped by ``SECTIONS``, and ``--config
that.yaml`` runs it again. Files may be flat or sectioned.
Defaults are the authors' (github.com/lhchau/saner, the paper's App. B): lr 0.1, momentum 0.9, weight decay
5e-4, batch 128, 200 epochs, multistep decay at 50% and 75%, rho 0.1,
alpha 0.5 warmed up over 50 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pathlib
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml

from saner_jax._modes import PERTURBATION_MODES
from saner_jax.cpu_conv import MODES as CPU_CONV_MODES
from saner_jax.train import yaml_files

# Re-exported: the toolkit imports the error and the checks registry entries run from here.
from saner_jax.train.errors import ConfigError as ConfigError
from saner_jax.train.errors import at_least as at_least
from saner_jax.train.errors import fail as fail
from saner_jax.train.errors import in_unit_interval as in_unit_interval

LR_SCHEDULES = ("multistep", "cosine", "constant")
# When a SAM-family step takes its second pass (saner_jax.policies); each policy's own flag.
SAM_POLICIES = ("always", "every", "random", "adaptive")
SAM_POLICY_FIELDS = {"sam_every": "every", "sam_prob": "random", "sam_c": "adaptive"}
SANER_PARAMS = ("all", "head")
BN_STATS = ("clean", "perturbed")
DTYPES = ("float32", "bfloat16")
LOGGER_MODES = ("auto", "true", "false")
PRESET_DIR = pathlib.Path(__file__).resolve().parent / "configs"


# The config's sections, in the order of config.yaml and of --help, with their --help titles.
# Each field belongs to one; a YAML file may list its keys under their sections or flat.
# The dataclass itself stays flat, because its field names are the flags users type.
SECTIONS = {
  "data": "data",
  "noise": "label noise",
  "model": "model",
  "optimizer": "optimizer and perturbation",
  "saner": "SANER",
  "schedule": "schedule",
  "pipeline": "noise-robust pipelines",
  "parallel": "parallelism and memory",
  "diagnostics": "mechanism diagnostics",
  "run": "output and run control",
}


def _field(default: Any, section: str, help: str, choices: Sequence[str] | Callable[[], Iterable[str]] = ()) -> Any:
  """A config field with its ``--help`` line, section and allowed values: one source for the CLI and validate."""
  if section not in SECTIONS:
    raise ValueError(f"unknown config section {section!r}; add it to SECTIONS")
  return dataclasses.field(default=default, metadata={"section": section, "help": help, "choices": choices})


def _owned(module: str, name: str) -> Callable[[], Iterable[str]]:
  """Choices a toolkit module owns, read when needed: pipelines load jax, which a config does not need."""
  return lambda: getattr(importlib.import_module(f"saner_jax.train.{module}"), name)


def _noise_modes() -> Iterable[str]:
  from saner_jax.train import noise

  return noise.modes()


def choices(field: str) -> tuple[str, ...]:
  """The allowed values of a config field, or () where any value of its type goes."""
  values = _FIELDS[field].metadata["choices"]
  return tuple(values() if callable(values) else values)


def _registered(kind: str) -> Callable[[], Iterable[str]]:
  """The names in a registry, read when needed: the registry loads its built-in entries on first use."""

  def names() -> Iterable[str]:
    from saner_jax.train import registry

    if kind == "perturbations":
      # "saner" alone is shorthand for SAM with SANER on, the paper's default.
      return (*registry.perturbations(), "saner")
    if kind == "pipelines":
      return ("none", *registry.pipelines())  # none: plain training
    return registry.models() if kind == "models" else registry.datasets()

  return names


@dataclasses.dataclass
class TrainConfig:
  """Every knob of a training run. Field names are also the CLI flags.

  Each field's metadata holds its ``help``, its ``section`` (one of
  ``SECTIONS``: where config.yaml and ``--help`` list it) and, where the values are a fixed set, its
  ``choices`` (a callable, so the toolkit modules that own them load late).
  """

  dataset: str = _field("fashion_mnist", "data", "the dataset", _registered("datasets"))
  data_dir: str | None = _field(
    None,
    "data",
    "the TFDS data directory, or the folder of IDX files; none: $TFDS_DATA_DIR or ~/tensorflow_datasets, "
    "and for IDX files $SANER_JAX_MNIST_DIR or $SANER_JAX_FASHION_MNIST_DIR",
  )
  data_source: str = _field(
    "auto", "data", "where to read the data; auto: TFDS if prepared, else IDX files", _owned("data", "SOURCES")
  )
  image_size: int | None = _field(
    None, "data", "folder datasets: the side the images are resized to; none: the dataset's (64 or 224)"
  )
  eval_split: str | None = _field(
    None,
    "data",
    "folder datasets: the labelled split evaluated on (mini_webvision: webvision or imagenet; image_folder: "
    "test or val); none: the dataset's default",
  )
  input_pipeline: str = _field(
    "auto",
    "data",
    "device: the whole uint8 dataset on every device; stream: Grain reads, decodes and augments each batch on "
    "the host; auto: device when the decoded images fit (see docs/your_own_data.md)",
    ("auto", "device", "stream"),
  )
  stream_workers: int | None = _field(
    None, "data", "stream: decoding processes per host (0: threads of this process); none: the CPU count, up to 16"
  )
  train_examples: int | None = _field(None, "data", "train on a seeded subset of this many examples; none: all")
  test_examples: int | None = _field(None, "data", "evaluate on the first this many test examples; none: all")
  val_examples: int = _field(
    0,
    "data",
    "hold out this many training examples for validation, disjoint from the training subset and the test set; "
    "the run then reports the test accuracy at the epoch of best validation accuracy (0: no validation)",
  )
  val_clean: bool = _field(
    False,
    "data",
    "validate on the held-out examples' true labels; false: on their noisy labels, which is what a practitioner has",
  )
  noise_mode: str = _field("symmetric", "noise", "how the training labels are corrupted", _noise_modes)
  noise_rate: float = _field(0.4, "noise", "the share of training labels corrupted; unused with real noise")
  noise_label_key: str = _field("worse_label", "noise", "CIFAR-N's human label set, for --noise_mode real")
  augment: bool = _field(True, "data", "random crops and flips of the training images")
  model: str = _field("resnet18", "model", "the network", _registered("models"))
  model_width: float = _field(
    1.0,
    "model",
    "multiply every width of a CIFAR ResNet (resnet8, resnet20, resnet18, resnet34, resnet50) by this, rounded "
    "down: the paper's width ablation, the authors' widen_factor; 1 is the published network",
  )
  dtype: str = _field("float32", "model", "the compute dtype; parameters and BatchNorm statistics stay float32", DTYPES)
  # XLA's CPU kernel gradient is slow.
  cpu_conv: str = _field(
    "auto",
    "model",
    "oneDNN's convolutions instead of XLA's on CPU; auto: on one CPU device in float32 where they build, "
    "true: insist (an error where they cannot run), false: never",
    CPU_CONV_MODES,
  )
  optimizer: str = _field(
    "saner",
    "optimizer",
    "the ascent family; saner is SAM with SANER's reweighting (the paper's)",
    _registered("perturbations"),
  )
  saner: bool = _field(False, "saner", "SANER on top of the chosen SAM-family optimizer")
  alpha: float = _field(0.5, "saner", "SANER's weight on the chosen group's gradient components; 1 is SAM")
  alpha_warmup_epochs: int = _field(50, "saner", "SANER's alpha goes from 1 to --alpha over these epochs")
  saner_group: str = _field("B", "saner", "the gradient group SANER reweights; the paper's is B", ("A", "B", "C"))
  saner_params: str = _field(
    "all",
    "saner",
    "the parameters SANER reweights; head: the classifier's Dense layer only (the authors' SANERLAST), "
    "the rest keep SAM's gradient",
    SANER_PARAMS,
  )
  substitute_groups: str | None = _field(
    None,
    "saner",
    "the paper's mechanism ablation, instead of SANER: the clean gradient on these groups, letters from ABC "
    "(B: the paper's SGD-GrB)",
  )
  substitute_outside: bool = _field(
    False, "saner", "with --substitute_groups: SAM's gradient on those groups only, the clean one elsewhere"
  )
  rho: float = _field(0.1, "optimizer", "the SAM-family perturbation radius")
  asam_eta: float = _field(0.0, "optimizer", "ASAM's eta")
  fsam_sigma: float = _field(1.0, "optimizer", "Friendly SAM's sigma")
  fsam_lmbda: float = _field(0.9, "optimizer", "Friendly SAM's lambda, the EMA decay of its gradient trend")
  vasso_theta: float = _field(0.2, "optimizer", "VaSSO's theta, the weight of the newest gradient in its average")
  gsam_alpha: float = _field(
    0.01, "optimizer", "GSAM's alpha, the share of the clean gradient's part orthogonal to SAM's removed"
  )
  m_sharpness: int = _field(1, "optimizer", "perturb each of this many slices of a batch with its own gradient")
  sam_policy: str = _field(
    "always",
    "optimizer",
    "which steps take the second pass; the others cost one pass, as SGD's: every (every --sam_every steps), "
    "random (with probability --sam_prob), adaptive (AE-SAM: when |g|^2 > running mean + --sam_c running std)",
    SAM_POLICIES,
  )
  sam_every: int = _field(2, "optimizer", "--sam_policy every: the interval k, >= 1")
  sam_prob: float = _field(0.5, "optimizer", "--sam_policy random: the probability p of a two-pass step")
  sam_c: float = _field(0.0, "optimizer", "--sam_policy adaptive: the threshold c in running std, >= 0")
  sam_one_pass_scale: float = _field(
    1.0,
    "optimizer",
    "with a --sam_policy: the weight of a one-pass step's gradient (before weight decay and momentum), in (0, 1]",
  )
  saner_reuse_mask: bool = _field(
    False, "saner", "with SANER and a --sam_policy: apply the last two-pass step's mask on one-pass steps"
  )
  bn_stats: str = _field(
    "clean",
    "optimizer",
    "the BatchNorm running statistics a two-pass step keeps (they change evaluation only); clean: the clean "
    "pass's, the common convention; perturbed: the SANER authors' order, the perturbed pass's, then those of a "
    "third, forward-only pass at the new weights. SGD has one pass and ignores it",
    BN_STATS,
  )
  perturbation_mode: str = _field(
    "synced",
    "parallel",
    "synced: one perturbation from the global-batch gradient, the single-device algorithm on any number of "
    "devices; per_device: each device's shard perturbed with its own gradient (m-sharpness with m = devices x "
    "--m_sharpness). SGD ignores it",
    PERTURBATION_MODES,
  )
  grad_accum_steps: int = _field(
    1, "parallel", "micro-batches per step: one perturbation from their summed clean gradient, one's memory"
  )
  pipeline: str = _field(
    "none",
    "pipeline",
    "a noise-robust training pipeline (docs/pipelines.md); none: plain training. Each pipeline's fields "
    "below default to the authors' values and may only be set with their pipeline",
    _registered("pipelines"),
  )
  pipeline_warmup_epochs: int = _field(10, "pipeline", "dividemix, plc: epochs of plain training first")
  bootstrap_beta: float = _field(0.8, "pipeline", "bootstrap: the weight of the given label")
  forget_rate: float = _field(0.2, "pipeline", "co_teaching: the final share of each batch dropped")
  num_gradual: int = _field(10, "pipeline", "co_teaching: epochs to reach --forget_rate")
  forget_exponent: float = _field(1.0, "pipeline", "co_teaching: the shape of that ramp")
  p_threshold: float = _field(0.5, "pipeline", "dividemix: the clean probability above which a sample is labelled")
  lambda_u: float = _field(25.0, "pipeline", "dividemix: the weight of the unlabelled loss")
  sharpen_temperature: float = _field(0.5, "pipeline", "dividemix: the temperature T of the sharpening")
  mixup_alpha: float = _field(4.0, "pipeline", "dividemix: Beta(alpha, alpha) of the mixup weight")
  tau_start: float = _field(0.9, "pipeline", "plc: the first correction threshold (a log-probability gap)")
  tau_end: float = _field(0.5, "pipeline", "plc: the lowest threshold")
  tau_step: float = _field(0.05, "pipeline", "plc: the decrease after each correction")
  jo_alpha: float = _field(1.2, "pipeline", "joint_optimization: the weight of the prior term L_p")
  jo_beta: float = _field(0.8, "pipeline", "joint_optimization: the weight of the entropy term L_e")
  jo_window: int = _field(10, "pipeline", "joint_optimization: epochs of predictions averaged into a soft label")
  jo_update_start: int = _field(103, "pipeline", "joint_optimization: the first epoch whose end updates the labels")
  jo_stage1_epochs: int | None = _field(
    None, "pipeline", "joint_optimization: stage-1 epochs, the rest retrain; none: half of --epochs"
  )
  lr: float = _field(0.1, "optimizer", "the peak learning rate")
  lr_schedule: str = _field("multistep", "schedule", "the learning-rate schedule", LR_SCHEDULES)
  lr_milestones: tuple[float, ...] = _field(
    (0.5, 0.75), "schedule", "multistep: the fractions of training at which the lr decays, comma-separated"
  )
  lr_decay: float = _field(0.1, "schedule", "multistep: the factor of each decay")
  momentum: float = _field(0.9, "optimizer", "SGD's momentum")
  weight_decay: float = _field(5e-4, "optimizer", "L2 weight decay, added after SANER's reweighting")
  batch_size: int = _field(128, "schedule", "the global training batch")
  eval_batch_size: int = _field(1000, "schedule", "the evaluation batch")
  epochs: int = _field(200, "schedule", "training epochs")
  seed: int = _field(0, "run", "the seed of the noise, the initialisation and the data order, in [0, 2**32)")
  distributed: bool = _field(False, "parallel", "call jax.distributed.initialize() first, for multi-host runs")
  # Reruns, resumed runs and a comparison's later runs load compiled steps instead of compiling them.
  compilation_cache: bool = _field(
    True,
    "run",
    "JAX's persistent compilation cache, under $SANER_JAX_CACHE_DIR or ~/.cache/saner_jax",
  )
  out_dir: str = _field("runs/default", "run", "where the run writes its config, metrics, figures and checkpoints")
  checkpoint: bool = _field(True, "run", "save an orbax checkpoint at the end of every epoch (needed for --resume)")
  log_decomposition: bool = _field(
    False, "diagnostics", "log the clean/noisy gradient decomposition of a fixed probe batch every epoch"
  )
  sharpness_every: int = _field(
    0,
    "diagnostics",
    "log the Hessian's top eigenvalue and trace on the probe batch every N epochs and at the last; 0: never",
  )
  probe_examples: int = _field(256, "diagnostics", "training examples in the probe batch, at most the training set")
  sharpness_iterations: int = _field(20, "diagnostics", "power iterations for the top eigenvalue")
  hutchinson_samples: int = _field(10, "diagnostics", "Hutchinson samples for the trace")
  tensorboard: str = _field(
    "auto",
    "run",
    "the epoch metrics as TensorBoard events in OUT_DIR/tensorboard; auto: where tensorboardX is installed, "
    "true: insist (the tensorboard extra), false: never",
    LOGGER_MODES,
  )
  wandb: bool = _field(
    False,
    "run",
    "log the config and the epoch metrics to Weights & Biases (the wandb extra); with WANDB_MODE=offline "
    "the run is written under OUT_DIR/wandb, for `wandb sync` later",
  )
  wandb_project: str = _field("saner_jax", "run", "the Weights & Biases project of --wandb")
  progress: str = _field(
    "auto",
    "run",
    "progress output; auto: a bar on a terminal, plain lines otherwise",
    ("auto", "bar", "lines", "none"),
  )

  def __post_init__(self):
    # Typed str, but a caller may still pass a bool: read as object so the checks are not "unreachable".
    cpu_conv: object = self.cpu_conv
    if isinstance(cpu_conv, bool):  # TrainConfig(cpu_conv=False), as before it had "auto"
      self.cpu_conv = str(cpu_conv).lower()
    tensorboard: object = self.tensorboard
    if isinstance(tensorboard, bool):  # TrainConfig(tensorboard=True)
      self.tensorboard = str(tensorboard).lower()

  @property
  def perturbation(self) -> str:
    """The ascent family, with the "saner" shorthand resolved to SAM."""
    return "sam" if self.optimizer == "saner" else self.optimizer

  @property
  def spec(self):
    """The :class:`saner_jax.train.data.DatasetSpec` of ``dataset``, the one place the toolkit looks it up."""
    from saner_jax.train import data

    try:
      spec = data.get_spec(self.dataset)
    except ValueError as e:
      raise ConfigError(f"--dataset: {e}") from None
    if spec.layout is None:
      for field in ("image_size", "eval_split"):
        if getattr(self, field) is not None:
          fail(field, f"applies to datasets read from folders, not {self.dataset}; drop it")
      return spec
    from saner_jax.train import folders

    if self.image_size is not None:
      if self.image_size < 8:
        fail("image_size", f"must be >= 8, got {self.image_size}")
      side = self.image_size
      spec = dataclasses.replace(spec, image_shape=(side, side, 3), crop_padding=max(1, side // 8))
    if self.eval_split is not None:
      spec = dataclasses.replace(spec, eval_split=self.eval_split)
    try:
      return folders.resolve_spec(spec, self.data_dir)
    except folders.LayoutError as e:
      raise ConfigError(str(e) if str(e).startswith("--") else f"--data_dir: {e}") from None

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
    name = f"{name}_head" if self.uses_saner and self.saner_params == "head" else name
    return name + self.policy_suffix

  @property
  def policy_suffix(self) -> str:
    """``""``, or the run name's ``@every2``, ``@p0.5``, ``@ae1``, then ``-reuse`` for SANER's mask reuse, then
    ``-scaleF`` for ``sam_one_pass_scale``."""
    if self.sam_policy == "always":
      return ""
    value = {"every": f"every{self.sam_every}", "random": f"p{self.sam_prob:g}", "adaptive": f"ae{self.sam_c:g}"}
    scale = f"-scale{self.sam_one_pass_scale:g}" if self.sam_one_pass_scale != 1 else ""
    return f"@{value[self.sam_policy]}" + ("-reuse" if self.saner_reuse_mask else "") + scale

  def validate(self) -> TrainConfig:
    """Checks each field, section by section; raises ConfigError naming the flag."""
    self._check_choices_and_numbers()
    spec = self.spec
    self._check_noise(spec)
    self._check_optimizer()
    self._check_substitution()
    self._check_sam_policy()
    self._check_batches_and_schedule(spec)
    self._check_model_and_diagnostics(spec)
    self._check_pipeline()
    self._check_input()
    self._check_loggers()
    return self

  def _check_loggers(self) -> None:
    from saner_jax.train import reporting

    for field, wanted in (("tensorboard", self.tensorboard == "true"), ("wandb", self.wandb)):
      if wanted and (missing := reporting.missing_logger(field)):
        fail(field, missing)

  def _check_input(self) -> None:
    if self.stream_workers is not None and self.stream_workers < 0:
      fail("stream_workers", f"must be >= 0 (0: threads only), got {self.stream_workers}")
    if self.input_pipeline != "stream":
      return
    if self.pipeline != "none":
      fail("input_pipeline", f"stream feeds plain training; --pipeline {self.pipeline} needs --input_pipeline device")
    if self.noise_mode == "instance":
      fail("input_pipeline", "stream cannot draw instance-dependent noise, which needs every image in memory")
    if self.log_decomposition or self.sharpness_every:
      fail("input_pipeline", "the mechanism probe needs --input_pipeline device")
    if self.val_examples:
      fail("input_pipeline", "stream holds out no validation set; --val_examples needs --input_pipeline device")

  def _check_choices_and_numbers(self) -> None:
    for field in _FIELDS:
      allowed = choices(field)
      if allowed and getattr(self, field) not in allowed:
        fail(field, f"unknown value {getattr(self, field)!r}; choose one of {sorted(allowed)}")
    for field in _FLOAT_FIELDS:  # nan passes every comparison below, inf some of them
      if not math.isfinite(getattr(self, field)):
        fail(field, f"must be a finite number, got {getattr(self, field)}")
    if not 0 <= self.seed < 2**32:
      fail("seed", f"must be in [0, 2**32), got {self.seed}")
    self._check_out_dir()

  def _check_out_dir(self) -> None:
    """The system's limits on names, checked before anything trains: files deep inside a checkpoint
    would otherwise fail only at the first save."""
    if not self.out_dir.strip():
      fail("out_dir", "is empty; name a directory, e.g. --out_dir runs/my_run")
    name_max, path_max = _path_limits()
    longest = max(pathlib.PurePath(self.out_dir).parts, key=len)
    if len(longest.encode()) > name_max:
      fail(
        "out_dir",
        f"a part of the path is {len(longest.encode())} bytes long, over the system's limit of {name_max} "
        f"({longest[:20]}...); choose a shorter --out_dir",
      )
    needed = len(os.fsencode(os.path.abspath(self.out_dir))) + DEEPEST_RUN_FILE
    if needed > path_max:
      fail(
        "out_dir",
        f"the run's deepest files would have paths of {needed} bytes, over the system's limit of {path_max}; "
        f"choose a --out_dir of at most {path_max - DEEPEST_RUN_FILE} bytes as an absolute path",
      )

  def _check_noise(self, spec) -> None:
    from saner_jax.train import noise

    noise.check_config(self, spec)

  def _check_optimizer(self) -> None:
    if self.saner_group == "B" and not 0.0 <= self.alpha <= 1.0:
      fail("alpha", f"must be in [0, 1] for group B, got {self.alpha}")
    at_least(self, 0, "alpha")
    if self.saner and not self.perturbation_entry.two_pass:
      fail("saner", f"SANER reweights SAM's second gradient; it needs a SAM-family optimizer, not {self.optimizer}")
    if self.saner_params != "all" and not self.uses_saner:
      fail(
        "saner_params", f"{self.saner_params!r} chooses where SANER acts; turn SANER on (--optimizer saner or --saner)"
      )
    at_least(self, 0, "rho", "lr", "weight_decay")
    in_unit_interval(self, "momentum")
    self._check_owned_fields("optimizer", self.perturbation, "perturbations")
    if self.perturbation_entry.check is not None:
      self.perturbation_entry.check(self)

  def _check_sam_policy(self) -> None:
    at_least(self, 1, "sam_every")
    in_unit_interval(self, "sam_prob")
    at_least(self, 0, "sam_c")
    for field, owner in SAM_POLICY_FIELDS.items():
      if self.sam_policy != owner and getattr(self, field) != _FIELDS[field].default:
        fail(field, f"applies to --sam_policy {owner} only, not {self.sam_policy!r}; drop it or set --sam_policy")
    if self.sam_policy != "always" and not self.perturbation_entry.two_pass:
      fail(
        "sam_policy",
        f"chooses the steps that take SAM's second pass; it needs a SAM-family optimizer, not {self.optimizer}",
      )
    if not 0 < self.sam_one_pass_scale <= 1:
      fail("sam_one_pass_scale", f"must be in (0, 1], got {self.sam_one_pass_scale}")
    if self.sam_one_pass_scale != 1 and self.sam_policy == "always":
      fail("sam_one_pass_scale", "weighs the one-pass steps' gradients: it needs a --sam_policy other than always")
    if self.saner_reuse_mask and (not self.uses_saner or self.sam_policy == "always"):
      fail(
        "saner_reuse_mask", "reuses SANER's mask on one-pass steps: it needs SANER and a --sam_policy other than always"
      )

  def _check_substitution(self) -> None:
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
    if not self.perturbation_entry.two_pass:
      fail(
        "substitute_groups", f"substitutes SAM's second gradient; it needs a SAM-family optimizer, not {self.optimizer}"
      )
    if self.uses_saner:
      fail(
        "substitute_groups", "replaces SANER's reweighting; use --optimizer sam (or another SAM variant) without SANER"
      )

  def _check_batches_and_schedule(self, spec) -> None:
    at_least(self, 1, "batch_size", "eval_batch_size", "epochs", "m_sharpness", "grad_accum_steps")
    at_least(self, 0, "alpha_warmup_epochs", "lr_decay")
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
      if value is not None and not 1 <= value <= spec.sizes[split]:
        fail(field, f"must be in [1, {spec.sizes[split]}], the size of {self.dataset}'s {split} split; got {value}")
    if self.val_examples < 0:
      fail("val_examples", f"must be >= 0 (0: no validation), got {self.val_examples}")
    if self.val_clean and not self.val_examples:
      fail("val_clean", "validates the held-out examples, so it needs --val_examples N (N > 0)")
    size = spec.sizes["train"]
    if self.train_examples and self.val_examples > size - self.train_examples:
      fail(
        "val_examples",
        f"{self.val_examples} exceeds the {size - self.train_examples} examples of {self.dataset}'s train split "
        f"left beside --train_examples {self.train_examples}; lower either",
      )
    if not self.train_examples and self.val_examples >= size:
      fail("val_examples", f"{self.val_examples} leaves none of {self.dataset}'s {size} training examples to train on")
    train_size = self.train_examples or spec.sizes["train"] - self.val_examples
    if self.batch_size > train_size:
      fail("batch_size", f"{self.batch_size} exceeds the {train_size} training examples")

  def _check_model_and_diagnostics(self, spec) -> None:
    from saner_jax.train import models

    try:
      models.check_input(self.model, spec.image_shape)
    except ValueError as e:
      fail("model", str(e))
    try:
      models.create_model(self.model, spec.num_classes, width=self.model_width)
    except ValueError as e:
      fail("model_width", str(e))
    if self.sharpness_every < 0:
      fail("sharpness_every", f"must be >= 0 (0: never), got {self.sharpness_every}")
    at_least(self, 1, "probe_examples", "sharpness_iterations", "hutchinson_samples")

  def _check_pipeline(self) -> None:
    self._check_owned_fields("pipeline", self.pipeline, "pipelines")
    if self.pipeline != "none" and (check := self.pipeline_entry.check) is not None:
      check(self)

  def _check_owned_fields(self, flag: str, chosen: str, kind: str) -> None:
    """Refuses a field that registry entries own, set away from its default without one of them chosen."""
    from saner_jax.train import registry

    for field, owners in registry.owned_fields(kind).items():
      if chosen not in owners and getattr(self, field) != _FIELDS[field].default:
        fail(field, f"applies to --{flag} {' or '.join(owners)} only, not {chosen!r}; drop it or set --{flag}")

  @property
  def perturbation_entry(self):
    """The registry entry (:class:`saner_jax.train.registry.Perturbation`) of the ascent family."""
    from saner_jax.train import registry

    return registry.perturbations()[self.perturbation]

  @property
  def pipeline_entry(self):
    """The registry entry (:class:`saner_jax.train.registry.Pipeline`) of ``pipeline``; KeyError for "none"."""
    from saner_jax.train import registry

    return registry.pipelines()[self.pipeline]

  @property
  def jo_stage1_epochs_resolved(self) -> int:
    """Joint Optimization's stage-1 length; None means half of ``epochs``."""
    return self.epochs // 2 if self.jo_stage1_epochs is None else self.jo_stage1_epochs

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["lr_milestones"] = list(self.lr_milestones)
    return out

  def to_sections(self) -> dict[str, dict[str, Any]]:
    """The fields grouped by section, in ``SECTIONS``' order: what config.yaml holds."""
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in self.to_dict().items():
      out[_FIELDS[name].metadata["section"]][name] = value
    return out


# The longest path a run writes under its out_dir, with room to spare: orbax's
# temporary checkpoint folders, e.g. "/checkpoints/12.orbax-checkpoint-tmp-
# 1718000000000000/state/ocdbt.process_0/d/<32 hex digits>" (about 110 bytes).
DEEPEST_RUN_FILE = 200


def _path_limits() -> tuple[int, int]:
  """The system's longest file name and path, in bytes (255 and 4096 on Linux)."""
  try:
    return os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
  except (OSError, ValueError, AttributeError):  # no pathconf: the POSIX-ish values
    return 255, 4096


def run_name_values(name: str) -> dict[str, Any]:
  """Config values of a run name (:attr:`TrainConfig.run_name`'s inverse).

  ``OPT``, ``OPT+saner``, ``saner``, any of these with ``_head`` (SANER on the
  classifier only), ``OPT+grX`` (the clean gradient on groups X) and
  ``OPT+onlyX`` (SAM's gradient on groups X only). The ``saner_params`` of a
  SANER run without ``_head`` is left to the base config.

  Any of them may end in a policy for the second pass: ``@everyK`` (every K
  steps), ``@pP`` (with probability P), ``@aeC`` (AE-SAM with threshold C),
  then ``-reuse`` for SANER's mask reuse, then ``-scaleF`` for
  ``sam_one_pass_scale``: ``saner@every2``, ``sam@p0.5``,
  ``saner@ae1-reuse``, ``saner@every2-reuse-scale0.4``. Without one the run
  takes the second pass on every step, whatever the base config says.
  """
  name, _, policy = name.partition("@")
  policy_values = _policy_values(name, policy)
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
  return {**values, **policy_values}


def _policy_values(name: str, policy: str) -> dict[str, Any]:
  """The config values of a run name's policy suffix (after ``@``); the numbers are checked by validate()."""
  values: dict[str, Any] = {"sam_policy": "always", "saner_reuse_mask": False, "sam_one_pass_scale": None}
  values.update(dict.fromkeys(SAM_POLICY_FIELDS, None))
  if not policy:
    return {k: _FIELDS[k].default if v is None else v for k, v in values.items()}
  forms = (
    f"--runs: {name}@{policy} is not a policy of the forms @everyK, @pP or @aeC, then optionally -reuse, then "
    "optionally -scaleF with F in (0, 1), e.g. saner@every2, saner@p0.5-reuse or saner@every2-reuse-scale0.4"
  )
  body, scaled, scale = policy.partition("-scale")
  without_reuse = body.removesuffix("-reuse")
  values["saner_reuse_mask"] = without_reuse != body
  body = without_reuse
  try:
    if scaled:
      values["sam_one_pass_scale"] = _coerce("sam_one_pass_scale", scale)
      if values["sam_one_pass_scale"] == 1:  # the default: the name has no suffix
        raise ConfigError(forms)
    for prefix, kind in (("every", "every"), ("p", "random"), ("ae", "adaptive")):
      field = next(f for f, owner in SAM_POLICY_FIELDS.items() if owner == kind)
      if body.startswith(prefix) and len(body) > len(prefix):
        values["sam_policy"] = kind
        values[field] = _coerce(field, body.removeprefix(prefix))
        break
    else:
      raise ConfigError(forms)
  except ConfigError as e:
    raise ConfigError(forms) from e
  return {k: _FIELDS[k].default if v is None else v for k, v in values.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)
_FLOAT_FIELDS = tuple(name for name, hint in _TYPES.items() if hint is float)


def _floats(value: Any) -> tuple[float, ...]:
  """A comma-separated flag, a YAML list, or one number (``lr_milestones: 0.5``)."""
  if isinstance(value, str):
    items: Sequence[Any] = value.split(",")
  else:
    items = value if isinstance(value, (list, tuple)) else [value]
  return tuple(float(v) for v in items)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in _TRUE + _FALSE:
    return str(value).lower() in _TRUE
  raise ValueError(value)


def _int(value: Any) -> int:
  if isinstance(value, float) and not value.is_integer():
    raise ValueError(value)
  return int(value)


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
      return _floats(value)
    if base is str and isinstance(value, bool):  # YAML reads `cpu_conv: true` as a bool
      return str(value).lower()
    converter = {bool: _bool, int: _int}.get(base, base)
    return converter(value)
  except (TypeError, ValueError):
    raise ConfigError(f"--{name}: expected {getattr(base, '__name__', base)}, got {value!r}") from None


def coerce(name: str, value: Any) -> Any:
  """A flag's value (a string, or a YAML value) as its field's type; raises ConfigError naming the flag."""
  if name not in _FIELDS:
    raise ConfigError(f"unknown config key {name!r}")
  return _coerce(name, value)


def field_names() -> tuple[str, ...]:
  """The config's keys, which are also the trainer's flags."""
  return tuple(_FIELDS)


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
  """A config file's keys, over those of the file its ``base:`` key names.

  The base is read first, its own ``base:`` before it, and the file's keys
  override it. ``base:`` names a YAML file relative to the folder of the
  file that names it (``base: common.yaml``, ``.yaml`` optional), or else a
  preset (``base: paper/_base``, relative to saner_jax/train/configs).
  """
  return _load_with_bases(resolve_preset(path_or_name), ())


def _load_with_bases(path: pathlib.Path, children: tuple[pathlib.Path, ...]) -> dict[str, Any]:
  where = f"{path} (the base of {children[-1]})" if children else str(path)
  try:
    values = yaml_files.load(path.read_text()) or {}
  except OSError as e:
    raise ConfigError(f"--config: cannot read {where}: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"--config: {where} is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML file") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"--config: {where} is not valid YAML: {_yaml_problem(e)}") from None
  if not isinstance(values, dict):
    raise ConfigError(f"--config: {where} must hold a mapping of config keys (`key: value` lines)")
  values = flatten_sections(values, where)
  if "base" not in values:
    return values
  base = values.pop("base")
  name = f"{base.removesuffix('.yaml')}.yaml" if isinstance(base, str) and base else None
  # A file next to the one that names it (a user's own shared settings) comes before a shipped preset.
  base_path = next((p for p in (path.parent / name, PRESET_DIR / name) if p.is_file()), None) if name else None
  if base_path is None:
    raise ConfigError(
      f"--config: {path} has base {base!r}, which is neither a YAML file beside it nor a preset; "
      f"give a path relative to {path.parent} or a preset name relative to {PRESET_DIR}, e.g. base: paper/_base"
    )
  chain = (*children, path)
  if base_path.resolve() in {p.resolve() for p in chain}:
    cycle = " -> ".join(str(p) for p in (*chain, base_path))
    raise ConfigError(f"--config: the base: keys form a cycle ({cycle}); remove the base: key that closes it")
  return {**_load_with_bases(base_path, chain), **values}


def flatten_sections(values: dict[str, Any], where: str, flag: str = "--config") -> dict[str, Any]:
  """A config file's keys made flat: those under a section (``noise: {noise_rate: 0.6}``) lifted out.

  A section is a top-level key named in ``SECTIONS`` whose value is a mapping
  (or empty); ``model: resnet8`` stays the field it names. Flat and sectioned
  keys may mix, but a key under the wrong section, or given twice, is a
  one-line ConfigError starting with ``flag``.
  """
  flat: dict[str, Any] = {}

  def put(name: str, value: Any) -> None:
    if name in flat:
      raise ConfigError(f"{flag}: {where} gives {name} twice, flat and under its section; keep one")
    flat[name] = value

  for key, value in values.items():
    if key in SECTIONS and value is None:
      continue  # a section whose keys are all commented out
    if key in SECTIONS and not isinstance(value, dict):
      if key not in _FIELDS:
        raise ConfigError(f"{flag}: {where}: {key}: is a section; give it a mapping of its keys, e.g. {key}: {{...}}")
      put(key, value)  # the field of that name: model: resnet8
      continue
    if key not in SECTIONS:
      put(key, value)
      continue
    for name, item in value.items():
      if name == "base":
        raise ConfigError(f"{flag}: {where}: base: goes at the top level of the file, not under {key}:")
      field = _FIELDS.get(name)
      if field is None:
        known = [n for n, f in _FIELDS.items() if f.metadata["section"] == key]
        raise ConfigError(f"{flag}: {where}: unknown key {name!r} under {key}:; its keys are {known}")
      if field.metadata["section"] != key:
        raise ConfigError(
          f"{flag}: {where}: {name} belongs under {field.metadata['section']}:, not {key}:; move it there"
        )
      put(name, item)
  return flat


def _yaml_problem(error: yaml.YAMLError) -> str:
  """PyYAML's complaint in one line: its problem and where, without the quoted excerpt it prints below."""
  mark = getattr(error, "problem_mark", None)
  problem = getattr(error, "problem", None) or " ".join(str(error).split())
  return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


_METAVARS = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}


def _flag_help(field: dataclasses.Field) -> str:
  """``help`` (one of: ...; default: ...), with argparse's % escaped."""
  allowed = choices(field.name)
  default = field.default
  if isinstance(default, tuple):
    default = ",".join(str(v) for v in default)
  elif isinstance(default, bool) or default is None:
    default = str(default).lower()
  parts = ([f"one of: {', '.join(allowed)}"] if allowed else []) + [f"default: {default}"]
  return f"{field.metadata['help']} ({'; '.join(parts)})".replace("%", "%%")


def _metavar(name: str) -> str:
  if choices(name):
    return "NAME"
  hint = _TYPES[name]
  args = typing.get_args(hint)
  if typing.get_origin(hint) is tuple:
    return "FLOAT,..."
  base = next((a for a in args if a is not type(None)), hint)
  return _METAVARS[base] + ("|none" if type(None) in args else "")


def add_flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
  """``--config`` and one ``--field`` flag per config field, listed by section and all defaulting to "not given".

  Returns the argument groups by section (``"run"``, ...), for a command's own flags to join.
  """
  groups = {section: parser.add_argument_group(title) for section, title in SECTIONS.items()}
  groups["run"].add_argument(
    "--config",
    metavar="FILE|PRESET",
    help="a YAML config file, or a preset of saner_jax/train/configs such as fashion_mnist_quick or "
    "paper/cifar10_sym25_resnet18; the flags override its values",
  )
  for name, field in _FIELDS.items():
    groups[field.metadata["section"]].add_argument(
      f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=_metavar(name), help=_flag_help(field)
    )
  return groups


def from_args(args: argparse.Namespace) -> TrainConfig:
  """Preset/config file first, then flags on top."""
  values = load_yaml(args.config) if getattr(args, "config", None) else {}
  flags = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
  return from_mapping({**values, **flags})

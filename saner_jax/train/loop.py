"""The training loop: data, noise, model, epochs, metrics, checkpoints, plots.

Every epoch ends with an orbax checkpoint that carries the train state and
the whole metrics history; ``metrics.jsonl`` and ``metrics.csv`` are written
from that history. A run killed at any point and resumed therefore has
complete, unduplicated logs, and, since all randomness derives from
``(seed, epoch, step)``, the same final metrics as an uninterrupted run.

Devices: the loop trains data-parallel on a one-axis mesh over every device
of every process (``saner_jax.data_mesh``). The uint8 dataset is replicated
on every device (60k Fashion-MNIST images take 47 MB, CIFAR's 150 MB), so
each device gathers its slice of a batch locally; params and optimizer
state are replicated and the batch is split over the devices inside the
jitted step. A dataset too large for one device would need sharding
instead. ``batch_size`` must divide by the device count. On one device
nothing changes. Multi-host runs pass ``--distributed`` (see
:func:`initialize_distributed`) and write their logs from process 0 into an
``out_dir`` every process sees.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax import parallel
from saner_jax.train import compilation, pipeline, report
from saner_jax.train import config as config_lib
from saner_jax.train import step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig

# Keys a resumed run may change without changing the result.
_RESUME_FREE_KEYS = ("out_dir", "progress", "eval_batch_size", "distributed", "compilation_cache")


def initialize_distributed(config: TrainConfig) -> None:
  """``jax.distributed.initialize()`` for a multi-host run (``--distributed``).

  Must run before anything touches a device; :func:`train` calls it first.
  On a cluster JAX recognises (SLURM, Open MPI, Cloud TPU, Kubernetes) it
  finds every setting itself. Elsewhere start one process per host with
  ``JAX_COORDINATOR_ADDRESS`` (process 0's ``host:port``),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set. A second run in the same
  process reuses the first one's initialisation.
  """
  if not config.distributed or jax.distributed.is_initialized():
    return
  env = {name: os.environ.get(f"JAX_{name.upper()}") for name in ("num_processes", "process_id")}
  jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})


def _device_mesh(config: TrainConfig) -> Mesh:
  """The data-parallel mesh; checks that the batch splits over it."""
  mesh = parallel.data_mesh()
  devices = mesh.size
  if config.batch_size % devices:
    raise ConfigError(
      f"--batch_size: {config.batch_size} does not split over the {devices} devices; use a multiple of {devices}"
    )
  per_device = config.batch_size // devices
  if config.perturbation_mode == "per_device" and per_device % (config.m_sharpness * config.grad_accum_steps):
    raise ConfigError(
      f"--batch_size: perturbation_mode per_device splits each device's {per_device} examples into "
      f"m_sharpness x grad_accum_steps = {config.m_sharpness * config.grad_accum_steps} parts; "
      f"use a batch_size that is a multiple of {devices * config.m_sharpness * config.grad_accum_steps}"
    )
  return mesh


def _convolutions(config: TrainConfig, mesh: Mesh):
  """The model's convolutions (:func:`saner_jax.cpu_conv.choose`); a bad ``--cpu_conv true`` is a ConfigError."""
  from saner_jax import cpu_conv

  try:
    return cpu_conv.choose(config.cpu_conv, dtype=config.compute_dtype, devices=mesh.size)
  except ValueError as e:
    raise ConfigError(f"--cpu_conv: {e}") from None
  except cpu_conv.NativeBuildError as e:
    raise ConfigError(f"--cpu_conv true: {str(e).splitlines()[0]}; or pass --cpu_conv auto") from None


@dataclasses.dataclass
class PreparedData:
  train: pipeline.DeviceData
  test: pipeline.DeviceData
  test_valid: jax.Array
  test_examples: int  # without the padding
  num_classes: int
  image_shape: tuple[int, int, int]
  realised_noise_rate: float
  info: Any


def prepare_data(config: TrainConfig, sharding: NamedSharding | None = None) -> PreparedData:
  """Loads the dataset, draws the seeded subset and injects the label noise.

  ``sharding`` places the arrays (replicated in :func:`train`).
  """
  from saner_jax.train import data, noise

  info = data.DATASETS[config.dataset]
  train = data.load_dataset(config.dataset, "train", data_dir=config.data_dir, source=config.data_source)
  test = data.load_dataset(config.dataset, "test", data_dir=config.data_dir, source=config.data_source)
  rng = np.random.default_rng(config.seed)
  train_idx = np.arange(len(train.labels))
  if config.train_examples is not None and config.train_examples < len(train_idx):
    train_idx = np.sort(rng.permutation(len(train_idx))[: config.train_examples])
  test_idx = np.arange(len(test.labels))
  if config.test_examples is not None and config.test_examples < len(test_idx):
    test_idx = test_idx[: config.test_examples]

  real_labels = None
  if config.noise_mode == "real":
    if config.noise_label_key not in train.noisy_label_sets:
      raise ConfigError(
        f"--noise_label_key: {config.noise_label_key!r} is not a label set of "
        f"{config.dataset}; it has {sorted(train.noisy_label_sets)}"
      )
    real_labels = train.noisy_label_sets[config.noise_label_key][train_idx]
  noisy = noise.inject_noise(
    train.labels[train_idx],
    num_classes=train.num_classes,
    mode=config.noise_mode,
    rate=config.noise_rate,
    seed=config.seed,
    dataset=config.dataset,
    images=train.images[train_idx],
    real_labels=real_labels,
  )
  if config.batch_size > len(train_idx):
    raise ConfigError(f"--batch_size: {config.batch_size} exceeds the {len(train_idx)} training examples")

  test_images = test.images[test_idx]
  test_labels = test.labels[test_idx]
  pad = -len(test_labels) % config.eval_batch_size
  valid = np.concatenate([np.ones(len(test_labels), bool), np.zeros(pad, bool)])
  test_images = np.concatenate([test_images, np.zeros((pad, *test_images.shape[1:]), np.uint8)])
  test_labels = np.concatenate([test_labels, np.zeros(pad, np.int32)])
  return PreparedData(
    train=pipeline.to_device(
      train.images[train_idx], noisy.labels, noisy.true_labels, noisy.noise_mask, sharding=sharding
    ),
    test=pipeline.to_device(test_images, test_labels, sharding=sharding),
    test_valid=pipeline.place(valid, sharding),
    test_examples=len(test_idx),
    num_classes=train.num_classes,
    image_shape=tuple(train.images.shape[1:]),
    realised_noise_rate=float(noisy.rate),
    info=info,
  )


def _epoch_record(epoch: int, sums: dict[str, float], extra: dict[str, Any], two_pass: bool) -> dict[str, Any]:
  def ratio(num, den):  # None, not NaN, when nothing was counted (e.g. no noisy samples)
    return sums[num] / sums[den] if sums[den] else None

  record = {
    "epoch": epoch,
    "train_loss": ratio("loss_sum", "examples"),
    "train_acc": ratio("correct", "examples"),
    "clean_acc": ratio("clean_correct", "clean"),
    "noisy_memorised": ratio("noisy_memorised", "noisy"),
    "noisy_true": ratio("noisy_true", "noisy"),
  }
  record["fit_gap"] = (
    None
    if None in (record["clean_acc"], record["noisy_memorised"])
    else record["clean_acc"] - record["noisy_memorised"]
  )
  for key in ("group_A", "group_B", "group_C", "cosine"):
    record[key] = sums[key] / sums["steps"] if two_pass else None
  record.update(extra)
  return record


class _Logs:
  """metrics.jsonl / metrics.csv, always rewritten whole from the history."""

  def __init__(self, out_dir: pathlib.Path):
    self.jsonl = out_dir / "metrics.jsonl"
    self.csv = out_dir / "metrics.csv"
    self.tensorboard = None
    try:
      from tensorboardX import SummaryWriter  # optional

      self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
    except ImportError:
      pass

  def write(self, history: list[dict[str, Any]], tensorboard: bool = True) -> None:
    tmp = self.jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
    os.replace(tmp, self.jsonl)
    if history:
      tmp = self.csv.with_suffix(".csv.tmp")
      with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
      os.replace(tmp, self.csv)
    if tensorboard and self.tensorboard is not None and history:
      record = history[-1]
      for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch" and value is not None:
          self.tensorboard.add_scalar(key, value, record["epoch"])
      self.tensorboard.flush()


def _checkpoint_manager(out_dir: pathlib.Path):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    (out_dir / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )


def _progress_mode(config: TrainConfig) -> str:
  if config.progress != "auto":
    return config.progress
  return "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "lines"


def _check_resumable(out_dir: pathlib.Path, config: TrainConfig) -> None:
  # Through the config class, so that a key added since the run was saved
  # compares as its default.
  saved = config_lib.from_mapping(yaml.safe_load((out_dir / "config.yaml").read_text())).to_dict()
  current = config.to_dict()
  changed = sorted(k for k in current if k not in _RESUME_FREE_KEYS and saved.get(k) != current[k])
  if changed:
    raise ConfigError(
      f"--resume: {out_dir} was started with another config; differing keys: "
      + ", ".join(f"{k} ({saved.get(k)!r} -> {current[k]!r})" for k in changed)
    )


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
  """Runs (or resumes) one training run; returns its summary."""
  from saner_jax.train import models

  initialize_distributed(config)
  config.validate()
  if config.compilation_cache:
    compilation.enable_compilation_cache()
  mesh = _device_mesh(config)
  convolutions = _convolutions(config, mesh)
  replicated = NamedSharding(mesh, P())
  primary = jax.process_index() == 0  # the one process that writes logs
  out_dir = pathlib.Path(config.out_dir)
  has_run = (out_dir / "config.yaml").exists()
  if has_run and not resume:
    raise ConfigError(
      f"--out_dir: {out_dir} already holds a run; pass --resume to continue it or choose another --out_dir"
    )
  if resume and has_run:
    _check_resumable(out_dir, config)
  if jax.process_count() > 1:  # every process has looked at out_dir before process 0 writes to it
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("saner_jax: out_dir checked")
  out_dir.mkdir(parents=True, exist_ok=True)
  if primary:
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

  t_start = time.perf_counter()
  prepared = prepare_data(config, replicated)
  info = prepared.info
  steps_per_epoch = prepared.train.size // config.batch_size  # drop the ragged last batch
  model = models.create_model(
    config.model, prepared.num_classes, dtype=config.compute_dtype, conv_general_dilated=convolutions.conv
  )
  optimizer = step_lib.build_optimizer(config, steps_per_epoch)
  # Made by a jitted function, so that on several hosts they are global arrays.
  init_key, shuffle_key, augment_key = jax.jit(
    lambda: jax.random.split(jax.random.key(config.seed), 3), out_shardings=replicated
  )()
  state = pipeline.place(step_lib.init_state(model, optimizer, init_key, prepared.image_shape), replicated)

  # Replicated outputs keep the state where the next step (and orbax's
  # restore, which copies the shardings of ``state``) expects it.
  train_step = jax.jit(
    step_lib.make_train_step(
      model,
      optimizer,
      config,
      mean=info.mean,
      std=info.std,
      flip=info.flip,
      crop_padding=info.crop_padding,
      mesh=mesh,
    ),
    donate_argnums=(0, 1),
    out_shardings=replicated,
  )
  eval_step = jax.jit(step_lib.make_eval_step(model, config, mean=info.mean, std=info.std, mesh=mesh))
  permute = jax.jit(pipeline.epoch_permutation, static_argnums=2, out_shardings=replicated)

  history: list[dict[str, Any]] = []
  start_epoch, best_test, wall_offset = 1, 0.0, 0.0
  manager = _checkpoint_manager(out_dir) if config.checkpoint else None
  if resume and manager is not None and manager.latest_step() is not None:
    import orbax.checkpoint as ocp

    restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = restored.state
    history = restored.meta["history"]
    start_epoch = restored.meta["epoch"] + 1
    best_test = restored.meta["best_test_acc"]
    wall_offset = restored.meta["wall_time_s"]
    if primary:
      print(f"resumed {out_dir} after epoch {start_epoch - 1}", flush=True)
  elif resume and (out_dir / "metrics.jsonl").exists() and (out_dir / "metrics.jsonl").stat().st_size:
    raise ConfigError(
      f"--resume: {out_dir} has logged epochs but no checkpoint to resume from "
      "(was it run with --checkpoint false?); start a new --out_dir"
    )
  logs = _Logs(out_dir) if primary else None
  if logs is not None:
    logs.write(history, tensorboard=False)  # the restored epochs are in TensorBoard already

  mode = _progress_mode(config) if primary else "none"
  if primary:
    print(
      f"{config.run_name}: {config.model} on {config.dataset} ({prepared.train.size} train, "
      f"{config.noise_description}, realised {prepared.realised_noise_rate:.2%}), "
      f"{config.epochs} epochs x {steps_per_epoch} steps on {mesh.size} device(s)",
      flush=True,
    )
    print(f"convolutions: {convolutions.reason}", flush=True)
  for epoch in range(start_epoch, config.epochs + 1):
    t_epoch = time.perf_counter()
    permutation = permute(shuffle_key, epoch, prepared.train.size)
    metrics = jax.device_put(step_lib.zero_metrics(), replicated)
    bar = None
    if mode == "bar":
      from tqdm.auto import tqdm

      bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False)
    for i in range(steps_per_epoch):
      state, metrics = train_step(state, metrics, prepared.train, permutation, i, augment_key)
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    sums = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if sums["nonfinite"] or not math.isfinite(sums["loss_sum"]):
      raise FloatingPointError(
        f"epoch {epoch}: non-finite loss, gradients or weights ({int(sums['nonfinite'])} values); "
        f"the checkpoint of epoch {epoch - 1} is kept; start a new --out_dir with a lower --lr or --rho"
      )
    correct = eval_step(
      state.params, state.batch_stats, prepared.test.images, prepared.test.labels, prepared.test_valid
    )
    test_acc = float(correct) / prepared.test_examples
    best_test = max(best_test, test_acc)
    last_step = int(state.step) - 1
    record = _epoch_record(
      epoch,
      sums,
      two_pass=optimizer.perturbation is not None,
      extra={
        "test_acc": test_acc,
        "best_test_acc": best_test,
        "lr": float(optimizer.lr(last_step)),
        "alpha": float(optimizer.alpha(last_step)) if optimizer.alpha else None,
        "epoch_time_s": time.perf_counter() - t_epoch,
        "wall_time_s": wall_offset + time.perf_counter() - t_start,
      },
    )
    history.append(record)
    if manager is not None:
      import orbax.checkpoint as ocp

      manager.save(
        epoch,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(
            {"epoch": epoch, "best_test_acc": best_test, "wall_time_s": record["wall_time_s"], "history": history}
          ),
        ),
      )
      manager.wait_until_finished()
    if logs is not None:
      logs.write(history)
    if mode != "none":
      print(report.epoch_line(record, config.epochs), flush=True)

  summary = {
    "run": config.run_name,
    "config": config.to_dict(),
    "realised_noise_rate": prepared.realised_noise_rate,
    "train_examples": prepared.train.size,
    "final": history[-1] if history else None,
    "best_test_acc": best_test,
    "last_test_acc": history[-1]["test_acc"] if history else None,
    "mean_group_B": (
      float(np.mean([r["group_B"] for r in history])) if history and history[0]["group_B"] is not None else None
    ),
    "git_revision": report.git_revision(),
    "jax_backend": jax.default_backend(),
    "devices": mesh.size,
    "convolutions": convolutions.path,
  }
  if primary:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    report.plot_run(history, out_dir / "curves.png", title=config.run_name)
  return summary

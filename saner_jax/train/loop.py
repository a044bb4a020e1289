"""The training loop, in named pieces.

:func:`train` runs them in order: :func:`setup` (config, ``out_dir``, data,
model, optimizer, keys: an :class:`~saner_jax.train.engine.Run`), the
:class:`~saner_jax.train.engine.Recipe`'s ``init``,
:func:`restore`, then per epoch the recipe's ``epoch`` and ``evaluate``,
:func:`record_epoch` and :func:`save`, and finally :func:`summarise`. The
default recipe, :func:`~saner_jax.train.engine.supervised`, trains one
network with the config's optimizer; a noise-robust pipeline
passes its own recipe, with its own state, epoch and evaluation, and gets
the rest (checkpoints, resume, logs, plots, devices) unchanged.

Every epoch ends with an orbax checkpoint that carries the state and the
whole metrics history (:mod:`saner_jax.train.checkpointing`);
``metrics.jsonl`` and ``metrics.csv`` are written from that history. A run
killed at any point and resumed therefore has complete, unduplicated logs,
and, since all randomness derives from ``(seed, epoch, step)``, the same
final metrics as an uninterrupted run.

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

import contextlib
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax import _cli_signals, parallel
from saner_jax.train import checkpointing, compilation, lock, reporting, streaming
from saner_jax.train import config as config_lib
from saner_jax.train import step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig
from saner_jax.train.engine import Recipe, Run, RunKeys, prepare_data, supervised
from saner_jax.train.run_dir import RunDir, problem

# Keys a resumed run may change without changing the result.
_RESUME_FREE_KEYS = (
  "out_dir",
  "progress",
  "eval_batch_size",
  "distributed",
  "compilation_cache",
  "stream_workers",
  "tensorboard",
  "wandb",
  "wandb_project",
)


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

  def from_env(name: str) -> int | None:  # None (unset) is initialize's default: it looks for itself
    value = os.environ.get(f"JAX_{name.upper()}")
    return None if value is None else int(value)

  jax.distributed.initialize(num_processes=from_env("num_processes"), process_id=from_env("process_id"))


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


def _progress_mode(config: TrainConfig) -> str:
  if config.progress != "auto":
    return config.progress
  return "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "lines"


def config_changes(saved: dict[str, Any], config: TrainConfig) -> str:
  """The keys whose values in ``config`` differ from ``saved`` and change the result, as
  ``"lr (0.1 -> 0.05), ..."``; empty when none do.

  ``saved`` goes through the config class, so that a key added since it was
  written compares as its default.
  """
  saved = config_lib.from_mapping(saved).to_dict()
  current = config.to_dict()
  changed = sorted(k for k in current if k not in _RESUME_FREE_KEYS and saved.get(k) != current[k])
  return ", ".join(f"{k} ({saved.get(k)!r} -> {current[k]!r})" for k in changed)


def run_identity(out_dir: pathlib.Path) -> tuple[dict[str, Any], str] | None:
  """The config a run in ``out_dir`` was made with, and where it was read.

  Its newest checkpoint's, which nothing edits; for a run of an earlier
  release (no config in its checkpoints) or one without checkpoints,
  ``config.yaml``; None where neither is.
  """
  files = RunDir(out_dir)
  try:
    saved = checkpointing.stored_config(out_dir)
  except OSError as e:
    raise _unreadable(files.checkpoints, e) from e
  if saved is not None:
    return saved, "its checkpoint"
  values = files.read_config()
  if values is None:
    return None
  # Written sectioned now and flat by earlier releases: both read back as the flat keys.
  return config_lib.flatten_sections(values, str(files.config), flag="--resume"), str(files.config)


def _unreadable(path: pathlib.Path, error: OSError) -> ConfigError:
  return ConfigError(
    f"--resume: cannot read {path}: {problem(error)}; make it readable (chmod -R u+rwX {shlex.quote(str(path))}) "
    "or start a new --out_dir"
  )


def _check_resumable(out_dir: pathlib.Path, config: TrainConfig) -> None:
  identity = run_identity(out_dir)
  if identity is None:
    return
  saved, where = identity
  changed = config_changes(saved, config)
  if changed:
    raise ConfigError(
      f"--resume: {out_dir} was started with another config (as {where} records); differing keys: {changed}; "
      "resume with the values it was started with, or start a new --out_dir"
    )


def _holds_run(out_dir: pathlib.Path) -> bool:
  """A completed checkpoint, logged epochs or a summary: what a start that failed never leaves."""
  files = RunDir(out_dir)
  try:
    epochs = checkpointing.completed_epochs(out_dir)
  except OSError as e:  # checkpoints/ cannot be listed
    raise _unreadable(files.checkpoints, e) from e
  return bool(epochs or files.has_logged_epochs() or files.summary.exists())


def _claim_out_dir(config: TrainConfig, resume: bool) -> pathlib.Path:
  """Refuses to overwrite or to resume with another config; writes ``config.yaml``."""
  out_dir = pathlib.Path(config.out_dir)
  has_run = _holds_run(out_dir)
  if has_run and not resume:
    raise ConfigError(
      f"--out_dir: {out_dir} already holds a run; pass --resume to continue it or choose another --out_dir"
    )
  if resume and has_run:
    _check_resumable(out_dir, config)
  elif resume and jax.process_index() == 0:
    print(f"{out_dir} holds no completed checkpoint to resume; starting a new run", flush=True)
  if jax.process_count() > 1:  # every process has looked at out_dir before process 0 writes to it
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("saner_jax: out_dir checked")
  out_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    try:
      RunDir(out_dir).write_config(config.to_sections())
    except OSError as e:  # a full disk
      raise lock.unusable(out_dir, e) from e
  return out_dir


def setup(config: TrainConfig, *, resume: bool = False) -> Run:
  """Claims the ``out_dir`` of a validated ``config``, loads the data, builds the model and optimizer.

  :func:`train` validates the config (once) and starts JAX's distributed
  runtime before calling it; a caller of its own does the same.
  """
  from saner_jax.train import models

  reporting.git_revision()  # the revision of the code this process loaded, before a run can outlast it
  if config.compilation_cache:
    compilation.enable_compilation_cache()
  mesh = _device_mesh(config)
  convolutions = _convolutions(config, mesh)
  replicated = NamedSharding(mesh, P())
  out_dir = _claim_out_dir(config, resume)
  started = time.perf_counter()
  input_path, input_reason = choose_input(config)
  prepared = prepare_input(config, input_path, replicated)
  model = models.create_model(
    config.model,
    prepared.num_classes,
    width=config.model_width,
    dtype=config.compute_dtype,
    conv_general_dilated=convolutions.conv,
  )
  optimizer = step_lib.build_optimizer(config, prepared.train.size // config.batch_size)
  # Made by a jitted function, so that on several hosts they are global arrays.
  keys = jax.jit(lambda: jax.random.split(jax.random.key(config.seed), 3), out_shardings=replicated)()
  display = _progress_mode(config) if jax.process_index() == 0 else "none"
  return Run(
    config, mesh, out_dir, prepared, model, convolutions, optimizer, RunKeys(*keys), display, started,
    input_path, input_reason,
  )  # fmt: skip


def choose_input(config: TrainConfig) -> tuple[str, str]:
  """``("device" | "stream", why)``: the input path of the run (:func:`saner_jax.train.streaming.choose`)."""
  return streaming.choose(config)


def prepare_input(config: TrainConfig, input_path: str, sharding: NamedSharding) -> Any:
  """:func:`prepare_data` for the on-device path; the streamed splits (nothing decoded) otherwise."""
  if input_path == "device":
    return prepare_data(config, sharding)
  return streaming.prepare(config)


def restore(
  run: Run, checkpoints: Any, state: Any, *, resume: bool, iterator: Any = None
) -> tuple[Any, checkpointing.Progress]:
  """With ``resume``, the latest checkpoint's state and progress; else ``state`` and a fresh start.

  ``checkpoints`` is the run's checkpoint manager, None without checkpoints;
  a Grain ``iterator`` is moved to the checkpoint's position.
  """
  restored = None
  if resume and checkpoints is not None:
    restored = checkpointing.restore_latest(
      checkpoints, state, warn=lambda line: print(line, file=sys.stderr, flush=True), iterator=iterator
    )
  if restored is not None:
    if run.primary:
      print(f"resumed {run.out_dir} after epoch {restored[1].epoch}", flush=True)
    return restored
  if resume and run.files.has_logged_epochs():
    raise ConfigError(
      f"--resume: {run.out_dir} has logged epochs but no checkpoint to resume from "
      "(was it run with --checkpoint false?); start a new --out_dir"
    )
  return state, checkpointing.Progress()


def record_epoch(
  progress: checkpointing.Progress,
  epoch: int,
  fields: dict[str, Any],
  test_acc: float,
  epoch_time_s: float,
  wall_time_s: float,
  val_acc: float | None = None,
) -> checkpointing.Progress:
  """The progress after ``epoch``, its record appended to the history.

  ``val_acc`` (the validation accuracy) is recorded when the run holds out a
  validation set. ``best_test_acc`` is a diagnostic: the maximum over epochs
  of the test accuracy, chosen on the test set.
  """
  best = max(progress.best_test_acc, test_acc)
  record = {
    "epoch": epoch,
    **fields,
    **({} if val_acc is None else {"val_acc": val_acc}),
    "test_acc": test_acc,
    "best_test_acc": best,
    "epoch_time_s": epoch_time_s,
    "wall_time_s": wall_time_s,
  }
  return checkpointing.Progress(epoch, best, wall_time_s, (*progress.history, record))


def save(
  run: Run, checkpoints: Any, state: Any, progress: checkpointing.Progress, logs: Any, iterator: Any = None
) -> None:
  """Checkpoints the state with its progress, then rewrites the logs from the history.

  Every process calls it (orbax writes from each); ``logs`` is the
  :class:`saner_jax.train.reporting.MetricsLog` on process 0, None elsewhere.
  Raises :class:`saner_jax.train.checkpointing.WriteError` where the system
  refuses a write.
  """
  if checkpoints is not None:
    checkpointing.save(checkpoints, state, progress, iterator, config=run.config.to_dict())
  if logs is not None:
    with checkpointing.refused_writes(f"the logs of epoch {progress.epoch}", run.out_dir):
      logs.write(progress.history)
  if run.display != "none":
    print(reporting.epoch_line(progress.history[-1], run.config.epochs), flush=True)


def metrics_log(run: Run) -> reporting.MetricsLog:
  """The run's :class:`saner_jax.train.reporting.MetricsLog`, with the loggers its config asks for.

  Raises:
    ConfigError: a logger's package is missing, or W&B cannot start.
  """
  config = run.config
  wandb = (
    {"project": config.wandb_project, "name": config.run_name, "config": config.to_dict()} if config.wandb else None
  )
  try:
    return reporting.MetricsLog(run.out_dir, tensorboard=config.tensorboard, wandb=wandb)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def summarise(run: Run, progress: checkpointing.Progress) -> dict[str, Any]:
  """The run's summary; process 0 also writes ``summary.json`` and ``curves.png``."""
  config, history = run.config, progress.history
  summary = {
    "run": config.run_name,
    "config": config.to_dict(),
    "realised_noise_rate": run.data.realised_noise_rate,
    "train_examples": run.data.train.size,
    "val_examples": run.data.val.examples if run.data.val else 0,
    "val_noise_rate": run.data.val_noise_rate,
    "final": history[-1] if history else None,
    **reporting.selected_metrics(history),
    "mean_group_B": (
      float(np.mean([r["group_B"] for r in history])) if history and history[0]["group_B"] is not None else None
    ),
    "git_revision": reporting.git_revision(),
    "jax_backend": jax.default_backend(),
    "devices": run.mesh.size,
    "convolutions": run.convolutions.path,
    "cpu": reporting.cpu_model(),
    "cpu_isa": reporting.cpu_isa(),
  }
  if run.primary:
    with checkpointing.refused_writes("the summary", run.out_dir):
      run.files.write_summary(summary)
      reporting.plot_run(history, run.files.curves, title=config.run_name)
  return summary


def _announce(run: Run) -> None:
  config, data = run.config, run.data
  pipeline_name = "" if config.pipeline == "none" else f" in the {config.pipeline} pipeline"
  print(
    f"{config.run_name}{pipeline_name}: {config.model} on {config.dataset} ({data.train.size} train, "
    f"{config.noise_description}, realised {data.realised_noise_rate:.2%}), "
    f"{config.epochs} epochs x {run.steps_per_epoch} steps on {run.mesh.size} device(s)",
    flush=True,
  )
  print(f"convolutions: {run.convolutions.reason}", flush=True)
  print(f"input: {run.input_path} ({run.input_reason})", flush=True)
  note = streaming.real_noise_note(config)
  if note:
    print(note, flush=True)


def recipe_of(config: TrainConfig) -> Callable[[Run], Recipe]:
  """The recipe of the config's ``pipeline``: :func:`supervised` for "none"."""
  if config.pipeline == "none":
    return supervised
  return config.pipeline_entry.recipe


def _input_recipe(run: Run, recipe: Callable[[Run], Recipe] | None) -> Recipe:
  """The recipe for the run's input path, with the fields of a real-noise dataset adjusted."""
  if run.input_path == "stream" and recipe is None:
    recipe = streaming.supervised
  return streaming.with_real_noise_fields(run, (recipe or recipe_of(run.config))(run))


class RunStopped(Exception):
  """A run ended early in a way its user can act on: it diverged, was interrupted or could not write.

  The message says which checkpoint is kept and what to do; ``exit_code`` is
  the CLI's exit status (130 after Ctrl-C, as a shell reports SIGINT).
  """

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


def _stopped(run: Run, epoch: int, cause: BaseException) -> RunStopped:
  """What a diverged, interrupted or unwritable ``epoch`` leaves, as one message."""
  interrupted = isinstance(cause, KeyboardInterrupt)
  unwritable = isinstance(cause, checkpointing.WriteError)
  terminated = isinstance(cause, _cli_signals.Interrupted) and cause.name != "SIGINT"
  if interrupted:
    what = f"{'terminated by ' + cause.name if terminated else 'interrupted'} in epoch {epoch}"  # type: ignore[attr-defined]
  else:
    what = str(cause)
  code = getattr(cause, "exit_code", 130) if interrupted else 1
  try:
    kept = checkpointing.completed_epochs(run.out_dir) if run.config.checkpoint else []
  except OSError:  # checkpoints/ became unreadable: say nothing is kept rather than fail in the report
    kept = []
  once = f"once {run.out_dir} can be written again, " if unwritable else ""
  if kept:
    todo = (
      f"{once}continue with: python -m saner_jax.train --config {shlex.quote(str(run.files.config))} --resume"
      if interrupted or unwritable
      else "start a new --out_dir with a lower --lr or --rho"
    )
    return RunStopped(f"{what}; the checkpoint of epoch {kept[-1]} is kept; {todo}", code)
  if not run.config.checkpoint and epoch > 1:
    return RunStopped(f"{what}; the logs of epochs 1-{epoch - 1} are kept, but without checkpoints it cannot resume")
  again = (
    "run again with a lower --lr or --rho" if not (interrupted or unwritable) else f"{once}run the same command again"
  )
  return RunStopped(f"{what}; no checkpoint was written, so {run.out_dir} holds no run: {again}", code)


def train(
  config: TrainConfig, *, resume: bool = False, recipe: Callable[[Run], Recipe] | None = None
) -> dict[str, Any]:
  """Runs (or resumes) one training run; returns its summary.

  ``recipe`` builds the state and the epoch and evaluation functions from
  the :class:`Run`; the default is the config's ``pipeline``
  (:func:`recipe_of`), :func:`supervised` (one network trained by the
  config's optimizer) unless a noise-robust pipeline is chosen. Process 0 holds ``out_dir``'s lock
  (:mod:`saner_jax.train.lock`) from before it looks at the directory until
  the run ends.

  Raises:
    ConfigError: a bad config, or an ``out_dir`` that is unusable, in use,
      or holds another run.
    RunStopped: the run diverged, was interrupted (Ctrl-C) or could not
      write a checkpoint or log (a full disk).
    checkpointing.CheckpointError: ``resume`` found no checkpoint that restores.
  """
  initialize_distributed(config)
  config.validate()  # before the out_dir is created for the lock
  with lock.hold(config.out_dir) if jax.process_index() == 0 else contextlib.nullcontext():
    run = setup(config, resume=resume)
    parts = _input_recipe(run, recipe)
    checkpoints = checkpointing.manager(run.out_dir) if config.checkpoint else None
    state, progress = restore(run, checkpoints, parts.init(), resume=resume, iterator=parts.iterator)
    wall_offset = progress.wall_time_s
    epoch = progress.epoch + 1
    logs = None
    try:
      if run.primary:
        with checkpointing.refused_writes("the logs", run.out_dir):
          logs = metrics_log(run)
          logs.write(progress.history, tensorboard=False)  # the restored epochs are in TensorBoard already
        _announce(run)
      for epoch in range(progress.epoch + 1, config.epochs + 1):
        _cli_signals.check()
        t_epoch = time.perf_counter()
        state, fields = parts.epoch(state, epoch)
        test_acc = parts.evaluate(state, "test")
        val_acc = parts.evaluate(state, "val") if run.data.val else None
        now = time.perf_counter()
        progress = record_epoch(
          progress, epoch, fields, test_acc, now - t_epoch, wall_offset + now - run.started, val_acc
        )
        save(run, checkpoints, state, progress, logs, parts.iterator)
      _cli_signals.check()
      return summarise(run, progress)
    except (FloatingPointError, KeyboardInterrupt, checkpointing.WriteError) as e:
      if isinstance(e, KeyboardInterrupt):
        _cli_signals.acknowledge()  # a second Ctrl-C must not cut the report short
      raise _stopped(run, epoch, e) from e
    except Exception as e:
      interrupt = _cli_signals.behind(e)  # an interrupt that C code turned into its own error
      if interrupt is None:
        raise
      _cli_signals.acknowledge()
      raise _stopped(run, epoch, interrupt) from e
    finally:
      if logs is not None:
        logs.close()

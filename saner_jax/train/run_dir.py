"""A run's directory, and a comparison's: the one place that names their files and reads them back.

A run directory (``--out_dir``) holds::

  config.yaml     the resolved config; ``--config DIR/config.yaml --resume`` continues the run
  metrics.jsonl   one record per epoch (and metrics.csv, the same as a table)
  summary.json    the headline numbers, written when the run ends
  curves.png      the run's figure
  checkpoints/    orbax checkpoints, one per epoch (two kept)
  tensorboard/    TensorBoard events, where enabled
  wandb/          the Weights & Biases run, with --wandb (its id in wandb_run_id, reused on resume)
  .lock           held by the process training in it

A comparison directory holds one run directory per run and seed,
``<run>_seed<seed>``, and ``compare.md`` and ``compare.png``. Nothing here
loads JAX.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import yaml

from saner_jax.train import yaml_files
from saner_jax.train.errors import ConfigError


def problem(error: BaseException) -> str:
  """An error in a few words: the system's message, or the exception's kind and first line."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class RunDir:
  """The files of one run's directory.

  >>> run = RunDir("runs/saner")
  >>> run.summary.as_posix(), run.checkpoints.as_posix()
  ('runs/saner/summary.json', 'runs/saner/checkpoints')
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)

  def __repr__(self) -> str:
    return f"RunDir({str(self.path)!r})"

  def __str__(self) -> str:  # the path, so that messages and os functions read it as one
    return str(self.path)

  def __fspath__(self) -> str:
    return str(self.path)

  @property
  def config(self) -> pathlib.Path:
    return self.path / "config.yaml"

  @property
  def metrics(self) -> pathlib.Path:
    return self.path / "metrics.jsonl"

  @property
  def metrics_csv(self) -> pathlib.Path:
    return self.path / "metrics.csv"

  @property
  def summary(self) -> pathlib.Path:
    return self.path / "summary.json"

  @property
  def curves(self) -> pathlib.Path:
    return self.path / "curves.png"

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.path / "checkpoints"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.path / "tensorboard"

  @property
  def wandb_run_id(self) -> pathlib.Path:
    return self.path / "wandb_run_id"

  @property
  def lock(self) -> pathlib.Path:
    return self.path / ".lock"

  def has_logged_epochs(self) -> bool:
    """Whether ``metrics.jsonl`` holds a record (a start that failed leaves none)."""
    return self.metrics.is_file() and self.metrics.stat().st_size > 0

  def looks_like_a_run(self) -> bool:
    """A checkpoint folder or a metrics log: what a run leaves once it has started training."""
    return self.checkpoints.is_dir() or self.metrics.is_file()

  def read_summary(self, command: str = "compare") -> dict[str, Any] | None:
    """``summary.json``, None while the run has none; an unreadable or damaged one is a one-line ConfigError."""
    try:
      summary = json.loads(self.summary.read_text())
      if not isinstance(summary, dict):
        raise ValueError("not a JSON object")
      return summary
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      raise ConfigError(
        f"{command}: cannot read {self.summary}: {problem(e)}; delete it, and {command} finishes the run from "
        "its checkpoints"
      ) from None

  def read_history(self) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl``, oldest first."""
    return [json.loads(line) for line in self.metrics.read_text().splitlines()]

  def read_config(self) -> dict[str, Any] | None:
    """The keys of ``config.yaml``, None where there is none; an unreadable one is a one-line ConfigError."""
    try:
      values = yaml_files.load(self.config.read_text()) or {}
    except FileNotFoundError:
      return None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
      raise ConfigError(
        f"--resume: cannot read {self.config}: {problem(e)}; restore the file or start a new --out_dir"
      ) from e
    if not isinstance(values, dict):
      raise ConfigError(
        f"--resume: {self.config} holds no mapping of config keys; restore the file or start a new --out_dir"
      )
    return values

  def write_config(self, values: dict[str, Any]) -> None:
    self.config.write_text(yaml.safe_dump(values, sort_keys=False))

  def write_summary(self, summary: dict[str, Any]) -> None:
    self.summary.write_text(json.dumps(summary, indent=2, allow_nan=False))


class ComparisonDir:
  """The files of ``compare``'s ``--out_dir``: a run directory per run and seed, a table and a figure."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)

  def run(self, name: str, seed: int) -> RunDir:
    return RunDir(self.path / f"{name}_seed{seed}")

  @property
  def table(self) -> pathlib.Path:
    return self.path / "compare.md"

  @property
  def figure(self) -> pathlib.Path:
    return self.path / "compare.png"

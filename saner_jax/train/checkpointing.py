"""Orbax checkpoints of a run: its state and its progress.

A checkpoint holds two items: ``state``, any pytree of arrays (the loop's
:class:`saner_jax.train.step.TrainState`, or whatever a pipeline trains:
two networks, corrected labels), and ``meta``, the run's
:class:`Progress` as JSON. The progress carries the whole metrics history,
so a resumed run rewrites complete, unduplicated logs from the checkpoint
alone. Checkpoints are numbered by epoch; the latest two are kept.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp


class Progress(NamedTuple):
  """How far a run has got; saved with each checkpoint.

  Attributes:
    epoch: the last finished epoch, 0 before the first.
    best_test_acc: the best test accuracy so far.
    wall_time_s: the run's wall time up to the end of ``epoch``, restarts
      excluded.
    history: one metrics record per finished epoch.
  """

  epoch: int = 0
  best_test_acc: float = 0.0
  wall_time_s: float = 0.0
  history: Sequence[dict[str, Any]] = ()


def manager(out_dir: pathlib.Path) -> ocp.CheckpointManager:
  """The checkpoints of the run in ``out_dir`` (under ``checkpoints/``)."""
  return ocp.CheckpointManager(
    (pathlib.Path(out_dir) / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )


def save(checkpoints: ocp.CheckpointManager, state: Any, progress: Progress) -> None:
  """Saves ``state`` and ``progress`` as checkpoint ``progress.epoch`` and waits until it is written.

  Every process calls it: orbax writes each array's shards from the
  processes that hold them.
  """
  checkpoints.save(
    progress.epoch,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({**progress._asdict(), "history": list(progress.history)}),
    ),
  )
  checkpoints.wait_until_finished()


def restore_latest(checkpoints: ocp.CheckpointManager, like: Any) -> tuple[Any, Progress] | None:
  """The latest checkpoint's ``(state, progress)``, or None when there is none.

  ``like`` is a state of the same structure (e.g. a freshly initialised
  one); the restored arrays take its shapes, dtypes and shardings.
  """
  step = checkpoints.latest_step()
  if step is None:
    return None
  restored = checkpoints.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)),
      meta=ocp.args.JsonRestore(),
    ),
  )
  meta = restored.meta
  return restored.state, Progress(meta["epoch"], meta["best_test_acc"], meta["wall_time_s"], tuple(meta["history"]))

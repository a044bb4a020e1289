"""Orbax checkpoints of a run: its state and its progress, verified on restore.

A checkpoint holds four items: ``state``, any pytree of arrays (the loop's
:class:`saner_jax.train.step.TrainState`, or whatever a pipeline trains:
two networks, corrected labels); ``meta``, the run's :class:`Progress` as
JSON; ``digest``, a SHA-256 of both; and ``config``, the run's resolved
config with its own SHA-256, the run's identity (:func:`stored_config`): a
resume compares against it, never against the editable ``config.yaml``.
Checkpoints of earlier releases have no ``config`` and still restore, as do
states saved before a field was added to one of today's NamedTuples that
is None in the run (0.2.0's SANER state had no ``mask``): their arrays are
matched to today's state by their tree paths. The progress carries the whole
metrics history, so a resumed run rewrites complete, unduplicated logs from
the checkpoint alone. Checkpoints are numbered by epoch; the latest two are
kept.

Orbax writes each checkpoint into a temporary folder and renames it once
complete, so a save cut short by a kill is never taken for a checkpoint
(the manager removes such folders when it starts). Orbax raises on files it
cannot parse, but array data with flipped bytes restores silently: the
digest catches that. :func:`restore_latest` restores the newest checkpoint
that reads and verifies, and moves newer, damaged ones aside, never
deleting them. A save the system refuses to write (a full disk, a quota, a
file-size limit) raises :class:`WriteError`, and leaves only the temporary
folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from saner_jax.train.run_dir import RunDir

UNUSABLE_DIR = "unusable_checkpoints"  # where damaged checkpoints are moved, next to checkpoints/


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored; the message names each and why."""


class WriteError(Exception):
  """The system refused a write under ``path`` (a full disk, a quota, a file-size limit, ...).

  Attributes:
    path: the directory written to.
    what: what was being written, e.g. "the checkpoint of epoch 3".
    problem: the system's words, e.g. "No space left on device".
    note: what became of the write, if anything needs saying.
  """

  def __init__(self, what: str, path: pathlib.Path, problem: str, note: str = ""):
    super().__init__(f"cannot write {what} to {path}: {problem}" + (f" ({note})" if note else ""))
    self.what, self.path, self.problem, self.note = what, path, problem, note


def _refusal(error: BaseException | None) -> str | None:
  """The system's words for the refused write behind ``error``, if one is: an OSError in its chain, or
  TensorStore's report of one (a ValueError whose message ends ``[os_error_code='28']``)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error.strerror or str(error)
    code = re.search(r"\[os_error_code='(\d+)'\]", str(error))
    if code:
      return os.strerror(int(code[1]))
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def refused_writes(what: str, path: pathlib.Path, note: str = "") -> Iterator[None]:
  """Turns the system's refusal of a write in the block into a :class:`WriteError`; other errors pass."""
  try:
    yield
  except Exception as e:
    problem = _refusal(e)
    if problem is None:
      raise
    raise WriteError(what, path, problem, note) from e


_ABANDONED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _NotRefusedWrites(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and str(record.msg).startswith(_ABANDONED):
      return False
    return not (record.exc_info and _refusal(record.exc_info[1]))


def quiet_refused_writes() -> None:
  """Drops, for the rest of the process, the noise of a save the system refused, for a program that
  reports the :class:`WriteError` itself in one line (the CLI).

  Orbax's writer threads each log the refused write with a traceback
  (through absl's logger, or asyncio's "Task exception was never retrieved"
  when a loaded machine delays them), and the writes they abandon complain
  that their event loop is closed (as unraisable exceptions) or, when the
  interpreter exits first, that their coroutines were never awaited (a
  RuntimeWarning), some of them after the error has been reported; all are
  dropped, while other log records, exceptions and warnings pass.

  Reading a damaged checkpoint leaves orbax's read tasks failed and
  abandoned too: asyncio logs each, once per damaged chunk, as "Task
  exception was never retrieved", and Python reports their coroutines as
  "Exception ignored in" (hundreds of lines, interleaved with the warning
  that says which checkpoint was moved aside). These are dropped as well:
  :func:`restore_latest` reports the checkpoint in one line.
  """
  hook = sys.unraisablehook

  def unraisable(u: Any) -> None:
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    code = getattr(u.object, "cr_code", None)  # an orbax read or write coroutine, abandoned with its error
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    hook(u)

  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_NotRefusedWrites())
  sys.unraisablehook = unraisable
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


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
  """The checkpoints of the run in ``out_dir`` (under ``checkpoints/``).

  Saves are synchronous (the loop waits for each anyway), so an interrupt
  during one leaves only orbax's temporary folder, which the next manager
  removes.
  """
  return ocp.CheckpointManager(
    RunDir(out_dir).checkpoints.absolute(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    ),
  )


def completed_epochs(out_dir: pathlib.Path) -> list[int]:
  """The epochs with a completed checkpoint in ``out_dir``, oldest first; a save cut short is not one."""
  directory = RunDir(out_dir).checkpoints
  return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def _host_array(leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:  # replicated over the hosts, as the loop keeps it: a local shard is all of it
      leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(leaf)


def digest(state: Any, meta: Mapping[str, Any]) -> str:
  """SHA-256 of every array of ``state`` (with its tree path, dtype and shape) and of ``meta`` as JSON.

  Any pytree works; JSON's lists and tuples hash alike, so ``meta`` before
  saving and after a JSON round trip agree.
  """
  h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = _host_array(leaf)
    h.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def _config_digest(config: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def save(
  checkpoints: ocp.CheckpointManager,
  state: Any,
  progress: Progress,
  iterator: Any = None,
  *,
  config: Mapping[str, Any] | None = None,
) -> None:
  """Saves ``state``, ``progress`` and their digest as checkpoint ``progress.epoch``, with ``config``
  (the run's resolved config as a JSON mapping, if given) and its digest.

  Every process calls it: orbax writes each array's shards from the
  processes that hold them. ``iterator``, a Grain ``DatasetIterator`` (the
  streaming input pipeline's), is saved too, as the item ``input``: each
  process writes its own iterator's position.

  Raises:
    WriteError: the system refused a write; the checkpoint is left as
      orbax's temporary folder, which is not a checkpoint.
  """
  meta = {**progress._asdict(), "history": list(progress.history)}
  what, directory = f"the checkpoint of epoch {progress.epoch}", pathlib.Path(checkpoints.directory)
  with refused_writes(what, directory, note="its partial save is never restored"):
    checkpoints.save(
      progress.epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta),
        digest=ocp.args.JsonSave({"sha256": digest(state, meta)}),
        **({"config": ocp.args.JsonSave({"config": dict(config), "sha256": _config_digest(config)})} if config else {}),
        **({} if iterator is None else {"input": _grain_args(iterator, save=True)}),
      ),
    )
    checkpoints.wait_until_finished()


def stored_config(out_dir: pathlib.Path) -> dict[str, Any] | None:
  """The resolved config saved in the newest checkpoint of ``out_dir`` that has a readable, verified one.

  None when no checkpoint has one (no checkpoints, or those of an earlier
  release, which saved no config). Reads only the small JSON item, not the
  arrays.

  Raises:
    OSError: ``checkpoints/`` cannot be listed (e.g. no permission).
  """
  for epoch in reversed(completed_epochs(out_dir)):
    item = RunDir(out_dir).checkpoints.absolute() / str(epoch) / "config"
    try:
      saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    except Exception:  # missing (an earlier release), unreadable or damaged: try the one before
      continue
    if (
      isinstance(saved, dict)
      and isinstance(saved.get("config"), dict)
      and saved.get("sha256") == _config_digest(saved["config"])
    ):
      return saved["config"]
  return None


def _grain_args(iterator: Any, save: bool) -> Any:
  import grain

  return grain.checkpoint.CheckpointSave(iterator) if save else grain.checkpoint.CheckpointRestore(iterator)


def _first_sentence(error: BaseException, limit: int = 160) -> str:
  """The gist of an orbax or TensorStore error for one line: its first line, less the TensorStore
  spec it goes on to print, cut at a word if still long."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0].rstrip(" .")
  return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


class _Unusable(Exception):
  """A checkpoint that cannot be read or fails its digest; the message says why."""


def _key_name(key: Any) -> str:
  """A tree-path entry as orbax names it on disk: a field or dict key by name, a sequence index by number."""
  for attribute in ("name", "key", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _by_path(saved: Any, like: Any) -> Any:
  """``saved`` (a state restored without a target, NamedTuples as dicts) in ``like``'s structure.

  Every array of ``like`` must be in ``saved`` under the same path, shape and
  dtype, and ``saved`` may hold no other array: only fields that are None
  today (and so hold no array) may be missing from an older checkpoint.
  """
  found = {tuple(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, target in paths:
    name = tuple(_key_name(k) for k in path)
    leaf = found.pop(name, None)
    if leaf is None or np.shape(leaf) != np.shape(target) or np.dtype(leaf.dtype) != np.dtype(target.dtype):
      raise _Unusable(f"its state has no array like {jax.tree_util.keystr(path)} of today's")
    sharding = getattr(target, "sharding", None)
    leaves.append(jax.device_put(leaf, sharding) if sharding is not None else jnp.asarray(leaf))
  if found:
    raise _Unusable(f"its state holds arrays today's has not: {', '.join('/'.join(k) for k in sorted(found)[:3])}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _restore_verified(
  checkpoints: ocp.CheckpointManager, epoch: int, like: Any, iterator: Any = None
) -> tuple[Any, Progress]:
  # Checkpoints written before digests were saved restore unverified.
  verified = (pathlib.Path(checkpoints.directory) / str(epoch) / "digest").is_dir()
  items = {
    "state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)),
    "meta": ocp.args.JsonRestore(),
  }
  if iterator is not None:
    if not (pathlib.Path(checkpoints.directory) / str(epoch) / "input").is_dir():
      raise _Unusable("it holds no input-pipeline position (saved by the on-device input path?)")
    items["input"] = _grain_args(iterator, save=False)
  extra = {"digest": ocp.args.JsonRestore()} if verified else {}
  try:
    restored = checkpoints.restore(epoch, args=ocp.args.Composite(**items, **extra))
    state = restored.state
  except ValueError as e:
    if "tree structures do not match" not in str(e):
      raise _Unusable(f"cannot be read: {type(e).__name__}: {_first_sentence(e)}") from e
    # An earlier release's layout: read the arrays as saved and place them by path.
    items["state"] = ocp.args.StandardRestore()
    try:
      restored = checkpoints.restore(epoch, args=ocp.args.Composite(**items, **extra))
    except Exception as e:  # as below
      raise _Unusable(f"cannot be read: {type(e).__name__}: {_first_sentence(e)}") from e
    state = _by_path(restored.state, like)
  except Exception as e:  # orbax reports damaged files as JSON, TensorStore or plain errors, among others
    raise _Unusable(f"cannot be read: {type(e).__name__}: {_first_sentence(e)}") from e
  meta = restored.meta
  recorded = restored.digest.get("sha256") if verified and isinstance(restored.digest, dict) else None
  if verified and recorded != digest(state, meta):
    raise _Unusable("its arrays or progress differ from those saved: digest mismatch")
  return state, Progress(meta["epoch"], meta["best_test_acc"], meta["wall_time_s"], tuple(meta["history"]))


def _move_aside(checkpoints: ocp.CheckpointManager, epoch: int) -> pathlib.Path:
  source = pathlib.Path(checkpoints.directory) / str(epoch)
  target = source.parent.parent / UNUSABLE_DIR / str(epoch)
  n = 1
  while target.exists():  # damaged twice at the same epoch
    n += 1
    target = target.with_name(f"{epoch}.{n}")
  target.parent.mkdir(exist_ok=True)
  source.rename(target)
  return target


def restore_latest(
  checkpoints: ocp.CheckpointManager, like: Any, *, warn: Callable[[str], None] = print, iterator: Any = None
) -> tuple[Any, Progress] | None:
  """The newest checkpoint that reads and verifies, as ``(state, progress)``; None when there is none.

  ``like`` is a state of the same structure (e.g. a freshly initialised
  one); the restored arrays take its shapes, dtypes and shardings. Newer
  checkpoints that fail are moved to ``unusable_checkpoints/`` (kept, and out
  of the way of the epochs trained again), each with a ``warn`` line. A Grain
  ``iterator`` is set in place to the position saved with the checkpoint.

  Raises:
    CheckpointError: there are checkpoints but none can be restored; all
      are left where they are.
  """
  failed: list[tuple[int, str]] = []
  for epoch in sorted(checkpoints.all_steps(), reverse=True):
    try:
      restored = _restore_verified(checkpoints, epoch, like, iterator)
    except _Unusable as e:
      failed.append((epoch, str(e)))
      continue
    if failed and jax.process_index() == 0:
      for bad, why in failed:
        try:
          moved = _move_aside(checkpoints, bad)
        except OSError as e:  # e.g. no write permission on it: moving a folder rewrites its ".."
          path = pathlib.Path(checkpoints.directory) / str(bad)
          raise CheckpointError(
            f"--resume: the checkpoint of epoch {bad} is unusable ({why}) and cannot be moved aside "
            f"({e.strerror or e}); make it writable (chmod -R u+rwX {path}) or move it out of "
            f"{checkpoints.directory}, then resume"
          ) from e
        warn(f"warning: the checkpoint of epoch {bad} is unusable ({why}); moved to {moved}")
    if failed:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("saner_jax: unusable checkpoints moved")
      checkpoints.reload()
    return restored
  if failed:
    raise CheckpointError(
      f"--resume: no checkpoint in {checkpoints.directory} can be restored: "
      + ", ".join(f"epoch {epoch} ({why})" for epoch, why in failed)
      + "; they are left as they are; start a new --out_dir"
    )
  return None

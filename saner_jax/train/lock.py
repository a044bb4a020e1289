"""One run per out_dir: an exclusive OS lock held for the whole run.

The lock is ``fcntl.flock`` on ``OUT_DIR/.lock``. The kernel drops it when
its process ends, however it ends (SIGKILL and power loss included), so a
lock file left behind never blocks a later run. The file holds the holder's
process id, host and start time, for the message a second process prints;
it is never deleted, since removing a lock file races with a process that is
opening it. On a multi-host run only process 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket
import time
from collections.abc import Iterator

from saner_jax.train.errors import ConfigError
from saner_jax.train.run_dir import RunDir


def unusable(out_dir: pathlib.Path, error: OSError) -> ConfigError:
  """The one-line error for an out_dir that cannot be created or written."""
  try:
    a_file = out_dir.exists() and not out_dir.is_dir()
  except OSError:  # the path itself is unusable (e.g. a name too long): the error says why
    a_file = False
  if a_file:
    problem = "it exists and is not a directory"
  elif isinstance(error, NotADirectoryError):
    problem = "a part of the path is a file, not a directory"
  else:
    where = f" ({error.filename})" if error.filename and pathlib.Path(error.filename) != out_dir else ""
    problem = f"{error.strerror or error}{where}"
  return ConfigError(f"--out_dir: cannot use {out_dir}: {problem}; choose another --out_dir")


@contextlib.contextmanager
def hold(out_dir: str | os.PathLike) -> Iterator[None]:
  """Creates ``out_dir`` if needed and holds its lock until the block ends.

  Raises:
    ConfigError: ``out_dir`` cannot be created or written (naming the path
      and the problem), or another process holds its lock (naming that
      process and its host).
  """
  out_dir = pathlib.Path(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(RunDir(out_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise unusable(out_dir, e) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      raise ConfigError(
        f"--out_dir: {out_dir} is in use by {holder}; wait for that run to end or choose another --out_dir"
      ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (started {started})\n".encode(), 0)
    except OSError as e:  # a full disk
      raise unusable(out_dir, e) from e
    yield
  finally:
    os.close(fd)  # releases the lock

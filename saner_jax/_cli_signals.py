"""Ctrl-C (SIGINT) and SIGTERM for the training CLI: never lost, never a crash.

Standard library only, so that the CLI installs it before JAX is imported
(``saner_jax/__init__.py`` does, when Python runs the CLI), and a signal in
the first second is handled like any other.

Python's own SIGINT handling has two faults for a program that drives XLA:

- the KeyboardInterrupt it raises can land inside a callback whose
  exceptions Python only prints ("Exception ignored in: <function
  _xla_gc_callback ...>"), and the run goes on as if nothing happened;
- after the error line, the interpreter tears itself down while an XLA
  thread may still be compiling, which can crash it (a segfault, exit 139).

So the handler records the signal before raising :class:`Interrupted` (a
KeyboardInterrupt) in the main thread; :func:`check`, called by the
training loop at every step and epoch, raises it again if a callback
swallowed it, and :func:`behind` finds it under the error of C code that
replaced it. Once the CLI has reported the interrupt
(:func:`acknowledge`), later signals are ignored, and the CLI ends with
:func:`exit_now`: it flushes its output and leaves with ``os._exit``,
skipping the teardown. That is safe there: checkpoint saves are
synchronous, so when the error line is printed every save has either
completed or left only orbax's temporary folder, which is never taken for a
checkpoint; the logs are rewritten from the checkpoint on resume.

SIGTERM is handled the same way, so that ``kill`` and batch schedulers get
the same one line and exit status 143 (128 + 15), SIGINT 130.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None
_acknowledged = False
_installed = False
_raising = False  # off while modules import: an exception there would be a traceback


class Interrupted(KeyboardInterrupt):
  """A SIGINT or SIGTERM; ``signum`` says which, ``exit_code`` is 128 + signum."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


def _handle(signum: int, frame: FrameType | None) -> None:
  del frame
  global _received
  if _acknowledged:  # the error line is out; the process is leaving
    return
  if _received is None:
    _received = signum
  if _raising:
    raise Interrupted(_received)


def install(*, raising: bool = True) -> None:
  """Handles SIGINT and SIGTERM as the module says, from now on (in the main thread only).

  With ``raising`` false a signal is only recorded, until a later
  ``install()`` raises it (and any later one) in the main thread.
  """
  global _installed, _raising
  if threading.current_thread() is not threading.main_thread():
    return
  if not _installed:
    # Python prints an exception raised inside a callback as "Exception ignored in ...", traceback
    # and all; the interrupt is not lost (check() raises it again), so that print is dropped.
    previous = sys.unraisablehook

    def unraisable(u: sys.UnraisableHookArgs) -> None:
      if not isinstance(u.exc_value, Interrupted):
        previous(u)

    sys.unraisablehook = unraisable
    for signum in HANDLED:
      # A job a shell starts in the background has SIGINT ignored: keep it ignored.
      if signal.getsignal(signum) is not signal.SIG_IGN:
        signal.signal(signum, _handle)
    _installed = True
  _raising = _raising or raising
  if _raising:
    check()


def received() -> int | None:
  """The first signal received, or None."""
  return _received


def check() -> None:
  """Raises :class:`Interrupted` if a signal was received and not yet reported (a no-op otherwise)."""
  if _received is not None and not _acknowledged:
    raise Interrupted(_received)


def behind(error: BaseException, *, stop_at: tuple[type[BaseException], ...] = ()) -> KeyboardInterrupt | None:
  """The interrupt that ``error`` stands for, or None.

  The handler raises wherever the main thread is, and that can be inside C
  code calling back into Python (numpy's ``np.dtype`` on a JAX scalar type,
  for one), which replaces the exception with its own: a ``SystemError``
  "returned a result with an exception set" whose cause is the interrupt.
  This follows ``error``'s chain (its cause, else its context unless
  suppressed) to a KeyboardInterrupt (:class:`Interrupted` under the CLI),
  stopping at an exception of a ``stop_at`` type: what was raised after
  one (an error in clean-up after the interrupt was reported) is not the
  interrupt. Where the chain holds none, a signal the CLI received and has
  not reported counts: C code may drop the exception it replaced.
  """
  seen: set[int] = set()
  current: BaseException | None = error
  while current is not None and id(current) not in seen and not isinstance(current, stop_at):
    if isinstance(current, KeyboardInterrupt):
      return current
    seen.add(id(current))
    current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
  if _received is not None and not _acknowledged:
    return Interrupted(_received)
  return None


def acknowledge() -> None:
  """The interrupt is being reported: later signals are ignored."""
  global _acknowledged
  _acknowledged = True


def exit_now(code: int) -> None:
  """Flushes stdout and stderr, then ends the process with ``code`` without the interpreter's teardown."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError):
      stream.flush()
  os._exit(code)


def running_the_cli(argv: list[str]) -> bool:
  """Whether ``argv`` (``sys.orig_argv``) runs the training CLI: ``python [...] -m saner_jax.train`` or ``saner-train``."""
  if any(os.path.basename(a) == "saner-train" for a in argv[:2]):
    return True
  return any(a == "-m" and b in ("saner_jax.train", "saner_jax.train.cli") for a, b in itertools.pairwise(argv))

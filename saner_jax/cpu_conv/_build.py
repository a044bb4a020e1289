"""Compiles, caches and registers saner_jax's native CPU kernels (``onednn_conv.cc``).

The kernels are XLA FFI handlers around oneDNN's convolutions. They are built
on first use with the system's C++ compiler against jaxlib's FFI headers and
the system's oneDNN 2.x (Debian: ``apt-get install g++ libdnnl-dev``), once
per source, jaxlib and oneDNN version: the shared library is cached under
``$SANER_JAX_CACHE_DIR`` (default ``~/.cache/saner_jax``), and building it
takes a few seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib.version

__all__ = ["NativeBuildError", "cache_dir", "load_onednn_conv"]

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# FFI target name -> the handler symbol the source exports.
ONEDNN_CONV_TARGETS = {
  "saner_onednn_conv_forward": "SanerOnednnConvForward",
  "saner_onednn_conv_backward_data": "SanerOnednnConvBackwardData",
  "saner_onednn_conv_backward_weights": "SanerOnednnConvBackwardWeights",
}
_INSTALL_HINT = "on Debian or Ubuntu: apt-get install g++ libdnnl-dev"


class NativeBuildError(RuntimeError):
  """The native kernels could not be built or loaded on this machine."""


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept: ``$SANER_JAX_CACHE_DIR`` or ``~/.cache/saner_jax``."""
  override = os.environ.get("SANER_JAX_CACHE_DIR")
  if override:
    return pathlib.Path(override)
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "saner_jax"


def _compile_command(output: pathlib.Path) -> list[str]:
  compiler = shlex.split(os.environ.get("CXX", "g++"))
  # -isystem: jaxlib's headers are not ours to warn about.
  return [
    *compiler,
    "-O2",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-isystem",
    jax.ffi.include_dir(),
    str(SOURCE),
    "-o",
    str(output),
    "-ldnnl",
  ]


def _build(library: pathlib.Path) -> None:
  compiler = _compile_command(library)[0]
  if shutil.which(compiler) is None:
    raise NativeBuildError(f"saner_jax.cpu_conv needs a C++ compiler: {compiler!r} was not found ({_INSTALL_HINT})")
  library.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent builders (pytest
  # workers, several hosts on one file system) never load a partial file.
  fd, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".partial")
  os.close(fd)
  try:
    command = _compile_command(pathlib.Path(partial))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      missing_onednn = "dnnl.hpp" in result.stderr or "-ldnnl" in result.stderr
      hint = (
        f"oneDNN 2.x headers and library were not found ({_INSTALL_HINT})" if missing_onednn else "the compiler failed"
      )
      raise NativeBuildError(
        f"saner_jax.cpu_conv could not build its oneDNN kernels: {hint}.\n"
        f"command: {shlex.join(command)}\n{result.stderr.strip()[-2000:]}"
      )
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _onednn_version() -> str:
  """The installed oneDNN's version, so that an upgrade rebuilds the kernels; "" when none is found."""
  name = ctypes.util.find_library("dnnl")
  if name is None:
    return ""
  try:
    version = ctypes.CDLL(name).dnnl_version
  except (OSError, AttributeError):
    return ""
  version.restype = ctypes.POINTER(ctypes.c_int * 3)  # dnnl_version_t opens with major, minor, patch
  return ".".join(map(str, version().contents))


@functools.cache
def load_onednn_conv() -> pathlib.Path:
  """Builds (if not cached) and loads the oneDNN convolution kernels, and registers them with XLA:CPU.

  Returns the path of the shared library. Raises :class:`NativeBuildError`,
  naming what is missing, when the compiler or oneDNN is not installed.
  """
  digest = hashlib.sha256(SOURCE.read_bytes())
  digest.update(f"{jaxlib.version.__version__} oneDNN {_onednn_version()}".encode())
  digest.update(shlex.join(_compile_command(pathlib.Path("out"))).encode())
  library = cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"
  if not library.exists():
    _build(library)
  try:
    handle = ctypes.cdll.LoadLibrary(str(library))
  except OSError as e:
    raise NativeBuildError(f"saner_jax.cpu_conv could not load {library}: {e} ({_INSTALL_HINT})") from e
  for target, symbol in ONEDNN_CONV_TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
  return library

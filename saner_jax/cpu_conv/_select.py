"""Which convolution a run should use: oneDNN's where it applies and builds, XLA's otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from saner_jax.cpu_conv import MODES, _build, ops

__all__ = ["ConvChoice", "choose"]


class ConvChoice(NamedTuple):
  """``conv``: the ``conv_general_dilated`` to give the model (None: XLA's); ``reason``: one line saying why."""

  conv: Callable[..., jax.Array] | None
  reason: str

  @property
  def path(self) -> str:
    return "onednn" if self.conv is not None else "xla"


def choose(mode: str | bool | None = "auto", *, dtype: Any = jnp.float32, devices: int = 1) -> ConvChoice:
  """Picks the convolution for a run on ``devices`` devices computing in ``dtype``.

  ``mode`` "auto" (or None) takes oneDNN's convolutions on a single CPU device
  in float32 when the kernels build, and XLA's otherwise, saying why. "false"
  (or False) always takes XLA's. "true" (or True) insists: it raises
  ValueError on several devices (XLA cannot partition a custom call) and
  :class:`NativeBuildError` when the kernels do not build; on other
  backends and dtypes it takes XLA's, whose result it would be anyway.
  """
  names: dict[object, str] = {True: "true", False: "false", None: "auto"}
  mode = names.get(mode, mode)
  if mode not in MODES:
    raise ValueError(f"cpu_conv mode must be one of {MODES}, got {mode!r}")
  backend = jax.default_backend()
  if mode == "false":
    return ConvChoice(None, "XLA's (oneDNN's switched off)")
  if devices > 1:
    if mode == "true":
      raise ValueError(
        f"its oneDNN convolutions are custom calls, which XLA cannot split over the {devices} devices "
        "(it would gather every batch onto each); use it on one CPU device"
      )
    return ConvChoice(None, f"XLA's ({devices} devices: XLA cannot partition oneDNN's custom calls)")
  if backend != "cpu":
    return ConvChoice(None, f"XLA's (the {backend} backend)")
  if jnp.dtype(dtype) != jnp.float32:
    return ConvChoice(None, f"XLA's ({jnp.dtype(dtype).name} compute: the oneDNN kernels are float32 only)")
  try:
    _build.load_onednn_conv()
  except _build.NativeBuildError as e:
    if mode == "true":
      raise
    return ConvChoice(None, f"XLA's (oneDNN kernels unavailable: {str(e).splitlines()[0]})")
  return ConvChoice(ops.conv_general_dilated, "oneDNN's (saner_jax.cpu_conv)")

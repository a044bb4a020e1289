"""The oneDNN convolution and its gradients as a JAX op; see :mod:`saner_jax.cpu_conv`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from saner_jax.cpu_conv import _build

__all__ = ["conv_general_dilated", "is_supported"]

# The only layout the fast path takes, as lax resolves it (flax's nn.Conv
# always asks for this one): NHWC images, HWIO kernels, NHWC outputs.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID")


def _pairs(padding: Any) -> tuple[tuple[int, int], ...] | None:
  """Explicit padding as a tuple of (low, high) int pairs, or None if it is not that."""
  try:
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    return None


def _ones_or_none(dilation: Sequence[int] | None) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def is_supported(
  lhs_shape: Sequence[int],
  rhs_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  preferred_element_type: Any = None,
  lhs_dtype: Any = jnp.float32,
  rhs_dtype: Any = jnp.float32,
) -> bool:
  """Whether :func:`conv_general_dilated` takes its CPU path for these arguments.

  The path covers what ResNets use: 2-D convolutions with NHWC images and
  HWIO kernels (given as strings or as ``lax.ConvDimensionNumbers``), any
  kernel size and stride, 'SAME', 'SAME_LOWER', 'VALID' or non-negative
  explicit padding, no dilation, no feature or batch groups, no
  ``preferred_element_type``, both operands float32, and no empty array.
  Everything else goes to ``lax.conv_general_dilated`` as is.
  """
  if len(lhs_shape) != 4 or len(rhs_shape) != 4:
    return False
  try:
    numbers = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
  except (TypeError, ValueError):
    return False
  if numbers != _NHWC:
    return False
  if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
    return False
  if not (_ones_or_none(lhs_dilation) and _ones_or_none(rhs_dilation)):
    return False
  if len(window_strides) != 2 or any(s < 1 for s in window_strides):
    return False
  if jnp.dtype(lhs_dtype) != jnp.float32 or jnp.dtype(rhs_dtype) != jnp.float32:
    return False
  if isinstance(padding, str):
    if padding.upper() not in _PADDING_NAMES:
      return False
  else:
    pairs = _pairs(padding)
    if pairs is None or len(pairs) != 2 or any(p < 0 for pair in pairs for p in pair):
      return False
  if lhs_shape[3] != rhs_shape[2] or 0 in tuple(lhs_shape) or 0 in tuple(rhs_shape):
    return False
  pads = _explicit_padding(tuple(lhs_shape[1:3]), tuple(rhs_shape[:2]), tuple(window_strides), padding)
  return all(size + lo + hi >= k for size, k, (lo, hi) in zip(lhs_shape[1:3], rhs_shape[:2], pads))


def _explicit_padding(spatial, kernel, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(spatial, kernel, strides, padding.upper()))
  pairs = _pairs(padding)
  assert pairs is not None, "is_supported has checked the padding"
  return pairs


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """``jax.lax.conv_general_dilated``, computed by oneDNN on the CPU.

  Same signature as :func:`jax.lax.conv_general_dilated`, and the same
  values and gradients up to float32 rounding. Arguments that
  :func:`is_supported` accepts take oneDNN's convolutions when lowered for
  the CPU (``precision`` is moot there: oneDNN computes in float32) and the
  stock op when lowered for anything else; all other arguments always take
  the stock op. See the module docstring for the limits.
  """
  stock = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if not is_supported(
    jnp.shape(lhs),
    jnp.shape(rhs),
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    preferred_element_type,
    jnp.result_type(lhs),
    jnp.result_type(rhs),
  ):
    return stock(lhs, rhs)
  try:
    _build.load_onednn_conv()
  except _build.NativeBuildError:
    if jax.default_backend() == "cpu":
      raise
    return stock(lhs, rhs)  # a GPU or TPU process, which would not lower the CPU path anyway
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(tuple(jnp.shape(lhs)[1:3]), tuple(jnp.shape(rhs)[:2]), strides, padding)
  onednn = functools.partial(_onednn_conv, strides=strides, pads=pads)
  return lax.platform_dependent(lhs, rhs, cpu=onednn, default=stock)


def _call(target: str, out_shape: Sequence[int], *operands, strides, pads) -> jax.Array:
  """One oneDNN FFI call. ``vmap`` runs it once per batch element."""
  (stride_h, stride_w), ((top, bottom), (left, right)) = strides, pads
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32), vmap_method="sequential")
  geometry = dict(stride_h=stride_h, stride_w=stride_w, pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right)
  return call(*operands, **{k: np.int64(v) for k, v in geometry.items()})


def _output_shape(x_shape, w_shape, strides, pads) -> tuple[int, ...]:
  spatial = ((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(x_shape[1:3], w_shape[:2], strides, pads))
  return (x_shape[0], *spatial, w_shape[3])


def _forward(x, w, strides, pads):
  return _call(
    "saner_onednn_conv_forward", _output_shape(x.shape, w.shape, strides, pads), x, w, strides=strides, pads=pads
  )


_onednn_conv = jax.custom_vjp(_forward, nondiff_argnums=(2, 3))


def _onednn_conv_fwd(x, w, strides, pads):
  return _forward(x, w, strides, pads), (x, w)


def _onednn_conv_bwd(strides, pads, residuals, dy):
  x, w = residuals
  dx = _call("saner_onednn_conv_backward_data", x.shape, dy, w, strides=strides, pads=pads)
  dw = _call("saner_onednn_conv_backward_weights", w.shape, x, dy, strides=strides, pads=pads)
  return dx, dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)

r"""A drop-in ``lax.conv_general_dilated`` whose gradient XLA:CPU computes faster.

Pass it to a model (``create_model(..., conv_general_dilated=
saner_jax.cpu_conv.conv_general_dilated)``, or ``flax.linen.Conv(...,
conv_general_dilated=...)``): values and gradients are XLA's own, only the
time changes, and only when the computation is lowered for the CPU. A
function jitted for GPU or TPU lowers to the stock convolution and its stock
gradient: :func:`jax.lax.platform_dependent` makes the choice when lowering.

The maths. A convolution with stride s over the zero-padded input x_p,

.. math::
   y[n, h, w, o] = \sum_{i, j, c} x_p[n, s h + i, s w + j, c]\, W[i, j, c, o],

has two gradients. The input gradient is again a convolution over NHWC data
(of the output gradient, dilated by s, with the flipped, transposed kernel),
and XLA runs it about as fast as the forward pass. The kernel gradient

.. math::
   \partial W[i, j, c, o] = \sum_{n, h, w} x_p[n, s h + i, s w + j, c]\,
   \partial y[n, h, w, o]

contracts over batch and space. XLA computes it as a convolution with the
roles swapped: :math:`x^T` (C, H, W, N) is the image, with batch C and
features N, and :math:`\partial y^T` (Ho, Wo, N, O) the kernel, its window
dilated by s; the output is (C, kh, kw, O).

Where the time went (jaxlib 0.10.2, two cores; ``benchmarks/jax_vs_torch.py``
measures all of this). Not in that convolution's kernel, which runs near
100 GFLOP/s alone (6 ms for ResNet-20's 0.6 GFLOP layers), but in its two
transposes. XLA fuses each transpose into the elementwise code that produced
its operand (BatchNorm, ReLU, residual additions), and a fused producer is
recomputed, not read: every transpose re-evaluated the BatchNorm-ReLU-add
chain back through the previous blocks, in transposed, strided order, 10 to
50 times slower than transposing the array in memory. In a stock ResNet-20
SANER step these transposes were 40% of XLA's op time, nearly as much as
all the convolutions together.

The fix keeps XLA's convolutions and moves the whole kernel gradient (both
transposes and the swapped-role convolution) into the branch of a
``lax.cond``. XLA fuses nothing across a conditional, so the branch reads
x and dy from memory, where they are anyway as convolution operands.
``lax.optimization_barrier`` would not do: XLA:CPU removes it before fusion.

Measured and set aside:

- im2col, ``dW = patches^T @ dy`` as one matmul (and the forward pass as
  ``patches @ W``): XLA's matmul is fast, but XLA builds the patch matrix
  (concatenated shifted slices) so slowly that the whole took 5 to 10 times
  the convolution's time at 16 channels and tied at 64. Nine per-tap
  matmuls on shifted slices: no better.
- The barrier alone, copying x and dy inside the cond and transposing
  after it: one more pass over memory per operand. Transposing inside the
  branch but returning the 4-D result: XLA's layout assignment turns the
  branch into that copy again; returning it flattened: XLA's loop emitter
  transposes into a 1-D array ten times slower.
- XLA's other convolution kernels (Eigen instead of YNNPACK, by flag or by
  shape): slower in the step.

The result, on an idle two-core machine (``benchmarks/results/
jax_vs_torch.txt``): a ResNet-20 SANER step (batch 128) takes 0.86 times as
long as with the stock convolution (0.70 to 0.75 when other processes load
the cores and the stock step's transposes can no longer run beside its other
work); compiling the step takes about 5% longer. What remains between it and
PyTorch, whose step is 1.8 times faster, is XLA's convolution kernels
themselves: one forward-backward pass over ResNet-20's 19 convolutions takes
XLA about 57 ms forward, 59 ms input gradient and 112 ms kernel gradient,
where PyTorch's oneDNN takes 32, 33 and 31 ms.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

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
  ``preferred_element_type``, both operands of one floating dtype, and no
  empty array. Everything else goes to ``lax.conv_general_dilated`` as is.
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
  if jnp.dtype(lhs_dtype) != jnp.dtype(rhs_dtype) or not jnp.issubdtype(lhs_dtype, jnp.floating):
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
  return _pairs(padding)


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
  """``jax.lax.conv_general_dilated`` with a faster gradient on the CPU.

  Same signature, values and gradients as :func:`jax.lax.conv_general_dilated`
  (bit for bit in float32 in the tests and on ResNet-20: XLA runs the same
  convolutions). Arguments that :func:`is_supported` accepts take the CPU
  path when lowered for the CPU and the stock op when lowered for anything
  else; all other arguments always take the stock op.

  The CPU path is a ``jax.custom_vjp``: the forward pass and the input
  gradient are XLA's (the latter via ``jax.linear_transpose`` of the forward
  convolution); the kernel gradient is the swapped-role convolution of the
  module docstring, computed with its two transposes inside a conditional's
  branch, which XLA does not fuse into.

  Not forward-mode differentiable on the CPU path (``jax.jvp``,
  ``jax.jacfwd``), as for any ``custom_vjp``; reverse mode, ``jit``,
  ``vmap`` and ``jax.checkpoint`` work.
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
      jnp.shape(lhs), jnp.shape(rhs), window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, preferred_element_type,
      jnp.result_type(lhs), jnp.result_type(rhs),
  ):
    return stock(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(tuple(jnp.shape(lhs)[1:3]), tuple(jnp.shape(rhs)[:2]), strides, padding)
  fast = functools.partial(_cpu_conv, strides=strides, pads=pads, precision=precision)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=stock)


def _conv(x, w, strides, pads, precision):
  """The forward convolution, NHWC x HWIO -> NHWC."""
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision)


def _cpu_conv_fwd(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision), (x, w)


def _cpu_conv_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals
  (dx,) = jax.linear_transpose(lambda x: _conv(x, w, strides, pads, precision), x)(dy)
  return dx, _kernel_grad(x, dy, w.shape[:2], strides, pads, precision)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _kernel_grad(x, dy, kernel, strides, pads, precision):
  r"""dW[i, j, c, o] = sum_{n, h, w} x_p[n, s h + i, s w + j, c] dy[n, h, w, o].

  Written as the convolution of ``xt = x^T`` (C, H, W, N: batch C, features
  N) with ``dyt = dy^T`` (Ho, Wo, N, O: a kernel whose window is dilated by
  the stride s), with stride 1 and the forward padding, giving (C, kh, kw,
  O). Its output length along a spatial axis is H + lo + hi - s (Ho - 1),
  which exceeds the kernel's k by e = (H + lo + hi - k) mod s when the last
  rows of the padded input are not reached by any window; the high padding
  loses those e rows (it may go negative, which XLA accepts) so that the
  output is exactly (C, kh, kw, O) and no work is wasted.
  """
  trimmed = tuple(
      (lo, hi - (size + lo + hi - k) % s)
      for size, k, s, (lo, hi) in zip(x.shape[1:3], kernel, strides, pads)
  )

  def swapped_roles(x, dy):
    dwt = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), trimmed,
        rhs_dilation=strides, dimension_numbers=_NHWC, precision=precision,
    )
    return dwt.transpose(1, 2, 0, 3)

  return _behind_barrier(swapped_roles, x, dy)


def _behind_barrier(fn, *operands):
  """``fn(*operands)``, reading the operands from memory rather than recomputing them.

  ``fn`` runs in the taken branch of a ``lax.cond``: XLA fuses nothing
  across a conditional, so each operand is materialised once (they are
  anyway, as convolution operands) and ``fn``'s transposes read them there.
  The predicate reads one element's bits ``b`` and tests ``b | 1 != 0``:
  true for every value, NaN and infinities included, yet not something XLA
  folds away. The other branch (zeros) never runs; under ``vmap`` the cond
  becomes a select of the two branches, which is still ``fn(*operands)``,
  merely without the barrier.
  """
  first = operands[0].reshape(-1)[0]
  bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{jnp.dtype(first.dtype).itemsize * 8}"))
  out = jax.eval_shape(fn, *operands)
  return lax.cond((bits | 1) != 0, fn, lambda *_: jnp.zeros(out.shape, out.dtype), *operands)

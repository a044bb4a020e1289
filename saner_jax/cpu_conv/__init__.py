r"""A drop-in ``lax.conv_general_dilated`` that runs on oneDNN when lowered for the CPU.

Pass it to a model (``create_model(..., conv_general_dilated=
saner_jax.cpu_conv.conv_general_dilated)``, or ``flax.linen.Conv(...,
conv_general_dilated=...)``). When the computation is lowered for the CPU,
the convolution and both its gradients are oneDNN's (the library behind
PyTorch's CPU convolutions), called by XLA through its FFI; a function
jitted for GPU or TPU lowers to the stock convolution and its stock
gradient: :func:`jax.lax.platform_dependent` makes the choice when lowering.

The maths. A convolution with stride s over the zero-padded input x_p,

.. math::
   y[n, h, w, o] = \sum_{i, j, c} x_p[n, s h + i, s w + j, c]\, W[i, j, c, o],

has the input gradient (a convolution of the stride-dilated output gradient
with the flipped, transposed kernel)

.. math::
   \partial x_p[n, a, b, c] = \sum_{h, w, i, j, o}
   [s h + i = a]\,[s w + j = b]\; \partial y[n, h, w, o]\, W[i, j, c, o]

and the kernel gradient, a contraction over batch and space,

.. math::
   \partial W[i, j, c, o] = \sum_{n, h, w} x_p[n, s h + i, s w + j, c]\,
   \partial y[n, h, w, o].

Why. On jaxlib 0.10.2 XLA:CPU runs the kernel gradient as a convolution
with batch and features swapped (for ResNet-20's first stage, a 32x32
window) at about 100 GFLOP/s, after a transpose of each operand that XLA
fuses with, and so recomputes, the BatchNorm-ReLU chain that produced it.
oneDNN's direct convolutions, with the kernel in the blocked layout they
choose, run all three passes near the machine's peak. Measured on two
cores (``python benchmarks/jax_vs_torch.py --profile --layers
--torch-threads 2 1`` at git c0aa7f4, whose ``benchmarks/results/jax_vs_torch.txt``
has the per-layer table; the file now holds a later run): one
forward-backward pass over ResNet-20's 19 convolutions (batch 128) takes
XLA 54, 56 and 104 ms (forward, input gradient, kernel gradient), this
module 29, 25 and 23 ms, PyTorch 31, 32 and 29 ms; a whole SANER step
takes 604 ms with XLA's convolutions, 294 ms with these, and 307 ms in
PyTorch on both cores (0.96x PyTorch's time; 0.81x in an earlier run, as
PyTorch's time varies more between runs on this shared machine). Compile
time is unchanged (2.6 s), plus a few seconds the first time the kernels
are built.

How. Images stay in XLA's NHWC buffers, which oneDNN reads and writes in
place; kernels are reordered between HWIO and oneDNN's layout inside the
call (they are small). The kernels are built on first use with the system's
C++ compiler against jaxlib's FFI headers and Debian's oneDNN 2.x
(``apt-get install g++ libdnnl-dev``) and cached: see
:mod:`saner_jax.cpu_conv._build`. Tracing the CPU path builds them; where they
cannot be built, it raises :class:`saner_jax.cpu_conv.NativeBuildError`
naming what is missing, unless JAX's default backend is a GPU or TPU, in
which case the stock op is traced.

Measured and set aside: XLA's own options. Eigen's convolutions instead of
YNNPACK's (``--xla_cpu_experimental_ynn_fusion_type=
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``) cut the step by 11 to 19%;
this jaxlib's oneDNN and XNNPACK flags leave convolutions alone; im2col and
per-tap matmuls build their patch matrices too slowly; a conditional as
fusion barrier around the kernel gradient's transposes gained 14%.

Limits:

- float32 only, 2-D, NHWC/HWIO, no dilation or groups (see
  :func:`is_supported`); anything else is ``lax.conv_general_dilated``.
- Results equal XLA's to float32 rounding, not bit for bit: the sums are
  taken in another order. In a SANER step such last-bit differences can
  flip a coordinate across the discontinuous group mask, so a run with
  ``cpu_conv`` is not bit-identical to one without it.
- Reverse mode, ``jit`` and ``vmap`` work; ``vmap`` runs the calls one
  batch element after another (the m-sharpness path), each still on
  oneDNN. Folding the mapped axis into the image batch would serve only
  the clean pass's forward and input gradient: the kernel gradient must
  stay per sub-batch, and the perturbed pass has a kernel per sub-batch
  (w + eps_i), which would take grouped convolutions; so it is not done.
  Forward mode (``jax.jvp``) does not work, as for any ``jax.custom_vjp``.
- XLA cannot partition a custom call: under automatic sharding it would
  gather the operands onto every device. Use it on one CPU device:
  :func:`choose` takes XLA's convolutions on several devices, and
  refuses ``"true"`` there.

Choosing. :func:`choose` is the trainer's rule (``--cpu_conv auto``, the
default): these convolutions on one CPU device in float32 where the
kernels build, XLA's otherwise, with a one-line reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saner_jax import _lazy

# --cpu_conv's values: "auto" chooses (see choose), "true" insists, "false" declines.
# Defined here, without JAX, so that the CLI lists them without importing it.
MODES = ("auto", "true", "false")

# The rest loads on first use (PEP 562): building the kernels needs JAX.
_NAMES = {
  "NativeBuildError": "_build",
  "cache_dir": "_build",
  "load_onednn_conv": "_build",
  "ConvChoice": "_select",
  "choose": "_select",
  "conv_general_dilated": "ops",
  "is_supported": "ops",
}

if TYPE_CHECKING:
  # What type checkers and editors see; at run time __getattr__ loads these.
  from saner_jax.cpu_conv._build import NativeBuildError, cache_dir, load_onednn_conv
  from saner_jax.cpu_conv._select import ConvChoice, choose
  from saner_jax.cpu_conv.ops import conv_general_dilated, is_supported

__all__ = [
  "MODES",
  "ConvChoice",
  "NativeBuildError",
  "cache_dir",
  "choose",
  "conv_general_dilated",
  "is_supported",
  "load_onednn_conv",
]


__getattr__, __dir__ = _lazy.attach(__name__, names=_NAMES)

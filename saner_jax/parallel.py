r"""Data-parallel sharpness-aware gradients over a device mesh.

``saner_jax.sharpness_aware_grad(loss_fn, perturbation, mesh=mesh,
mode=mode)`` runs the two passes on a mesh; this module holds
:func:`data_mesh` and the modes' maths. The batch is split over the
``"data"`` axis of a :class:`jax.sharding.Mesh` and the parameters are
replicated; JAX's runtime does the rest (XLA's SPMD
partitioner for the synced mode, :func:`jax.shard_map` and collectives for
the per-device one). The same code runs on one device, on N devices of one
host, and on several hosts after :func:`jax.distributed.initialize`.

With :math:`n` devices, shard :math:`B_d` of the global batch
:math:`B = B_1 \cup \dots \cup B_n` on device :math:`d`, and equal shards:

``"synced"`` (the default)
  one perturbation from the global-batch gradient, exactly the single-device
  algorithm on the global batch:

  .. math::
     g = \nabla L_B(w) = \tfrac1n \textstyle\sum_d \nabla L_{B_d}(w), \quad
     \epsilon = \mathrm{perturbation}(g), \quad
     g^{SAM} = \nabla L_B(w + \epsilon).

  The batch is constrained to ``P("data")`` inside the jitted step and XLA
  inserts the all-reduces. BatchNorm normalises over the global batch (its
  per-channel moments are all-reduced too), as on one device.

``"per_device"``
  each device perturbs with its own shard's gradient, Foret et al.'s
  m-sharpness with :math:`m = n` (times ``m_sharpness`` within a device):

  .. math::
     g_d = \nabla L_{B_d}(w), \quad
     \epsilon_d = \mathrm{perturbation}(g_d), \quad
     g = \tfrac1n \textstyle\sum_d g_d, \quad
     g^{SAM} = \tfrac1n \textstyle\sum_d \nabla L_{B_d}(w + \epsilon_d).

  Each device runs the two passes on its shard inside
  :func:`jax.shard_map`; the gradients, the loss and the perturbation state's
  float leaves are then ``pmean``-ed. That is the single-device
  ``sharpness_aware_grad(..., m_sharpness=n)`` on the global batch, with the
  sub-batches spread over devices: same gradients, same loss, same new
  perturbation state (the mean of the per-shard new states, as the helper's
  vmapped path takes it), same merged auxiliary output. BatchNorm therefore
  normalises each shard with its own statistics (ghost BatchNorm over
  :math:`|B|/n` examples), and the running averages come back averaged over
  the shards (``aux_reducers``' default). Communication is the same as in the synced mode: two
  gradient-sized all-reduces per step, since SANER's mask and the
  perturbation state need the mean clean gradient.

Synced is the default because its result does not depend on the number of
devices: a run on eight accelerators reproduces the authors' single-GPU
algorithm at the same global batch (up to float summation order), and a
checkpoint resumes unchanged on another device count. Per-device is there for
m-sharpness, which Foret et al. and Andriushchenko and Flammarion (2022)
found to generalise better for small per-device batches; its result changes
with the device count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from saner_jax._modes import PERTURBATION_MODES
from saner_jax.two_pass import SharpnessAwareGrads, _AuxLayout, sharpness_aware_grad

__all__ = ["PERTURBATION_MODES", "data_mesh", "sharded_aux_layout", "sharded_sharpness_aware_grad"]


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "data") -> Mesh:
  """A one-axis mesh over ``devices``, by default every device of every process.

  Examples:
    >>> import jax
    >>> import saner_jax
    >>> mesh = saner_jax.data_mesh()
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('data',), True)
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (axis_name,))


def _deprecated(old: str, new: str) -> None:
  warnings.warn(f"{old} is deprecated (saner_jax 0.3.0) and goes in 0.4.0: use {new}", DeprecationWarning, stacklevel=3)


def sharded_aux_layout(mode: str = "synced", m_sharpness: int = 1, accumulation_steps: int = 1) -> _AuxLayout:
  """Deprecated: the stacked aux layout of :func:`sharded_sharpness_aware_grad`; goes in saner_jax 0.4.0.

  :func:`saner_jax.sharpness_aware_grad` with ``mesh=`` merges the aux
  itself (``aux_reducers``).
  """
  _deprecated("saner_jax.parallel.sharded_aux_layout", "sharpness_aware_grad(..., mesh=mesh, aux_reducers=...)")
  if mode not in PERTURBATION_MODES:
    raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
  return _AuxLayout(sub_batches=mode == "per_device" or m_sharpness > 1, micro_batches=accumulation_steps > 1)


def sharded_sharpness_aware_grad(
  loss_fn: Callable[..., Any],
  perturbation: optax.GradientTransformation,
  mesh: Mesh,
  *,
  mode: str = "synced",
  axis_name: str = "data",
  has_aux: bool = False,
  m_sharpness: int = 1,
  accumulation_steps: int = 1,
  batch_argnum: int = 1,
) -> Callable[..., SharpnessAwareGrads]:
  """Deprecated: ``sharpness_aware_grad(..., mesh=mesh, mode=mode, aux_reducers="stack")``; goes in saner_jax 0.4.0.

  Returns what it returned in 0.2.0, the aux stacked over the pieces as
  :func:`sharded_aux_layout` describes. Prefer
  :func:`saner_jax.sharpness_aware_grad` with ``mesh=``, which merges it.
  """
  _deprecated("saner_jax.sharded_sharpness_aware_grad", "saner_jax.sharpness_aware_grad(..., mesh=mesh, mode=mode)")
  return sharpness_aware_grad(
    loss_fn,
    perturbation,
    has_aux=has_aux,
    m_sharpness=m_sharpness,
    accumulation_steps=accumulation_steps,
    batch_argnum=batch_argnum,
    mesh=mesh,
    mode=mode,
    axis_name=axis_name,
    aux_reducers="stack" if has_aux else None,
  )

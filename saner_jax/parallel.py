r"""Data-parallel sharpness-aware gradients over a device mesh.

The batch is split over the ``"data"`` axis of a :class:`jax.sharding.Mesh`
and the parameters are replicated; JAX's runtime does the rest (XLA's SPMD
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

  Each device runs :func:`saner_jax.sharpness_aware_grad` on its shard inside
  :func:`jax.shard_map`; the gradients, the loss and the perturbation state's
  float leaves are then ``pmean``-ed. That is the single-device
  ``sharpness_aware_grad(..., m_sharpness=n)`` on the global batch, with the
  sub-batches spread over devices: same gradients, same loss, same new
  perturbation state (the mean of the per-shard new states, as the helper's
  vmapped path takes it), same stacked auxiliary output. BatchNorm therefore
  normalises each shard with its own statistics (ghost BatchNorm over
  :math:`|B|/n` examples) and the caller averages the per-shard running
  averages. Communication is the same as in the synced mode: two
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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax.policies import PolicyState
from saner_jax.sharpness import AuxLayout, SharpnessAwareGrads, sharpness_aware_grad

PERTURBATION_MODES = ("synced", "per_device")


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


def sharded_aux_layout(mode: str = "synced", m_sharpness: int = 1, accumulation_steps: int = 1) -> AuxLayout:
  """The layout of the aux of :func:`sharded_sharpness_aware_grad` with these arguments.

  Examples:
    >>> import saner_jax
    >>> saner_jax.parallel.sharded_aux_layout("per_device")
    AuxLayout(sub_batches=True, micro_batches=False)
  """
  if mode not in PERTURBATION_MODES:
    raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
  return AuxLayout(sub_batches=mode == "per_device" or m_sharpness > 1, micro_batches=accumulation_steps > 1)


def sharded_sharpness_aware_grad(  # noqa: C901 (split in the config/engine redesign)
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
  """:func:`saner_jax.sharpness_aware_grad` with the batch split over a mesh axis.

  Call the returned function inside :func:`jax.jit` with replicated params,
  perturbation state and non-batch arguments; the batch may arrive in any
  sharding, it is split over ``axis_name`` here.

  Examples:
    On any number of devices, the synced mode equals the single-device
    helper on the global batch:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch @ params) ** 2)
    >>> params, batch = jnp.ones(3), jnp.arange(24.0).reshape(8, 3) / 24
    >>> sam = saner_jax.sam(rho=0.1)
    >>> mesh = saner_jax.data_mesh(jax.devices()[:1])
    >>> sharded = saner_jax.sharded_sharpness_aware_grad(loss_fn, sam, mesh)
    >>> out = jax.jit(sharded)(params, sam.init(params), batch)
    >>> ref = saner_jax.sharpness_aware_grad(loss_fn, sam)(params, sam.init(params), batch)
    >>> bool(jnp.allclose(out.perturbed_grads, ref.perturbed_grads))
    True

  Args:
    loss_fn, perturbation, has_aux, batch_argnum: as for
      :func:`saner_jax.sharpness_aware_grad`.
    mesh: the device mesh, e.g. :func:`data_mesh`.
    mode: ``"synced"`` (one perturbation from the global-batch gradient) or
      ``"per_device"`` (each device perturbs with its shard's gradient); see
      the module docstring.
    axis_name: the mesh axis the batch is split over.
    m_sharpness: sub-batches per global batch (synced) or per device shard
      (per-device, so ``n * m_sharpness`` in all).
    accumulation_steps: micro-batches per (sub-)batch, as for
      :func:`saner_jax.sharpness_aware_grad`. Micro-batches are strided, so
      in the synced mode each one stays spread over every device when the
      per-device batch divides by ``accumulation_steps``.

  Returns:
    ``grad_fn(params, perturbation_state, *args, **kwargs)`` returning a
    :class:`saner_jax.SharpnessAwareGrads` with replicated gradients, loss
    and perturbation state, equal to what ``sharpness_aware_grad`` returns
    on the global batch, with ``m_sharpness=n * m_sharpness`` in the
    per-device mode. With a :func:`saner_jax.with_policy` perturbation the
    choice of a sharpness-aware step is made once per step, from the mean
    clean gradient over all devices, in both modes. So are ``aux`` and
    ``perturbed_aux``, except that their leading sub-batch axis (of size
    ``n * m_sharpness``, one entry per sub-batch in batch order) is kept in
    the per-device mode even when its size is 1; :func:`sharded_aux_layout`
    describes it.
  """
  if mode not in PERTURBATION_MODES:
    raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
  local_grad_fn = sharpness_aware_grad(
    loss_fn,
    perturbation,
    has_aux=has_aux,
    m_sharpness=m_sharpness,
    accumulation_steps=accumulation_steps,
    batch_argnum=batch_argnum,
    # Per device, a norm-based policy decides on the mean clean gradient over devices: one branch everywhere.
    axis_name=axis_name if mode == "per_device" else None,
  )
  devices = mesh.shape[axis_name]
  index = batch_argnum - 1

  def batch_of(args: tuple[Any, ...]) -> Any:
    if index >= len(args):
      raise ValueError(f"batch_argnum={batch_argnum} but loss_fn got only {len(args)} arguments after params")
    for leaf in jax.tree.leaves(args[index]):
      if leaf.shape[0] % devices:
        raise ValueError(
          f"batch size {leaf.shape[0]} is not divisible by the {devices} devices of mesh axis {axis_name!r}"
        )
    return args[index]

  def with_batch(args: tuple[Any, ...], batch: Any) -> tuple[Any, ...]:
    return (*args[:index], batch, *args[index + 1 :])

  if mode == "synced":
    split = NamedSharding(mesh, P(axis_name))

    def synced(
      params: optax.Params, perturbation_state: optax.OptState, *args: Any, **kwargs: Any
    ) -> SharpnessAwareGrads:
      batch = jax.lax.with_sharding_constraint(batch_of(args), split)
      return local_grad_fn(params, perturbation_state, *with_batch(args, batch), **kwargs)

    return synced

  def one_device(
    params: optax.Params, perturbation_state: optax.OptState, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> SharpnessAwareGrads:
    out = local_grad_fn(params, perturbation_state, *args, **kwargs)

    def mean(tree: Any) -> Any:
      return jax.lax.pmean(tree, axis_name)

    # A leading sub-batch axis, so that stacking the shards along it gives
    # the helper's layout for n * m_sharpness sub-batches.
    def stacked(aux: Any) -> Any:
      return aux if m_sharpness > 1 else jax.tree.map(lambda x: x[None], aux)

    # Float leaves are averaged like the helper's vmapped states; integer
    # ones (step counts) come from the replicated input and agree already.
    def mean_floats(tree: Any) -> Any:
      return jax.tree.map(lambda x: mean(x).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)

    state = out.perturbation_state
    if isinstance(state, PolicyState):  # a policy's state is decided alike on every device already
      state = PolicyState(mean_floats(state.perturbation), state.policy)
    else:
      state = mean_floats(state)
    return SharpnessAwareGrads(
      mean(out.clean_grads),
      mean(out.perturbed_grads),
      mean(out.loss),
      stacked(out.aux),
      state,
      out.sharpness_aware,
      stacked(out.perturbed_aux),
    )

  def per_device(
    params: optax.Params, perturbation_state: optax.OptState, *args: Any, **kwargs: Any
  ) -> SharpnessAwareGrads:
    batch_of(args)
    arg_specs = tuple(P(axis_name) if i == index else P() for i in range(len(args)))
    # Without replication checks shard_map treats the replicated params as
    # each device's own value: their gradients stay the shard's (the checked
    # mode would sum them over devices, and every device would perturb
    # alike) until the explicit pmean, and the core helper's scan needs no
    # device-varying annotations. The outputs are replicated by that pmean.
    return jax.shard_map(
      one_device,
      mesh=mesh,
      in_specs=(P(), P(), arg_specs, P()),
      # _make: a pytree of specs in the outputs' structure, not of arrays.
      out_specs=SharpnessAwareGrads._make((P(), P(), P(), P(axis_name), P(), P(), P(axis_name))),
      check_vma=False,
    )(params, perturbation_state, args, kwargs)

  return per_device

r"""The two-pass gradient of sharpness-aware methods.

:func:`sharpness_aware_grad` turns a loss into a function that returns both
gradients SAM-family methods need,

.. math::
   g = \nabla L_B(w), \qquad
   \epsilon = \mathrm{perturbation}(g, w), \qquad
   g^{SAM} = \nabla L_B(w + \epsilon),

in one jit-able call, on one device or with the batch split over a device
mesh (``mesh=``, ``mode=``). The loss may return auxiliary outputs, such as
updated BatchNorm statistics and logits: both passes' are returned (``aux``
and ``perturbed_aux``), so the caller chooses which running averages to
keep. However the batch was split (m-sharpness, accumulation, devices), they
come back in the shape of one unsplit call, merged leaf by leaf by
``aux_reducers``.
Each pass normalises with its own batch statistics (train mode), so that
choice changes no gradient. Keeping the clean pass's is the common convention
(google-research/sam); the SANER authors' loop keeps the perturbed pass's.

Both passes can accumulate over micro-batches (``accumulation_steps``) with
the memory of one micro-batch; :func:`accumulated_value_and_grad` is that
accumulation for a single gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saner_jax import _validation
from saner_jax._modes import PERTURBATION_MODES
from saner_jax.policies import PolicyPerturbation, PolicyState


class SharpnessAwareGrads(NamedTuple):
  """What :func:`sharpness_aware_grad` returns.

  Attributes:
    clean_grads: ``g``, the gradient at ``w``.
    perturbed_grads: ``g_sam``, the gradient at ``w + eps``.
    loss: the loss at ``w`` (mean over sub-batches under m-sharpness, and
      over micro-batches under accumulation).
    aux: the clean pass's auxiliary output (None without ``has_aux``), its
      pieces (sub-batches, micro-batches, devices) merged by
      ``aux_reducers``: by default every leaf is the mean over the pieces,
      in the shape of one unsplit call.
    perturbation_state: the perturbation's new state.
    sharpness_aware: whether the second pass ran, a boolean scalar; always
      True without a policy. On a step a :func:`saner_jax.with_policy`
      perturbation skips, ``perturbed_grads`` is ``clean_grads`` and
      ``perturbed_aux`` is ``aux``; pass it to :func:`saner_jax.saner` as
      ``sharpness_aware=`` for its mask reuse.
    perturbed_aux: the perturbed pass's auxiliary output at ``w + eps``,
      merged like ``aux`` (None without ``has_aux``). With BatchNorm, its
      running averages are those the SANER authors keep (see
      ``docs/method.md``, "BatchNorm and the two passes").
  """

  clean_grads: optax.Updates
  perturbed_grads: optax.Updates
  loss: jax.Array
  aux: Any
  perturbation_state: optax.OptState
  # Defaulted, so code that builds the five-field tuple keeps working.
  sharpness_aware: Any = True
  perturbed_aux: Any = None


AUX_REDUCERS = ("mean", "concat", "stack")
AuxReducer = Literal["mean", "concat", "stack"]


class _AuxLayout(NamedTuple):
  """The axes a split stacks on an aux leaf, and the merges by each reducer.

  Splitting the batch gives one aux per piece, stacked: first an axis over
  the sub-batches (m-sharpness, and one per device in the per-device mode),
  each a contiguous slice of the batch; then an axis over accumulation's
  micro-batches, micro-batch ``i`` of a (sub-)batch of ``n`` holding its
  examples ``i, i + k, ..., n - k + i``.
  """

  sub_batches: bool = False
  micro_batches: bool = False

  @property
  def axes(self) -> int:
    """How many leading axes are stacked."""
    return int(self.sub_batches) + int(self.micro_batches)

  def mean(self, tree: Any) -> Any:
    """Every leaf averaged over the stacked axes.

    Right for BatchNorm's updated running averages: they are affine in the
    batch statistics, so their mean is the running average of the pieces'
    mean statistics.
    """
    axes = tuple(range(self.axes))
    return jax.tree.map(lambda x: x.mean(axes) if axes else x, tree)

  def examples(self, tree: Any) -> Any:
    """Per-example leaves (e.g. logits) merged into one batch axis, in the batch's order."""

    def merge(x: jax.Array) -> jax.Array:
      if self.micro_batches:  # micro-batch i holds examples i, i + k, ...: interleave them back
        x = jnp.swapaxes(x, self.axes - 1, self.axes)
      return x.reshape(-1, *x.shape[self.axes + 1 :])

    return jax.tree.map(merge, tree)

  def merge(self, aux: Any, reducers: Any) -> Any:
    """``aux`` merged by ``reducers`` (None: the default; else a prefix tree of :data:`AUX_REDUCERS`)."""
    if reducers is None:
      return jax.tree.map(self._default, aux)
    try:
      return jax.tree.map(lambda r, sub: self._by_name(r, sub), reducers, aux)
    except ValueError as e:
      if "aux_reducers" in str(e):
        raise
      raise ValueError(
        f"aux_reducers must be a prefix of the aux's tree structure {jax.tree.structure(aux)}, got {reducers!r}"
      ) from None

  def _default(self, x: jax.Array) -> Any:
    if self.axes and not jnp.issubdtype(x.dtype, jnp.inexact):
      raise ValueError(
        f"aux_reducers: an aux leaf of dtype {x.dtype} cannot be averaged over the batch's pieces; "
        'name its reducer ("concat" for per-example outputs, "stack" to keep the pieces)'
      )
    return self.mean(x)

  def _by_name(self, reducer: str, sub: Any) -> Any:
    if reducer == "mean":
      return self.mean(sub)
    if reducer == "concat":
      return self.examples(sub) if self.axes else sub
    return sub  # "stack"


def _check_arguments(
  perturbation: optax.GradientTransformation, m_sharpness: int, batch_argnum: int, mesh: Mesh | None, mode: str
) -> None:
  if not hasattr(perturbation, "update") or not hasattr(perturbation, "init"):
    raise TypeError(
      f"perturbation must be an optax.GradientTransformation such as saner_jax.sam(rho), got {perturbation!r}"
    )
  if not isinstance(m_sharpness, int) or m_sharpness < 1:
    raise ValueError(f"m_sharpness must be an integer >= 1, got {m_sharpness!r}")
  _check_batch_argnum(batch_argnum)
  if mode not in PERTURBATION_MODES:
    raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
  if mode == "per_device" and mesh is None:
    raise ValueError('mode="per_device" splits the batch over devices: pass mesh=saner_jax.data_mesh()')


def _check_reducers(aux_reducers: Any, has_aux: bool) -> None:
  if aux_reducers is None:
    return
  if not has_aux:
    raise ValueError("aux_reducers merges the aux of a loss_fn with has_aux=True; drop it or set has_aux=True")
  bad = [r for r in jax.tree.leaves(aux_reducers) if not (isinstance(r, str) and r in AUX_REDUCERS)]
  if bad or not jax.tree.leaves(aux_reducers):
    raise ValueError(f"aux_reducers leaves must be one of {AUX_REDUCERS}, got {aux_reducers!r}")


def aux_layout(m_sharpness: int = 1, accumulation_steps: int = 1) -> _AuxLayout:
  """Deprecated: the stacked layout of the aux of :func:`sharpness_aware_grad` with ``aux_reducers="stack"``.

  :func:`sharpness_aware_grad` and :func:`accumulated_value_and_grad` now
  merge the aux themselves (``aux_reducers``); this goes in saner_jax 0.4.0.
  """
  warnings.warn(
    "saner_jax.aux_layout is deprecated (saner_jax 0.3.0) and goes in 0.4.0: sharpness_aware_grad merges the "
    'aux itself; pass aux_reducers (e.g. ("mean", "concat")) instead',
    DeprecationWarning,
    stacklevel=2,
  )
  return _AuxLayout(sub_batches=m_sharpness > 1, micro_batches=accumulation_steps > 1)


def _check_batch_argnum(batch_argnum: int) -> None:
  if batch_argnum < 1:
    raise ValueError(f"batch_argnum must be >= 1 (0 is params), got {batch_argnum}")


def _batch_index(batch_argnum: int, args: tuple[Any, ...]) -> int:
  if batch_argnum - 1 >= len(args):
    raise ValueError(f"batch_argnum={batch_argnum} but loss_fn got only {len(args)} arguments after params")
  return batch_argnum - 1


def accumulated_value_and_grad(
  fun: Callable[..., Any],
  accumulation_steps: int,
  *,
  has_aux: bool = False,
  batch_argnum: int = 1,
  aux_reducers: Any = None,
) -> Callable[..., Any]:
  r"""``jax.value_and_grad(fun)`` summed over micro-batches with ``lax.scan``.

  The batch (argument ``batch_argnum``, a pytree whose leaves share a leading
  axis of size :math:`B`) is split into :math:`k` micro-batches
  :math:`b_0, \dots, b_{k-1}` of :math:`B / k` examples, and

  .. math::
     L = \tfrac1k \textstyle\sum_i L_{b_i}(w), \qquad
     \nabla L = \tfrac1k \textstyle\sum_i \nabla L_{b_i}(w),

  one micro-batch at a time: memory holds one micro-batch's activations and
  one gradient-sized running sum (in at least float32). For a loss that is a
  mean over examples, with no layer coupling the examples (BatchNorm does),
  this is the full-batch value and gradient up to float rounding.

  Micro-batch :math:`i` holds examples :math:`i, i + k, i + 2k, \dots`
  (strided, not contiguous): a batch sharded over devices in contiguous
  blocks then has every micro-batch spread over all devices, and the split
  moves no data between them.

  Examples:
    Two micro-batches give the full batch's mean loss and gradient:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> def loss(w, x):
    ...   return jnp.mean((x * w - 1.0) ** 2)
    >>> x = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> value, grad = saner_jax.accumulated_value_and_grad(loss, 2)(2.0, x)
    >>> print(value, grad)
    21.0 25.0
    >>> print(*jax.value_and_grad(loss)(2.0, x))
    21.0 25.0

  Args:
    fun: ``fun(params, *args, **kwargs)``, a scalar or ``(scalar, aux)``.
    accumulation_steps: ``k``, which must divide the batch size; 1 returns
      ``jax.value_and_grad(fun, has_aux=has_aux)`` itself.
    has_aux: whether ``fun`` returns ``(value, aux)``.
    batch_argnum: the position of the batch among ``fun``'s arguments.

    aux_reducers: how the micro-batches' aux merge, as for
      :func:`sharpness_aware_grad`: by default every leaf is averaged.

  Returns:
    A function with ``fun``'s arguments returning ``(value, grads)``, or
    ``((value, aux), grads)`` with ``has_aux``, ``aux`` merged over the
    micro-batches by ``aux_reducers``.
  """
  _check_reducers(aux_reducers, has_aux)
  stacked = _stacked_accumulation(fun, accumulation_steps, has_aux=has_aux, batch_argnum=batch_argnum)
  if not has_aux or accumulation_steps == 1:
    return stacked
  layout = _AuxLayout(micro_batches=True)

  def merged(params: optax.Params, *args: Any, **kwargs: Any) -> Any:
    (value, aux), grads = stacked(params, *args, **kwargs)
    return (value, layout.merge(aux, aux_reducers)), grads

  return merged


def _stacked_accumulation(
  fun: Callable[..., Any], accumulation_steps: int, *, has_aux: bool, batch_argnum: int
) -> Callable[..., Any]:
  """:func:`accumulated_value_and_grad` with every aux leaf stacked over the micro-batches (axis 0)."""
  if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
    raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
  _check_batch_argnum(batch_argnum)
  value_and_grad = jax.value_and_grad(fun, has_aux=has_aux)
  k = accumulation_steps
  if k == 1:
    return value_and_grad

  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by accumulation_steps={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def accumulated(params: optax.Params, *args: Any, **kwargs: Any) -> Any:
    index = _batch_index(batch_argnum, args)
    micro_batches = jax.tree.map(split, args[index])

    def on(micro_batch: Any) -> Any:
      return value_and_grad(params, *args[:index], micro_batch, *args[index + 1 :], **kwargs)

    def wide(x: jax.ShapeDtypeStruct) -> Any:  # a sum of k float16/bfloat16 terms would lose digits
      return jnp.promote_types(x.dtype, jnp.float32)

    shapes = jax.eval_shape(on, jax.tree.map(lambda x: x[0], micro_batches))
    value_shape, grad_shapes = (shapes[0][0] if has_aux else shapes[0]), shapes[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, wide(s)), (value_shape, grad_shapes))

    def body(total: Any, micro_batch: Any) -> tuple[Any, Any]:
      out, grads = on(micro_batch)
      value, aux = out if has_aux else (out, None)
      total = jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, (value, grads))
      return total, aux

    (value, grads), aux = jax.lax.scan(body, zeros, micro_batches)
    value, grads = jax.tree.map(lambda t, s: (t / k).astype(s.dtype), (value, grads), (value_shape, grad_shapes))
    return ((value, aux), grads) if has_aux else (value, grads)

  return accumulated


def sharpness_aware_grad(
  loss_fn: Callable[..., Any],
  perturbation: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  m_sharpness: int = 1,
  accumulation_steps: int = 1,
  batch_argnum: int = 1,
  mesh: Mesh | None = None,
  mode: str = "synced",
  axis_name: str | None = None,
  aux_reducers: Any = None,
) -> Callable[..., SharpnessAwareGrads]:
  r"""Builds the two-pass gradient function of a sharpness-aware method.

  Examples:
    For :math:`L(w) = \lVert w \rVert^2 / 2` the gradient is :math:`w`
    itself, so SAM's second pass sees :math:`w + \rho w / \lVert w \rVert`:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> def loss_fn(params, batch):
    ...   return 0.5 * jnp.sum(params["w"] ** 2) * batch.mean()
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> perturbation = saner_jax.sam(rho=0.5)
    >>> grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
    >>> out = grad_fn(params, perturbation.init(params), jnp.ones(8))
    >>> print(out.loss, out.clean_grads["w"], out.perturbed_grads["w"])
    12.5 [3. 4.] [3.3 4.4]

    Split into two sub-batches (m-sharpness) on a one-device mesh, an aux
    ``(per-example outputs, batch mean)`` still comes back as one unsplit
    call's, by the reducers named for its leaves:

    >>> def loss_with_aux(params, batch):
    ...   return loss_fn(params, batch), (batch * 10, batch.mean())
    >>> grad_fn = saner_jax.sharpness_aware_grad(
    ...   loss_with_aux, perturbation, has_aux=True, m_sharpness=2,
    ...   mesh=saner_jax.data_mesh(jax.devices()[:1]), aux_reducers=("concat", "mean"))
    >>> out = jax.jit(grad_fn)(params, perturbation.init(params), jnp.arange(4.0))
    >>> print(out.aux[0], out.aux[1])
    [ 0. 10. 20. 30.] 1.5

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux``. Model state (BatchNorm statistics)
      goes in through ``args`` and comes out in ``aux``.
    perturbation: a transform mapping clean gradients to the perturbation,
      such as :func:`saner_jax.sam`; its state is threaded by the caller.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    m_sharpness: split the batch into this many equal sub-batches and
      perturb each with its own gradient (Foret et al.'s m-sharpness), all
      vmapped on one device. The returned gradients are the means over
      sub-batches, and the perturbation state is updated as if by their mean
      clean gradient (exact for SAM, ASAM and the linear averages of
      Friendly-SAM and VaSSO). 1 is plain SAM.
    accumulation_steps: ``k``, accumulate each pass over ``k`` micro-batches
      of every (sub-)batch with :func:`accumulated_value_and_grad` (memory of
      one micro-batch). The clean gradient is accumulated over all ``k``
      micro-batches first, ONE perturbation is formed from it, and the
      perturbed gradient is accumulated at ``w + eps`` over the same
      micro-batches:

      .. math::
         g = \tfrac1k \textstyle\sum_i \nabla L_{b_i}(w), \quad
         \epsilon = \mathrm{perturbation}(g), \quad
         g^{SAM} = \tfrac1k \textstyle\sum_i \nabla L_{b_i}(w + \epsilon).

      With a mean loss and no BatchNorm this is the un-accumulated step up
      to float rounding. With BatchNorm each micro-batch is normalised with
      its own statistics in both passes, and the micro-batches' running
      averages are merged by ``aux_reducers`` (averaged by default).
    batch_argnum: the position in ``loss_fn``'s arguments of the batch, a
      pytree whose leaves share a leading batch axis; only it is split under
      m-sharpness and accumulation. Params are position 0.
    mesh: a :class:`jax.sharding.Mesh` (e.g. :func:`saner_jax.data_mesh`)
      to split the batch over, for data parallelism; None runs on the
      batch's own placement. Call the returned function inside
      :func:`jax.jit` with replicated params, perturbation state and
      non-batch arguments; the batch may arrive in any sharding.
    mode: with a mesh, ``"synced"`` (one perturbation from the global-batch
      gradient: the single-device algorithm on the global batch) or
      ``"per_device"`` (each device perturbs with its shard's gradient:
      ``m_sharpness=n * m_sharpness`` on one device, the sub-batches spread
      over the ``n`` devices); see :mod:`saner_jax.parallel`. In the synced
      mode ``m_sharpness`` counts sub-batches per global batch; per device,
      per shard. Micro-batches are strided, so in the synced mode each one
      stays spread over every device when the per-device batch divides by
      ``accumulation_steps``.
    axis_name: with a mesh, the mesh axis the batch is split over (default
      ``"data"``). Without one, inside your own :func:`jax.shard_map` or
      ``pmap``: the mapped axis over which a norm-based policy
      (:func:`saner_jax.adaptive_steps`) averages the clean gradient before
      it decides, so that every device takes the same branch (the
      per-device mode does this itself).
    aux_reducers: how the pieces' aux merge into that of one unsplit call,
      when m-sharpness, accumulation or the per-device mode split the
      batch: ``"mean"`` (the mean over pieces: right for BatchNorm's
      running averages, which are affine in the batch statistics, and for
      per-batch means), ``"concat"`` (per-example outputs such as logits,
      put back in the batch's order) or ``"stack"`` (the pieces kept: a
      leading axis over the sub-batches, when split into them, then one over
      the micro-batches, when accumulated; the layout of 0.2.0). Give one
      name for the whole aux, or a pytree of names that is a prefix of the
      aux's structure, such as ``("mean", "concat")`` for an aux
      ``(batch_stats, logits)``. None (the default) averages every float
      leaf and refuses any other, since an integer leaf has no mean.
      ``perturbed_aux`` is merged alike.

  With a :func:`saner_jax.with_policy` perturbation the second pass runs in
  a ``lax.cond`` on the steps the policy chooses, decided once per step
  from the mean clean gradient over sub- and micro-batches; on the others
  ``perturbed_grads`` is the clean gradient and the step costs one pass.

  With a mesh the gradients, the loss and the perturbation state come back
  replicated, and with a policy the choice of a sharpness-aware step is made
  once per step, from the mean clean gradient over all devices, in both
  modes.

  Returns:
    ``grad_fn(params, perturbation_state, *args, **kwargs)`` returning a
    :class:`SharpnessAwareGrads`.
  """
  _check_arguments(perturbation, m_sharpness, batch_argnum, mesh, mode)
  _check_reducers(aux_reducers, has_aux)
  per_device = mesh is not None and mode == "per_device"
  layout = _AuxLayout(sub_batches=m_sharpness > 1 or per_device, micro_batches=accumulation_steps > 1)
  if mesh is None:
    stacked = _two_pass(
      loss_fn,
      perturbation,
      has_aux=has_aux,
      m_sharpness=m_sharpness,
      accumulation_steps=accumulation_steps,
      batch_argnum=batch_argnum,
      axis_name=axis_name,
    )
  else:
    axis = "data" if axis_name is None else axis_name
    if axis not in mesh.axis_names:
      raise ValueError(f"axis_name {axis!r} is not an axis of the mesh {mesh.axis_names}")
    local = _two_pass(
      loss_fn,
      perturbation,
      has_aux=has_aux,
      m_sharpness=m_sharpness,
      accumulation_steps=accumulation_steps,
      batch_argnum=batch_argnum,
      # Per device, a norm-based policy decides on the mean clean gradient over devices: one branch everywhere.
      axis_name=axis if per_device else None,
    )
    stacked = _on_mesh(local, mesh, axis, per_device=per_device, m_sharpness=m_sharpness, batch_argnum=batch_argnum)
  if not has_aux or aux_reducers == "stack":
    return stacked

  def grad_fn(
    params: optax.Params, perturbation_state: optax.OptState, *args: Any, **kwargs: Any
  ) -> SharpnessAwareGrads:
    out = stacked(params, perturbation_state, *args, **kwargs)
    return out._replace(
      aux=layout.merge(out.aux, aux_reducers), perturbed_aux=layout.merge(out.perturbed_aux, aux_reducers)
    )

  return grad_fn


def _two_pass(
  loss_fn: Callable[..., Any],
  perturbation: optax.GradientTransformation,
  *,
  has_aux: bool,
  m_sharpness: int,
  accumulation_steps: int,
  batch_argnum: int,
  axis_name: str | None,
) -> Callable[..., SharpnessAwareGrads]:
  """The two passes on this device's batch, every aux leaf stacked as :class:`_AuxLayout` says."""

  def with_aux(params: optax.Params, *args: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
    out = loss_fn(params, *args, **kwargs)
    return out if has_aux else (out, None)

  value_and_grad = _stacked_accumulation(with_aux, accumulation_steps, has_aux=True, batch_argnum=batch_argnum)
  policy = perturbation.policy if isinstance(perturbation, PolicyPerturbation) else None
  inner = perturbation.perturbation if isinstance(perturbation, PolicyPerturbation) else perturbation

  def first_pass(
    params: optax.Params, perturbation_state: optax.OptState, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> tuple[Any, ...]:
    (loss, aux), clean = value_and_grad(params, *args, **kwargs)
    eps, new_state = inner.update(clean, perturbation_state, params)
    return loss, aux, clean, eps, new_state

  def second_pass(
    params: optax.Params, eps: optax.Updates, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> tuple[Any, Any]:
    """``(perturbed gradient, perturbed aux)`` at ``w + eps``."""
    (_, perturbed_aux), perturbed = value_and_grad(optax.apply_updates(params, eps), *args, **kwargs)
    return perturbed, perturbed_aux

  def grad_fn(
    params: optax.Params, perturbation_state: optax.OptState, *args: Any, **kwargs: Any
  ) -> SharpnessAwareGrads:
    inner_state = perturbation_state.perturbation if policy is not None else perturbation_state
    if m_sharpness == 1:
      loss, aux, clean, eps, new_state = first_pass(params, inner_state, args, kwargs)

      def perturbed_pass() -> Any:
        return second_pass(params, eps, args, kwargs)
    else:
      (loss, aux, clean, eps, new_state), perturbed_pass = _on_sub_batches(
        first_pass, second_pass, m_sharpness, batch_argnum, params, inner_state, args, kwargs
      )

    if policy is None:
      perturbed, perturbed_aux = perturbed_pass()
      return SharpnessAwareGrads(clean, perturbed, loss, aux, new_state, True, perturbed_aux)
    squared_norm = jnp.zeros([], jnp.float32)
    if policy.uses_norm:
      mean_clean = clean if axis_name is None else jax.lax.pmean(clean, axis_name)
      squared_norm = optax.tree.norm(_validation.widened(mean_clean), squared=True).astype(jnp.float32)
    take, policy_state = policy.decide(perturbation_state.policy, squared_norm)
    # A cond, not a select: XLA runs one branch, so a skipped step costs one pass.
    perturbed, perturbed_aux = jax.lax.cond(take, perturbed_pass, lambda: (clean, aux))
    return SharpnessAwareGrads(clean, perturbed, loss, aux, PolicyState(new_state, policy_state), take, perturbed_aux)

  return grad_fn


def _mean(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.mean(axis=0), tree)


def _on_sub_batches(
  first_pass: Callable[..., tuple[Any, ...]],
  second_pass: Callable[..., tuple[Any, Any]],
  m_sharpness: int,
  batch_argnum: int,
  params: optax.Params,
  inner_state: optax.OptState,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], Callable[[], Any]]:
  """m-sharpness: the first pass vmapped over contiguous sub-batches, and the second pass to run."""
  index = _batch_index(batch_argnum, args)

  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % m_sharpness:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by m_sharpness={m_sharpness}")
    return x.reshape(m_sharpness, x.shape[0] // m_sharpness, *x.shape[1:])

  sub_batches = jax.tree.map(split, args[index])

  def with_sub_batch(sub_batch: Any) -> tuple[Any, ...]:
    return (*args[:index], sub_batch, *args[index + 1 :])

  loss, aux, clean, eps, new_state = jax.vmap(
    lambda sub_batch: first_pass(params, inner_state, with_sub_batch(sub_batch), kwargs)
  )(sub_batches)
  loss, clean = loss.mean(), _mean(clean)
  new_state = jax.tree.map(
    lambda x: x.mean(axis=0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x[0], new_state
  )

  def perturbed_pass() -> Any:
    perturbed, perturbed_aux = jax.vmap(lambda e, b: second_pass(params, e, with_sub_batch(b), kwargs))(
      eps, sub_batches
    )
    return _mean(perturbed), perturbed_aux  # the aux keeps its sub-batch axis, as the clean one does

  return (loss, aux, clean, eps, new_state), perturbed_pass


def _on_mesh(
  local: Callable[..., SharpnessAwareGrads],
  mesh: Mesh,
  axis_name: str,
  *,
  per_device: bool,
  m_sharpness: int,
  batch_argnum: int,
) -> Callable[..., SharpnessAwareGrads]:
  """``local`` with the batch split over ``axis_name``; per device, under ``shard_map`` with a stacked aux."""
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

  if per_device:
    return _per_device(local, mesh, axis_name, m_sharpness, index, batch_of)
  split = NamedSharding(mesh, P(axis_name))

  def synced(
    params: optax.Params, perturbation_state: optax.OptState, *args: Any, **kwargs: Any
  ) -> SharpnessAwareGrads:
    batch = jax.lax.with_sharding_constraint(batch_of(args), split)
    return local(params, perturbation_state, *args[:index], batch, *args[index + 1 :], **kwargs)

  return synced


def _per_device(
  local: Callable[..., SharpnessAwareGrads],
  mesh: Mesh,
  axis_name: str,
  m_sharpness: int,
  index: int,
  batch_of: Callable[[tuple[Any, ...]], Any],
) -> Callable[..., SharpnessAwareGrads]:
  """``local`` on each device's shard under ``shard_map``, then ``pmean``-ed; the aux stacked over sub-batches."""

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

  def one_device(
    params: optax.Params, perturbation_state: optax.OptState, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> SharpnessAwareGrads:
    out = local(params, perturbation_state, *args, **kwargs)
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

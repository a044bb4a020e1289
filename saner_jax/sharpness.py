r"""The two-pass gradient of sharpness-aware methods.

:func:`sharpness_aware_grad` turns a loss into a function that returns both
gradients SAM-family methods need,

.. math::
   g = \nabla L_B(w), \qquad
   \epsilon = \mathrm{perturbation}(g, w), \qquad
   g^{SAM} = \nabla L_B(w + \epsilon),

in one jit-able call. The loss may return auxiliary outputs, such as updated
BatchNorm statistics: both passes' are returned (``aux`` and
``perturbed_aux``), so the caller chooses which running averages to keep.
Each pass normalises with its own batch statistics (train mode), so that
choice changes no gradient. Keeping the clean pass's is the common convention
(google-research/sam); the SANER authors' loop keeps the perturbed pass's.

Both passes can accumulate over micro-batches (``accumulation_steps``) with
the memory of one micro-batch; :func:`accumulated_value_and_grad` is that
accumulation for a single gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saner_jax import _validation
from saner_jax.policies import PolicyPerturbation, PolicyState


class SharpnessAwareGrads(NamedTuple):
  """What :func:`sharpness_aware_grad` returns.

  Attributes:
    clean_grads: ``g``, the gradient at ``w``.
    perturbed_grads: ``g_sam``, the gradient at ``w + eps``.
    loss: the loss at ``w`` (mean over sub-batches under m-sharpness, and
      over micro-batches under accumulation).
    aux: the clean pass's auxiliary output (None without ``has_aux``). Under
      m-sharpness every leaf gains a leading axis of size ``m``, one entry per
      sub-batch, so the caller chooses how to combine them. Under
      accumulation every leaf gains an axis of size ``k`` after it, one entry
      per micro-batch (see :func:`accumulated_value_and_grad`).
      :func:`aux_layout` describes these axes and merges them back.
    perturbation_state: the perturbation's new state.
    sharpness_aware: whether the second pass ran, a boolean scalar; always
      True without a policy. On a step a :func:`saner_jax.with_policy`
      perturbation skips, ``perturbed_grads`` is ``clean_grads`` and
      ``perturbed_aux`` is ``aux``; pass it to :func:`saner_jax.saner` as
      ``sharpness_aware=`` for its mask reuse.
    perturbed_aux: the perturbed pass's auxiliary output at ``w + eps``, in
      ``aux``'s layout (None without ``has_aux``). With BatchNorm, its
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


class AuxLayout(NamedTuple):
  r"""The axes a gradient helper stacks on its auxiliary output, and how to merge them.

  Splitting the batch gives one aux per piece. :func:`sharpness_aware_grad`
  stacks them: first an axis over the sub-batches (m-sharpness, and the
  per-device mode of :func:`saner_jax.sharded_sharpness_aware_grad`), each a
  contiguous slice of the batch; then an axis over accumulation's
  micro-batches, micro-batch ``i`` of a (sub-)batch of ``n`` holding its
  examples ``i, i + k, ..., n - k + i``. Get the layout from
  :func:`aux_layout` (or :func:`saner_jax.parallel.sharded_aux_layout`).

  Examples:
    Two sub-batches of two micro-batches each, on the batch ``[0, ..., 7]``:
    per-example outputs go back into batch order, and a statistic of each
    of the four pieces is averaged:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> layout = saner_jax.aux_layout(m_sharpness=2, accumulation_steps=2)
    >>> per_example = jnp.array([[[0, 2], [1, 3]], [[4, 6], [5, 7]]])
    >>> print(layout.examples(per_example))
    [0 1 2 3 4 5 6 7]
    >>> print(layout.mean(jnp.array([[1.0, 3.0], [5.0, 7.0]])))
    4.0

  Attributes:
    sub_batches: whether a leading sub-batch axis is stacked.
    micro_batches: whether a micro-batch axis is stacked (after it).
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


def aux_layout(m_sharpness: int = 1, accumulation_steps: int = 1) -> AuxLayout:
  """The layout of the aux of :func:`sharpness_aware_grad` with these arguments.

  With ``m_sharpness=1`` it is also that of
  :func:`accumulated_value_and_grad` with ``accumulation_steps``.
  """
  return AuxLayout(sub_batches=m_sharpness > 1, micro_batches=accumulation_steps > 1)


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

  Returns:
    A function with ``fun``'s arguments returning ``(value, grads)``, or
    ``((value, aux), grads)`` with ``has_aux``, where every leaf of ``aux``
    has a leading axis of size ``k``: entry ``i`` is micro-batch ``i``'s.
  """
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


def sharpness_aware_grad(  # noqa: C901 (one entry point with the sharded helper in the redesign)
  loss_fn: Callable[..., Any],
  perturbation: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  m_sharpness: int = 1,
  accumulation_steps: int = 1,
  batch_argnum: int = 1,
  axis_name: str | None = None,
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
      its own statistics in both passes, and ``aux`` (``perturbed_aux``)
      holds the clean (perturbed) pass's running averages of every
      micro-batch, for the caller to average.
    batch_argnum: the position in ``loss_fn``'s arguments of the batch, a
      pytree whose leaves share a leading batch axis; only it is split under
      m-sharpness and accumulation. Params are position 0.
    axis_name: inside :func:`jax.shard_map` or ``pmap``, the mapped axis over
      which a norm-based policy (:func:`saner_jax.adaptive_steps`) averages
      the clean gradient before it decides, so that every device takes the
      same branch; the per-device mode of
      :func:`saner_jax.sharded_sharpness_aware_grad` sets it.

  With a :func:`saner_jax.with_policy` perturbation the second pass runs in
  a ``lax.cond`` on the steps the policy chooses, decided once per step
  from the mean clean gradient over sub- and micro-batches; on the others
  ``perturbed_grads`` is the clean gradient and the step costs one pass.

  Returns:
    ``grad_fn(params, perturbation_state, *args, **kwargs)`` returning a
    :class:`SharpnessAwareGrads`.
  """
  if not hasattr(perturbation, "update") or not hasattr(perturbation, "init"):
    raise TypeError(
      f"perturbation must be an optax.GradientTransformation such as saner_jax.sam(rho), got {perturbation!r}"
    )
  if not isinstance(m_sharpness, int) or m_sharpness < 1:
    raise ValueError(f"m_sharpness must be an integer >= 1, got {m_sharpness!r}")
  _check_batch_argnum(batch_argnum)

  def with_aux(params: optax.Params, *args: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
    out = loss_fn(params, *args, **kwargs)
    return out if has_aux else (out, None)

  value_and_grad = accumulated_value_and_grad(with_aux, accumulation_steps, has_aux=True, batch_argnum=batch_argnum)
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

r"""The two-pass gradient of sharpness-aware methods.

:func:`sharpness_aware_grad` turns a loss into a function that returns both
gradients SAM-family methods need,

.. math::
   g = \nabla L_B(w), \qquad
   \epsilon = \mathrm{perturbation}(g, w), \qquad
   g^{SAM} = \nabla L_B(w + \epsilon),

in one jit-able call. The loss may return auxiliary outputs, such as updated
BatchNorm statistics: only the clean pass's are returned. The perturbed pass
still normalises with its own batch statistics (train mode), but its updated
running averages are dropped, as the authors' ``disable_running_stats`` does
in PyTorch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SharpnessAwareGrads(NamedTuple):
  """What :func:`sharpness_aware_grad` returns.

  Attributes:
    clean_grads: ``g``, the gradient at ``w``.
    perturbed_grads: ``g_sam``, the gradient at ``w + eps``.
    loss: the loss at ``w`` (mean over sub-batches under m-sharpness).
    aux: the clean pass's auxiliary output (None without ``has_aux``). Under
      m-sharpness every leaf gains a leading axis of size ``m``, one entry per
      sub-batch, so the caller chooses how to combine them.
    perturbation_state: the perturbation's new state.
  """

  clean_grads: optax.Updates
  perturbed_grads: optax.Updates
  loss: jax.Array
  aux: Any
  perturbation_state: optax.OptState


def sharpness_aware_grad(
    loss_fn: Callable[..., Any],
    perturbation: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    m_sharpness: int = 1,
    batch_argnum: int = 1,
) -> Callable[..., SharpnessAwareGrads]:
  """Builds the two-pass gradient function of a sharpness-aware method.

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
    batch_argnum: the position in ``loss_fn``'s arguments of the batch, a
      pytree whose leaves share a leading batch axis; only it is split under
      m-sharpness. Params are position 0.

  Returns:
    ``grad_fn(params, perturbation_state, *args, **kwargs)`` returning a
    :class:`SharpnessAwareGrads`.
  """
  if not hasattr(perturbation, "update") or not hasattr(perturbation, "init"):
    raise TypeError(
        "perturbation must be an optax.GradientTransformation such as "
        f"saner_jax.sam(rho), got {perturbation!r}"
    )
  if not isinstance(m_sharpness, int) or m_sharpness < 1:
    raise ValueError(f"m_sharpness must be an integer >= 1, got {m_sharpness!r}")
  if batch_argnum < 1:
    raise ValueError(f"batch_argnum must be >= 1 (0 is params), got {batch_argnum}")

  def with_aux(params, *args, **kwargs):
    out = loss_fn(params, *args, **kwargs)
    return out if has_aux else (out, None)

  clean_value_and_grad = jax.value_and_grad(with_aux, has_aux=True)
  perturbed_grad = jax.grad(with_aux, has_aux=True)

  def two_passes(params, perturbation_state, args, kwargs):
    (loss, aux), clean = clean_value_and_grad(params, *args, **kwargs)
    eps, new_state = perturbation.update(clean, perturbation_state, params)
    perturbed, _ = perturbed_grad(optax.apply_updates(params, eps), *args, **kwargs)
    return SharpnessAwareGrads(clean, perturbed, loss, aux, new_state)

  def grad_fn(params, perturbation_state, *args, **kwargs) -> SharpnessAwareGrads:
    if m_sharpness == 1:
      return two_passes(params, perturbation_state, args, kwargs)
    index = batch_argnum - 1
    if index >= len(args):
      raise ValueError(
          f"batch_argnum={batch_argnum} but loss_fn got only {len(args)} "
          "arguments after params"
      )
    batch = args[index]

    def split(x):
      if x.shape[0] % m_sharpness:
        raise ValueError(
            f"batch size {x.shape[0]} is not divisible by m_sharpness={m_sharpness}"
        )
      return x.reshape(m_sharpness, x.shape[0] // m_sharpness, *x.shape[1:])

    def one_sub_batch(sub_batch):
      sub_args = (*args[:index], sub_batch, *args[index + 1 :])
      return two_passes(params, perturbation_state, sub_args, kwargs)

    per_sub_batch = jax.vmap(one_sub_batch)(jax.tree.map(split, batch))
    mean = lambda tree: jax.tree.map(lambda x: x.mean(axis=0), tree)
    return SharpnessAwareGrads(
        clean_grads=mean(per_sub_batch.clean_grads),
        perturbed_grads=mean(per_sub_batch.perturbed_grads),
        loss=per_sub_batch.loss.mean(),
        aux=per_sub_batch.aux,
        perturbation_state=jax.tree.map(
            lambda x: x.mean(axis=0).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.inexact)
            else x[0],
            per_sub_batch.perturbation_state,
        ),
    )

  return grad_fn

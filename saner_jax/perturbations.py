r"""Ascent directions for sharpness-aware minimisation.

Each function returns an ``optax.GradientTransformation`` whose ``update``
maps the clean-point gradients :math:`g = \nabla L_B(w)` (passed as
``updates``) to the perturbation :math:`\epsilon` that the second gradient is
taken at, :math:`\nabla L_B(w + \epsilon)`. They compose with
:func:`saner_jax.sharpness_aware_grad`, which runs both passes.

Every ``rho`` (and every other float argument marked so) may be an optax
schedule; it is evaluated on the transform's own step count, which counts
calls to ``update``.

All four normalise by the global L2 norm of their direction plus ``1e-12``,
the constant of the authors' code (github lhchau/sam-label-noise), so a zero
gradient yields a zero perturbation, never NaN.

References:
  Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`__, ICLR 2021

  The SANER authors' code, `github.com/lhchau/saner <https://github.com/lhchau/saner>`__
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from saner_jax import _validation

_NORM_EPS = 1e-12


class PerturbationState(NamedTuple):
  """State of the stateless perturbations (SAM, ASAM): the step count only."""

  count: chex.Array


class EmaPerturbationState(NamedTuple):
  """State of Friendly-SAM and VaSSO: step count and a gradient average."""

  count: chex.Array
  average: optax.Updates


def _scaled_to_radius(direction: optax.Updates, rho: jax.Array, scale: optax.Params | None = None) -> optax.Updates:
  r"""Returns :math:`\rho\, s^2 d / (\lVert s d \rVert_2 + 10^{-12})`.

  With ``scale`` None, ``s`` is 1 and this is SAM's normalised ascent.
  The norm is taken in the gradients' dtype promoted to at least float32:
  float16 and bfloat16 norms in float32, float64 ones in float64.
  """
  if scale is None:
    weighted = direction
  else:
    weighted = jax.tree.map(lambda s, d: s * d, scale, direction)
  norm = optax.tree.norm(_validation.widened(weighted))
  factor = rho / (norm + _NORM_EPS)
  if scale is None:
    return jax.tree.map(lambda d: (factor * d).astype(d.dtype), direction)
  return jax.tree.map(lambda s, d: (factor * s * s * d).astype(d.dtype), scale, direction)


def _init_count(params: optax.Params) -> PerturbationState:
  del params
  return PerturbationState(count=jnp.zeros([], jnp.int32))


def sam(rho: optax.ScalarOrSchedule = 0.05) -> optax.GradientTransformation:
  r"""SAM's perturbation: :math:`\epsilon = \rho\, g / \lVert g \rVert_2`.

  Examples:
    The perturbation has length ``rho`` along the gradient:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> grads = {"w": jnp.array([3.0, 4.0])}  # norm 5
    >>> tx = saner_jax.sam(rho=0.5)
    >>> eps, state = tx.update(grads, tx.init(grads))
    >>> print(eps["w"])
    [0.3 0.4]

  Args:
    rho: radius of the neighbourhood, a float >= 0 or a schedule.

  Returns:
    A transformation mapping clean gradients to the perturbation.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`__, ICLR 2021
  """
  _validation.check_scalar_range("rho", rho, 0.0)

  def update_fn(
    updates: optax.Updates, state: PerturbationState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, PerturbationState]:
    del params
    eps = _scaled_to_radius(updates, _validation.resolve(rho, state.count))
    return eps, PerturbationState(optax.safe_increment(state.count))

  return optax.GradientTransformation(_init_count, update_fn)


def asam(rho: optax.ScalarOrSchedule = 0.5, eta: float = 0.0) -> optax.GradientTransformation:
  r"""Adaptive SAM's perturbation, scale-invariant in each weight.

  .. math::
     T_w = |w| + \eta, \qquad
     \epsilon = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2}

  ``eta = 0`` (the default) is the ``adaptive=True`` path of
  the SANER authors' code; the ASAM paper uses ``eta = 0.01``. ASAM radii are
  larger than SAM's (the paper uses 0.5 to 2.0 on CIFAR).

  Examples:
    With ``|w| = (1, 2)`` and ``g = (4, 1.5)``, :math:`T_w g = (4, 3)` has norm 5
    and :math:`T_w^2 g = (4, 6)`:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> grads = {"w": jnp.array([4.0, 1.5])}
    >>> tx = saner_jax.asam(rho=0.5)
    >>> eps, state = tx.update(grads, tx.init(params), params)
    >>> print(eps["w"])
    [0.4 0.6]

  Args:
    rho: radius, a float >= 0 or a schedule.
    eta: offset added to ``|w|``, >= 0.

  Returns:
    A transformation mapping clean gradients (and params, required) to the
    perturbation.

  References:
    Kwon, Kim, Park and Choi, `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`__, ICML 2021
  """
  _validation.check_scalar_range("rho", rho, 0.0)
  _validation.check_scalar_range("eta", eta, 0.0)

  def update_fn(
    updates: optax.Updates, state: PerturbationState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, PerturbationState]:
    if params is None:
      raise ValueError("asam needs params: call update(grads, state, params)")
    _validation.check_same_structure("params", params, updates, "grads")
    scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
    eps = _scaled_to_radius(updates, _validation.resolve(rho, state.count), scale)
    return eps, PerturbationState(optax.safe_increment(state.count))

  return optax.GradientTransformation(_init_count, update_fn)


def _init_average(params: optax.Params) -> EmaPerturbationState:
  return EmaPerturbationState(count=jnp.zeros([], jnp.int32), average=optax.tree.zeros_like(params))


def friendly_sam(
  rho: optax.ScalarOrSchedule = 0.05,
  sigma: optax.ScalarOrSchedule = 1.0,
  lmbda: float = 0.9,
) -> optax.GradientTransformation:
  r"""Friendly-SAM's perturbation: ascend on the gradient minus its trend.

  With :math:`m` an exponential moving average of past clean gradients,

  .. math::
     d_t = g_t - \sigma\, m_{t-1}, \qquad
     m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad
     \epsilon_t = \rho\, d_t / \lVert d_t \rVert_2,

  and on the first step :math:`d_1 = g_1`, :math:`m_1 = g_1`, as in the
  authors' code (optimizer/fsam.py).

  Examples:
    The second step ascends on :math:`g_2 - \sigma m_1 = (3, 8) - (3, 4)`:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> tx = saner_jax.friendly_sam(rho=5.0, sigma=1.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> eps, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> print(eps)
    [3. 4.]
    >>> eps, state = tx.update(jnp.array([3.0, 8.0]), state)
    >>> print(eps)
    [0. 5.]

  Args:
    rho: radius, a float >= 0 or a schedule.
    sigma: weight of the trend removed, a float >= 0 or a schedule.
    lmbda: EMA decay of the trend, in [0, 1].

  Returns:
    A transformation mapping clean gradients to the perturbation.

  References:
    Li, Zhou, Yan and Shen, `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`__, CVPR 2024
  """
  _validation.check_scalar_range("rho", rho, 0.0)
  _validation.check_scalar_range("sigma", sigma, 0.0)
  _validation.check_scalar_range("lmbda", lmbda, 0.0, 1.0)

  def update_fn(
    updates: optax.Updates, state: EmaPerturbationState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, EmaPerturbationState]:
    del params
    first = state.count == 0
    sig = _validation.resolve(sigma, state.count)
    direction = jax.tree.map(lambda g, m: jnp.where(first, g, g - sig * m), updates, state.average)
    average = jax.tree.map(
      lambda g, m: jnp.where(first, g, lmbda * m + (1 - lmbda) * g),
      updates,
      state.average,
    )
    eps = _scaled_to_radius(direction, _validation.resolve(rho, state.count))
    return eps, EmaPerturbationState(optax.safe_increment(state.count), average)

  return optax.GradientTransformation(_init_average, update_fn)


def vasso(rho: optax.ScalarOrSchedule = 0.05, theta: float = 0.2) -> optax.GradientTransformation:
  r"""VaSSO's perturbation: ascend along a variance-suppressed gradient.

  .. math::
     d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \quad d_1 = g_1, \qquad
     \epsilon_t = \rho\, d_t / \lVert d_t \rVert_2

  The first step follows the SANER authors' optimizer/vasso.py.

  Examples:
    With ``theta = 0.5`` the second direction is the mean of both gradients:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> tx = saner_jax.vasso(rho=1.0, theta=0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> eps, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> eps, state = tx.update(jnp.array([-3.0, 12.0]), state)  # d = (0, 8)
    >>> print(eps)
    [0. 1.]

  Args:
    rho: radius, a float >= 0 or a schedule.
    theta: weight of the newest gradient in the average, in [0, 1].

  Returns:
    A transformation mapping clean gradients to the perturbation.

  References:
    Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance Suppression
    <https://arxiv.org/abs/2309.15639>`__, NeurIPS 2023
  """
  _validation.check_scalar_range("rho", rho, 0.0)
  _validation.check_scalar_range("theta", theta, 0.0, 1.0)

  def update_fn(
    updates: optax.Updates, state: EmaPerturbationState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, EmaPerturbationState]:
    del params
    first = state.count == 0
    average = jax.tree.map(
      lambda g, d: jnp.where(first, g, (1 - theta) * d + theta * g),
      updates,
      state.average,
    )
    eps = _scaled_to_radius(average, _validation.resolve(rho, state.count))
    return eps, EmaPerturbationState(optax.safe_increment(state.count), average)

  return optax.GradientTransformation(_init_average, update_fn)

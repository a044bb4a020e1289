r"""When to take the second pass: sharpness-aware steps only where they pay.

A sharpness-aware step costs two forward and backward passes. A *policy*
decides, step by step, whether the second pass runs; on the other steps the
perturbed gradient is the clean one, :math:`g^{SAM}_t = g_t`, and the step
costs one pass, as SGD's does. Wrap a perturbation with :func:`with_policy`
and give it to :func:`saner_jax.sharpness_aware_grad` (on one device or a
mesh) as usual::

  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
  out = grad_fn(params, perturbation.init(params), batch)
  out.sharpness_aware        # whether this step took the second pass

With :math:`s_t \in \{0, 1\}` the policy's choice at step :math:`t`
(counted from 0),

.. math::
   g^{SAM}_t = \begin{cases} \nabla L_B(w_t + \epsilon_t) & s_t = 1 \\
     g_t & s_t = 0. \end{cases}

The policies:

:func:`every_k_steps`
  :math:`s_t = [t \bmod k = 0]`: SAM every :math:`k` steps, the first
  included (MosaicML Composer's ``interval``; LookSAM's :math:`k`, Liu et
  al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
  2022, arXiv 2203.02714).
:func:`random_steps`
  :math:`s_t \sim \mathrm{Bernoulli}(p_t)`, drawn from ``fold_in(key, t)``
  so the draws are reproducible and a resumed run repeats them (RST: Zhao,
  Zhang and Hu, "Randomized Sharpness-Aware Training for Boosting
  Computational Efficiency in Deep Learning", 2022, arXiv 2203.09962).
:func:`adaptive_steps`
  AE-SAM's rule: with :math:`n_t = \lVert g_t \rVert^2` and running
  moments updated first,

  .. math::
     \mu_t = \delta \mu_{t-1} + (1 - \delta)\, n_t, \qquad
     \sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta)(n_t - \mu_t)^2, \qquad
     s_t = [n_t > \mu_t + c\, \sigma_t],

  :math:`\mu_{-1} = \sigma^2_{-1} = 0` (Jiang, Yang, Zhang and Kwok, "An
  Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023,
  arXiv 2304.14647; they use :math:`\delta = 0.9`).

Cost under ``jit``: the choice is a ``lax.cond``, which XLA keeps as a
conditional and runs one branch of, so a skipped step does not compute the
second pass. XLA's cost analysis of a compiled step reports the dearer branch
(that of SAM); the cheap branch's cost shows when the choice is a constant,
as benchmarks/cheap_sam_cost.py measures. Under ``jax.vmap`` with a choice
that differs along the mapped axis (per-example or per-model states), the
cond becomes a ``select`` and both branches run on every step: the result is
right but the cost is SAM's. In the per-device mode of
:func:`saner_jax.sharpness_aware_grad` the choice is made once, from
the mean clean gradient over devices (and over m-sharpness sub-batches), so
every device takes the same branch.

:func:`scale_one_pass_steps` gives the skipped steps' gradients a smaller
weight.

On a skipped step :func:`saner_jax.saner` sees :math:`g^{SAM} = g` (every
coordinate in no group) and passes the clean gradient through; with
``reuse_mask=True`` it applies the mask of the last sharpness-aware step
instead, LookSAM's idea of reusing the last SAM step's information.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from saner_jax import _validation


class SharpnessPolicy(NamedTuple):
  """A rule for when the second pass runs.

  Attributes:
    init: ``() -> state``, the policy's initial state (a NamedTuple of arrays).
    decide: ``(state, squared_norm) -> (take, state)``: ``take`` a boolean
      scalar, True for a sharpness-aware step; ``squared_norm`` is
      :math:`\\lVert g \\rVert^2` of the step's clean gradient, float32.
    uses_norm: whether ``decide`` looks at ``squared_norm`` (the helpers
      compute it, and all-reduce it in the per-device mode, only then).
  """

  init: Callable[[], Any]
  decide: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  uses_norm: bool = False


class CountState(NamedTuple):
  """State of :func:`every_k_steps`: the step count."""

  count: chex.Array


class RandomState(NamedTuple):
  """State of :func:`random_steps`: the step count and the raw key data of the draws."""

  count: chex.Array
  key: chex.Array


class AdaptiveState(NamedTuple):
  """State of :func:`adaptive_steps`: the step count and the running moments of the squared gradient norm."""

  count: chex.Array
  mean: chex.Array
  variance: chex.Array


def _zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def every_k_steps(k: int) -> SharpnessPolicy:
  r"""A sharpness-aware step every ``k`` steps: :math:`s_t = [t \bmod k = 0]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> policy = saner_jax.every_k_steps(3)
    >>> state, taken = policy.init(), []
    >>> for _ in range(7):
    ...   take, state = policy.decide(state, jnp.float32(1.0))
    ...   taken.append(int(take))
    >>> taken
    [1, 0, 0, 1, 0, 0, 1]

  Args:
    k: the interval, an integer >= 1; 1 is every step (plain SAM).
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")

  def decide(state: CountState, squared_norm: jax.Array) -> tuple[jax.Array, CountState]:
    del squared_norm
    return state.count % k == 0, CountState(optax.safe_increment(state.count))

  return SharpnessPolicy(lambda: CountState(_zero_count()), decide)


def random_steps(p: optax.ScalarOrSchedule, key: int | jax.Array = 0) -> SharpnessPolicy:
  r"""A sharpness-aware step with probability ``p``: :math:`s_t \sim \mathrm{Bernoulli}(p_t)`.

  The draw of step :math:`t` is ``uniform(fold_in(key, t)) < p_t``, so it
  depends on the key and the step only: two runs with one key take the same
  steps, and a run resumed from its state continues them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> policy = saner_jax.random_steps(0.5, key=0)
    >>> state, taken = policy.init(), []
    >>> for _ in range(8):
    ...   take, state = policy.decide(state, jnp.float32(1.0))
    ...   taken.append(int(take))
    >>> taken  # the same on every run
    [0, 1, 0, 1, 1, 0, 0, 1]

  Args:
    p: the probability, a float in [0, 1] or an optax schedule of the step
      count; 1 is every step, 0 never.
    key: an integer seed or a JAX PRNG key; its raw data is kept in the
      state, so the state checkpoints as plain arrays.
  """
  _validation.check_scalar_range("p", p, 0.0, 1.0)
  typed = jax.random.key(key) if isinstance(key, int) else key
  if not jnp.issubdtype(typed.dtype, jax.dtypes.prng_key):
    typed = jax.random.wrap_key_data(typed)
  data = jax.random.key_data(typed)
  impl = jax.random.key_impl(typed)

  def decide(state: RandomState, squared_norm: jax.Array) -> tuple[jax.Array, RandomState]:
    del squared_norm
    draw = jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=impl), state.count))
    return draw < _validation.resolve(p, state.count), RandomState(optax.safe_increment(state.count), state.key)

  return SharpnessPolicy(lambda: RandomState(_zero_count(), data), decide)


def adaptive_steps(c: optax.ScalarOrSchedule = 0.0, decay: float = 0.9) -> SharpnessPolicy:
  r"""AE-SAM's rule: a sharpness-aware step when :math:`\lVert g \rVert^2` is large for its running fit.

  .. math::
     \mu_t = \delta \mu_{t-1} + (1 - \delta)\, n_t, \quad
     \sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta)(n_t - \mu_t)^2, \quad
     s_t = [n_t > \mu_t + c\, \sigma_t]

  with :math:`n_t = \lVert g_t \rVert^2` and :math:`\mu_{-1} = \sigma^2_{-1}
  = 0`: the moments take the step's own norm before the test, as in AE-SAM's
  Algorithm 1. A larger ``c`` takes fewer sharpness-aware steps; for normal
  norms, ``c = 0`` takes about half and ``c = 1`` about a sixth.

  Examples:
    Squared norms 1, 1, 1, 4 with :math:`\delta = 0.5`, :math:`c = 1`: step
    0 beats its threshold :math:`0.5 + 0.35`; steps 1 and 2 do not
    (:math:`0.75 + 0.31`, then :math:`0.875 + 0.23`); the jump to 4 does
    (:math:`2.44 + 1.12`):

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> policy = saner_jax.adaptive_steps(c=1.0, decay=0.5)
    >>> state, taken = policy.init(), []
    >>> for n in (1.0, 1.0, 1.0, 4.0):
    ...   take, state = policy.decide(state, jnp.float32(n))
    ...   taken.append(int(take))
    >>> taken
    [1, 0, 0, 1]

  Args:
    c: the threshold in running standard deviations, a float >= 0 or an
      optax schedule of the step count (AE-SAM moves it linearly to hit a
      target share of SAM steps).
    decay: :math:`\delta`, the moments' decay, in [0, 1).
  """
  _validation.check_scalar_range("c", c, 0.0)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay}")

  def init() -> AdaptiveState:
    zero = jnp.zeros([], jnp.float32)
    return AdaptiveState(_zero_count(), zero, zero)

  def decide(state: AdaptiveState, squared_norm: jax.Array) -> tuple[jax.Array, AdaptiveState]:
    n = squared_norm.astype(jnp.float32)
    mean = decay * state.mean + (1 - decay) * n
    variance = decay * state.variance + (1 - decay) * (n - mean) ** 2
    take = n > mean + _validation.resolve(c, state.count) * jnp.sqrt(variance)
    return take, AdaptiveState(optax.safe_increment(state.count), mean, variance)

  return SharpnessPolicy(init, decide, uses_norm=True)


class PolicyState(NamedTuple):
  """State of a :func:`with_policy` perturbation: the perturbation's and the policy's."""

  perturbation: optax.OptState
  policy: Any


class PolicyPerturbation(NamedTuple):
  """A perturbation with a :class:`SharpnessPolicy`; see :func:`with_policy`."""

  init: Callable[[optax.Params], PolicyState]
  update: Callable[..., tuple[optax.Updates, PolicyState]]
  perturbation: optax.GradientTransformation
  policy: SharpnessPolicy


def with_policy(perturbation: optax.GradientTransformation, policy: SharpnessPolicy) -> PolicyPerturbation:
  """``perturbation`` whose second pass runs only on the steps ``policy`` chooses.

  Pass the result to :func:`saner_jax.sharpness_aware_grad` in place of the
  perturbation; its ``init(params)`` holds both states (a
  :class:`PolicyState`). The helpers then return the clean gradient as
  ``perturbed_grads`` on skipped steps, and ``sharpness_aware`` says which
  steps were not skipped. The perturbation's own state advances on every
  step (its update is cheap next to a pass), so its schedules and averages
  follow the step count. Its ``update`` alone is the perturbation's, with
  the policy's state passed through, for code that forms a perturbation
  outside the helpers (the analysis probes).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> def loss_fn(params, batch):
    ...   return 0.5 * jnp.sum(params ** 2) * batch.mean()
    >>> perturbation = saner_jax.with_policy(saner_jax.sam(0.5), saner_jax.every_k_steps(2))
    >>> grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
    >>> params, state = jnp.array([3.0, 4.0]), perturbation.init(jnp.zeros(2))
    >>> out = grad_fn(params, state, jnp.ones(4))
    >>> print(out.sharpness_aware, out.perturbed_grads)
    True [3.3 4.4]
    >>> out = grad_fn(params, out.perturbation_state, jnp.ones(4))
    >>> print(out.sharpness_aware, out.perturbed_grads)
    False [3. 4.]
  """
  if not isinstance(policy, SharpnessPolicy):
    raise TypeError(f"policy must be a SharpnessPolicy such as saner_jax.every_k_steps(2), got {type(policy).__name__}")

  def init_fn(params: optax.Params) -> PolicyState:
    return PolicyState(perturbation.init(params), policy.init())

  def update_fn(
    updates: optax.Updates, state: PolicyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, PolicyState]:
    eps, inner = perturbation.update(updates, state.perturbation, params)
    return eps, PolicyState(inner, state.policy)

  return PolicyPerturbation(init_fn, update_fn, perturbation, policy)


class ScaleOnePassState(NamedTuple):
  """State of :func:`scale_one_pass_steps`: the step count its schedule is evaluated on."""

  count: chex.Array


def scale_one_pass_steps(factor: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Scales the updates of the steps a policy skipped by ``factor``; the others pass unchanged.

  With :math:`s_t` the policy's choice (``sharpness_aware``, see
  :func:`with_policy`) and :math:`f_t` the factor at step :math:`t`,

  .. math::
     u_t \mapsto \begin{cases} u_t & s_t = 1 \\ f_t\, u_t & s_t = 0. \end{cases}

  Placed before the base optimizer (and before weight decay), a one-pass
  step's gradient then counts :math:`f_t` times: with plain SGD the step is
  :math:`f_t` times the learning rate's; with momentum the gradient enters the
  buffer at weight :math:`f_t`, so its effect over all later steps is
  :math:`f_t` times, while the momentum carried from earlier steps is not
  scaled. The cheap policies' one-pass steps are plain gradient steps, and
  under label noise a plain step at the learning rate tuned for the
  sharpness-aware steps is where wrong labels are fitted. ``factor`` 1 is
  the identity.

  Examples:
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> tx = saner_jax.policies.scale_one_pass_steps(0.25)
    >>> g = {"w": jnp.array([4.0, -8.0])}
    >>> state = tx.init(g)
    >>> print(tx.update(g, state, sharpness_aware=jnp.array(True))[0]["w"])
    [ 4. -8.]
    >>> print(tx.update(g, state, sharpness_aware=jnp.array(False))[0]["w"])
    [ 1. -2.]

  Args:
    factor: the weight of a one-pass step's update, in (0, 1]; a float or an
      optax schedule of the step count.

  Returns:
    A transform whose ``update(updates, state, params=None, *,
    sharpness_aware=True)`` takes the helper's
    :attr:`saner_jax.SharpnessAwareGrads.sharpness_aware`; chain it after
    :func:`saner_jax.saner` and before the base optimizer.

  This is saner_jax's own addition to the policies, not a published method:
  the papers cited in :mod:`saner_jax.policies` take the steps between two
  sharpness-aware steps at the full learning rate.
  """
  _validation.check_scalar_range("factor", factor, 0.0, 1.0)
  first = factor(0) if callable(factor) else factor
  if not isinstance(first, jax.core.Tracer) and float(first) == 0.0:
    where = " (the schedule's value at step 0)" if callable(factor) else ""
    raise ValueError(
      f"factor must be in (0, 1], got 0{where}: the one-pass gradients would not count; use a policy that takes "
      "fewer steps, or a factor above 0"
    )

  def init_fn(params: optax.Params) -> ScaleOnePassState:
    del params
    return ScaleOnePassState(count=jnp.zeros([], jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: ScaleOnePassState,
    params: optax.Params | None = None,
    *,
    sharpness_aware: Any = True,
    **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleOnePassState]:
    del params, extra_args
    scale = jnp.where(sharpness_aware, 1.0, _validation.resolve(factor, state.count))
    scaled = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
    return scaled, ScaleOnePassState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

r"""SANER's reweighting and GSAM's decomposition, as extra-args transforms.

Both take the perturbed-point gradients :math:`g^{SAM} = \nabla L_B(w +
\epsilon)` as ``updates`` and the clean-point gradients :math:`g = \nabla
L_B(w)` as the keyword argument ``clean_grads``, so they chain in front of
any optax optimizer::

  tx = optax.chain(
      saner_jax.saner(alpha=0.5),
      optax.add_decayed_weights(5e-4),
      optax.sgd(0.1, momentum=0.9),
  )
  updates, opt_state = tx.update(g_sam, opt_state, params, clean_grads=g)

References:
  Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
  Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026

  Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
  <https://arxiv.org/abs/2203.08065>`__, ICLR 2022
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal, NamedTuple, cast

import chex
import jax
import jax.numpy as jnp
import optax

from saner_jax import _validation

Group = Literal["A", "B", "C"]
GROUPS: tuple[str, ...] = ("A", "B", "C")


def _check_group(group: str) -> None:
  if group not in GROUPS:
    raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")


def group_mask(perturbed: jax.Array, clean: jax.Array, group: Group) -> jax.Array:
  r"""Boolean mask of the coordinates of one group, decided sign-safely.

  With :math:`r = g^{SAM} / g` element-wise:

  ====== ===================== ===========================================
  group  ratio                 test used here (no division, no product)
  ====== ===================== ===========================================
  A      :math:`r > 1`         same strict sign, :math:`|g^{SAM}| > |g|`
  B      :math:`0 < r < 1`     same strict sign, :math:`|g^{SAM}| < |g|`
  C      :math:`r < 0`         strictly opposite signs
  ====== ===================== ===========================================

  A coordinate where either gradient is zero, or where both are equal, is in
  no group. NaN compares false, so a NaN coordinate is in no group either.
  The authors' code divides by ``g + 1e-8``, which puts a tiny negative ``g``
  on the wrong side; comparing signs cannot. Signs are compared directly
  rather than through the product :math:`g^{SAM} g`, which underflows to zero
  for small float16 gradients (``1e-4 * 5e-5``) or tiny float32 ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> g_sam = jnp.array([0.5, 2.0, -1.0, 0.0])  # ratios 0.5, 2, -1, 0
    >>> g = jnp.ones(4)
    >>> print(saner_jax.group_mask(g_sam, g, "B"))
    [ True False False False]
    >>> print(saner_jax.group_mask(g_sam, g, "C"))
    [False False  True False]

  References:
    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026

    The SANER authors' code, `github.com/lhchau/saner <https://github.com/lhchau/saner>`__
  """
  _check_group(group)
  both_positive = (perturbed > 0) & (clean > 0)
  both_negative = (perturbed < 0) & (clean < 0)
  if group == "A":
    return (both_positive | both_negative) & (jnp.abs(perturbed) > jnp.abs(clean))
  if group == "B":
    return (both_positive | both_negative) & (jnp.abs(perturbed) < jnp.abs(clean))
  return ((perturbed > 0) & (clean < 0)) | ((perturbed < 0) & (clean > 0))


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _require_clean_grads(name: str, updates: optax.Updates, clean_grads: optax.Updates | None) -> optax.Updates:
  """``clean_grads`` masked like ``updates``, after checking that they match.

  Inside ``optax.masked`` and ``optax.multi_transform`` the updates arrive
  with ``optax.MaskedNode`` in place of the parameters (or whole subtrees)
  left out. With ``mask_compatible_extra_args=True`` optax masks
  ``clean_grads`` the same way itself and this only checks them; with
  optax's default (False) they pass through whole, and masking them here
  keeps ``optax.masked(saner(...), mask)`` working as written.
  """
  if clean_grads is None:
    raise ValueError(
      f"{name} needs the clean-point gradients: call tx.update(perturbed_grads, state, params, clean_grads=clean_grads)"
    )
  clean_def: Any = jax.tree.structure(clean_grads)
  if clean_def != jax.tree.structure(updates):
    with contextlib.suppress(ValueError):  # not a masked copy: the check below names the mismatch
      clean_grads = jax.tree.map(lambda u, g: u if _is_masked(u) else g, updates, clean_grads, is_leaf=_is_masked)
  _validation.check_same_structure("clean_grads", clean_grads, updates)
  return clean_grads


class SanerState(NamedTuple):
  """State of :func:`saner`: the step count that ``alpha`` is evaluated on.

  With ``reuse_mask=True``, ``mask`` holds the group mask of the last
  sharpness-aware step (booleans shaped like the parameters); None otherwise.
  """

  count: chex.Array
  mask: Any = None


def saner(
  alpha: optax.ScalarOrSchedule = 0.5, group: Group = "B", *, reuse_mask: bool = False
) -> optax.GradientTransformationExtraArgs:
  r"""SANER: down-weight the coordinates that SAM shrinks without flipping.

  .. math::
     d_i = \begin{cases}
       \alpha\, g^{SAM}_i & \text{if } 0 < g^{SAM}_i / g_i < 1
         \text{ (group B)} \\
       g^{SAM}_i & \text{otherwise}
     \end{cases}

  Group-B coordinates are those where the perturbation shrank the gradient,
  which the paper ties to the fitting of noisy labels; scaling them by
  ``alpha < 1`` slows memorisation. ``alpha = 1`` is exactly SAM.

  The authors apply weight decay after the reweighting; chain
  ``optax.add_decayed_weights`` after this transform to do the same. They warm
  alpha up from 1 over the first epochs: pass :func:`alpha_warmup`.

  Examples:
    Only the first coordinate is in group B (ratio 0.5); A, C and the zero
    pass through:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import saner_jax
    >>> g_sam = jnp.array([0.5, 2.0, -1.0, 0.0])
    >>> g = jnp.ones(4)
    >>> tx = saner_jax.saner(alpha=0.5)
    >>> updates, state = tx.update(g_sam, tx.init(g_sam), clean_grads=g)
    >>> print(updates)
    [ 0.25  2.   -1.    0.  ]

    In a chain, the extra argument reaches it through ``update``:

    >>> tx = optax.chain(saner_jax.saner(0.5), optax.sgd(learning_rate=1.0))
    >>> updates, state = tx.update(g_sam, tx.init(g_sam), clean_grads=g)
    >>> print(updates)
    [-0.25 -2.    1.   -0.  ]

  On the steps a :func:`saner_jax.with_policy` perturbation skips, the
  helpers return :math:`g^{SAM} = g`: every coordinate is then in no group
  and the clean gradient passes through unchanged. With ``reuse_mask=True``
  and ``sharpness_aware=False`` passed to ``update``, the mask :math:`M` of
  the last sharpness-aware step is applied instead,
  :math:`d_i = \alpha g_i` for :math:`i \in M`, else :math:`g_i`, in the
  spirit of LookSAM's reuse of the last SAM step's information (Liu et al.,
  CVPR 2022). Before the first sharpness-aware step the mask is empty.

  Reusing the mask between sharpness-aware steps:

    >>> tx = saner_jax.saner(0.5, reuse_mask=True)
    >>> state = tx.init(g)
    >>> d, state = tx.update(g_sam, state, clean_grads=g, sharpness_aware=True)
    >>> d, state = tx.update(g, state, clean_grads=g, sharpness_aware=False)
    >>> print(d)
    [0.5 1.  1.  1. ]

  Args:
    alpha: factor for the chosen group, a float or a schedule evaluated on
      this transform's step count. For group B it must lie in [0, 1]; for the
      ablation groups A and C any alpha >= 0 is allowed (alpha > 1 amplifies).
    group: "B" (SANER), or "A" / "C" for the paper's ablations.
    reuse_mask: keep the mask of the last sharpness-aware step in the state
      and apply it on skipped steps (one boolean per parameter of memory).

  Returns:
    A transform whose ``update(updates, state, params=None, *, clean_grads,
    sharpness_aware=True)`` reweights ``updates`` (the perturbed-point
    gradients); ``sharpness_aware`` is the helper's
    :attr:`saner_jax.SharpnessAwareGrads.sharpness_aware`. A NaN in either
    gradient puts its coordinate in no group, so the perturbed gradient passes
    through unchanged there (an inf compares like a large number); use
    :func:`saner_jax.diagnostics.gradient_diagnostics` to detect it, or wrap
    the chain in ``optax.apply_if_finite``, which forwards ``clean_grads``
    (optax 0.2.8) and skips the step when the perturbed gradients are not
    finite. It does not look at ``clean_grads``: a NaN there alone leaves the
    step, and that coordinate's perturbed gradient, as they are.

  References:
    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026

    The SANER authors' code, `github.com/lhchau/saner <https://github.com/lhchau/saner>`__
  """
  _check_group(group)
  _validation.check_scalar_range("alpha", alpha, 0.0, 1.0 if group == "B" else float("inf"))

  if not isinstance(reuse_mask, bool):
    raise TypeError(f"reuse_mask must be True or False, got {reuse_mask!r}")

  def init_fn(params: optax.Params) -> SanerState:
    mask = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), params) if reuse_mask else None
    return SanerState(count=jnp.zeros([], jnp.int32), mask=mask)

  def update_fn(
    updates: optax.Updates,
    state: SanerState,
    params: optax.Params | None = None,
    *,
    clean_grads: optax.Updates | None = None,
    sharpness_aware: Any = True,
    **extra_args: Any,
  ) -> tuple[optax.Updates, SanerState]:
    del params, extra_args
    clean_grads = _require_clean_grads("saner", updates, clean_grads)
    factor = _validation.resolve(alpha, state.count)
    masks = jax.tree.map(lambda u, g: group_mask(u, g, group), updates, clean_grads)
    if reuse_mask:
      masks = jax.tree.map(lambda fresh, last: jnp.where(sharpness_aware, fresh, last), masks, state.mask)
    reweighted = jax.tree.map(lambda u, m: jnp.where(m, factor * u, u).astype(u.dtype), updates, masks)
    return reweighted, SanerState(optax.safe_increment(state.count), masks if reuse_mask else None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_groups(groups: str, outside: bool) -> tuple[Group, ...]:
  if not isinstance(groups, str):
    raise TypeError(f"groups must be a string of letters from 'ABC' such as 'B' or 'AB', got {groups!r}")
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(
      f"unknown group letter(s) {unknown} in groups={groups!r}; use letters from 'ABC', e.g. 'B' or 'AB'"
    )
  if outside and not groups:
    raise ValueError("outside=True with empty groups gives the clean gradient everywhere (SGD); name a group, e.g. 'B'")
  return cast("tuple[Group, ...]", tuple(sorted(set(groups))))


def substitute_groups(groups: str, *, outside: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""The paper's mechanism ablations: the clean gradient on chosen groups.

  With :math:`G` the union of the named groups (sign-safe :func:`group_mask`
  between :math:`g^{SAM}` and :math:`g`),

  .. math::
     d_i = \begin{cases} g_i & i \in G \\ g^{SAM}_i & \text{otherwise}
       \end{cases}
     \qquad\text{or, with } \texttt{outside=True},\qquad
     d_i = \begin{cases} g^{SAM}_i & i \in G \\ g_i & \text{otherwise.}
       \end{cases}

  The first is the SANER authors' ``SAMWO`` (optimizer/samwo.py), which the
  paper calls SGD-GrX: SAM, except that group X is given SGD's gradient;
  ``groups="AB"`` is their ``ratio > 0``. The second is their ``SAMONLY``
  (optimizer/samonly.py): SAM's gradient on group X only, and the clean
  gradient everywhere else, including the coordinates in no group: the
  paper's Figures 2-4.

  Where the two gradients are equal the choice does not matter; where one is
  zero the coordinate is in no group, and the authors' ``g + 1e-8`` ratio may
  place it differently (see :func:`group_mask`).

  Examples:
    Group B (``0 < g_sam / g < 1``) is the middle coordinate:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> g_sam, g = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, 1.0, 2.0])
    >>> tx = saner_jax.substitute_groups("B")
    >>> print(tx.update(g_sam, tx.init(g), clean_grads=g)[0])
    [ 2.  1. -1.]
    >>> tx = saner_jax.substitute_groups("B", outside=True)
    >>> print(tx.update(g_sam, tx.init(g), clean_grads=g)[0])
    [1.  0.5 2. ]

  Args:
    groups: letters from "ABC", e.g. "B" or "AB"; "" (with ``outside=False``)
      substitutes nothing, which is SAM.
    outside: substitute every coordinate NOT in ``groups`` instead.

  Returns:
    A stateless transform whose ``update(perturbed_grads, state, params=None,
    *, clean_grads)`` returns ``d``; chain weight decay and the base optimizer
    after it, as for :func:`saner`.

  References:
    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026

    The SANER authors' code, `github.com/lhchau/saner <https://github.com/lhchau/saner>`__
  """
  chosen = _check_groups(groups, outside)

  def in_groups(u: jax.Array, g: jax.Array) -> jax.Array:
    return functools.reduce(jnp.logical_or, (group_mask(u, g, x) for x in chosen), jnp.zeros(jnp.shape(u), bool))

  def update_fn(
    updates: optax.Updates,
    state: optax.EmptyState,
    params: optax.Params | None = None,
    *,
    clean_grads: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del params, extra_args
    clean_grads = _require_clean_grads("substitute_groups", updates, clean_grads)

    def pick(u: jax.Array, g: jax.Array) -> jax.Array:
      take_clean = ~in_groups(u, g) if outside else in_groups(u, g)
      return jnp.where(take_clean, g.astype(u.dtype), u)

    return jax.tree.map(pick, updates, clean_grads), state

  def init_fn(params: optax.Params) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alpha_warmup(alpha: float, warmup_steps: int, steps_per_epoch: int | None = None) -> optax.Schedule:
  r"""The authors' warm-up: alpha falls linearly from 1 to its target.

  .. math::
     \alpha_t = 1 - (1 - \alpha)\, \min(t / k, 1)

  ``t`` is the step count, from 0, as in optax's schedules. With
  ``steps_per_epoch`` given, alpha changes once per epoch, as the authors'
  ``get_alpha`` does, and follows their epoch numbering: their loop calls
  ``get_alpha(e)`` in epoch ``e = 1, 2, ...``, so every step of an epoch
  uses the ramp's value at that epoch's end, ``t`` rounded up to the next
  multiple of ``steps_per_epoch``. The first epoch already uses
  ``1 - (1 - alpha) / K`` (``K = warmup_steps / steps_per_epoch``, which
  should be whole) and epoch ``K`` the target. This schedule is the one
  place that numbering lives; the trainer's ``--alpha_warmup_epochs`` uses
  it as it is. ``warmup_steps = 0`` is the constant ``alpha``. Once the ramp
  ends the schedule returns ``alpha`` itself, not the rounded
  ``1 - (1 - alpha)``.

  Examples:
    >>> import saner_jax
    >>> schedule = saner_jax.alpha_warmup(0.5, warmup_steps=4)
    >>> [float(schedule(t)) for t in range(6)]
    [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]

    Three epochs of two steps, numbered like the authors' (epoch 1 uses
    ``get_alpha(1) = 1 - 0.75 / 3``):

    >>> per_epoch = saner_jax.alpha_warmup(0.25, warmup_steps=6, steps_per_epoch=2)
    >>> [float(per_epoch(t)) for t in range(8)]
    [0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]

  Args:
    alpha: target factor in [0, 1].
    warmup_steps: ``k``, the steps until the target is reached, >= 0.
    steps_per_epoch: optional epoch length for the staircase version.

  Returns:
    An optax schedule.

  References:
    The SANER authors' code, `github.com/lhchau/saner <https://github.com/lhchau/saner>`__ (``get_alpha``)

    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026
  """
  _validation.check_scalar_range("alpha", alpha, 0.0, 1.0)
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if steps_per_epoch is not None and steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
  if warmup_steps == 0:
    return optax.constant_schedule(alpha)

  def schedule(count: chex.Numeric) -> jax.Array:
    step = jnp.asarray(count)
    if steps_per_epoch is not None:  # the epoch's end, in the count's own (integer) type: exact
      step = (jnp.floor_divide(step, steps_per_epoch) + 1) * steps_per_epoch
    step = step.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64
    progress = jnp.minimum(step / warmup_steps, 1.0)
    return jnp.where(progress >= 1.0, alpha, 1.0 - (1.0 - alpha) * progress)

  return schedule


class GsamState(NamedTuple):
  """State of :func:`gsam`: the step count that ``alpha`` is evaluated on."""

  count: chex.Array


def gsam(alpha: optax.ScalarOrSchedule = 0.01) -> optax.GradientTransformationExtraArgs:
  r"""GSAM's surrogate-gap step: remove part of g orthogonal to g_sam.

  .. math::
     g_\perp = g - \frac{\langle g, g^{SAM} \rangle}
       {\lVert g \rVert \lVert g^{SAM} \rVert}
       \frac{\lVert g \rVert\, g^{SAM}}{\lVert g^{SAM} \rVert}, \qquad
     d = g^{SAM} - \alpha\, g_\perp

  The ``1e-12`` guards follow the SANER authors' optimizer/gsam.py. Chain it
  before :func:`saner` for their GSANER: the SANER mask is then taken between ``d`` and ``g``.

  Norms and the inner product are taken in the gradients' dtype promoted to
  at least float32 (float64 stays float64).

  Examples:
    With ``g = (1, 0)`` and ``g_sam = (1, 1)`` the part of ``g`` orthogonal
    to ``g_sam`` is ``(0.5, -0.5)``:

    >>> import jax.numpy as jnp
    >>> import saner_jax
    >>> tx = saner_jax.gsam(alpha=1.0)
    >>> g_sam, g = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0])
    >>> updates, state = tx.update(g_sam, tx.init(g), clean_grads=g)
    >>> print(updates)
    [0.5 1.5]

  Args:
    alpha: weight of the orthogonal part, a float >= 0 or a schedule.

  Returns:
    A transform whose ``update(updates, state, params=None, *, clean_grads)``
    takes the perturbed-point gradients as ``updates``.

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`__, ICLR 2022

    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026 (GSANER, Table 4)
  """
  _validation.check_scalar_range("alpha", alpha, 0.0)

  def init_fn(params: optax.Params) -> GsamState:
    del params
    return GsamState(count=jnp.zeros([], jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: GsamState,
    params: optax.Params | None = None,
    *,
    clean_grads: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, GsamState]:
    del params, extra_args
    clean_grads = _require_clean_grads("gsam", updates, clean_grads)
    wide_clean, wide_perturbed = _validation.widened(clean_grads), _validation.widened(updates)
    clean_norm = optax.tree.norm(wide_clean)
    perturbed_norm = optax.tree.norm(wide_perturbed)
    inner = optax.tree.vdot(wide_clean, wide_perturbed)
    cosine = inner / (clean_norm * perturbed_norm + 1e-12)
    parallel = cosine * clean_norm / (perturbed_norm + 1e-12)
    weight = _validation.resolve(alpha, state.count)
    decomposed = jax.tree.map(
      lambda u, g: (u - weight * (g - parallel * u)).astype(u.dtype),
      updates,
      clean_grads,
    )
    return decomposed, GsamState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

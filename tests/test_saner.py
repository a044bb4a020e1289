"""Tests of saner_jax.saner: group masks, SANER, alpha warm-up and GSAM.

Numerical tests run both under ``jax.jit`` and eagerly (the ``variant``
parametrisation, the pytest form of ``chex.variants(with_jit, without_jit)``).
Expected values are written out literally or computed with numpy in float64.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import saner_jax
from saner_jax import alpha_warmup, group_mask, gsam, saner


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])

# ---------------------------------------------------------------------------
# The hand-worked group example.
#
#  idx  g_sam    g       r = g_sam/g    group  why
#   0    2.0     1.0        2            A     same sign, amplified
#   1    0.5     1.0        0.5          B     same sign, shrunk
#   2   -0.5    -1.0        0.5          B     negative, shrunk
#   3   -3.0    -1.0        3            A     negative, amplified
#   4   -1.0     2.0       -0.5          C     flipped
#   5    1.0    -2.0       -0.5          C     flipped
#   6    1.0     0.0        -            -     zero clean gradient
#   7    0.0     1.0        0            -     zero perturbed gradient
#   8    0.0     0.0        -            -     both zero
#   9    1.5     1.5        1            -     equal
#  10   -1.5    -1.5        1            -     equal, negative
#  11   -2e-9   -5e-9       0.4          B     tiny negative g (authors: C)
#  12    1e-9   -5e-9      -0.2          C     tiny negative g (authors: B)
#  13   -4e-8   -2e-8       2            A     small negative g, both agree
#  14    0.5    -1e-9      -5e8          C     tiny negative g (authors: A)
# ---------------------------------------------------------------------------
PERTURBED = np.array(
  [2.0, 0.5, -0.5, -3.0, -1.0, 1.0, 1.0, 0.0, 0.0, 1.5, -1.5, -2e-9, 1e-9, -4e-8, 0.5],
  np.float32,
)
CLEAN = np.array(
  [1.0, 1.0, -1.0, -1.0, 2.0, -2.0, 0.0, 1.0, 0.0, 1.5, -1.5, -5e-9, -5e-9, -2e-8, -1e-9],
  np.float32,
)
EXPECTED_MASKS = {
  "A": np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], bool),
  "B": np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], bool),
  "C": np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1], bool),
}


def _authors_masks(perturbed, clean):
  """The reference code's rule, ``ratio = g_sam / (g + 1e-8)``, in float64."""
  ratio = np.asarray(perturbed, np.float64) / (np.asarray(clean, np.float64) + 1e-8)
  return {"A": ratio > 1, "B": (ratio > 0) & (ratio < 1), "C": ratio < 0}


def _np_group_b(perturbed, clean):
  """Independent float64 reference of group B through the ratio (g != 0)."""
  perturbed = np.asarray(perturbed, np.float64)
  clean = np.asarray(clean, np.float64)
  safe = np.where(clean == 0, 1.0, clean)
  ratio = perturbed / safe
  return (clean != 0) & (ratio > 0) & (ratio < 1)


@VARIANTS
@pytest.mark.parametrize("group", ["A", "B", "C"])
def test_group_mask_hand_example(variant, group):
  mask = variant(lambda p, c: group_mask(p, c, group))(PERTURBED, CLEAN)
  np.testing.assert_array_equal(np.asarray(mask), EXPECTED_MASKS[group])


def test_hand_example_is_where_the_authors_rule_goes_wrong():
  # The example must contain the cases the sign-safe test exists for: the
  # authors' g + 1e-8 misplaces coordinates 11, 12 and 14 (and 6).
  authors = _authors_masks(PERTURBED, CLEAN)
  assert authors["C"][11] and not EXPECTED_MASKS["C"][11]
  assert authors["B"][12] and not EXPECTED_MASKS["B"][12]
  assert authors["A"][14] and not EXPECTED_MASKS["A"][14]
  agree = np.ones(len(CLEAN), bool)
  agree[[6, 9, 10, 11, 12, 14]] = False
  for group in "ABC":
    np.testing.assert_array_equal(authors[group][agree], EXPECTED_MASKS[group][agree])


@pytest.mark.parametrize(
  "dtype, perturbed, clean",
  [
    # products 5e-9 (float16) and 5e-51 (float32) underflow to zero, so a
    # test through g_sam * g > 0 would put these in no group.
    (jnp.float16, [5e-5, -5e-5, 2e-4, -5e-5], [1e-4, -1e-4, 1e-4, 1e-4]),
    (jnp.bfloat16, [5e-26, -5e-26, 2e-25, -5e-26], [1e-25, -1e-25, 1e-25, 1e-25]),
    (jnp.float32, [5e-26, -5e-26, 2e-25, -5e-26], [1e-25, -1e-25, 1e-25, 1e-25]),
  ],
)
def test_group_mask_does_not_underflow(dtype, perturbed, clean):
  p = jnp.asarray(perturbed, dtype)
  c = jnp.asarray(clean, dtype)
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "B")), [1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "A")), [0, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "C")), [0, 0, 0, 1])


def test_group_mask_nan_and_inf_in_no_group_except_by_sign():
  p = jnp.array([jnp.nan, 1.0, jnp.inf, 0.5, -jnp.inf])
  c = jnp.array([1.0, jnp.nan, 1.0, jnp.inf, 1.0])
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "A")), [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "B")), [0, 0, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(group_mask(p, c, "C")), [0, 0, 0, 0, 1])


def test_group_mask_unknown_group():
  with pytest.raises(ValueError, match=r"unknown group 'b'; expected one of \('A', 'B', 'C'\)"):
    group_mask(jnp.ones(2), jnp.ones(2), "b")


# --------------------------------------------------------------- saner alone


@VARIANTS
def test_saner_hand_example(variant):
  tx = saner(0.5)
  state = tx.init({"g": CLEAN})
  out, state = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))({"g": PERTURBED}, state, {"g": CLEAN})
  expected = np.array(
    [2.0, 0.25, -0.25, -3.0, -1.0, 1.0, 1.0, 0.0, 0.0, 1.5, -1.5, -1e-9, 1e-9, -4e-8, 0.5],
    np.float32,
  )
  np.testing.assert_array_equal(np.asarray(out["g"]), expected)
  assert int(state.count) == 1


@VARIANTS
@pytest.mark.parametrize(
  "group, expected",
  [
    # alpha = 2 amplifies the ablation group; everything else unchanged.
    ("A", [4.0, 0.5, -0.5, -6.0, -1.0, 1.0, 1.0, 0.0, 0.0, 1.5, -1.5, -2e-9, 1e-9, -8e-8, 0.5]),
    ("C", [2.0, 0.5, -0.5, -3.0, -2.0, 2.0, 1.0, 0.0, 0.0, 1.5, -1.5, -2e-9, 2e-9, -4e-8, 1.0]),
  ],
)
def test_saner_ablation_groups_allow_alpha_above_one(variant, group, expected):
  tx = saner(2.0, group=group)
  out, _ = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))(PERTURBED, tx.init(CLEAN), CLEAN)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected, np.float32))


def test_saner_keeps_dtype():
  tx = saner(0.5)
  p = jnp.array([0.5, 2.0], jnp.bfloat16)
  c = jnp.array([1.0, 1.0], jnp.bfloat16)
  out, _ = tx.update(p, tx.init(c), clean_grads=c)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), [0.25, 2.0])


# --------------------------------------------------------------- in chains


def _random_steps(n_steps, seed=0):
  """Params and (perturbed, clean) gradient pairs on a small dict pytree."""
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  steps = []
  for _ in range(n_steps):
    clean = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    perturbed = {k: (v + 0.7 * rng.normal(size=v.shape)).astype(np.float32) for k, v in clean.items()}
    steps.append((perturbed, clean))
  return params, steps


def _run_chain(tx, params, steps, variant, with_clean=True):
  state = tx.init(params)
  if with_clean:
    update = variant(lambda u, s, p, c: tx.update(u, s, p, clean_grads=c))
  else:
    update = variant(lambda u, s, p, c: tx.update(u, s, p))
  trajectory = []
  for perturbed, clean in steps:
    updates, state = update(perturbed, state, params, clean)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory


@VARIANTS
def test_alpha_one_is_sam_exactly(variant):
  params, steps = _random_steps(4)
  # The data exercise group B, so alpha = 1 is a real claim.
  for perturbed, clean in steps:
    assert _np_group_b(perturbed["w"], clean["w"]).any()
  with_saner = optax.chain(saner(1.0), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  without = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  got = _run_chain(with_saner, params, steps, variant)
  want = _run_chain(without, params, steps, variant, with_clean=False)
  for a, b in zip(got, want):
    chex.assert_trees_all_equal(a, b)
  # ...while alpha = 0.5 moves elsewhere on the same data.
  half = optax.chain(saner(0.5), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  other = _run_chain(half, params, steps, variant)
  assert not np.allclose(other[-1]["w"], want[-1]["w"])


@VARIANTS
def test_chain_with_sgd_momentum_matches_hand_computation(variant):
  alpha, wd, lr, mu = 0.5, 5e-4, 0.1, 0.9
  params, steps = _random_steps(3, seed=1)
  tx = optax.chain(saner(alpha), optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu))
  got = _run_chain(tx, params, steps, variant)

  p = {k: v.astype(np.float64) for k, v in params.items()}
  trace = {k: np.zeros_like(v) for k, v in p.items()}
  for t, (perturbed, clean) in enumerate(steps):
    for k in p:
      d = np.where(_np_group_b(perturbed[k], clean[k]), alpha * perturbed[k], perturbed[k])
      d = d + wd * p[k]  # weight decay after the reweighting, as the authors
      trace[k] = mu * trace[k] + d
      p[k] = p[k] - lr * trace[k]
    for k in p:
      np.testing.assert_allclose(got[t][k], p[k], rtol=1e-5, atol=1e-6)


@VARIANTS
def test_chain_with_adamw_matches_hand_computation(variant):
  alpha, lr, b1, b2, eps, wd = 0.25, 1e-2, 0.9, 0.999, 1e-8, 1e-2
  params, steps = _random_steps(3, seed=2)
  tx = optax.chain(saner(alpha), optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  got = _run_chain(tx, params, steps, variant)

  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (perturbed, clean) in enumerate(steps, start=1):
    for k in p:
      d = np.where(_np_group_b(perturbed[k], clean[k]), alpha * perturbed[k], perturbed[k])
      m[k] = b1 * m[k] + (1 - b1) * d
      v[k] = b2 * v[k] + (1 - b2) * d * d
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
    for k in p:
      np.testing.assert_allclose(got[t - 1][k], p[k], rtol=1e-5, atol=1e-6)


@VARIANTS
def test_alpha_schedule_on_own_step_count(variant):
  # alpha_warmup(0.5, 2): steps 0, 1, 2, 3 use 1.0, 0.75, 0.5, 0.5.
  tx = saner(alpha_warmup(0.5, 2))
  update = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))
  p = jnp.array([0.5, 2.0, -0.5])
  c = jnp.array([1.0, 1.0, -1.0])
  state = tx.init(c)
  for factor in [1.0, 0.75, 0.5, 0.5]:
    out, state = update(p, state, c)
    np.testing.assert_allclose(np.asarray(out), [0.5 * factor, 2.0, -0.5 * factor], rtol=1e-6)


@VARIANTS
def test_inject_hyperparams_forwards_clean_grads(variant):
  tx = optax.chain(optax.inject_hyperparams(saner)(alpha=0.5), optax.sgd(1.0))
  params, steps = _random_steps(1, seed=3)
  perturbed, clean = steps[0]
  update = variant(lambda u, s, p, c: tx.update(u, s, p, clean_grads=c))
  state = tx.init(params)
  for alpha in [0.5, 0.25]:
    state[0].hyperparams["alpha"] = jnp.asarray(alpha)
    updates, state = update(perturbed, state, params, clean)
    for k in params:
      expected = -np.where(_np_group_b(perturbed[k], clean[k]), alpha * perturbed[k], perturbed[k])
      np.testing.assert_allclose(updates[k], expected, rtol=1e-6)
      assert not np.allclose(updates[k], -perturbed[k])


@VARIANTS
def test_inject_hyperparams_with_schedule(variant):
  tx = optax.inject_hyperparams(saner)(alpha=alpha_warmup(0.2, 4))
  p = jnp.array([0.5, 2.0])
  c = jnp.array([1.0, 1.0])
  state = tx.init(c)
  update = variant(lambda u, s, p_, c_: tx.update(u, s, p_, clean_grads=c_))
  for factor in [1.0, 0.8, 0.6, 0.4, 0.2, 0.2]:
    out, state = update(p, state, c, c)
    np.testing.assert_allclose(float(state.hyperparams["alpha"]), factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), [0.5 * factor, 2.0], rtol=1e-6)


class _TinyNnx(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


@pytest.mark.parametrize("variant", [nnx.jit, _no_jit], ids=["jit", "nojit"])
def test_flax_nnx_optimizer(variant):
  model = _TinyNnx(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)
  loss = lambda m: jnp.mean((m(x) - y) ** 2)

  clean = nnx.grad(loss)(model)
  before = {n: np.array(getattr(model.linear, n)[...]) for n in ["kernel", "bias"]}
  perturbed_model = nnx.clone(model)
  eps = jax.tree.map(lambda g: 0.5 * g / optax.tree.norm(clean), clean)
  nnx.update(perturbed_model, jax.tree.map(lambda w, e: w + e, nnx.state(model, nnx.Param), eps))
  perturbed = nnx.grad(loss)(perturbed_model)

  lr, alpha = 0.1, 0.5
  optimizer = nnx.Optimizer(model, optax.chain(saner(alpha), optax.sgd(lr)), wrt=nnx.Param)
  variant(lambda m, o, gs, g: o.update(m, gs, clean_grads=g))(model, optimizer, perturbed, clean)

  kernel_b = _np_group_b(perturbed["linear"]["kernel"][...], clean["linear"]["kernel"][...])
  assert kernel_b.any() and not kernel_b.all()
  for name in ["kernel", "bias"]:
    gs = np.asarray(perturbed["linear"][name][...], np.float64)
    g = np.asarray(clean["linear"][name][...], np.float64)
    w0 = before[name].astype(np.float64)
    expected = w0 - lr * np.where(_np_group_b(gs, g), alpha * gs, gs)
    np.testing.assert_allclose(np.asarray(getattr(model.linear, name)[...]), expected, rtol=1e-6, atol=1e-7)
  assert int(optimizer.step[...]) == 1


# ------------------------------------------------------------ NaN and inf


def test_saner_passes_nonfinite_through():
  tx = saner(0.5)
  p = jnp.array([jnp.nan, 0.5, jnp.inf, 0.5, 0.5])
  c = jnp.array([1.0, 1.0, 1.0, jnp.nan, jnp.inf])
  out, _ = tx.update(p, tx.init(c), clean_grads=c)
  # NaN g_sam stays NaN; inf g_sam is "amplified" (group A) and stays inf;
  # NaN g puts its coordinate in no group; inf g makes 0.5 a B coordinate.
  np.testing.assert_array_equal(np.asarray(out), [np.nan, 0.25, np.inf, 0.5, 0.25])


def test_apply_if_finite_skips_step_and_forwards_clean_grads():
  tx = optax.apply_if_finite(optax.chain(saner(0.5), optax.sgd(1.0)), max_consecutive_errors=5)
  params = jnp.zeros(3)
  c = jnp.array([1.0, 1.0, 1.0])
  state = tx.init(params)
  update = jax.jit(lambda u, s, g: tx.update(u, s, params, clean_grads=g))

  bad = jnp.array([0.5, jnp.nan, 2.0])
  out, state = update(bad, state, c)
  np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0, 0.0])
  assert int(state.total_notfinite) == 1
  assert int(state.inner_state[0].count) == 0  # saner did not step

  good = jnp.array([0.5, 3.0, 2.0])
  out, state = update(good, state, c)
  np.testing.assert_array_equal(np.asarray(out), [-0.25, -3.0, -2.0])
  assert int(state.inner_state[0].count) == 1

  # apply_if_finite looks at the updates (g_sam) only: a NaN in the clean
  # gradient alone does not skip the step; saner leaves that coordinate alone.
  out, state = update(good, state, jnp.array([jnp.nan, 1.0, 1.0]))
  np.testing.assert_array_equal(np.asarray(out), [-0.5, -3.0, -2.0])
  assert int(state.total_notfinite) == 1


# ------------------------------------------------------------ alpha warm-up


def _authors_get_alpha(epoch, initial_alpha, final_alpha, total_epochs):
  """utils/utils.py get_alpha of the reference code, for comparison."""
  if epoch < total_epochs:
    return initial_alpha - (initial_alpha - final_alpha) * (epoch / total_epochs)
  return final_alpha


@VARIANTS
@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.75])
def test_alpha_warmup_reaches_target_at_step_k(variant, alpha):
  k = 10
  schedule = variant(alpha_warmup(alpha, k))
  assert float(schedule(0)) == 1.0
  np.testing.assert_allclose(float(schedule(k // 2)), 1 - (1 - alpha) / 2, rtol=1e-6)
  assert float(schedule(k - 1)) > alpha
  assert float(schedule(k)) == float(np.float32(alpha))
  assert float(schedule(10 * k)) == float(np.float32(alpha))
  values = [float(schedule(t)) for t in range(k + 1)]
  assert all(a > b for a, b in itertools.pairwise(values))  # strictly linear descent


@VARIANTS
@pytest.mark.parametrize("alpha, epochs_k, steps_per_epoch", [(0.5, 4, 3), (0.25, 50, 391)])
def test_alpha_warmup_staircase_matches_authors_get_alpha(variant, alpha, epochs_k, steps_per_epoch):
  schedule = variant(alpha_warmup(alpha, epochs_k * steps_per_epoch, steps_per_epoch))
  for epoch in range(1, epochs_k + 3):  # the authors' loop counts epochs from 1
    want = _authors_get_alpha(epoch, 1.0, alpha, epochs_k)
    first = (epoch - 1) * steps_per_epoch  # steps count from 0
    for step in {first, first + steps_per_epoch // 2, first + steps_per_epoch - 1}:
      np.testing.assert_allclose(float(schedule(jnp.int32(step))), want, rtol=1e-6)


def test_alpha_warmup_zero_steps_is_constant():
  schedule = alpha_warmup(0.3, 0)
  for step in [0, 1, 100]:
    np.testing.assert_allclose(float(schedule(step)), 0.3, rtol=1e-7)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(alpha=1.5, warmup_steps=5), r"alpha must be \[0.0, 1.0\], got 1.5"),
    (dict(alpha=0.5, warmup_steps=-1), r"warmup_steps must be >= 0, got -1"),
    (dict(alpha=0.5, warmup_steps=5, steps_per_epoch=0), r"steps_per_epoch must be > 0, got 0"),
  ],
)
def test_alpha_warmup_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    alpha_warmup(**kwargs)


# ---------------------------------------------------------------- GSAM


def _np_gsam(perturbed, clean, alpha):
  keys = sorted(clean)
  gs = {k: np.asarray(perturbed[k], np.float64) for k in keys}
  g = {k: np.asarray(clean[k], np.float64) for k in keys}
  g_norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
  gs_norm = np.sqrt(sum(np.sum(gs[k] ** 2) for k in keys))
  inner = sum(np.sum(g[k] * gs[k]) for k in keys)
  cosine = inner / (g_norm * gs_norm + 1e-12)
  vertical = {k: g[k] - cosine * g_norm * gs[k] / (gs_norm + 1e-12) for k in keys}
  return {k: gs[k] - alpha * vertical[k] for k in keys}, vertical


@VARIANTS
def test_gsam_decomposition_matches_numpy(variant):
  _, steps = _random_steps(1, seed=4)
  perturbed, clean = steps[0]
  tx = gsam(0.3)
  out, state = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))(perturbed, tx.init(clean), clean)
  expected, vertical = _np_gsam(perturbed, clean, 0.3)
  for k in expected:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)
  # The removed part is orthogonal to g_sam.
  inner = sum(np.sum(vertical[k] * perturbed[k]) for k in vertical)
  assert abs(inner) < 1e-6 * sum(np.sum(np.abs(vertical[k])) for k in vertical)
  assert int(state.count) == 1


@VARIANTS
def test_gsam_alpha_zero_is_identity_and_schedule_is_used(variant):
  _, steps = _random_steps(1, seed=5)
  perturbed, clean = steps[0]
  tx = gsam(optax.linear_schedule(0.0, 0.2, 1))  # 0.0 then 0.2
  update = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))
  out, state = update(perturbed, tx.init(clean), clean)
  for k in perturbed:
    np.testing.assert_array_equal(out[k], perturbed[k])
  out, state = update(perturbed, state, clean)
  expected, _ = _np_gsam(perturbed, clean, 0.2)
  for k in perturbed:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)


@VARIANTS
def test_gsaner_masks_between_gsam_output_and_clean(variant):
  # Coordinate 0: g_sam = 1.1 > g = 1 is in A, but GSAM's d = 0.893 is in B,
  # so GSANER halves it; a mask taken on g_sam would not.
  clean = {"w": np.array([1.0, 0.0, 2.0], np.float32)}
  perturbed = {"w": np.array([1.1, -1.0, 2.5], np.float32)}
  g_alpha, alpha = 1.0, 0.5
  d, _ = _np_gsam(perturbed, clean, g_alpha)
  np.testing.assert_allclose(d["w"], [0.89314421, -1.72104019, 2.30260047], rtol=1e-6)
  assert not _np_group_b(perturbed["w"], clean["w"]).any()
  tx = optax.chain(gsam(g_alpha), saner(alpha))
  out, _ = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))(perturbed, tx.init(clean), clean)
  np.testing.assert_allclose(out["w"], [0.5 * 0.89314421, -1.72104019, 2.30260047], rtol=1e-5)


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["saner", "gsam"])
def test_missing_or_mismatched_clean_grads(name):
  tx = {"saner": saner, "gsam": gsam}[name]()
  updates = {"w": jnp.ones((2, 3))}
  state = tx.init(updates)
  with pytest.raises(ValueError, match=rf"{name} needs the clean-point gradients.*clean_grads=clean_grads"):
    tx.update(updates, state)
  with pytest.raises(ValueError, match=r"clean_grads must have the same tree structure as updates"):
    tx.update(updates, state, clean_grads={"v": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match=r"clean_grads must have the same tree structure as updates"):
    tx.update(updates, state, clean_grads=[jnp.ones((2, 3))])
  with pytest.raises(ValueError, match=r"clean_grads\['w'\] has shape \(3,\) but updates\['w'\] has shape \(2, 3\)"):
    tx.update(updates, state, clean_grads={"w": jnp.ones(3)})


def test_missing_clean_grads_inside_chain_and_jit():
  tx = optax.chain(saner(0.5), optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"saner needs the clean-point gradients"):
    jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(alpha=1.5), r"alpha must be \[0.0, 1.0\], got 1.5"),
    (dict(alpha=-0.1), r"alpha must be \[0.0, 1.0\], got -0.1"),
    (dict(alpha=2.0, group="B"), r"alpha must be \[0.0, 1.0\], got 2.0"),
    (dict(alpha=float("nan")), r"alpha must be \[0.0, 1.0\], got nan"),
    (dict(alpha=-1.0, group="A"), r"alpha must be >= 0.0, got -1.0"),
    (dict(alpha=-1.0, group="C"), r"alpha must be >= 0.0, got -1.0"),
    (dict(alpha=0.5, group="D"), r"unknown group 'D'; expected one of"),
    (dict(alpha=0.5, group="b"), r"unknown group 'b'; expected one of"),
    (dict(alpha=optax.constant_schedule(1.5)), r"got 1.5 \(the schedule's value at step 0\)"),
    (dict(alpha="half"), r"alpha must be a float or an optax schedule"),
  ],
)
def test_saner_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    saner(**kwargs)


def test_saner_alpha_two_allowed_for_ablation_groups():
  for group in ["A", "C"]:
    assert isinstance(saner(2.0, group=group), optax.GradientTransformationExtraArgs)


def test_gsam_negative_alpha():
  with pytest.raises(ValueError, match=r"alpha must be >= 0.0, got -0.01"):
    gsam(-0.01)


def test_public_api():
  assert saner_jax.saner is saner and saner_jax.gsam is gsam
  assert isinstance(saner(), optax.GradientTransformationExtraArgs)
  assert isinstance(gsam(), optax.GradientTransformationExtraArgs)


# ------------------------------------------------------ property tests


_SPECIAL = st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5, 1e-9, -1e-9])
# XLA on CPU flushes float32 subnormals to zero (a subnormal gradient is then
# in no group), so the generated values are normal floats or zero.
_ELEMENTS = st.one_of(_SPECIAL, st.floats(-10.0, 10.0, width=32, allow_subnormal=False))


@st.composite
def gradient_pairs(draw):
  """(perturbed, clean) dict pytrees of random shapes, with ties and zeros."""
  perturbed, clean = {}, {}
  for i in range(draw(st.integers(1, 3))):
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    c = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    p = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    tie = draw(hnp.arrays(np.bool_, shape))
    perturbed[f"leaf{i}"] = np.where(tie, c, p)
    clean[f"leaf{i}"] = c
  return perturbed, clean


@given(gradient_pairs())
def test_property_groups_disjoint_and_exhaustive(pair):
  perturbed, clean = pair
  for k in clean:
    p, c = perturbed[k], clean[k]
    masks = {g: np.asarray(group_mask(jnp.asarray(p), jnp.asarray(c), g)) for g in "ABC"}
    assert not (masks["A"] & masks["B"]).any()
    assert not (masks["A"] & masks["C"]).any()
    assert not (masks["B"] & masks["C"]).any()
    in_some_group = masks["A"] | masks["B"] | masks["C"]
    np.testing.assert_array_equal(in_some_group, (p != 0) & (c != 0) & (p != c))
    ratio = p.astype(np.float64) / np.where(c == 0, 1.0, c)
    np.testing.assert_array_equal(masks["A"], (c != 0) & (p != 0) & (ratio > 1))
    np.testing.assert_array_equal(masks["B"], (c != 0) & (ratio > 0) & (ratio < 1))
    np.testing.assert_array_equal(masks["C"], (c != 0) & (ratio < 0))


@given(gradient_pairs(), st.floats(0.0, 1.0))
def test_property_saner_scales_only_group_b(pair, alpha):
  perturbed, clean = pair
  tx = saner(alpha)
  out, _ = tx.update(perturbed, tx.init(clean), clean_grads=clean)
  for k in clean:
    b = _np_group_b(perturbed[k], clean[k])
    got = np.asarray(out[k])
    np.testing.assert_array_equal(got[~b], perturbed[k][~b])
    np.testing.assert_array_equal(got[b], (np.float32(alpha) * perturbed[k])[b])


@given(gradient_pairs())
def test_property_alpha_one_is_identity(pair):
  perturbed, clean = pair
  tx = saner(1.0)
  out, _ = tx.update(perturbed, tx.init(clean), clean_grads=clean)
  chex.assert_trees_all_equal(out, perturbed)

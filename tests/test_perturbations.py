"""Tests of saner_jax.perturbations against hand-written numpy references.

Each perturbation maps the clean gradients of a small dict pytree to eps;
the references below follow the formulas of the papers and the authors'
PyTorch code, step by step in float64. Numerical tests run under ``jax.jit``
and eagerly (the ``variant`` parametrisation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saner_jax import asam, friendly_sam, sam, vasso


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])

RTOL, ATOL = 1e-5, 1e-7


def _grads(n_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    for _ in range(n_steps)
  ]


PARAMS = {
  "w": np.array([[0.5, -2.0, 0.0], [1.0, 0.25, -0.75]], np.float32),
  "b": np.array([0.1, 0.0, -3.0], np.float32),
}


def _np_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values()))


def _f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _assert_close(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=RTOL, atol=ATOL)


def _run(tx, grads, variant, params=None):
  state = tx.init(PARAMS)
  update = variant(lambda g, s, p: tx.update(g, s, p))
  out = []
  for g in grads:
    eps, state = update(g, state, params)
    out.append(eps)
  return out, state


# ----------------------------------------------------------------- SAM


@VARIANTS
def test_sam_matches_numpy(variant):
  grads = _grads(2)
  out, state = _run(sam(0.05), grads, variant)
  for g, eps in zip(grads, out):
    g = _f64(g)
    norm = _np_norm(g)
    _assert_close(eps, {k: 0.05 * v / (norm + 1e-12) for k, v in g.items()})
  assert int(state.count) == 2


@VARIANTS
def test_sam_rho_schedule_uses_own_step_count(variant):
  grads = _grads(3, seed=1)
  out, _ = _run(sam(optax.linear_schedule(0.1, 0.3, 2)), grads, variant)
  for rho, g, eps in zip([0.1, 0.2, 0.3], grads, out):
    g = _f64(g)
    _assert_close(eps, {k: rho * v / (_np_norm(g) + 1e-12) for k, v in g.items()})
    np.testing.assert_allclose(_np_norm(eps), rho, rtol=1e-5)


def test_sam_bfloat16_gradients_keep_dtype():
  g = {"w": jnp.array([3.0, 4.0], jnp.bfloat16)}
  tx = sam(1.0)
  eps, _ = tx.update(g, tx.init(g))
  assert eps["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(eps["w"], np.float32), [0.6, 0.8], rtol=1e-2)


# ----------------------------------------------------------------- ASAM


@VARIANTS
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_matches_numpy(variant, eta):
  grads = _grads(2, seed=2)
  out, _ = _run(asam(0.5, eta=eta), grads, variant, params=PARAMS)
  params = _f64(PARAMS)
  for g, eps in zip(grads, out):
    g = _f64(g)
    t = {k: np.abs(params[k]) + eta for k in g}
    norm = _np_norm({k: t[k] * g[k] for k in g})
    _assert_close(eps, {k: 0.5 * t[k] ** 2 * g[k] / (norm + 1e-12) for k in g})


@VARIANTS
def test_asam_eta_zero_is_authors_adaptive_rule(variant):
  # optimizer/saner.py, adaptive=True: e_w = p**2 * grad * rho / ||abs(p) * grad||
  g32 = _grads(1, seed=3)[0]
  g = _f64(g32)
  p = _f64(PARAMS)
  scale = 0.7 / (np.sqrt(sum(np.sum((np.abs(p[k]) * g[k]) ** 2) for k in g)) + 1e-12)
  out, _ = _run(asam(0.7), [g32], variant, params=PARAMS)
  _assert_close(out[0], {k: p[k] ** 2 * g[k] * scale for k in g})
  # Zero weights are not perturbed when eta = 0, but are when eta > 0.
  assert out[0]["w"][0, 2] == 0 and out[0]["b"][1] == 0
  out, _ = _run(asam(0.7, eta=0.01), [g32], variant, params=PARAMS)
  assert out[0]["w"][0, 2] != 0 and out[0]["b"][1] != 0


@VARIANTS
def test_asam_rho_schedule(variant):
  grads = _grads(2, seed=10)
  out, _ = _run(asam(optax.linear_schedule(1.0, 2.0, 1), eta=0.01), grads, variant, params=PARAMS)
  params = _f64(PARAMS)
  for rho, g, eps in zip([1.0, 2.0], grads, out):
    g = _f64(g)
    t = {k: np.abs(params[k]) + 0.01 for k in g}
    norm = _np_norm({k: t[k] * g[k] for k in g})
    _assert_close(eps, {k: rho * t[k] ** 2 * g[k] / (norm + 1e-12) for k in g})


def test_asam_needs_params():
  tx = asam(0.5)
  g = _grads(1)[0]
  with pytest.raises(ValueError, match=r"asam needs params: call update\(grads, state, params\)"):
    tx.update(g, tx.init(PARAMS))
  with pytest.raises(ValueError, match=r"params must have the same tree structure as grads"):
    tx.update(g, tx.init(PARAMS), {"w": PARAMS["w"]})


# ----------------------------------------------------------- Friendly-SAM


def _np_friendly_sam(grads, rho, sigma, lmbda):
  """optimizer/fsam.py, step by step: the first step ascends along g and sets m = g."""
  m = None
  out = []
  for g in map(_f64, grads):
    if m is None:
      d = dict(g)
      m = dict(g)
    else:
      d = {k: g[k] - sigma * m[k] for k in g}
      m = {k: lmbda * m[k] + (1 - lmbda) * g[k] for k in g}
    norm = _np_norm(d)
    out.append({k: rho * d[k] / (norm + 1e-12) for k in d})
  return out, m


@VARIANTS
@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.9), (0.5, 0.6)])
def test_friendly_sam_three_steps_match_numpy(variant, sigma, lmbda):
  grads = _grads(3, seed=4)
  out, state = _run(friendly_sam(0.05, sigma=sigma, lmbda=lmbda), grads, variant)
  want, m = _np_friendly_sam(grads, 0.05, sigma, lmbda)
  for got_t, want_t in zip(out, want):
    _assert_close(got_t, want_t)
  _assert_close(state.average, m)
  assert int(state.count) == 3


@VARIANTS
def test_friendly_sam_first_step_is_sam(variant):
  g = _grads(1, seed=5)
  got, state = _run(friendly_sam(0.05, sigma=0.5), g, variant)
  want, _ = _run(sam(0.05), g, variant)
  _assert_close(got[0], {k: np.asarray(v, np.float64) for k, v in want[0].items()})
  _assert_close(state.average, _f64(g[0]))


@VARIANTS
def test_friendly_sam_rho_and_sigma_schedules(variant):
  grads = _grads(3, seed=6)
  rho = optax.linear_schedule(0.05, 0.15, 2)  # 0.05, 0.10, 0.15
  sigma = optax.linear_schedule(1.0, 0.0, 2)  # 1.0, 0.5, 0.0
  out, _ = _run(friendly_sam(rho, sigma=sigma, lmbda=0.9), grads, variant)
  m = _f64(grads[0])
  for t, (r, s) in enumerate([(0.05, 1.0), (0.10, 0.5), (0.15, 0.0)]):
    g = _f64(grads[t])
    d = g if t == 0 else {k: g[k] - s * m[k] for k in g}
    if t > 0:
      m = {k: 0.9 * m[k] + 0.1 * g[k] for k in g}
    _assert_close(out[t], {k: r * d[k] / (_np_norm(d) + 1e-12) for k in d})


# ----------------------------------------------------------------- VaSSO


def _np_vasso(grads, rho, theta):
  """optimizer/vasso.py: ema = g on the first step, then (1 - theta) ema + theta g."""
  ema = None
  out = []
  for g in map(_f64, grads):
    ema = dict(g) if ema is None else {k: (1 - theta) * ema[k] + theta * g[k] for k in g}
    norm = _np_norm(ema)
    out.append({k: rho * ema[k] / (norm + 1e-12) for k in ema})
  return out, ema


@VARIANTS
@pytest.mark.parametrize("theta", [0.2, 0.9])
def test_vasso_three_steps_match_numpy(variant, theta):
  grads = _grads(3, seed=7)
  out, state = _run(vasso(0.1, theta=theta), grads, variant)
  want, ema = _np_vasso(grads, 0.1, theta)
  for got_t, want_t in zip(out, want):
    _assert_close(got_t, want_t)
  _assert_close(state.average, ema)
  # Past the first step VaSSO is not SAM on the current gradient.
  sam_eps = {k: 0.1 * v / _np_norm(_f64(grads[2])) for k, v in _f64(grads[2]).items()}
  assert not np.allclose(out[2]["w"], sam_eps["w"], rtol=1e-3)


@VARIANTS
def test_vasso_rho_schedule(variant):
  grads = _grads(3, seed=8)
  out, _ = _run(vasso(optax.linear_schedule(0.3, 0.1, 2), theta=0.5), grads, variant)
  for rho, eps in zip([0.3, 0.2, 0.1], out):
    np.testing.assert_allclose(_np_norm(eps), rho, rtol=1e-5)


# ---------------------------------------------------- zero gradients, NaN


ALL = {
  "sam": lambda rho=0.05: sam(rho),
  "asam": lambda rho=0.5: asam(rho),
  "asam_eta": lambda rho=0.5: asam(rho, eta=0.01),
  "friendly_sam": lambda rho=0.05: friendly_sam(rho),
  "vasso": lambda rho=0.05: vasso(rho),
}


@VARIANTS
@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_gradient_gives_zero_eps(variant, name):
  zeros = {k: np.zeros_like(v) for k, v in PARAMS.items()}
  out, _ = _run(ALL[name](), [zeros, zeros, zeros], variant, params=PARAMS)
  for eps in out:
    for v in eps.values():
      assert np.all(np.isfinite(v))
      np.testing.assert_array_equal(v, 0.0)


@VARIANTS
def test_friendly_sam_direction_cancelling_gives_zero_eps(variant):
  # sigma = 1, lmbda = 1 and a constant gradient: d = g - m = 0 from step 2.
  g = _grads(1, seed=9)[0]
  out, _ = _run(friendly_sam(0.05, sigma=1.0, lmbda=1.0), [g, g], variant)
  for v in out[1].values():
    np.testing.assert_array_equal(np.asarray(v), 0.0)


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "make",
  [
    lambda r: sam(r),
    lambda r: asam(r),
    lambda r: friendly_sam(r),
    lambda r: vasso(r),
  ],
  ids=["sam", "asam", "friendly_sam", "vasso"],
)
def test_negative_rho(make):
  with pytest.raises(ValueError, match=r"rho must be >= 0.0, got -0.1"):
    make(-0.1)
  with pytest.raises(ValueError, match=r"rho must be >= 0.0, got -0.1 \(the schedule's value at step 0\)"):
    make(optax.constant_schedule(-0.1))
  with pytest.raises(TypeError, match=r"rho must be a float or an optax schedule"):
    make("0.1x")


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: asam(0.5, eta=-0.01), r"eta must be >= 0.0, got -0.01"),
    (lambda: friendly_sam(0.05, sigma=-1.0), r"sigma must be >= 0.0, got -1.0"),
    (lambda: friendly_sam(0.05, lmbda=1.5), r"lmbda must be \[0.0, 1.0\], got 1.5"),
    (lambda: vasso(0.05, theta=-0.2), r"theta must be \[0.0, 1.0\], got -0.2"),
    (lambda: vasso(0.05, theta=1.2), r"theta must be \[0.0, 1.0\], got 1.2"),
  ],
)
def test_other_bad_hyperparameters(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# -------------------------------------------------------- property tests


@st.composite
def gradient_trees(draw, zero=False):
  tree = {}
  for i in range(draw(st.integers(1, 3))):
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    if zero:
      tree[f"leaf{i}"] = np.zeros(shape, np.float32)
    else:
      elements = st.floats(-100.0, 100.0, width=32, allow_subnormal=False)
      tree[f"leaf{i}"] = draw(hnp.arrays(np.float32, shape, elements=elements))
  return tree


@given(gradient_trees(), st.floats(1e-3, 10.0))
def test_property_sam_eps_has_norm_rho(g, rho):
  norm = _np_norm(g)
  if norm < 1e-3:  # the 1e-12 guard is then not negligible
    g = {k: v + 1.0 for k, v in g.items()}
    norm = _np_norm(g)
  tx = sam(rho)
  eps, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(_np_norm(eps), rho, rtol=1e-5)
  for k in g:  # and points along g
    np.testing.assert_allclose(np.asarray(eps[k]), rho * g[k] / norm, rtol=1e-4, atol=1e-6 * rho)


@given(gradient_trees(zero=True), st.floats(0.0, 10.0), st.sampled_from(sorted(ALL)))
def test_property_zero_gradient_zero_eps(g, rho, name):
  params = {k: np.ones_like(v) for k, v in g.items()}
  tx = ALL[name](rho)
  state = tx.init(params)
  for _ in range(2):
    eps, state = tx.update(g, state, params)
    for v in eps.values():
      assert np.all(np.isfinite(np.asarray(v)))
      np.testing.assert_array_equal(np.asarray(v), 0.0)

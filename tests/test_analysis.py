"""saner_jax.analysis: the clean/noisy decomposition and Hessian sharpness.

The decomposition is compared with a numpy computation of every quantity
from gradients of the masked losses taken separately (float64, so kinds and
groups are decided identically), on a hand-worked example, and on empty
kinds (NaN). Sharpness is compared with the dense Hessian of small models,
one of them with BatchNorm statistics passed through. Under jit and without.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

import saner_jax
from saner_jax import analysis


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])
RHO, ALPHA = 0.5, 0.5


def _mlp_data(dtype=np.float64):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 4)).astype(dtype)
  y = rng.integers(0, 3, 16)
  noise = np.zeros(16, bool)
  noise[[1, 4, 5, 9, 12, 15]] = True
  params = {"w1": rng.normal(size=(4, 6)).astype(dtype), "w2": rng.normal(size=(6, 3)).astype(dtype)}
  return x, y, noise, params


def _per_example(params, x, y):
  logits = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _np_reference(params, x, y, noise):
  """Every quantity from separately differentiated masked sums, in numpy."""
  n_examples = len(y)

  def parts(p):
    clean = jax.grad(lambda q: jnp.sum(jnp.where(noise, 0.0, _per_example(q, x, y))) / n_examples)(p)
    noisy = jax.grad(lambda q: jnp.sum(jnp.where(noise, _per_example(q, x, y), 0.0)) / n_examples)(p)
    return np.asarray(ravel_pytree(clean)[0]), np.asarray(ravel_pytree(noisy)[0])

  c, n = parts(params)
  g = c + n
  flat, unravel = ravel_pytree(params)
  eps = RHO * g / (np.linalg.norm(g) + 1e-12)
  c_p, n_p = parts(unravel(np.asarray(flat) + eps))
  s = c_p + n_p
  kinds = {
    "noisy_dom": (np.sign(c) * np.sign(n) < 0) & (np.abs(n) > np.abs(c)),
    "clean_dom": (np.sign(c) * np.sign(n) < 0) & (np.abs(c) > np.abs(n)),
    "aligned": np.sign(c) * np.sign(n) > 0,
  }
  ratio = s / g
  groups = {"A": ratio > 1, "B": (ratio > 0) & (ratio < 1), "C": ratio < 0}
  out = {}
  for kind, mask in kinds.items():
    out[f"frac_{kind}"] = mask.mean()
    for x_, group in groups.items():
      out[f"p_{x_}_{kind}"] = (mask & group).sum() / mask.sum()
  nd = kinds["noisy_dom"]
  out["amp_clean"] = np.median(np.abs(c_p[nd]) / np.abs(c[nd]))
  out["amp_noisy"] = np.median(np.abs(n_p[nd]) / np.abs(n[nd]))
  d_saner = np.where(groups["B"], ALPHA * s, s)
  for part, v in (("noisy", n), ("clean", c)):
    for name, d in (("sgd", g), ("sam", s), ("saner", d_saner)):
      out[f"{part}_weight_{name}"] = d @ v / (g @ v)
  del out["clean_weight_sgd"]
  return out, (c, n)


@VARIANTS
def test_decomposition_matches_numpy(variant):
  x, y, noise, params = _mlp_data()
  with jax.enable_x64(True):
    expected, (c, n) = _np_reference(params, x, y, noise)
    fn = analysis.clean_noisy_decomposition(_per_example, saner_jax.sam(RHO), alpha=ALPHA)
    out = variant(fn)(params, saner_jax.sam(RHO).init(params), jnp.asarray(noise), x, y)
    full = jax.grad(lambda p: jnp.mean(_per_example(p, x, y)))(params)
    np.testing.assert_allclose(c + n, ravel_pytree(full)[0], atol=1e-15)  # c + n = g
  assert set(out) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(float(out[key]), value, rtol=1e-10, err_msg=key)
  # the data exercise every kind, and SAM and SANER do change the weights
  assert min(expected[f"frac_{k}"] for k in analysis.KINDS) > 0
  assert expected["noisy_weight_sgd"] == pytest.approx(1.0)
  assert expected["noisy_weight_saner"] != pytest.approx(expected["noisy_weight_sam"])


@VARIANTS
def test_per_coordinate_parts_and_kinds_match_numpy(variant):
  """clean_noisy_grads and coordinate_kinds, on a nested pytree, equal the reference's c, n and kinds."""
  x, y, noise, params = _mlp_data()
  nested = {"hidden": {"w": params["w1"]}, "out": params["w2"]}
  per_example = lambda p, x, y: _per_example({"w1": p["hidden"]["w"], "w2": p["out"]}, x, y)
  with jax.enable_x64(True):
    _, (c, n) = _np_reference(params, x, y, noise)
    clean, noisy = variant(analysis.clean_noisy_grads(per_example))(nested, jnp.asarray(noise), x, y)
    kinds = variant(analysis.coordinate_kinds)(clean, noisy)
  assert jax.tree.structure(clean) == jax.tree.structure(nested) == jax.tree.structure(kinds["aligned"])
  flat = lambda tree: np.concatenate([np.ravel(tree["hidden"]["w"]), np.ravel(tree["out"])])  # the reference's order
  np.testing.assert_allclose(flat(clean), c, rtol=1e-12)
  np.testing.assert_allclose(flat(noisy), n, rtol=1e-12)
  opposite = np.sign(c) * np.sign(n) < 0
  expected = {
    "noisy_dom": opposite & (np.abs(n) > np.abs(c)),
    "clean_dom": opposite & (np.abs(c) > np.abs(n)),
    "aligned": np.sign(c) * np.sign(n) > 0,
  }
  for kind, mask in expected.items():
    assert mask.any(), kind  # the data exercise every kind
    np.testing.assert_array_equal(flat(kinds[kind]), mask, err_msg=kind)


def test_coordinate_kinds_hand_example():
  """A zero part (index 3) or a tie (4) is of no kind; signs decide, not a product that underflows (5)."""
  clean = jnp.array([-0.5, -0.05, 1.0, 0.0, 2.0, 2e-30], jnp.float32)  # 2e-30 * -1e-30 underflows to -0
  noisy = jnp.array([0.1, 1.0, 2.0, 3.0, -2.0, -1e-30], jnp.float32)
  kinds = analysis.coordinate_kinds(clean, noisy)
  assert kinds["noisy_dom"].tolist() == [False, True, False, False, False, False]
  assert kinds["clean_dom"].tolist() == [True, False, False, False, False, True]
  assert kinds["aligned"].tolist() == [False, False, True, False, False, False]


def test_coordinate_kinds_refuses_mismatched_trees():
  with pytest.raises(ValueError, match=r"noisy_grads must have the same tree structure as clean_grads"):
    analysis.coordinate_kinds({"a": jnp.ones(2)}, {"b": jnp.ones(2)})


def test_decomposition_hand_example():
  """Linear model, two examples, w = 0: the gradients are -y_j x_j / 2.

  clean example (1, 0.1), y = 1   ->  c = (-0.5, -0.05)
  noisy example (0.1, 1), y = -2  ->  n = ( 0.1,  1.0 )
  coordinate 0: opposite signs, |c| > |n|: clean-dominated
  coordinate 1: opposite signs, |n| > |c|: noisy-dominated
  With rho = 0 the perturbed gradients are the clean ones: no coordinate is
  in a group, both amplifications are 1, and every weight is 1.
  """
  losses = lambda w, x, y: 0.5 * (x @ w - y) ** 2
  x, y = jnp.array([[1.0, 0.1], [0.1, 1.0]]), jnp.array([1.0, -2.0])
  fn = analysis.clean_noisy_decomposition(losses, saner_jax.sam(0.0))
  out = fn(jnp.zeros(2), saner_jax.sam(0.0).init(jnp.zeros(2)), jnp.array([False, True]), x, y)
  assert (float(out["frac_noisy_dom"]), float(out["frac_clean_dom"]), float(out["frac_aligned"])) == (0.5, 0.5, 0.0)
  for group in "ABC":
    assert float(out[f"p_{group}_noisy_dom"]) == 0.0
    assert np.isnan(out[f"p_{group}_aligned"])  # an empty kind
  assert float(out["amp_clean"]) == 1.0 and float(out["amp_noisy"]) == 1.0
  for key in ("noisy_weight_sgd", "noisy_weight_sam", "noisy_weight_saner", "clean_weight_sam", "clean_weight_saner"):
    assert float(out[key]) == pytest.approx(1.0), key


@VARIANTS
@pytest.mark.parametrize("all_noisy", [False, True], ids=["no_noisy", "no_clean"])
def test_a_batch_without_one_kind_of_sample_gives_nan_not_a_crash(variant, all_noisy):
  x, y, _, params = _mlp_data(np.float32)
  noise = jnp.full(16, all_noisy)
  fn = analysis.clean_noisy_decomposition(_per_example, saner_jax.sam(RHO))
  out = variant(fn)(params, saner_jax.sam(RHO).init(params), noise, x, y)
  present = "noisy" if all_noisy else "clean"
  for key, value in out.items():
    if key.startswith(f"{present}_weight"):
      assert np.isfinite(value), key
    else:
      assert np.isnan(value), key


@pytest.mark.parametrize(
  "mask, error, match",
  [
    (
      np.zeros(16, np.int32),
      TypeError,
      r"noise_mask must be a boolean array .* got dtype int32; pass mask.astype\(bool\)",
    ),
    (np.zeros(16, np.float32), TypeError, r"got dtype float32"),
    ([False] * 16, TypeError, r"got dtype None"),
    (np.zeros(8, bool), ValueError, r"noise_mask has shape \(8,\) but the per-example losses have shape \(16,\)"),
    (np.zeros((16, 1), bool), ValueError, r"noise_mask has shape \(16, 1\)"),
  ],
)
def test_bad_noise_mask(mask, error, match):
  x, y, _, params = _mlp_data(np.float32)
  fn = analysis.clean_noisy_decomposition(_per_example, saner_jax.sam(RHO))
  with pytest.raises(error, match=match):
    fn(params, saner_jax.sam(RHO).init(params), mask, x, y)


def test_a_mean_loss_is_refused():
  x, y, noise, params = _mlp_data(np.float32)
  fn = analysis.clean_noisy_decomposition(lambda p, x, y: _per_example(p, x, y).mean(), saner_jax.sam(RHO))
  with pytest.raises(ValueError, match=r"a loss_fn that returns one loss per example"):
    fn(params, saner_jax.sam(RHO).init(params), noise, x, y)


# ---------------------------------------------------------------------------
# Sharpness against the dense Hessian


class _BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(5)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.tanh(x))


def _bn_problem():
  x, y, _, _ = _mlp_data(np.float64)
  model = _BatchNormNet()
  variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), x))

  def loss(params, batch_stats, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

  return loss, variables["params"], (variables["batch_stats"], x, y)


def _mlp_problem():
  x, y, _, params = _mlp_data(np.float64)
  return (lambda p, x, y: (_per_example(p, x, y).mean(), None)), params, (x, y)


PROBLEMS = {"mlp": _mlp_problem, "batchnorm": _bn_problem}


def _dense_hessian(loss, params, args):
  flat, unravel = ravel_pytree(params)
  # Jitted: run eagerly, each of its few hundred operations would compile alone.
  return np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), *args)[0]))(flat))


@VARIANTS
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_top_eigenvalue_matches_the_dense_hessian(variant, problem):
  with jax.enable_x64(True):
    loss, params, args = PROBLEMS[problem]()
    eigenvalues = np.linalg.eigvalsh(_dense_hessian(loss, params, args))
    fn = lambda p, *a: analysis.hessian_top_eigenvalue(
      loss, p, *a, key=jax.random.key(3), has_aux=True, max_iterations=2000, tol=1e-10
    )
    lam = float(variant(fn)(params, *args))
  top = eigenvalues[np.argmax(np.abs(eigenvalues))]
  assert top > 0 and abs(eigenvalues[-2]) < 0.95 * top  # a well-posed check: a positive, separated top
  assert lam == pytest.approx(top, rel=1e-6)


@VARIANTS
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_hutchinson_trace_matches_the_dense_hessian(variant, problem):
  samples = 2000
  with jax.enable_x64(True):
    loss, params, args = PROBLEMS[problem]()
    hessian = _dense_hessian(loss, params, args)
    fn = lambda p, *a: analysis.hessian_trace(loss, p, *a, key=jax.random.key(5), has_aux=True, num_samples=samples)
    estimate = float(variant(fn)(params, *args))
  off_diagonal = hessian - np.diag(np.diag(hessian))
  std_error = np.sqrt(2 * np.sum(off_diagonal**2) / samples)
  assert abs(estimate - np.trace(hessian)) < 4 * std_error
  assert std_error < 0.05 * abs(np.trace(hessian))  # the bound is tight enough to mean something


def test_trace_of_a_diagonal_hessian_is_exact_in_float32():
  loss = lambda w: jnp.sum(jnp.array([3.0, -1.0, 0.5]) * w**2)  # H = diag(6, -2, 1)
  assert float(analysis.hessian_trace(loss, jnp.ones(3), key=jax.random.key(0), num_samples=4)) == 5.0


def test_a_loss_argument_that_cannot_be_hashed_is_compiled_for_its_call():
  class Weights:  # defines equality, so Python gives it no hash: compiled for the call only
    def __init__(self, w):
      self.w = w

    def __eq__(self, other):
      return isinstance(other, Weights) and np.array_equal(self.w, other.w)

  loss = lambda w, weights: jnp.sum(weights.w * w**2)  # H = diag(2 weights.w)
  key = jax.random.key(0)
  weights = Weights(np.array([3.0, -1.0, 0.5], np.float32))
  assert float(analysis.hessian_trace(loss, jnp.ones(3), weights, key=key, num_samples=4, cache=True)) == 5.0
  top = analysis.hessian_top_eigenvalue(loss, jnp.ones(3), weights, key=key, max_iterations=200, tol=0.0, cache=True)
  assert float(top) == pytest.approx(6.0, rel=1e-5)


def test_sharpness_bad_arguments():
  loss = lambda w: jnp.sum(w**2)
  with pytest.raises(ValueError, match=r"max_iterations must be >= 1, got 0"):
    analysis.hessian_top_eigenvalue(loss, jnp.ones(2), key=jax.random.key(0), max_iterations=0)
  with pytest.raises(ValueError, match=r"num_samples must be >= 1, got 0"):
    analysis.hessian_trace(loss, jnp.ones(2), key=jax.random.key(0), num_samples=0)


def _top(loss, p, *a, max_iterations, tol):
  return analysis.hessian_top_eigenvalue(
    loss, p, *a, key=jax.random.key(1), has_aux=True, max_iterations=max_iterations, tol=tol
  )


def test_a_later_eager_measurement_reuses_the_compiled_products(caplog):
  """The trainer measures sharpness every few epochs: new parameters, statistics and batches, the same loss."""
  with jax.enable_x64(True):
    loss, params, (batch_stats, x, y) = _bn_problem()
    # Placed as the trainer places its state: the power iteration's first vector must match its later ones.
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    params, batch_stats = jax.device_put((params, batch_stats), jax.sharding.NamedSharding(mesh, P()))

    def measure(params, *args, cache=True):
      options = dict(has_aux=True, cache=cache)
      top = analysis.hessian_top_eigenvalue(loss, params, *args, key=jax.random.key(1), max_iterations=4, **options)
      trace = analysis.hessian_trace(loss, params, *args, key=jax.random.key(2), num_samples=3, **options)
      return float(top), float(trace)

    def compiling(*args):
      caplog.clear()
      with jax.log_compiles(True), caplog.at_level("WARNING"):
        values = measure(*args)
      return values, re.findall(r"Compiling jit\((\w+)\)", caplog.text)

    first, names = compiling(params, batch_stats, x, y)
    assert names  # the first measurement compiles
    later = (jax.tree.map(lambda a: 1.5 * a, params), jax.tree.map(lambda a: a + 0.1, batch_stats), -x, y[::-1])
    second, names = compiling(*later)
    assert names == []  # the second compiles nothing (it compiled 5 products before)
    # Measured at the new point, as an uncached call measures it.
    assert second == pytest.approx(measure(*later, cache=False), rel=1e-9) and second != first


def test_without_cache_each_call_reads_the_loss_anew():
  scale = {"s": 1.0}
  loss = lambda w, y: scale["s"] * jnp.sum(jnp.asarray(np.eye(3)[y]) * w**2)  # a numpy y, used in Python
  trace = lambda: float(analysis.hessian_trace(loss, jnp.ones(3), np.arange(3), key=jax.random.key(0), num_samples=2))
  assert trace() == 6.0  # H = diag(2, 2, 2)
  scale["s"] = 10.0
  assert trace() == 60.0


def test_cache_keys_the_other_arguments_with_their_types_and_lets_the_loss_go():
  import gc
  import weakref

  class Net:  # stands for a model whose loss closes over it
    pass

  def make_loss():
    net = Net()
    return (lambda w, flag: (5.0 if flag is True else 1.0) * jnp.sum(w**2) + 0 * id(net)), weakref.ref(net)

  loss, net = make_loss()
  traces = [
    float(analysis.hessian_trace(loss, jnp.ones(3), flag, key=jax.random.key(0), cache=True)) for flag in (True, 1)
  ]
  assert traces == [30.0, 6.0]  # True == 1, but not the same argument
  del loss
  gc.collect()
  assert net() is None  # the cache held neither the loss nor what it closes over


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_eager_python_loop_equals_the_jitted_while_loop(problem):
  # Outside jit the iteration runs in Python over one compiled step (fast convolutions
  # on XLA's CPU backend); it must stop at the same iterate and give the same values.
  with jax.enable_x64(True):
    loss, params, args = PROBLEMS[problem]()
    for iterations, tol in ((7, 0.0), (500, 1e-4)):
      top = functools.partial(_top, loss, max_iterations=iterations, tol=tol)
      assert float(top(params, *args)) == pytest.approx(float(jax.jit(top)(params, *args)), rel=1e-12)
    trace = lambda p, *a: analysis.hessian_trace(loss, p, *a, key=jax.random.key(2), has_aux=True, num_samples=9)
    assert float(trace(params, *args)) == pytest.approx(float(jax.jit(trace)(params, *args)), rel=1e-12)
    # Fewer iterations give a different estimate, so the equality above pins the stopping point.
    two = analysis.hessian_top_eigenvalue(loss, params, *args, key=jax.random.key(1), has_aux=True, max_iterations=2)
    seven = analysis.hessian_top_eigenvalue(
      loss, params, *args, key=jax.random.key(1), has_aux=True, max_iterations=7, tol=0.0
    )
    assert float(two) != pytest.approx(float(seven), rel=1e-9)

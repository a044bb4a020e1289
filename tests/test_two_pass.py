"""Tests of saner_jax.sharpness_aware_grad, the two-pass gradient helper.

The loss is a tiny least-squares model whose gradient is written out by hand
in numpy, so both passes are checked against an independent computation.
Numerical tests run under ``jax.jit`` and eagerly (``variant``).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import saner_jax
from saner_jax import (
  SharpnessAwareGrads,
  accumulated_value_and_grad,
  asam,
  aux_layout,
  sam,
  saner,
  sharpness_aware_grad,
  vasso,
)


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])

_RNG = np.random.default_rng(0)
PARAMS = {
  "w": _RNG.normal(size=(3, 2)).astype(np.float32),
  "b": _RNG.normal(size=(2,)).astype(np.float32),
}
X = _RNG.normal(size=(8, 3)).astype(np.float32)
Y = _RNG.normal(size=(8, 2)).astype(np.float32)


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _np_loss_and_grad(params, x, y):
  """L = mean((x w + b - y)^2) over all N * K entries, and its gradient."""
  w = np.asarray(params["w"], np.float64)
  b = np.asarray(params["b"], np.float64)
  x = np.asarray(x, np.float64)
  r = x @ w + b - np.asarray(y, np.float64)
  scale = 2.0 / r.size
  return np.mean(r**2), {"w": scale * x.T @ r, "b": scale * r.sum(axis=0)}


def _np_sam_eps(g, rho):
  """rho g / (||g|| + 1e-12) on a (nested) dict of float64 numpy arrays."""
  norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(g)))
  return jax.tree.map(lambda v: rho * v / (norm + 1e-12), g)


def _np_two_passes(params, x, y, rho):
  loss, g = _np_loss_and_grad(params, x, y)
  eps = _np_sam_eps(g, rho)
  shifted = {k: np.asarray(params[k], np.float64) + eps[k] for k in params}
  _, g_sam = _np_loss_and_grad(shifted, x, y)
  return loss, g, g_sam


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol)


@VARIANTS
def test_two_passes_match_hand_gradients(variant):
  rho = 0.3
  perturbation = sam(rho)
  grad_fn = variant(sharpness_aware_grad(loss_fn, perturbation))
  out = grad_fn(PARAMS, perturbation.init(PARAMS), (X, Y))
  assert isinstance(out, SharpnessAwareGrads)
  loss, g, g_sam = _np_two_passes(PARAMS, X, Y, rho)
  np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
  _assert_tree_close(out.clean_grads, g)
  _assert_tree_close(out.perturbed_grads, g_sam)
  assert not np.allclose(g["w"], g_sam["w"], rtol=1e-3)
  assert out.aux is None
  assert int(out.perturbation_state.count) == 1


@VARIANTS
def test_asam_uses_params(variant):
  perturbation = asam(1.0)
  out = variant(sharpness_aware_grad(loss_fn, perturbation))(PARAMS, perturbation.init(PARAMS), (X, Y))
  _, g = _np_loss_and_grad(PARAMS, X, Y)
  t = {k: np.abs(np.asarray(PARAMS[k], np.float64)) for k in PARAMS}
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in g))
  shifted = {k: PARAMS[k] + 1.0 * t[k] ** 2 * g[k] / norm for k in g}
  _, g_sam = _np_loss_and_grad(shifted, X, Y)
  _assert_tree_close(out.perturbed_grads, g_sam)


@VARIANTS
def test_rho_zero_is_the_base_optimizer_exactly(variant):
  perturbation = sam(0.0)
  grad_fn = sharpness_aware_grad(loss_fn, perturbation)
  tx = optax.chain(saner(0.5), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

  @variant
  def sam_step(params, opt_state, p_state, batch):
    out = grad_fn(params, p_state, batch)
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state

  @variant
  def sgd_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = base.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p1, s1, ps = PARAMS, tx.init(PARAMS), perturbation.init(PARAMS)
  p2, s2 = PARAMS, base.init(PARAMS)
  for step in range(3):
    batch = (X[step : step + 4], Y[step : step + 4])
    p1, s1, ps = sam_step(p1, s1, ps, batch)
    p2, s2 = sgd_step(p2, s2, batch)
    chex.assert_trees_all_equal(p1, p2)
  # With rho > 0 the perturbed gradient, and so the step, is not SGD's.
  out = sharpness_aware_grad(loss_fn, sam(0.1))(PARAMS, sam(0.1).init(PARAMS), (X, Y))
  assert not np.allclose(np.asarray(out.perturbed_grads["w"]), np.asarray(out.clean_grads["w"]))


# ---------------------------------------------------------------- BatchNorm


class _BnNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(3, name="dense_in")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
    return nn.Dense(2, name="dense_out")(nn.relu(h))


@VARIANTS
def test_batchnorm_statistics_come_from_the_clean_pass(variant):
  model = _BnNet()
  variables = model.init(jax.random.PRNGKey(0), X, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def bn_loss(params, batch_stats, batch):
    x, y = batch
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  rho = 1.0
  perturbation = sam(rho)
  grad_fn = variant(sharpness_aware_grad(bn_loss, perturbation, has_aux=True, batch_argnum=2))
  out = grad_fn(params, perturbation.init(params), batch_stats, (X, Y))

  def expected_stats(kernel, bias):
    h = X.astype(np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    return 0.1 * h.mean(axis=0), 0.9 * 1.0 + 0.1 * h.var(axis=0)

  kernel = params["dense_in"]["kernel"]
  bias = params["dense_in"]["bias"]
  clean_mean, clean_var = expected_stats(kernel, bias)
  np.testing.assert_allclose(out.aux["bn"]["mean"], clean_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.aux["bn"]["var"], clean_var, rtol=1e-5, atol=1e-6)

  # What the perturbed pass would have written instead, at w + eps with eps
  # computed by hand from the clean gradients.
  eps = _np_sam_eps(jax.tree.map(lambda v: np.asarray(v, np.float64), out.clean_grads), rho)
  pert_mean, pert_var = expected_stats(kernel + eps["dense_in"]["kernel"], bias + eps["dense_in"]["bias"])
  assert np.max(np.abs(pert_mean - clean_mean)) > 1e-3
  assert not np.allclose(out.aux["bn"]["mean"], pert_mean, atol=1e-4)
  assert not np.allclose(out.aux["bn"]["var"], pert_var, atol=1e-4)

  # The perturbed pass still normalises with its own batch statistics:
  # its gradient equals that of the train-mode loss at w + eps.
  shifted = jax.tree.map(lambda p, e: p + e, params, eps)
  want = jax.grad(lambda p: bn_loss(p, batch_stats, (X, Y))[0])(shifted)
  chex.assert_trees_all_close(out.perturbed_grads, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------- m-sharpness


@VARIANTS
def test_m_sharpness_one_is_the_plain_path(variant):
  perturbation = sam(0.2)
  state = perturbation.init(PARAMS)
  plain = variant(sharpness_aware_grad(loss_fn, perturbation))(PARAMS, state, (X, Y))
  m1 = variant(sharpness_aware_grad(loss_fn, perturbation, m_sharpness=1))(PARAMS, state, (X, Y))
  chex.assert_trees_all_equal(plain, m1)
  _, _, g_sam = _np_two_passes(PARAMS, X, Y, 0.2)
  _assert_tree_close(m1.perturbed_grads, g_sam)


@VARIANTS
@pytest.mark.parametrize("m", [2, 4])
def test_m_sharpness_is_the_mean_over_sub_batches(variant, m):
  rho, theta = 0.2, 0.3

  def loss_with_aux(params, batch):
    return loss_fn(params, batch), {"first_x": batch[0][0]}

  perturbation = vasso(rho, theta=theta)
  grad_fn = variant(
    sharpness_aware_grad(loss_with_aux, perturbation, has_aux=True, m_sharpness=m, aux_reducers="stack")
  )
  out = grad_fn(PARAMS, perturbation.init(PARAMS), (X, Y))

  size = len(X) // m
  losses, gs, g_sams = [], [], []
  for i in range(m):
    loss, g, g_sam = _np_two_passes(PARAMS, X[i * size : (i + 1) * size], Y[i * size : (i + 1) * size], rho)
    losses.append(loss)
    gs.append(g)
    g_sams.append(g_sam)
  mean = lambda trees: {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}
  np.testing.assert_allclose(float(out.loss), np.mean(losses), rtol=1e-5)
  _assert_tree_close(out.clean_grads, mean(gs))
  _assert_tree_close(out.perturbed_grads, mean(g_sams))
  # Not the full-batch SAM gradient: each sub-batch has its own eps.
  _, _, full = _np_two_passes(PARAMS, X, Y, rho)
  assert not np.allclose(np.asarray(out.perturbed_grads["w"]), full["w"], rtol=1e-4)
  # aux, kept stacked, has one entry per sub-batch; the state is that of the mean gradient.
  np.testing.assert_array_equal(np.asarray(out.aux["first_x"]), X[::size][:m])
  _assert_tree_close(out.perturbation_state.average, mean(gs))
  assert int(out.perturbation_state.count) == 1


@VARIANTS
def test_m_sharpness_splits_only_the_batch_argument(variant):
  def loss_with_scale(params, scale, batch):
    return scale * loss_fn(params, batch)

  perturbation = sam(0.2)
  grad_fn = variant(sharpness_aware_grad(loss_with_scale, perturbation, m_sharpness=2, batch_argnum=2))
  out = grad_fn(PARAMS, perturbation.init(PARAMS), jnp.float32(3.0), (X, Y))
  manual = [_np_two_passes(PARAMS, X[i * 4 : (i + 1) * 4], Y[i * 4 : (i + 1) * 4], 0.2) for i in range(2)]
  np.testing.assert_allclose(float(out.loss), 3.0 * np.mean([r[0] for r in manual]), rtol=1e-5)
  want = {k: 3.0 * np.mean([r[2][k] for r in manual], axis=0) for k in PARAMS}
  _assert_tree_close(out.perturbed_grads, want)


def test_m_sharpness_indivisible_batch():
  perturbation = sam(0.05)
  grad_fn = sharpness_aware_grad(loss_fn, perturbation, m_sharpness=4)
  with pytest.raises(ValueError, match=r"batch size 6 is not divisible by m_sharpness=4"):
    grad_fn(PARAMS, perturbation.init(PARAMS), (X[:6], Y[:6]))
  with pytest.raises(ValueError, match=r"batch size 6 is not divisible by m_sharpness=4"):
    jax.jit(grad_fn)(PARAMS, perturbation.init(PARAMS), (X[:6], Y[:6]))


# ---------------------------------------------------------------- bad input


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"m_sharpness must be an integer >= 1, got 0"):
    sharpness_aware_grad(loss_fn, sam(), m_sharpness=0)
  with pytest.raises(ValueError, match=r"m_sharpness must be an integer >= 1, got 2.0"):
    sharpness_aware_grad(loss_fn, sam(), m_sharpness=2.0)
  with pytest.raises(ValueError, match=r"batch_argnum must be >= 1 \(0 is params\), got 0"):
    sharpness_aware_grad(loss_fn, sam(), batch_argnum=0)
  with pytest.raises(TypeError, match=r"perturbation must be an optax.GradientTransformation"):
    sharpness_aware_grad(loss_fn, 0.05)
  grad_fn = sharpness_aware_grad(loss_fn, sam(), m_sharpness=2, batch_argnum=3)
  with pytest.raises(ValueError, match=r"batch_argnum=3 but loss_fn got only 1 arguments after params"):
    grad_fn(PARAMS, sam().init(PARAMS), (X, Y))


def _loss_with_ids(params, batch):
  """The "logits" name their examples; the "statistic" is the batch's mean id."""
  x = batch.astype(jnp.float32)
  return jnp.sum(params * x), (x[:, None], x.mean())


@pytest.mark.parametrize("m, k", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
def test_aux_reducers_undo_every_split(m, k):
  """Each example's id comes back in batch order; a per-piece mean comes back as the batch mean."""
  ids = jnp.arange(16)
  out = sharpness_aware_grad(
    _loss_with_ids, sam(0.1), has_aux=True, m_sharpness=m, accumulation_steps=k, aux_reducers=("concat", "mean")
  )(jnp.ones(()), sam(0.1).init(jnp.ones(())), ids)
  for aux in (out.aux, out.perturbed_aux):
    np.testing.assert_array_equal(np.asarray(aux[0])[:, 0], np.arange(16))
    assert aux[1].shape == () and float(aux[1]) == 7.5
  # The default averages every leaf: the ids' mean per position within a piece.
  default = sharpness_aware_grad(_loss_with_ids, sam(0.1), has_aux=True, m_sharpness=m, accumulation_steps=k)(
    jnp.ones(()), sam(0.1).init(jnp.ones(())), ids
  )
  pieces = np.arange(16).reshape(m, -1, k).transpose(0, 2, 1).reshape(m * k, -1)  # sub-batch, then micro-batch
  np.testing.assert_allclose(np.asarray(default.aux[0])[:, 0], pieces.mean(0))
  assert float(default.aux[1]) == 7.5
  # "stack" keeps the pieces, as 0.2.0 returned them; the deprecated aux_layout still reads it.
  stacked = sharpness_aware_grad(
    _loss_with_ids, sam(0.1), has_aux=True, m_sharpness=m, accumulation_steps=k, aux_reducers="stack"
  )(jnp.ones(()), sam(0.1).init(jnp.ones(())), ids)
  assert stacked.aux[0].ndim == 2 + int(m > 1) + int(k > 1)
  with pytest.warns(DeprecationWarning, match=r"aux_layout is deprecated \(saner_jax 0.3.0\) and goes in 0.4.0"):
    layout = aux_layout(m_sharpness=m, accumulation_steps=k)
  np.testing.assert_array_equal(np.asarray(layout.examples(stacked.aux[0]))[:, 0], np.arange(16))
  # The one-pass accumulation merges alike.
  (_, aux), _ = accumulated_value_and_grad(_loss_with_ids, k, has_aux=True, aux_reducers=("concat", "mean"))(
    jnp.ones(()), ids[: 16 // m]
  )
  np.testing.assert_array_equal(np.asarray(aux[0])[:, 0], np.arange(16 // m))
  np.testing.assert_allclose(float(aux[1]), (16 // m - 1) / 2)


def test_aux_reducers_mistakes_are_named():
  ids = jnp.arange(8)
  params = jnp.ones(())

  def int_aux(params, batch):
    return jnp.sum(params * batch), batch  # an integer leaf has no mean

  grad_fn = sharpness_aware_grad(int_aux, sam(0.1), has_aux=True, m_sharpness=2)
  with pytest.raises(ValueError, match=r"aux_reducers: an aux leaf of dtype int32 cannot be averaged"):
    grad_fn(params, sam(0.1).init(params), ids)
  # Unsplit, there is nothing to average: the aux comes back as it is.
  out = sharpness_aware_grad(int_aux, sam(0.1), has_aux=True)(params, sam(0.1).init(params), ids)
  np.testing.assert_array_equal(out.aux, ids)
  with pytest.raises(ValueError, match=r"aux_reducers leaves must be one of \('mean', 'concat', 'stack'\)"):
    sharpness_aware_grad(int_aux, sam(0.1), has_aux=True, aux_reducers=("mean", "sum"))
  with pytest.raises(ValueError, match=r"drop it or set has_aux=True"):
    sharpness_aware_grad(loss_fn, sam(0.1), aux_reducers="mean")
  with pytest.raises(ValueError, match=r"aux_reducers must be a prefix of the aux's tree structure"):
    sharpness_aware_grad(_loss_with_ids, sam(0.1), has_aux=True, m_sharpness=2, aux_reducers=("concat",) * 3)(
      params, sam(0.1).init(params), ids
    )
  with pytest.raises(ValueError, match=r'mode="per_device" splits the batch over devices: pass mesh='):
    sharpness_aware_grad(loss_fn, sam(0.1), mode="per_device")
  with pytest.raises(ValueError, match=r"mode must be one of \('synced', 'per_device'\)"):
    sharpness_aware_grad(loss_fn, sam(0.1), mode="sync")


@pytest.mark.parametrize("mode", ["synced", "per_device"])
def test_the_sharded_name_is_a_deprecated_alias_with_the_stacked_aux(mode):
  mesh = saner_jax.data_mesh(jax.devices()[:1])
  ids, params = jnp.arange(8), jnp.ones(())
  with pytest.warns(DeprecationWarning, match=r"sharded_sharpness_aware_grad is deprecated \(saner_jax 0.3.0\)"):
    alias = saner_jax.sharded_sharpness_aware_grad(_loss_with_ids, sam(0.1), mesh, mode=mode, has_aux=True)
  got = jax.jit(alias)(params, sam(0.1).init(params), ids)
  want = jax.jit(
    sharpness_aware_grad(_loss_with_ids, sam(0.1), has_aux=True, mesh=mesh, mode=mode, aux_reducers="stack")
  )(params, sam(0.1).init(params), ids)
  chex.assert_trees_all_equal(got, want)
  assert got.aux[0].shape == ((1, 8, 1) if mode == "per_device" else (8, 1))
  with pytest.warns(DeprecationWarning, match=r"sharded_aux_layout is deprecated"):
    layout = saner_jax.parallel.sharded_aux_layout(mode)
  np.testing.assert_array_equal(np.asarray(layout.examples(got.aux[0]))[:, 0], np.arange(8))
  with pytest.warns(DeprecationWarning, match=r"AuxLayout is deprecated"):
    assert saner_jax.AuxLayout is type(layout)


def test_the_old_module_name_is_a_deprecated_alias():
  import importlib
  import sys

  sys.modules.pop("saner_jax.sharpness", None)
  with pytest.warns(DeprecationWarning, match=r"saner_jax\.sharpness is deprecated .* import saner_jax\.two_pass"):
    old = importlib.import_module("saner_jax.sharpness")
  assert old.sharpness_aware_grad is saner_jax.two_pass.sharpness_aware_grad is saner_jax.sharpness_aware_grad

"""Gradient accumulation in the core, and the precision of bfloat16 compute.

``accumulated_value_and_grad`` and ``sharpness_aware_grad(...,
accumulation_steps=k)``: one perturbation from the clean gradient summed
over all micro-batches, then the perturbed gradient at ``w + eps`` summed
over the same micro-batches. Without BatchNorm that is the un-accumulated
step to float tolerance; with it, each micro-batch is checked by hand.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import saner_jax
from saner_jax import accumulated_value_and_grad, sharpness_aware_grad

_RNG = np.random.default_rng(0)
PARAMS = {
  "w": _RNG.normal(size=(3, 2)).astype(np.float32),
  "b": _RNG.normal(size=(2,)).astype(np.float32),
}
X = _RNG.normal(size=(16, 3)).astype(np.float32)
Y = _RNG.normal(size=(16, 2)).astype(np.float32)


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def loss_with_first_x(params, batch):
  return loss_fn(params, batch), batch[0][0]


def _close(got, want, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_accumulated_value_and_grad_is_the_full_batch_one(k):
  fn = jax.jit(accumulated_value_and_grad(loss_with_first_x, k, has_aux=True, aux_reducers="stack"))
  (value, first_x), grads = fn(PARAMS, (X, Y))
  (want_value, _), want_grads = jax.value_and_grad(loss_with_first_x, has_aux=True)(PARAMS, (X, Y))
  _close(value, want_value)
  _close(grads, want_grads)
  if k > 1:  # strided micro-batches: micro-batch i starts at example i
    np.testing.assert_array_equal(first_x, X[:k])
    assert "scan" in str(jax.make_jaxpr(accumulated_value_and_grad(loss_fn, k))(PARAMS, (X, Y)))
  else:
    np.testing.assert_array_equal(first_x, X[0])
  # By default the micro-batches' aux is averaged.
  (_, mean_first_x), _ = accumulated_value_and_grad(loss_with_first_x, k, has_aux=True)(PARAMS, (X, Y))
  _close(mean_first_x, X[:k].mean(0))


PERTURBATIONS = {
  "sam": lambda: saner_jax.sam(0.2),
  "asam": lambda: saner_jax.asam(0.5),
  "friendly_sam": lambda: saner_jax.friendly_sam(0.2),
  "vasso": lambda: saner_jax.vasso(0.2, theta=0.3),
}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_accumulated_saner_steps_equal_the_unaccumulated_ones(name):
  """A BatchNorm-free model: k = 4 micro-batches train as one batch, step for step."""
  perturbation = PERTURBATIONS[name]()
  tx = optax.chain(saner_jax.saner(0.5), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

  def trainer(k):
    grad_fn = sharpness_aware_grad(loss_fn, perturbation, accumulation_steps=k)

    @jax.jit
    def step(params, opt_state, p_state, batch):
      out = grad_fn(params, p_state, batch)
      updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
      return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out

    return step

  states = {k: (PARAMS, tx.init(PARAMS), perturbation.init(PARAMS)) for k in (1, 4)}
  steps = {k: trainer(k) for k in states}
  for i in range(3):
    batch = (np.roll(X, 3 * i, axis=0), np.roll(Y, 3 * i, axis=0))
    outs = {}
    for k in states:
      *states[k], outs[k] = steps[k](*states[k], batch)
    _close(outs[4], outs[1])
    _close(states[4], states[1])


class _BnNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(3, use_bias=False, name="dense_in")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, use_fast_variance=False, name="bn")(h)
    return nn.Dense(2, name="dense_out")(nn.relu(h))


def test_one_perturbation_from_the_clean_gradient_of_all_micro_batches_with_batchnorm():
  """Each micro-batch is normalised with its own statistics, in both passes."""
  model = _BnNet()
  variables = model.init(jax.random.key(0), X, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def bn_loss(params, batch_stats, batch):
    x, y = batch
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  k, rho = 4, 0.5
  perturbation = saner_jax.sam(rho)
  grad_fn = jax.jit(sharpness_aware_grad(bn_loss, perturbation, has_aux=True, accumulation_steps=k, batch_argnum=2))
  out = grad_fn(params, perturbation.init(params), batch_stats, (X, Y))

  micro = [(X[i::k], Y[i::k]) for i in range(k)]
  per_micro = [jax.value_and_grad(bn_loss, has_aux=True)(params, batch_stats, b) for b in micro]
  mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
  clean = mean([g for _, g in per_micro])
  eps, _ = saner_jax.sam(rho).update(clean, perturbation.init(params), params)
  shifted = optax.apply_updates(params, eps)
  perturbed = mean([jax.grad(lambda p, b: bn_loss(p, batch_stats, b)[0])(shifted, b) for b in micro])
  _close(out.loss, np.mean([loss for (loss, _), _ in per_micro]))
  _close(out.clean_grads, clean)
  _close(out.perturbed_grads, perturbed)
  # The clean pass's running averages, averaged over the micro-batches.
  _close(out.aux, mean([stats for (_, stats), _ in per_micro]))
  # Not the whole batch's BatchNorm: the step differs from the un-accumulated one.
  whole = sharpness_aware_grad(bn_loss, perturbation, has_aux=True, batch_argnum=2)(
    params, perturbation.init(params), batch_stats, (X, Y)
  )
  assert not np.allclose(out.clean_grads["dense_in"]["kernel"], whole.clean_grads["dense_in"]["kernel"], rtol=1e-3)


def test_accumulation_inside_m_sharpness():
  """m = 2 sub-batches, each accumulated over k = 2 micro-batches of its own."""
  perturbation = saner_jax.sam(0.2)
  out = sharpness_aware_grad(
    loss_with_first_x, perturbation, has_aux=True, m_sharpness=2, accumulation_steps=2, aux_reducers="stack"
  )(PARAMS, perturbation.init(PARAMS), (X, Y))
  halves = [
    sharpness_aware_grad(loss_fn, perturbation)(PARAMS, perturbation.init(PARAMS), (X[s], Y[s]))
    for s in (slice(0, 8), slice(8, 16))
  ]
  _close(
    out.perturbed_grads, jax.tree.map(lambda a, b: (a + b) / 2, halves[0].perturbed_grads, halves[1].perturbed_grads)
  )
  _close(out.loss, (halves[0].loss + halves[1].loss) / 2)
  # aux: [sub-batch, micro-batch]; micro-batch i of sub-batch j starts at 8 j + i.
  np.testing.assert_array_equal(out.aux, np.stack([X[[0, 1]], X[[8, 9]]]))


def test_low_precision_gradients_are_summed_in_float32():
  params16, batch16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), (PARAMS, (X, Y)))
  fn = accumulated_value_and_grad(loss_fn, 16)
  value, grads = fn(params16, batch16)
  assert value.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  [scan] = [e for e in jax.make_jaxpr(fn)(params16, batch16).eqns if e.primitive.name == "scan"]
  carry = scan.outvars[: scan.params["num_carry"]]
  assert {v.aval.dtype for v in carry} == {jnp.dtype(jnp.float32)}
  _, want = jax.value_and_grad(loss_fn)(PARAMS, (X, Y))
  _close(jax.tree.map(lambda g: g.astype(jnp.float32), grads), want, rtol=5e-2, atol=5e-2)


def test_bad_accumulation_arguments():
  with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1, got 0"):
    sharpness_aware_grad(loss_fn, saner_jax.sam(), accumulation_steps=0)
  with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1, got 2.0"):
    accumulated_value_and_grad(loss_fn, 2.0)
  grad_fn = sharpness_aware_grad(loss_fn, saner_jax.sam(), accumulation_steps=3)
  with pytest.raises(ValueError, match=r"batch size 16 is not divisible by accumulation_steps=3"):
    grad_fn(PARAMS, saner_jax.sam().init(PARAMS), (X, Y))


# ------------------------------------------------------------ bfloat16 compute


class _Bf16Net(nn.Module):
  """bfloat16 compute, float32 parameters: the trainer's ``dtype: bfloat16``."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x))
    return nn.Dense(2, dtype=jnp.bfloat16, param_dtype=jnp.float32)(h).astype(jnp.float32)


def test_bfloat16_compute_keeps_gradients_norms_and_masks_float32():
  model = _Bf16Net()
  params = model.init(jax.random.key(0), X)["params"]

  def bf16_loss(params, batch):
    x, y = batch
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  perturbation = saner_jax.sam(0.1)
  tx = saner_jax.saner(0.5)

  def step(params, batch):
    out = sharpness_aware_grad(bf16_loss, perturbation, accumulation_steps=2)(params, perturbation.init(params), batch)
    eps, _ = perturbation.update(out.clean_grads, perturbation.init(params), params)
    update, _ = tx.update(out.perturbed_grads, tx.init(params), params, clean_grads=out.clean_grads)
    return out, eps, update

  jaxpr = jax.make_jaxpr(step)(params, (X, Y))
  assert "bf16" in str(jaxpr)  # the model does compute in bfloat16
  out, eps, update = step(params, (X, Y))
  for tree in (out.clean_grads, out.perturbed_grads, eps, update):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}

  # SANER's group tests (array comparisons; scalar ones are its step count)
  # compare float32 gradients only.
  eqns = jax.make_jaxpr(lambda u, g: tx.update(u, tx.init(params), params, clean_grads=g))(
    out.perturbed_grads, out.clean_grads
  ).eqns
  compared = [v.aval for e in eqns if e.primitive.name in ("gt", "lt") for v in e.invars if v.aval.ndim]
  assert compared and {a.dtype for a in compared} == {jnp.dtype(jnp.float32)}

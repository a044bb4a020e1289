"""Policies for the second pass (saner_jax.policies) and their trainer flags.

The loss is a tiny non-convex regression, so every step is cheap; the
schedules are checked against values worked out by hand or with numpy from
the formulas in the docstrings.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMOKE_MODEL

import saner_jax
from saner_jax.train import cli, engine, loop
from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError, TrainConfig

_RNG = np.random.default_rng(0)
PARAMS = {"w": _RNG.normal(size=(3, 2)).astype(np.float32), "b": _RNG.normal(size=(2,)).astype(np.float32)}
X = _RNG.normal(size=(8, 3)).astype(np.float32)
Y = _RNG.normal(size=(8, 2)).astype(np.float32)


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((jnp.sin(3 * (x @ params["w"] + params["b"])) - y) ** 2)  # not convex: SAM shrinks some coordinates


def _batch(step):  # a different batch each step, so that the gradients and the groups change
  return X * (1.0 + 0.1 * step), Y


def _train(perturbation, tx, steps, *, m_sharpness=1, accumulation_steps=1):
  """``steps`` jitted steps of ``tx`` on the helper's gradients; returns params, states and the choices."""
  grad_fn = saner_jax.sharpness_aware_grad(
    loss_fn, perturbation, m_sharpness=m_sharpness, accumulation_steps=accumulation_steps
  )

  @jax.jit
  def step(params, p_state, opt_state, batch):
    out = grad_fn(params, p_state, batch)
    updates, opt_state = tx.update(
      out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads, sharpness_aware=out.sharpness_aware
    )
    return optax.apply_updates(params, updates), out.perturbation_state, opt_state, out.sharpness_aware

  params, p_state, opt_state, taken = PARAMS, perturbation.init(PARAMS), tx.init(PARAMS), []
  for t in range(steps):
    params, p_state, opt_state, take = step(params, p_state, opt_state, _batch(t))
    taken.append(bool(take))
  return params, p_state, opt_state, taken


def _saner_chain(**kwargs):
  return optax.chain(saner_jax.saner(0.5, **kwargs), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------
# The schedules


def test_every_k_steps_schedule_under_jit():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(3))
  *_, taken = _train(perturbation, _saner_chain(), 7)
  assert taken == [True, False, False, True, False, False, True]


def test_random_steps_are_the_seeded_draws_and_reproducible():
  p, key = 0.3, jax.random.key(7)
  expected = [bool(jax.random.uniform(jax.random.fold_in(key, t)) < p) for t in range(12)]
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.random_steps(p, key))
  first = _train(perturbation, _saner_chain(), 12)[3]
  again = _train(saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.random_steps(p, key)), _saner_chain(), 12)[3]
  assert first == again == expected
  other = _train(saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.random_steps(p, 8)), _saner_chain(), 12)[3]
  assert other != first
  # A schedule of p: 1 for the first 4 steps, then 0.
  policy = saner_jax.random_steps(lambda t: jnp.where(t < 4, 1.0, 0.0), 0)
  state, taken = policy.init(), []
  for _ in range(8):
    take, state = policy.decide(state, jnp.float32(0))
    taken.append(bool(take))
  assert taken == [True] * 4 + [False] * 4


def test_adaptive_steps_follow_the_running_fit_of_the_squared_norm():
  norms = np.abs(_RNG.normal(size=20)).astype(np.float32) * 3
  c, decay = 0.5, 0.9
  mean = variance = 0.0
  expected = []
  for n in norms:  # the docstring's recursion, in float64
    mean = decay * mean + (1 - decay) * n
    variance = decay * variance + (1 - decay) * (n - mean) ** 2
    expected.append(bool(n > mean + c * np.sqrt(variance)))
  policy = saner_jax.adaptive_steps(c, decay)
  decide = jax.jit(policy.decide)
  state, taken = policy.init(), []
  for n in norms:
    take, state = decide(state, jnp.float32(n))
    taken.append(bool(take))
  assert taken == expected and 0 < sum(taken) < len(taken)
  np.testing.assert_allclose([state.mean, state.variance], [mean, variance], rtol=1e-5)


def test_adaptive_steps_decide_on_the_clean_gradient_norm():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.adaptive_steps(0.0))
  grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
  out = grad_fn(PARAMS, perturbation.init(PARAMS), _batch(0))
  n = float(optax.tree.norm(out.clean_grads, squared=True))
  np.testing.assert_allclose(float(out.perturbation_state.policy.mean), 0.1 * n, rtol=1e-6)


def test_bad_policy_arguments():
  with pytest.raises(ValueError, match="k must be an integer >= 1"):
    saner_jax.every_k_steps(0)
  with pytest.raises(ValueError, match=r"p must be \[0.0, 1.0\]"):
    saner_jax.random_steps(1.5)
  with pytest.raises(ValueError, match="c must be >= 0"):
    saner_jax.adaptive_steps(-1.0)
  with pytest.raises(TypeError, match="SharpnessPolicy"):
    saner_jax.with_policy(saner_jax.sam(0.1), "every2")


# ---------------------------------------------------------------------------
# Equalities with SANER, SAM and the base optimizer


@pytest.mark.parametrize("policy", [saner_jax.every_k_steps(1), saner_jax.random_steps(1.0)], ids=["k1", "p1"])
@pytest.mark.parametrize("reuse_mask", [False, True])
def test_every_step_is_exactly_saner(policy, reuse_mask):
  reference = _train(saner_jax.sam(0.1), _saner_chain(), 4)
  cheap = _train(saner_jax.with_policy(saner_jax.sam(0.1), policy), _saner_chain(reuse_mask=reuse_mask), 4)
  _assert_trees_equal(cheap[0], reference[0])
  assert cheap[3] == [True] * 4


@pytest.mark.parametrize("reuse_mask", [False, True])
def test_p_zero_is_exactly_the_base_optimizer(reuse_mask):
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def sgd_step(params, opt_state, batch):
    updates, opt_state = base.update(jax.grad(loss_fn)(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = PARAMS, base.init(PARAMS)
  for t in range(4):
    params, opt_state = sgd_step(params, opt_state, _batch(t))
  cheap = _train(
    saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.random_steps(0.0)), _saner_chain(reuse_mask=reuse_mask), 4
  )
  _assert_trees_equal(cheap[0], params)
  assert cheap[3] == [False] * 4


def test_reused_mask_is_the_last_sharpness_aware_steps():
  """Every 2 steps: step 1 reweights its clean gradient with step 0's group-B mask."""
  perturbation = saner_jax.with_policy(saner_jax.sam(0.5), saner_jax.every_k_steps(2))
  grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
  tx = saner_jax.saner(0.5, reuse_mask=True)
  update = jax.jit(tx.update)
  p_state, state = perturbation.init(PARAMS), tx.init(PARAMS)
  out0 = grad_fn(PARAMS, p_state, _batch(0))
  mask0 = jax.tree.map(lambda u, g: saner_jax.group_mask(u, g, "B"), out0.perturbed_grads, out0.clean_grads)
  assert 0 < sum(int(m.sum()) for m in jax.tree.leaves(mask0)) < 8
  _, state = update(out0.perturbed_grads, state, clean_grads=out0.clean_grads, sharpness_aware=out0.sharpness_aware)
  _assert_trees_equal(state.mask, mask0)
  out1 = grad_fn(PARAMS, out0.perturbation_state, _batch(1))
  assert not out1.sharpness_aware
  _assert_trees_equal(out1.perturbed_grads, out1.clean_grads)
  d1, state = update(out1.perturbed_grads, state, clean_grads=out1.clean_grads, sharpness_aware=out1.sharpness_aware)
  _assert_trees_equal(state.mask, mask0)
  _assert_trees_equal(d1, jax.tree.map(lambda g, m: jnp.where(m, 0.5 * g, g), out1.clean_grads, mask0))
  # Without the reuse, the skipped step passes the clean gradient through.
  plain = saner_jax.saner(0.5)
  d1_plain, _ = plain.update(out1.perturbed_grads, plain.init(PARAMS), clean_grads=out1.clean_grads)
  _assert_trees_equal(d1_plain, out1.clean_grads)


def test_masked_and_multi_transform_reuse_the_mask_of_their_parameters():
  only_w = {"w": True, "b": False}
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  sgd = optax.sgd(0.1)
  masked = _train(perturbation, optax.chain(optax.masked(saner_jax.saner(0.5, reuse_mask=True), only_w), sgd), 3)
  multi = _train(
    perturbation,
    optax.chain(
      optax.multi_transform(
        {"saner": saner_jax.saner(0.5, reuse_mask=True), "sam": optax.identity()}, {"w": "saner", "b": "sam"}
      ),
      sgd,
    ),
    3,
  )
  _assert_trees_equal(masked[0], multi[0])
  _, _, opt_state, taken = masked
  assert taken == [True, False, True]
  inner = opt_state[0].inner_state
  assert isinstance(inner.mask["b"], optax.MaskedNode) and inner.mask["w"].dtype == bool


def test_inject_hyperparams_and_apply_if_finite():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  injected = optax.chain(optax.inject_hyperparams(saner_jax.saner)(alpha=0.5, reuse_mask=True), optax.sgd(0.1))
  plain = optax.chain(saner_jax.saner(0.5, reuse_mask=True), optax.sgd(0.1))
  # Compiled apart, the two chains may round one coordinate differently in its last bit.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    _train(perturbation, injected, 3)[0],
    _train(perturbation, plain, 3)[0],
  )
  guarded = optax.apply_if_finite(plain, max_consecutive_errors=2)
  guarded_run = _train(perturbation, guarded, 3)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), guarded_run[0], _train(perturbation, plain, 3)[0]
  )
  assert guarded_run[3] == [True, False, True] and int(guarded_run[2].notfinite_count) == 0


# ---------------------------------------------------------------------------
# A smaller step on the one-pass steps


def test_scaled_one_pass_steps_by_hand():
  """Every 2 steps, factor 0.5, plain SGD at lr 0.1: steps 1 and 3 move half as far on their own gradients."""
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  scaled = _train(perturbation, optax.chain(saner_jax.scale_one_pass_steps(0.5), optax.sgd(0.1)), 4)
  assert scaled[3] == [True, False, True, False]
  grad_fn = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
  params, p_state = PARAMS, perturbation.init(PARAMS)
  for t in range(4):
    out = grad_fn(params, p_state, _batch(t))
    step = 0.1 if t % 2 == 0 else 0.05
    params = jax.tree.map(lambda p, g, step=step: p - step * g, params, out.perturbed_grads)
    p_state = out.perturbation_state
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), scaled[0], params)
  assert int(scaled[2][0].count) == 4


def test_scale_one_is_the_identity_and_a_schedule_is_read_at_the_step():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  unscaled = _train(perturbation, _saner_chain(reuse_mask=True), 4)
  one_chain = optax.chain(
    saner_jax.saner(0.5, reuse_mask=True),
    saner_jax.scale_one_pass_steps(1.0),
    optax.add_decayed_weights(5e-4),
    optax.sgd(0.1, momentum=0.9),
  )
  one = _train(perturbation, one_chain, 4)
  _assert_trees_equal(one[0], unscaled[0])
  # A schedule of 0.5 until step 2, then 0.25: step 1 takes 0.5, step 3 takes 0.25.
  tx = saner_jax.scale_one_pass_steps(optax.piecewise_constant_schedule(0.5, {2: 0.5}))
  g, state, factors = {"w": jnp.ones(2)}, tx.init(None), []
  for t in range(4):
    out, state = tx.update(g, state, sharpness_aware=jnp.array(t % 2 == 0))
    factors.append(float(out["w"][0]))
  assert factors == [1.0, 0.5, 1.0, 0.25]


def test_scaled_one_pass_steps_in_masked_multi_transform_and_inject_hyperparams():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  only_w = {"w": True, "b": False}
  masked = _train(
    perturbation, optax.chain(optax.masked(saner_jax.scale_one_pass_steps(0.5), only_w), optax.sgd(0.1)), 3
  )
  multi = _train(
    perturbation,
    optax.chain(
      optax.multi_transform(
        {"scaled": saner_jax.scale_one_pass_steps(0.5), "full": optax.identity()}, {"w": "scaled", "b": "full"}
      ),
      optax.sgd(0.1),
    ),
    3,
  )
  _assert_trees_equal(masked[0], multi[0])
  # One update by hand: only w's one-pass update is scaled.
  tx = optax.masked(saner_jax.scale_one_pass_steps(0.5), only_w)
  g = {"w": jnp.full((3, 2), 2.0), "b": jnp.full(2, 2.0)}
  out, _ = tx.update(g, tx.init(g), sharpness_aware=jnp.array(False))
  _assert_trees_equal(out, {"w": jnp.ones((3, 2)), "b": g["b"]})
  injected = _train(
    perturbation, optax.chain(optax.inject_hyperparams(saner_jax.scale_one_pass_steps)(factor=0.5), optax.sgd(0.1)), 3
  )
  plain = _train(perturbation, optax.chain(saner_jax.scale_one_pass_steps(0.5), optax.sgd(0.1)), 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), injected[0], plain[0])


@pytest.mark.parametrize(
  ("factor", "error"),
  [
    (0.0, r"factor must be in \(0, 1\], got 0: "),
    (optax.linear_schedule(0.0, 1.0, 10), r"got 0 \(the schedule's value at step 0\)"),
    (1.5, r"factor must be \[0.0, 1.0\], got 1.5"),
    ("half", "float"),
  ],
)
def test_bad_one_pass_scale(factor, error):
  with pytest.raises((ValueError, TypeError), match=error):
    saner_jax.scale_one_pass_steps(factor)


# ---------------------------------------------------------------------------
# m-sharpness, accumulation, the sharded helper, vmap and the compiled cost


@pytest.mark.parametrize(("m", "k"), [(2, 1), (1, 2), (2, 2)])
def test_policy_with_m_sharpness_and_accumulation(m, k):
  plain = saner_jax.sharpness_aware_grad(loss_fn, saner_jax.vasso(0.1), m_sharpness=m, accumulation_steps=k)
  perturbation = saner_jax.with_policy(saner_jax.vasso(0.1), saner_jax.every_k_steps(2))
  cheap = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation, m_sharpness=m, accumulation_steps=k))
  ref0 = plain(PARAMS, saner_jax.vasso(0.1).init(PARAMS), _batch(0))
  out0 = cheap(PARAMS, perturbation.init(PARAMS), _batch(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out0.perturbed_grads, ref0.perturbed_grads)
  out1 = cheap(PARAMS, out0.perturbation_state, _batch(1))
  ref1 = plain(PARAMS, ref0.perturbation_state, _batch(1))
  # The skipped step: the clean gradient, and the perturbation's average still advanced.
  assert not out1.sharpness_aware
  _assert_trees_equal(out1.perturbed_grads, out1.clean_grads)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    out1.perturbation_state.perturbation,
    ref1.perturbation_state,
  )


@pytest.mark.parametrize("mode", ["synced", "per_device"])
def test_sharded_helper_with_an_adaptive_policy(mode):
  mesh = saner_jax.data_mesh(jax.devices()[:1])
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.adaptive_steps(0.5))
  sharded = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation, mesh=mesh, mode=mode))
  single = jax.jit(saner_jax.sharpness_aware_grad(loss_fn, perturbation))
  s_state = p_state = perturbation.init(PARAMS)
  for t in range(4):
    out, ref = sharded(PARAMS, s_state, _batch(t)), single(PARAMS, p_state, _batch(t))
    assert bool(out.sharpness_aware) == bool(ref.sharpness_aware)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out.perturbed_grads, ref.perturbed_grads)
    s_state, p_state = out.perturbation_state, ref.perturbation_state


def test_vmap_turns_the_cond_into_a_select_with_right_results():
  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, perturbation)
  state = perturbation.init(PARAMS)
  states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  states = states._replace(policy=states.policy._replace(count=jnp.array([0, 1], jnp.int32)))
  out = jax.vmap(grad_fn, in_axes=(None, 0, None))(PARAMS, states, _batch(0))
  one = grad_fn(PARAMS, state, _batch(0))
  np.testing.assert_array_equal(out.sharpness_aware, [True, False])
  np.testing.assert_allclose(out.perturbed_grads["w"][0], one.perturbed_grads["w"], rtol=1e-6)
  np.testing.assert_allclose(out.perturbed_grads["w"][1], one.clean_grads["w"], rtol=1e-6)


def test_compiled_step_skips_the_second_pass():
  """XLA keeps the cond; with the choice a constant, the one-pass step has about half the flops."""
  x = jnp.asarray(_RNG.normal(size=(64, 32)), jnp.float32)
  params = {"w1": jnp.ones((32, 64)) / 8, "w2": jnp.ones((64, 10)) / 8}

  def mlp_loss(p, xb):
    return jnp.mean(jnp.tanh(xb @ p["w1"]) @ p["w2"])

  perturbation = saner_jax.with_policy(saner_jax.sam(0.1), saner_jax.every_k_steps(2))
  grad_fn = saner_jax.sharpness_aware_grad(mlp_loss, perturbation)
  state = perturbation.init(params)

  def flops(compiled):
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

  runtime = jax.jit(lambda s: grad_fn(params, s, x).perturbed_grads).lower(state).compile()
  assert "conditional" in runtime.as_text()
  fixed = {}
  for count in (0, 1):  # the state a constant: XLA folds the choice
    s = state._replace(policy=saner_jax.policies.CountState(jnp.int32(count)))
    fixed[count] = flops(jax.jit(lambda s=s: grad_fn(params, s, x).perturbed_grads).lower().compile())
  sgd = flops(jax.jit(lambda: jax.grad(mlp_loss)(params, x)).lower().compile())
  assert fixed[1] < 0.6 * fixed[0]
  assert abs(fixed[1] - sgd) < 0.1 * sgd


# ---------------------------------------------------------------------------
# The trainer


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--sam_policy", "every", "--sam_every", "0"], "error: --sam_every: must be >= 1, got 0"),
    (["--sam_policy", "random", "--sam_prob", "1.5"], "error: --sam_prob: must be in [0, 1], got 1.5"),
    (["--sam_policy", "adaptive", "--sam_c", "-1"], "error: --sam_c: must be >= 0, got -1.0"),
    (["--sam_every", "3"], "error: --sam_every: applies to --sam_policy every only"),
    (["--optimizer", "sgd", "--sam_policy", "every"], "error: --sam_policy: chooses the steps"),
    (["--optimizer", "sam", "--sam_policy", "every", "--saner_reuse_mask", "true"], "error: --saner_reuse_mask"),
    (["--sam_policy", "every", "--sam_one_pass_scale", "0"], "error: --sam_one_pass_scale: must be in (0, 1], got 0"),
    (["--sam_one_pass_scale", "0.5"], "error: --sam_one_pass_scale: weighs the one-pass steps' gradients"),
  ],
)
def test_bad_policy_flags_are_one_line_errors(flags, message, capsys, tmp_path):
  assert cli.main([*flags, "--out_dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize(
  ("name", "values"),
  [
    ("saner@every2", {"optimizer": "saner", "sam_policy": "every", "sam_every": 2, "saner_reuse_mask": False}),
    ("sam@p0.25", {"optimizer": "sam", "sam_policy": "random", "sam_prob": 0.25}),
    ("saner@ae1-reuse", {"optimizer": "saner", "sam_policy": "adaptive", "sam_c": 1.0, "saner_reuse_mask": True}),
    ("asam+saner_head@every3", {"optimizer": "asam", "saner": True, "saner_params": "head", "sam_every": 3}),
    ("saner", {"sam_policy": "always", "sam_every": 2, "saner_reuse_mask": False, "sam_one_pass_scale": 1.0}),
    (
      "saner@every2-scale0.4",
      {"sam_policy": "every", "sam_every": 2, "saner_reuse_mask": False, "sam_one_pass_scale": 0.4},
    ),
    (
      "saner@ae0-reuse-scale0.5",
      {"sam_policy": "adaptive", "sam_c": 0.0, "saner_reuse_mask": True, "sam_one_pass_scale": 0.5},
    ),
  ],
)
def test_run_names_with_policies_round_trip(name, values):
  got = config_lib.run_name_values(name)
  assert {k: got[k] for k in values} == values
  assert config_lib.from_mapping(got).validate().run_name == name


def test_the_trainer_scales_the_one_pass_steps_after_the_decayed_weights():
  """saner -> the one-pass scale -> L2 -> SGD: a skipped step's update by hand (weight decay unscaled), and a
  two-pass step's unscaled."""
  from saner_jax.train import step as step_lib

  cfg = TrainConfig(
    optimizer="saner", alpha=0.5, alpha_warmup_epochs=0, lr=0.1, weight_decay=0.01, momentum=0.0,
    sam_policy="every", sam_one_pass_scale=0.25,
  ).validate()  # fmt: skip
  tx = step_lib.build_optimizer(cfg, steps_per_epoch=1).tx
  params, clean = {"w": jnp.array([1.0, 1.0, 1.0])}, {"w": jnp.array([2.0, 2.0, -1.0])}
  perturbed = {"w": jnp.array([1.0, 3.0, 1.0])}  # B, A, C
  two_pass, _ = tx.update(perturbed, tx.init(params), params, clean_grads=clean, sharpness_aware=jnp.array(True))
  np.testing.assert_allclose(two_pass["w"], -0.1 * (np.array([0.5, 3.0, 1.0]) + 0.01), rtol=1e-6)
  one_pass, _ = tx.update(clean, tx.init(params), params, clean_grads=clean, sharpness_aware=jnp.array(False))
  np.testing.assert_allclose(one_pass["w"], -0.1 * (0.25 * np.array([2.0, 2.0, -1.0]) + 0.01), rtol=1e-6)


@pytest.mark.parametrize(
  "name",
  ["saner@sometimes", "saner@every2-scale", "saner@every2-scale1", "saner@every2-scale0.4-reuse", "saner@everyx"],
)
def test_bad_policy_run_name(name):
  with pytest.raises(ConfigError) as error:
    config_lib.run_name_values(name)
  message = str(error.value)
  assert message.startswith(f"--runs: {name} is not a policy of the forms") and "\n" not in message


def test_resumed_run_continues_the_policy_exactly(tmp_path, idx_dir):
  """An adaptive run stopped after epoch 1 and resumed logs what the straight run logs."""
  tiny = dict(
    model=SMOKE_MODEL, epochs=2, batch_size=32, train_examples=96, test_examples=32, eval_batch_size=32,
    alpha_warmup_epochs=2, progress="none", data_dir=str(idx_dir), cpu_conv="false",
    sam_policy="random", sam_prob=0.5, saner_reuse_mask=True,
  )  # fmt: skip

  def records(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")} for line in lines]

  straight = tmp_path / "straight"
  loop.train(config_lib.from_mapping({**tiny, "out_dir": str(straight)}))

  def stop_in_epoch_2(run):
    recipe = engine.supervised(run)

    def epoch(state, number):
      if number == 2:
        raise KeyboardInterrupt
      return recipe.epoch(state, number)

    return recipe._replace(epoch=epoch)

  stopped = tmp_path / "stopped"
  config = config_lib.from_mapping({**tiny, "out_dir": str(stopped)})
  with pytest.raises(loop.RunStopped):
    loop.train(config, recipe=stop_in_epoch_2)
  loop.train(config_lib.from_mapping({**tiny, "out_dir": str(stopped)}), resume=True)
  assert records(stopped) == records(straight)
  shares = [r["sam_share"] for r in records(straight)]
  assert all(0.0 <= s <= 1.0 for s in shares) and shares != [1.0, 1.0]
  assert TrainConfig().sam_policy == "always"

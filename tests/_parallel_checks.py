"""Data-parallel checks on 8 simulated CPU devices, one per subprocess.

The device count is fixed when jax starts (``XLA_FLAGS``), so these cannot
run in the pytest process; ``tests/test_parallel.py`` runs
``python tests/_parallel_checks.py CHECK [ARGS...]`` for each check, and a
check passes when the process exits 0.

Every reference runs on one device (``jax.devices()[0]``) in the same
process: the single-device helper on the same global batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import saner_jax
from saner_jax import parallel

DEVICES = 8
MESH = parallel.data_mesh()
REPLICATED = NamedSharding(MESH, P())
ONE_DEVICE = jax.devices()[0]
CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


class BnNet(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dense: BatchNorm couples the examples.

  Before BatchNorm the Dense has no bias (its gradient would be rounding
  noise), and the variance is the two-pass one: the default E[x^2] - E[x]^2
  cancels badly on the 4-example shards of the per-device mode.
  """

  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(4, use_bias=not self.batch_norm, name="dense_in")(x)
    if self.batch_norm:
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, use_fast_variance=False, name="bn")(h)
    return nn.Dense(3, name="dense_out")(nn.relu(h))


def make_problem(batch_norm=True, batch=32, steps=3):
  """Model, loss (aux: new batch stats and logits), variables and batches."""
  model = BnNet(batch_norm)
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, batch, 5)).astype(np.float32)
  ys = rng.integers(0, 3, (steps, batch)).astype(np.int32)
  variables = model.init(jax.random.key(0), xs[0], train=False)

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (updates.get("batch_stats", {}), logits)

  return loss_fn, variables["params"], variables.get("batch_stats", {}), list(zip(xs, ys))


def assert_close(got, want, rtol=1e-5, atol=1e-6):
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol),
    got,
    want,
  )


def on_one_device(tree):
  return jax.device_put(tree, ONE_DEVICE)


def replicated(tree):
  return jax.device_put(tree, REPLICATED)


def train(grad_fn, params, batch_stats, perturbation, batches, place):
  """A few SANER steps; returns every step's loss and the final state (the aux comes back merged)."""
  tx = optax.chain(saner_jax.saner(0.5), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def step(params, batch_stats, opt_state, perturbation_state, batch):
    out = grad_fn(params, perturbation_state, batch_stats, batch)
    new_stats = out.aux[0]
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return optax.apply_updates(params, updates), new_stats, opt_state, out.perturbation_state, out.loss

  state = place((params, batch_stats, tx.init(params), perturbation.init(params)))
  losses = []
  for batch in batches:
    *state, loss = step(*state, place(batch))
    losses.append(loss)
  return losses, state


@check
def synced_equals_single_device():
  """Synced mode: several SANER steps over 8 devices = one device on the global batch."""
  loss_fn, params, batch_stats, batches = make_problem()
  perturbation = saner_jax.friendly_sam(0.1)
  single = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)
  synced = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2, mesh=MESH, mode="synced")
  want_losses, want = train(single, params, batch_stats, perturbation, batches, on_one_device)
  got_losses, got = train(synced, params, batch_stats, perturbation, batches, replicated)
  assert got[0]["dense_in"]["kernel"].sharding.num_devices == DEVICES
  assert_close(got_losses, want_losses)
  assert_close(got, want)  # params, BatchNorm statistics, optimizer and perturbation states


@check
def per_device_equals_m_sharpness_helper():
  """Per-device mode = sharpness_aware_grad(m_sharpness=8), step by step and state by state."""
  loss_fn, params, batch_stats, batches = make_problem()
  perturbation = saner_jax.vasso(0.1, theta=0.3)  # a float state: averaged over devices
  helper = saner_jax.sharpness_aware_grad(
    loss_fn, perturbation, has_aux=True, m_sharpness=DEVICES, batch_argnum=2, aux_reducers=("mean", "concat")
  )
  per_device = saner_jax.sharpness_aware_grad(
    loss_fn, perturbation, has_aux=True, batch_argnum=2, mesh=MESH, mode="per_device", aux_reducers=("mean", "concat")
  )
  # One step, every output, the merged aux (batch stats, logits) included.
  state = perturbation.init(params)
  want = jax.jit(helper)(*on_one_device((params, state, batch_stats, batches[0])))
  got = jax.jit(per_device)(*replicated((params, state, batch_stats, batches[0])))
  assert got.aux[1].shape == (DEVICES * 4, 3), got.aux[1].shape
  assert_close(got, want)
  # Each device perturbed with its own gradient: not the synced result.
  synced = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)
  full = jax.jit(synced)(*on_one_device((params, state, batch_stats, batches[0])))
  assert not np.allclose(
    got.perturbed_grads["dense_in"]["kernel"], full.perturbed_grads["dense_in"]["kernel"], rtol=1e-3
  )
  # Several training steps, running averages averaged over the sub-batches.
  want_losses, want = train(helper, params, batch_stats, perturbation, batches, on_one_device)
  got_losses, got = train(per_device, params, batch_stats, perturbation, batches, replicated)
  assert_close(got_losses, want_losses)
  assert_close(got, want)


@check
def batchnorm_statistics():
  """Synced: BatchNorm over the global batch. Per-device: over each shard (ghost BN)."""
  loss_fn, params, batch_stats, batches = make_problem()
  x, _ = batches[0]
  h = x.astype(np.float64) @ np.asarray(params["dense_in"]["kernel"], np.float64)
  shards = h.reshape(DEVICES, -1, h.shape[-1])
  perturbation = saner_jax.sam(0.1)
  inputs = replicated((params, perturbation.init(params), batch_stats, batches[0]))
  outs = {}
  for mode in parallel.PERTURBATION_MODES:
    grad_fn = saner_jax.sharpness_aware_grad(
      loss_fn, perturbation, has_aux=True, batch_argnum=2, mesh=MESH, mode=mode, aux_reducers="stack"
    )
    outs[mode] = jax.jit(grad_fn)(*inputs).aux[0]["bn"]
  # flax momentum 0.9: new = 0.9 old + 0.1 batch statistic; mean 0 and var 1 initially.
  assert_close(outs["synced"]["mean"], 0.1 * h.mean(0))
  assert_close(outs["synced"]["var"], 0.9 + 0.1 * h.var(0))
  assert_close(outs["per_device"]["mean"], 0.1 * shards.mean(1))
  assert_close(outs["per_device"]["var"], 0.9 + 0.1 * shards.var(1))
  # Averaged over devices: the global mean, but the mean of per-shard variances.
  assert_close(outs["per_device"]["mean"].mean(0), outs["synced"]["mean"])
  assert not np.allclose(outs["per_device"]["var"].mean(0), outs["synced"]["var"], rtol=1e-4)


@check
def accumulation_over_devices():
  """Accumulation composes with both modes; BN-free it equals the un-accumulated step."""
  perturbation = saner_jax.sam(0.1)
  # BN-free, synced, 4 micro-batches = one device, no accumulation.
  loss_fn, params, batch_stats, batches = make_problem(batch_norm=False)
  plain = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)
  accumulated = saner_jax.sharpness_aware_grad(
    loss_fn, perturbation, has_aux=True, accumulation_steps=4, batch_argnum=2, mesh=MESH
  )
  want_losses, want = train(plain, params, batch_stats, perturbation, batches, on_one_device)
  got_losses, got = train(accumulated, params, batch_stats, perturbation, batches, replicated)
  assert_close(got_losses, want_losses)
  assert_close(got, want)
  # With BatchNorm: synced = the helper's accumulation on one device, and
  # per-device with m_sharpness 2 = the helper with m = 16, both with k = 2.
  loss_fn, params, batch_stats, batches = make_problem(batch=128, steps=1)
  state = perturbation.init(params)
  for mode, m_sharpness, helper_m in (("synced", 1, 1), ("per_device", 2, 2 * DEVICES)):
    helper = saner_jax.sharpness_aware_grad(
      loss_fn, perturbation, has_aux=True, m_sharpness=helper_m, accumulation_steps=2, batch_argnum=2
    )
    sharded = saner_jax.sharpness_aware_grad(
      loss_fn,
      perturbation,
      has_aux=True,
      m_sharpness=m_sharpness,
      accumulation_steps=2,
      batch_argnum=2,
      mesh=MESH,
      mode=mode,
    )
    want = jax.jit(helper)(*on_one_device((params, state, batch_stats, batches[0])))
    got = jax.jit(sharded)(*replicated((params, state, batch_stats, batches[0])))
    assert_close(got, want)


@check
def aux_reducers_put_sub_batch_outputs_back_in_order():
  """The aux merged on a mesh undoes every split: m-sharpness, devices, micro-batches."""

  def loss_fn(params, batch_stats, batch):
    # "Logits" that name their examples, batch stats that are the mean id.
    ids = batch.astype(jnp.float32)
    return jnp.sum(params["w"] * ids), ({"mean_id": ids.mean()}, ids[:, None])

  params = {"w": jnp.ones(())}
  ids = jnp.arange(64)
  for mode, m_sharpness, k in (("synced", 1, 2), ("synced", 2, 4), ("per_device", 1, 1), ("per_device", 2, 2)):
    grad_fn = saner_jax.sharpness_aware_grad(
      loss_fn,
      saner_jax.sam(0.1),
      has_aux=True,
      m_sharpness=m_sharpness,
      accumulation_steps=k,
      batch_argnum=2,
      mesh=MESH,
      mode=mode,
      aux_reducers=("mean", "concat"),
    )
    out = jax.jit(grad_fn)(*replicated((params, saner_jax.sam(0.1).init(params), {}, ids)))
    stats, logits = out.aux
    np.testing.assert_array_equal(np.asarray(logits[:, 0]), np.arange(64), err_msg=f"{mode} m={m_sharpness} k={k}")
    np.testing.assert_allclose(float(stats["mean_id"]), 31.5)


@check
def bn_stats_perturbed_over_devices():
  """The trainer's step with the authors' BatchNorm order: 8 devices = one device on the same pieces.

  Synced: the global batch, as on one device. Per-device: each shard is a
  sub-batch, as one device's m_sharpness=8. With accumulation, each (sub-)
  batch's micro-batches too. Both the perturbed pass's statistics and the
  third, forward-only pass's at the new weights are taken over those pieces.
  """
  from saner_jax.train import step as step_lib
  from saner_jax.train.config import TrainConfig

  _, params, batch_stats, batches = make_problem()
  x, y = batches[0]
  one_device = parallel.data_mesh(jax.devices()[:1])

  def run(mesh, place, **values):
    config = TrainConfig(optimizer="saner", batch_size=32, bn_stats="perturbed", **values)
    optimizer = step_lib.build_optimizer(config, steps_per_epoch=1)
    state = step_lib.TrainState(
      jnp.zeros([], jnp.int32), params, batch_stats, optimizer.tx.init(params), optimizer.perturbation.init(params)
    )
    update = jax.jit(step_lib.make_update(BnNet(), optimizer, config, mesh=mesh))
    new_state, *_ = update(place(state), place(x), place(y))
    return new_state

  for accumulation in (1, 2):
    synced = run(MESH, replicated, grad_accum_steps=accumulation)
    assert_close(synced, run(one_device, on_one_device, grad_accum_steps=accumulation))
    got = run(MESH, replicated, perturbation_mode="per_device", grad_accum_steps=accumulation)
    assert_close(got, run(one_device, on_one_device, m_sharpness=DEVICES, grad_accum_steps=accumulation))
    # Ghost BatchNorm over the shards, not the global batch's statistics.
    assert not np.allclose(got.batch_stats["bn"]["var"], synced.batch_stats["bn"]["var"], rtol=1e-4)


@check
def trainer_synced_run(config_json):
  """The trainer on 8 devices; the test compares its metrics with a 1-device run."""
  from saner_jax.train import TrainConfig, loop

  summary = loop.train(TrainConfig(**json.loads(config_json)))
  assert summary["devices"] == DEVICES


@check
def trainer_per_device_accumulation_and_bad_batch_sizes(config_json):
  """A per-device run with accumulation trains; indivisible batch sizes and cpu_conv are refused by flag."""
  from saner_jax.train import TrainConfig, loop
  from saner_jax.train.config import ConfigError

  values = json.loads(config_json)
  summary = loop.train(TrainConfig(**{**values, "perturbation_mode": "per_device", "grad_accum_steps": 2}))
  final = summary["final"]
  assert np.isfinite(final["train_loss"]) and 0.0 < final["group_B"] < 1.0, final
  for overrides, flag in (
    (dict(batch_size=36), "--batch_size: 36 does not split over the 8 devices"),
    (
      dict(batch_size=32, perturbation_mode="per_device", m_sharpness=2, grad_accum_steps=4),
      "--batch_size: perturbation_mode per_device",
    ),
    (dict(cpu_conv=True), "--cpu_conv: its oneDNN convolutions are custom calls"),
  ):
    try:
      loop.train(TrainConfig(**{**values, "out_dir": values["out_dir"] + "_bad", **overrides}))
    except ConfigError as e:
      if flag not in str(e):
        raise AssertionError(f"{overrides}: {e}") from e
    else:
      raise AssertionError(f"{overrides} was accepted")


if __name__ == "__main__":
  assert jax.device_count() == DEVICES, jax.devices()
  name, *args = sys.argv[1:]
  CHECKS[name](*args)
  print(f"{name}: ok")

"""The documentation guides' code (docs/examples/) does what the guides say.

Each example's train step is checked against one step written out by hand:
SAM's perturbation, the group-B mask, SANER's factor and plain SGD (the
first step of heavy-ball momentum is plain SGD).
"""

import json
import os
import pathlib
import runpy
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"


def example(name: str) -> dict:
  """The example's module namespace, without running its __main__ block."""
  return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"docs_example_{name}")


def reference_step(loss, params, batch, *, rho=0.1, alpha=0.5, lr=0.1, weight_decay=0.0):
  """One SAM + SANER + SGD step, written out; ``alpha`` may be a tree of per-leaf factors."""

  @jax.jit  # one program: run eagerly, each operation would compile alone
  def step(params, batch, alphas):
    g = jax.grad(loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    g_sam = jax.grad(loss)(jax.tree.map(lambda w, x: w + rho * x / (norm + 1e-12), params, g), batch)
    d = jax.tree.map(lambda s, c, a: jnp.where((s * c > 0) & (jnp.abs(s) < jnp.abs(c)), a * s, s), g_sam, g, alphas)
    return jax.tree.map(lambda w, u: w - lr * (u + weight_decay * w), params, d)

  return step(params, batch, jax.tree.map(lambda _: alpha, params) if np.isscalar(alpha) else alpha)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


def _linear_params(key, features=8, classes=3):
  kw, kb = jax.random.split(key)
  return {"w": jax.random.normal(kw, (features, classes)) / 3, "b": jax.random.normal(kb, (classes,)) / 3}


def test_optax_chain_step_is_sam_then_saner_then_decay_then_sgd():
  ns = example("optax_chain")
  params = _linear_params(jax.random.key(3))
  batch = ns["synthetic_batch"](jax.random.key(4))
  perturbation, tx, train_step = ns["make_train_step"](rho=0.1, alpha=0.5, lr=0.1, weight_decay=5e-4)
  new_params, *_ = train_step(params, tx.init(params), perturbation.init(params), batch)
  want = reference_step(ns["loss_fn"], params, batch, rho=0.1, alpha=0.5, lr=0.1, weight_decay=5e-4)
  assert_trees_close(new_params, want)


def test_optax_chain_trains():
  _, losses = example("optax_chain")["main"](steps=20)
  assert losses[-1] < 0.5 * losses[0]


def test_nnx_step_equals_the_functional_step_and_keeps_clean_statistics():
  from flax import nnx

  ns = example("nnx_batchnorm")
  model = ns["Net"](nnx.Rngs(0))
  reference = nnx.clone(model)  # the step updates `model` in place
  optimizer = nnx.Optimizer(model, ns["tx"], wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  batch = (x, jnp.arange(16) % 3)
  ns["train_step"](model, optimizer, ns["sam"].init(nnx.state(model, nnx.Param)), batch)

  graphdef, params, rest = nnx.split(reference, nnx.Param, ...)

  def loss(params, batch):
    net = nnx.merge(graphdef, params, rest, copy=True)
    return optax.softmax_cross_entropy_with_integer_labels(net(batch[0]), batch[1]).mean()

  assert_trees_close(nnx.state(model, nnx.Param), reference_step(loss, params, batch))
  clean = nnx.merge(graphdef, params, rest, copy=True)
  clean(x)  # train mode: one update of the running averages, at the clean params
  assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(clean, nnx.BatchStat))
  assert not np.allclose(model.norm.mean[...], reference.norm.mean[...])  # they did move


def test_linen_step_equals_the_functional_step_and_keeps_clean_statistics():
  ns = example("linen_batchnorm")
  model = ns["model"]
  x = jax.random.normal(jax.random.key(1), (16, 8))
  batch = (x, jnp.arange(16) % 3)
  variables = model.init(jax.random.key(2), x, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  new_params, new_stats, *_ = ns["train_step"](params, stats, ns["tx"].init(params), ns["sam"].init(params), batch)

  loss = lambda p, b: ns["loss_fn"](p, stats, b)[0]
  assert_trees_close(new_params, reference_step(loss, params, batch))
  assert_trees_close(new_stats, ns["loss_fn"](params, stats, batch)[1])


def test_equinox_step_equals_the_functional_step():
  import equinox as eqx

  ns = example("equinox_mlp")
  model = eqx.nn.MLP(in_size=8, out_size=3, width_size=16, depth=1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  batch = (jax.random.normal(jax.random.key(1), (16, 8)), jnp.arange(16) % 3)
  new_model, *_ = ns["train_step"](model, ns["tx"].init(params), ns["sam"].init(params), batch)

  want = reference_step(lambda p, b: ns["loss_fn"](p, static, b), params, batch)
  assert_trees_close(eqx.filter(new_model, eqx.is_inexact_array), want)


def test_accumulation_step_equals_the_full_batch_step():
  ns = example("accumulation")
  params = _linear_params(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (64, 8))
  batch = (x, jnp.arange(64) % 3)
  new_params, *_ = ns["train_step"](params, ns["tx"].init(params), ns["sam"].init(params), batch)
  assert_trees_close(new_params, reference_step(ns["loss_fn"], params, batch), rtol=1e-5, atol=1e-6)


def test_bf16_keeps_float32_params_and_gradients_close_to_float32():
  ns = example("bf16")
  params = ns["init_params"](jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (64, 8))
  batch = (x, jnp.arange(64) % 3)
  out = ns["grad_fn"](params, ns["sam"].init(params), batch)
  assert {leaf.dtype for leaf in jax.tree.leaves((out.clean_grads, out.perturbed_grads))} == {jnp.dtype("float32")}
  new_params, *_ = ns["train_step"](params, ns["tx"].init(params), ns["sam"].init(params), batch)
  assert {leaf.dtype for leaf in jax.tree.leaves(new_params)} == {jnp.dtype("float32")}

  def float32_loss(p, b):
    logits = jax.nn.relu(b[0] @ p["w1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  # bf16 keeps 8 bits of mantissa: the step moves the params by lr * g ~ 1e-2,
  # and the difference to float32 is a few bf16 ulps of that.
  assert_trees_close(new_params, reference_step(float32_loss, params, batch), rtol=0, atol=2e-3)


def test_parameter_subset_masked_and_multi_transform():
  ns = example("parameter_subset")
  params = {
    "body": {"w": jax.random.normal(jax.random.key(1), (8, 16)) / 3},
    "head": {"w": jax.random.normal(jax.random.key(2), (16, 3)) / 4},
  }
  x = jax.random.normal(jax.random.key(3), (64, 8))
  batch = (x, jnp.arange(64) % 3)
  for tx, alphas in [(ns["masked_tx"], (1.0, 0.5)), (ns["multi_tx"], (0.9, 0.5))]:
    new_params, *_ = ns["make_train_step"](tx)(params, tx.init(params), ns["sam"].init(params), batch)
    alpha = {"body": {"w": alphas[0]}, "head": {"w": alphas[1]}}
    assert_trees_close(new_params, reference_step(ns["loss_fn"], params, batch, alpha=alpha))


def test_cpu_conv_step_equals_the_stock_convolution(onednn):
  ns = example("cpu_conv")
  stock = ns["SmallCnn"]()  # lax.conv_general_dilated
  batch = ns["synthetic_batch"](jax.random.key(0))
  params = stock.init(jax.random.key(1), batch[0])["params"]
  sam = ns["sam"]
  got = ns["grad_fn"](params, sam.init(params), batch)
  stock_grad_fn = ns["saner_jax"].sharpness_aware_grad(lambda p, b: ns["loss_fn"](p, b, net=stock), sam)
  want = stock_grad_fn(params, sam.init(params), batch)
  assert_trees_close(
    (got.loss, got.clean_grads, got.perturbed_grads),
    (want.loss, want.clean_grads, want.perturbed_grads),
    rtol=1e-4,
    atol=1e-5,
  )


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _run_data_parallel(devices: int, processes: int = 1) -> dict:
  """Runs docs/examples/data_parallel.py on simulated CPU devices, as one or several hosts."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}",
  }
  args = [sys.executable, str(EXAMPLES / "data_parallel.py")]
  if processes == 1:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.splitlines()[-1])
  hosts = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": str(processes)}
  procs = [
    subprocess.Popen(
      [*args, "--distributed"],
      env={**env, **hosts, "JAX_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output
  return json.loads(outputs[0].splitlines()[-1])


def test_data_parallel_synced_equals_one_device_on_four_devices_and_two_hosts():
  want = example("data_parallel")["main"]("synced")
  assert jax.device_count() == 1
  for devices, processes in [(4, 1), (4, 2)]:
    got = _run_data_parallel(devices, processes)
    assert got["devices"] == devices
    assert_trees_close(got["params"], want, rtol=1e-5, atol=1e-6)


def test_cheap_sam_takes_saner_steps_then_sgd_steps_with_the_last_mask():
  ns = example("cheap_sam")
  params, batch = ns["init_params"](jax.random.key(1)), ns["synthetic_batch"](jax.random.key(0))
  perturbation, tx, train_step = ns["make_train_step"](k=2, momentum=0.0)
  new, opt_state, p_state, took = train_step(params, tx.init(params), perturbation.init(params), batch)
  assert bool(took)
  assert_trees_close(new, reference_step(ns["loss_fn"], params, batch))
  # Step 1 is one pass: the clean gradient, halved on step 0's group-B coordinates.
  g0 = jax.grad(ns["loss_fn"])(params, batch)
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g0)))
  g_sam = jax.grad(ns["loss_fn"])(jax.tree.map(lambda w, x: w + 0.1 * x / norm, params, g0), batch)
  mask = jax.tree.map(lambda s, c: (s * c > 0) & (jnp.abs(s) < jnp.abs(c)), g_sam, g0)
  assert any(bool(m.any()) for m in jax.tree.leaves(mask))
  g1 = jax.grad(ns["loss_fn"])(new, batch)
  want = jax.tree.map(lambda w, g, m: w - 0.1 * jnp.where(m, 0.5 * g, g), new, g1, mask)
  newer, _, _, took = train_step(new, opt_state, p_state, batch)
  assert not bool(took)
  assert_trees_close(newer, want)
  assert ns["main"](steps=8) == [1, 0, 0, 0, 1, 0, 0, 0]

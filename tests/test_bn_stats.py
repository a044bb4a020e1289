"""--bn_stats: which BatchNorm running statistics a two-pass step keeps.

``clean`` keeps the clean pass's. ``perturbed`` is the SANER authors' order:
the perturbed pass's at ``w + eps``, then a third, forward-only pass at the
new weights. The expected statistics are worked out piece by piece from
plain ``jax.grad`` and numpy batch moments, with flax's momentum 0.9:
``new = 0.9 old + 0.1 batch``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMOKE_MODEL, assert_same_run_metrics, parameter_count, read_metrics

import saner_jax
from saner_jax.train import loop
from saner_jax.train import step as step_lib
from saner_jax.train.config import TrainConfig

RHO, LR = 0.5, 0.1
_RNG = np.random.default_rng(3)
X = _RNG.normal(size=(8, 4)).astype(np.float32)
Y = _RNG.integers(0, 2, size=8).astype(np.int32)


class BnNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(3, name="dense_in")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
    return nn.Dense(2, name="dense_out")(nn.relu(h))


MODEL = BnNet()


def _config(bn_stats: str, m: int = 1, k: int = 1, optimizer: str = "sam") -> TrainConfig:
  # No momentum, no weight decay, a constant lr: the new weights are w - lr g_sam.
  return TrainConfig(
    optimizer=optimizer,
    rho=RHO,
    lr=LR,
    momentum=0.0,
    weight_decay=0.0,
    lr_schedule="constant",
    batch_size=8,
    m_sharpness=m,
    grad_accum_steps=k,
    bn_stats=bn_stats,
  )


def _step(config: TrainConfig):
  optimizer = step_lib.build_optimizer(config, steps_per_epoch=1)
  variables = MODEL.init(jax.random.key(0), X, train=False)
  params = variables["params"]
  state = step_lib.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=variables["batch_stats"],
    opt_state=optimizer.tx.init(params),
    perturbation_state=optimizer.perturbation.init(params) if optimizer.perturbation else (),
  )
  update = jax.jit(step_lib.make_update(MODEL, optimizer, config))
  return state, update(state, X, Y)


def _pieces(m: int, k: int) -> list[list[np.ndarray]]:
  """Example indices: m contiguous sub-batches, each of k strided micro-batches."""
  n = len(X) // m
  return [[j * n + np.arange(i, n, k) for i in range(k)] for j in range(m)]


def _loss(params, idx):
  """The train-mode loss on examples ``idx`` (the running statistics play no part in it)."""
  x, y = jnp.asarray(X)[idx], jnp.asarray(Y)[idx]
  logits, _ = MODEL.apply({"params": params, "batch_stats": _zero_stats()}, x, train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Jitted: the reference takes a gradient per piece, and eager flax retraces each.
_grad = jax.jit(jax.grad(_loss))


def _zero_stats():
  return {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}


def _moments(params, idx) -> tuple[np.ndarray, np.ndarray]:
  """The batch mean and (biased) variance BatchNorm sees on examples ``idx``."""
  dense = params["dense_in"]
  h = X[idx].astype(np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
  return h.mean(0), h.var(0)


def _momentum_update(old, params_per_sub_batch, pieces):
  """The mean over pieces of 0.9 old + 0.1 (the piece's moments at its sub-batch's params)."""
  means, variances = [], []
  for params, sub_batch in zip(params_per_sub_batch, pieces):
    for idx in sub_batch:
      mean, var = _moments(params, idx)
      means.append(0.9 * old[0] + 0.1 * mean)
      variances.append(0.9 * old[1] + 0.1 * var)
  return np.mean(means, 0), np.mean(variances, 0)


def _add(params, scale, tree):
  return jax.tree.map(lambda p, t: p + scale * t, params, tree)


@pytest.mark.parametrize("m, k", [(1, 1), (2, 2)], ids=["plain", "m_sharpness2_accum2"])
def test_clean_keeps_the_clean_pass_and_perturbed_the_authors_order(m, k):
  state, (clean_state, clean_loss, clean_logits, _) = _step(_config("clean", m, k))
  _, (authors_state, authors_loss, authors_logits, _) = _step(_config("perturbed", m, k))
  w = state.params
  pieces = _pieces(m, k)
  # SAM by hand: one perturbation per sub-batch from its mean clean gradient.
  shifted, sam_grads = [], []
  for sub_batch in pieces:
    g = jax.tree.map(lambda *gs: sum(gs) / k, *[_grad(w, idx) for idx in sub_batch])
    norm = optax.tree.norm(g)
    shifted.append(_add(w, RHO / norm, g))
    sam_grads += [_grad(shifted[-1], idx) for idx in sub_batch]
  new_w = _add(w, -LR / len(sam_grads), jax.tree.map(lambda *gs: sum(gs), *sam_grads))

  # Both keep batch statistics in the passes: the same weights, loss and logits.
  for got in (clean_state.params, authors_state.params):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, new_w)
  np.testing.assert_allclose(authors_loss, clean_loss, rtol=1e-6)
  np.testing.assert_allclose(authors_logits, clean_logits, rtol=1e-6, atol=1e-6)

  start = (np.zeros(3), np.ones(3))
  clean = _momentum_update(start, [w] * m, pieces)
  at_perturbed = _momentum_update(start, shifted, pieces)
  authors = _momentum_update(at_perturbed, [new_w] * m, pieces)
  for got, want in ((clean_state, clean), (authors_state, authors)):
    np.testing.assert_allclose(got.batch_stats["bn"]["mean"], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.batch_stats["bn"]["var"], want[1], rtol=1e-5, atol=1e-6)
  # The two orders differ by far more than the tolerance.
  assert np.max(np.abs(authors[0] - clean[0])) > 1e-2


def test_sgd_has_one_pass_and_ignores_bn_stats():
  _, (clean, *_) = _step(_config("clean", optimizer="sgd"))
  _, (authors, *_) = _step(_config("perturbed", optimizer="sgd"))
  jax.tree.map(np.testing.assert_array_equal, authors, clean)


def test_the_trainer_changes_only_evaluation(tmp_path, idx_dir):
  """A run with the authors' order trains like the default (m-sharpness, accumulation) and evaluates its own stats."""
  base = dict(
    optimizer="saner",
    model=SMOKE_MODEL,
    epochs=1,
    batch_size=32,
    train_examples=64,
    test_examples=64,
    eval_batch_size=32,
    alpha_warmup_epochs=1,
    m_sharpness=2,
    grad_accum_steps=2,
    progress="none",
    checkpoint=False,
    data_dir=str(idx_dir),
  )
  runs = {}
  for bn_stats in ("clean", "perturbed"):
    loop.train(TrainConfig(bn_stats=bn_stats, out_dir=str(tmp_path / bn_stats), **base))
    runs[bn_stats] = read_metrics(tmp_path / bn_stats)[-1]
  # Training sees only batch statistics: every training metric agrees.
  assert_same_run_metrics(
    runs["perturbed"],
    runs["clean"],
    parameters=parameter_count(SMOKE_MODEL, 10, (28, 28, 1)),
    # Equal here with and without oneDNN capped at AVX2; one coordinate per
    # step allows a last-bit flip on another CPU (ResNet-8's 75k had 4).
    coordinates_slack=1,
    examples=64,
    ignore=("epoch_time_s", "wall_time_s", "test_acc", "best_test_acc"),
  )
  assert "bn_stats: perturbed" in (tmp_path / "perturbed" / "config.yaml").read_text()


def test_the_perturbed_pass_aux_comes_back_merged_like_the_clean_one():
  """sharpness_aware_grad returns both passes' aux, stacked alike under "stack" and averaged by default."""

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    logits, updates = MODEL.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

  params = MODEL.init(jax.random.key(0), X, train=False)["params"]
  perturbation = saner_jax.sam(RHO)
  grad_fn = saner_jax.sharpness_aware_grad(
    loss_fn, perturbation, has_aux=True, m_sharpness=2, accumulation_steps=2, batch_argnum=2, aux_reducers="stack"
  )
  out = jax.jit(grad_fn)(params, perturbation.init(params), _zero_stats(), (X, Y))
  merged = jax.jit(
    saner_jax.sharpness_aware_grad(
      loss_fn, perturbation, has_aux=True, m_sharpness=2, accumulation_steps=2, batch_argnum=2
    )
  )(params, perturbation.init(params), _zero_stats(), (X, Y))
  jax.tree.map(
    lambda m, s: np.testing.assert_allclose(m, s.mean((0, 1)), rtol=1e-6),
    (merged.aux, merged.perturbed_aux),
    (out.aux, out.perturbed_aux),
  )
  assert out.perturbed_aux["bn"]["mean"].shape == out.aux["bn"]["mean"].shape == (2, 2, 3)
  pieces = _pieces(2, 2)
  for j, sub_batch in enumerate(pieces):
    g = jax.tree.map(lambda *gs: sum(gs) / 2, *[_grad(params, idx) for idx in sub_batch])
    shifted = _add(params, RHO / optax.tree.norm(g), g)
    for i, idx in enumerate(sub_batch):
      mean, var = _moments(shifted, idx)
      np.testing.assert_allclose(out.perturbed_aux["bn"]["mean"][j, i], 0.1 * mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out.perturbed_aux["bn"]["var"][j, i], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)

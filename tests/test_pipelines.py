"""The noise-robust pipelines' pieces on hand-worked examples."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saner_jax.train.pipelines import bootstrap, co_teaching, common, dividemix, joint_optimization, plc

MODULES = (bootstrap, co_teaching, common, dividemix, joint_optimization, plc)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


# ---------------------------------------------------------------------------
# Hard bootstrapping


def test_bootstrap_loss_hand_worked():
  probs = jnp.array([[0.5, 0.25, 0.25], [0.1, 0.7, 0.2]])
  logits = jnp.log(probs)
  # Row 0: label 1, prediction 0 -> -(0.8 log 0.25 + 0.2 log 0.5) = 1.247665.
  # Row 1: label 1 = prediction -> -log 0.7 = 0.356675, whatever beta.
  got = bootstrap.hard_bootstrap_loss(logits, jnp.array([1, 1]), 0.8)
  np.testing.assert_allclose(got, [1.2476649, 0.3566749], rtol=1e-6)
  # beta = 1 is cross-entropy; beta = 0 trains on the prediction alone.
  np.testing.assert_allclose(
    bootstrap.hard_bootstrap_loss(logits, jnp.array([1, 1]), 1.0),
    optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 1])),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    bootstrap.hard_bootstrap_loss(logits, jnp.array([2, 2]), 0.0), [-math.log(0.5), -math.log(0.7)], rtol=1e-6
  )


def test_bootstrap_gradient_treats_the_prediction_as_a_fixed_target():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  grad = jax.grad(lambda z: bootstrap.hard_bootstrap_loss(z, jnp.array([1]), 0.8).sum())(logits)
  # d/dz of soft cross-entropy with target t is softmax(z) - t.
  target = jnp.array([[0.2, 0.8, 0.0]])
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - target, rtol=1e-6)


# ---------------------------------------------------------------------------
# Co-teaching


def test_forget_rate_schedule_and_selected_counts():
  batch = 128
  losses = jax.random.uniform(jax.random.key(0), (batch,))
  expected_counts = {1: 125, 2: 122, 5: 115, 9: 104, 10: 102, 11: 102, 200: 102}
  for epoch, count in expected_counts.items():
    rate = co_teaching.forget_rate(epoch, 0.2, 10, 1.0)
    assert rate == pytest.approx(0.2 * min(epoch, 10) / 10)
    keep = co_teaching.num_remembered(batch, rate)
    assert keep == count
    mask = np.asarray(jax.jit(co_teaching.small_loss_mask)(losses, keep))  # traced count: one compile for all epochs
    assert int(mask.sum()) == count
    # Exactly the smallest losses are kept (on the host: a device array's mask compiles per count).
    assert np.asarray(losses)[mask].max() < np.asarray(losses)[~mask].min()
  assert co_teaching.forget_rate(3, 0.2, 10, 2.0) == pytest.approx(0.2 * 0.09)
  assert co_teaching.forget_rate(1, 0.2, 0) == 0.2
  assert co_teaching.num_remembered(4, 0.99) == 1  # never an empty selection


def test_exchange_gives_each_network_the_other_selection():
  masks = jnp.array([[True, False, True], [False, True, True]])
  assert co_teaching.exchange(masks).tolist() == [[False, True, True], [True, False, True]]


def test_selection_counts():
  counts = common.selection_counts(jnp.array([True, True, False, False, True]), jnp.array([0, 1, 0, 1, 0], bool))
  assert {k: int(v) for k, v in counts.items()} == {"selected": 3, "selected_clean": 2, "clean_total": 3, "judged": 5}


# ---------------------------------------------------------------------------
# DivideMix


def test_mixture_splits_a_bimodal_loss_vector():
  rng = np.random.default_rng(0)
  clean = rng.normal(0.3, 0.1, 700).clip(0)
  noisy = rng.normal(2.5, 0.4, 300)
  losses = np.concatenate([clean, noisy])
  prob = dividemix.clean_probability(losses, seed=0)
  assert prob.shape == (1000,) and prob.dtype == np.float32
  judged_clean = prob > dividemix.P_THRESHOLD
  assert judged_clean[:700].all() and not judged_clean[700:].any()
  # Same losses, same seed: the same mixture.
  np.testing.assert_array_equal(prob, dividemix.clean_probability(losses, seed=0))
  # The split depends on the losses' order of magnitude only through their ranks' spacing.
  np.testing.assert_allclose(prob, dividemix.clean_probability(10 * losses + 3, seed=0), atol=1e-5)


def test_sharpen_hand_worked():
  p = jnp.array([[0.25, 0.75], [0.5, 0.5], [0.1, 0.2, 0.7][:2]])
  got = common.sharpen(p, 0.5)
  # Squares normalised: (1, 9)/10; (1, 1)/2; (1, 4)/5.
  np.testing.assert_allclose(got, [[0.1, 0.9], [0.5, 0.5], [0.2, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(common.sharpen(p, 1.0), p / p.sum(-1, keepdims=True), rtol=1e-6)


def test_co_refine_and_co_guess_hand_worked():
  probs = jnp.array([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
  other = jnp.array([[0.2, 0.2, 0.6], [0.2, 0.2, 0.6]])
  # w = 1 keeps the label; w = 0 uses the prediction; T = 1 does not sharpen.
  refined = dividemix.co_refine(probs, jnp.array([1, 1]), jnp.array([1.0, 0.0]), 1.0)
  np.testing.assert_allclose(refined, [[0, 1, 0], [0.2, 0.2, 0.6]], atol=1e-7)
  # (0.4, 0.2, 0.4) squared (0.16, 0.04, 0.16) / 0.36.
  guessed = dividemix.co_guess(probs, other, 0.5)
  np.testing.assert_allclose(guessed[0], [4 / 9, 1 / 9, 4 / 9], rtol=1e-6)
  np.testing.assert_allclose(guessed[1], common.sharpen(jnp.array([0.2, 0.2, 0.6]), 0.5), rtol=1e-6)


def test_mixup_mixes_inputs_and_targets_alike():
  inputs = jnp.arange(8.0)[:, None, None, None] * jnp.ones((8, 2, 2, 1))
  targets = jax.nn.one_hot(jnp.arange(8), 8)
  mixed_x, mixed_t, lam = dividemix.mixup(jax.random.key(3), inputs, targets, 4.0)
  lam = float(lam)
  assert 0.5 <= lam <= 1.0
  # Row i is lam x_i + (1 - lam) x_j for one j: its target puts lam on i (or 1 on i when j = i).
  for i in range(8):
    j = int(jnp.argmax(mixed_t[i] - lam * targets[i]))
    if j == i:
      np.testing.assert_allclose(mixed_t[i], targets[i], atol=1e-6)
    else:
      np.testing.assert_allclose(mixed_t[i], lam * targets[i] + (1 - lam) * targets[j], atol=1e-6)
    np.testing.assert_allclose(mixed_x[i], lam * i + (1 - lam) * j, atol=1e-5)
  # The shuffled partners form a permutation.
  partners = [i if float(mixed_t[i, i]) == pytest.approx(1.0) else int(jnp.argsort(mixed_t[i])[-2]) for i in range(8)]
  assert sorted(partners) == list(range(8))


def test_mixed_loss_hand_worked():
  logits = jnp.zeros((2, 2))  # q = (0.5, 0.5), equal to the uniform prior: no penalty
  targets = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  loss = dividemix.mixed_loss(logits, targets, jnp.array([True, False]), 25.0)
  # L_x = log 2 on the labelled row; L_u = mean((0.5 - 1)^2, (0.5 - 0)^2) = 0.25.
  assert float(loss) == pytest.approx(math.log(2) + 25 * 0.25, rel=1e-6)
  # A batch without unlabelled samples has no L_u.
  assert float(dividemix.mixed_loss(logits, targets, jnp.array([True, True]), 25.0)) == pytest.approx(math.log(2))
  # The prior penalty: predictions (0.9, 0.1) on both rows -> 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1).
  skewed = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1]]))
  penalty = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
  expected = -math.log(0.9) + penalty
  assert float(dividemix.mixed_loss(skewed, targets, jnp.array([True, True]), 25.0)) == pytest.approx(
    expected, rel=1e-5
  )


# ---------------------------------------------------------------------------
# PLC


def test_plc_tau_schedule():
  taus = [plc.tau(e, warmup_epochs=10) for e in range(1, 21)]
  assert taus[:9] == [None] * 9
  assert taus[9:] == [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.5, 0.5]


def test_plc_correction_rule():
  probs = jnp.array(
    [
      [0.7, 0.2, 0.1],  # label 1: gap log 3.5 = 1.25 -> flip to 0
      [0.5, 0.4, 0.1],  # label 1: gap log 1.25 = 0.22 -> keep
      [0.1, 0.1, 0.8],  # label 2 = prediction -> keep
      [0.6, 0.1, 0.3],  # label 2: gap log 2 = 0.693 -> keep at 0.9, flip at 0.6
    ]
  )
  labels = jnp.array([1, 1, 2, 2])
  new, flipped = plc.correct_labels(jnp.log(probs), labels, 0.9)
  assert new.tolist() == [0, 1, 2, 2] and flipped.tolist() == [True, False, False, False]
  assert new.dtype == labels.dtype
  new, flipped = plc.correct_labels(jnp.log(probs), labels, 0.6)
  assert new.tolist() == [0, 1, 2, 0] and flipped.tolist() == [True, False, False, True]
  # The gap is compared with >=: a gap of exactly tau flips.
  _, flipped = plc.correct_labels(jnp.log(jnp.array([[0.5, 0.25, 0.25]])), jnp.array([1]), math.log(2))
  assert flipped.tolist() == [True]


# ---------------------------------------------------------------------------
# Joint Optimization


def test_jo_loss_hand_worked():
  probs = jnp.array([[0.8, 0.2], [0.4, 0.6]])
  soft = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  l_c = (-math.log(0.8) - 0.5 * math.log(0.4) - 0.5 * math.log(0.6)) / 2
  l_p = -(0.5 * math.log(0.6) + 0.5 * math.log(0.4))  # batch mean (0.6, 0.4)
  l_e = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2) + 0.4 * math.log(0.4) + 0.6 * math.log(0.6)) / 2
  got = joint_optimization.loss(jnp.log(probs), soft, 1.2, 0.8)
  assert float(got) == pytest.approx(l_c + 1.2 * l_p + 0.8 * l_e, rel=1e-6)


def test_jo_label_update_averages_the_last_window_of_epochs():
  history = jnp.zeros((3, 2, 2))  # window 3, 2 samples, 2 classes
  predictions = {
    1: [[1.0, 0.0], [0.5, 0.5]],
    2: [[0.0, 1.0], [0.5, 0.5]],
    3: [[0.5, 0.5], [0.2, 0.8]],
    4: [[1.0, 0.0], [0.2, 0.8]],
  }
  for epoch, probs in predictions.items():
    history = joint_optimization.record_predictions(history, epoch, jnp.array([0, 1]), jnp.array(probs))
  # Epoch 4 overwrote epoch 1's slot: the mean of epochs 2, 3, 4.
  soft = joint_optimization.update_soft_labels(history, jnp.zeros((2, 2)), epoch=4, update_start=4)
  np.testing.assert_allclose(soft, [[0.5, 0.5], [0.3, 0.7]], atol=1e-6)
  # A batch writes only its own rows.
  partial = joint_optimization.record_predictions(history, 5, jnp.array([1]), jnp.array([[0.9, 0.1]]))
  np.testing.assert_allclose(partial[1], [[0.0, 1.0], [0.9, 0.1]])  # slot (5 - 1) mod 3 held epoch 2

"""Tests of saner_jax.train.noise: counts, maps, transition statistics, validation."""

import logging

import numpy as np
import pytest

from saner_jax.train import data, noise

K = 10
N = 50_000


def balanced_labels(n=N, k=K, seed=123):
  """n labels, n / k of each class, in a shuffled order."""
  return np.random.default_rng(seed).permutation(np.arange(n) % k).astype(np.int32)


def inject(labels, mode, rate, seed=0, **kwargs):
  kwargs.setdefault("num_classes", K)
  return noise.inject_noise(labels, mode=mode, rate=rate, seed=seed, **kwargs)


def assert_transition_close(true, noisy, expected):
  """Compares the empirical transition matrix with ``expected`` entry-wise.

  Entry (i, j) is a proportion over the n_i samples of class i, so its
  standard error is sqrt(p (1 - p) / n_i) (binomial; the exact-count modes
  vary less). Five standard errors, plus one sample's worth for rounding,
  keep a correct implementation passing for any seed, while a wrong
  transition (e.g. 1/K instead of 1/(K-1) off the diagonal: 0.044 vs 0.040
  at rate 0.4, 13 standard errors apart) fails. Entries expected to be 0 or 1
  get a tolerance of 1 / n_i, i.e. they must be exact up to rounding.
  """
  k = expected.shape[0]
  empirical = noise.transition_matrix(true, noisy, k)
  n_i = np.bincount(true, minlength=k)[:, None]
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n_i) + 1 / n_i
  np.testing.assert_array_less(np.abs(empirical - expected), tolerance)


# ---------------------------------------------------------------------------
# symmetric


@pytest.mark.parametrize("n,rate", [(1000, 0.0), (1000, 0.2), (997, 0.37), (50, 0.9), (7, 0.5)])
def test_symmetric_flips_exactly_round_rate_n(n, rate):
  true = balanced_labels(n)
  out = inject(true, "symmetric", rate)
  assert out.noise_mask.sum() == round(rate * n)
  assert out.rate == round(rate * n) / n
  assert out.nominal_rate == rate


def test_symmetric_changes_every_chosen_label():
  # Exact count of changed labels means no chosen sample kept its class; with
  # K = 2 every flip must land on the single other class.
  true = balanced_labels(1000, k=2)
  out = inject(true, "symmetric", 0.5, num_classes=2)
  assert out.noise_mask.sum() == 500
  np.testing.assert_array_equal(out.labels[out.noise_mask], 1 - true[out.noise_mask])


def test_symmetric_transition_matrix():
  true = balanced_labels()
  rate = 0.4
  out = inject(true, "symmetric", rate)
  expected = np.full((K, K), rate / (K - 1))
  np.fill_diagonal(expected, 1 - rate)
  assert_transition_close(true, out.labels, expected)


# ---------------------------------------------------------------------------
# uniform


def test_uniform_transition_matrix_and_realised_rate():
  true = balanced_labels()
  rate = 0.5
  out = inject(true, "uniform", rate)
  expected = np.full((K, K), rate / K)
  np.fill_diagonal(expected, 1 - rate + rate / K)
  assert_transition_close(true, out.labels, expected)
  # A redrawn label equals the true one 1/K of the time: realised rate is
  # rate (K-1)/K = 0.45; standard error sqrt(.45 .55 / 50000) = 0.0022.
  assert abs(out.rate - rate * (K - 1) / K) < 0.01


def test_uniform_mask_excludes_labels_redrawn_to_themselves():
  true = balanced_labels(20_000)
  out = inject(true, "uniform", 1.0)
  np.testing.assert_array_equal(out.noise_mask, out.labels != true)
  # At rate 1 every label is redrawn, yet about 1/K of them come back.
  assert 0.85 < out.rate < 0.95


# ---------------------------------------------------------------------------
# class-map modes: asymmetric and pair_flip


def test_asymmetric_maps_are_as_documented():
  # CIFAR-10: airplane automobile bird cat deer dog frog horse ship truck.
  # truck->automobile, bird->airplane, deer->horse, cat<->dog.
  np.testing.assert_array_equal(noise.asymmetric_map("cifar10"), [0, 1, 0, 5, 7, 3, 6, 7, 8, 1])
  np.testing.assert_array_equal(noise.asymmetric_map("cifar10_n"), noise.asymmetric_map("cifar10"))
  # MNIST: 7->1, 2->7, 5<->6, 3->8.
  np.testing.assert_array_equal(noise.asymmetric_map("mnist"), [0, 1, 7, 8, 4, 6, 5, 1, 8, 9])
  # Fashion-MNIST: T-shirt<->Shirt (0, 6), Pullover<->Coat (2, 4),
  # Sandal<->Sneaker (5, 7).
  np.testing.assert_array_equal(noise.asymmetric_map("fashion_mnist"), [6, 1, 4, 3, 2, 7, 0, 5, 8, 9])


# Coarse label of each CIFAR-100 fine label, as stored in the dataset's own
# train file (the "coarse_labels" of each fine class).
CIFAR100_COARSE_OF_FINE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip


def test_cifar100_superclass_table_matches_the_dataset():
  names = data.DATASETS["cifar100"].class_names
  assert len(names) == 100 and list(names) == sorted(names)  # fine_label_names order
  coarse = {fine: i for i, members in enumerate(noise.CIFAR100_SUPERCLASSES.values()) for fine in members}
  assert len(coarse) == 100 and set(coarse) == set(names)
  assert [coarse[name] for name in names] == CIFAR100_COARSE_OF_FINE


def test_cifar100_asymmetric_map_cycles_within_superclass():
  target = noise.asymmetric_map("cifar100")
  names = data.DATASETS["cifar100"].class_names
  index = {name: i for i, name in enumerate(names)}
  # Sorted by fine index, each super-class is a 5-cycle: aquatic mammals are
  # beaver 4, dolphin 30, otter 55, seal 72, whale 95.
  assert [target[i] for i in (4, 30, 55, 72, 95)] == [30, 55, 72, 95, 4]
  for members in noise.CIFAR100_SUPERCLASSES.values():
    ids = sorted(index[m] for m in members)
    assert [target[i] for i in ids] == ids[1:] + ids[:1]


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "fashion_mnist"])
def test_asymmetric_flips_round_rate_of_each_source_class(dataset):
  true = balanced_labels(5003)
  target = noise.asymmetric_map(dataset)
  rate = 0.3
  out = inject(true, "asymmetric", rate, dataset=dataset)
  for c in range(K):
    of_c = true == c
    flipped = out.labels[of_c] != c
    if target[c] == c:
      assert not flipped.any()
    else:
      assert flipped.sum() == round(rate * of_c.sum())
      assert (out.labels[of_c][flipped] == target[c]).all()


def test_asymmetric_cifar10_transition_matrix():
  true = balanced_labels()
  rate = 0.4
  out = inject(true, "asymmetric", rate, dataset="cifar10")
  target = noise.asymmetric_map("cifar10")
  expected = np.eye(K)
  for c in np.flatnonzero(target != np.arange(K)):
    expected[c, c], expected[c, target[c]] = 1 - rate, rate
  assert_transition_close(true, out.labels, expected)
  assert out.rate == pytest.approx(rate * 5 / K)  # 5 of 10 classes flip


def test_asymmetric_cifar100():
  true = balanced_labels(10_000, k=100)
  out = inject(true, "asymmetric", 0.4, num_classes=100, dataset="cifar100_n")
  target = noise.asymmetric_map("cifar100")
  np.testing.assert_array_equal(out.labels[out.noise_mask], target[true[out.noise_mask]])
  assert out.noise_mask.sum() == 100 * round(0.4 * 100)


def test_pair_flip_transition_matrix():
  true = balanced_labels()
  rate = 0.45
  out = inject(true, "pair_flip", rate)
  expected = (1 - rate) * np.eye(K) + rate * np.roll(np.eye(K), 1, axis=1)
  assert_transition_close(true, out.labels, expected)
  np.testing.assert_array_equal(out.labels[out.noise_mask], (true[out.noise_mask] + 1) % K)


# ---------------------------------------------------------------------------
# instance-dependent


def random_images(n, seed=7, shape=(8, 8, 1)):
  return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.4])
def test_instance_realised_rate_near_nominal(rate):
  n = 20_000
  out = inject(balanced_labels(n), "instance", rate, images=random_images(n))
  # The flip rates are symmetric about `rate`, so the realised rate is a mean
  # of Bernoullis with mean `rate`: standard error <= sqrt(.25 / n) = 0.0035.
  # At 0.05 a [0, 1] truncation (Xia et al.) would give about 0.10.
  assert abs(out.rate - rate) < 0.012
  assert out.nominal_rate == rate


def test_instance_wrong_label_depends_on_the_image():
  # 1000 distinct images, each 20 times with the same label. Instance noise
  # sends the flipped copies of one image mostly to one class; class-level
  # noise would spread them over the other 9 classes.
  images = np.repeat(random_images(1000, shape=(6, 6, 3)), 20, axis=0)
  true = np.repeat(balanced_labels(1000), 20)
  out = inject(true, "instance", 0.5, images=images)
  agree = []
  for i in range(1000):
    wrong = out.labels[i * 20 : (i + 1) * 20][out.noise_mask[i * 20 : (i + 1) * 20]]
    if wrong.size >= 3:
      agree.append(np.bincount(wrong).max() / wrong.size)
  assert np.mean(agree) > 0.9
  symmetric = inject(true, "symmetric", 0.5)
  agree_sym = []
  for i in range(1000):
    wrong = symmetric.labels[i * 20 : (i + 1) * 20][symmetric.noise_mask[i * 20 : (i + 1) * 20]]
    if wrong.size >= 3:
      agree_sym.append(np.bincount(wrong).max() / wrong.size)
  assert np.mean(agree_sym) < 0.5


def test_instance_needs_images_of_matching_length():
  true = balanced_labels(100)
  with pytest.raises(ValueError, match="images"):
    inject(true, "instance", 0.2)
  with pytest.raises(ValueError, match="images"):
    inject(true, "instance", 0.2, images=random_images(99))


# ---------------------------------------------------------------------------
# none, real


def test_none_keeps_labels_whatever_the_rate():
  true = balanced_labels(100)
  out = inject(true, "none", 0.4)
  np.testing.assert_array_equal(out.labels, true)
  assert out.rate == 0.0 and out.nominal_rate == 0.0 and not out.noise_mask.any()


def test_real_takes_the_given_labels():
  true = balanced_labels(1000)
  real = true.copy()
  real[:123] = (real[:123] + 3) % K
  out = inject(true, "real", 0.4, real_labels=real.astype(np.int64))
  np.testing.assert_array_equal(out.labels, real)
  assert out.labels.dtype == np.int32
  assert out.rate == 0.123 and out.nominal_rate is None
  with pytest.raises(ValueError, match="real_labels"):
    inject(true, "real", None)
  with pytest.raises(ValueError, match="real_labels"):
    inject(true, "real", None, real_labels=real[:-1])
  with pytest.raises(ValueError, match="real_labels"):
    inject(true, "real", None, real_labels=np.full(1000, K))


# ---------------------------------------------------------------------------
# properties shared by the modes


SEEDED_MODES = [
  ("symmetric", {}),
  ("uniform", {}),
  ("asymmetric", {"dataset": "cifar10"}),
  ("pair_flip", {}),
  ("instance", {"images": random_images(2000)}),
]


@pytest.mark.parametrize("mode,extra", SEEDED_MODES, ids=[m for m, _ in SEEDED_MODES])
def test_seed_reproduces_and_differs(mode, extra):
  true = balanced_labels(2000)
  a = inject(true, mode, 0.3, seed=1, **extra)
  b = inject(true, mode, 0.3, seed=1, **extra)
  c = inject(true, mode, 0.3, seed=2, **extra)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.labels, c.labels)
  # The mask means "label differs from the true label", in every mode.
  for out in (a, c):
    np.testing.assert_array_equal(out.noise_mask, out.labels != out.true_labels)
    np.testing.assert_array_equal(out.true_labels, true)
    assert out.rate == out.noise_mask.mean()
    assert out.labels.dtype == np.int32 and out.noise_mask.dtype == bool


@pytest.mark.parametrize("mode,extra", SEEDED_MODES[:4], ids=[m for m, _ in SEEDED_MODES[:4]])
def test_lower_rate_noise_is_nested_in_higher_rate_noise(mode, extra):
  true = balanced_labels(2000)
  low = inject(true, mode, 0.2, **extra)
  high = inject(true, mode, 0.4, **extra)
  assert low.noise_mask.sum() < high.noise_mask.sum()
  assert not (low.noise_mask & ~high.noise_mask).any()
  np.testing.assert_array_equal(low.labels[low.noise_mask], high.labels[low.noise_mask])


def test_input_labels_are_not_modified():
  true = balanced_labels(1000)
  before = true.copy()
  inject(true, "symmetric", 0.5)
  np.testing.assert_array_equal(true, before)


def test_realised_rate_is_logged(caplog):
  with caplog.at_level(logging.INFO, logger="saner_jax.train.noise"):
    inject(balanced_labels(1000), "symmetric", 0.25)
  assert "realised rate 0.2500" in caplog.text
  assert "250 of 1000" in caplog.text


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("rate", [-0.1, 1.1, float("nan"), None])
def test_bad_rate_raises_naming_rate(rate):
  with pytest.raises(ValueError, match="rate"):
    inject(balanced_labels(100), "symmetric", rate)


@pytest.mark.parametrize(
  "mode,rate,extra",
  [
    ("symmetric", 0.91, {}),  # above (K-1)/K = 0.9
    ("asymmetric", 0.51, {"dataset": "cifar10"}),
    ("pair_flip", 0.6, {}),
    ("instance", 0.55, {"images": random_images(100)}),
  ],
)
def test_rate_beyond_where_noise_is_defined_raises(mode, rate, extra):
  with pytest.raises(ValueError, match="rate"):
    inject(balanced_labels(100), mode, rate, **extra)


def test_rate_at_the_bound_is_accepted():
  true = balanced_labels(1000)
  assert inject(true, "symmetric", 0.9).rate == 0.9
  assert inject(true, "pair_flip", 0.5).rate == 0.5
  assert inject(true, "uniform", 1.0).nominal_rate == 1.0


def test_unknown_mode_lists_modes():
  with pytest.raises(ValueError, match="unknown noise mode 'flip'.*symmetric.*pair_flip"):
    inject(balanced_labels(100), "flip", 0.2)


@pytest.mark.parametrize("dataset", ["svhn_cropped", "imagenet", None])
def test_asymmetric_without_a_map_raises(dataset):
  with pytest.raises(ValueError, match="dataset"):
    inject(balanced_labels(100), "asymmetric", 0.2, dataset=dataset)


def test_asymmetric_map_with_wrong_num_classes_raises():
  with pytest.raises(ValueError, match="100 classes"):
    inject(balanced_labels(100), "asymmetric", 0.2, dataset="cifar100")


def test_bad_labels_raise():
  with pytest.raises(ValueError, match="labels must lie in"):
    inject(np.array([0, 1, K]), "symmetric", 0.2)
  with pytest.raises(ValueError, match="1-D"):
    inject(np.zeros((2, 2), int), "symmetric", 0.2)
  with pytest.raises(TypeError, match="integers"):
    inject(np.array([0.0, 1.0]), "symmetric", 0.2)
  with pytest.raises(ValueError, match="empty"):
    inject(np.array([], int), "symmetric", 0.2)
  with pytest.raises(ValueError, match="num_classes"):
    inject(np.zeros(4, int), "symmetric", 0.2, num_classes=1)


def test_noisy_labels_rejects_inconsistent_fields():
  labels = np.array([0, 1, 2], np.int32)
  true = np.array([0, 1, 1], np.int32)
  good = dict(labels=labels, true_labels=true, mode="real", nominal_rate=None)
  noise.NoisyLabels(noise_mask=np.array([False, False, True]), rate=1 / 3, **good)
  with pytest.raises(ValueError, match="noise_mask"):
    noise.NoisyLabels(noise_mask=np.array([True, False, True]), rate=2 / 3, **good)
  with pytest.raises(ValueError, match="realised"):
    noise.NoisyLabels(noise_mask=np.array([False, False, True]), rate=0.5, **good)
  with pytest.raises(TypeError, match="noise_mask"):
    noise.NoisyLabels(noise_mask=np.array([0, 0, 1]), rate=1 / 3, **good)


def test_subset_recomputes_the_rate():
  true = balanced_labels(1000)
  out = inject(true, "symmetric", 0.5)
  part = out.subset(np.flatnonzero(out.noise_mask)[:10])
  assert part.rate == 1.0 and part.mode == "symmetric" and part.nominal_rate == 0.5
  assert part.labels.shape == (10,)


# ---------------------------------------------------------------------------
# transition_matrix


def test_transition_matrix_counts_and_rows():
  true = np.array([0, 0, 0, 0, 1, 1])
  noisy = np.array([0, 0, 0, 2, 1, 0])
  counts = noise.transition_matrix(true, noisy, 3, normalize=False)
  np.testing.assert_array_equal(counts, [[3, 0, 1], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(noise.transition_matrix(true, noisy, 3), [[0.75, 0, 0.25], [0.5, 0.5, 0], [0, 0, 0]])
  with pytest.raises(ValueError, match="noisy_labels"):
    noise.transition_matrix(true, noisy[:-1], 3)

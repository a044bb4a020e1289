"""Tests of saner_jax.diagnostics on hand-worked examples and random pytrees.

Numerical tests run under ``jax.jit`` and eagerly (``variant``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saner_jax import diagnostics


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])

# 10 coordinates over two leaves:
#   "w": (g_sam, g) = (2, 1) A, (0.5, 1) B, (-0.5, -1) B, (-1, 2) C, (1, 0) none, (1.5, 1.5) none
#   "b": (0.2, 1) B, (-3, -1) A, (0, 0) none, (4, -1) C
# A: 2/10, B: 3/10, C: 2/10, none: 3/10.
PERTURBED = {
  "w": np.array([[2.0, 0.5, -0.5], [-1.0, 1.0, 1.5]], np.float32),
  "b": np.array([0.2, -3.0, 0.0, 4.0], np.float32),
}
CLEAN = {
  "w": np.array([[1.0, 1.0, -1.0], [2.0, 0.0, 1.5]], np.float32),
  "b": np.array([1.0, -1.0, 0.0, -1.0], np.float32),
}


@VARIANTS
def test_group_fractions_hand_example(variant):
  fractions = variant(diagnostics.group_fractions)(PERTURBED, CLEAN)
  assert set(fractions) == {"A", "B", "C"}
  np.testing.assert_allclose(float(fractions["A"]), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(fractions["B"]), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(fractions["C"]), 0.2, rtol=1e-6)


@VARIANTS
def test_gradient_cosine_hand_example(variant):
  cosine = variant(diagnostics.gradient_cosine)
  a = {"x": jnp.array([1.0, 0.0]), "y": jnp.array([0.0])}
  b = {"x": jnp.array([1.0, 1.0]), "y": jnp.array([0.0])}
  np.testing.assert_allclose(float(cosine(a, b)), 1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(float(cosine(a, jax.tree.map(lambda v: -3 * v, a))), -1.0, rtol=1e-6)
  zero = jax.tree.map(jnp.zeros_like, a)
  assert float(cosine(a, zero)) == 0.0
  assert float(cosine(zero, zero)) == 0.0


@VARIANTS
def test_gradient_diagnostics_hand_example(variant):
  out = variant(diagnostics.gradient_diagnostics)(PERTURBED, CLEAN)
  assert set(out) == {"group_A", "group_B", "group_C", "cosine", "clean_grad_norm", "perturbed_grad_norm", "nonfinite"}
  np.testing.assert_allclose(float(out["group_B"]), 0.3, rtol=1e-6)
  p = np.concatenate([v.ravel() for v in PERTURBED.values()]).astype(np.float64)
  c = np.concatenate([v.ravel() for v in CLEAN.values()]).astype(np.float64)
  np.testing.assert_allclose(float(out["cosine"]), p @ c / np.linalg.norm(p) / np.linalg.norm(c), rtol=1e-6)
  np.testing.assert_allclose(float(out["clean_grad_norm"]), np.linalg.norm(c), rtol=1e-6)
  np.testing.assert_allclose(float(out["perturbed_grad_norm"]), np.linalg.norm(p), rtol=1e-6)
  assert int(out["nonfinite"]) == 0


@VARIANTS
def test_nonfinite_count_and_nan_in_no_group(variant):
  perturbed = {"w": np.array([[jnp.nan, 0.5, -0.5], [-1.0, 1.0, 1.5]], np.float32), "b": PERTURBED["b"]}
  clean = {"w": CLEAN["w"], "b": np.array([1.0, -1.0, np.inf, np.nan], np.float32)}
  out = variant(diagnostics.gradient_diagnostics)(perturbed, clean)
  # NaN at w[0,0] (was A), inf at b[2], NaN at b[3] (was C): three coordinates.
  assert int(out["nonfinite"]) == 3
  np.testing.assert_allclose(float(out["group_A"]), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(out["group_B"]), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(out["group_C"]), 0.1, rtol=1e-6)
  assert np.isnan(float(out["cosine"]))


def test_mismatched_trees():
  with pytest.raises(ValueError, match=r"perturbed_grads must have the same tree structure as clean_grads"):
    diagnostics.group_fractions({"w": PERTURBED["w"]}, CLEAN)
  match = r"perturbed_grads\['b'\] has shape \(3,\) but clean_grads\['b'\] has shape \(4,\)"
  with pytest.raises(ValueError, match=match):
    diagnostics.gradient_diagnostics({"w": PERTURBED["w"], "b": PERTURBED["b"][:3]}, CLEAN)


@VARIANTS
def test_fit_counts_hand_example(variant):
  predictions = jnp.array([0, 1, 2, 3, 1, 0])
  labels = jnp.array([0, 2, 2, 1, 1, 0])  # noisy at 1, 3, 4 and 5
  true_labels = jnp.array([0, 1, 2, 3, 2, 1])
  noise_mask = jnp.array([False, True, False, True, True, True])
  valid = jnp.array([True, True, True, True, True, False])  # row 5 is padding
  out = variant(diagnostics.fit_counts)(predictions, labels, true_labels, noise_mask, valid)
  got = {k: int(v) for k, v in out.items()}
  # clean rows 0, 2: both predicted right. noisy rows 1, 3, 4 (5 is padding):
  # 1 and 3 predicted the true label, 4 predicted the (wrong) given label.
  assert got == {"clean": 2, "clean_correct": 2, "noisy": 3, "noisy_memorised": 1, "noisy_true": 2}
  out = variant(lambda *a: diagnostics.fit_counts(*a))(predictions, labels, true_labels, noise_mask)
  got = {k: int(v) for k, v in out.items()}
  # Without the valid mask row 5 counts: noisy, and memorised.
  assert got == {"clean": 2, "clean_correct": 2, "noisy": 4, "noisy_memorised": 2, "noisy_true": 2}


# -------------------------------------------------------- property tests


_ELEMENTS = st.one_of(
  st.sampled_from([0.0, 1.0, -1.0, 0.5]),
  st.floats(-10.0, 10.0, width=32, allow_subnormal=False),
)


@st.composite
def gradient_pairs(draw):
  perturbed, clean = {}, {}
  for i in range(draw(st.integers(1, 3))):
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    clean[f"leaf{i}"] = c = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    p = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    perturbed[f"leaf{i}"] = np.where(draw(hnp.arrays(np.bool_, shape)), c, p)
  return perturbed, clean


@given(gradient_pairs())
def test_property_fractions_in_unit_interval_and_match_ratio(pair):
  perturbed, clean = pair
  fractions = diagnostics.group_fractions(perturbed, clean)
  p = np.concatenate([v.ravel() for v in perturbed.values()]).astype(np.float64)
  c = np.concatenate([v.ravel() for v in clean.values()]).astype(np.float64)
  ratio = p / np.where(c == 0, 1.0, c)
  expected = {
    "A": np.mean((c != 0) & (p != 0) & (ratio > 1)),
    "B": np.mean((c != 0) & (ratio > 0) & (ratio < 1)),
    "C": np.mean((c != 0) & (ratio < 0)),
  }
  values = {g: float(f) for g, f in fractions.items()}
  for g in "ABC":
    assert 0.0 <= values[g] <= 1.0
    np.testing.assert_allclose(values[g], expected[g], rtol=1e-6, atol=1e-7)
  assert sum(values.values()) <= 1.0 + 1e-6
  cosine = float(diagnostics.gradient_cosine(perturbed, clean))
  assert -1.0 - 1e-5 <= cosine <= 1.0 + 1e-5

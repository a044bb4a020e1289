"""Float64 end to end: several steps of every optimizer equal the authors' update rules to 1e-12.

The reference is written here in numpy from the SANER authors' PyTorch
optimizers (github lhchau/saner, optimizer/): their first step (perturbation),
second step (GSAM's decomposition, the ratio mask ``g_sam / (g + 1e-8)``,
reweighting or substitution), then L2 added to the direction and heavy-ball
momentum without dampening. Its gradients come from a hand-written backward
pass of a one-hidden-layer tanh network, so nothing but the data is shared
with the JAX side. Where a gradient is tiny the authors' ``+ 1e-8`` and the
sign-safe mask could disagree; the reference checks that no such coordinate
occurs, so any difference is a precision or rule difference.

A norm taken in float32 (the behaviour before) puts a relative error near
1e-7 into the perturbation, which moves SAM's parameters by 3e-10 within
these steps: well above the 1e-12 pinned here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import saner_jax

STEPS = 6
LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.1
SANER_ALPHA, GSAM_ALPHA, FSAM_SIGMA, FSAM_LMBDA, VASSO_THETA = 0.5, 0.3, 1.0, 0.9, 0.2


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5))
  y = rng.integers(0, 3, 32)
  params = {
    "body": {"w": rng.normal(size=(5, 8)) * 0.7, "b": rng.normal(size=8) * 0.1},
    "head": {"w": rng.normal(size=(8, 3)) * 0.7, "b": rng.normal(size=3) * 0.1},
  }
  return x, y, params


# ------------------------------------------------------------------ numpy


def _np_grad(p, x, y):
  """Mean softmax cross-entropy of tanh(x W1 + b1) W2 + b2, backward by hand."""
  h = np.tanh(x @ p["body"]["w"] + p["body"]["b"])
  logits = h @ p["head"]["w"] + p["head"]["b"]
  z = np.exp(logits - logits.max(axis=1, keepdims=True))
  dlogits = z / z.sum(axis=1, keepdims=True)
  dlogits[np.arange(len(y)), y] -= 1.0
  dlogits /= len(y)
  dh = dlogits @ p["head"]["w"].T * (1.0 - h**2)
  return {
    "body": {"w": x.T @ dh, "b": dh.sum(axis=0)},
    "head": {"w": h.T @ dlogits, "b": dlogits.sum(axis=0)},
  }


def _flat(tree):
  return [tree["body"]["w"], tree["body"]["b"], tree["head"]["w"], tree["head"]["b"]]


def _tree(leaves):
  return {"body": {"w": leaves[0], "b": leaves[1]}, "head": {"w": leaves[2], "b": leaves[3]}}


def _norm(leaves):
  return np.sqrt(sum(np.sum(v * v) for v in leaves))


def _authors_mask(g_sam, g, groups):
  ratio = g_sam / (g + 1e-8)
  masks = {"A": ratio > 1, "B": (ratio > 0) & (ratio < 1), "C": ratio < 0}
  return np.any([masks[x] for x in groups], axis=0)


def reference(method, x, y, params):
  """``STEPS`` steps of the authors' optimizer ``method``, in numpy float64."""
  w = _flat(params)
  buf = [np.zeros_like(v) for v in w]
  fsam_m = vasso_ema = None
  for _ in range(STEPS):
    g = _flat(_np_grad(_tree(w), x, y))
    assert min(np.abs(v).min() for v in g) > 1e-6, "a tiny gradient: the two mask rules could disagree"
    if method.startswith("asam"):
      scale = RHO / (_norm([np.abs(wi) * gi for wi, gi in zip(w, g)]) + 1e-12)
      eps = [wi**2 * gi * scale for wi, gi in zip(w, g)]
    elif method.startswith("fsam"):
      if fsam_m is None:
        direction, fsam_m = g, g
      else:
        direction = [gi - FSAM_SIGMA * mi for gi, mi in zip(g, fsam_m)]
        fsam_m = [FSAM_LMBDA * mi + (1 - FSAM_LMBDA) * gi for gi, mi in zip(g, fsam_m)]
      eps = [d * RHO / (_norm(direction) + 1e-12) for d in direction]
    elif method.startswith("vasso"):
      vasso_ema = g if vasso_ema is None else [(1 - VASSO_THETA) * e + VASSO_THETA * gi for e, gi in zip(vasso_ema, g)]
      eps = [e * RHO / (_norm(vasso_ema) + 1e-12) for e in vasso_ema]
    else:
      eps = [gi * RHO / (_norm(g) + 1e-12) for gi in g]
    g_sam = _flat(_np_grad(_tree([wi + e for wi, e in zip(w, eps)]), x, y))
    if method.startswith("gsam"):
      cosine = sum(np.sum(a * b) for a, b in zip(g, g_sam)) / (_norm(g_sam) * _norm(g) + 1e-12)
      vertical = [gi - cosine * _norm(g) * si / (_norm(g_sam) + 1e-12) for gi, si in zip(g, g_sam)]
      g_sam = [si - GSAM_ALPHA * v for si, v in zip(g_sam, vertical)]
    rule = method.split("+")[1] if "+" in method else "sam"
    d = []
    for i, (si, gi) in enumerate(zip(g_sam, g)):
      if rule == "saner" or (rule == "saner_last" and i >= 2):  # leaves 2, 3 are the head
        d.append(np.where(_authors_mask(si, gi, "B"), SANER_ALPHA * si, si))
      elif rule.startswith("gr"):  # SAMWO
        d.append(np.where(_authors_mask(si, gi, rule[2:]), gi, si))
      elif rule.startswith("only"):  # SAMONLY
        d.append(np.where(_authors_mask(si, gi, rule[4:]), si, gi))
      else:
        d.append(si)
    for i in range(4):
      buf[i] = MOMENTUM * buf[i] + d[i] + WD * w[i]
      w[i] = w[i] - LR * buf[i]
  return _tree(w)


# -------------------------------------------------------------------- JAX


def _loss(params, x, y):
  h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"])
  logits = h @ params["head"]["w"] + params["head"]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def saner_jax_run(method, x, y, params, variant):
  family, _, rule = method.partition("+")
  perturbation = {
    "sam": lambda: saner_jax.sam(RHO),
    "gsam": lambda: saner_jax.sam(RHO),
    "asam": lambda: saner_jax.asam(RHO),
    "fsam": lambda: saner_jax.friendly_sam(RHO, FSAM_SIGMA, FSAM_LMBDA),
    "vasso": lambda: saner_jax.vasso(RHO, VASSO_THETA),
  }[family]()
  parts = [saner_jax.gsam(GSAM_ALPHA)] if family == "gsam" else []
  if rule == "saner":
    parts.append(saner_jax.saner(SANER_ALPHA))
  elif rule == "saner_last":
    parts.append(optax.masked(saner_jax.saner(SANER_ALPHA), {"body": False, "head": True}))
  elif rule.startswith("gr"):
    parts.append(saner_jax.substitute_groups(rule[2:]))
  elif rule.startswith("only"):
    parts.append(saner_jax.substitute_groups(rule[4:], outside=True))
  tx = optax.chain(*parts, optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
  grad_fn = saner_jax.sharpness_aware_grad(_loss, perturbation)

  @variant
  def step(params, opt_state, perturbation_state):
    out = grad_fn(params, perturbation_state, x, y)
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state

  opt_state, perturbation_state = tx.init(params), perturbation.init(params)
  for _ in range(STEPS):
    params, opt_state, perturbation_state = step(params, opt_state, perturbation_state)
  return params


METHODS = [
  "sam",
  "sam+saner",
  "asam",
  "asam+saner",
  "gsam",
  "gsam+saner",
  "fsam+saner",
  "vasso+saner",
  "sam+grA",
  "sam+grB",
  "sam+grC",
  "sam+grAB",
  "sam+onlyA",
  "sam+onlyB",
  "sam+saner_last",
]


def _no_jit(fn):
  return fn


@pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])
@pytest.mark.parametrize("method", METHODS)
def test_float64_parameters_equal_the_authors_rules(method, variant):
  x, y, params = _data()
  expected = reference(method, x, y, params)
  with jax.enable_x64(True):
    actual = saner_jax_run(method, jnp.asarray(x), jnp.asarray(y), jax.tree.map(jnp.asarray, params), variant)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(actual))
  moved = max(np.abs(a - b).max() for a, b in zip(_flat(expected), _flat(params)))
  assert moved > 1e-3  # the steps did move the parameters
  for a, e in zip(_flat(actual), _flat(expected)):
    np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=1e-12)


def test_the_variants_differ_from_sam():
  """Each rule changes the parameters by far more than 1e-12 on this problem, so the test can tell them apart."""
  x, y, params = _data()
  sam = _flat(reference("sam", x, y, params))
  for method in METHODS[1:]:
    if method in ("asam", "gsam"):
      continue
    diff = max(np.abs(a - b).max() for a, b in zip(_flat(reference(method, x, y, params)), sam))
    assert diff > 1e-6, method


def test_float64_diagnostics_and_alpha_schedule_stay_float64():
  with jax.enable_x64(True):
    a = {"w": jnp.array([1.0, 1e-9]), "v": jnp.array([3.0])}
    b = {"w": jnp.array([1.0, 2e-9]), "v": jnp.array([-1.0])}
    report = saner_jax.diagnostics.gradient_diagnostics(a, b)
    for key in ("cosine", "clean_grad_norm", "perturbed_grad_norm"):
      assert report[key].dtype == jnp.float64, key
    expected_cosine = (1.0 + 2e-18 - 3.0) / (np.sqrt(10.0 + 1e-18) * np.sqrt(2.0 + 4e-18))
    assert float(report["cosine"]) == pytest.approx(expected_cosine, rel=1e-15)
    alpha = saner_jax.alpha_warmup(0.3, 7)(jnp.asarray(3))
    assert alpha.dtype == jnp.float64
    assert float(alpha) == pytest.approx(1.0 - 0.7 * 3 / 7, rel=1e-15)

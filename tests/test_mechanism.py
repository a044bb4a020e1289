"""The paper's mechanism ablations: group substitution, SANER on parameter subsets.

``substitute_groups`` is checked on a hand-worked example; ``saner``, ``gsam``
and ``substitute_groups`` inside ``optax.masked`` and ``optax.multi_transform``
against the same transform applied by hand to the chosen parameters. Every
numerical test runs under ``jax.jit`` and eagerly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMOKE_MODEL

import saner_jax
from saner_jax import gsam, saner, substitute_groups


def _no_jit(fn):
  return fn


VARIANTS = pytest.mark.parametrize("variant", [jax.jit, _no_jit], ids=["jit", "nojit"])

# ---------------------------------------------------------------------------
# The hand-worked example.
#
#  idx  g_sam   g      group  why
#   0    2.0   1.0      A     same sign, amplified
#   1    0.5   1.0      B     same sign, shrunk
#   2   -0.5  -1.0      B     negative, shrunk
#   3   -1.0   2.0      C     flipped
#   4    1.0   0.0      -     zero clean gradient
#   5    1.5   1.5      -     equal
#   6   -2e-9 -5e-9     B     tiny negative g (the authors' g + 1e-8 says C)
# ---------------------------------------------------------------------------
PERTURBED = np.array([2.0, 0.5, -0.5, -1.0, 1.0, 1.5, -2e-9], np.float32)
CLEAN = np.array([1.0, 1.0, -1.0, 2.0, 0.0, 1.5, -5e-9], np.float32)
EXPECTED = {
  # clean gradient on the named groups, g_sam elsewhere (SAMWO, "SGD-GrX")
  ("A", False): [1.0, 0.5, -0.5, -1.0, 1.0, 1.5, -2e-9],
  ("B", False): [2.0, 1.0, -1.0, -1.0, 1.0, 1.5, -5e-9],
  ("C", False): [2.0, 0.5, -0.5, 2.0, 1.0, 1.5, -2e-9],
  ("AB", False): [1.0, 1.0, -1.0, -1.0, 1.0, 1.5, -5e-9],
  ("", False): [2.0, 0.5, -0.5, -1.0, 1.0, 1.5, -2e-9],
  # g_sam on the named groups, the clean gradient elsewhere (SAMONLY)
  ("A", True): [2.0, 1.0, -1.0, 2.0, 0.0, 1.5, -5e-9],
  ("B", True): [1.0, 0.5, -0.5, 2.0, 0.0, 1.5, -2e-9],
  ("C", True): [1.0, 1.0, -1.0, -1.0, 0.0, 1.5, -5e-9],
  ("AC", True): [2.0, 1.0, -1.0, -1.0, 0.0, 1.5, -5e-9],
}


@VARIANTS
@pytest.mark.parametrize("groups, outside", list(EXPECTED))
def test_substitute_groups_hand_example(variant, groups, outside):
  tx = substitute_groups(groups, outside=outside)
  state = tx.init({"g": CLEAN})
  out, new_state = variant(lambda u, s, c: tx.update(u, s, clean_grads=c))({"g": PERTURBED}, state, {"g": CLEAN})
  np.testing.assert_array_equal(out["g"], np.array(EXPECTED[groups, outside], np.float32))
  assert out["g"].dtype == jnp.float32
  assert new_state == optax.EmptyState()


def test_substitute_groups_order_and_repeats_do_not_matter():
  a = substitute_groups("BA").update(PERTURBED, optax.EmptyState(), clean_grads=CLEAN)[0]
  b = substitute_groups("ABB").update(PERTURBED, optax.EmptyState(), clean_grads=CLEAN)[0]
  np.testing.assert_array_equal(a, np.array(EXPECTED["AB", False], np.float32))
  np.testing.assert_array_equal(b, a)


def test_substitute_groups_keeps_low_precision_dtype():
  out, _ = substitute_groups("B").update(
    jnp.asarray(PERTURBED, jnp.bfloat16), optax.EmptyState(), clean_grads=jnp.asarray(CLEAN, jnp.float32)
  )
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32)[:4], [2.0, 1.0, -1.0, -1.0])


@pytest.mark.parametrize(
  "groups, outside, error, match",
  [
    ("D", False, ValueError, r"unknown group letter\(s\) \['D'\] in groups='D'; use letters from 'ABC'"),
    ("ab", True, ValueError, r"unknown group letter\(s\) \['a', 'b'\]"),
    ("", True, ValueError, r"outside=True with empty groups gives the clean gradient everywhere \(SGD\); name a group"),
    (["B"], False, TypeError, r"groups must be a string of letters from 'ABC'"),
  ],
)
def test_substitute_groups_bad_arguments(groups, outside, error, match):
  with pytest.raises(error, match=match):
    substitute_groups(groups, outside=outside)


def test_substitute_groups_needs_clean_grads():
  tx = substitute_groups("B")
  with pytest.raises(ValueError, match=r"substitute_groups needs the clean-point gradients"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))
  with pytest.raises(ValueError, match=r"clean_grads\['w'\] has shape \(3,\) but updates\['w'\] has shape \(2,\)"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), clean_grads={"w": jnp.ones(3)})


def test_public_api():
  assert saner_jax.substitute_groups is substitute_groups
  assert "substitute_groups" in saner_jax.__all__
  assert isinstance(substitute_groups("B"), optax.GradientTransformationExtraArgs)


# ---------------------------------------------------------------------------
# Masked and partitioned: the transform acts on the chosen parameters only.

_KEY = jax.random.key(0)
PARAMS = {
  "body": {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)},
  "head": {"w": jnp.linspace(0.5, -0.5, 4), "b": jnp.array([0.3, -0.2])},
}
CLEAN_TREE = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(_KEY, x.size), x.shape), PARAMS)
PERTURBED_TREE = jax.tree.map(
  lambda g: g * jax.random.uniform(jax.random.fold_in(_KEY, 7 * g.size), g.shape, minval=-0.5, maxval=2.0),
  CLEAN_TREE,
)
HEAD_ONLY = {"body": False, "head": True}  # a prefix of the params tree
HEAD_LEAVES = {"body": {"w": False}, "head": {"w": True, "b": True}}

TRANSFORMS = {
  "saner": lambda: saner(0.5),
  "gsam": lambda: gsam(0.3),
  "substitute_groups": lambda: substitute_groups("B"),
  "samonly": lambda: substitute_groups("A", outside=True),
}


def _on_head_by_hand(make):
  """The transform applied to the head subtree alone, the body left as g_sam."""
  tx = make()
  head, _ = tx.update(PERTURBED_TREE["head"], tx.init(PARAMS["head"]), PARAMS["head"], clean_grads=CLEAN_TREE["head"])
  return {"body": PERTURBED_TREE["body"], "head": head}


def _assert_trees_equal(actual, expected):
  """Equal up to float32 rounding: jit may reorder gsam's norm reductions."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-8)


@VARIANTS
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize(
  "mask", [HEAD_ONLY, HEAD_LEAVES, lambda p: {k: k == "head" for k in p}], ids=["prefix", "leaves", "fn"]
)
def test_masked(variant, name, mask):
  tx = optax.masked(TRANSFORMS[name](), mask)
  out, _ = variant(lambda u, s, p, c: tx.update(u, s, p, clean_grads=c))(
    PERTURBED_TREE, tx.init(PARAMS), PARAMS, CLEAN_TREE
  )
  _assert_trees_equal(out, _on_head_by_hand(TRANSFORMS[name]))
  assert not np.array_equal(out["head"]["w"], PERTURBED_TREE["head"]["w"])  # the transform did act


@VARIANTS
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_masked_with_masked_extra_args(variant, name):
  """optax's own ``mask_compatible_extra_args=True`` masks clean_grads before us: same result."""
  tx = optax.masked(TRANSFORMS[name](), HEAD_LEAVES, mask_compatible_extra_args=True)
  out, _ = variant(lambda u, s, p, c: tx.update(u, s, p, clean_grads=c))(
    PERTURBED_TREE, tx.init(PARAMS), PARAMS, CLEAN_TREE
  )
  _assert_trees_equal(out, _on_head_by_hand(TRANSFORMS[name]))


@VARIANTS
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_multi_transform_in_a_chain(variant, name):
  """SAM's gradient on the body, the transform on the head, then L2 and momentum SGD, over two steps."""
  labels = {"body": "sam", "head": "reweighted"}
  tx = optax.chain(
    optax.multi_transform({"sam": optax.identity(), "reweighted": TRANSFORMS[name]()}, labels),
    optax.add_decayed_weights(0.01),
    optax.sgd(0.1, momentum=0.9),
  )
  reference = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9))
  step = variant(lambda u, s, p, c: tx.update(u, s, p, clean_grads=c))
  state, ref_state, params, ref_params = tx.init(PARAMS), reference.init(PARAMS), PARAMS, PARAMS
  for _ in range(2):
    updates, state = step(PERTURBED_TREE, state, params, CLEAN_TREE)
    ref_updates, ref_state = reference.update(_on_head_by_hand(TRANSFORMS[name]), ref_state, ref_params)
    params, ref_params = optax.apply_updates(params, updates), optax.apply_updates(ref_params, ref_updates)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7), params, ref_params)


def test_masked_saner_schedule_counts_its_own_steps():
  tx = optax.masked(saner(optax.linear_schedule(1.0, 0.0, 1)), HEAD_ONLY)
  state = tx.init(PARAMS)
  first, state = tx.update(PERTURBED_TREE, state, PARAMS, clean_grads=CLEAN_TREE)
  second, state = tx.update(PERTURBED_TREE, state, PARAMS, clean_grads=CLEAN_TREE)
  _assert_trees_equal(first, PERTURBED_TREE)  # alpha = 1 at step 0: SAM
  head_b = saner_jax.group_mask(PERTURBED_TREE["head"]["w"], CLEAN_TREE["head"]["w"], "B")
  assert np.any(head_b)
  np.testing.assert_array_equal(second["head"]["w"], np.where(head_b, 0.0, PERTURBED_TREE["head"]["w"]))


def test_masked_clean_grads_of_another_structure_still_fail_clearly():
  tx = optax.masked(saner(0.5), HEAD_ONLY)
  with pytest.raises(ValueError, match=r"clean_grads must have the same tree structure as updates"):
    tx.update(PERTURBED_TREE, tx.init(PARAMS), PARAMS, clean_grads={"body": CLEAN_TREE["body"]})


# ---------------------------------------------------------------------------
# The trainer's flags


def _one_update(cfg, params, clean, perturbed):
  from saner_jax.train import step as step_lib

  opt = step_lib.build_optimizer(cfg, steps_per_epoch=1)
  updates, _ = opt.tx.update(perturbed, opt.tx.init(params), params, clean_grads=clean)
  return updates


@pytest.mark.parametrize(
  "outside, direction",
  [(False, [2.0, 3.0, 1.0]), (True, [1.0, 2.0, -1.0])],
  ids=["sgd_grB", "sam_onlyB"],
)
def test_trainer_substitution_update_by_hand(outside, direction):
  from saner_jax.train.config import TrainConfig

  cfg = TrainConfig(optimizer="sam", substitute_groups="B", substitute_outside=outside, lr=0.1, weight_decay=0.01)
  params = {"w": jnp.array([1.0, 1.0, 1.0])}
  clean = {"w": jnp.array([2.0, 2.0, -1.0])}
  perturbed = {"w": jnp.array([1.0, 3.0, 1.0])}  # groups B, A, C
  updates = _one_update(cfg.validate(), params, clean, perturbed)
  np.testing.assert_allclose(updates["w"], -0.1 * (np.array(direction) + 0.01), rtol=1e-6)


def test_trainer_saner_on_the_head_only_by_hand():
  from saner_jax.train.config import TrainConfig

  cfg = TrainConfig(optimizer="saner", saner_params="head", alpha=0.5, alpha_warmup_epochs=0, lr=0.1, weight_decay=0)
  params = {"stem_conv": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}
  clean = {
    "stem_conv": {"kernel": jnp.array([2.0, -1.0])},
    "head": {"kernel": jnp.array([2.0, -1.0]), "bias": jnp.ones(1)},
  }
  perturbed = {
    "stem_conv": {"kernel": jnp.array([1.0, -0.5])},
    "head": {"kernel": jnp.array([1.0, -0.5]), "bias": jnp.ones(1)},
  }
  updates = _one_update(cfg.validate(), params, clean, perturbed)
  np.testing.assert_allclose(updates["stem_conv"]["kernel"], [-0.1, 0.05], rtol=1e-6)  # group B, but not the head: SAM
  np.testing.assert_allclose(updates["head"]["kernel"], [-0.05, 0.025], rtol=1e-6)  # group B, halved
  np.testing.assert_allclose(updates["head"]["bias"], [-0.1], rtol=1e-6)  # equal gradients: no group


@pytest.mark.parametrize(
  "name", ["sgd", "sam", "saner", "asam+saner", "saner_head", "gsam+saner_head", "sam+grB", "sam+grAB", "asam+onlyB"]
)
def test_run_names_round_trip(name):
  from saner_jax.train import config as config_lib

  cfg = config_lib.from_mapping(config_lib.run_name_values(name)).validate()
  assert cfg.run_name == name


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--optimizer", "sam", "--substitute_groups", "D"], "--substitute_groups: unknown group letter(s) ['D']"),
    (["--optimizer", "saner", "--substitute_groups", "B"], "--substitute_groups: replaces SANER's reweighting"),
    (["--optimizer", "sam", "--saner", "true", "--substitute_groups", "B"], "--substitute_groups: replaces SANER"),
    (["--optimizer", "sgd", "--substitute_groups", "B"], "--substitute_groups: substitutes SAM's second gradient"),
    (["--optimizer", "sam", "--substitute_outside", "true"], "--substitute_outside: needs --substitute_groups"),
    (["--optimizer", "sam", "--substitute_groups", "", "--substitute_outside", "true"], "outside=True with empty"),
    (["--optimizer", "sam", "--substitute_groups", ""], "--substitute_groups: is empty"),
    (["--optimizer", "sam", "--saner_params", "head"], "--saner_params: 'head' chooses where SANER acts"),
    (["--optimizer", "saner", "--saner_params", "last"], "--saner_params: unknown value 'last'"),
  ],
)
def test_bad_mechanism_flags_name_the_flag(flags, message, capsys, tmp_path):
  from saner_jax.train import cli

  assert cli.main(flags + ["--out_dir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_compare_rejects_an_unknown_run_name():
  from saner_jax.train import config as config_lib

  with pytest.raises(
    config_lib.ConfigError, match=r"--runs: 'sam\+foo' is not OPT, OPT\+saner, OPT\+grX or OPT\+onlyX"
  ):
    config_lib.run_name_values("sam+foo")


@pytest.mark.parametrize(
  "flags",
  [["--optimizer", "sam", "--substitute_groups", "B"], ["--optimizer", "saner", "--saner_params", "head"]],
  ids=["sgd_grB", "saner_head"],
)
def test_cli_runs_the_mechanism_flags(flags, tmp_path, idx_dir):
  from conftest import read_metrics

  from saner_jax.train import cli

  tiny = ["--model", SMOKE_MODEL, "--epochs", "1", "--batch_size", "32", "--train_examples", "64"]
  tiny += ["--test_examples", "32", "--eval_batch_size", "32", "--progress", "none", "--checkpoint", "false"]
  assert cli.main(flags + tiny + ["--data_dir", str(idx_dir), "--out_dir", str(tmp_path / "run")]) == 0
  (record,) = read_metrics(tmp_path / "run")
  assert 0 < record["group_B"] < 1 and np.isfinite(record["train_loss"])


def _probe_run(tmp_path, idx_dir, epochs, flags):
  from conftest import read_metrics

  from saner_jax.train import cli

  tiny = ["--model", SMOKE_MODEL, "--epochs", str(epochs), "--batch_size", "32", "--train_examples", "64"]
  tiny += ["--test_examples", "32", "--eval_batch_size", "32", "--progress", "none", "--checkpoint", "false"]
  tiny += ["--probe_examples", "48", "--data_dir", str(idx_dir), "--out_dir", str(tmp_path / "run")]
  assert cli.main(flags + tiny) == 0
  header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
  return read_metrics(tmp_path / "run"), header


def test_probe_logs_the_decomposition_every_epoch(tmp_path, idx_dir):
  records, header = _probe_run(tmp_path, idx_dir, 2, ["--optimizer", "sgd", "--log_decomposition", "true"])
  for r in records:
    assert 0 < r["decomp_frac_noisy_dom"] < 1 and 0 <= r["decomp_p_B_noisy_dom"] <= 1
    assert r["decomp_noisy_weight_sgd"] == pytest.approx(1.0)
    kinds = r["decomp_frac_noisy_dom"] + r["decomp_frac_clean_dom"] + r["decomp_frac_aligned"]
    assert 0.9 < kinds < 1 + 1e-6  # a coordinate with a zero part is of no kind
  assert "decomp_amp_clean" in header and "sharpness_lambda_max" not in header
  assert (tmp_path / "run" / "curves.png").stat().st_size > 0


@pytest.mark.slow  # a ResNet's Hessian-vector products compile and run for about a minute on 2 cores
def test_probe_logs_sharpness_every_n_epochs_and_at_the_last(tmp_path, idx_dir):
  flags = ["--optimizer", "sam", "--sharpness_every", "2", "--sharpness_iterations", "3", "--hutchinson_samples", "2"]
  records, header = _probe_run(tmp_path, idx_dir, 3, flags)
  assert [r["sharpness_lambda_max"] is None for r in records] == [True, False, False]  # epochs 2 and 3 (the last)
  assert all(np.isfinite(r["sharpness_trace"]) and r["sharpness_lambda_max"] > 0 for r in records[1:])
  assert "sharpness_trace" in header and "decomp_amp_clean" not in header


def test_probe_batch_is_fixed_by_the_seed():
  from saner_jax.train import probe
  from saner_jax.train.config import TrainConfig

  indices = probe.probe_indices(TrainConfig(seed=0, probe_examples=48), 64)
  assert len(set(indices)) == 48 and indices.max() < 64
  np.testing.assert_array_equal(indices, probe.probe_indices(TrainConfig(seed=0, probe_examples=48), 64))
  assert not np.array_equal(indices, probe.probe_indices(TrainConfig(seed=1, probe_examples=48), 64))
  assert len(probe.probe_indices(TrainConfig(probe_examples=500), 64)) == 64  # at most the training set


def test_curves_figure_gains_the_probe_panels(tmp_path):
  from saner_jax.train import reporting as report

  history = [
    {"epoch": e, **{key: 0.5 for key, _ in report.PANELS}, "decomp_p_B_noisy_dom": 0.3, "sharpness_lambda_max": s}
    for e, s in ((1, None), (2, 12.0), (3, 9.0))
  ]
  report.plot_run(history, tmp_path / "curves.png")
  import matplotlib.image

  height = matplotlib.image.imread(tmp_path / "curves.png").shape[0]
  report.plot_run(
    [{k: v for k, v in r.items() if not k.startswith(("decomp", "sharp"))} for r in history], tmp_path / "plain.png"
  )
  assert height > matplotlib.image.imread(tmp_path / "plain.png").shape[0]  # 7 panels take a third row


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--sharpness_every", "-1"], "--sharpness_every: must be >= 0 (0: never), got -1"),
    (["--probe_examples", "0"], "--probe_examples: must be >= 1, got 0"),
    (["--hutchinson_samples", "0"], "--hutchinson_samples: must be >= 1, got 0"),
  ],
)
def test_bad_probe_flags_name_the_flag(flags, message, capsys, tmp_path):
  from saner_jax.train import cli

  assert cli.main(flags + ["--out_dir", str(tmp_path / "never")]) == 2
  assert message in capsys.readouterr().err

"""Tests of saner_jax.train.models.

Shapes and parameter counts come from jax.eval_shape (tracing, no compute);
real forward and backward passes run only on resnet8 and resnet20 at batch 2.
"""

import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from saner_jax.train import models

NUM_CLASSES = 10
INPUTS = {"fashion_mnist": (28, 28, 1), "cifar": (32, 32, 3)}

# name: (published figure, in millions, as printed; exact count here). The
# exact counts equal those of the authors' PyTorch models (resnet.py,
# resnetv2.py, wideresnet.py) at 10 classes; preact_resnet18 is the common
# PyTorch PreActResNet18 (11,171,146) plus its final BatchNorm (1,024).
PARAMETER_COUNTS = {
  "resnet18": ("11.17", 11_173_962),
  "resnet34": ("21.28", 21_282_122),
  "preact_resnet18": ("11.17", 11_172_170),
  "wrn28_10": ("36.5", 36_479_194),
  "wrn40_2": ("2.2", 2_243_546),
  "resnet20": ("0.27", 269_722),
  "resnet8": (None, 75_290),
}


def _size(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.cache
def _abstract_variables(name, input_shape, num_classes=NUM_CLASSES, dtype=jnp.float32):
  model = models.create_model(name, num_classes, dtype=dtype)
  dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), dummy)


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _re_shape(shape):
  return re.escape(str(tuple(shape)))


def _softmax_xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def test_registry_is_complete():
  assert set(models.MODELS) == set(PARAMETER_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count(name):
  published, exact = PARAMETER_COUNTS[name]
  count = _size(_abstract_variables(name, INPUTS["cifar"])["params"])
  assert count == exact
  if published is not None:
    # Tolerance: the count rounds to the published figure, i.e. half a unit
    # of its last digit (0.005M for "11.17", 0.05M for "2.2").
    decimals = len(published.split(".")[1])
    assert f"{count / 1e6:.{decimals}f}" == published


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("data", sorted(INPUTS))
def test_output_shapes(name, data):
  num_classes = 7  # unlike any channel count, so a wrong axis would show
  model = models.create_model(name, num_classes)
  variables = _abstract_variables(name, INPUTS[data], num_classes)
  x = jax.ShapeDtypeStruct((2, *INPUTS[data]), jnp.float32)

  train_out, updates = jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)
  eval_out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)

  for logits in (train_out, eval_out):
    assert logits.shape == (2, num_classes)
    assert logits.dtype == jnp.float32
  stats_tree = jax.tree.structure(variables["batch_stats"])
  assert jax.tree.structure(updates["batch_stats"]) == stats_tree


@functools.cache
def _initialised(name):
  model = models.create_model(name, NUM_CLASSES)
  params, batch_stats = models.init_model(model, jax.random.key(0), INPUTS["cifar"])
  return model, params, batch_stats


@pytest.fixture
def resnet8():
  return _initialised("resnet8")


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_forward_backward(name):
  model, params, batch_stats = _initialised(name)
  x, labels = _images((2, *INPUTS["cifar"])), jnp.array([1, 7])

  @jax.jit
  def loss_and_grads(params, batch_stats):
    def loss_fn(params):
      variables = {"params": params, "batch_stats": batch_stats}
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return _softmax_xent(logits, labels), updates["batch_stats"]

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, new_stats), grads = loss_and_grads(params, batch_stats)

  assert np.isfinite(loss) and loss > 0
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, g in jax.tree.leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
  # train=True moves every running statistic away from its (0, 1) start.
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
  old_stats = jax.tree.leaves_with_path(batch_stats)
  for (path, old), new in zip(old_stats, jax.tree.leaves(new_stats)):
    assert not np.allclose(old, new), jax.tree_util.keystr(path)


def test_train_false_leaves_batch_stats_alone(resnet8):
  model, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))
  _, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], batch_stats)


def test_eval_uses_running_stats_and_train_uses_batch_stats(resnet8):
  model, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))
  # Eval mode normalises each image alone; train mode with the batch.
  together = model.apply(variables, x, train=False)
  alone = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-5)
  train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  together, _ = train(variables, x)
  alone, _ = train(variables, jnp.concatenate([x[:1], -x[1:]]))
  assert not np.allclose(alone[0], together[0], atol=1e-3)


def test_batchnorm_momentum_matches_pytorch(resnet8):
  model, params, batch_stats = resnet8
  x = _images((2, *INPUTS["cifar"]))
  _, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  stem = jax.lax.conv_general_dilated(
    x,
    params["stem_conv"]["kernel"],
    (1, 1),
    [(1, 1), (1, 1)],
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  # PyTorch's momentum 0.1: new = 0.9 * old + 0.1 * batch, from mean 0, var 1.
  new = updates["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(new["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)


def test_bfloat16_compute_float32_params_and_logits(resnet8):
  model32, params, batch_stats = resnet8
  model16 = models.create_model("resnet8", NUM_CLASSES, dtype=jnp.bfloat16)
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))

  abstract16 = _abstract_variables("resnet8", INPUTS["cifar"], dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(abstract16):
    assert leaf.dtype == jnp.float32
  logits16, updates = model16.apply(variables, x, train=True, mutable=["batch_stats"])
  logits32, _ = model32.apply(variables, x, train=True, mutable=["batch_stats"])

  assert logits16.dtype == jnp.float32
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.float32
  assert not np.array_equal(logits16, logits32)  # bf16 rounding did happen
  atol = 0.1 * np.abs(logits32).max()
  np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=atol)


def _recording_conv(calls):
  def conv(lhs, rhs, window_strides, padding, **kwargs):
    calls.append((lhs.dtype, rhs.dtype, rhs.shape[:2], tuple(map(tuple, padding))))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

  return conv


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_conv_uses_the_given_convolution(name):
  calls = []
  model = models.create_model(name, NUM_CLASSES, dtype=jnp.bfloat16, conv_general_dilated=_recording_conv(calls))
  variables = _abstract_variables(name, INPUTS["cifar"])
  x = jax.ShapeDtypeStruct((2, *INPUTS["cifar"]), jnp.float32)
  jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  kernels = [leaf for leaf in jax.tree.leaves(variables["params"]) if leaf.ndim == 4]
  assert len(calls) == len(kernels)
  bf16 = jnp.dtype(jnp.bfloat16)
  # The convolutions compute in the compute dtype, from float32 parameters,
  # padded like PyTorch's (padding=1 for 3x3): 'SAME' would pad stride-2
  # convolutions by (0, 1) and shift their windows by a pixel.
  assert set(calls) <= {
    (bf16, bf16, (3, 3), ((1, 1), (1, 1))),
    (bf16, bf16, (1, 1), ((0, 0), (0, 0))),
  }


def _zero_conv(lhs, rhs, *args, **kwargs):
  return jnp.zeros_like(jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs))


def test_given_convolution_changes_the_output(resnet8):
  _, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))
  model = models.create_model("resnet8", NUM_CLASSES, conv_general_dilated=_zero_conv)
  # With every convolution zero, fresh running stats (0, 1), zero BatchNorm
  # biases and a zero Dense bias, the logits are exactly zero.
  np.testing.assert_array_equal(model.apply(variables, x, train=False), 0.0)
  assert np.any(resnet8[0].apply(variables, x, train=False) != 0.0)


def test_pad_shortcut_keeps_even_pixels_and_centres_the_channels():
  # He et al.'s option A as in the authors' resnetv2.py: x[:, :, ::2, ::2],
  # zero channels split evenly on both sides. Zero convolutions leave the
  # block's output to the shortcut alone.
  conv = functools.partial(nn.Conv, use_bias=False, conv_general_dilated=_zero_conv)
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = models.BasicBlock(8, 2, "pad", conv, norm)
  x = jnp.abs(_images((1, 7, 7, 4)))
  out, _ = jax.jit(block.init_with_output)(jax.random.key(0), x)
  expected = np.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
  np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize(
  "name, fan", [("resnet18", "fan_out"), ("preact_resnet18", "fan_out"), ("resnet20", "fan_in"), ("wrn28_10", "fan_in")]
)
def test_conv_init_is_he_normal(name, fan):
  model = models.create_model(name, NUM_CLASSES)
  kernel = model.conv_init(jax.random.key(1), (3, 3, 64, 128))
  fan_size = 9 * (128 if fan == "fan_out" else 64)
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / fan_size), rtol=0.02)
  assert np.abs(kernel).max() > 2.5 * math.sqrt(2 / fan_size)  # not truncated at 2 sigma


def test_init_model_applies_the_configured_initialisers(resnet8):
  _, params, batch_stats = resnet8
  kernel = params["stage3_block1"]["conv2"]["kernel"]  # 3x3x64x64, fan_in 576
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / 576), rtol=0.03)
  np.testing.assert_array_equal(params["stage3_block1"]["bn2"]["scale"], 1.0)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  for path, leaf in jax.tree.leaves_with_path(batch_stats):
    expected = 0.0 if jax.tree_util.keystr(path).endswith("['mean']") else 1.0
    np.testing.assert_array_equal(leaf, expected)


def test_wide_resnet_batchnorm_scales_start_uniform():
  model = models.create_model("wrn40_2", NUM_CLASSES)
  scale = model.bn_scale_init(jax.random.key(2), (4096,))
  assert scale.min() >= 0.0 and scale.max() < 1.0
  np.testing.assert_allclose(scale.mean(), 0.5, atol=0.02)


def test_wide_resnet_dropout_acts_in_training_only():
  model = models.create_model("wrn40_2", NUM_CLASSES).clone(dropout_rate=0.3)
  variables = _abstract_variables("wrn40_2", INPUTS["cifar"])
  x = jax.ShapeDtypeStruct((2, *INPUTS["cifar"]), jnp.float32)
  train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  # Tracing is enough: flax asks for the 'dropout' rng only where a dropout
  # layer is active.
  jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  with_rng = functools.partial(train, rngs={"dropout": jax.random.key(0)})
  jax.eval_shape(with_rng, variables, x)
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    jax.eval_shape(train, variables, x)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="resnet1800.*resnet18.*wrn40_2"):
    models.create_model("resnet1800", NUM_CLASSES)
  with pytest.raises(ValueError, match="unknown model 'vgg16'"):
    models.check_input("vgg16", (32, 32, 3))


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.create_model("resnet8", num_classes)


@pytest.mark.parametrize(
  "name, ok, too_small",
  [
    ("resnet18", (8, 8, 3), (7, 8, 3)),
    ("resnet20", (4, 4, 1), (28, 3, 1)),
    ("wrn40_2", (128, 4, 4, 3), (128, 3, 3, 3)),
  ],
)
def test_check_input_minimum_size(name, ok, too_small):
  models.check_input(name, ok)
  with pytest.raises(ValueError, match=rf"'{name}'.*{_re_shape(too_small)}"):
    models.check_input(name, too_small)


@pytest.mark.parametrize("shape", [(28, 28), (1, 1, 28, 28, 1), (32, 0, 3), (32.0, 32, 3)])
def test_check_input_rejects_malformed_shapes(shape):
  with pytest.raises(ValueError, match=rf"'resnet8'.*{_re_shape(shape)}"):
    models.check_input("resnet8", shape)


def test_model_and_init_model_reject_bad_inputs(resnet8):
  model, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  with pytest.raises(ValueError, match=r"\(N, H, W, C\).*\(32, 32, 3\)"):
    model.apply(variables, jnp.zeros((32, 32, 3)), train=False)
  with pytest.raises(ValueError, match=r"at least 8x8.*\(2, 4, 4, 3\)"):
    jax.eval_shape(
      functools.partial(models.create_model("resnet18", NUM_CLASSES).init, train=False),
      jax.random.key(0),
      jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float32),
    )
  with pytest.raises(ValueError, match=r"at least 4x4"):
    models.init_model(model, jax.random.key(0), (3, 3, 3))

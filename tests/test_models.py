"""Tests of saner_jax.train.models.

Shapes and parameter counts come from jax.eval_shape (tracing, no compute);
real forward and backward passes run at batch 2 on every family (FORWARD_BACKWARD).
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
# resnetv2.py, wideresnet.py, densenet.py) at 10 classes; preact_resnet18 is
# the common PyTorch PreActResNet18 (11,171,146) plus its final BatchNorm
# (1,024). The ImageNet-style models are checked against their references
# at 1000 classes below.
PARAMETER_COUNTS = {
  "resnet18": ("11.17", 11_173_962),
  "resnet34": ("21.28", 21_282_122),
  "resnet50": ("23.52", 23_520_842),
  "preact_resnet18": ("11.17", 11_172_170),
  "wrn28_10": ("36.5", 36_479_194),
  "wrn40_2": ("2.2", 2_243_546),
  "resnet20": ("0.27", 269_722),
  "resnet4": (None, 5_306),
  "resnet8": (None, 75_290),
  "densenet121": (None, 6_956_298),
  "densenet121_imagenet": (None, 6_964_106),
  "resnet18_imagenet": (None, 11_181_642),
  "resnet50_imagenet": (None, 23_528_522),
  "inception_resnet_v2": (None, 54_321_834),
}

# At 1000 classes: torchvision's densenet121, resnet18 and resnet50
# (sum(p.numel() for p in model.parameters()): BatchNorm scales and biases
# are parameters, running statistics buffers), and the authors'
# InceptionResNetV2 (Cadene's port, the same as timm's inception_resnet_v2).
REFERENCE_COUNTS_1000 = {
  "densenet121_imagenet": 7_978_856,
  "resnet18_imagenet": 11_689_512,
  "resnet50_imagenet": 25_557_032,
  "inception_resnet_v2": 55_843_464,
}


def _input_shape(name, channels=3):
  """The CIFAR size, or the smallest image the model takes where that is larger."""
  size = max(32, models.create_model(name, 1).min_input_size)
  return (size, size, channels)


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
  assert set(models.width_models()) == {"resnet4", "resnet8", "resnet20", "resnet18", "resnet34", "resnet50"}


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count(name):
  published, exact = PARAMETER_COUNTS[name]
  count = _size(_abstract_variables(name, _input_shape(name))["params"])
  assert count == exact
  if published is not None:
    # Tolerance: the count rounds to the published figure, i.e. half a unit
    # of its last digit (0.005M for "11.17", 0.05M for "2.2").
    decimals = len(published.split(".")[1])
    assert f"{count / 1e6:.{decimals}f}" == published


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS_1000))
def test_parameter_count_at_1000_classes_equals_the_reference(name):
  assert _size(_abstract_variables(name, _input_shape(name), 1000)["params"]) == REFERENCE_COUNTS_1000[name]


def test_densenet121_is_torchvisions_with_the_authors_cifar_stem():
  # The authors' densenet.py replaces torchvision's 7x7 stem convolution
  # (3 * 64 * 49 weights) and its BatchNorm (64 scales, 64 biases) with a
  # 3x3 convolution (3 * 64 * 9) and no BatchNorm; the transitions' ReLU has
  # no parameters.
  cifar = _size(_abstract_variables("densenet121", INPUTS["cifar"], 1000)["params"])
  assert cifar == REFERENCE_COUNTS_1000["densenet121_imagenet"] - 3 * 64 * 49 - 2 * 64 + 3 * 64 * 9 == 7_971_048


def test_inception_resnet_v2_matches_keras_count():
  # Keras's InceptionResNetV2 (1000 classes) has 55,873,736 weights, of which
  # 55,813,192 trainable: its BatchNorms have no scale (scale=False) and it
  # counts the running means and variances as (non-trainable) weights.
  variables = _abstract_variables("inception_resnet_v2", (75, 75, 3), 1000)
  params, stats = _size(variables["params"]), _size(variables["batch_stats"])
  bn_scales = sum(
    math.prod(leaf.shape)
    for path, leaf in jax.tree.leaves_with_path(variables["params"])
    if jax.tree_util.keystr(path).endswith("['bn']['scale']")
  )
  assert bn_scales == stats // 2 == 30_272
  assert params - bn_scales == 55_813_192
  assert params - bn_scales + stats == 55_873_736


def _feature_map(name, size, layer, **overrides):
  """The shape of the output of submodule ``layer`` on a (1, size, size, 3) batch, traced only."""
  model = models.create_model(name, NUM_CLASSES).clone(**overrides)
  variables = _abstract_variables(name, _input_shape(name))
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  apply = functools.partial(
    model.apply, train=False, capture_intermediates=lambda module, _: module.name == layer, mutable=["intermediates"]
  )
  logits, state = jax.eval_shape(apply, variables, x)
  assert logits.shape == (1, NUM_CLASSES)
  (out,) = state["intermediates"][layer]["__call__"]
  return out.shape


@pytest.mark.parametrize(
  "name, size, layer, shape",
  [
    # The published resolutions: 299 px leaves InceptionResNetV2 8x8 maps
    # (before pooling) of 1536 channels, 224 px ResNet-50 and DenseNet-121
    # 7x7 of 2048 and 1024, and 32 px the CIFAR DenseNet 4x4 of 1024.
    ("inception_resnet_v2", 299, "conv2d_7b", (1, 8, 8, 1536)),
    ("resnet50_imagenet", 224, "stage4_block3", (1, 7, 7, 2048)),
    ("resnet18_imagenet", 224, "stage4_block2", (1, 7, 7, 512)),
    ("densenet121_imagenet", 224, "final_bn", (1, 7, 7, 1024)),
    ("densenet121", 32, "final_bn", (1, 4, 4, 1024)),
    ("resnet50", 32, "stage4_block3", (1, 4, 4, 2048)),
  ],
)
def test_feature_maps_at_the_published_resolution(name, size, layer, shape):
  assert _feature_map(name, size, layer) == shape


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("data", sorted(INPUTS))
def test_output_shapes(name, data):
  num_classes = 7  # unlike any channel count, so a wrong axis would show
  model = models.create_model(name, num_classes)
  if model.min_input_size > INPUTS[data][0]:
    # The ImageNet models' stems take 4 times the stride: a CIFAR image is
    # too small for their reductions to leave a map.
    with pytest.raises(ValueError, match=rf"at least {model.min_input_size}x{model.min_input_size}"):
      models.check_input(name, INPUTS[data])
    return
  variables = _abstract_variables(name, INPUTS[data], num_classes)
  x = jax.ShapeDtypeStruct((2, *INPUTS[data]), jnp.float32)

  train_out, updates = jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)
  eval_out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)

  for logits in (train_out, eval_out):
    assert logits.shape == (2, num_classes)
    assert logits.dtype == jnp.float32
  stats_tree = jax.tree.structure(variables["batch_stats"])
  assert jax.tree.structure(updates["batch_stats"]) == stats_tree


@pytest.mark.parametrize(
  "name, ok, too_small",
  [
    ("inception_resnet_v2", (75, 75, 3), (74, 299, 3)),
    ("resnet50_imagenet", (32, 32, 3), (31, 224, 3)),
    ("densenet121_imagenet", (32, 32, 3), (224, 31, 3)),
    ("densenet121", (8, 8, 3), (7, 8, 3)),
  ],
)
def test_smallest_inputs_of_the_new_models(name, ok, too_small):
  # The smallest input leaves the last stage a 1x1 map (InceptionResNetV2:
  # 75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1).
  layer = {"inception_resnet_v2": "conv2d_7b", "resnet50_imagenet": "stage4_block3"}.get(name, "final_bn")
  assert _feature_map(name, ok[0], layer)[1:3] == (1, 1)
  models.check_input(name, ok)
  with pytest.raises(ValueError, match=rf"'{name}'.*{_re_shape(too_small)}"):
    models.check_input(name, too_small)


@functools.cache
def _initialised(name):
  model = models.create_model(name, NUM_CLASSES)
  params, batch_stats = models.init_model(model, jax.random.key(0), INPUTS["cifar"])
  return model, params, batch_stats


@pytest.fixture
def resnet8():
  return _initialised("resnet8")


def _jitted_apply(model):
  """``model.apply`` as one program per signature: run eagerly, every operation compiles alone."""
  return jax.jit(model.apply, static_argnames=("train", "mutable"))


# One real forward and backward pass per family, at batch 2: the full
# CIFAR ResNets (the paper presets' ResNet-18, ResNet-34 and WRN-28-10, whose
# training runs in test_paper_configs.py use the smoke-test ResNet-4, among them), and the large models with fewer blocks (each kind of block
# and stem kept) at the smallest size they take, so that compiling stays
# cheap. The ImageNet stem and the bottleneck block are resnet50_imagenet's.
FORWARD_BACKWARD = {
  "resnet4": ("resnet4", {}, 32),
  "resnet8": ("resnet8", {}, 32),
  "resnet20": ("resnet20", {}, 32),
  "resnet18": ("resnet18", {}, 32),
  "resnet34": ("resnet34", {}, 32),
  "wrn28_10": ("wrn28_10", {}, 32),
  "resnet50_imagenet_short": ("resnet50_imagenet", {"stage_sizes": (1, 1, 1, 1), "width_factor": 0.25}, 32),
  "densenet121_short": ("densenet121", {"stage_sizes": (2, 1, 1, 1), "growth_rate": 8}, 32),
  "inception_resnet_v2_short": ("inception_resnet_v2", {"block_repeats": (1, 1, 1)}, 75),
}
# The authors' DenseNet transitions have no ReLU: their BatchNorm (bias 0 at
# init), 1x1 convolution and average pooling are linear, so the batch mean
# that the next block's first layer sees is exactly 0 per channel.
UNMOVED_MEANS = {
  "densenet121_short": {f"['block{i}_layer1']['bn1']['mean']" for i in (2, 3, 4)},
}


@pytest.mark.parametrize("case", sorted(FORWARD_BACKWARD))
def test_forward_backward(case):
  name, overrides, size = FORWARD_BACKWARD[case]
  model = models.create_model(name, NUM_CLASSES).clone(**overrides)
  x, labels = _images((2, size, size, 3)), jnp.array([1, 7])

  def init_loss_and_grads(key):
    variables = model.init(key, x[:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss_fn(params):
      variables = {"params": params, "batch_stats": batch_stats}
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return _softmax_xent(logits, labels), updates["batch_stats"]

    return batch_stats, *jax.value_and_grad(loss_fn, has_aux=True)(params)

  # One program, run once: LLVM's optimisations would cost more than they save.
  key = jax.random.key(0)
  compiled = jax.jit(init_loss_and_grads).lower(key).compile({"xla_backend_optimization_level": 0})
  # On the host: an eager comparison of a device array compiles a program per leaf shape.
  batch_stats, (loss, new_stats), grads = jax.device_get(compiled(key))

  assert np.isfinite(loss) and loss > 0
  for path, g in jax.tree.leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
  # train=True moves every running statistic away from its (0, 1) start.
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
  old_stats = jax.tree.leaves_with_path(batch_stats)
  unmoved = UNMOVED_MEANS.get(case, set())
  for (path, old), new in zip(old_stats, jax.tree.leaves(new_stats)):
    if jax.tree_util.keystr(path) in unmoved:
      np.testing.assert_allclose(new, 0.0, atol=1e-7)
    else:
      assert not np.allclose(old, new), jax.tree_util.keystr(path)


def test_train_false_leaves_batch_stats_alone(resnet8):
  model, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))
  _, updates = _jitted_apply(model)(variables, x, train=False, mutable=("batch_stats",))
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], batch_stats)


def test_eval_uses_running_stats_and_train_uses_batch_stats(resnet8):
  model, params, batch_stats = resnet8
  variables = {"params": params, "batch_stats": batch_stats}
  x = _images((2, *INPUTS["cifar"]))
  # Eval mode normalises each image alone; train mode with the batch.
  apply = _jitted_apply(model)
  together = apply(variables, x, train=False)
  alone = apply(variables, x[:1], train=False)
  np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-5)
  train = functools.partial(apply, train=True, mutable=("batch_stats",))
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
  logits16, updates = _jitted_apply(model16)(variables, x, train=True, mutable=("batch_stats",))
  logits32, _ = _jitted_apply(model32)(variables, x, train=True, mutable=("batch_stats",))

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


# PyTorch's padding of each kernel size, as flax passes it: ResNets pad a
# 3x3 by one pixel (not 'SAME', which would pad stride-2 convolutions by
# (0, 1) and shift their windows by a pixel), ImageNet stems a 7x7 by 3;
# InceptionResNetV2 pads some 3x3s and none of its reductions.
PADDINGS = {
  (3, 3): {((1, 1), (1, 1))},
  (1, 1): {((0, 0), (0, 0))},
  (7, 7): {((3, 3), (3, 3))},
}
INCEPTION_PADDINGS = {
  (3, 3): {((1, 1), (1, 1)), ((0, 0), (0, 0))},
  (1, 1): {((0, 0), (0, 0))},
  (5, 5): {((2, 2), (2, 2))},
  (1, 7): {((0, 0), (3, 3))},
  (7, 1): {((3, 3), (0, 0))},
  (1, 3): {((0, 0), (1, 1))},
  (3, 1): {((1, 1), (0, 0))},
}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_conv_uses_the_given_convolution(name):
  calls = []
  model = models.create_model(name, NUM_CLASSES, dtype=jnp.bfloat16, conv_general_dilated=_recording_conv(calls))
  shape = _input_shape(name)
  variables = _abstract_variables(name, shape)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  kernels = [leaf for leaf in jax.tree.leaves(variables["params"]) if leaf.ndim == 4]
  assert len(calls) == len(kernels)
  bf16 = jnp.dtype(jnp.bfloat16)
  # The convolutions compute in the compute dtype, from float32 parameters.
  assert {(lhs, rhs) for lhs, rhs, _, _ in calls} == {(bf16, bf16)}
  expected = INCEPTION_PADDINGS if name == "inception_resnet_v2" else PADDINGS
  for _, _, kernel, padding in calls:
    assert padding in expected[kernel], (kernel, padding)
  if name == "inception_resnet_v2":
    assert {kernel for _, _, kernel, _ in calls} == set(INCEPTION_PADDINGS)


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
  "name, fan",
  [
    ("resnet18", "fan_out"),
    ("preact_resnet18", "fan_out"),
    ("resnet20", "fan_in"),
    ("wrn28_10", "fan_in"),
    ("resnet50_imagenet", "fan_out"),
    ("densenet121_imagenet", "fan_in"),
  ],
)
def test_conv_init_is_he_normal(name, fan):
  model = models.create_model(name, NUM_CLASSES)
  kernel = model.conv_init(jax.random.key(1), (3, 3, 64, 128))
  fan_size = 9 * (128 if fan == "fan_out" else 64)
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / fan_size), rtol=0.02)
  assert np.abs(kernel).max() > 2.5 * math.sqrt(2 / fan_size)  # not truncated at 2 sigma


@pytest.mark.parametrize("name", ["densenet121", "inception_resnet_v2"])
def test_conv_init_is_pytorchs_default(name):
  # The authors' densenet.py and inceptionresnetv2.py keep nn.Conv2d's
  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  model = models.create_model(name, NUM_CLASSES)
  kernel = model.conv_init(jax.random.key(1), (3, 3, 64, 128))
  bound = 1 / math.sqrt(9 * 64)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(np.std(kernel), bound / math.sqrt(3), rtol=0.02)


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


def _cifar_resnet18_count(c, num_classes=NUM_CLASSES):
  """CIFAR ResNet-18 with stage widths c, 2c, 4c, 8c, counted by hand.

  Each convolution k*k*in*out weights, each BatchNorm a scale and a bias
  per channel, a 1x1 projection (and its BatchNorm) where a block changes
  the width, and a Dense classifier with biases.
  """
  conv = lambda i, o, k: k * k * i * o
  total, channels = conv(3, c, 3) + 2 * c, c
  for width in (c, 2 * c, 4 * c, 8 * c):
    for _ in range(2):
      total += conv(channels, width, 3) + conv(width, width, 3) + 4 * width
      if channels != width:
        total += conv(channels, width, 1) + 2 * width
      channels = width
  return total + channels * num_classes + num_classes


@pytest.mark.parametrize("width, c", [(0.5, 32), (1, 64), (1.5, 96), (2, 128)])
def test_width_factor_scales_every_width(width, c):
  model = models.create_model("resnet18", NUM_CLASSES, width=width)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  assert model.widths == (c, 2 * c, 4 * c, 8 * c)
  assert _size(variables["params"]) == _cifar_resnet18_count(c)
  assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, c)


def test_width_one_is_the_published_network():
  assert _cifar_resnet18_count(64) == PARAMETER_COUNTS["resnet18"][1]
  assert models.create_model("resnet18", NUM_CLASSES, width=1.0) == models.create_model("resnet18", NUM_CLASSES)


def test_width_rounds_down_like_the_authors_int():
  # int(0.3 * 16), int(0.3 * 32), int(0.3 * 64); the option-A shortcut pads
  # the odd channel counts (4 -> 9: 2 zero channels before, 3 after).
  model = models.create_model("resnet20", NUM_CLASSES, width=0.3)
  assert model.widths == (4, 9, 19)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  assert variables["params"]["head"]["kernel"].shape == (19, NUM_CLASSES)


@pytest.mark.parametrize(
  "name, width, message",
  [
    ("wrn28_10", 2.0, r"'wrn28_10' has no width factor; the models that do: resnet4, resnet8, resnet20, resnet18"),
    ("densenet121", 0.5, r"'densenet121' has no width factor"),
    ("resnet18_imagenet", 2.0, r"'resnet18_imagenet' has no width factor"),
    ("resnet18", 0.0, r"width must be a positive number, got 0.0"),
    ("resnet18", float("nan"), r"width must be a positive number"),
    (
      "resnet20",
      0.05,
      r"width 0.05 leaves model 'resnet20' a stage without channels \(widths \(0, 1, 3\)\); .* 0.0625",
    ),
  ],
)
def test_bad_widths(name, width, message):
  with pytest.raises(ValueError, match=message):
    models.create_model(name, NUM_CLASSES, width=width)

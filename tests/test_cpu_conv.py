"""Tests of saner_jax.cpu_conv: oneDNN's values and gradients equal lax's, stock op off the CPU.

Every comparison is against ``jax.lax.conv_general_dilated`` on the same
inputs, under jit, to float32 rounding (the sums run in another order). The
non-CPU branch is checked on StableHLO exported for CUDA and TPU
(``jax.export`` lowers for a platform without its device).
"""

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from saner_jax import cpu_conv
from saner_jax.cpu_conv import _build

NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(lhs_shape, rhs_shape, dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, lhs_shape, jnp.float32)
  w = jax.random.normal(kw, rhs_shape, jnp.float32) / np.sqrt(np.prod(rhs_shape[:3]))
  return x.astype(dtype), w.astype(dtype)


def _value_and_grads(conv, x, w, **kwargs):
  """The convolution and the gradients of a non-linear loss of it w.r.t. input and kernel."""

  def loss(x, w):
    return jnp.sum(jnp.sin(conv(x, w, **kwargs).astype(jnp.float32)))

  y = jax.jit(lambda x, w: conv(x, w, **kwargs))(x, w)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  return y, dx, dw


def _assert_close(actual, expected, rtol=1e-5, atol=1e-5):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol)


CASES = [
  # (N, H, W, C), (kh, kw, C, O), strides, padding
  ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME"),
  ((2, 9, 7, 3), (3, 3, 3, 5), (2, 2), "SAME"),
  ((2, 9, 7, 3), (3, 3, 3, 5), (2, 1), "SAME_LOWER"),
  ((3, 11, 10, 4), (3, 3, 4, 6), (2, 2), "VALID"),
  ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),  # the ResNets' stride-2 3x3
  ((2, 7, 9, 3), (3, 3, 3, 4), (1, 2), ((0, 2), (1, 0))),
  ((2, 10, 10, 3), (3, 3, 3, 4), (3, 3), ((2, 2), (2, 2))),  # rows no window reaches
  ((2, 8, 8, 6), (1, 1, 6, 4), (1, 1), "VALID"),
  ((2, 8, 8, 6), (1, 1, 6, 4), (2, 2), ((0, 0), (0, 0))),  # the projection shortcut
  ((2, 9, 7, 6), (1, 1, 6, 4), (2, 2), "SAME"),
  ((1, 5, 5, 2), (5, 3, 2, 3), (1, 1), "VALID"),
  # Channel counts for which oneDNN keeps the kernel in a blocked layout,
  # whole blocks and ragged ones: the reorders in and out of it.
  ((2, 9, 9, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),
  ((2, 8, 8, 20), (3, 3, 20, 24), (1, 1), "SAME"),
  ((2, 6, 6, 64), (3, 3, 64, 64), (1, 1), "SAME"),
  ((2, 7, 7, 24), (1, 1, 24, 20), (2, 2), ((2, 2), (2, 2))),  # padding wider than the kernel
  ((2, 2, 2, 4), (3, 3, 4, 6), (1, 1), "SAME"),  # a kernel larger than the image
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, strides, padding", CASES)
def test_values_and_gradients_equal_lax(lhs_shape, rhs_shape, strides, padding, onednn):
  x, w = _inputs(lhs_shape, rhs_shape)
  kwargs = dict(window_strides=strides, padding=padding, dimension_numbers=NHWC)
  assert cpu_conv.is_supported(lhs_shape, rhs_shape, strides, padding, dimension_numbers=NHWC)
  _assert_close(
    _value_and_grads(cpu_conv.conv_general_dilated, x, w, **kwargs),
    _value_and_grads(lax.conv_general_dilated, x, w, **kwargs),
  )


def test_bfloat16_takes_the_stock_op():
  x, w = _inputs((4, 8, 8, 16), (3, 3, 16, 32), jnp.bfloat16)
  kwargs = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)
  conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, **kwargs)
  assert not _uses_fast_path(conv, x, w)
  for ours, stock in zip(
    _value_and_grads(cpu_conv.conv_general_dilated, x, w, **kwargs),
    _value_and_grads(lax.conv_general_dilated, x, w, **kwargs),
  ):
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(stock, np.float32))


def test_precision_and_dimension_numbers_object_are_accepted(onednn):
  x, w = _inputs((2, 8, 8, 3), (3, 3, 3, 4))
  numbers = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=numbers, precision=lax.Precision.HIGHEST)
  _assert_close(
    _value_and_grads(cpu_conv.conv_general_dilated, x, w, **kwargs),
    _value_and_grads(lax.conv_general_dilated, x, w, **kwargs),
  )


def _uses_fast_path(fn, *args) -> bool:
  """Whether ``fn``'s jaxpr dispatches on the platform (only the fast path does)."""
  return "platform_index" in str(jax.make_jaxpr(fn)(*args))


UNSUPPORTED = {
  "lhs dilation": dict(lhs_dilation=(2, 2), padding=((1, 1), (1, 1))),
  "rhs dilation": dict(rhs_dilation=(2, 2)),
  "feature groups": dict(feature_group_count=2),
  "preferred type": dict(preferred_element_type=jnp.float32),
  "negative padding": dict(padding=((-1, 0), (0, 0))),
  "NCHW": dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
  "lax default layout": dict(dimension_numbers=None),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_arguments_fall_back_to_lax(name):
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  kwargs.update(UNSUPPORTED[name])
  if kwargs["dimension_numbers"] is None or kwargs["dimension_numbers"][0] == "NCHW":
    x, w = _inputs((2, 4, 8, 8), (6, 4, 3, 3))  # NCHW, OIHW
  else:
    x, w = _inputs((2, 8, 8, 4), (3, 3, 2 if "feature_group_count" in kwargs else 4, 6))
  conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, **kwargs)
  assert not _uses_fast_path(conv, x, w)
  np.testing.assert_array_equal(jax.jit(conv)(x, w), lax.conv_general_dilated(x, w, **kwargs))


def test_other_unsupported_shapes_fall_back():
  kwargs = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=NHWC)
  # 1-D convolution; an empty batch; a kernel larger than the padded image;
  # integer operands.
  assert not cpu_conv.is_supported((2, 8, 4), (3, 4, 6), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  assert not cpu_conv.is_supported((0, 8, 8, 4), (3, 3, 4, 6), **kwargs)
  assert not cpu_conv.is_supported((2, 2, 2, 4), (3, 3, 4, 6), **kwargs)
  assert not cpu_conv.is_supported((2, 8, 8, 4), (3, 3, 4, 6), **kwargs, lhs_dtype=jnp.int32, rhs_dtype=jnp.int32)
  assert not cpu_conv.is_supported((2, 8, 8, 4), (3, 3, 4, 6), **kwargs, lhs_dtype=jnp.float16, rhs_dtype=jnp.float16)
  assert not cpu_conv.is_supported((2, 8, 8, 4), (3, 3, 4, 6), **kwargs, rhs_dtype=jnp.bfloat16)
  x, w = _inputs((0, 8, 8, 4), (3, 3, 4, 6))
  conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, **kwargs)
  assert not _uses_fast_path(conv, x, w)
  assert jax.jit(conv)(x, w).shape == (0, 6, 6, 6)


def test_vmap_of_gradients(onednn):
  x, w = _inputs((3, 2, 8, 8, 4), (3, 3, 4, 5))
  kwargs = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)

  def per_example_grads(conv):
    loss = lambda w, x: jnp.sum(jnp.sin(conv(x, w, **kwargs)))
    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)

  _assert_close([per_example_grads(cpu_conv.conv_general_dilated)], [per_example_grads(lax.conv_general_dilated)])


def test_flax_conv_module(onednn):
  """Plugged into nn.Conv (keyword arguments, explicit padding pairs, its dimension numbers)."""
  x, _ = _inputs((2, 9, 9, 3), (1, 1, 1, 1))

  def model(conv_fn):
    return nn.Sequential(
      [
        nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False, conv_general_dilated=conv_fn),
        nn.relu,
        nn.Conv(4, (1, 1), padding="SAME", conv_general_dilated=conv_fn),
      ]
    )

  params = model(None).init(jax.random.key(1), x)
  loss = lambda conv_fn: lambda p: jnp.sum(model(conv_fn).apply(p, x) ** 2)
  ours = jax.jit(jax.grad(loss(cpu_conv.conv_general_dilated)))(params)
  stock = jax.jit(jax.grad(loss(None)))(params)
  _assert_close(jax.tree.leaves(ours), jax.tree.leaves(stock))


def _stablehlo(fn, platform, *args):
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  return jax.export.export(jax.jit(fn), platforms=(platform,))(*shapes).mlir_module()


def _convolutions(text):
  """The convolutions of a StableHLO module: operand layouts, window and types, no SSA names."""
  lines = [line.split("loc(")[0] for line in text.splitlines() if "stablehlo.convolution" in line]
  return sorted(re.sub(r"%[\w#]+", "%", line).strip() for line in lines)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_platforms_lower_to_the_stock_op(platform, onednn):
  """Forward and both gradients, lowered for GPU/TPU: lax's convolutions and nothing of the CPU path."""
  x, w = _inputs((2, 9, 9, 3), (3, 3, 3, 4))
  kwargs = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)

  def value_and_grads(conv):
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, **kwargs)))
    return lambda x, w: (conv(x, w, **kwargs), jax.grad(loss, argnums=(0, 1))(x, w))

  ours = _stablehlo(value_and_grads(cpu_conv.conv_general_dilated), platform, x, w)
  stock = _stablehlo(value_and_grads(lax.conv_general_dilated), platform, x, w)
  assert len(_convolutions(ours)) == 4  # forward (twice: value and loss), input and kernel gradient
  assert _convolutions(ours) == _convolutions(stock)
  assert "custom_call" not in ours and "saner_onednn" not in ours


def test_cpu_lowering_calls_onednn_for_all_three_convolutions(onednn):
  """On the CPU the forward pass and both gradients are oneDNN custom calls, and XLA runs no convolution."""
  x, w = _inputs((2, 8, 8, 3), (3, 3, 3, 4))

  def value_and_grads(x, w):
    conv = lambda x, w: cpu_conv.conv_general_dilated(jax.nn.relu(x), w, (1, 1), "SAME", dimension_numbers=NHWC)
    return conv(x, w), jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))(x, w)

  hlo = jax.jit(value_and_grads).lower(x, w).compile().as_text()
  targets = re.findall(r'custom_call_target="(\w+)"', hlo)
  assert sorted(set(targets)) == sorted(_build.ONEDNN_CONV_TARGETS)
  assert " convolution(" not in hlo and "ynn_fusion" not in hlo


def test_concurrent_calls_from_threads_agree(onednn):
  """Two threads run the same jitted gradients at once: XLA may run oneDNN calls concurrently, and the
  primitives are shared while each call has its own scratchpad."""
  x, w = _inputs((8, 16, 16, 16), (3, 3, 16, 32))
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  grads = jax.jit(
    jax.grad(lambda x, w: jnp.sum(jnp.sin(cpu_conv.conv_general_dilated(x, w, **kwargs))), argnums=(0, 1))
  )
  expected = jax.grad(lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, **kwargs))), argnums=(0, 1))(x, w)

  def run(_):
    return [grads(x, w) for _ in range(10)]

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = [g for batch in pool.map(run, range(2)) for g in batch]
  for got in results:
    _assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_handlers_check_shapes(onednn):
  """A mismatched output shape is an error from the kernel, not a write out of bounds."""
  x, w = _inputs((2, 8, 8, 3), (3, 3, 3, 4))
  call = jax.ffi.ffi_call("saner_onednn_conv_forward", jax.ShapeDtypeStruct((2, 8, 8, 5), jnp.float32))
  geometry = dict(stride_h=1, stride_w=1, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1)
  with pytest.raises(Exception, match="output shape does not match the geometry"):
    jax.block_until_ready(call(x, w, **{k: np.int64(v) for k, v in geometry.items()}))


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler++")
  with pytest.raises(_build.NativeBuildError, match="needs a C[+][+] compiler: 'no-such-compiler[+][+]' was not found"):
    _build._build(tmp_path / "lib.so")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_missing_onednn_headers_are_named(tmp_path, monkeypatch):
  # -nostdinc hides /usr/include, where Debian puts dnnl.hpp: the compiler
  # then fails as it does on a machine without libdnnl-dev.
  monkeypatch.setenv("CXX", "g++ -nostdinc")
  with pytest.raises(_build.NativeBuildError, match="oneDNN 2.x headers and library were not found"):
    _build._build(tmp_path / "lib.so")
  assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_build_makes_a_library_with_the_three_handlers(tmp_path, onednn):
  library = tmp_path / "lib.so"
  _build._build(library)
  assert [p.name for p in tmp_path.iterdir()] == ["lib.so"]
  handle = ctypes.cdll.LoadLibrary(str(library))
  for symbol in _build.ONEDNN_CONV_TARGETS.values():
    getattr(handle, symbol)  # AttributeError if the handler is not exported


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("SANER_JAX_CACHE_DIR", str(tmp_path))
  assert _build.cache_dir() == tmp_path
  monkeypatch.delenv("SANER_JAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert _build.cache_dir() == tmp_path / "xdg" / "saner_jax"


def test_choose_takes_onednn_on_one_cpu_device_in_float32(onednn):
  choice = cpu_conv.choose()
  assert (choice.conv, choice.path, choice.reason) == (
    cpu_conv.conv_general_dilated,
    "onednn",
    "oneDNN's (saner_jax.cpu_conv)",
  )
  assert cpu_conv.choose(True).path == "onednn"


def test_choose_keeps_xla_where_onednn_does_not_apply(onednn):
  assert cpu_conv.choose("false") == (None, "XLA's (oneDNN's switched off)")
  assert cpu_conv.choose(False).path == "xla"
  assert cpu_conv.choose(devices=8) == (None, "XLA's (8 devices: XLA cannot partition oneDNN's custom calls)")
  with pytest.raises(ValueError, match="cannot split over the 8 devices"):
    cpu_conv.choose("true", devices=8)
  assert cpu_conv.choose(dtype=jnp.bfloat16) == (None, "XLA's (bfloat16 compute: the oneDNN kernels are float32 only)")
  with pytest.raises(ValueError, match="one of"):
    cpu_conv.choose("sometimes")


def test_choose_falls_back_when_the_kernels_do_not_build(tmp_path):
  """Without a compiler "auto" says so and takes XLA's; "true" raises (a fresh process: the build is cached per process)."""
  script = (
    "from saner_jax import cpu_conv\n"
    "print(cpu_conv.choose())\n"
    "try:\n  cpu_conv.choose('true')\nexcept cpu_conv.NativeBuildError as e:\n  print('raised', e)\n"
  )
  env = {**os.environ, "CXX": "no-such-compiler++", "SANER_JAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == [
    "ConvChoice(conv=None, reason=\"XLA's (oneDNN kernels unavailable: saner_jax.cpu_conv needs a C++ compiler: "
    "'no-such-compiler++' was not found (on Debian or Ubuntu: apt-get install g++ libdnnl-dev))\")",
    "raised saner_jax.cpu_conv needs a C++ compiler: 'no-such-compiler++' was not found "
    "(on Debian or Ubuntu: apt-get install g++ libdnnl-dev)",
  ]

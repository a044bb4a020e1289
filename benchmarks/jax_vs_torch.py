"""SANER train-step time on the CPU: PyTorch against JAX, stock and CPU convolution.

One SANER step on He et al.'s CIFAR ResNet-20 (option-A shortcuts, 269,722
parameters), batch 128 of random 32x32x3 images with a fixed seed, timed for:

  torch (N threads)  the authors' recipe in plain PyTorch: clean pass with
                     BatchNorm running statistics on, SAM's first step
                     e = rho g / (||g|| + 1e-12), perturbed pass with the
                     statistics frozen (momentum 0), then SANER's second step:
                     group B (0 < g_sam / (g + 1e-8) < 1) scaled by alpha, L2
                     weight decay added after, heavy-ball momentum 0.9
                     (lhchau/sam-label-noise, optimizer/saner.py and
                     utils/loop_one_epoch.py; the per-step ``num_group``
                     count, a diagnostic, is left out as JAX computes none).
  jax stock conv     saner_jax.sharpness_aware_grad(sam) -> saner ->
                     optax.add_decayed_weights -> optax.sgd(momentum=0.9) on
                     saner_jax.train.models.create_model('resnet20'), jitted with the
                     state donated, XLA's convolution.
  jax cpu_conv       the same with conv_general_dilated=
                     saner_jax.cpu_conv.conv_general_dilated: oneDNN's
                     convolutions (Debian's libdnnl 2.x, the library
                     behind PyTorch's) called through XLA's FFI.

Every round runs one step of each contender, in a rotated order, so that load
from other processes falls on all of them alike; medians over rounds are
reported, with the 1-minute load average (this machine is shared, and
PyTorch's OpenMP threads slow down far more than XLA's when the cores are
oversubscribed: read the torch numbers with the load next to them). Each
PyTorch contender runs in its own process, which times its own steps and
waits on a pipe between them: in the process that runs XLA, PyTorch's
threads compete with XLA's thread pool, and a 2-thread PyTorch step there
took up to ten times as long. The JAX compile time is ``jit(step).lower(...)``
plus ``.compile()``, timed apart from the first step.

``--profile`` adds a per-op profile of each JAX step (XLA's thunks traced by
``jax.profiler``, grouped by what they compute) and PyTorch's top operators;
``--layers`` the time of every distinct convolution of the network alone:
forward, input gradient and kernel gradient, XLA's, cpu_conv's and PyTorch's.

Usage::

  python benchmarks/jax_vs_torch.py                 # ResNet-20, batch 128, 20 rounds
  python benchmarks/jax_vs_torch.py --profile --layers --torch-threads 2 1   # the results file
  python benchmarks/jax_vs_torch.py --model resnet8 --batch-size 8 --steps 2 --warmup 1 --out ''   # smoke

Writes ``<out>.txt`` (the report as printed) and ``<out>.json`` (every
timing, the command, the git revision, versions and load).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import importlib.metadata
import io
import json
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

import saner_jax
from saner_jax import cpu_conv
from saner_jax.train import (
  models,
  reporting,
)

# Blocks per stage of He et al.'s 6n+2 CIFAR ResNets, as in saner_jax.train.models.
DEPTHS = {"resnet20": 3, "resnet8": 1}


# --------------------------------------------------------------------------
# PyTorch: the authors' ResNet-20 (models/resnetv2.py) and SANER step.


def torch_resnet(blocks_per_stage: int, num_classes: int):
  """He et al.'s CIFAR ResNet with option-A shortcuts, as in the authors' resnetv2.py."""
  from torch import nn
  from torch.nn import functional as F

  class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      # Option A: subsample, zero-pad the new channels, no parameters.
      self.pad = planes // 4 if stride != 1 or in_planes != planes else None

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
      return F.relu(out + shortcut)

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      layers, in_planes = [], 16
      for i, planes in enumerate((16, 32, 64)):
        for j in range(blocks_per_stage):
          layers.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
          in_planes = planes
      self.layers = nn.Sequential(*layers)
      self.linear = nn.Linear(64, num_classes)
      for m in self.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
      out = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.linear(out.mean((2, 3)))

  return ResNet()


def torch_saner_step(model, rho: float, alpha: float, lr: float, wd: float) -> Callable:
  """``step(x, y) -> loss``: the authors' SANER (optimizer/saner.py) in their training loop."""
  import torch
  from torch.nn import functional as F

  params = [p for p in model.parameters() if p.requires_grad]
  batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  state = {p: {} for p in params}

  def enable_running_stats():  # utils/bypass_bn.py
    for m in batch_norms:
      if hasattr(m, "backup_momentum"):
        m.momentum = m.backup_momentum

  def disable_running_stats():
    for m in batch_norms:
      m.backup_momentum, m.momentum = m.momentum, 0

  @torch.no_grad()
  def first_step():
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    scale = rho / (grad_norm + 1e-12)
    for p in params:
      e_w = p.grad * scale
      p.add_(e_w)  # climb to w + e(w)
      state[p]["first_grad"] = p.grad.clone()
      state[p]["e_w"] = e_w
      p.grad = None

  @torch.no_grad()
  def second_step():
    for p in params:
      s = state[p]
      p.sub_(s["e_w"])  # back to w
      ratio = p.grad.div(s["first_grad"].add(1e-8))
      mask = torch.logical_and(ratio > 0, ratio < 1)
      d_p = p.grad.mul(mask).mul(alpha) + p.grad.mul(torch.logical_not(mask))
      d_p.add_(p.data, alpha=wd)
      if "exp_avg" not in s:
        s["exp_avg"] = torch.zeros_like(p)
      s["exp_avg"].mul_(0.9).add_(d_p)
      p.add_(s["exp_avg"], alpha=-lr)
      p.grad = None

  def step(x, y):
    enable_running_stats()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    first_step()
    disable_running_stats()
    F.cross_entropy(model(x), y).backward()
    second_step()
    return loss

  return step


# --------------------------------------------------------------------------
# JAX: the project's components.


def jax_saner_step(model, rho: float, alpha: float, lr: float, wd: float):
  """``(init(params) -> optimizer states, step(state, x, y) -> (state, loss))``."""

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

  perturbation = saner_jax.sam(rho)
  two_pass = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)
  tx = optax.chain(saner_jax.saner(alpha), optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))

  def init(params):
    return tx.init(params), perturbation.init(params)

  def step(state, x, y):
    params, batch_stats, opt_state, p_state = state
    out = two_pass(params, p_state, batch_stats, (x, y))
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return (optax.apply_updates(params, updates), out.aux, opt_state, out.perturbation_state), out.loss

  return init, step


# --------------------------------------------------------------------------
# Per-op profile of a compiled XLA step.


def _hlo_instructions(hlo: str) -> dict[str, dict[str, str]]:
  """name -> {opcode, shape, op_name, root} for every instruction of an HLO module's text.

  A fusion's ``root`` is the opcode of its fused computation's root, and its
  ``op_name`` that root's when the fusion itself carries none.
  """
  computations = {}
  for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S):
    computations[m.group(1)] = m.group(2)

  def parse(line):
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
    if not m:
      return None
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    target = re.search(r'custom_call_target="([^"]*)"', line)
    return m.groups() + (
      op_name.group(1) if op_name else "",
      calls.group(1) if calls else None,
      target.group(1) if target else "",
    )

  out = {}
  for body in computations.values():
    for line in body.splitlines():
      parsed = parse(line)
      if parsed is None:
        continue
      name, shape, opcode, op_name, calls, target = parsed
      root = ""
      if calls in computations:
        roots = [parse(line) for line in computations[calls].splitlines() if "ROOT" in line]
        if roots and roots[0]:
          root, op_name = roots[0][2], op_name or roots[0][3]
      out[name] = {"opcode": opcode, "shape": shape, "op_name": op_name, "root": root, "target": target}
  return out


ONEDNN_CATEGORIES = {
  "saner_onednn_conv_forward": "convolution: forward",
  "saner_onednn_conv_backward_data": "convolution: input gradient",
  "saner_onednn_conv_backward_weights": "convolution: kernel gradient",
}


def _category(info: dict[str, str], batch_size: int) -> str:
  if info["target"] in ONEDNN_CATEGORIES:
    return ONEDNN_CATEGORIES[info["target"]]
  if info["opcode"] == "convolution" or info["root"] == "convolution":
    # Kernel gradients are the only convolutions whose output is not a batch.
    if not re.match(rf"\w+\[{batch_size},", info["shape"]):
      return "convolution: kernel gradient"
    return "convolution: input gradient" if "transpose(" in info["op_name"] else "convolution: forward"
  if info["opcode"] == "conditional":
    return "(conditional: contains the ops below)"
  if "transpose" in info["opcode"] or info["root"] in ("transpose", "copy") or info["opcode"] == "copy":
    return "transposes and copies"
  if "reduce" in info["opcode"] or info["root"] == "reduce":
    return "reductions (BatchNorm statistics, norms)"
  if info["opcode"] == "fusion":
    return "elementwise fusions (BatchNorm, ReLU, residuals, optimizer)"
  return "other"


def xla_profile(compiled, args_fn: Callable[[], tuple], steps: int, batch_size: int) -> dict[str, Any]:
  """Per-category thunk time (ms per step) of a compiled step, from a jax.profiler trace.

  XLA:CPU runs independent thunks concurrently on its two threads, so the
  sum can exceed the wall time; the shares are what matters.
  """
  info = _hlo_instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(compiled(*args_fn()))
    trace_file = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in info:
      per_op[e["name"]] += e["dur"] / 1e3 / steps
  categories = collections.Counter()
  for name, ms in per_op.items():
    category = _category(info[name], batch_size)
    if not category.startswith("("):
      categories[category] += ms
  top = [
    {"op": name, "ms": ms, "category": _category(info[name], batch_size), "shape": info[name]["shape"]}
    for name, ms in per_op.most_common(12)
  ]
  return {"categories_ms": dict(categories.most_common()), "top_ops": top}


# --------------------------------------------------------------------------
# PyTorch runs in its own process. In the process that runs XLA, PyTorch's
# OpenMP threads compete with XLA's thread pool after every JAX step, and a
# 2-thread PyTorch step there measured up to ten times its time alone.


def conv_shapes(image_size: int, blocks_per_stage: int) -> collections.Counter:
  """(input size, in channels, out channels, stride) -> count, for the ResNet's 3x3 convolutions."""
  shapes, size, channels = [(image_size, 3, 16, 1)], image_size, 16  # the stem, then the blocks
  for i, width in enumerate((16, 32, 64)):
    for j in range(blocks_per_stage):
      stride = 2 if i > 0 and j == 0 else 1
      shapes += [(size, channels, width, stride), (size // stride, width, width, 1)]
      size, channels = size // stride, width
  return collections.Counter(shapes)


LAYER_OPS = ("forward", "input grad", "kernel grad")


def batch(args) -> tuple[np.ndarray, np.ndarray]:
  """The fixed random batch, NHWC images and integer labels."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3), dtype=np.float32)
  return x, rng.integers(0, args.num_classes, size=args.batch_size)


def torch_worker(conn, threads: int, args) -> None:
  """Serves ("step" | "profile" | "layer", argument) requests for one PyTorch thread count."""
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  x_np, y_np = batch(args)
  x, y = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y_np)
  step = torch_saner_step(torch_resnet(DEPTHS[args.model], args.num_classes), args.rho, args.alpha, args.lr, args.wd)
  layers = {}
  for index, (size, c, o, stride) in enumerate(conv_shapes(args.image_size, DEPTHS[args.model])):
    tx = torch.randn(args.batch_size, c, size, size, requires_grad=True)
    tw = torch.randn(o, c, 3, 3, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)
    tdy = torch.randn_like(ty)

    def forward(tx=tx, tw=tw, stride=stride):
      with torch.no_grad():
        torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)

    layers[index, "forward"] = forward
    layers[index, "input grad"] = lambda ty=ty, tx=tx, tdy=tdy: torch.autograd.grad(ty, tx, tdy, retain_graph=True)
    layers[index, "kernel grad"] = lambda ty=ty, tw=tw, tdy=tdy: torch.autograd.grad(ty, tw, tdy, retain_graph=True)
  conn.send(torch.__version__)
  while True:
    request, argument = conn.recv()
    if request == "stop":
      return
    if request == "profile":
      from torch.profiler import ProfilerActivity, profile

      with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(argument):
          step(x, y)
      conn.send(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
      continue
    run = (lambda: step(x, y)) if request == "step" else layers[argument]
    start = time.perf_counter()
    run()
    conn.send(time.perf_counter() - start)


class TorchProcess:
  """A PyTorch contender in a spawned process; each call blocks until it answers."""

  def __init__(self, threads: int, args):
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=torch_worker, args=(child, threads, args), daemon=True)
    self._process.start()
    self.version = self._conn.recv()

  def __call__(self, request: str, argument: Any = None):
    self._conn.send((request, argument))
    return self._conn.recv()

  def stop(self) -> None:
    self._conn.send(("stop", None))
    self._process.join()


# --------------------------------------------------------------------------


def jax_layer_runs(args) -> dict[tuple[int, str, str], Callable[[], float]]:
  """(layer index, "xla" | "cpu_conv", op) -> a timed run (s) of that op alone, on random materialised inputs.

  Each op is jitted alone: the forward convolution, and ``jax.vjp``'s input
  and kernel gradients (XLA drops the unused forward pass), with
  ``lax.conv_general_dilated`` ("xla") and ``cpu_conv.conv_general_dilated``
  ("cpu_conv", oneDNN).
  """
  from jax import lax

  runs = {}
  for index, (size, c, o, stride) in enumerate(conv_shapes(args.image_size, DEPTHS[args.model])):
    key = jax.random.key(index)
    x = jax.random.normal(key, (args.batch_size, size, size, c))
    w = jax.random.normal(key, (3, 3, c, o))
    geometry = dict(
      window_strides=(stride, stride), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    dy = jax.random.normal(key, jax.eval_shape(functools.partial(lax.conv_general_dilated, **geometry), x, w).shape)
    jitted = {}
    for framework, conv_fn in (("xla", lax.conv_general_dilated), ("cpu_conv", cpu_conv.conv_general_dilated)):
      conv = functools.partial(conv_fn, **geometry)
      jitted[framework, "forward"] = (jax.jit(conv), (x, w))
      jitted[framework, "input grad"] = (
        jax.jit(lambda x, w, dy, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
        (x, w, dy),
      )
      jitted[framework, "kernel grad"] = (
        jax.jit(lambda x, w, dy, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
        (x, w, dy),
      )
    for (framework, op), (fn, operands) in jitted.items():

      def run(fn=fn, operands=operands) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(*operands))
        return time.perf_counter() - start

      runs[index, framework, op] = run
  return runs


def _cpu_model() -> str:
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def _parse_args(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20", choices=sorted(DEPTHS))
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each contender)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender after compiling")
  parser.add_argument(
    "--torch-threads",
    type=int,
    nargs="*",
    default=[os.cpu_count()],
    help="one PyTorch contender per thread count (default: the core count); none to skip PyTorch",
  )
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--wd", type=float, default=5e-4)
  parser.add_argument("--profile", action="store_true", help="add per-op profiles of the steps")
  parser.add_argument(
    "--layers",
    action="store_true",
    help="add the time of each convolution's forward, input and kernel gradient, XLA against PyTorch",
  )
  parser.add_argument(
    "--out",
    default=os.path.join(ROOT, "benchmarks", "results", "jax_vs_torch"),
    help="path prefix of the .txt and .json results; '' writes nothing",
  )
  args = parser.parse_args(argv)
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")
  return args


def _compile_jax(args, x, y) -> tuple[dict[str, tuple], dict[str, list[dict[str, float]]]]:
  """The JAX contenders' ``(model, fresh state, step, compiled step)`` and compile times.

  The compile time is taken twice, in the order A B A B with fresh step
  functions, and the second is reported: the first includes one-time costs
  of the process (imports, lowering rules) that would fall on whichever
  contender went first.
  """
  convs = {"jax stock conv": None, "jax cpu_conv": cpu_conv.conv_general_dilated}
  setups, compile_s = {}, {n: [] for n in convs}
  for _ in range(2):
    for name, conv in convs.items():
      model = models.create_model(args.model, args.num_classes, conv_general_dilated=conv)
      params, batch_stats = models.init_model(model, jax.random.key(0), x.shape)
      init, step = jax_saner_step(model, args.rho, args.alpha, args.lr, args.wd)
      # Fresh copies each time: the timed step donates its state.
      fresh = lambda params=params, batch_stats=batch_stats, init=init: jax.tree.map(
        jnp.array, (params, batch_stats, *init(params))
      )
      start = time.perf_counter()
      lowered = jax.jit(step, donate_argnums=0).lower(fresh(), x, y)
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
      done = time.perf_counter()
      compile_s[name].append({"lower": lowered_at - start, "compile": done - lowered_at, "total": done - start})
      setups[name] = (model, fresh, step, compiled)
  return setups, compile_s


def _runners(setups, workers, x, y) -> dict[str, Callable[[], float]]:
  """One timed step of each contender, by name."""
  runners = {}
  for name, (_, fresh, _, compiled) in setups.items():
    box = {"state": compiled(fresh(), x, y)[0]}

    def run(compiled=compiled, box=box) -> float:
      start = time.perf_counter()
      box["state"], loss = compiled(box["state"], x, y)
      jax.block_until_ready(loss)
      return time.perf_counter() - start

    runners[name] = run
  for name, worker in workers.items():
    runners[name] = lambda worker=worker: worker("step")
  return runners


def _agreement(setups, x, y) -> tuple[int, float, dict[str, float]]:
  """The parameter count, and the two JAX models' losses and largest clean-gradient difference.

  A whole SANER step is not compared: its group mask is discontinuous, so
  last-bit differences in the two programs' reductions may flip a coordinate.
  """
  grads = {}
  for name, (model, fresh, _, _) in setups.items():
    params, batch_stats = fresh()[:2]

    def loss_fn(params, model=model, batch_stats=batch_stats):
      logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads[name] = jax.jit(jax.value_and_grad(loss_fn))(params)
  leaves = {n: jax.tree.leaves(g[1]) for n, g in grads.items()}
  n_params = sum(leaf.size for leaf in leaves["jax stock conv"])
  grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves["jax stock conv"], leaves["jax cpu_conv"]))
  return n_params, grad_diff, {n: float(g[0]) for n, g in grads.items()}


def _time_interleaved(runners, args) -> tuple[dict[str, list[float]], list[float]]:
  """Each contender's step times over rotated rounds, and the load average after each round."""
  for run in runners.values():
    for _ in range(args.warmup):
      run()
  names = list(runners)
  times = {n: [] for n in names}
  loads = []
  for round_ in range(args.steps):
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(runners[name]())
    loads.append(os.getloadavg()[0])
  return times, loads


def _report_times(times, loads, compile_s, args, say) -> tuple[dict[str, float], dict[str, float]]:
  """Prints the step-time table, the ratios and the compile times; returns the medians and ratios."""
  names = list(times)
  median = {n: statistics.median(t) for n, t in times.items()}
  torch_names = [n for n in names if n.startswith("torch")]
  reference = torch_names[0] if torch_names else "jax stock conv"
  say()
  say(
    f"SANER step, {args.steps} interleaved rounds; 1-min load average {min(loads):.1f}-{max(loads):.1f} "
    f"(median {statistics.median(loads):.1f}, this benchmark included) on {os.cpu_count()} cores"
  )
  say(f"{'contender':<34} {'median ms':>10} {'min ms':>8} {'q1-q3 ms':>15} {'x ' + reference.split(',')[0] + ')':>20}")
  for n in names:
    q1, _, q3 = statistics.quantiles(times[n], n=4) if len(times[n]) > 1 else (times[n][0],) * 3
    say(
      f"{n:<34} {1e3 * median[n]:10.1f} {1e3 * min(times[n]):8.1f} "
      f"{1e3 * q1:7.1f}-{1e3 * q3:<7.1f} {median[n] / median[reference]:20.2f}"
    )
  ratios = {"cpu_conv/stock": median["jax cpu_conv"] / median["jax stock conv"]}
  for t in torch_names:
    short = t.split(",")[0] + ")"
    ratios[f"cpu_conv/{short}"] = median["jax cpu_conv"] / median[t]
    ratios[f"stock/{short}"] = median["jax stock conv"] / median[t]
  say()
  for k, v in ratios.items():
    say(f"{k:<32} {v:.2f}")
  say()
  say("JAX compile time of the step (jit.lower + compile, s; the process's first compile in brackets):")
  for n, (first, repeat) in compile_s.items():
    say(
      f"  {n:<18} {repeat['total']:.2f}  (lower {repeat['lower']:.2f}, compile {repeat['compile']:.2f})"
      f"  [{first['total']:.2f}]"
    )
  return median, ratios


def _profiles(setups, workers, x, y, args, say) -> dict[str, Any]:
  """Per-op profiles of each JAX step and PyTorch's top operators, printed and returned."""
  profiles = {}
  for n, (_, fresh, step, _) in setups.items():
    # Not donated: the profile reruns the step on one state.
    compiled = jax.jit(step).lower(fresh(), x, y).compile()
    state = fresh()
    jax.block_until_ready(compiled(state, x, y))
    profiles[n] = xla_profile(compiled, lambda state=state: (state, x, y), steps=3, batch_size=args.batch_size)
    say()
    say(f"per-op profile, {n} (thunk ms per step, summed per category; thunks overlap on 2 threads):")
    total = sum(profiles[n]["categories_ms"].values())
    for category, ms in profiles[n]["categories_ms"].items():
      say(f"  {ms:8.1f}  {100 * ms / total:4.0f}%  {category}")
    say("  top ops:")
    for op in profiles[n]["top_ops"]:
      say(f"    {op['ms']:7.1f}  {op['op']:<32} {op['shape']:<28} {op['category']}")
  for n, worker in workers.items():
    profiles[n] = worker("profile", 3)
    say()
    say(f"per-op profile, {n}, 3 steps:")
    for line in profiles[n].splitlines():
      say("  " + line)
  return profiles


def _layers(workers, args, say) -> list[dict[str, Any]]:
  """Each distinct convolution alone, XLA's, cpu_conv's and PyTorch's, printed and returned."""
  shapes = list(conv_shapes(args.image_size, DEPTHS[args.model]).items())
  runs = jax_layer_runs(args)
  worker_name = next(iter(workers), None)
  if worker_name:
    for index in range(len(shapes)):
      for op in LAYER_OPS:
        runs[index, "torch", op] = lambda index=index, op=op: workers[worker_name]("layer", (index, op))
  order = ("xla", "cpu_conv", "torch")
  columns = sorted({k[1:] for k in runs}, key=lambda k: (order.index(k[0]), LAYER_OPS.index(k[1])))
  layer_times = {k: [] for k in runs}
  for run in runs.values():
    run()
  for _ in range(9):
    for k, run in runs.items():
      layer_times[k].append(run())
  say()
  torch_note = f" ({worker_name})" if worker_name else ""
  say(f"each 3x3 convolution alone, median ms over 9 interleaved rounds{torch_note}:")
  say(f"{'layer':<22} {'x':>3} " + " ".join(f"{f + ' ' + o:>20}" for f, o in columns))
  totals = collections.Counter()
  layers = []
  for index, ((size, c, o, stride), count) in enumerate(shapes):
    ms = {col: 1e3 * statistics.median(layer_times[(index, *col)]) for col in columns}
    totals.update({col: count * v for col, v in ms.items()})
    name = f"{c}->{o} @{size}x{size} s{stride}"
    layers.append({"layer": name, "count": count, "ms": {" ".join(col): v for col, v in ms.items()}})
    say(f"{name:<22} {count:>3} " + " ".join(f"{ms[col]:20.2f}" for col in columns))
  say(f"{'per forward-backward':<26} " + " ".join(f"{totals[col]:20.1f}" for col in columns))
  return layers


def main(argv=None) -> dict[str, Any]:
  args = _parse_args(argv)
  printed = io.StringIO()

  def say(line: str = "") -> None:
    print(line, flush=True)
    printed.write(line + "\n")

  command = shlex.join(["python", "benchmarks/jax_vs_torch.py", *(sys.argv[1:] if argv is None else argv)])
  revision = reporting.git_revision()
  # The PyTorch processes start first, before XLA's thread pool exists.
  workers = {
    f"torch ({t} thread{'s' if t > 1 else ''}, own process)": TorchProcess(t, args) for t in args.torch_threads
  }
  versions = {"jax": jax.__version__, "jaxlib": jax.lib.__version__, "optax": optax.__version__}
  versions["flax"] = importlib.metadata.version("flax")
  if workers:
    versions["torch"] = next(iter(workers.values())).version
  say(f"command: {command}")
  say(f"git: {revision}")
  say(f"{', '.join(f'{k} {v}' for k, v in versions.items())}")
  say(f"{_cpu_model()}, {os.cpu_count()} cores, JAX device {jax.devices()[0].platform}")

  x_np, y_np = batch(args)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32)
  setups, compile_s = _compile_jax(args, x, y)
  runners = _runners(setups, workers, x, y)
  n_params, grad_diff, losses = _agreement(setups, x, y)
  say(f"model {args.model}: {n_params:,} parameters; batch {args.batch_size}x{args.image_size}x{args.image_size}x3")
  say(
    f"cpu_conv against stock: loss {losses['jax cpu_conv']:.7f} vs {losses['jax stock conv']:.7f}, "
    f"max |gradient difference| {grad_diff:.1e}"
  )
  times, loads = _time_interleaved(runners, args)
  median, ratios = _report_times(times, loads, compile_s, args, say)
  profiles = _profiles(setups, workers, x, y, args, say) if args.profile else {}
  layers = _layers(workers, args, say) if args.layers else []
  for worker in workers.values():
    worker.stop()

  result = {
    "command": command,
    "git": revision,
    "versions": versions,
    "cpu": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "model": args.model,
    "parameters": int(n_params),
    "batch_size": args.batch_size,
    "image_shape": [args.image_size, args.image_size, 3],
    "hyperparameters": {"rho": args.rho, "alpha": args.alpha, "lr": args.lr, "wd": args.wd},
    "rounds": args.steps,
    "warmup_steps": args.warmup,
    "median_s": median,
    "times_s": times,
    "ratios": ratios,
    "compile_s": compile_s,
    "load_average_1min": loads,
    "agreement": {"loss": losses, "max_gradient_difference": grad_diff},
    "profiles": profiles,
    "layers_ms": layers,
  }
  if args.out:
    reporting.write_results(args.out, result, printed.getvalue())
    print(f"\nwrote {args.out}.txt and {args.out}.json")
  return result


if __name__ == "__main__":
  main()

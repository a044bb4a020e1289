"""Median train-step time of SGD, SAM, SANER and the SAM variants.

One jitted train step per method (forward + backward passes, the optax
update, BatchNorm statistics from the clean pass), timed after warm-up with
``block_until_ready``. The methods are timed interleaved: every round runs
one step of each, in a rotated order, so load from other processes falls on
all of them alike; the median over rounds is reported.

Methods:

  sgd                 value_and_grad -> wd -> SGD momentum
  sam                 sharpness_aware_grad(sam) -> wd -> SGD momentum
  saner               sam, then saner(0.5) before wd
  asam, friendly_sam, vasso, gsam    each variant, and "+saner" with it
  optax_sam_opaque    optax.contrib.sam(opaque_mode=True): the clean pass by
                      the caller, the perturbed one inside ``update``

Usage::

  python benchmarks/step_time.py                   # ResNet-20, batch 128, 32x32x3, default convolutions
  python benchmarks/step_time.py --cpu-conv false --out benchmarks/results/step_time_xla_conv.json
  python benchmarks/step_time.py --model tiny --batch-size 8 --steps 2   # smoke run

Prints a table and the ratios SANER/SAM (target <= 1.02) and SAM/SGD
(target <= 2.0), and writes JSON (with the command and the git revision) to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

import saner_jax
from saner_jax import cpu_conv
from saner_jax.train import reporting

TARGETS = {"saner/sam": 1.02, "sam/sgd": 2.0}
VARIANTS = ("asam", "friendly_sam", "vasso", "gsam")
METHODS = (
  "sgd",
  "sam",
  "saner",
  *[name for v in VARIANTS for name in (v, f"{v}+saner")],
  "optax_sam_opaque",
)


class TinyNet(nn.Module):
  """A small conv net with BatchNorm, for smoke runs."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def make_model(name: str, num_classes: int, conv=None) -> nn.Module:
  if name == "tiny":
    return TinyNet(num_classes)
  from saner_jax.train import models

  return models.create_model(name, num_classes, conv_general_dilated=conv)


def _perturbation(method: str, rho: float):
  base = method.split("+")[0]
  if base == "asam":
    return saner_jax.asam(rho * 10)  # ASAM radii are ~10x SAM's
  if base == "friendly_sam":
    return saner_jax.friendly_sam(rho)
  if base == "vasso":
    return saner_jax.vasso(rho)
  return saner_jax.sam(rho)  # sam, saner, gsam


def _base_optimizer(lr: float, wd: float) -> list:
  return [optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)]


def build_step(method: str, model: nn.Module, args) -> tuple[Callable, Callable]:
  """Returns ``(init(params) -> opt states, step(carry, x, y) -> (carry, loss))``."""

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]

  if method == "sgd":
    tx = optax.chain(*_base_optimizer(args.lr, args.wd))

    def step(carry, x, y):
      params, batch_stats, opt_state, p_state = carry
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, (x, y))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats, opt_state, p_state), loss

    return (lambda p: (tx.init(p), ())), step

  if method == "optax_sam_opaque":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(args.rho))
    tx = optax.contrib.sam(optax.chain(*_base_optimizer(args.lr, args.wd)), adversary, sync_period=2, opaque_mode=True)

    def step(carry, x, y):
      params, batch_stats, opt_state, p_state = carry
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, (x, y))
      # The perturbed pass runs inside update; its BatchNorm statistics are dropped.
      grad_fn = lambda p, _: jax.grad(lambda q: loss_fn(q, batch_stats, (x, y))[0])(p)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
      return (optax.apply_updates(params, updates), batch_stats, opt_state, p_state), loss

    return (lambda p: (tx.init(p), ())), step

  perturbation = _perturbation(method, args.rho)
  parts = []
  if method.startswith("gsam"):
    parts.append(saner_jax.gsam(args.gsam_alpha))
  if method == "saner" or method.endswith("+saner"):
    parts.append(saner_jax.saner(args.alpha))
  tx = optax.chain(*parts, *_base_optimizer(args.lr, args.wd))
  two_pass = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)

  def step(carry, x, y):
    params, batch_stats, opt_state, p_state = carry
    out = two_pass(params, p_state, batch_stats, (x, y))
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    carry = (optax.apply_updates(params, updates), out.aux, opt_state, out.perturbation_state)
    return carry, out.loss

  return (lambda p: (tx.init(p), perturbation.init(p))), step


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20", help="a saner_jax.train.models name, or 'tiny'")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method (the first compiles)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--gsam-alpha", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--wd", type=float, default=5e-4)
  parser.add_argument(
    "--cpu-conv",
    default="auto",
    choices=cpu_conv.MODES,
    help="oneDNN's convolutions (saner_jax.cpu_conv.choose; default auto, as the trainer); false: XLA's",
  )
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "step_time.json"))
  args = parser.parse_args(argv)
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")

  command = (
    shlex.join([os.path.basename(sys.executable), *sys.argv])
    if argv is None
    else shlex.join(["python", "benchmarks/step_time.py", *argv])
  )
  revision = reporting.git_revision()
  device = jax.devices()[0]
  print(f"command: {command}")
  print(f"git: {revision}")
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, device {device.platform} "
    f"({device.device_kind}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
  )

  convolutions = cpu_conv.choose(args.cpu_conv)
  print(f"convolutions: {convolutions.reason}")
  model = make_model(args.model, args.num_classes, convolutions.conv)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, args.num_classes, size=args.batch_size), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:2], train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"model {args.model}: {n_params:,} parameters; batch {args.batch_size}x{args.image_size}x{args.image_size}x3")

  steps, carries, compile_s = {}, {}, {}
  for method in args.methods:
    init, step = build_step(method, model, args)
    steps[method] = jax.jit(step)
    opt_state, p_state = init(params)
    carry = (params, batch_stats, opt_state, p_state)
    start = time.perf_counter()
    for _ in range(args.warmup):
      carry, loss = steps[method](carry, x, y)
      jax.block_until_ready((carry, loss))
      if not np.isfinite(float(loss)):
        raise RuntimeError(f"{method}: non-finite loss {float(loss)}")
    compile_s[method] = time.perf_counter() - start
    carries[method] = carry
    print(f"  warmed up {method:<20} ({compile_s[method]:.1f} s incl. compile)", flush=True)

  times: dict[str, list[float]] = {m: [] for m in args.methods}
  for round_ in range(args.steps):
    shift = round_ % len(args.methods)
    for method in args.methods[shift:] + args.methods[:shift]:
      start = time.perf_counter()
      carries[method], loss = steps[method](carries[method], x, y)
      jax.block_until_ready((carries[method], loss))
      times[method].append(time.perf_counter() - start)

  median = {m: statistics.median(t) for m, t in times.items()}
  print()
  print(f"{'method':<20} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'x SGD':>7}")
  for m in args.methods:
    vs_sgd = f"{median[m] / median['sgd']:7.3f}" if "sgd" in median else "      -"
    print(f"{m:<20} {1e3 * median[m]:10.1f} {1e3 * min(times[m]):9.1f} {1e3 * max(times[m]):9.1f} {vs_sgd}")

  ratios = {}
  pairs = [("saner/sam", "saner", "sam"), ("sam/sgd", "sam", "sgd")]
  pairs += [(f"{v}+saner/{v}", f"{v}+saner", v) for v in VARIANTS]
  pairs += [("sam/optax_sam_opaque", "sam", "optax_sam_opaque")]
  print()
  for name, num, den in pairs:
    if num in median and den in median:
      ratios[name] = median[num] / median[den]
      target = (
        f"  (target <= {TARGETS[name]}: {'ok' if ratios[name] <= TARGETS[name] else 'MISSED'})"
        if name in TARGETS
        else ""
      )
      print(f"{name:<24} {ratios[name]:.3f}{target}")

  result = {
    "command": command,
    "git": revision,
    "jax": jax.__version__,
    "optax": optax.__version__,
    "device": f"{device.platform} ({device.device_kind})",
    "cpu_count": os.cpu_count(),
    "model": args.model,
    "convolutions": convolutions.path,
    "parameters": int(n_params),
    "batch_size": args.batch_size,
    "image_shape": [args.image_size, args.image_size, 3],
    "timed_steps": args.steps,
    "warmup_steps": args.warmup,
    "hyperparameters": {
      "rho": args.rho,
      "alpha": args.alpha,
      "gsam_alpha": args.gsam_alpha,
      "lr": args.lr,
      "wd": args.wd,
    },
    "median_s": median,
    "times_s": times,
    "warmup_s": compile_s,
    "ratios": ratios,
    "targets": TARGETS,
  }
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  main()

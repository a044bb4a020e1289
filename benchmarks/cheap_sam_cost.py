"""Step time and compiled flops of SGD, SAM, SANER and SANER with cheap policies.

One jitted train step per method (benchmarks/step_time.py's steps: ResNet-20,
batch 128, weight decay and SGD momentum after the reweighting), all timed
in ONE interleaved run: every round runs one step of each method in a
rotated order, so load from other processes falls on all alike. Medians and
means over rounds and their ratios to SGD are reported, with the share of
two-pass steps each policy took; a policy's times mix one- and two-pass
steps, so its mean is its cost per step.

Flops come from XLA's cost analysis of the compiled step. For a policy the
step holds a conditional, and the analysis reports its dearer branch; the
cheap branch is measured by compiling the step with the policy's choice
fixed to a constant (XLA then folds the conditional away). ``conditional``
tells whether the compiled runtime step kept it.

Usage::

  python benchmarks/cheap_sam_cost.py                  # ResNet-20, batch 128
  python benchmarks/cheap_sam_cost.py --model tiny --batch-size 8 --steps 2 --out ''   # smoke run

Writes ``--out``.json and .txt (the printed report, with the command and the
git revision).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_time  # the same steps as the step-time benchmark

import saner_jax
from saner_jax import cpu_conv
from saner_jax.train import reporting

# name: (policy factory or None for every step, SANER's mask reuse)
POLICIES = {
  "saner@every2": (lambda: saner_jax.every_k_steps(2), False),
  "saner@every4": (lambda: saner_jax.every_k_steps(4), False),
  "saner@every4-reuse": (lambda: saner_jax.every_k_steps(4), True),
  "saner@p0.5": (lambda: saner_jax.random_steps(0.5, 0), False),
  "saner@p0.25": (lambda: saner_jax.random_steps(0.25, 0), False),
  "saner@ae0": (lambda: saner_jax.adaptive_steps(0.0), False),
  "saner@ae1": (lambda: saner_jax.adaptive_steps(1.0), False),
}
METHODS = ("sgd", "sam", "saner", *POLICIES)


def build(method: str, model, args):
  """``(init(params) -> (opt_state, p_state), step(carry, x, y) -> (carry, loss, took))``."""
  if method in ("sgd", "sam", "saner"):
    init, step = step_time.build_step(method, model, args)
    two_pass = method != "sgd"
    return init, lambda carry, x, y: (*step(carry, x, y), jnp.asarray(two_pass))
  make_policy, reuse = POLICIES[method]
  perturbation = saner_jax.with_policy(saner_jax.sam(args.rho), make_policy())
  tx = optax.chain(
    saner_jax.saner(args.alpha, reuse_mask=reuse), optax.add_decayed_weights(args.wd), optax.sgd(args.lr, momentum=0.9)
  )

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, perturbation, has_aux=True, batch_argnum=2)

  def step(carry, x, y):
    params, batch_stats, opt_state, p_state = carry
    out = grad_fn(params, p_state, batch_stats, (x, y))
    updates, opt_state = tx.update(
      out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads, sharpness_aware=out.sharpness_aware
    )
    carry = (optax.apply_updates(params, updates), out.aux, opt_state, out.perturbation_state)
    return carry, out.loss, out.sharpness_aware

  return (lambda p: (tx.init(p), perturbation.init(p))), step


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis.get("flops", float("nan")))


def fixed_choice_flops(step, carry, x, y, take: bool) -> float:
  """Flops of an every-k ``step`` with its policy state a constant whose choice is ``take``: XLA folds the cond."""
  params, batch_stats, opt_state, p_state = carry
  constant = p_state._replace(policy=saner_jax.policies.CountState(jnp.int32(0 if take else 1)))
  return flops_of(
    jax.jit(lambda p, s, o: step((p, s, o, constant), x, y)).lower(params, batch_stats, opt_state).compile()
  )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20", help="a saner_jax.train.models name, or 'tiny'")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=16, help="timed rounds (one step of every method each)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--gsam-alpha", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--wd", type=float, default=5e-4)
  parser.add_argument("--cpu-conv", default="auto", choices=cpu_conv.MODES)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cheap_sam_cost"))
  args = parser.parse_args(argv)
  if "sgd" not in args.methods:
    parser.error("--methods must include sgd, the reference of the ratios")
  command = shlex.join(["python", "benchmarks/cheap_sam_cost.py", *(sys.argv[1:] if argv is None else argv)])

  printed = io.StringIO()
  with redirect_stdout(printed):
    device = jax.devices()[0]
    print(f"command: {command}")
    print(f"git: {reporting.git_revision()}")
    print(
      f"jax {jax.__version__}, optax {optax.__version__}, device {device.platform} ({device.device_kind}), "
      f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    convolutions = cpu_conv.choose(args.cpu_conv)
    print(f"convolutions: {convolutions.reason}")
    model = step_time.make_model(args.model, args.num_classes, convolutions.conv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, args.num_classes, size=args.batch_size), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x[:2], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    print(f"model {args.model}: batch {args.batch_size}x{args.image_size}x{args.image_size}x3, rho {args.rho}")

    steps, carries, flops, cheap_flops, conditional = {}, {}, {}, {}, {}
    for method in args.methods:
      init, step = build(method, model, args)
      opt_state, p_state = init(params)
      carry = (params, batch_stats, opt_state, p_state)
      compiled = jax.jit(step).lower(carry, x, y).compile()
      steps[method], flops[method] = compiled, flops_of(compiled)
      conditional[method] = "conditional" in compiled.as_text()
      if method in POLICIES and isinstance(p_state.policy, saner_jax.policies.CountState):
        cheap_flops[method] = fixed_choice_flops(step, carry, x, y, take=False)
      for _ in range(args.warmup):
        carry, loss, _ = steps[method](carry, x, y)
        jax.block_until_ready(carry)
      carries[method] = carry
    # The cheap branch of every policy is the same one-pass step: one measurement stands for all.
    one_pass = next(iter(cheap_flops.values()), float("nan"))

    times: dict[str, list[float]] = {m: [] for m in args.methods}
    taken: dict[str, int] = dict.fromkeys(args.methods, 0)
    for round_ in range(args.steps):
      shift = round_ % len(args.methods)
      for method in args.methods[shift:] + args.methods[:shift]:
        start = time.perf_counter()
        carries[method], loss, took = steps[method](carries[method], x, y)
        jax.block_until_ready((carries[method], loss, took))
        times[method].append(time.perf_counter() - start)
        taken[method] += int(took)

    median = {m: statistics.median(t) for m, t in times.items()}
    # A policy's step times are two-modal (one pass or two): its mean is its cost per step.
    mean = {m: statistics.fmean(t) for m, t in times.items()}
    share = {m: taken[m] / args.steps for m in args.methods}
    print()
    print(
      f"{'method':<20} {'median ms':>10} {'x SGD':>7} {'mean ms':>8} {'x SGD':>7} {'2-pass %':>9} {'GFLOP':>8} "
      f"{'x SGD':>6} {'cond':>5}"
    )
    for m in args.methods:
      print(
        f"{m:<20} {1e3 * median[m]:10.1f} {median[m] / median['sgd']:7.3f} {1e3 * mean[m]:8.1f} "
        f"{mean[m] / mean['sgd']:7.3f} {100 * share[m]:9.1f} "
        f"{flops[m] / 1e9:8.2f} {flops[m] / flops['sgd']:6.2f} {'yes' if conditional[m] else 'no':>5}"
      )
    print()
    print(
      f"policy steps' flops as compiled: the dearer branch (SAM's). With the choice a constant, a one-pass step "
      f"takes {one_pass / 1e9:.2f} GFLOP ({one_pass / flops['sgd']:.2f}x SGD's), a two-pass one "
      f"{flops.get('saner', float('nan')) / 1e9:.2f}."
    )
  text = printed.getvalue()
  print(text, end="")
  record = {
    "command": command,
    "git": reporting.git_revision(),
    "jax": jax.__version__,
    "device": f"{device.platform} ({device.device_kind})",
    "model": args.model,
    "batch_size": args.batch_size,
    "convolutions": convolutions.path,
    "timed_rounds": args.steps,
    "median_s": median,
    "mean_s": mean,
    "median_ratio_to_sgd": {m: median[m] / median["sgd"] for m in args.methods},
    "mean_ratio_to_sgd": {m: mean[m] / mean["sgd"] for m in args.methods},
    "two_pass_share": share,
    "flops": flops,
    "one_pass_flops_with_constant_choice": one_pass,
    "conditional_kept": conditional,
    "times_s": times,
  }
  if args.out:
    reporting.write_results(args.out, record, text)
  return record


if __name__ == "__main__":
  main()

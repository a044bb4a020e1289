"""SANER in an optax chain: a linear classifier on a dict of arrays."""

import jax
import jax.numpy as jnp
import optax

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(rho=0.1, alpha=0.5, warmup_steps=0, lr=0.1, weight_decay=5e-4):
  """Returns the perturbation, the optimizer and a jitted train step."""
  perturbation = saner_jax.sam(rho)
  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, perturbation)
  tx = optax.chain(
    saner_jax.saner(saner_jax.alpha_warmup(alpha, warmup_steps)),
    optax.add_decayed_weights(weight_decay),  # after the reweighting, as the authors do
    optax.sgd(lr, momentum=0.9),
  )

  @jax.jit
  def train_step(params, opt_state, sam_state, batch):
    out = grad_fn(params, sam_state, batch)
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    stats = saner_jax.diagnostics.gradient_diagnostics(out.perturbed_grads, out.clean_grads)
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss, stats

  return perturbation, tx, train_step


def synthetic_batch(key, batch_size=64, features=8, classes=3):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (batch_size, features))
  y = jnp.argmax(x @ jax.random.normal(kw, (features, classes)), axis=-1)
  return x, y


def main(steps=20):
  params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
  perturbation, tx, train_step = make_train_step(warmup_steps=10)
  opt_state, sam_state = tx.init(params), perturbation.init(params)
  batch = synthetic_batch(jax.random.key(0))
  losses = []
  for _ in range(steps):
    params, opt_state, sam_state, loss, stats = train_step(params, opt_state, sam_state, batch)
    losses.append(float(loss))
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, group B {float(stats['group_B']):.2f}")
  return params, losses


if __name__ == "__main__":
  main()

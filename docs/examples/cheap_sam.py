"""SANER at close to SGD's cost: the second pass every k steps, the last mask reused between."""

import jax
import jax.numpy as jnp
import optax

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  logits = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(k=2, rho=0.1, alpha=0.5, lr=0.1, momentum=0.9, reuse_mask=True):
  """Returns the perturbation (with its policy), the optimizer and a jitted train step."""
  # Also: saner_jax.random_steps(p, key) (RST) or saner_jax.adaptive_steps(c) (AE-SAM).
  perturbation = saner_jax.with_policy(saner_jax.sam(rho), saner_jax.every_k_steps(k))
  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, perturbation)
  tx = optax.chain(saner_jax.saner(alpha, reuse_mask=reuse_mask), optax.sgd(lr, momentum=momentum))

  @jax.jit
  def train_step(params, opt_state, p_state, batch):
    out = grad_fn(params, p_state, batch)  # one pass on the steps the policy skips
    updates, opt_state = tx.update(
      out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads, sharpness_aware=out.sharpness_aware
    )
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.sharpness_aware

  return perturbation, tx, train_step


def synthetic_batch(key, batch_size=64, features=8, hidden=16, classes=3):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (batch_size, features))
  y = jnp.argmax(x @ jax.random.normal(kw, (features, classes)), axis=-1)
  return x, y


def init_params(key, features=8, hidden=16, classes=3):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (features, hidden)) / 3, "w2": jax.random.normal(k2, (hidden, classes)) / 4}


def main(steps=8):
  params = init_params(jax.random.key(1))
  perturbation, tx, train_step = make_train_step(k=4)
  opt_state, p_state = tx.init(params), perturbation.init(params)
  batch = synthetic_batch(jax.random.key(0))
  taken = []
  for _ in range(steps):
    params, opt_state, p_state, took = train_step(params, opt_state, p_state, batch)
    taken.append(int(took))
  print(f"two-pass steps: {taken}, loss {float(loss_fn(params, batch)):.3f}")
  return taken


if __name__ == "__main__":
  main()

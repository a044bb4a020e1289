"""Gradient accumulation: a large batch with the memory of a small one."""

import jax
import jax.numpy as jnp
import optax

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


sam = saner_jax.sam(rho=0.1)
# Both passes run over 4 micro-batches of batch_size / 4 examples, one at a
# time; the perturbation is formed once, from the accumulated clean gradient.
grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam, accumulation_steps=4)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1, momentum=0.9))


@jax.jit
def train_step(params, opt_state, sam_state, batch):
  out = grad_fn(params, sam_state, batch)
  updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
  return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss


def main(steps=10):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (256, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
  opt_state, sam_state = tx.init(params), sam.init(params)
  for _ in range(steps):
    params, opt_state, sam_state, loss = train_step(params, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return params


if __name__ == "__main__":
  main()

"""Computing in bfloat16 with float32 parameters."""

import jax
import jax.numpy as jnp
import optax

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  # The forward pass runs in bf16; the params stay float32, so their
  # gradients come back float32 (the transpose of the cast).
  p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  logits = jax.nn.relu(x.astype(jnp.bfloat16) @ p["w1"]) @ p["w2"]
  # The loss itself in float32: a bf16 softmax loses digits.
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


sam = saner_jax.sam(rho=0.1)  # the norm is taken in float32 whatever the gradients' dtype
grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1, momentum=0.9))


@jax.jit
def train_step(params, opt_state, sam_state, batch):
  out = grad_fn(params, sam_state, batch)
  updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
  return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (8, 32)) / 8**0.5, "w2": jax.random.normal(k2, (32, 3)) / 32**0.5}


def main(steps=10):
  kx, kw, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (64, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  params = init_params(kp)
  opt_state, sam_state = tx.init(params), sam.init(params)
  for _ in range(steps):
    params, opt_state, sam_state, loss = train_step(params, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}, params {params['w1'].dtype}")
  return params


if __name__ == "__main__":
  main()

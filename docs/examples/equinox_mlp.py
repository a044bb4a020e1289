"""SANER with an Equinox model."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import saner_jax

sam = saner_jax.sam(rho=0.1)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1))


def loss_fn(params, static, batch):
  model = eqx.combine(params, static)
  x, y = batch
  logits = jax.vmap(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def train_step(model, opt_state, sam_state, batch):
  # The arrays are the params; the rest of the model (activations, shapes) is static.
  params, static = eqx.partition(model, eqx.is_inexact_array)
  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam, batch_argnum=2)
  out = grad_fn(params, sam_state, static, batch)
  updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
  return eqx.apply_updates(model, updates), opt_state, out.perturbation_state, out.loss


def main(steps=10):
  kx, kw, kinit = jax.random.split(jax.random.key(0), 3)
  model = eqx.nn.MLP(in_size=8, out_size=3, width_size=16, depth=1, key=kinit)
  params = eqx.filter(model, eqx.is_inexact_array)
  opt_state, sam_state = tx.init(params), sam.init(params)
  x = jax.random.normal(kx, (32, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  for _ in range(steps):
    model, opt_state, sam_state, loss = train_step(model, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return model


if __name__ == "__main__":
  main()

"""SANER on a subset of the parameters (the classifier head), SAM elsewhere."""

import jax
import jax.numpy as jnp
import optax

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  hidden = jax.nn.relu(x @ params["body"]["w"])
  return optax.softmax_cross_entropy_with_integer_labels(hidden @ params["head"]["w"], y).mean()


sam = saner_jax.sam(rho=0.1)
grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam)

# optax.masked: SANER reweights the head's group B; the body gets g_sam as it is.
head_only = {"body": False, "head": True}  # a prefix of the params' tree
masked_tx = optax.chain(
  optax.masked(saner_jax.saner(alpha=0.5), head_only),
  optax.sgd(0.1, momentum=0.9),
)

# optax.multi_transform: a different alpha per part (labels by prefix too).
labels = {"body": "body", "head": "head"}
multi_tx = optax.chain(
  optax.multi_transform({"body": saner_jax.saner(alpha=0.9), "head": saner_jax.saner(alpha=0.5)}, labels),
  optax.sgd(0.1, momentum=0.9),
)


def make_train_step(tx):
  @jax.jit
  def train_step(params, opt_state, sam_state, batch):
    out = grad_fn(params, sam_state, batch)
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss

  return train_step


def main(tx=masked_tx, steps=10):
  kx, kw, k1, k2 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (64, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  params = {
    "body": {"w": jax.random.normal(k1, (8, 16)) / 8**0.5},
    "head": {"w": jax.random.normal(k2, (16, 3)) / 4},
  }
  train_step = make_train_step(tx)
  opt_state, sam_state = tx.init(params), sam.init(params)
  for _ in range(steps):
    params, opt_state, sam_state, loss = train_step(params, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return params


if __name__ == "__main__":
  main()
  main(multi_tx)

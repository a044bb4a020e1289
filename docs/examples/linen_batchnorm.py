"""SANER with a Flax linen model that has BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import saner_jax


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(nn.relu(x))


model = Net()


def loss_fn(params, batch_stats, batch):
  x, y = batch
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


sam = saner_jax.sam(rho=0.1)
# The statistics go in as an argument and come out as aux: only the clean
# pass's are returned. batch_argnum says which argument is the batch.
grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam, has_aux=True, batch_argnum=2)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1))


@jax.jit
def train_step(params, batch_stats, opt_state, sam_state, batch):
  out = grad_fn(params, sam_state, batch_stats, batch)
  updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
  return optax.apply_updates(params, updates), out.aux, opt_state, out.perturbation_state, out.loss


def main(steps=10):
  kx, kw, kinit = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (32, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  variables = model.init(kinit, x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state, sam_state = tx.init(params), sam.init(params)
  for _ in range(steps):
    params, batch_stats, opt_state, sam_state, loss = train_step(params, batch_stats, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return params, batch_stats


if __name__ == "__main__":
  main()

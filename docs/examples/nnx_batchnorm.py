"""SANER with a Flax NNX model that has BatchNorm, under nnx.jit with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import saner_jax


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.norm(self.hidden(x))))


@nnx.jit
def train_step(model, optimizer, sam_state, batch):
  # The two passes need the loss as a pure function of the params: split the
  # model into its params and the rest (the BatchNorm statistics) ...
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, batch):
    # ... and rebuild a model from them inside the loss. copy=True gives it
    # Variables of its own, created inside jax.grad's trace; without it the
    # model would share those of `rest`, and BatchNorm's write to them from
    # inside the trace raises flax.errors.TraceContextError.
    net = nnx.merge(graphdef, params, rest, copy=True)
    x, y = batch
    loss = optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
    return loss, nnx.state(net, nnx.Not(nnx.Param))  # the updated statistics

  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam, has_aux=True, batch_argnum=2)
  out = grad_fn(params, sam_state, rest, batch)
  nnx.update(model, out.aux)  # the clean pass's statistics only
  optimizer.update(model, out.perturbed_grads, clean_grads=out.clean_grads)
  return out.loss, out.perturbation_state


sam = saner_jax.sam(rho=0.1)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1))


def main(steps=10):
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  sam_state = sam.init(nnx.state(model, nnx.Param))
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (32, 8))
  batch = (x, jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  for _ in range(steps):
    loss, sam_state = train_step(model, optimizer, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return model


if __name__ == "__main__":
  main()

"""oneDNN's convolutions in a Flax model on the CPU (needs g++ and libdnnl-dev)."""

import functools

import flax.linen as nn
import jax
import optax

import saner_jax
from saner_jax import cpu_conv


class SmallCnn(nn.Module):
  conv_general_dilated: object = jax.lax.conv_general_dilated  # the stock op by default

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, conv_general_dilated=self.conv_general_dilated)
    x = nn.relu(conv(8, (3, 3))(x))
    x = nn.relu(conv(16, (3, 3), strides=(2, 2))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


# On a CPU the convolutions and both their gradients run on oneDNN; lowered
# for a GPU or TPU, the same model uses XLA's own op.
model = SmallCnn(conv_general_dilated=cpu_conv.conv_general_dilated)
sam = saner_jax.sam(rho=0.1)
tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1))


def loss_fn(params, batch, net=model):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": params}, x), y).mean()


grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam)


@jax.jit
def train_step(params, opt_state, sam_state, batch):
  out = grad_fn(params, sam_state, batch)
  updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
  return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss


def synthetic_batch(key, batch_size=16):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (batch_size, 16, 16, 3)), jax.random.randint(ky, (batch_size,), 0, 10)


def main(steps=3):
  batch = synthetic_batch(jax.random.key(0))
  params = model.init(jax.random.key(1), batch[0])["params"]
  opt_state, sam_state = tx.init(params), sam.init(params)
  for _ in range(steps):
    params, opt_state, sam_state, loss = train_step(params, opt_state, sam_state, batch)
  print(f"loss {float(loss):.3f}")
  return params


if __name__ == "__main__":
  main()

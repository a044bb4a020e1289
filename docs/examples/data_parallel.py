"""SANER over every device of every host, with the batch split over a mesh.

One host:  python docs/examples/data_parallel.py [synced|per_device]
Several:   python docs/examples/data_parallel.py [synced|per_device] --distributed
           in one process per host. On SLURM, Open MPI, Cloud TPU or
           Kubernetes, jax.distributed.initialize() finds its settings
           itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of
           process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import saner_jax


def loss_fn(params, batch):
  x, y = batch
  logits = jax.nn.relu(x @ params["w1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(mode="synced", steps=5, global_batch=64):
  mesh = saner_jax.data_mesh()  # every device of every process, axis "data"
  sam = saner_jax.sam(rho=0.1)
  grad_fn = saner_jax.sharpness_aware_grad(loss_fn, sam, mesh=mesh, mode=mode)
  tx = optax.chain(saner_jax.saner(alpha=0.5), optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(params, opt_state, sam_state, batch):
    out = grad_fn(params, sam_state, batch)
    updates, opt_state = tx.update(out.perturbed_grads, opt_state, params, clean_grads=out.clean_grads)
    return optax.apply_updates(params, updates), opt_state, out.perturbation_state, out.loss

  # Params and optimizer states are replicated; every process builds the same ones.
  k1, k2, kx, kw = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k1, (8, 16)) / 8**0.5, "w2": jax.random.normal(k2, (16, 3)) / 4}
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  sam_state = jax.device_put(sam.init(params), replicated)

  # Each process loads only its own rows of the global batch (here: slices
  # of one synthetic batch) and JAX assembles the global array.
  x = np.asarray(jax.random.normal(kx, (global_batch, 8)))
  y = np.asarray(jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1))
  rows = global_batch // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  split = NamedSharding(mesh, P("data"))
  batch = tuple(jax.make_array_from_process_local_data(split, a[mine]) for a in (x, y))

  for _ in range(steps):
    params, opt_state, sam_state, _ = train_step(params, opt_state, sam_state, batch)
  return {k: np.asarray(v.addressable_data(0)).tolist() for k, v in params.items()}


def initialize_distributed():
  """Joins the other processes; must run before anything touches a device."""
  settings = {name: os.environ.get(f"JAX_{name.upper()}") for name in ("num_processes", "process_id")}
  jax.distributed.initialize(**{name: int(value) for name, value in settings.items() if value is not None})


if __name__ == "__main__":
  if "--distributed" in sys.argv:
    initialize_distributed()
  mode = "per_device" if "per_device" in sys.argv else "synced"
  params = main(mode)
  if jax.process_index() == 0:
    print(json.dumps({"devices": jax.device_count(), "params": params}))

"""Does the streaming loader keep up? Decode images/s per core against the images/s a training step consumes.

On synthetic JPEGs (ImageNet's typical 500x375, quality 90) it measures:

- decode: one core opening, decoding, random-resized-cropping and flipping
  images to ``--size`` px (the streaming pipeline's own per-image function),
  in images/s;
- grain: the whole streaming pipeline (``saner_jax.train.streaming``, Grain
  with ``--workers`` processes) delivering batches of ``--batch``;
- step: the images/s of the jitted training step of ``--model`` at
  ``--step_size`` px with ``--optimizer`` (batch ``--batch``), on this
  machine's default JAX device.

The loader keeps up when decode x (cores given to decoding) >= step. Usage::

  python benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: pathlib.Path, n: int, size=(500, 375)) -> list[str]:
  from PIL import Image

  rng = np.random.default_rng(0)
  paths = []
  # Smooth images compress like photographs; uniform noise would not.
  base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
  for i in range(n):
    small = np.roll(base, i, axis=1)
    image = Image.fromarray(small).resize(size, Image.BILINEAR)
    path = folder / f"{i:05d}.jpg"
    image.save(path, quality=90)
    paths.append(str(path))
  return paths


def decode_rate(paths: list[str], size: int, repeats: int) -> float:
  from saner_jax.train import streaming

  source = streaming.ImageSource(paths=paths, size=size, random_resized_crop=True)
  start = time.perf_counter()
  for r in range(repeats):
    for i in range(len(paths)):
      source.get(i, np.random.default_rng([r, i]))
  return repeats * len(paths) / (time.perf_counter() - start)


def grain_rate(paths: list[str], size: int, batch: int, workers: int, epochs: int) -> float:
  from saner_jax.train import streaming
  from saner_jax.train.config import TrainConfig

  n = len(paths)
  split = streaming.StreamSplit(
    streaming.ImageSource(paths=paths, size=size, random_resized_crop=True),
    np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool),
  )  # fmt: skip
  config = TrainConfig(batch_size=batch, epochs=epochs, stream_workers=workers)
  spe = n // batch
  iterator = streaming.train_iterator(config, split, spe, process_index=0, process_count=1)
  next(iterator)  # the workers start
  start = time.perf_counter()
  count = 0
  for host in iterator:
    count += len(host["labels"])
  return count / (time.perf_counter() - start)


def step_rate(model: str, size: int, batch: int, optimizer: str, steps: int) -> float:
  import jax

  from saner_jax.train import device_input
  from saner_jax.train import step as step_lib
  from saner_jax.train.config import TrainConfig
  from saner_jax.train.data import DATASETS
  from saner_jax.train.models import create_model

  config = TrainConfig(model=model, optimizer=optimizer, batch_size=batch, dataset="tiny_imagenet", epochs=1)
  spec = DATASETS["tiny_imagenet"]
  net = create_model(model, 200)
  opt = step_lib.build_optimizer(config, 100)
  state = step_lib.init_state(net, opt, jax.random.key(0), (size, size, 3))
  update = jax.jit(step_lib.make_update(net, opt, config), donate_argnums=0)
  rng = np.random.default_rng(0)
  images = device_input.normalize(jax.device_put(rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)),
                              spec.mean, spec.std)  # fmt: skip
  labels = jax.device_put(rng.integers(0, 200, batch).astype(np.int32))
  state, loss, *_ = update(state, images, labels)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    state, loss, *_ = update(state, images, labels)
  loss.block_until_ready()
  return steps * batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--size", type=int, default=224, help="decoded side (random-resized crop)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--step_size", type=int, default=64)
  parser.add_argument("--optimizer", default="saner")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
  args = parser.parse_args()

  import jax

  with tempfile.TemporaryDirectory() as tmp:
    paths = make_jpegs(pathlib.Path(tmp), args.images)
    decode = decode_rate(paths, args.size, repeats=2)
    streamed = grain_rate(paths, args.size, args.batch, args.workers, epochs=3)
  step = step_rate(args.model, args.step_size, args.batch, args.optimizer, args.steps)
  cores = os.cpu_count() or 1
  record = {
    "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
    "cpu_count": cores,
    "jax_backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "decode_images_per_s_per_core": decode,
    "grain_images_per_s": streamed,
    "grain_workers": args.workers,
    "step_images_per_s": step,
    "cores_needed": step / decode,
    **{k: getattr(args, k) for k in ("images", "size", "batch", "model", "step_size", "optimizer")},
  }
  text = (
    f"{record['command']}\n"
    f"synthetic 500x375 JPEGs -> random-resized crop {args.size} px + flip, {cores} CPU cores, JAX on "
    f"{record['device']}\n"
    f"decode, one core:                {decode:8.1f} images/s\n"
    f"Grain pipeline, {args.workers} workers:      {streamed:8.1f} images/s\n"
    f"train step ({args.model}, {args.step_size} px, {args.optimizer}, batch {args.batch}): {step:8.1f} images/s\n"
    f"cores of decoding one step needs: {step / decode:.2f}\n"
  )
  print(text, end="")
  if args.out:
    pathlib.Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
    pathlib.Path(args.out + ".txt").write_text(text)


if __name__ == "__main__":
  main()

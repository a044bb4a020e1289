"""Data parallelism: saner_jax.parallel and the trainer on 1 and 8 devices.

The 8-device checks live in ``tests/_parallel_checks.py`` and each runs in
its own subprocess, where ``--xla_force_host_platform_device_count=8`` is set
before jax starts; this process, and the rest of the suite, keep one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import SMOKE_MODEL, read_metrics, write_idx

from saner_jax.train import cli, loop
from saner_jax.train.config import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "_parallel_checks.py"
TINY = dict(
  model=SMOKE_MODEL,
  epochs=1,
  batch_size=32,
  train_examples=64,
  test_examples=64,
  eval_batch_size=32,
  alpha_warmup_epochs=1,
  progress="none",
  checkpoint=False,
)
TIMEOUT_S = 600


def _data(directory: pathlib.Path) -> dict[str, str]:
  """Config values that read the IDX files in ``directory`` and nothing else.

  data_dir, not $SANER_JAX_FASHION_MNIST_DIR: it travels with the config
  into every subprocess and flag list, and with data_source "auto" a
  prepared ~/tensorflow_datasets/fashion_mnist would win over the variable.
  data_source "idx" also spares every process TFDS's import.
  """
  return {"data_dir": str(directory), "data_source": "idx"}


@dataclasses.dataclass
class Child:
  name: str
  proc: subprocess.Popen
  log: pathlib.Path

  def output(self) -> str:
    return self.log.read_text()


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., Child]]:
  """Starts subprocesses and kills those still running when the test ends.

  pytest runs the code after ``yield`` however the test ends (failed
  assertion, exception, timeout in ``_finish``), so no child outlives it.
  Output goes to a file: a pipe that nobody reads while the test waits on
  another child, or trains in this process, fills up and stalls the child.
  """
  children: list[Child] = []

  def start(name: str, args: list[str], **env: str) -> Child:
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
      proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env},
        stdout=out,
        stderr=subprocess.STDOUT,
      )
    children.append(Child(name, proc, log))
    return children[-1]

  yield start
  for child in children:
    if child.proc.poll() is None:
      child.proc.kill()
      child.proc.wait()


def _finish(*children: Child) -> None:
  """Waits until every child has exited 0; fails as soon as one exits otherwise.

  The children are polled together, not waited on in turn: when one of the
  two distributed processes dies, the other blocks on it until the timeout.
  """
  deadline = time.monotonic() + TIMEOUT_S
  while True:
    codes = [child.proc.poll() for child in children]
    for child, code in zip(children, codes):
      if code:
        pytest.fail(f"{child.name} exited {code}:\n{child.output()}")
    if all(code == 0 for code in codes):
      return
    if time.monotonic() > deadline:
      running = [child for child, code in zip(children, codes) if code is None]
      pytest.fail(
        f"still running after {TIMEOUT_S} s:\n" + "\n".join(f"{child.name}:\n{child.output()}" for child in running)
      )
    time.sleep(0.5)


def _start_check(spawn, name: str, *args: str) -> Child:
  return spawn(name, [sys.executable, str(CHECKS), name, *args])


@pytest.mark.parametrize(
  "name",
  [
    "synced_equals_single_device",
    "per_device_equals_m_sharpness_helper",
    "batchnorm_statistics",
    "accumulation_over_devices",
    "aux_reducers_put_sub_batch_outputs_back_in_order",
    "bn_stats_perturbed_over_devices",
  ],
)
def test_on_eight_devices(name, spawn):
  _finish(_start_check(spawn, name))


def test_trainer_per_device_with_accumulation_on_eight_devices(tmp_path, idx_dir, spawn):
  config = {**TINY, **_data(idx_dir), "out_dir": str(tmp_path / "run")}
  _finish(_start_check(spawn, "trainer_per_device_accumulation_and_bad_batch_sizes", json.dumps(config)))


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _start_two_processes(spawn, out_dir: pathlib.Path, idx_dir: pathlib.Path) -> list[Child]:
  """The CLI with --distributed on two processes of two CPU devices each, as on two hosts."""
  port = _free_port()
  flags = [f"--{k}={v}" for k, v in {**TINY, **_data(idx_dir)}.items()]
  return [
    spawn(
      f"host{process_id}",
      [sys.executable, "-m", "saner_jax.train", *flags, "--distributed=true", f"--out_dir={out_dir}"],
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(process_id),
    )
    for process_id in range(2)
  ]


def test_trainer_synced_matches_one_device_on_eight_devices_and_on_two_hosts(tmp_path, idx_dir, spawn):
  """Same config, same global batches: synced metrics do not depend on the devices or hosts."""
  eight = _start_check(
    spawn, "trainer_synced_run", json.dumps({**TINY, **_data(idx_dir), "out_dir": str(tmp_path / "eight")})
  )
  hosts = _start_two_processes(spawn, tmp_path / "hosts", idx_dir)
  # XLA's convolutions, as the multi-device runs take: only the devices differ.
  one = loop.train(TrainConfig(out_dir=str(tmp_path / "one"), cpu_conv="false", **TINY, **_data(idx_dir)))
  assert one["devices"] == 1
  _finish(eight, *hosts)
  assert json.loads((tmp_path / "hosts" / "summary.json").read_text())["devices"] == 4
  [want] = read_metrics(tmp_path / "one")
  for run in ("eight", "hosts"):
    [got] = read_metrics(tmp_path / run)
    for key in ("train_loss", "cosine"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=f"{run}: {key}")
    for key in ("train_acc", "clean_acc", "noisy_memorised", "test_acc", "group_A", "group_B", "group_C"):
      np.testing.assert_allclose(got[key], want[key], atol=0.02, err_msg=f"{run}: {key}")


@pytest.mark.parametrize(
  "flags, names",
  [
    (["--perturbation_mode", "sideways"], "--perturbation_mode"),
    (["--grad_accum_steps", "0"], "--grad_accum_steps"),
    (["--batch_size", "32", "--m_sharpness", "2", "--grad_accum_steps", "3"], "--grad_accum_steps"),
  ],
)
def test_bad_parallel_flags_name_the_flag(flags, names, capsys, tmp_path):
  assert cli.main(flags + ["--out_dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert names in err, err


def test_sgd_accumulation_equals_the_full_batch_on_identical_images(tmp_path):
  """SGD with 2 micro-batches = the full batch, when all the images are one.

  BatchNorm normalises each micro-batch with its own statistics, so on real
  data the two differ; with every image the same, each micro-batch has the
  full batch's statistics (over examples and pixels), the mean of the two
  micro-batch gradients is the full batch's gradient, and every metric must
  agree (rounding apart: 1e-7 here). The labels differ, so the
  micro-batches' losses and gradients do: summing the gradients instead
  (as doubling lr does) moves train_loss by 1e-2, and so would keeping one
  micro-batch's loss, logits or gradient. The step count and data order are
  the same in both runs, or the metrics would differ too.
  """
  rng = np.random.default_rng(0)
  images = np.repeat(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), 64, axis=0)
  for prefix in ("train", "t10k"):
    write_idx(tmp_path, prefix, images, rng.integers(0, 10, 64))
  # No augmentation: random crops and flips would make the images differ.
  runs = {
    k: loop.train(
      TrainConfig(
        optimizer="sgd",
        grad_accum_steps=k,
        augment=False,
        out_dir=str(tmp_path / f"k{k}"),
        **TINY,
        **_data(tmp_path),
      )
    )["final"]
    for k in (1, 2)
  }
  for key in ("train_loss", "train_acc", "clean_acc", "noisy_memorised", "test_acc"):
    np.testing.assert_allclose(runs[2][key], runs[1][key], rtol=1e-5, err_msg=key)

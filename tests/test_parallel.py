"""Data parallelism: saner_jax.parallel and the trainer on 1 and 8 devices.

The 8-device checks live in ``tests/_parallel_checks.py`` and each runs in
its own subprocess, where ``--xla_force_host_platform_device_count=8`` is set
before jax starts; this process, and the rest of the suite, keep one device.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from saner_jax.train import cli, loop
from saner_jax.train.config import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "_parallel_checks.py"
TINY = dict(
    model="resnet8", epochs=1, batch_size=32, train_examples=64, test_examples=64,
    eval_batch_size=32, alpha_warmup_epochs=1, progress="none", checkpoint=False,
)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> pathlib.Path:
  """A small Fashion-MNIST-shaped IDX dataset: the class sets a bright band."""
  directory = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(1)
  for prefix, n in (("train", 128), ("t10k", 64)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c : 2 * c + 3] = 250
    with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.tobytes())
    with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBI", 0, 0x08, 1, n) + labels.astype(np.uint8).tobytes())
  return directory


def _start_check(name: str, *args: str, idx_dir: pathlib.Path | None = None) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  if idx_dir is not None:
    env["SANER_JAX_FASHION_MNIST_DIR"] = str(idx_dir)
  return subprocess.Popen(
      [sys.executable, str(CHECKS), name, *args], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )


def _finish(proc: subprocess.Popen) -> None:
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output


@pytest.mark.parametrize(
    "name",
    [
        "synced_equals_single_device",
        "per_device_equals_m_sharpness_helper",
        "batchnorm_statistics",
        "accumulation_over_devices",
        "trainer_puts_sub_batch_logits_back_in_order",
    ],
)
def test_on_eight_devices(name):
  _finish(_start_check(name))


def test_trainer_per_device_with_accumulation_on_eight_devices(tmp_path, idx_dir):
  _finish(_start_check(
      "trainer_per_device_accumulation_and_bad_batch_sizes", str(tmp_path / "run"), idx_dir=idx_dir
  ))


def _metrics(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _start_two_processes(out_dir: pathlib.Path, idx_dir: pathlib.Path) -> list[subprocess.Popen]:
  """The CLI with --distributed on two processes of two CPU devices each, as on two hosts."""
  port = _free_port()
  flags = [f"--{k}={v}" for k, v in TINY.items()]
  procs = []
  for process_id in range(2):
    env = {
        **os.environ, "JAX_PLATFORMS": "cpu", "SANER_JAX_FASHION_MNIST_DIR": str(idx_dir),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(process_id),
    }
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "saner_jax.train", *flags, "--distributed=true", f"--out_dir={out_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ))
  return procs


def test_trainer_synced_matches_one_device_on_eight_devices_and_on_two_hosts(tmp_path, idx_dir, monkeypatch):
  """Same config, same global batches: synced metrics do not depend on the devices or hosts."""
  eight = _start_check(
      "trainer_synced_run", json.dumps({**TINY, "out_dir": str(tmp_path / "eight")}), idx_dir=idx_dir
  )
  hosts = _start_two_processes(tmp_path / "hosts", idx_dir)
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(idx_dir))
  one = loop.train(TrainConfig(out_dir=str(tmp_path / "one"), **TINY))
  assert one["devices"] == 1
  for proc in (eight, *hosts):
    _finish(proc)
  assert json.loads((tmp_path / "hosts" / "summary.json").read_text())["devices"] == 4
  [want] = _metrics(tmp_path / "one")
  for run in ("eight", "hosts"):
    [got] = _metrics(tmp_path / run)
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
def test_bad_parallel_flags_name_the_flag(flags, names, capsys):
  assert cli.main(flags + ["--out_dir", "unused"]) == 2
  err = capsys.readouterr().err
  assert names in err, err


def test_sgd_with_accumulation_trains_on_one_device(tmp_path, idx_dir, monkeypatch):
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(idx_dir))
  summary = loop.train(TrainConfig(optimizer="sgd", grad_accum_steps=2, out_dir=str(tmp_path), **TINY))
  assert np.isfinite(summary["final"]["train_loss"])
  assert 0.0 <= summary["final"]["train_acc"] <= 1.0


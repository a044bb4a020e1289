"""Test-wide settings and fixtures.

CPU only; hypothesis without wall-clock deadlines (the first call of a jitted
function compiles, which a deadline would flag); a working TFDS mock; a
small learnable dataset in MNIST's IDX format for trainer runs; and the
oneDNN kernels of saner_jax.cpu_conv, or a skip that says what is missing.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gzip
import json
import pathlib
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
from hypothesis import settings

# The network of the trainer tests whose behaviour does not depend on it (the
# plumbing of runs, resumes, pipelines, devices, logs): ResNet-8's first stage
# alone, which traces and compiles in a fraction of ResNet-8's time. The
# models themselves are tested in test_models.py.
SMOKE_MODEL = "resnet4"

settings.register_profile("saner_jax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("saner_jax")


def pytest_configure(config):
  """Children of the test processes start with SIGINT at its default, as from a terminal.

  A job a shell without job control starts in the background (``cmd &`` in
  a script, as some CI runners do) has SIGINT ignored, and an ignored signal stays ignored across ``exec``: the CLI
  subprocesses of the signal tests would never see their SIGINT. A handled
  signal is reset to the default at ``exec``, so the test process handles it
  as Python does by default. (A ``preexec_fn`` that reset it in each child
  would run Python between fork and exec in a process with JAX's threads,
  which can deadlock.)
  """
  del config
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _contain_tfds_temp_dirs(tmp_path_factory):
  """TFDS 4.9.10 makes an empty temp dir each time it builds the info of an
  unprepared dataset (DatasetInfo.initialize_from_bucket) and never removes
  it; point tempfile at a pytest-managed dir so test runs do not litter /tmp."""
  import tempfile

  previous = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = previous


@pytest.fixture
def mock_tfds(monkeypatch):
  """``tfds.testing.mock_data`` whose data sources also serve ``__getitems__``.

  TFDS 4.9 mocks ``__getitems__`` with a partial of an unbound function set on
  a MagicMock instance, so it never receives ``self`` and fails with
  "missing 1 required positional argument: 'record_keys'"; ``__getitem__``
  (a magic method, which MagicMock binds) works. The loader uses the batched
  ``__getitems__``, so this patches the function the mock wraps.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.testing import mocking

  def getitems(record_keys, generator, serialized=False):
    del serialized  # the decoded path of tfds.data_source never asks for bytes
    return [generator[key] for key in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  return tfds.testing.mock_data


def write_idx(directory: pathlib.Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes ``{prefix}-images-idx3-ubyte.gz`` and the labels file, as MNIST ships them."""
  with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
    f.write(struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.tobytes())
  with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
    f.write(struct.pack(">HBBI", 0, 0x08, 1, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> pathlib.Path:
  """Fashion-MNIST-shaped IDX files (256 train, 64 test): the class sets a bright band.

  Trainer tests pass it as ``data_dir``, so no TFDS copy or Debian package on
  the machine can stand in for it.
  """
  return write_banded_idx(tmp_path_factory.mktemp("idx"))


def write_banded_idx(directory: pathlib.Path) -> pathlib.Path:
  """The files of :func:`idx_dir`, written into ``directory``: the same bytes on every machine."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 256), ("t10k", 64)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c : 2 * c + 3] = 250
    write_idx(directory, prefix, images, labels)
  return directory


@pytest.fixture(scope="session")
def onednn() -> pathlib.Path:
  """Builds (or finds cached) and registers cpu_conv's oneDNN kernels; skips, naming what is missing, where they cannot be built."""
  from saner_jax.cpu_conv import _build

  try:
    return _build.load_onednn_conv()
  except _build.NativeBuildError as e:
    pytest.skip(f"cpu_conv's oneDNN kernels are unavailable: {e}")


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  """A run's ``metrics.jsonl`` as a list of records."""
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_first_epoch(proc: subprocess.Popen, run_dir: pathlib.Path, timeout_s: float = 600) -> None:
  """Waits until ``proc``'s run in ``run_dir`` has logged an epoch, then kills it with SIGKILL.

  The interruption every kill-and-resume test makes: mid-training, with no
  chance to clean up. Fails if the run ends, or logs nothing in ``timeout_s``.
  """
  try:
    deadline = time.time() + timeout_s
    while not ((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)):
      assert proc.poll() is None, proc.stdout.read() if proc.stdout else "the run ended"
      assert time.time() < deadline, f"{run_dir} logged no epoch in {timeout_s} s"
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()


# Metrics that count something: coordinates of the gradient (the group
# fractions) or examples (the accuracies). Two formulations of the same run
# agree on them only to a few counts, not to the last bit: a last-bit
# difference in one gradient or logit (a reassociated sum, or another CPU's
# oneDNN kernels rounding differently) moves one coordinate or example across
# a group or argmax boundary. The continuous metrics (losses, cosines) stay
# tight, and they are what catches a real difference.
COORDINATE_FRACTIONS = ("group_A", "group_B", "group_C")
EXAMPLE_FRACTIONS = ("train_acc", "clean_acc", "noisy_memorised", "test_acc", "best_test_acc")


def assert_same_run_metrics(
  got: dict,
  want: dict,
  *,
  parameters: int,
  examples: int,
  coordinates_slack: int = 4,
  examples_slack: int = 1,
  rtol: float = 1e-4,
  ignore: tuple[str, ...] = ("epoch_time_s", "wall_time_s"),
) -> None:
  """Two records of the same run, within ``coordinates_slack`` of ``parameters``
  coordinates per step on the group fractions, ``examples_slack`` of the
  smallest set of ``examples`` on the accuracies, and ``rtol`` on the rest."""
  assert set(got) == set(want), set(got) ^ set(want)
  for key, value in want.items():
    if key in ignore:
      continue
    if value is None or isinstance(value, str):
      assert got[key] == value, key
      continue
    if key in COORDINATE_FRACTIONS:
      tolerance = dict(abs=coordinates_slack / parameters, rel=0)
    elif key in EXAMPLE_FRACTIONS:
      tolerance = dict(abs=examples_slack / examples, rel=0)
    else:
      tolerance = dict(rel=rtol, abs=1e-6)
    assert got[key] == pytest.approx(value, **tolerance), (key, got[key], value, tolerance)


def parameter_count(model: str, num_classes: int, image_shape: tuple[int, int, int]) -> int:
  """The trainable parameters of a toolkit model, from shapes alone (no compute)."""
  import jax
  import jax.numpy as jnp

  from saner_jax.train import models

  net = models.create_model(model, num_classes)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))

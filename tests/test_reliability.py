"""The trainer survives mistakes and faults (docs/reliability.md).

Bad values fail before anything loads; an unusable or busy out_dir is one
error line; a failed start leaves nothing that blocks a corrected rerun; a
corrupt latest checkpoint is skipped for the newest good one; Ctrl-C and
kills keep the last checkpoint. Behaviour that is about processes (the
lock, Ctrl-C, a kill during a save) drives the real CLI in subprocesses.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from saner_jax.train import cli, lock
from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


# ---------------------------------------------------------------------------
# Bad values fail before anything loads (issue cases 1 and 5)


@pytest.mark.parametrize(
  "flags, flag",
  [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--rho", "nan"], "--rho"),
    (["--weight_decay", "inf"], "--weight_decay"),
    (["--lr_decay", "nan"], "--lr_decay"),
    (["--alpha", "nan"], "--alpha"),
    (["--train_examples", "100", "--batch_size", "128"], "--batch_size"),
    (["--batch_size", "60001"], "--batch_size"),
    (["--train_examples", "60001"], "--train_examples"),
    (["--test_examples", "10001"], "--test_examples"),
  ],
)
def test_bad_values_fail_before_anything_loads(flags, flag, capsys, tmp_path):
  """No data here: a value that passed validation would fail on the data instead (exit 1)."""
  out_dir = tmp_path / "run"
  argv = flags + ["--dataset", "fashion_mnist", "--data_dir", str(tmp_path / "no_data"), "--out_dir", str(out_dir)]
  assert cli.main(argv) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"error: {flag}: "), line
  assert not out_dir.exists()


def test_a_scalar_milestone_in_yaml_is_one_milestone(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("lr_milestones: 0.5\n")
  assert config_lib.from_mapping(config_lib.load_yaml(str(path))).lr_milestones == (0.5,)
  path.write_text("lr_milestones: [0.5, 0.75]\n")
  assert config_lib.from_mapping(config_lib.load_yaml(str(path))).lr_milestones == (0.5, 0.75)
  path.write_text("lr_milestones: half\n")
  with pytest.raises(ConfigError, match="--lr_milestones: expected float, got 'half'"):
    config_lib.from_mapping(config_lib.load_yaml(str(path)))


# ---------------------------------------------------------------------------
# The out_dir: unusable paths, and one run at a time (issue cases 3 and 6)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
  # flock locks belong to an open file, so a second open conflicts even in this process.
  busy = pytest.raises(ConfigError, match=rf"{tmp_path} is in use by process {os.getpid()} on ")
  with lock.hold(tmp_path), busy, lock.hold(tmp_path):
    pass
  with lock.hold(tmp_path):  # released at the end of the block
    pass
  # A holder killed with SIGKILL leaves its lock file, which blocks nothing.
  holder = subprocess.Popen(
    [sys.executable, "-c", "import sys, time; from saner_jax.train import lock\n"
     "with lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)", str(tmp_path)],
    stdout=subprocess.PIPE,
    text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(ConfigError, match=f"process {holder.pid} on"), lock.hold(tmp_path):
      pass
  finally:
    holder.kill()
    holder.wait()
  assert f"process {holder.pid}" in (tmp_path / lock.LOCK_NAME).read_text()
  with lock.hold(tmp_path):
    pass

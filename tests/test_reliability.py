"""The trainer survives mistakes and faults (docs/reliability.md).

Bad values fail before anything loads; an unusable or busy out_dir is one
error line; a failed start leaves nothing that blocks a corrected rerun; a
corrupt latest checkpoint is skipped for the newest good one; Ctrl-C and
kills keep the last checkpoint. Behaviour that is about processes (the
lock, Ctrl-C, a kill during a save) drives the real CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import SMOKE_MODEL

from saner_jax import _cli_signals
from saner_jax.train import cli, lock
from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError
from saner_jax.train.run_dir import RunDir

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
    (["--weight_decay", "-1e-4"], "--weight_decay"),  # a value, not a flag, though it starts with "-"
    (["--lr", "-inf"], "--lr"),
    (["--pipeline", "dividemix", "--epochs", "3"], "--pipeline_warmup_epochs"),  # the warm-up would be all of it
    (["--pipeline", "plc", "--epochs", "3", "--pipeline_warmup_epochs", "4"], "--pipeline_warmup_epochs"),
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


@pytest.mark.parametrize(
  "out_dir, problem",
  [
    ("", "is empty"),
    (" ", "is empty"),
    ("runs/" + "x" * 300, "a part of the path is 300 bytes long, over the system's limit of 255"),
    ("/".join(["runs"] + ["y" * 200] * 20), "the run's deepest files would have paths of"),
  ],
)
def test_an_out_dir_the_system_cannot_hold_fails_before_anything_is_written(
  out_dir, problem, capsys, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # an empty --out_dir would be the working directory
  assert cli.main(["--out_dir", out_dir, "--data_dir", str(tmp_path / "no_data")]) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"error: --out_dir: {problem}"), line
  assert list(tmp_path.iterdir()) == []


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


def test_an_unusable_out_dir_is_one_error_line(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = {a_file: "it exists and is not a directory", a_file / "run": "a part of the path is a file"}
  if os.geteuid() != 0:  # root writes anywhere
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    cases[read_only / "run"] = "Permission denied"
  for out_dir, problem in cases.items():
    assert cli.main(["--out_dir", str(out_dir), "--data_dir", str(tmp_path / "no_data")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out_dir: cannot use {out_dir}: {problem}"), line


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
  assert f"process {holder.pid}" in RunDir(tmp_path).lock.read_text()
  with lock.hold(tmp_path):
    pass


# ---------------------------------------------------------------------------
# Runs of the real CLI. SGD on the smoke-test ResNet-4 and 96 images; the subprocesses
# share a persistent compilation cache, so only the first one compiles.

TINY = dict(
  optimizer="sgd",
  cpu_conv="false",
  lr_schedule="constant",  # so that the 50-epoch run of the Ctrl-C test compiles as the 3-epoch ones
  model=SMOKE_MODEL,
  epochs=3,
  batch_size=32,
  train_examples=96,
  test_examples=64,
  eval_batch_size=32,
  progress="lines",
)
TIME_KEYS = ("epoch_time_s", "wall_time_s")
# Run by the CLI subprocess of the kill-during-a-save test: orbax's JSON
# handler, which writes the checkpoint's progress after its arrays, blocks in
# the save of epoch 2, so the kill lands in the middle of that save.
HANG_IN_SAVE = """
import sys, time
import orbax.checkpoint as ocp
from saner_jax.train import cli

original = ocp.handlers.JsonCheckpointHandler.async_save

async def hang_in_epoch_2(self, directory, *args, **kwargs):
  if '/2.orbax-checkpoint-tmp' in str(directory):
    print('saving epoch 2', flush=True)
    time.sleep(600)
  return await original(self, directory, *args, **kwargs)

ocp.handlers.JsonCheckpointHandler.async_save = hang_in_epoch_2
sys.exit(cli.main(sys.argv[1:]))
"""

# Run by the CLI subprocess of the full-disk test: from the save of epoch 2
# on, the kernel refuses to let any file of the process grow past 4 KiB
# (RLIMIT_FSIZE; with SIGXFSZ ignored a write fails with EFBIG, as one fails
# with ENOSPC on a full disk), so TensorStore's write of the arrays fails.
LIMIT_FROM_SAVE_2 = """
import resource, signal, sys
from saner_jax.train import checkpointing, cli

original = checkpointing.save

def limited_from_epoch_2(checkpoints, state, progress, *args, **kwargs):
  if progress.epoch == 2:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
  return original(checkpoints, state, progress, *args, **kwargs)

checkpointing.save = limited_from_epoch_2
cli.run()
"""


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  return {
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


@pytest.fixture
def cli_run(idx_dir, compilation_cache):
  """``cli_run(out_dir, *flags, code=None)``: the CLI in a subprocess, on the IDX fixture."""
  procs = []

  def start(out_dir, *extra, code=None):
    flags = [f"--{k}={v}" for k, v in {**TINY, "data_dir": idx_dir, "out_dir": out_dir}.items()]
    command = [sys.executable, "-c", code, *flags] if code else [sys.executable, "-m", "saner_jax.train", *flags]
    proc = subprocess.Popen(
      [*command, *extra],
      cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    procs.append(proc)
    return proc

  yield start
  for proc in procs:
    proc.kill()
    proc.wait()


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == code, output
  assert "Traceback" not in output and "Exception ignored" not in output, output
  return output


def _wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
  """The process's output lines up to the first that contains ``text``."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"the process ended without printing {text!r}:\n{''.join(lines)}")


def _results(run_dir: pathlib.Path) -> tuple[list[dict], dict]:
  """The metrics records and the summary's results, less wall-clock times."""
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  records = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]
  summary = json.loads((run_dir / "summary.json").read_text())
  return records, {k: summary[k] for k in ("best_test_acc", "last_test_acc", "train_examples")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, idx_dir, compilation_cache) -> pathlib.Path:
  """An uninterrupted run, the reference of every resumed one."""
  run_dir = tmp_path_factory.mktemp("straight") / "run"
  flags = [f"--{k}={v}" for k, v in {**TINY, "data_dir": idx_dir, "out_dir": run_dir}.items()]
  subprocess.run(
    [sys.executable, "-m", "saner_jax.train", *flags],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache},
    check=True,
    capture_output=True,
    timeout=600,
  )
  return run_dir


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_data(step_dir: pathlib.Path) -> None:
  path = _largest_file(step_dir / "state")  # the parameters' chunks
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_metadata(step_dir: pathlib.Path) -> None:
  path = step_dir / "state" / "_METADATA"  # the tree of arrays, JSON
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(step_dir: pathlib.Path) -> None:
  path = _largest_file(step_dir / "state")
  raw = bytearray(path.read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 4):
    raw[i] ^= 0x55
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
  "corrupt, reason",
  [
    (_truncate_data, "cannot be read: "),
    (_truncate_metadata, "cannot be read: JSONDecodeError: "),
    (_flip_bytes, "its arrays or progress differ from those saved: digest mismatch"),
  ],
)
def test_a_corrupt_latest_checkpoint_falls_back_and_ends_as_an_uninterrupted_run(
  corrupt, reason, straight, cli_run, tmp_path
):
  run_dir = tmp_path / "run"
  shutil.copytree(straight, run_dir)
  corrupt(run_dir / "checkpoints" / "3")
  corrupted = {
    p.relative_to(run_dir / "checkpoints" / "3"): p.read_bytes()
    for p in (run_dir / "checkpoints" / "3").rglob("*")
    if p.is_file()
  }

  output = _finish(cli_run(run_dir, "--resume"))
  # One warning line, whole, and not asyncio's report of each abandoned read task.
  assert "never retrieved" not in output, output
  [warning] = [line for line in output.splitlines() if "warning" in line]
  assert re.fullmatch(
    rf"warning: the checkpoint of epoch 3 is unusable \({re.escape(reason)}.*\); moved to {run_dir}/unusable_checkpoints/3",
    warning,
  ), output
  assert f"resumed {run_dir} after epoch 2" in output
  assert _results(run_dir) == _results(straight)
  # The bad checkpoint is kept, byte for byte, out of the way of the new one.
  kept = run_dir / "unusable_checkpoints" / "3"
  assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == corrupted
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]


def test_a_kill_during_a_save_keeps_the_previous_checkpoint_and_the_lock_dies_with_it(straight, cli_run, tmp_path):
  run_dir = tmp_path / "run"
  first = cli_run(run_dir, code=HANG_IN_SAVE)
  _wait_for_line(first, "saving epoch 2")
  assert first.poll() is None

  # A second process fails at once, naming the directory and the first process.
  second = _finish(cli_run(run_dir, "--resume"), code=2)
  assert _one_error_line(second).startswith(f"error: --out_dir: {run_dir} is in use by process {first.pid} on ")

  first.send_signal(signal.SIGKILL)
  first.wait()
  # Its lock died with it; the interrupted save is no checkpoint.
  output = _finish(cli_run(run_dir, "--resume"))
  assert f"resumed {run_dir} after epoch 1" in output, output
  assert _results(run_dir) == _results(straight)


def test_a_refused_checkpoint_write_is_one_line_and_resume_skips_the_partial_save(straight, cli_run, tmp_path):
  run_dir = tmp_path / "run"
  output = _finish(cli_run(run_dir, code=LIMIT_FROM_SAVE_2), code=1)
  assert output.strip().splitlines()[-1] == (
    f"error: cannot write the checkpoint of epoch 2 to {run_dir.absolute() / 'checkpoints'}: File too large "
    "(its partial save is never restored); the checkpoint of epoch 1 is kept; "
    f"once {run_dir} can be written again, "
    f"continue with: python -m saner_jax.train --config {run_dir / 'config.yaml'} --resume"
  ), output
  assert [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]  # the partial save is there
  output = _finish(cli_run(run_dir, "--resume"))
  assert f"resumed {run_dir} after epoch 1" in output, output
  assert _results(run_dir) == _results(straight)


def test_a_full_disk_for_the_logs_is_one_line_naming_the_problem(idx_dir, tmp_path, capsys):
  """/dev/full refuses every write with ENOSPC: metrics.csv's temporary file points there."""
  run_dir = tmp_path / "my run"  # the printed command quotes it for the shell
  run_dir.mkdir()
  (run_dir / "metrics.csv.tmp").symlink_to("/dev/full")
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 1, "data_dir": idx_dir, "out_dir": run_dir}.items()]
  assert cli.main(flags) == 1
  out = capsys.readouterr()
  assert _one_error_line(out.err) == (
    f"error: cannot write the logs of epoch 1 to {run_dir}: No space left on device; "
    f"the checkpoint of epoch 1 is kept; once {run_dir} can be written again, "
    f"continue with: python -m saner_jax.train --config '{run_dir / 'config.yaml'}' --resume"
  )


def test_ctrl_c_is_one_line_saying_what_is_kept_and_how_to_resume(cli_run, tmp_path):
  run_dir = tmp_path / "run"
  proc = cli_run(run_dir, "--epochs=50")
  _wait_for_line(proc, " 2/50 |")
  proc.send_signal(signal.SIGINT)
  output = _finish(proc, code=130)
  line = output.strip().splitlines()[-1]
  match = re.fullmatch(
    r"error: interrupted in epoch (\d+); the checkpoint of epoch (\d+) is kept; "
    r"continue with: python -m saner_jax\.train --config (\S+) --resume",
    line,
  )
  assert match, output
  interrupted, kept, config = int(match[1]), int(match[2]), pathlib.Path(match[3])
  assert kept >= 2 and kept in (interrupted - 1, interrupted)  # the save of the epoch may have completed
  assert max(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == kept
  assert config == run_dir / "config.yaml" and config.exists()


def test_a_failed_start_does_not_block_a_corrected_rerun(straight, cli_run, tmp_path):
  run_dir = tmp_path / "run"
  missing = _finish(cli_run(run_dir, f"--data_dir={tmp_path / 'no_data'}"), code=1)
  assert "is available from neither source" in missing
  diverged = _finish(cli_run(run_dir, "--lr=1e30"), code=1)
  assert diverged.strip().splitlines()[-1] == (
    "error: epoch 1: non-finite loss, gradients or weights; no checkpoint was written, so "
    f"{run_dir} holds no run: run again with a lower --lr or --rho"
  ), diverged
  _finish(cli_run(run_dir))  # neither "already holds a run" nor "started with another config"
  assert _results(run_dir) == _results(straight)


def test_debug_prints_the_traceback_of_a_user_error(capsys, tmp_path):
  assert cli.main(["--seed", "-1", "--out_dir", str(tmp_path), "--debug"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and "ConfigError: --seed" in err
  assert err.strip().splitlines()[-1] == "error: --seed: must be in [0, 2**32), got -1"


# ---------------------------------------------------------------------------
# The run's identity is in its checkpoints (issue 18, item 2)


def _half_done(straight: pathlib.Path, run_dir: pathlib.Path) -> pathlib.Path:
  """A copy of the straight run stopped after epoch 2: its last checkpoint and summary removed."""
  shutil.copytree(straight, run_dir)
  shutil.rmtree(run_dir / "checkpoints" / "3")
  (run_dir / "summary.json").unlink()
  return run_dir


def _set_in_yaml(path: pathlib.Path, key: str, value: str) -> None:
  """Edits one key of a config.yaml by hand, as a user would: flat or under its section."""
  lines = path.read_text().splitlines()
  lines = [
    line[: len(line) - len(line.lstrip())] + f"{key}: {value}" if line.strip().startswith(f"{key}:") else line
    for line in lines
  ]
  path.write_text("\n".join(lines) + "\n")


def test_resume_compares_with_the_checkpoint_not_the_editable_config_yaml(straight, tmp_path, capsys):
  run_dir = _half_done(straight, tmp_path / "run")
  _set_in_yaml(run_dir / "config.yaml", "lr", "0.05")
  assert cli.main(["--config", str(run_dir / "config.yaml"), "--resume"]) == 2
  assert _one_error_line(capsys.readouterr().err) == (
    f"error: --resume: {run_dir} was started with another config (as its checkpoint records); "
    "differing keys: lr (0.1 -> 0.05); resume with the values it was started with, or start a new --out_dir"
  )


def _cli_command(compilation_cache, *args, cwd=REPO) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "saner_jax.train", *map(str, args)],
    cwd=cwd,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_a_moved_run_and_a_relative_out_dir_resume_where_they_are(straight, compilation_cache, tmp_path):
  # Moved: its config.yaml still names the old place, which no longer exists.
  moved = _half_done(straight, tmp_path / "moved")
  _set_in_yaml(moved / "config.yaml", "out_dir", str(tmp_path / "old_place"))
  # Relative: run from tmp_path as "relative", resumed from another working directory.
  relative = _half_done(straight, tmp_path / "relative")
  _set_in_yaml(relative / "config.yaml", "out_dir", "relative")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  procs = [
    _cli_command(compilation_cache, "--config", run / "config.yaml", "--resume", cwd=cwd)
    for run, cwd in ((moved, REPO), (relative, elsewhere))
  ]
  for run_dir, proc in zip((moved, relative), procs):
    output = _finish(proc)
    assert f"resumed {run_dir} after epoch 2" in output, output
    assert _results(run_dir) == _results(straight)
  assert not (tmp_path / "old_place").exists() and not (REPO / "relative").exists()
  assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("layout", ["flat", "sectioned"])
def test_a_run_without_a_config_in_its_checkpoints_resumes_from_its_config_yaml(
  layout, straight, cli_run, tmp_path, capsys
):
  """Earlier releases' runs: no config in the checkpoints, a flat config.yaml; this release's is sectioned."""
  run_dir = _half_done(straight, tmp_path / "run")
  for item in (run_dir / "checkpoints").glob("*/config"):
    shutil.rmtree(item)
  written = yaml.safe_load((run_dir / "config.yaml").read_text())
  assert written["optimizer"]["lr"] == 0.1 and "lr" not in written  # this release writes sections
  if layout == "flat":
    flat = config_lib.flatten_sections(written, "config.yaml")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
  # Its identity is then its config.yaml, as before (an edit to it goes unseen, as it did then).
  assert cli.main(["--config", str(run_dir / "config.yaml"), "--resume", "--lr", "0.05"]) == 2
  assert f"(as {run_dir / 'config.yaml'} records); differing keys: lr (0.1 -> 0.05)" in capsys.readouterr().err
  output = _finish(cli_run(run_dir, "--resume"))
  assert f"resumed {run_dir} after epoch 2" in output, output
  assert _results(run_dir) == _results(straight)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_an_unreadable_checkpoints_folder_is_one_line(straight, tmp_path, capsys):
  run_dir = tmp_path / "run"
  shutil.copytree(straight, run_dir)
  (run_dir / "checkpoints").chmod(0)
  try:
    assert cli.main(["--config", str(run_dir / "config.yaml"), "--resume"]) == 2
  finally:
    (run_dir / "checkpoints").chmod(0o755)
  assert _one_error_line(capsys.readouterr().err) == (
    f"error: --resume: cannot read {run_dir / 'checkpoints'}: Permission denied; "
    f"make it readable (chmod -R u+rwX {run_dir / 'checkpoints'}) or start a new --out_dir"
  )


# ---------------------------------------------------------------------------
# compare never reuses a run made under other settings (issue 18, item 3)


@pytest.fixture
def compared(straight, tmp_path) -> tuple[pathlib.Path, list[str]]:
  """A comparison directory holding the straight run as sgd seed 0, and the flags that made it."""
  shutil.copytree(straight, tmp_path / "cmp" / "sgd_seed0")
  config = json.loads((straight / "summary.json").read_text())["config"]
  flags = [f"--{k}={config[k]}" for k in TINY if k != "optimizer"] + [f"--data_dir={config['data_dir']}"]
  return tmp_path / "cmp", ["compare", "--runs", "sgd", "--out_dir", str(tmp_path / "cmp"), *flags]


def test_compare_refuses_a_run_made_under_other_settings(compared, capsys):
  out_dir, argv = compared
  for extra in ([], ["--collect_only"]):
    assert cli.main([*argv, "--lr", "0.05", "--noise_rate", "0.2", *extra]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
      f"error: compare: {out_dir / 'sgd_seed0'} holds a run made with other settings "
      f"(as {out_dir / 'sgd_seed0' / 'summary.json'} records): lr (0.1 -> 0.05), noise_rate (0.4 -> 0.2); "
      "pass its settings to collect it, or choose another --out_dir for these"
    )
  assert not (out_dir / "compare.md").exists()


def test_compare_collects_a_matching_run_once_per_seed(compared, capsys):
  out_dir, argv = compared
  assert cli.main([*argv, "--collect_only", "--seeds", "0", "0"]) == 0
  assert "| sgd | 1 |" in (out_dir / "compare.md").read_text()


def test_compare_set_gives_one_run_its_own_value_over_the_base(compared, capsys):
  """--set RUN:FLAG=VALUE wins over the shared base for that run alone (the main job's tuned SGD lr)."""
  out_dir, argv = compared
  # The run was made at lr 0.1: a base of 0.05 with sgd set back to 0.1 collects it...
  assert cli.main([*argv, "--collect_only", "--lr", "0.05", "--set", "sgd:lr=0.1"]) == 0
  assert "| sgd | 1 |" in (out_dir / "compare.md").read_text()
  # ...and setting sgd to 0.05 is refused as the other settings they are.
  assert cli.main([*argv, "--collect_only", "--set", "sgd:lr=0.05"]) == 2
  assert "lr (0.1 -> 0.05)" in _one_error_line(capsys.readouterr().err)
  for entry, error in (
    ("sgd:lr=0.1,0.2", "error: --set: sgd:lr has 2 values; give one (tune searches several)"),
    ("adam:lr=0.1", "error: --set: 'adam:lr=0.1' names run 'adam', which is not one of --runs ['sgd']"),
    ("sgd:learning_rate=0.1", "error: --set: unknown flag 'learning_rate' in 'sgd:learning_rate=0.1'; "),
  ):
    assert cli.main([*argv, "--collect_only", "--set", entry]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(error)


def test_compare_names_the_run_and_the_damaged_summary(compared, capsys):
  out_dir, argv = compared
  assert cli.main([*argv[:2], "sgd", "adam", *argv[3:]]) == 2
  assert _one_error_line(capsys.readouterr().err).startswith("error: --runs: 'adam': unknown value 'adam'; choose ")
  summary = out_dir / "sgd_seed0" / "summary.json"
  summary.write_text(summary.read_text()[:100])
  assert cli.main(argv) == 2
  assert _one_error_line(capsys.readouterr().err).startswith(
    f"error: compare: cannot read {summary}: JSONDecodeError: "
  )


# ---------------------------------------------------------------------------
# Signals at any moment (issue 18, item 4)


def test_sigint_and_sigterm_at_any_moment_end_with_one_line(cli_run, tmp_path):
  """In the first second (Python still importing JAX), while the first epoch compiles, and mid-run."""
  cases = [
    (signal.SIGINT, 0.2, r"interrupted before training began; nothing was trained"),
    (signal.SIGTERM, 0.8, r"terminated by SIGTERM before training began; nothing was trained"),
    (signal.SIGINT, "convolutions:", r"interrupted in epoch 1; no checkpoint was written, .*"),
    (signal.SIGTERM, "convolutions:", r"terminated by SIGTERM in epoch 1; no checkpoint was written, .*"),
    (signal.SIGTERM, " 1/50 |", r"terminated by SIGTERM in epoch \d+; the checkpoint of epoch \d+ is kept; .*"),
  ]
  started = time.monotonic()
  procs = [cli_run(tmp_path / f"run{i}", "--epochs=50") for i in range(len(cases))]
  for proc, (signum, when, _) in zip(procs, cases):
    if isinstance(when, float):  # seconds after the processes started
      time.sleep(max(0.0, when - (time.monotonic() - started)))
    else:
      _wait_for_line(proc, when)
    proc.send_signal(signum)
  for proc, (signum, when, message) in zip(procs, cases):
    output = _finish(proc, code=128 + signum)  # no segfault (139), no lost signal (0)
    assert re.fullmatch(f"error: {message}", output.strip().splitlines()[-1]), (when, output)


SWALLOWED = """
import gc, os, signal
from saner_jax import _cli_signals

_cli_signals.install()

def raise_inside(phase, info):  # the handler runs, and raises, inside a callback whose exceptions Python drops
  gc.callbacks.remove(raise_inside)
  os.kill(os.getpid(), signal.SIGINT)
  sum(range(1000))

gc.callbacks.append(raise_inside)
gc.collect()
print("still running", flush=True)
try:
  _cli_signals.check()
except _cli_signals.Interrupted as e:
  print("check raised", e.name, e.exit_code)
"""


def test_an_interrupt_a_callback_swallowed_is_raised_at_the_next_check():
  proc = subprocess.run(
    [sys.executable, "-c", SWALLOWED],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  # Swallowed, and silently: the next check raises it.
  assert proc.stdout.splitlines() == ["still running", "check raised SIGINT 130"], proc.stdout
  assert proc.stderr == "", proc.stderr


def _replaced_by_c_code(signum: int, chain: str = "cause") -> SystemError:
  """What C code that called back into Python makes of the handler's interrupt (numpy's ``np.dtype``
  on a JAX scalar type, seen here under SIGINT): a SystemError whose cause is the interrupt; with
  ``chain`` "context", raised while the interrupt propagated; "none", with the chain cut."""
  try:
    try:
      raise _cli_signals.Interrupted(signum)
    except _cli_signals.Interrupted as interrupt:
      error = SystemError("<function __numpy_dtype__> returned a result with an exception set")
      if chain == "context":
        raise error  # noqa: B904  # the implicit chain is the case
      raise error from (interrupt if chain == "cause" else None)
  except SystemError as e:
    return e


def test_behind_finds_the_interrupt_under_another_error_and_nothing_else():
  assert _cli_signals.behind(_replaced_by_c_code(signal.SIGTERM)).name == "SIGTERM"
  # An error raised while the interrupt propagated: the implicit chain counts too, unless cut.
  assert _cli_signals.behind(_replaced_by_c_code(signal.SIGINT, chain="context")).name == "SIGINT"
  assert _cli_signals.behind(_replaced_by_c_code(signal.SIGINT, chain="none")) is None
  assert _cli_signals.behind(ValueError("a bug")) is None
  # An error raised after a reported interrupt, in clean-up, is not the interrupt.
  assert _cli_signals.behind(_replaced_by_c_code(signal.SIGINT), stop_at=(SystemError,)) is None


def test_an_interrupt_that_c_code_replaced_is_one_line_not_a_traceback(idx_dir, tmp_path, monkeypatch, capsys):
  from saner_jax.train import loop

  monkeypatch.setattr(_cli_signals, "_acknowledged", False)  # the handling acknowledges; restored after
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 2, "data_dir": idx_dir, "out_dir": tmp_path / "run"}.items()]
  default = loop.recipe_of

  def interrupted_in_epoch_2(config):
    def recipe(run):
      parts = default(config)(run)

      def epoch(state, number):
        if number == 2:
          raise _replaced_by_c_code(signal.SIGTERM)
        return parts.epoch(state, number)

      return parts._replace(epoch=epoch)

    return recipe

  monkeypatch.setattr(loop, "recipe_of", interrupted_in_epoch_2)
  assert cli.main(flags) == 143
  assert _one_error_line(capsys.readouterr().err).startswith(
    "error: terminated by SIGTERM in epoch 2; the checkpoint of epoch 1 is kept; continue with: "
  )

  def replaced_before_training(config, resume=False):
    raise _replaced_by_c_code(signal.SIGINT)

  monkeypatch.setattr(loop, "train", replaced_before_training)
  assert cli.main(flags) == 130
  assert _one_error_line(capsys.readouterr().err) == "error: interrupted before training began; nothing was trained"

  def a_bug(config, resume=False):
    raise SystemError("a bug")

  monkeypatch.setattr(loop, "train", a_bug)
  with pytest.raises(SystemError, match="a bug"):  # a bug keeps its traceback
    cli.main(flags)

  def fails_in_clean_up_after_reporting(config, resume=False):
    try:
      raise loop.RunStopped("interrupted in epoch 3; ...", 130) from _cli_signals.Interrupted(signal.SIGINT)
    finally:
      raise OSError("the logs could not be closed")  # the case: an error in clean-up

  monkeypatch.setattr(loop, "train", fails_in_clean_up_after_reporting)
  with pytest.raises(OSError, match="could not be closed"):  # not "interrupted before training began"
    cli.main(flags)


def test_the_reliability_probe_holds_every_case():
  """scripts/reliability_probe.py, as CI runs it: every case of docs/reliability.md it drives holds."""
  proc = subprocess.run(
    [sys.executable, str(REPO / "scripts" / "reliability_probe.py")], capture_output=True, text=True, timeout=900
  )
  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"(\d+) cases, (\d+) hold", last)
  assert match and match[1] == match[2] and proc.returncode == 0, proc.stdout + proc.stderr


def test_a_run_directory_of_the_previous_release_resumes(tmp_path, idx_dir, monkeypatch, capsys):
  """tests/data/run_0.2.0 was written by saner_jax 0.2.0 and killed after epoch 1 of 4
  (tests/data/make_release_run.py): today's trainer continues it from its checkpoint."""
  data = pathlib.Path(__file__).resolve().parent / "data"
  sys.path.insert(0, str(data))
  try:
    from make_release_run import FLAGS
  finally:
    sys.path.remove(str(data))
  run = shutil.copytree(data / "run_0.2.0", tmp_path / "run")
  logged = (run / "metrics.jsonl").read_text()
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(idx_dir))  # the same bytes the run was made from
  assert cli.main([*FLAGS, "--out_dir", str(run), "--resume"]) == 0
  lines = (run / "metrics.jsonl").read_text().splitlines()
  # Continued, not restarted: epoch 1 is 0.2.0's own record, and epochs 2-4 follow it once each.
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
  assert lines[0] == logged.splitlines()[0]
  assert "resumed" in capsys.readouterr().out.lower()
  assert json.loads(RunDir(run).summary.read_text())["last_test_acc"] is not None


def test_an_older_state_is_placed_by_path_and_nothing_else_is():
  from typing import NamedTuple

  import jax.numpy as jnp
  import numpy as np

  from saner_jax.train import checkpointing

  class State(NamedTuple):  # today's: a field added since, None in this run
    count: object
    mask: object
    trace: object

  like = {"opt": State(jnp.zeros((), jnp.int32), None, jnp.zeros(3))}
  saved = {"opt": {"trace": np.arange(3.0, dtype=np.float32), "count": np.int32(7)}}  # orbax's dict, keys sorted
  placed = checkpointing._by_path(saved, like)
  assert isinstance(placed["opt"], State) and placed["opt"].mask is None
  assert int(placed["opt"].count) == 7 and placed["opt"].trace.tolist() == [0.0, 1.0, 2.0]
  with pytest.raises(checkpointing._Unusable, match="holds arrays today's has not: opt/extra"):
    checkpointing._by_path({"opt": {**saved["opt"], "extra": np.zeros(1)}}, like)
  with pytest.raises(checkpointing._Unusable, match=r"no array like \['opt'\]\.trace of today's"):
    checkpointing._by_path({"opt": {**saved["opt"], "trace": np.zeros(4, np.float32)}}, like)

"""benchmarks/seed_statistics.py: paired differences and intervals on hand-made summaries."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_statistics


def _write(out_dir: pathlib.Path, run: str, seed: int, best: float, last: float, memorised: float) -> None:
  run_dir = out_dir / f"{run}_seed{seed}"
  run_dir.mkdir(parents=True)
  summary = {"best_test_acc": best, "last_test_acc": last, "final": {"noisy_memorised": memorised}}
  (run_dir / "summary.json").write_text(json.dumps(summary))


def test_paired_interval_by_hand(tmp_path):
  # SANER - SAM best test: +1, +2, +3 points -> mean 2, std 1, t(0.975, 2) = 4.3027 -> 2 +- 2.4842.
  for seed, (sam, saner) in enumerate([(0.70, 0.71), (0.72, 0.74), (0.74, 0.77)]):
    _write(tmp_path, "sam", seed, sam, sam, 0.2)
    _write(tmp_path, "saner", seed, saner, saner, 0.1)
  runs = seed_statistics.load([tmp_path])
  n, mean, std, low, high = seed_statistics.paired(
    runs["sam"], runs["saner"], seed_statistics.METRICS["max test % (diagnostic)"]
  )
  assert n == 3
  assert mean == pytest.approx(2.0)
  assert std == pytest.approx(1.0)
  assert (low, high) == (pytest.approx(2.0 - 2.48414, abs=1e-4), pytest.approx(2.0 + 2.48414, abs=1e-4))


def test_pairs_only_common_seeds_and_pools_directories(tmp_path):
  _write(tmp_path / "a", "sam", 0, 0.70, 0.70, 0.2)
  _write(tmp_path / "a", "sam", 1, 0.72, 0.72, 0.2)
  _write(tmp_path / "b", "sam+grB", 1, 0.70, 0.70, 0.3)
  text = seed_statistics.report([tmp_path / "a", tmp_path / "b"], [("sam", "sam+grB")])
  assert "| sam+grB − sam | 1 | max test % (diagnostic) | -2.00 |" in text


def test_the_validation_selected_accuracy_is_reported_when_every_run_has_it(tmp_path):
  _write(tmp_path, "sam", 0, 0.70, 0.60, 0.2)
  assert "test @ best val" not in seed_statistics.report([tmp_path], [])
  summary = json.loads((tmp_path / "sam_seed0" / "summary.json").read_text())
  summary.update(test_acc_at_best_val=0.65, mean_last5_test_acc=0.62)
  (tmp_path / "sam_seed0" / "summary.json").write_text(json.dumps(summary))
  header = seed_statistics.report([tmp_path], []).splitlines()[0]
  assert header == (
    "| run | seeds | test @ best val % | last test % | last-5 mean test % | memorised % | max test % (diagnostic) |"
  )


def test_the_same_run_twice_is_refused(tmp_path):
  _write(tmp_path / "a", "sam", 0, 0.70, 0.70, 0.2)
  _write(tmp_path / "b", "sam", 0, 0.70, 0.70, 0.2)
  with pytest.raises(SystemExit, match="more than one of the directories"):
    seed_statistics.load([tmp_path / "a", tmp_path / "b"])


def test_a_pair_naming_no_run_is_an_error_only_when_given(tmp_path, capsys):
  """A typo in --pairs is refused; the default pairs skip what a directory lacks (an ablation holds SANER alone)."""
  _write(tmp_path, "saner", 0, 0.70, 0.70, 0.2)
  with pytest.raises(
    SystemExit, match=r"^error: --pairs: no finished runs named \['sanr'\]; the runs found are \['saner'\]$"
  ):
    seed_statistics.main([str(tmp_path), "--pairs", "saner:sanr"])
  assert seed_statistics.main([str(tmp_path)]) == 0
  assert "| saner | 1 |" in capsys.readouterr().out

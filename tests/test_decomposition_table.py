"""benchmarks/decomposition_table.py: the decomposition over training, from hand-made metrics."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import decomposition_table


def _write(out_dir: pathlib.Path, run: str, records: list[dict], seed: int = 0) -> None:
  run_dir = out_dir / f"{run}_seed{seed}"
  run_dir.mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(epoch: int, p_b_noisy: float, lam: float | None = None) -> dict:
  keys = {key: 0.5 for key, _ in decomposition_table.COLUMNS.values()}
  return {
    "epoch": epoch,
    **keys,
    "decomp_p_B_noisy_dom": p_b_noisy,
    "decomp_amp_noisy": None,
    "sharpness_lambda_max": lam,
    "sharpness_trace": None if lam is None else 10 * lam,
  }


def test_rows_for_the_asked_epochs_and_the_final_sharpness(tmp_path, capsys):
  _write(tmp_path, "sam", [_record(1, 0.25), _record(2, 0.375, lam=12.345)])
  assert decomposition_table.main([str(tmp_path), "--epochs", "2", "7"]) == 0
  out = capsys.readouterr().out
  # Percentages to one decimal, ratios to three, a quantity that could not be measured as n/a.
  assert "| sam_seed0 | 2 | 50.0 | 37.5 | 50.0 | 0.500 | n/a | 0.500 | 0.500 |" in out
  assert "| sam_seed0 | 1 |" not in out and "| 7 |" not in out
  assert "| sam_seed0 | 12.35 | 123.5 |" in out


def test_mean_pools_the_seeds_of_each_run(tmp_path, capsys):
  _write(tmp_path, "sam", [_record(1, 0.25), _record(2, 0.25, lam=10.0)], seed=3)
  _write(tmp_path, "sam", [_record(1, 0.35), _record(2, 0.35, lam=14.0)], seed=4)
  assert decomposition_table.main([str(tmp_path), "--epochs", "1", "--mean"]) == 0
  out = capsys.readouterr().out
  # Mean ± sample std over the two seeds: 30 ± 7.07 points, eigenvalue 12 ± 2.83, trace 120 ± 28.3.
  assert "| sam (2) | 1 | 50.0 ± 0.0 | 30.0 ± 7.1 | 50.0 ± 0.0 |" in out
  assert "| sam (2) | 12.00 ± 2.83 | 120.0 ± 28.3 |" in out
  # The clean part's weight is a column of its own.
  assert out.splitlines()[0].endswith("| clean weight SAM | clean weight SANER |")


def test_runs_without_the_decomposition_are_one_line_errors(tmp_path, capsys):
  assert decomposition_table.main([str(tmp_path)]) == 2
  assert "no <run>_seed<k>/metrics.jsonl" in capsys.readouterr().err
  _write(tmp_path, "sgd", [{"epoch": 1, "train_loss": 1.0}])
  assert decomposition_table.main([str(tmp_path)]) == 2
  assert "--log_decomposition true" in capsys.readouterr().err

"""Grid search on the validation set: ``python -m saner_jax.train tune``.

Each run (``sgd``, ``sam``, ``saner``, any name ``compare`` takes) gets its
own grid over any trainer flags; every grid point trains once per seed, and
a point's score is its **mean best validation accuracy over the seeds**
(``best_val_acc`` of each run's summary, so the runs need ``--val_examples``).
The test set is read for the report only: nothing is chosen on it.

    python -m saner_jax.train tune --config fashion_mnist_quick --val_examples 500 \\
        --runs sam saner --grid rho=0.05,0.1,0.2 saner:alpha=0.25,0.5,0.75 \\
        --seeds 0 1 2 --out_dir runs/tune

A grid entry ``FLAG=V1,V2,...`` applies to every run, ``RUN:FLAG=...`` to
that run alone; each run's grid is the product of its entries. The outputs,
under ``--out_dir``:

- ``<run>/<point>_seed<k>/``: each training run, as the trainer writes it;
- ``tune.db``: the Optuna study of each run (SQLite): one trial per grid
  point, its value the score, the per-seed metrics as user attributes;
- ``tune.md``: per run, every point's validation and test numbers side by
  side, the chosen one marked;
- ``<run>.yaml``: the chosen point's whole config, which ``--config``
  accepts: it retrains that run's first seed exactly (another ``--seed`` or
  ``--out_dir`` on the command line overrides it).

Stopped at any point (Ctrl-C, a kill), the same command resumes: finished
points are read from the study, finished runs from their ``summary.json``,
and an interrupted run resumes from its checkpoint. A store made for another
grid, runs, seeds or base config is refused, naming what differs.

Why Optuna, and why its storage rather than its grid sampler: Optuna keeps
the trials in a SQLite file that survives a kill and that its tools
(``optuna-dashboard``, pandas export) read; its ``GridSampler`` however
counts a failed or interrupted point as visited and never retries it, so the
points are enqueued here, each once, until each has a complete trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import yaml

from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError, TrainConfig
from saner_jax.train.run_dir import RunDir

STORE = "tune.db"
TABLE = "tune.md"
# Flags a grid may not range over: they name the run, not its training.
_NOT_TUNABLE = ("seed", "out_dir", "resume", "progress")
# The per-seed numbers a trial keeps (summary keys).
_KEPT = ("best_val_acc", "test_acc_at_best_val", "last_test_acc", "mean_last5_test_acc", "best_test_acc")


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point of one run."""

  run: str
  values: tuple[tuple[str, Any], ...]  # (flag, value), in the grid's flag order

  @property
  def name(self) -> str:
    """A directory name: ``rho0.1_alpha0.5`` (``default`` for an empty grid)."""
    return "_".join(f"{flag}{value}" for flag, value in self.values) or "default"

  def params(self) -> dict[str, Any]:
    return dict(self.values)


def parse_grid(entries: Sequence[str], runs: Sequence[str], option: str = "--grid") -> dict[str, dict[str, tuple]]:
  """``{run: {flag: values}}`` from ``[RUN:]FLAG=V1,V2,...`` entries; the values coerced to the flag's type.

  ``option`` names the command-line option in errors (compare's ``--set`` reads the same form).
  """
  grids: dict[str, dict[str, tuple]] = {run: {} for run in runs}
  for entry in entries:
    target, colon, assignment = entry.rpartition(":") if ":" in entry.split("=")[0] else ("", "", entry)
    flag, equals, listed = assignment.partition("=")
    flag = flag.strip().removeprefix("--")
    if not equals or not flag or not listed:
      raise ConfigError(f"{option}: {entry!r} is not [RUN:]FLAG=V1,V2,... (for example saner:alpha=0.25,0.5)")
    if flag not in config_lib.field_names():
      raise ConfigError(f"{option}: unknown flag {flag!r} in {entry!r}; it takes the trainer's flags (--help)")
    if flag in _NOT_TUNABLE:
      raise ConfigError(f"{option}: {flag} names the run, not its training; give seeds with --seeds")
    if colon and target not in grids:
      raise ConfigError(f"{option}: {entry!r} names run {target!r}, which is not one of --runs {list(runs)}")
    values = tuple(config_lib.coerce(flag, v.strip()) for v in listed.split(","))
    if len(set(values)) != len(values):
      raise ConfigError(f"{option}: {entry!r} lists a value twice")
    for run in [target] if colon else runs:
      if flag in grids[run]:
        raise ConfigError(f"{option}: {flag} is given twice for run {run!r}")
      grids[run][flag] = values
  return grids


def points(run: str, grid: dict[str, tuple]) -> list[Point]:
  """The product of ``grid``'s values, the first flag varying slowest."""
  flags = list(grid)
  return [Point(run, tuple(zip(flags, combo))) for combo in itertools.product(*(grid[f] for f in flags))]


def point_config(base: TrainConfig, point: Point, seed: int, out_dir: pathlib.Path) -> TrainConfig:
  """The validated config of ``point`` at ``seed``, training into ``out_dir/<run>/<point>_seed<seed>``."""
  values = {**config_lib.run_name_values(point.run), **point.params()}
  run_dir = out_dir / point.run / f"{point.name}_seed{seed}"
  try:
    return config_lib.from_mapping({**values, "seed": seed, "out_dir": str(run_dir)}, base).validate()
  except ConfigError as e:
    raise ConfigError(f"--grid: run {point.run} at {point.name}: {e}") from None


def _study_identity(base: TrainConfig, grid: dict[str, tuple], seeds: Sequence[int]) -> dict[str, Any]:
  shared = {k: v for k, v in base.to_dict().items() if k not in ("out_dir", "seed", "progress")}
  return {"grid": {k: list(v) for k, v in grid.items()}, "seeds": list(seeds), "base": shared}


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  out = []
  for part in ("grid", "seeds"):
    if stored.get(part) != wanted[part]:
      out.append(f"{part} {stored.get(part)} -> {wanted[part]}")
  base_stored = stored.get("base", {})
  out += [
    f"{k} {base_stored.get(k)!r} -> {v!r}"
    for k, v in wanted["base"].items()
    if k in base_stored and base_stored[k] != v
  ]
  return out


def _open_study(store: pathlib.Path, run: str, identity: dict[str, Any]):
  """The run's study in ``store``, created or checked against ``identity``; stale running trials failed."""
  import optuna
  from optuna.trial import TrialState

  optuna.logging.set_verbosity(logging.WARNING)
  storage = optuna.storages.RDBStorage(f"sqlite:///{store.resolve()}")
  study = optuna.create_study(study_name=run, storage=storage, direction="maximize", load_if_exists=True)
  stored = study.user_attrs.get("identity")
  if stored is None:
    study.set_user_attr("identity", identity)
  elif differing := _differences(stored, identity):
    raise ConfigError(
      f"--out_dir: {store} holds a tuning of {run} with another setup ({'; '.join(differing)}); "
      "choose another --out_dir, or repeat the first command's flags"
    )
  # One process tunes an out_dir (its lock), so a trial still running or queued was killed.
  for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
  return study


def _complete_by_params(study) -> dict[str, Any]:
  from optuna.trial import TrialState

  return {json.dumps(t.params, sort_keys=True): t for t in study.get_trials(states=(TrialState.COMPLETE,))}


def _score(summaries: list[dict[str, Any]]) -> float:
  values = [s.get("best_val_acc") for s in summaries]
  present = [v for v in values if v is not None]
  if len(present) < len(values):
    raise ConfigError("tune: the runs have no validation accuracy; pass --val_examples N (N > 0)")
  return float(np.mean(present))


def _mean(values: list[Any]) -> float | None:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if len(present) == len(values) and present else None


def _check_tuning(base: TrainConfig, seeds: Sequence[int]) -> None:
  if not base.val_examples:
    raise ConfigError("tune: pass --val_examples N (N > 0): the points are chosen on a validation set")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds: {list(seeds)} lists a seed twice")


def _train_with_the_loop(config: TrainConfig, resume: bool) -> dict[str, Any]:
  from saner_jax.train import loop

  return loop.train(config, resume=resume)


def tune(
  base: TrainConfig,
  runs: Sequence[str],
  grid_entries: Sequence[str],
  seeds: Sequence[int],
  *,
  train: Callable[[TrainConfig, bool], dict[str, Any]] | None = None,
  say: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
  """Tunes each run on its grid; returns ``{run: {"point", "score", "config"}}`` and writes the outputs.

  ``train(config, resume)`` trains one run and returns its summary
  (default: :func:`saner_jax.train.loop.train`).
  """
  from optuna.distributions import CategoricalDistribution

  _check_tuning(base, seeds)
  train = train or _train_with_the_loop
  out_dir = pathlib.Path(base.out_dir)
  grids = parse_grid(grid_entries, runs)
  plan = {run: points(run, grids[run]) for run in runs}
  for run_points in plan.values():  # every config checked before anything trains
    for point in run_points:
      point_config(base, point, seeds[0], out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  studies = {run: _open_study(out_dir / STORE, run, _study_identity(base, grids[run], seeds)) for run in runs}

  total = sum(len(p) for p in plan.values()) * len(seeds)
  done = 0
  for run, run_points in plan.items():
    study = studies[run]
    complete = _complete_by_params(study)
    distributions = {flag: CategoricalDistribution(values) for flag, values in grids[run].items()}
    for point in run_points:
      if json.dumps(point.params(), sort_keys=True) in complete:
        done += len(seeds)
        continue
      study.enqueue_trial(point.params(), skip_if_exists=False)
      trial = study.ask(distributions)
      try:
        summaries = []
        for seed in seeds:
          config = point_config(base, point, seed, out_dir)
          run_dir = RunDir(config.out_dir)
          summary = run_dir.read_summary(command="tune")
          if summary is None:
            summary = train(config, run_dir.config.exists())
          summaries.append(summary)
          done += 1
          say(f"[{done}/{total}] {run} {point.name} seed {seed}: val {100 * (summary.get('best_val_acc') or 0):.2f}%")
        score = _score(summaries)
      except BaseException:
        study.tell(trial, state=_failed())
        raise
      for key in _KEPT:
        trial.set_user_attr(key, [s.get(key) for s in summaries])
      trial.set_user_attr("memorised", [(s.get("final") or {}).get("noisy_memorised") for s in summaries])
      study.tell(trial, score)
  return write_outputs(base, plan, studies, seeds)


def _failed():
  from optuna.trial import TrialState

  return TrialState.FAIL


def _pct(value: float | None) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def write_outputs(
  base: TrainConfig, plan: dict[str, list[Point]], studies: dict[str, Any], seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
  """Writes ``tune.md`` and each run's chosen ``<run>.yaml``; returns the choices."""
  out_dir = pathlib.Path(base.out_dir)
  chosen: dict[str, dict[str, Any]] = {}
  lines = [
    f"# Tuning on the validation set: {base.dataset}, {base.noise_description}, {base.model}, {base.epochs} epochs",
    "",
    f"Score: the mean over seeds {list(seeds)} of the best validation accuracy ({base.val_examples} held-out "
    f"examples, {'true' if base.val_clean else 'noisy'} labels). The test columns are read, never chosen on.",
  ]
  for run, run_points in plan.items():
    by_params = _complete_by_params(studies[run])
    best = max(by_params.values(), key=lambda t: t.value) if by_params else None
    lines += [
      "",
      f"## {run}",
      "",
      "| point | val % | test % @ best val | last test % | memorised % | chosen |",
      "|---|---|---|---|---|---|",
    ]
    for point in run_points:
      trial = by_params.get(json.dumps(point.params(), sort_keys=True))
      if trial is None:
        lines.append(f"| {point.name} | not run | | | | |")
        continue
      attrs = trial.user_attrs
      lines.append(
        f"| {point.name} | {_pct(trial.value)} | {_pct(_mean(attrs['test_acc_at_best_val']))} | "
        f"{_pct(_mean(attrs['last_test_acc']))} | {_pct(_mean(attrs['memorised']))} | "
        f"{'**yes**' if trial is best else ''} |"
      )
    if best is None:
      continue
    point = next(p for p in run_points if p.params() == best.params)
    config = point_config(base, point, seeds[0], out_dir)
    config.out_dir = str(out_dir / f"{run}_chosen")
    (out_dir / f"{run}.yaml").write_text(
      f"# Chosen by `tune` for {run}: {point.name} (mean best validation accuracy {_pct(best.value)}%).\n"
      f"# It retrains seed {seeds[0]}; pass --seed and --out_dir for others.\n"
      + yaml.safe_dump(config.to_sections(), sort_keys=False)
    )
    chosen[run] = {"point": point.params(), "score": best.value, "config": str(out_dir / f"{run}.yaml")}
  (out_dir / TABLE).write_text("\n".join(lines) + "\n")
  return chosen


def main(args: Any) -> dict[str, dict[str, Any]]:
  """The ``tune`` subcommand on parsed flags: one line per finished run on stderr, the table at the end."""
  base = config_lib.from_args(args)
  if base.progress == "auto" and not sys.stderr.isatty():
    base.progress = "none"  # a line per run, not per epoch, in a log file
  result = tune(base, args.runs, args.grid, args.seeds, say=lambda line: print(line, file=sys.stderr, flush=True))
  print((pathlib.Path(base.out_dir) / TABLE).read_text(), flush=True)
  for run, choice in result.items():
    print(f"{run}: chose {choice['point']} -> {choice['config']}", flush=True)
  return result

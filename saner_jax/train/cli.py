"""Command line: ``python -m saner_jax.train`` (train), ``... compare`` and ``... tune``.

Train one run::

  python -m saner_jax.train --config fashion_mnist_quick --optimizer saner --out_dir runs/saner
  python -m saner_jax.train --config runs/saner/config.yaml --resume

Run (or collect) several optimizers and seeds, then draw them on one figure
with a markdown table::

  python -m saner_jax.train compare --config fashion_mnist_quick \\
      --runs sgd sam saner --seeds 0 1 2 --out_dir runs/compare
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from saner_jax.train import config as config_lib
from saner_jax.train import data, folders, registry
from saner_jax.train.config import ConfigError
from saner_jax.train.run_dir import ComparisonDir, RunDir

_TRAIN_EXAMPLES = """\
Flags override the --config file's values; booleans take true/false. Examples:
  python -m saner_jax.train --config fashion_mnist_quick --optimizer saner --out_dir runs/saner
  python -m saner_jax.train --config runs/saner/config.yaml --resume
  python -m saner_jax.train compare --help    (several optimizers and seeds on one figure)
  python -m saner_jax.train tune --help       (a grid search chosen on a validation set)
"""
_COMPARE_EXAMPLES = """\
Each run trains into OUT_DIR/<run>_seed<seed> (or is collected there when it
has finished); the figure and table go to OUT_DIR/compare.png and compare.md.
Example:
  python -m saner_jax.train compare --config fashion_mnist_quick \\
      --runs sgd sam saner --seeds 0 1 2 --out_dir runs/compare
"""


class _Parser(argparse.ArgumentParser):
  """argparse, with a bad flag reported as the CLI's other mistakes are: one ``error:`` line, not usage first.

  A value that reads as a negative number, exponent or ``-inf`` included
  (``--weight_decay -1e-4``), is a value, not a flag; argparse's own test
  knows only ``-1`` and ``-.5``. The config's checks then say what is wrong with it.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _parser(prog: str, usage: str, description: str, epilog: str) -> argparse.ArgumentParser:
  return _Parser(
    prog=prog,
    usage=usage,  # argparse's own lists every flag
    description=description,
    epilog=epilog,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )


def _train_parser() -> argparse.ArgumentParser:
  parser = _parser(
    "python -m saner_jax.train",
    "%(prog)s [--config FILE|PRESET] [--FLAG VALUE ...] [--resume] [--debug]",
    "Train a Flax ResNet with SGD, SAM-family optimizers and SANER on noisy labels.",
    _TRAIN_EXAMPLES,
  )
  run_control = config_lib.add_flags(parser)["run"]
  run_control.add_argument(
    "--resume", action="store_true", help="continue the run in --out_dir from its last checkpoint"
  )
  _add_debug_flag(run_control)
  return parser


def _add_debug_flag(group) -> None:
  group.add_argument("--debug", action="store_true", help="print the full traceback with an error (for bug reports)")


def _compare_parser() -> argparse.ArgumentParser:
  parser = _parser(
    "python -m saner_jax.train compare",
    "%(prog)s [--runs RUN ...] [--seeds SEED ...] [--set RUN:FLAG=VALUE ...] [--collect_only] "
    "[--config FILE|PRESET] [--FLAG VALUE ...]",
    "Run or collect several optimizers (x seeds) and compare them on one figure and table. "
    "The config flags set the runs' shared base; --set changes it for one run.",
    _COMPARE_EXAMPLES,
  )
  comparison = parser.add_argument_group("comparison")
  comparison.add_argument(
    "--runs",
    nargs="+",
    default=["sgd", "sam", "saner"],
    metavar="RUN",
    help="the runs: OPT, OPT+saner, saner, with _head for SANER on the classifier only, OPT+grX (the clean "
    "gradient on groups X) or OPT+onlyX (SAM's gradient on groups X only), X letters from ABC; OPT one of: "
    f"{', '.join(registry.perturbations())} (default: sgd sam saner)",
  )
  comparison.add_argument(
    "--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="one run of each per seed (default: 0)"
  )
  comparison.add_argument(
    "--set",
    nargs="+",
    default=[],
    metavar="RUN:FLAG=VALUE",
    help="a flag's value for one run, over the shared base: each method at its own tuned setting, e.g. "
    "sgd:lr=0.02 (FLAG=VALUE without RUN: for every run)",
  )
  comparison.add_argument(
    "--collect_only", action="store_true", help="only collect finished runs under --out_dir; train none"
  )
  groups = config_lib.add_flags(parser)
  _add_debug_flag(groups["run"])
  return parser


_TUNE_EXAMPLES = """\
Each grid point trains once per seed into OUT_DIR/<run>/<point>_seed<k>; a point's score is its
mean best validation accuracy (so --val_examples is required). Writes OUT_DIR/tune.md (every point,
validation and test side by side), OUT_DIR/<run>.yaml (the chosen config, for --config) and
OUT_DIR/tune.db (the Optuna store). The same command resumes where it stopped. Example:
  python -m saner_jax.train tune --config fashion_mnist_quick --val_examples 500 \\
      --runs sam saner --grid rho=0.05,0.1,0.2 saner:alpha=0.25,0.5,0.75 --seeds 0 1 2 --out_dir runs/tune
"""


def _tune_parser() -> argparse.ArgumentParser:
  parser = _parser(
    "python -m saner_jax.train tune",
    "%(prog)s --runs RUN ... --grid [RUN:]FLAG=V1,V2,... ... [--seeds SEED ...] [--config FILE|PRESET] "
    "[--FLAG VALUE ...]",
    "Grid search over any trainer flags, each run's setting chosen by mean validation accuracy over seeds. "
    "The config flags set the runs' shared base.",
    _TUNE_EXAMPLES,
  )
  tuning = parser.add_argument_group("tuning")
  tuning.add_argument("--runs", nargs="+", default=["sgd", "sam", "saner"], metavar="RUN", help="as for compare")
  tuning.add_argument(
    "--grid",
    nargs="+",
    default=[],
    metavar="[RUN:]FLAG=V1,V2",
    help="the values of a flag, for every run or for RUN alone; each run's grid is the product of its entries",
  )
  tuning.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="seeds per point (default: 0)")
  groups = config_lib.add_flags(parser)
  _add_debug_flag(groups["run"])
  return parser


def run_config(
  name: str,
  seed: int,
  base: config_lib.TrainConfig,
  out_dir: pathlib.Path,
  overrides: dict[str, Any] | None = None,
) -> config_lib.TrainConfig:
  """The config of one comparison entry, ``name`` as :func:`config.run_name_values` reads it.

  ``overrides`` (compare's ``--set``) change the base for this run only.
  An error in a value the name sets names the run (``--runs: 'adam': ...``),
  not a flag the user never passed.
  """
  values = config_lib.run_name_values(name)
  try:
    return config_lib.from_mapping(
      {**values, **(overrides or {}), "seed": seed, "out_dir": str(ComparisonDir(out_dir).run(name, seed))},
      base,
    ).validate()
  except ConfigError as e:
    flag = str(e).partition(": ")[0].removeprefix("--")
    if flag in values:
      raise ConfigError(f"--runs: {name!r}: {str(e).partition(': ')[2]}") from None
    raise


def _check_same_settings(cfg: config_lib.TrainConfig, run_dir: RunDir) -> None:
  """Refuses a run directory made under other settings than ``cfg`` (its summary's config, else its checkpoint's)."""
  from saner_jax.train import loop

  summary = run_dir.read_summary()
  if summary is None and not loop._holds_run(run_dir.path):  # nothing, or a start that failed: nothing to reuse
    return
  identity = (summary["config"], str(run_dir.summary)) if summary and "config" in summary else None
  identity = identity or loop.run_identity(run_dir.path)
  if identity is None:
    return
  changed = loop.config_changes(identity[0], cfg)
  if changed:
    raise ConfigError(
      f"compare: {run_dir} holds a run made with other settings (as {identity[1]} records): {changed}; "
      "pass its settings to collect it, or choose another --out_dir for these"
    )


def run_settings(entries: list[str], runs: list[str]) -> dict[str, dict[str, Any]]:
  """``{run: {flag: value}}`` from compare's ``--set`` entries (``[RUN:]FLAG=VALUE``, one value each)."""
  from saner_jax.train import tune

  settings = tune.parse_grid(entries, runs, option="--set")
  for run, flags in settings.items():
    for flag, values in flags.items():
      if len(values) != 1:
        raise ConfigError(f"--set: {run}:{flag} has {len(values)} values; give one (tune searches several)")
  return {run: {flag: values[0] for flag, values in flags.items()} for run, flags in settings.items()}


def run_or_collect(
  base: config_lib.TrainConfig,
  runs: list[str],
  seeds: list[int],
  collect_only: bool = False,
  settings: Sequence[str] = (),
) -> tuple[dict, dict]:
  """Trains (or resumes) each run x seed under ``base.out_dir`` unless finished.

  ``settings``: compare's ``--set`` entries, each run's own values over ``base``.
  Returns ``(summaries, histories)``, each ``{run name: [one per seed]}``.
  """
  from saner_jax.train import loop

  out_dir = pathlib.Path(base.out_dir)
  runs, seeds = list(dict.fromkeys(runs)), list(dict.fromkeys(seeds))  # a repeat is the same run
  overrides = run_settings(list(settings), runs)
  configs = {name: [run_config(name, seed, base, out_dir, overrides[name]) for seed in seeds] for name in runs}
  # Every run directory is checked before any trains: a run made under other
  # settings is never collected, nor resumed under these.
  for seed_configs in configs.values():
    for cfg in seed_configs:
      _check_same_settings(cfg, RunDir(cfg.out_dir))
  summaries: dict[str, list[dict[str, Any]]] = {}
  histories: dict[str, list[list[dict[str, Any]]]] = {}
  for name, seed_configs in configs.items():
    summaries[name], histories[name] = [], []
    for cfg in seed_configs:
      run_dir = RunDir(cfg.out_dir)
      summary = run_dir.read_summary()
      if summary is None:
        if collect_only:
          raise ConfigError(f"--collect_only: {run_dir.path} has no finished run")
        trained = loop.train(cfg, resume=run_dir.config.exists())
        summary = run_dir.read_summary()
        if summary is None:  # only process 0 writes summary.json: elsewhere, the summary train returned
          summary = trained
      summaries[name].append(summary)
      histories[name].append(run_dir.read_history())
  return summaries, histories


def write_comparison(base: config_lib.TrainConfig, summaries: dict, histories: dict, command: str) -> str:
  """Writes ``compare.png`` and ``compare.md`` into ``base.out_dir``; returns the table."""
  from saner_jax.train import reporting

  out = ComparisonDir(base.out_dir)
  title = f"{base.dataset}, {base.noise_description}, {base.model}, {base.epochs} epochs"
  reporting.plot_compare(histories, out.figure, title=title)
  table = reporting.markdown_table(summaries)
  out.table.write_text(
    f"# {title}\n\n{table}\nCommand: `{command}`\n\ngit revision: {reporting.git_revision()}\n\n"
    f"![curves]({out.figure.name})\n"
  )
  return table


def compare(args: argparse.Namespace) -> dict:
  base = config_lib.from_args(args)
  summaries, histories = run_or_collect(base, args.runs, args.seeds, args.collect_only, args.set)
  command = "python -m saner_jax.train compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])
  table = write_comparison(base, summaries, histories, command)
  out = ComparisonDir(base.out_dir)
  print("\n" + table + f"\nfigure: {out.figure}\ntable: {out.table}", flush=True)
  return summaries


def _resume_where_pointed(args: argparse.Namespace, config: config_lib.TrainConfig) -> config_lib.TrainConfig:
  """``--config DIR/config.yaml --resume`` resumes the run in DIR, wherever its ``out_dir`` says it was.

  A run directory that was moved, or whose relative ``out_dir`` is resumed
  from another working directory, resumes where it is, never in a new
  directory at the old place. An explicit ``--out_dir`` wins.
  """
  if "out_dir" in vars(args) or not args.config:
    return config
  here = pathlib.Path(args.config).parent
  if not (pathlib.Path(args.config).is_file() and RunDir(here).looks_like_a_run()):
    return config
  if pathlib.Path(config.out_dir).absolute() != here.absolute():
    print(f"resuming the run in {here}, where --config is (its config names {config.out_dir})", flush=True)
    config.out_dir = str(here)
  return config


def _report(error: BaseException, debug: bool, message: str | None = None) -> None:
  """One ``error:`` line for the user's own mistakes; the traceback too with --debug."""
  if debug:
    traceback.print_exception(error)
  print(f"error: {message or error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, *, quiet_refused_writes: bool = False, handle_signals: bool = False) -> int:
  """Runs the command; returns the exit status (2 for a bad flag or config, 1 for other user errors,
  130 or 143 after SIGINT or SIGTERM).

  Errors that are the user's (flags, configs, data, an out_dir in use, a run
  that diverged, a full disk, no usable checkpoint) print one line; anything
  else is a bug and raises with its traceback. ``quiet_refused_writes``
  (unless ``--debug``) applies :func:`saner_jax.train.checkpointing.quiet_refused_writes`
  once the flags are parsed. ``handle_signals`` installs the CLI's SIGINT
  and SIGTERM handling (:mod:`saner_jax._cli_signals`).
  """
  from saner_jax import _cli_signals

  argv = sys.argv[1:] if argv is None else argv
  debug = "--debug" in argv
  command = argv[0] if argv[:1] in (["compare"], ["tune"]) else "train"
  try:
    if command == "compare":
      args = _compare_parser().parse_args(argv[1:])
    elif command == "tune":
      args = _tune_parser().parse_args(argv[1:])
    else:
      args = _train_parser().parse_args(argv[1:] if argv[:1] == ["train"] else argv)
  except ConfigError as e:
    _report(e, debug)
    return 2
  # Only now: --help and a bad flag answer without loading flax and orbax.
  from saner_jax.train import checkpointing, loop

  if quiet_refused_writes and not debug:
    checkpointing.quiet_refused_writes()
  try:
    if handle_signals:
      _cli_signals.install()  # raises a signal recorded while the modules imported
    _run_command(command, args)
  except ConfigError as e:
    _report(e, debug)
    return 2
  except (data.DatasetNotFoundError, data.IdxFormatError, folders.LayoutError, checkpointing.CheckpointError) as e:
    _report(e, debug)
    return 1
  except loop.RunStopped as e:
    _report(e, debug)
    return e.exit_code
  except (KeyboardInterrupt, Exception) as e:  # an interrupt before the first epoch began, or a bug
    code = _interrupted_before_training(e, debug)
    if code is None:
      raise
    return code
  return 0


def _run_command(command: str, args: argparse.Namespace) -> None:
  """Runs ``compare``, ``tune`` or a training run with the parsed flags."""
  from saner_jax.train import loop

  if command == "compare":
    compare(args)
  elif command == "tune":
    from saner_jax.train import tune

    tune.main(args)
  else:
    config = config_lib.from_args(args)
    loop.train(_resume_where_pointed(args, config) if args.resume else config, resume=args.resume)


def _interrupted_before_training(error: BaseException, debug: bool) -> int | None:
  """Reports a SIGINT or SIGTERM that came before the first epoch began; returns the exit status.

  ``error`` is the interrupt, or an error that C code made of it; for any
  other error (a bug) it reports nothing and returns None.
  """
  from saner_jax import _cli_signals
  from saner_jax.train import loop

  interrupt = _cli_signals.behind(error, stop_at=(loop.RunStopped,))  # after RunStopped: reported already
  if interrupt is None:
    return None
  _cli_signals.acknowledge()
  signal = interrupt.name if isinstance(interrupt, _cli_signals.Interrupted) else "SIGINT"
  what = "interrupted" if signal == "SIGINT" else f"terminated by {signal}"
  _report(error, debug, f"{what} before training began; nothing was trained")
  return getattr(interrupt, "exit_code", 130)


def run() -> None:
  """The program (``python -m saner_jax.train``, ``saner-train``): exits with :func:`main`'s status.

  Without ``--debug``, the noise of a save the system refused is dropped
  for the life of the process (:func:`saner_jax.train.checkpointing.quiet_refused_writes`):
  the error line says it all. Ctrl-C and SIGTERM end it with one line and
  exit status 130 or 143, at any moment (:mod:`saner_jax._cli_signals`).
  """
  from saner_jax import _cli_signals

  code = main(quiet_refused_writes=True, handle_signals=True)
  signum = _cli_signals.received()
  if signum is not None and code == 0:  # after the last point that checks: the work is done, the signal still counts
    print("error: interrupted as the command ended; its results are complete", file=sys.stderr)
    code = 128 + signum
  if signum is not None:
    # An XLA thread may still be compiling: leave without the interpreter's teardown, which could crash.
    _cli_signals.exit_now(code)
  sys.exit(code)


if __name__ == "__main__":
  run()

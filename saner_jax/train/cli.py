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
import json
import pathlib
import shlex
import sys
import traceback
from typing import NoReturn

from saner_jax.train import config as config_lib
from saner_jax.train import data, folders
from saner_jax.train.config import ConfigError

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
  """argparse, with a bad flag reported as the CLI's other mistakes are: one ``error:`` line, not usage first."""

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
  run_control = config_lib.add_flags(parser)[config_lib.GROUP_OUTPUT]
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
    "%(prog)s [--runs RUN ...] [--seeds SEED ...] [--collect_only] [--config FILE|PRESET] [--FLAG VALUE ...]",
    "Run or collect several optimizers (x seeds) and compare them on one figure and table. "
    "The config flags set the runs' shared base.",
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
    f"{', '.join(config_lib.PERTURBATIONS)} (default: sgd sam saner)",
  )
  comparison.add_argument(
    "--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="one run of each per seed (default: 0)"
  )
  comparison.add_argument(
    "--collect_only", action="store_true", help="only collect finished runs under --out_dir; train none"
  )
  groups = config_lib.add_flags(parser)
  _add_debug_flag(groups[config_lib.GROUP_OUTPUT])
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
  _add_debug_flag(groups[config_lib.GROUP_OUTPUT])
  return parser


def run_config(name: str, seed: int, base: config_lib.TrainConfig, out_dir: pathlib.Path) -> config_lib.TrainConfig:
  """The config of one comparison entry, ``name`` as :func:`config.run_name_values` reads it."""
  values = config_lib.run_name_values(name)
  return config_lib.from_mapping(
    {**values, "seed": seed, "out_dir": str(out_dir / f"{name}_seed{seed}")},
    base,
  ).validate()


def run_or_collect(
  base: config_lib.TrainConfig, runs: list[str], seeds: list[int], collect_only: bool = False
) -> tuple[dict, dict]:
  """Trains (or resumes) each run x seed under ``base.out_dir`` unless finished.

  Returns ``(summaries, histories)``, each ``{run name: [one per seed]}``.
  """
  from saner_jax.train import loop

  out_dir = pathlib.Path(base.out_dir)
  configs = {name: [run_config(name, seed, base, out_dir) for seed in seeds] for name in runs}
  summaries, histories = {}, {}
  for name, seed_configs in configs.items():
    summaries[name], histories[name] = [], []
    for cfg in seed_configs:
      run_dir = pathlib.Path(cfg.out_dir)
      if not (run_dir / "summary.json").exists():
        if collect_only:
          raise ConfigError(f"--collect_only: {run_dir} has no finished run")
        loop.train(cfg, resume=(run_dir / "config.yaml").exists())
      summaries[name].append(json.loads((run_dir / "summary.json").read_text()))
      histories[name].append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
  return summaries, histories


def write_comparison(base: config_lib.TrainConfig, summaries: dict, histories: dict, command: str) -> str:
  """Writes ``compare.png`` and ``compare.md`` into ``base.out_dir``; returns the table."""
  from saner_jax.train import reporting

  out_dir = pathlib.Path(base.out_dir)
  title = f"{base.dataset}, {base.noise_description}, {base.model}, {base.epochs} epochs"
  reporting.plot_compare(histories, out_dir / "compare.png", title=title)
  table = reporting.markdown_table(summaries)
  (out_dir / "compare.md").write_text(
    f"# {title}\n\n{table}\nCommand: `{command}`\n\ngit revision: {reporting.git_revision()}\n\n![curves](compare.png)\n"
  )
  return table


def compare(args: argparse.Namespace) -> dict:
  base = config_lib.from_args(args)
  summaries, histories = run_or_collect(base, args.runs, args.seeds, args.collect_only)
  command = "python -m saner_jax.train compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])
  table = write_comparison(base, summaries, histories, command)
  out_dir = pathlib.Path(base.out_dir)
  print("\n" + table + f"\nfigure: {out_dir / 'compare.png'}\ntable: {out_dir / 'compare.md'}", flush=True)
  return summaries


def _report(error: BaseException, debug: bool, message: str | None = None) -> None:
  """One ``error:`` line for the user's own mistakes; the traceback too with --debug."""
  if debug:
    traceback.print_exception(error)
  print(f"error: {message or error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the command; returns the exit status (2 for a bad flag or config, 1 for other user errors).

  Errors that are the user's (flags, configs, data, an out_dir in use, a run
  that diverged, a full disk, no usable checkpoint) print one line; anything
  else is a bug and raises with its traceback.
  """
  from saner_jax.train import checkpointing, loop

  argv = sys.argv[1:] if argv is None else argv
  debug = "--debug" in argv
  try:
    if argv[:1] == ["compare"]:
      compare(_compare_parser().parse_args(argv[1:]))
    elif argv[:1] == ["tune"]:
      from saner_jax.train import tune

      tune.main(_tune_parser().parse_args(argv[1:]))
    else:
      args = _train_parser().parse_args(argv[1:] if argv[:1] == ["train"] else argv)
      loop.train(config_lib.from_args(args), resume=args.resume)
  except ConfigError as e:
    _report(e, debug)
    return 2
  except (data.DatasetNotFoundError, data.IdxFormatError, folders.LayoutError, checkpointing.CheckpointError) as e:
    _report(e, debug)
    return 1
  except loop.RunStopped as e:
    _report(e, debug)
    return e.exit_code
  except KeyboardInterrupt as e:  # before the first epoch began
    _report(e, debug, "interrupted before training began; nothing was trained")
    return 130
  return 0


def run() -> None:
  """The program (``python -m saner_jax.train``, ``saner-train``): exits with :func:`main`'s status.

  Without ``--debug``, the noise of a save the system refused is dropped
  for the life of the process (:func:`saner_jax.train.checkpointing.quiet_refused_writes`):
  the error line says it all.
  """
  from saner_jax.train import checkpointing

  if "--debug" not in sys.argv[1:]:
    checkpointing.quiet_refused_writes()
  sys.exit(main())


if __name__ == "__main__":
  run()

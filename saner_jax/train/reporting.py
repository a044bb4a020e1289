"""What a run shows: metrics files, epoch lines, curves (PNG) and comparison tables."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import pathlib
import platform
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from saner_jax.train import registry
from saner_jax.train.run_dir import RunDir

# What the figures show, panel by panel: (metric key, title).
PANELS = (
  ("test_acc", "test accuracy"),
  ("clean_acc", "clean train samples: fit to their label"),
  ("noisy_memorised", "noisy train samples: fit to the WRONG label"),
  ("noisy_true", "noisy train samples: fit to the true label"),
  ("group_B", "group B: share of coordinates SAM shrank"),
)
# The mechanism probe's (saner_jax.train.probe), drawn when a run logged them;
# sharpness is not a percentage.
PROBE_PANELS = (
  ("decomp_p_B_noisy_dom", "noisy-dominated coordinates: share in group B"),
  ("sharpness_lambda_max", "sharpness: top Hessian eigenvalue (probe batch)"),
)
_UNSCALED = ("sharpness_lambda_max",)


@functools.cache
def git_revision() -> str | None:
  """The checkout's revision when first asked, kept for the life of the process.

  A process runs the code it imported when it started, so a later commit to
  the checkout (during a long ``tune``) must not relabel its runs;
  :func:`saner_jax.train.loop.setup` asks before the first run trains.
  ``+dirty``: tracked files differed from the commit.
  """
  try:
    root = pathlib.Path(__file__).resolve().parents[2]
    rev = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


@functools.cache
def cpu_model() -> str:
  """The host CPU's model name (``/proc/cpuinfo``'s, else the platform's), recorded with each run.

  The same seed and code give the same data, noise and initialisation on any
  machine, but the floating-point kernels (oneDNN's and XLA's) pick their
  instructions by CPU, so runs made on different CPUs differ in the last bits
  and then in their trajectories.
  """
  return _first_cpu().get("model name") or platform.processor() or platform.machine() or "unknown"


def _cpu_fields(text: str) -> dict[str, str]:
  """The first logical CPU's ``key: value`` lines of a ``/proc/cpuinfo`` text (a VM's CPUs are alike)."""
  first = text.strip().split("\n\n", 1)[0]
  return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


@functools.cache
def _first_cpu() -> dict[str, str]:
  try:
    return _cpu_fields(pathlib.Path("/proc/cpuinfo").read_text())
  except OSError:
    return {}


# The /proc/cpuinfo flags by which oneDNN and XLA choose their kernels. Runs
# on two CPUs agree to the last bit only if these agree (and then not
# surely: XLA also tunes to the microarchitecture).
KERNEL_FLAGS = (
  "avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def isa_from_cpuinfo(text: str) -> str | None:
  """``"<vendor_id>: <flags>"``, the kernel-choosing flags of ``KERNEL_FLAGS`` the first CPU has.

  >>> isa_from_cpuinfo("vendor_id : AuthenticAMD\\nflags : fpu sse2 avx2 avx512f")
  'AuthenticAMD: avx2 avx512f'
  """
  return _isa(_cpu_fields(text))


def _isa(fields: dict[str, str]) -> str | None:
  if "flags" not in fields:
    return None
  flags = set(fields["flags"].split())
  return f"{fields.get('vendor_id', 'unknown')}: " + (" ".join(f for f in KERNEL_FLAGS if f in flags) or "none")


def cpu_isa() -> str | None:
  """The host CPU's vendor and kernel-choosing instruction sets, recorded with each run.

  ``None`` where ``/proc/cpuinfo`` has no x86 ``flags`` line (off Linux, or
  on another architecture).

  A VM may name its CPU only "Intel(R) Xeon(R) Processor"; these flags tell
  which kernels ran, and so whether two runs can agree to the last bit.
  """
  return _isa(_first_cpu())


def _replace_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)  # a kill mid-write leaves the previous file whole


def write_results(prefix: str | os.PathLike, record: dict[str, Any], text: str) -> None:
  """Writes a benchmark's ``record`` to ``<prefix>.json`` and its printed report ``text`` to ``<prefix>.txt``.

  The folder is created if needed; each file is replaced whole, never left half-written.
  """
  prefix = pathlib.Path(prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  _replace_text(prefix.with_name(prefix.name + ".json"), json.dumps(record, indent=2) + "\n")
  _replace_text(prefix.with_name(prefix.name + ".txt"), text if text.endswith("\n") else text + "\n")


# The optional loggers: (module imported, extra that installs it).
LOGGERS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def missing_logger(name: str) -> str | None:
  """None when logger ``name`` ("tensorboard" or "wandb") can be imported, else a one-line fix naming the pip command."""
  module, extra = LOGGERS[name]
  if importlib.util.find_spec(module) is not None:
    return None
  return f"needs the {module} package, which is not installed: pip install 'saner_jax[{extra}]'"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
  """The record's numbers (None, the epoch and strings left out): what the loggers plot."""
  return {
    key: value
    for key, value in record.items()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"
  }


class MetricsLog:
  """``metrics.jsonl`` and ``metrics.csv``, always rewritten whole from the history; TensorBoard and W&B optionally.

  Rewriting (atomically) instead of appending keeps the files complete and
  unduplicated across kills and resumes. Each new epoch also goes, as
  scalars at step = epoch, to TensorBoard (``tensorboard/`` under the run's
  folder, written by tensorboardX) and to Weights & Biases, where asked.

  The W&B run's id is kept in ``wandb_run_id`` in the run's folder, so a
  resumed run continues the same W&B run (online; offline, ``wandb sync``
  uploads each piece to it). W&B's mode comes from its own settings: set
  ``WANDB_MODE=offline`` to write the run under ``wandb/`` in the run's
  folder without a network. W&B does not capture the console.

  Args:
    out_dir: the run's folder.
    tensorboard: "auto" (where tensorboardX is installed), "true" or "false".
    wandb: the W&B run's ``project``, ``name`` and ``config`` (keyword
      arguments of ``wandb.init``), or None for no W&B.

  Raises:
    ValueError: a logger was asked for whose package is missing, or W&B
      could not start (no API key online, say); the message says what to do.
  """

  def __init__(self, out_dir: pathlib.Path, tensorboard: str = "auto", wandb: dict[str, Any] | None = None):
    files = RunDir(out_dir)
    self.jsonl = files.metrics
    self.csv = files.metrics_csv
    self.tensorboard = None
    self.wandb = None
    missing = missing_logger("tensorboard")
    if tensorboard == "true" and missing:
      raise ValueError(f"--tensorboard {missing}")
    if tensorboard != "false" and not missing:
      from tensorboardX import SummaryWriter

      # Event files are named by the second they start in: a suffix keeps a
      # resumed run's writer from replacing the previous one's file.
      self.tensorboard = SummaryWriter(str(files.tensorboard), filename_suffix=f".{secrets.token_hex(4)}")
    if wandb is not None:
      self.wandb = _start_wandb(out_dir, wandb)

  def write(self, history: Sequence[dict[str, Any]], tensorboard: bool = True) -> None:
    """Rewrites both files; ``tensorboard`` adds the last record to TensorBoard and W&B."""
    tmp = self.jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
    os.replace(tmp, self.jsonl)
    if history:
      tmp = self.csv.with_suffix(".csv.tmp")
      with tmp.open("w", newline="") as f:
        # Every key of every record, in order of first appearance: a run resumed from an
        # earlier release logs keys its first epochs lack (those cells stay empty).
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
        writer.writeheader()
        writer.writerows(history)
      os.replace(tmp, self.csv)
    if not (tensorboard and history):
      return
    record = history[-1]
    if self.tensorboard is not None:
      for key, value in _scalars(record).items():
        self.tensorboard.add_scalar(key, value, record["epoch"])
      self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log({"epoch": record["epoch"], **_scalars(record)}, step=record["epoch"])

  def close(self) -> None:
    """Flushes and closes TensorBoard's file and ends the W&B run (uploading or writing what it holds)."""
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _start_wandb(out_dir: pathlib.Path, init: dict[str, Any]) -> Any:
  """A W&B run in ``out_dir``, with the id kept in ``out_dir/wandb_run_id`` (reused on resume)."""
  missing = missing_logger("wandb")
  if missing:
    raise ValueError(f"--wandb {missing}")
  import wandb

  id_file = RunDir(out_dir).wandb_run_id
  run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
  id_file.write_text(run_id + "\n")
  try:
    run = wandb.init(
      **init,
      id=run_id,
      resume="allow",
      dir=str(out_dir),
      # The trainer prints its own lines and progress bar; W&B wrapping the
      # console would duplicate them in the run's log.
      settings=wandb.Settings(console="off", silent=True),
    )
  except wandb.Error as e:
    message = " ".join(str(e).split())
    raise ValueError(
      f"--wandb: W&B could not start a run ({message}); run `wandb login`, or set WANDB_MODE=offline"
    ) from None
  mode = "offline" if run.settings.mode == "offline" else "online"
  where = f"written to {run.dir.removesuffix('/files')}; upload it with `wandb sync`" if mode == "offline" else run.url
  print(f"wandb: {mode} run {run.id}: {where}", flush=True)
  return run


def _pct(value) -> str:
  return "  n/a" if value is None else f"{100 * value:5.1f}"


def epoch_line(record: dict[str, Any], epochs: int) -> str:
  groups = "" if record.get("group_B") is None else f" | B {_pct(record['group_B'])}%"
  val = "" if record.get("val_acc") is None else f"val {_pct(record['val_acc'])}% | "
  if record.get("clean_precision") is not None:
    groups += f" | judged clean {_pct(record['clean_fraction'])}%, precision {_pct(record['clean_precision'])}%"
  if record.get("label_accuracy") is not None:
    groups += f" | labels {_pct(record['label_accuracy'])}% right"
  return (
    f"epoch {record['epoch']:>3}/{epochs} | loss {record['train_loss']:.3f} | "
    f"train {_pct(record['train_acc'])}% | clean {_pct(record['clean_acc'])}% | "
    f"noisy->wrong {_pct(record['noisy_memorised'])}% | noisy->true {_pct(record['noisy_true'])}% | "
    f"{val}test {_pct(record['test_acc'])}%{groups} | "
    f"{record['epoch_time_s']:.1f}s"
  )


def _figure(n_panels: int):
  # matplotlib's object API with the Agg canvas, not pyplot: no global figure
  # registry to leak into, no backend switch, and pyplot's import is skipped.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cols = min(n_panels, 3)
  rows = -(-n_panels // cols)
  fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[n_panels:]:
    ax.axis("off")
  return fig, axes.flat[:n_panels]


def plot_run(history: Sequence[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
  plot_compare({title or "run": [history]}, path)


def plot_compare(runs: Mapping[str, Sequence[Sequence[dict[str, Any]]]], path: pathlib.Path, title: str = "") -> None:
  """One figure, one panel per metric, one curve (mean, with a min-max band over seeds) per run.

  Optional panels are added when some run logged them; epochs without a
  value (sharpness between the epochs it is measured) are skipped.
  """
  logged = lambda key: any(r.get(key) is not None for hs in runs.values() for h in hs for r in h)
  # The noise-robust pipelines' own metrics (their registry entries') and the probe's, where logged.
  optional = registry.report("panels") + PROBE_PANELS
  panels = PANELS + tuple(panel for panel in optional if logged(panel[0]))
  fig, axes = _figure(len(panels))
  for ax, (key, panel_title) in zip(axes, panels):
    scale = 1.0 if key in _UNSCALED else 100.0
    for name, histories in runs.items():
      histories = [h for h in histories if h]
      if not histories:
        continue
      length = min(len(h) for h in histories)
      epochs = np.array([r["epoch"] for r in histories[0][:length]])
      values = scale * np.array([[np.nan if r.get(key) is None else r[key] for r in h[:length]] for h in histories])
      shown = ~np.isnan(values).any(axis=0)
      if key in _UNSCALED:  # measured every N epochs: points joined, not gaps
        values, epochs = values[:, shown], epochs[shown]
      (line,) = ax.plot(epochs, values.mean(axis=0), label=name, marker="o" if key in _UNSCALED else None)
      if len(histories) > 1:
        ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_title(panel_title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("" if key in _UNSCALED else "%")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


TABLE_COLUMNS = (
  ("test_acc_at_best_val", "test % @ best val"),
  ("last_test_acc", "last test %"),
  ("mean_last5_test_acc", "last-5 mean test %"),
  ("noisy_memorised", "noisy->wrong % (final)"),
  ("clean_acc", "clean fit % (final)"),
  ("fit_gap", "clean-noisy gap pts (final)"),
  ("mean_group_B", "group B % (mean)"),
  ("best_test_acc", "max test % (diagnostic: chosen on test)"),
)
# The epochs averaged by mean_last5_test_acc.
LAST_EPOCHS = 5


def selected_metrics(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """A run's test accuracies, none of them chosen on the test set but the diagnostic.

  - ``test_acc_at_best_val``: the test accuracy at ``best_val_epoch``, the
    first epoch of highest validation accuracy (None without a validation
    set); ``noisy_memorised_at_best_val`` likewise;
  - ``last_test_acc`` and ``mean_last5_test_acc``: the last epoch's, and the
    mean over the last :data:`LAST_EPOCHS` epochs;
  - ``best_test_acc``: the maximum over epochs, a diagnostic only, since the
    epoch is chosen on the very images it reports.
  """
  if not history:
    return {"test_acc_at_best_val": None, "last_test_acc": None, "mean_last5_test_acc": None, "best_test_acc": None}
  tests = [r["test_acc"] for r in history]
  out: dict[str, Any] = {
    "test_acc_at_best_val": None,
    "best_val_epoch": None,
    "best_val_acc": None,
    "noisy_memorised_at_best_val": None,
  }
  if history[0].get("val_acc") is not None:
    chosen = history[int(np.argmax([r["val_acc"] for r in history]))]  # argmax: the first of equal bests
    out.update(
      test_acc_at_best_val=chosen["test_acc"],
      best_val_epoch=chosen["epoch"],
      best_val_acc=chosen["val_acc"],
      noisy_memorised_at_best_val=chosen.get("noisy_memorised"),
    )
  return {
    **out,
    "last_test_acc": tests[-1],
    "mean_last5_test_acc": float(np.mean(tests[-LAST_EPOCHS:])),
    "best_test_acc": max(tests),
  }


def _summary_value(summary: dict[str, Any], key: str):
  if key in summary:
    return summary[key]
  return (summary.get("final") or {}).get(key)


def markdown_table(summaries: dict[str, list[dict[str, Any]]]) -> str:
  """Mean ± std over seeds of each run's headline numbers."""
  logged = lambda key: any(_summary_value(s, key) is not None for runs in summaries.values() for s in runs)
  # The pipelines' columns (their registry entries'), where some run logged them.
  columns = TABLE_COLUMNS + tuple(column for column in registry.report("columns") if logged(column[0]))
  header = "| run | seeds | " + " | ".join(title for _, title in columns) + " |"
  lines = [header, "|" + "---|" * (len(columns) + 2)]
  for name, runs in summaries.items():
    cells = []
    for key, _ in columns:
      values = [v for v in (_summary_value(s, key) for s in runs) if v is not None]
      if not values:
        cells.append("n/a")
      elif len(values) == 1:
        cells.append(f"{100 * values[0]:.2f}")
      else:
        cells.append(f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}")
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"

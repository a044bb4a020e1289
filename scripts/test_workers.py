"""Prints how many pytest workers this machine runs the suite with: one per core, 2 to 8.

Two on a 2-core machine, which CI's 10-minute budget is set for; more where
there are more cores and about 3 GiB of available memory for each. Cores
and memory are what this process may use: its CPU affinity, a cgroup v2
CPU quota, MemAvailable, and a cgroup v2 memory limit.
"""

from __future__ import annotations

import os
import pathlib

GIB_PER_WORKER = 3
LIMITS = (2, 8)


def _read(path: str) -> str | None:
  try:
    return pathlib.Path(path).read_text().strip()
  except OSError:
    return None


def cores() -> float:
  count: float = len(os.sched_getaffinity(0))
  quota = (_read("/sys/fs/cgroup/cpu.max") or "max").split()
  if quota[0] != "max":
    count = min(count, int(quota[0]) / int(quota[1]))
  return count


def available_gib() -> float:
  meminfo = _read("/proc/meminfo") or ""
  kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
  gib = kib / 2**20 if kib is not None else float("inf")
  limit = _read("/sys/fs/cgroup/memory.max")
  if limit is not None and limit != "max":
    gib = min(gib, int(limit) / 2**30)
  return gib


def workers() -> int:
  low, high = LIMITS
  return int(max(low, min(high, cores(), available_gib() // GIB_PER_WORKER)))


if __name__ == "__main__":
  print(workers())

"""How much CPU other processes took while a benchmark ran, from ``/proc/stat``.

Standard library only: the peer runners (``bench/peers``) import it from their own venvs.
A benchmark's own CPU is that of its process tree: this process, its live descendants (peer
engines in subprocesses, their worker processes) and the children they have reaped, read from
``/proc/<pid>/stat``; everything else busy on the machine is "others".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def proc_stat_cpu() -> tuple[float, float] | None:
    """System-wide (busy, steal) CPU seconds since boot from ``/proc/stat``; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    hz = os.sysconf("SC_CLK_TCK")
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]  # user nice system irq softirq
    steal = ticks[7] if len(ticks) > 7 else 0
    return busy / hz, steal / hz


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces); None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def tree_cpu_s(root: int | None = None) -> float | None:
    """CPU seconds of ``root`` (default: this process) and its live descendants, each with the
    children it has reaped; None off Linux. A process that exits moves its time into its
    parent's reaped-children count, so the sum only grows while the tree waits for its own."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 1-based 14-17.
        parents[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15])
    if root not in times:
        return None
    tree = {root}
    grown = True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return sum(times[pid] for pid in tree) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuContention:
    """CPU time other processes (and the hypervisor, as steal) took while the benchmark ran."""

    wall_s: float
    own_cpu_s: float  # this process and its descendants
    others_cpu_s: float | None
    steal_s: float | None
    others_fraction_of_machine: float | None


class ContentionMonitor:
    """Compares the machine's busy CPU time with this process tree's own over an interval."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._own = _own_cpu_s()
        self._stat = proc_stat_cpu()

    def stop(self) -> CpuContention:
        wall = time.perf_counter() - self._wall
        own = _own_cpu_s() - self._own
        stat = proc_stat_cpu()
        if self._stat is None or stat is None:
            return CpuContention(wall, own, None, None, None)
        others = max(0.0, stat[0] - self._stat[0] - own)
        steal = stat[1] - self._stat[1]
        return CpuContention(wall, own, others, steal,
                             others / (wall * (os.cpu_count() or 1)))


def _own_cpu_s() -> float:
    tree = tree_cpu_s()
    return time.process_time() if tree is None else tree

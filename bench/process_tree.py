"""CPU time and memory of a command's whole process tree, for the growth benches (Linux only).

A stage run is a tree: the ``llmflow`` process, the Prefect API server it starts, a
ProcessPool's or a Dask cluster's workers (grandchildren), the crawl's extraction worker. The
benches need the CPU time and memory of all of it, so :class:`MeasuredProcess`:

* starts the command in a new session and makes this process a *child subreaper*, so a
  descendant whose parent dies is re-parented here, not to init, and its time is not lost;
* counts CPU time exactly with ``getrusage(RUSAGE_CHILDREN)``: once the command and every
  descendant left over are reaped, the difference is the user + system time of every process of
  the tree (the kernel adds a reaped child's time, and that of all it reaped, to its parent);
* samples ``/proc`` every ``interval`` seconds (the tree = the session's processes and the
  command's descendants): the summed RSS (the *tree* peak), each process's ``VmHWM`` (the largest
  *single process* peak, exact even between samples) and the tree's CPU so far
  (``utime + stime + cutime + cstime`` of the live processes), which gives the CPU time of a window
  of the run (the crawl bench's first to last request) and cross-checks the rusage total.

One measured command at a time: the rusage difference would mix two.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_REAP_GRACE_S = 10.0


@dataclass
class Sample:
    """The tree at one moment: seconds since start, CPU seconds so far, summed RSS, processes."""

    t: float
    cpu_s: float
    rss: int
    processes: int


@dataclass
class TreeRun:
    """What a measured command cost."""

    returncode: int
    wall_s: float
    cpu_s: float  # rusage of the whole tree: exact
    sampled_cpu_s: float  # the last sample's tree CPU: a cross-check, misses the last interval
    peak_tree_rss: int  # bytes: the largest sum of RSS over the tree's processes at one sample
    peak_process_rss: int  # bytes: the largest VmHWM of any one process
    max_processes: int
    samples: list[Sample] = field(repr=False)

    def cpu_at(self, t: float) -> float:
        """The tree's CPU seconds at ``t`` seconds after start, interpolated between samples."""
        before = [s for s in self.samples if s.t <= t]
        after = [s for s in self.samples if s.t >= t]
        if not before:
            return 0.0
        if not after:
            return before[-1].cpu_s
        a, b = before[-1], after[0]
        if b.t == a.t:
            return a.cpu_s
        return a.cpu_s + (b.cpu_s - a.cpu_s) * (t - a.t) / (b.t - a.t)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def die_with_parent() -> None:
    """Run in the child before exec: the kernel kills it if the bench dies (a killed bench
    must not leave a stage running in a session of its own)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stat(pid: int) -> tuple[int, int, float, int] | None:
    """(ppid, session, CPU seconds incl. reaped children, RSS bytes) of ``pid``, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return int(fields[1]), int(fields[3]), ticks / CLOCK_TICKS, int(fields[21]) * PAGE_BYTES


def _high_water(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class MeasuredProcess:
    """A command run and measured with its whole process tree (see the module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        interval: float = 0.25,
    ) -> None:
        _become_subreaper()
        self._usage_before = _children_cpu()
        self.started = time.monotonic()
        # Open for the command's life, closed in wait(): the command writes it, not a block here.
        self._log = open(log, "ab") if log is not None else None  # noqa: SIM115
        self.process = subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.interval = interval
        self.samples: list[Sample] = []
        self.seen: set[int] = {self.process.pid}
        self._peak_process = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self._sampler.start()

    def tree(self) -> dict[int, tuple[float, int]]:
        """The tree's live processes now: pid -> (CPU seconds incl. reaped children, RSS)."""
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _stat(int(entry))
                if stat is not None:
                    stats[int(entry)] = stat
        root = self.process.pid
        members = {pid for pid, (_, session, _, _) in stats.items() if session == root}
        frontier = [root]
        while frontier:  # descendants that left the session (setsid) still count
            parent = frontier.pop()
            for pid, (ppid, _, _, _) in stats.items():
                if ppid == parent and pid not in members:
                    members.add(pid)
                    frontier.append(pid)
        members.add(root)
        return {pid: (stats[pid][2], stats[pid][3]) for pid in members if pid in stats}

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            tree = self.tree()
            self.seen.update(tree)
            for pid in tree:
                self._peak_process = max(self._peak_process, _high_water(pid))
            cpu = sum(c for c, _ in tree.values())
            rss = sum(r for _, r in tree.values())
            self.samples.append(Sample(time.monotonic() - self.started, cpu, rss, len(tree)))
            self._stop.wait(self.interval)

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree (the session, then any descendant that left it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> TreeRun:
        """Wait for the command, reap what it left behind, and return what the tree cost.

        Raises ``subprocess.TimeoutExpired`` (the tree still running) after ``timeout`` seconds;
        any other interruption (Ctrl-C) kills the tree first.
        """
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise
        except BaseException:
            self.kill_tree()
            raise
        wall = time.monotonic() - self.started
        if self._log is not None:
            self._log.close()
        self._reap_orphans()
        self._stop.set()
        self._sampler.join()
        cpu = _children_cpu() - self._usage_before
        samples = list(self.samples)
        return TreeRun(
            returncode=returncode,
            wall_s=wall,
            cpu_s=cpu,
            sampled_cpu_s=max((s.cpu_s for s in samples), default=0.0),
            peak_tree_rss=max((s.rss for s in samples), default=0),
            peak_process_rss=self._peak_process,
            max_processes=max((s.processes for s in samples), default=0),
            samples=samples,
        )

    def _reap_orphans(self) -> None:
        """Reap the tree's processes re-parented here; those still running after a grace
        period (a stage that leaked a worker) are killed first, so their time is counted."""
        deadline = time.monotonic() + _REAP_GRACE_S
        me = os.getpid()
        while True:
            orphans = []
            for entry in os.listdir("/proc"):
                stat = _stat(int(entry)) if entry.isdigit() else None
                if stat is None or stat[0] != me:
                    continue
                if int(entry) in self.seen or stat[1] == self.process.pid:
                    orphans.append(int(entry))
            if not orphans:
                return
            late = time.monotonic() > deadline
            for pid in orphans:
                if late:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0 if late else os.WNOHANG)
            time.sleep(0.1)


def session_cpu_s(session: int) -> float:
    """CPU seconds so far of the live processes of a session (a server started in its own)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        stat = _stat(int(entry)) if entry.isdigit() else None
        if stat is not None and stat[1] == session:
            total += stat[2]
    return total


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_facts() -> dict[str, str]:
    """Cores, CPU model, memory, load average now: the context every figure needs."""
    import platform

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu": model,
        "cores": f"{len(os.sched_getaffinity(0))} usable ({os.cpu_count()} online)",
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

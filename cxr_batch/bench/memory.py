"""Peak memory of a process tree, sampled from /proc (Linux)."""

from __future__ import annotations

import os
import threading


class PeakMemory:
    """Peak summed RSS of this process and all its descendants, sampled from /proc in a thread.

    RSS counts pages shared between processes (torch's libraries, Ray's object store) once per
    process, so it overstates the machine's use; ``peak_anon_mb`` (private heap pages) does not.
    The sums also depend on how many Ray workers happen to be alive at once; ``peak_process_mb``,
    the largest single process, does not."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.peak_rss_mb, self.peak_anon_mb, self.peak_process_mb = interval_s, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        rss = anon = 0
        for pid in _tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1])
                            self.peak_process_mb = max(self.peak_process_mb, int(line.split()[1]) / 1024)
                        elif line.startswith("RssAnon:"):
                            anon += int(line.split()[1])
            except OSError:  # the process ended between listing and reading
                pass
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
        self.peak_anon_mb = max(self.peak_anon_mb, anon / 1024)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out

"""Guest profiler: samples each vCPU's RIP at a fixed interval and symbolizes the hot spots with a System.map."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


class SystemMap:
    """Symbols of a kernel's System.map (lines ``<hex address> <type> <name>``), looked up by address."""

    def __init__(self, lines):
        entries = []
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwWaA" and len(parts[1]) == 1:
                try:
                    entries.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        entries.sort()
        self._addrs = [a for a, _ in entries]
        self._names = [n for _, n in entries]

    @classmethod
    def load(cls, path: str | Path) -> "SystemMap":
        with open(path, encoding="ascii", errors="replace") as f:
            return cls(f)

    def symbolize(self, addr: int) -> str:
        """``name+0xoff`` of the text symbol at or below ``addr``, or the hex address if none."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return f"{addr:#x}"
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"

    def function(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        return self._names[i] if i >= 0 else f"{addr:#x}"


@dataclass
class ProfileRow:
    where: str
    samples: int
    share: float


class Profiler:
    """Asks every vCPU for a RIP sample each ``interval`` seconds (``Vcpu.request_sample``) while running.

    :param vcpus: objects with ``request_sample()`` and a ``samples`` list of RIPs.
    :param interval: seconds between samples (default 20 ms).
    """

    def __init__(self, vcpus, interval: float = 0.02):
        self.vcpus = list(vcpus)  # the VM empties its own list when it closes; the samples stay readable
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="popek-profiler", daemon=True)

    def start(self) -> "Profiler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for v in self.vcpus:
                v.request_sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def samples(self) -> list[int]:
        return [rip for v in self.vcpus for rip in v.samples]

    def report(self, system_map: SystemMap | None = None, top: int = 25) -> list[ProfileRow]:
        """Hottest functions (with a System.map) or addresses (without), most samples first."""
        rips = self.samples()
        key = system_map.function if system_map else (lambda a: f"{a:#x}")
        counts = Counter(key(r) for r in rips)
        total = max(len(rips), 1)
        return [ProfileRow(w, n, n / total) for w, n in counts.most_common(top)]

"""Interrupt lines handed to devices: a level they raise and lower, backed by KVM_IRQ_LINE or a test recorder."""

from __future__ import annotations

import threading
from typing import Callable, Protocol


class IrqLine(Protocol):
    """One interrupt input of the irqchip (a GSI). Devices call only these two methods."""

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class CallbackIrqLine:
    """An interrupt line that calls ``fn(gsi, level)``; the VM wires it to ``VmFd.irq_line`` (KVM_IRQ_LINE).

    Level changes are forwarded only when the level actually changes; ``pulse`` raises then lowers (edge).
    """

    def __init__(self, gsi: int, fn: Callable[[int, int], None]):
        self.gsi = gsi
        self._fn = fn
        self._level = False
        self._lock = threading.Lock()
        self.raised = 0

    @property
    def level(self) -> bool:
        return self._level

    def set_level(self, high: bool) -> None:
        with self._lock:
            if bool(high) == self._level:
                return
            self._level = bool(high)
            if high:
                self.raised += 1
            self._fn(self.gsi, 1 if high else 0)

    def pulse(self) -> None:
        with self._lock:
            self.raised += 1
            self._fn(self.gsi, 1)
            self._fn(self.gsi, 0)
            self._level = False


class RecordingIrqLine(CallbackIrqLine):
    """An interrupt line for tests: records every level it was driven to in ``events``."""

    def __init__(self, gsi: int = 0):
        self.events: list[int] = []
        super().__init__(gsi, lambda _gsi, level: self.events.append(level))

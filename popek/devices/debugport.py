"""Popek's guest-to-VMM debug port: two write-only byte registers, the guest command's exit status and boot events."""

from __future__ import annotations

from typing import Callable

#: Offsets from the port's base (0x504, so 0x504 and 0x505): popek/images/init writes them through /dev/port.
EXIT_STATUS = 0
EVENT = 1

#: Boot events written to offset 1.
EVENT_INIT_STARTED = 1


class DebugPort:
    """Offset 0: a written byte is the guest command's exit status (0-255), passed to ``on_exit_status``; offset 1:
    a written byte is a boot event number (``EVENT_INIT_STARTED`` = 1), passed to ``on_event``. Wider writes are
    taken byte by byte from their offset. Reads return zeros. Popek's own convention (no hardware standard).

    :param on_exit_status: called with the status, on the vCPU thread.
    :param on_event: called with the event number, on the vCPU thread.
    """

    def __init__(self, on_exit_status: Callable[[int], None], on_event: Callable[[int], None]):
        self.on_exit_status = on_exit_status
        self.on_event = on_event
        self.events: list[int] = []  # the boot events written so far, each once, in order (for snapshots)
        self.exit_status: int | None = None  # the last exit status written

    def state(self) -> dict:
        """``{"events": [int], "exit_status": int | None}``: which boot events the guest reported and its last
        exit status (the registers themselves hold nothing: writes are forwarded at once)."""
        return {"events": list(self.events), "exit_status": self.exit_status}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()`` and replay its boot events through ``on_event`` (so a restored VM knows
        its guest's init already started); the exit status is kept, not replayed (a guest that reported one had
        ended and is not snapshotted running).

        :raises ValueError: for a missing key, an unknown key, or a value that is not a byte.
        """
        if not isinstance(d, dict) or set(d) != {"events", "exit_status"}:
            raise ValueError(f"debug port state must have exactly 'events' and 'exit_status', not "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        events, status = d["events"], d["exit_status"]
        if not isinstance(events, list) or not all(isinstance(e, int) and 0 <= e <= 255 for e in events):
            raise ValueError(f"debug port events {events!r} are not a list of bytes")
        if status is not None and not (isinstance(status, int) and 0 <= status <= 255):
            raise ValueError(f"debug port exit status {status!r} is not a byte")
        self.events, self.exit_status = [], status
        for e in events:
            self._event(e)

    def _event(self, value: int) -> None:
        if value not in self.events:
            self.events.append(value)
        self.on_event(value)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == EXIT_STATUS:
                self.exit_status = value
                self.on_exit_status(value)
            elif offset + i == EVENT:
                self._event(value)

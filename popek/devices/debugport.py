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

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == EXIT_STATUS:
                self.on_exit_status(value)
            elif offset + i == EVENT:
                self.on_event(value)

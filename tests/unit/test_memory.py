"""popek.memory: failed construction of guest RAM closes every memfd it made (no fd leak)."""

from __future__ import annotations

import mmap
import os

import pytest

from popek import memory
from popek.memory import GuestMemory

MiB = 1 << 20


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failed_mmap_of_the_second_region_closes_both_regions_memfds(monkeypatch):
    real_mmap, calls = mmap.mmap, []

    def failing_mmap(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(12, "Cannot allocate memory")
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(memory.mmap, "mmap", failing_mmap)
    before = _open_fds()
    with pytest.raises(OSError):
        GuestMemory([(0, MiB), (4 * MiB, MiB)])
    assert len(calls) == 2
    assert _open_fds() == before


def test_a_failed_ftruncate_closes_the_memfd(monkeypatch):
    def failing_ftruncate(fd, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory.os, "ftruncate", failing_ftruncate)
    before = _open_fds()
    with pytest.raises(OSError):
        GuestMemory.x86(MiB)
    assert _open_fds() == before

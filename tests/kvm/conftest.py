"""KVM test fixtures: the /dev/kvm handle, test guests built from tests/guests/*.S, and small VMs that run them."""

from __future__ import annotations

import importlib.util
import struct
import sys
import threading
from pathlib import Path

import pytest

from popek.boot import layout
from popek.boot.x86 import setup_long_mode
from popek.bus import Bus
from popek.kvm.system import Kvm
from popek.memory import GuestMemory
from popek.vcpu import Vcpu, install_kick_signal

_spec = importlib.util.spec_from_file_location("popek_test_guests", Path(__file__).parents[1] / "guests" / "build.py")
guests = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = guests  # dataclasses look their module up there
_spec.loader.exec_module(guests)

#: The guests' port numbers (tests/guests/ports.h); each device spans 4 ports so 32-bit accesses fit.
PORTS = guests.ports()
PORT_SPAN = 4


class GuestFault(AssertionError):
    """The test guest took an exception it did not expect."""


class PortLog:
    """A bus device recording every write as a little-endian integer; ``wait(n)`` blocks until n writes arrived."""

    def __init__(self, on_write=None):
        self.values: list[int] = []
        self.raw: list[bytes] = []
        self._cond = threading.Condition()
        self._on_write = on_write

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        with self._cond:
            self.values.append(int.from_bytes(data, "little"))
            self.raw.append(bytes(data))
            self._cond.notify_all()
        if self._on_write is not None:
            self._on_write(data)

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.values) >= n, timeout)


class PortFeed:
    """A bus device answering reads with successive values from ``values`` (``size`` bytes each, little endian)."""

    def __init__(self, values: list[int]):
        self.values = list(values)
        self.reads = 0

    def read(self, offset: int, size: int) -> bytes:
        v = self.values[self.reads]
        self.reads += 1
        return v.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        raise AssertionError(f"unexpected write {data.hex()} to an input port")


class FaultReporter:
    """Raises GuestFault once guest.h's exception handler has written vector, error code and RIP."""

    def __init__(self):
        self.words: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.words.append(int.from_bytes(data, "little"))
        if len(self.words) == 3:
            vec, err, rip = self.words
            raise GuestFault(f"guest exception vector {vec} error code {err:#x} at rip {rip:#x}")


class Machine:
    """A VM for a test guest: ``mem_size`` bytes of RAM in slot 0, optional in-kernel irqchip, ``vcpus`` vCPUs all
    in long mode at the image's entry (vCPU i has RDI = i), a PIO bus with the fault reporter and an MMIO bus."""

    def __init__(self, kvm: Kvm, image, vcpus: int = 1, irqchip: bool = False, mem_size: int = 2 << 20):
        self.image = image
        self.vm = kvm.create_vm()
        self.mem = GuestMemory.x86(mem_size)
        for slot, r in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_address)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        if irqchip:
            self.vm.create_irqchip()
        self.mem.write(image.load_address, image.data)
        self.vcpus = []
        for i in range(vcpus):
            fd = self.vm.create_vcpu(i)
            setup_long_mode(self.mem, fd, image.load_address)
            regs = fd.get_regs()
            regs.rdi = i
            fd.set_regs(regs)
            self.vcpus.append(fd)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.faults = FaultReporter()
        self.pio.insert(PORTS["FAULT_PORT"], PORT_SPAN, self.faults)
        self.runners: list[Vcpu] = []

    def log(self, port: str, on_write=None) -> PortLog:
        """Record writes to the ports.h port named ``port``."""
        dev = PortLog(on_write)
        self.pio.insert(PORTS[port], PORT_SPAN, dev)
        return dev

    def feed(self, port: str, values: list[int]) -> PortFeed:
        """Answer reads of the ports.h port named ``port`` from ``values``."""
        dev = PortFeed(values)
        self.pio.insert(PORTS[port], PORT_SPAN, dev)
        return dev

    def runner(self, index: int = 0, handlers=None) -> Vcpu:
        """A (not yet started) run loop for vCPU ``index``."""
        v = Vcpu(self.vcpus[index], self.pio, self.mmio, handlers)
        self.runners.append(v)
        return v

    def read_u64(self, symbol: str) -> int:
        return struct.unpack("<Q", self.mem.read(self.image.symbols[symbol], 8))[0]

    def close(self) -> None:
        for v in self.runners:
            if v.running:
                v.stop()
                v.join(5)
        for fd in self.vcpus:
            fd.close()
        self.vm.close()
        self.mem.close()


@pytest.fixture(scope="session")
def kvm():
    install_kick_signal()
    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory):
    """``guest_image(name)`` -> GuestImage built from tests/guests/<name>.S (cached per session)."""
    missing = guests.missing_tools()
    if missing:
        pytest.skip(f"cannot build test guests: {', '.join(missing)} not installed")
    out = tmp_path_factory.mktemp("guests")
    cache = {}

    def build(name: str):
        if name not in cache:
            cache[name] = guests.build_guest(name, out)
        return cache[name]

    return build


@pytest.fixture
def machine(kvm, guest_image):
    """``machine(guest_name, **Machine kwargs)`` -> Machine; closed (vCPUs stopped) after the test."""
    made: list[Machine] = []

    def make(name: str, **kw) -> Machine:
        m = Machine(kvm, guest_image(name), **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()

"""The virtual machine: builds memory, irqchip, vCPUs, buses and devices from a VmConfig, and runs them (state-guarded)."""

from __future__ import annotations

import enum
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from popek.boot import layout
from popek.boot.linux import load_linux
from popek.boot.mptable import write_mptable
from popek.boot.x86 import setup_cpuid, setup_lapic, setup_long_mode, setup_msrs
from popek.bus import Bus
from popek.devices.debugport import DebugPort
from popek.devices.i8042 import I8042
from popek.devices.pci import PciBus, PciConfigIo, PciError
from popek.devices.platform import VirtioPciBoard, add_virtio_devices
from popek.devices.rtc import Rtc
from popek.devices.serial import Serial
from popek.devices.virtio.device import VirtioError
from popek.emulate import EmulationFailure, Emulator
from popek.guestcmd import CONSOLE_PORT_WRITE
from popek.irq import CallbackIrqLine, MsiRouter
from popek.kvm.abi import KVM_MEM_LOG_DIRTY_PAGES
from popek.kvm.system import Kvm, KvmFlavor, detect_flavor
from popek.memory import GuestMemory
from popek.net.iface import NetConfig  # noqa: F401  (popek.vm.NetConfig, VmConfig.nets)
from popek.repair import SyscallRepair
from popek.vcpu import Vcpu, install_kick_signal

#: Legacy PC port assignments (and their ISA IRQs).
COM1_PORT, COM1_IRQ = 0x3F8, 4
I8042_PORT = 0x60
RTC_PORT = 0x70
PCI_CONFIG_PORT = 0xCF8
DEBUG_PORT = 0x504

#: Debug-port boot events the guest init reports (popek/images/init).
EVENT_INIT_STARTED = 1

#: How often the SYSCALL repair re-reads each vCPU's IDT and LSTAR (seconds).
REPAIR_POLL_S = 0.05

#: Below this the kernels Popek builds do not reach init.
MIN_MEMORY = 32 << 20

#: A whole panic line (the serial port delivers output a byte at a time: wait for the line's end).
PANIC_RE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)[\r\n]")


class VmError(RuntimeError):
    """A VM that cannot be built or run (bad configuration, a KVM failure, a guest the VMM cannot continue)."""


def check_resources(memory: int, cpus: int) -> None:
    """Refuse guest RAM (bytes) below ``MIN_MEMORY`` or not a multiple of 4 KiB, and vCPU counts outside 1-254.

    :raises VmError: saying which value and why.
    """
    if memory < MIN_MEMORY:
        raise VmError(f"{memory / (1 << 20):g} MiB of guest memory is below the {MIN_MEMORY >> 20} MiB a kernel needs")
    if memory % 4096:
        raise VmError(f"guest memory of {memory} bytes is not a multiple of the 4 KiB page size")
    if not 1 <= cpus <= 254:
        raise VmError(f"{cpus} vCPUs: Popek supports 1 to 254")


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class DriveConfig:
    """A virtio-blk disk: a raw image file or host block device at ``path``; ``readonly`` opens it O_RDONLY and
    offers VIRTIO_BLK_F_RO (VIRTIO 1.2 §5.2.3); ``serial`` is the device ID string (ASCII, at most 20 bytes)."""

    path: Path
    readonly: bool = False
    serial: str | None = None


@dataclass
class VsockConfig:
    """A virtio-vsock device (VIRTIO 1.2 §5.10) with its host side on Unix sockets (Firecracker's hybrid vsock):
    ``guest_cid`` is the guest's context ID (3..0xFFFFFFFE), ``uds_path`` the socket the VMM listens on (it must
    not exist; it is removed when the VM closes). See ``popek.devices.virtio.vsock.Vsock``."""

    guest_cid: int
    uds_path: Path


@dataclass
class BalloonConfig:
    """A virtio-balloon device (VIRTIO 1.2 §5.5; Firecracker's Balloon): ``amount_mib`` is the balloon's target
    size at start (MiB the guest should give back), ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    ``stats_polling_interval_s`` how often the guest's memory statistics are refreshed (0: never),
    ``free_page_reporting`` offers VIRTIO_BALLOON_F_PAGE_REPORTING (the guest hands back free pages by itself).
    See ``popek.devices.virtio.balloon.Balloon``."""

    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_polling_interval_s: int = 0
    free_page_reporting: bool = False


@dataclass
class VmConfig:
    """What to boot and with which resources.

    :param kernel: bzImage or vmlinux ELF path.
    :param cmdline: the full kernel command line (see ``popek.guestcmd.build_cmdline``).
    :param memory: guest RAM in bytes (a multiple of 4 KiB, at least ``MIN_MEMORY``).
    :param cpus: number of vCPUs (1-254).
    :param extract_payload: boot a bzImage's compressed vmlinux directly, skipping its decompressor.
    :param repair_syscall: None = decide by the KVM flavour (on when it emulates CPL 0).
    :param drives: virtio-blk disks, in PCI slot order (the first is /dev/vda).
    :param rng: add a virtio-rng device (the guest's /dev/hwrng).
    :param nets: virtio-net interfaces, each on a tap created at build and removed at close (``NetConfig``, resolved
        by ``popek.net.iface.resolve``; ``cmdline`` should carry ``popek.net.iface.guest_args`` for them).
    :param track_dirty_pages: register RAM with KVM_MEM_LOG_DIRTY_PAGES and log the VMM's own writes
        (``GuestMemory.track_host_writes``), so ``popek.persist.save(..., diff=True)`` can write Diff snapshots
        (Firecracker's machine-config ``track_dirty_pages``).
    :param vsock: add a virtio-vsock device (None: none); its socket is removed when the VM closes.
    :param balloon: add a virtio-balloon device (None: none); ``Vm.balloon`` is then the device model.
    """

    kernel: Path
    cmdline: str
    initrd: Path | None = None
    memory: int = 256 << 20
    cpus: int = 1
    extract_payload: bool = True
    repair_syscall: bool | None = None
    drives: list[DriveConfig] = field(default_factory=list)
    rng: bool = True
    nets: list[NetConfig] = field(default_factory=list)
    track_dirty_pages: bool = False
    vsock: VsockConfig | None = None
    balloon: BalloonConfig | None = None


@dataclass
class VmResult:
    """How a VM ended.

    :param reason: "exit" (the guest command reported a status), "reset", "shutdown", "panic", "error", "stopped".
    :param exit_status: the guest command's exit status, or None if it never reported one.
    """

    reason: str
    exit_status: int | None
    detail: str = ""


class ConsoleStream:
    """The serial console as a stream: iterate (or ``read``) guest output bytes; ``write`` sends input to the guest."""

    def __init__(self, send: Callable[[bytes], None]):
        self._send = send
        self._chunks: queue.Queue[bytes | None] = queue.Queue()

    def _feed(self, data: bytes | None) -> None:
        self._chunks.put(data)

    def write(self, data: bytes) -> None:
        self._send(data)

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next chunk of output; b"" on timeout; None once the VM has ended and all output was read."""
        try:
            chunk = self._chunks.get(timeout=timeout)
        except queue.Empty:
            return b""
        if chunk is None:
            self._chunks.put(None)
        return chunk

    def __iter__(self):
        while (chunk := self.read()) is not None:
            yield chunk


@dataclass
class VmStats:
    started_at: float = 0.0
    init_at: float | None = None
    ended_at: float | None = None
    exits: Counter = field(default_factory=Counter)
    emulated: Counter = field(default_factory=Counter)
    syscalls_repaired: int = 0
    debug_exits: int = 0
    time_in_guest: float = 0.0
    time_in_vmm: float = 0.0

    def as_dict(self) -> dict:
        return {
            "time_to_init_s": None if self.init_at is None else self.init_at - self.started_at,
            "wall_s": (self.ended_at or time.monotonic()) - self.started_at,
            "exits": dict(self.exits),
            "emulated_instructions": dict(self.emulated),
            "syscalls_repaired": self.syscalls_repaired,
            "debug_exits": self.debug_exits,
            "time_in_guest_s": self.time_in_guest,
            "time_in_vmm_s": self.time_in_vmm,
        }


class Vm:
    """One virtual machine: ``Vm(config).start()``, then ``wait()``; ``pause()/resume()``; ``stop()``.

    Console output goes to ``on_output`` (called on the vCPU thread) and to ``console`` (a ConsoleStream).

    Restore path (``popek.persist.restore``): ``memory`` given = guest RAM mapped from a snapshot's memory file;
    the platform is built as usual but no kernel is loaded, no MP table written and no vCPU register set up (the
    caller then loads VM, vCPU and device state before ``start()``). The Vm owns ``memory`` (closes it).
    :raises VmError: if the VM cannot be built; ``popek.boot.linux.BootError`` for a bad kernel/initrd/cmdline;
        ``popek.kvm.system.KvmError`` if KVM is unusable.
    """

    def __init__(self, config: VmConfig, *, on_output: Callable[[bytes], None] | None = None,
                 flavor: KvmFlavor | None = None, memory: GuestMemory | None = None):
        check_resources(config.memory, config.cpus)
        self.config = config
        self.flavor = flavor or detect_flavor()
        self.state = VmState.CREATED
        self.stats = VmStats()
        self._on_output = on_output
        self._output = bytearray()
        self._init_output_at: int | None = None
        self._exit_output_at: int | None = None
        self._exit_status: int | None = None
        self._marker_at: int | None = None  # where a console port-write marker began (it is not command output)
        self._panic: str | None = None
        self._result: VmResult | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.console = ConsoleStream(self.send_input)
        self.vcpus: list[Vcpu] = []
        self._last_poll = [0.0] * config.cpus
        self._kvm = None
        self._vm = None
        self.msi: MsiRouter | None = None
        self.board: VirtioPciBoard | None = None
        self.restoring = memory is not None
        self.snapshot_base = None  # the last snapshot's memory (popek.persist.SnapshotBase): what a Diff is on
        self.memory: GuestMemory | None = memory
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- construction ---------------------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        self._kvm = Kvm()
        vm = self._vm = self._kvm.create_vm()
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        self.msi = MsiRouter(vm)
        try:
            if self.memory is None:
                self.memory = GuestMemory.x86(cfg.memory)
        except OSError as e:
            raise VmError(f"cannot allocate {cfg.memory >> 20} MiB of guest memory: {e.strerror}") from None
        for slot, region in enumerate(self.memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address,
                                      KVM_MEM_LOG_DIRTY_PAGES if cfg.track_dirty_pages else 0)
        if cfg.track_dirty_pages:
            self.memory.track_host_writes()

        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.serial = Serial(CallbackIrqLine(COM1_IRQ, vm.irq_line), self._guest_output)
        self.pio.insert(COM1_PORT, 8, self.serial)
        self.i8042 = I8042(on_reset=lambda: self._end("reset", "guest reset through the i8042"))
        self.pio.insert(I8042_PORT, 5, self.i8042)
        self.rtc = Rtc()
        self.pio.insert(RTC_PORT, 2, self.rtc)
        self.pci = PciBus()
        self.pci_io = PciConfigIo(self.pci)
        self.pio.insert(PCI_CONFIG_PORT, 8, self.pci_io)
        self.board = VirtioPciBoard(vm, self.memory, self.pci, self.mmio, self.msi)
        try:
            add_virtio_devices(self.board, cfg.drives, rng=cfg.rng, nets=cfg.nets, vsock=cfg.vsock,
                               balloon=cfg.balloon)
        except (VirtioError, PciError) as e:
            raise VmError(str(e)) from None
        self.debugport = DebugPort(on_exit_status=self._guest_exit_status, on_event=self._guest_event)
        self.pio.insert(DEBUG_PORT, 2, self.debugport)

        if not self.restoring:  # a restored guest's memory already holds its kernel and MP table
            self.boot = load_linux(self.memory, cfg.kernel, cmdline=cfg.cmdline, initrd_path=cfg.initrd,
                                   extract_payload=cfg.extract_payload)
            write_mptable(self.memory, cfg.cpus, ioapic_id=cfg.cpus, pci_irqs=self.board.pci_irqs)

        repair = cfg.repair_syscall if cfg.repair_syscall is not None else self.flavor.emulating_cpl0
        self.emulator = Emulator(self.memory)
        self.repair = SyscallRepair(self.memory) if repair else None
        install_kick_signal()
        supported = self._kvm.supported_cpuid()
        for i in range(cfg.cpus):
            fd = vm.create_vcpu(i)
            self.vcpus.append(Vcpu(fd, self.pio, self.mmio, handlers=self))  # first, so close() releases it
            setup_cpuid(fd, supported, cfg.cpus)
            setup_msrs(fd)
            setup_lapic(fd)
            if i == 0 and not self.restoring:
                setup_long_mode(self.memory, fd, rip=self.boot.entry, rsi=self.boot.boot_params)

    # ---- device callbacks (vCPU threads) ---------------------------------------------------------------------------

    def _guest_output(self, data: bytes) -> None:
        port_writes = []
        with self._lock:
            self._output += data
            tail = max(0, len(self._output) - len(data) - 256)
            if self._panic is None and self._output.find(b"panic", tail) >= 0:
                m = PANIC_RE.search(self._output, tail)
                if m:
                    self._panic = m.group(1).decode(errors="replace").strip()
            if b"\x07" in data:
                for m in CONSOLE_PORT_WRITE.finditer(self._output, tail):
                    if m.end() > len(self._output) - len(data):
                        port_writes.append((m.start(), int(m.group(1)), int(m.group(2)) & 0xFF))
        for start, port, value in port_writes:
            self._marker_at = start
            self.pio.write(port, bytes([value]))
        self.console._feed(bytes(data))
        if self._on_output and self._exit_status is None:  # after the command's status only the reboot message comes
            self._on_output(data)

    def _guest_event(self, n: int) -> None:
        if n == EVENT_INIT_STARTED and self.stats.init_at is None:
            self.stats.init_at = time.monotonic()
            with self._lock:
                self._init_output_at = len(self._output)
                self._marker_at = None

    def _guest_exit_status(self, code: int) -> None:
        with self._lock:
            self._exit_status = code
            self._exit_output_at = len(self._output) if self._marker_at is None else self._marker_at
            self._marker_at = None

    def send_input(self, data: bytes) -> None:
        """Bytes typed at the guest's serial console (thread-safe)."""
        self.serial.enqueue_input(data)

    @property
    def balloon(self):
        """The virtio-balloon device model (``popek.devices.virtio.balloon.Balloon``), or None without one."""
        from popek.devices.virtio.balloon import Balloon

        devices = self.board.devices if self.board is not None else ()
        return next((d.device for d in devices if isinstance(d.device, Balloon)), None)

    # ---- vCPU hooks (popek.vcpu.VcpuHandlers; called on the vCPU threads) ----------------------------------------

    def on_internal_error(self, vcpu: Vcpu, exit) -> bool:
        try:
            return self.emulator.handle(vcpu.fd, exit)
        except EmulationFailure as e:
            self._end("error", str(e))
            return False

    def on_debug(self, vcpu: Vcpu, exit) -> bool:
        return self.repair is not None and self.repair.on_debug(vcpu.fd, exit)

    def on_exit_poll(self, vcpu: Vcpu) -> None:
        # The repair's poll costs two ioctls; exits come at up to ~100k/s (serial output), the guest changes its
        # IDT/LSTAR a handful of times in a boot: poll at most every REPAIR_POLL_S per vCPU (the kicker below
        # guarantees an exit at least that often).
        if self.repair is not None:
            now = time.monotonic()
            if now - self._last_poll[vcpu.index] >= REPAIR_POLL_S:
                self._last_poll[vcpu.index] = now
                self.repair.poll(vcpu.fd)

    def on_stop(self, vcpu: Vcpu, reason: str, detail: str) -> None:
        if reason != "stopped":
            self._end(reason, detail)

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> "Vm":
        """Start every vCPU thread. :raises VmError: unless the VM was just created."""
        if self.state is not VmState.CREATED:
            raise VmError(f"cannot start a VM that is {self.state.value}")
        self.stats.started_at = time.monotonic()
        self.state = VmState.RUNNING
        for v in self.vcpus:
            v.start()
        if self.repair is not None:
            threading.Thread(target=self._poll_kicker, name="popek-repair-poll", daemon=True).start()
        return self

    def _poll_kicker(self) -> None:
        # The SYSCALL repair must notice when the guest installs its IDT and LSTAR, which cause no exit by
        # themselves: kick each vCPU now and then so on_exit_poll runs (cheap: one exit per vCPU per period).
        while not self._done.wait(REPAIR_POLL_S):
            if self.state is VmState.RUNNING:
                for v in self.vcpus:
                    v.kick()

    def _end(self, reason: str, detail: str = "") -> None:
        with self._lock:
            if self._result is not None:
                return
            if reason in ("reset", "shutdown") and self._panic is not None:
                reason, detail = "panic", f"guest kernel panic: {self._panic}"
            elif reason in ("reset", "shutdown") and self._exit_status is not None:
                reason = "exit"  # the init reported its command's status, then rebooted (reboot=k, or triple fault)
            self._result = VmResult(reason, self._exit_status, detail)
        self._done.set()
        for v in self.vcpus:
            v.stop()

    def wait(self, timeout: float | None = None) -> VmResult | None:
        """Block until the VM ends (or ``timeout`` seconds pass: then None); joins the vCPU threads."""
        if not self._done.wait(timeout):
            return None
        for v in self.vcpus:
            v.join()
        self._finish()
        return self._result

    def pause(self) -> None:
        if self.state is not VmState.RUNNING:
            raise VmError(f"cannot pause a VM that is {self.state.value}")
        for v in self.vcpus:
            v.pause()
        self.state = VmState.PAUSED

    def resume(self) -> None:
        if self.state is not VmState.PAUSED:
            raise VmError(f"cannot resume a VM that is {self.state.value}")
        for v in self.vcpus:
            v.resume()
        self.state = VmState.RUNNING

    def stop_async(self) -> None:
        """Ask the VM to stop and return at once (safe from any thread, e.g. the console's escape key)."""
        self._end("stopped", "stopped by the user")

    def stop(self) -> VmResult:
        """Stop the VM now (from any state) and release its resources."""
        self._end("stopped", "stopped by the VMM")
        result = self.wait()
        self.close()
        return result

    def _finish(self) -> None:
        if self.state is VmState.STOPPED:
            return
        self.state = VmState.STOPPED
        self.stats.ended_at = time.monotonic()
        for v in self.vcpus:
            self.stats.exits.update(v.exit_counts)
            self.stats.time_in_guest += v.time_in_guest
            self.stats.time_in_vmm += v.time_in_vmm
        self.stats.emulated = Counter(self.emulator.counts)
        if self.repair is not None:
            self.stats.syscalls_repaired = self.repair.repaired
            self.stats.debug_exits = self.repair.debug_exits
        self.console._feed(None)

    def close(self) -> None:
        """Release everything: devices (threads, ioeventfds, image files), MSI vectors, vCPUs, the VM, memory."""
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.msi is not None:
            self.msi.close()
            self.msi = None
        for v in self.vcpus:
            v.fd.close()
        self.vcpus.clear()
        for obj in (self._vm, self._kvm):
            if obj is not None:
                obj.close()
        self._vm = self._kvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # ---- results ---------------------------------------------------------------------------------------------------

    @property
    def output(self) -> bytes:
        """Everything the guest wrote to its console so far."""
        with self._lock:
            return bytes(self._output)

    @property
    def command_output(self) -> bytes:
        """What the guest command printed: console output between init's start and its exit-status report."""
        with self._lock:
            start = self._init_output_at or 0
            end = self._exit_output_at if self._exit_output_at is not None else len(self._output)
            return bytes(self._output[start:end])

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        if self.state is not VmState.STOPPED:
            self.stop()
        else:
            self.close()

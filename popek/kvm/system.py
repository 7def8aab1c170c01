"""KVM file descriptors: the /dev/kvm system fd, VM fds and vCPU fds, one method per ioctl (Documentation/virt/kvm/api.rst)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from popek.kvm import abi
from popek.kvm.abi import (kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_irq_level,
                           kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_config, kvm_pit_state2, kvm_regs,
                           kvm_run, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class KvmError(RuntimeError):
    """A KVM setup problem or a failed KVM ioctl; ``errno`` is the OS error number (0 if not from a syscall)."""

    def __init__(self, message: str, err: int = 0):
        super().__init__(message)
        self.errno = err


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array | int | None = None) -> int:
    """Issue ``ioctl(fd, request, arg)`` through libc with the GIL released.

    ``arg`` is a ctypes object (passed by address), an int (passed by value) or None (0).
    :returns: the non-negative ioctl return value.
    :raises KvmError: ``"KVM_XXX: <strerror>"`` when the ioctl returns -1.
    """
    a = ctypes.addressof(arg) if isinstance(arg, (ctypes.Structure, ctypes.Array, ctypes._SimpleCData)) else arg
    r = _ioctl(fd, request, a)
    if r < 0:
        e = ctypes.get_errno()
        raise KvmError(f"{abi.IOCTL_NAMES.get(request, hex(request))}: {os.strerror(e)}", e)
    return r


# --- exits -------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class IoIn:
    """KVM_EXIT_IO, direction in: the guest reads ``count`` items of ``size`` bytes from ``port``; answer with complete_io."""
    port: int
    size: int
    count: int


@dataclass(slots=True)
class IoOut:
    """KVM_EXIT_IO, direction out: ``data`` is ``count * size`` bytes written to ``port`` (count > 1: rep outs)."""
    port: int
    size: int
    count: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    """KVM_EXIT_MMIO read of ``size`` bytes at guest physical ``addr``; answer with complete_io."""
    addr: int
    size: int


@dataclass(slots=True)
class MmioWrite:
    """KVM_EXIT_MMIO write of ``data`` at guest physical ``addr``."""
    addr: int
    data: bytes


@dataclass(slots=True)
class Hlt:
    """KVM_EXIT_HLT: the guest executed HLT and no in-kernel irqchip handles it."""


@dataclass(slots=True)
class Shutdown:
    """KVM_EXIT_SHUTDOWN: the vCPU shut down (triple fault)."""


@dataclass(slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is KVM_SYSTEM_EVENT_SHUTDOWN/RESET/CRASH/...; ``flags`` is data[0]."""
    type: int
    flags: int


@dataclass(slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR: ``suberror`` (1 = KVM_INTERNAL_ERROR_EMULATION), ``data`` = internal.data[:ndata].

    ``insn_bytes`` are the ``insn_size`` bytes KVM fetched at RIP for the instruction it failed to emulate
    (emulation_failure layout at kvm_run offset 32; kvm_pvm gives all 15, so they can run past the instruction:
    decode them), or None when flag KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES is clear.
    """
    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes | None


@dataclass(slots=True)
class Debug:
    """KVM_EXIT_DEBUG (kvm_debug_exit_arch): ``exception`` vector (1 = #DB, 3 = #BP), ``pc`` guest RIP, DR6, DR7."""
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: VM entry failed; ``reason`` is hardware_entry_failure_reason (VMX exit reason / SVM code)."""
    reason: int
    cpu: int = 0


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (a signal or ``immediate_exit``), or KVM_EXIT_INTR."""


@dataclass(slots=True)
class Unknown:
    """Any other exit: ``reason`` is kvm_run.exit_reason; ``hardware_reason`` is hw.hardware_exit_reason."""
    reason: int
    hardware_reason: int = 0


Exit = IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEvent | InternalError | Debug | FailEntry | Interrupted | Unknown

_HLT, _SHUTDOWN, _INTERRUPTED = Hlt(), Shutdown(), Interrupted()
_MMIO_DATA = abi.KVM_RUN_EXIT_OFFSET + 8  # kvm_run.mmio.data


# --- flavour detection -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvmFlavor:
    """Which KVM provides /dev/kvm: ``name`` "kvm_pvm" (software, CPL 0 emulated) or "hardware" (VT-x/AMD-V)."""
    emulating_cpl0: bool
    name: str
    reason: str


def detect_flavor(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo") -> KvmFlavor:
    """Tell a software KVM (kvm_pvm, guest CPL 0 emulated) from hardware-assisted KVM.

    Software when ``<sys_module>/kvm_pvm`` exists and the CPU flags in ``cpuinfo`` have neither ``vmx`` nor ``svm``
    (environment.md); hardware otherwise, with the evidence in ``reason``.
    """
    flags: set[str] = set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError as e:
        return KvmFlavor(False, "hardware", f"cannot read {cpuinfo} ({e.strerror}); assuming hardware KVM")
    hw = sorted(flags & {"vmx", "svm"})
    pvm = Path(sys_module, "kvm_pvm").exists()
    if pvm and not hw:
        return KvmFlavor(True, "kvm_pvm", f"{sys_module}/kvm_pvm exists and the CPU has neither vmx nor svm")
    if hw:
        return KvmFlavor(False, "hardware", f"CPU flag {'/'.join(hw)} present" + (" (kvm_pvm also loaded)" if pvm else ""))
    return KvmFlavor(False, "hardware", f"no kvm_pvm module and no vmx/svm flag; treating {cpuinfo} host as hardware KVM")


# --- /dev/kvm ----------------------------------------------------------------------------------------------
class Kvm:
    """The KVM system fd (``path``; default $POPEK_KVM_DEVICE, else /dev/kvm).

    :raises KvmError: one line saying why: /dev/kvm missing, no permission, API version not 12, or a capability in
        ``REQUIRED_CAPS`` missing (api.rst 4.1 KVM_GET_API_VERSION, 4.4 KVM_CHECK_EXTENSION).
    """

    REQUIRED_CAPS = {abi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY", abi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
                     abi.KVM_CAP_HLT: "KVM_CAP_HLT", abi.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID",
                     abi.KVM_CAP_MP_STATE: "KVM_CAP_MP_STATE", abi.KVM_CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS",
                     abi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT", abi.KVM_CAP_PIT2: "KVM_CAP_PIT2",
                     abi.KVM_CAP_SET_GUEST_DEBUG: "KVM_CAP_SET_GUEST_DEBUG"}

    def __init__(self, path: str | None = None):
        path = path or os.environ.get("POPEK_KVM_DEVICE", "/dev/kvm")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"{path} does not exist: KVM is not available on this host (load kvm_intel, kvm_amd or kvm_pvm)") from None
        except PermissionError:
            raise KvmError(f"no permission to open {path} read-write (run as root or join the group owning it)") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}", e.errno) from None
        try:
            try:
                self.api_version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
            except KvmError as e:
                raise KvmError(f"{path} is not a KVM device: {e}", e.errno) from None
            if self.api_version != abi.KVM_API_VERSION:
                raise KvmError(f"{path}: KVM API version {self.api_version}, Popek needs {abi.KVM_API_VERSION}")
            missing = [name for cap, name in self.REQUIRED_CAPS.items() if self.check_extension(cap) <= 0]
            if missing:
                raise KvmError(f"{path}: KVM lacks capabilities Popek needs: {', '.join(missing)}")
            self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if ``cap`` is unsupported, else a positive (cap-specific) value."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can expose (copies), growing the buffer on E2BIG."""
        n = max_entries
        while True:
            buf = abi.kvm_cpuid2_n(n)()
            buf.nent = n
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def create_vm(self) -> "VmFd":
        """KVM_CREATE_VM (machine type 0)."""
        return VmFd(self, ioctl(self.fd, abi.KVM_CREATE_VM, 0))

    def close(self) -> None:
        """Close /dev/kvm (VM fds stay valid)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSR indices KVM saves and restores for guests (api.rst 4.3), growing the
        buffer on E2BIG. Some may still be refused by KVM_GET_MSRS on a given vCPU (guest CPUID dependent)."""
        n = 0
        while True:
            buf = (ctypes.c_uint32 * (n + 1))(n)  # struct kvm_msr_list: __u32 nmsrs; __u32 indices[nmsrs]
            try:
                ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and buf[0] > n:
                    n = buf[0]
                    continue
                raise
            return list(buf[1:1 + buf[0]])


# --- VM fd -------------------------------------------------------------------------------------------------
class VmFd:
    """One VM (api.rst section 4, "vm ioctl"s). Created by ``Kvm.create_vm``."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (per-VM answer)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: map ``size`` bytes of host memory at ``host_addr`` to guest physical ``gpa``.

        ``size`` 0 deletes the slot; ``flags`` KVM_MEM_LOG_DIRTY_PAGES / KVM_MEM_READONLY.
        """
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION,
              kvm_userspace_memory_region(slot, flags, gpa, size, host_addr))

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest physical space KVM (VMX) uses for real-mode emulation."""
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page of guest physical space for the VMX EPT identity map."""
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a local APIC per vCPU created afterwards."""
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = abi.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 on ports 0x40-0x43 (needs the irqchip first)."""
        ioctl(self.fd, abi.KVM_CREATE_PIT2, kvm_pit_config(flags))

    def irq_line(self, gsi: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``gsi`` (PIC pins 0-15, IOAPIC pins 0-23) to ``level`` (0/1)."""
        ioctl(self.fd, abi.KVM_IRQ_LINE, kvm_irq_level(gsi, level))

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (bit i of little-endian u64 words = page i), then reset.

        The slot must have KVM_MEM_LOG_DIRTY_PAGES. Returns ``ceil(npages/64)*8`` bytes.
        """
        bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap)))
        return bytes(bitmap)

    def get_clock(self) -> kvm_clock_data:
        """KVM_GET_CLOCK: the VM's kvmclock (ns)."""
        c = kvm_clock_data()
        ioctl(self.fd, abi.KVM_GET_CLOCK, c)
        return c

    def set_clock(self, clock: kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        ioctl(self.fd, abi.KVM_SET_CLOCK, clock)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        """KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER (0), PIC_SLAVE (1) or IOAPIC (2)."""
        c = kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, abi.KVM_GET_IRQCHIP, c)
        return c

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP (``chip.chip_id`` selects the chip)."""
        ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        """KVM_GET_PIT2."""
        s = kvm_pit_state2()
        ioctl(self.fd, abi.KVM_GET_PIT2, s)
        return s

    def set_pit2(self, state: kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        ioctl(self.fd, abi.KVM_SET_PIT2, state)

    def create_vcpu(self, index: int) -> "VcpuFd":
        """KVM_CREATE_VCPU with vCPU id (= initial APIC id) ``index``, and mmap of its kvm_run area."""
        return VcpuFd(self, index, ioctl(self.fd, abi.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        """Close the VM fd (the VM goes when its vCPU fds are closed too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_gsi_routing(self, entries: list[abi.kvm_irq_routing_entry]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table with ``entries`` (KVM_CAP_IRQ_ROUTING).

        Replaces KVM's default routes too (GSI 0-15 to PIC and IOAPIC, 16-23 to the IOAPIC): include them.
        :raises KvmError: EINVAL for a bad entry, more entries than KVM_CAP_IRQ_ROUTING allows, or no irqchip.
        """
        buf = abi.kvm_irq_routing_n(len(entries))()
        buf.nr = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, buf)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` injects GSI ``gsi`` (KVM_CAP_IRQFD); ``deassign`` unbinds it.

        With ``resample_fd`` (KVM_IRQFD_FLAG_RESAMPLE, KVM_CAP_IRQFD_RESAMPLE) the GSI acts as a level: KVM
        lowers it when the guest EOIs and then signals ``resample_fd`` so the device can re-assert.
        :raises KvmError: e.g. EBUSY if ``fd`` is already bound, ENOENT deassigning an unbound one.
        """
        flags = (abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0) | \
            (abi.KVM_IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0)
        ioctl(self.fd, abi.KVM_IRQFD, abi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0))

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes (1, 2, 4, 8; 0 = any, KVM_CAP_IOEVENTFD_ANY_LENGTH) at
        guest physical ``addr`` (or port ``addr`` with ``pio``) signals eventfd ``fd`` and does not exit to user
        space; with ``datamatch`` only writes of that value do. ``deassign`` removes a registration made with the
        same arguments (KVM_CAP_IOEVENTFD).

        :raises KvmError: EEXIST for a duplicate, ENOENT deassigning an unknown one, EINVAL for a bad length.
        """
        flags = (abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (abi.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0) | \
            (abi.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
        ioctl(self.fd, abi.KVM_IOEVENTFD, abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd,
                                                             flags=flags))

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject one MSI with 64-bit message ``address`` and 32-bit ``data`` (KVM_CAP_SIGNAL_MSI).

        :returns: > 0 delivered to that many vCPUs, 0 if the guest blocked it (e.g. its local APIC is disabled).
        :raises KvmError: EPERM if no vCPU has the destination APIC ID, other errors e.g. without an irqchip.
        """
        return ioctl(self.fd, abi.KVM_SIGNAL_MSI, abi.kvm_msi(address_lo=address & 0xFFFF_FFFF,
                                                              address_hi=address >> 32, data=data))


# --- vCPU fd -----------------------------------------------------------------------------------------------
class VcpuFd:
    """One vCPU (api.rst section 4, "vcpu ioctl"s) and its shared ``kvm_run`` area.

    Not thread-safe: KVM_RUN and the get/set ioctls belong to the thread that runs the vCPU (or run while it is
    parked); only ``immediate_exit`` may be set from another thread.
    """

    def __init__(self, vm: VmFd, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        try:
            self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self.kvm_run = kvm_run.from_buffer(self._map)
        self._pending: tuple[int, int] | None = None  # (offset in the run area, length) awaiting complete_io

    # KVM_RUN ------------------------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN (GIL released) and decode the exit.

        :returns: one of the exit dataclasses; EINTR gives ``Interrupted`` (``immediate_exit`` is left as is).
        :raises KvmError: for other KVM_RUN errors (e.g. EFAULT on a bad memory slot).
        """
        self._pending = None
        if _ioctl(self.fd, abi.KVM_RUN, None) < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR or e == errno.EAGAIN:
                return _INTERRUPTED
            raise KvmError(f"KVM_RUN: {os.strerror(e)}", e)
        run = self.kvm_run
        reason = run.exit_reason
        x = run.exit
        if reason == abi.KVM_EXIT_IO:
            io = x.io
            n = io.size * io.count
            if io.direction == abi.KVM_EXIT_IO_OUT:
                return IoOut(io.port, io.size, io.count, self._map[io.data_offset:io.data_offset + n])
            self._pending = (io.data_offset, n)
            return IoIn(io.port, io.size, io.count)
        if reason == abi.KVM_EXIT_MMIO:
            m = x.mmio
            if m.is_write:
                return MmioWrite(m.phys_addr, bytes(m.data)[:m.len])
            self._pending = (_MMIO_DATA, m.len)
            return MmioRead(m.phys_addr, m.len)
        if reason == abi.KVM_EXIT_HLT:
            return _HLT
        if reason == abi.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == abi.KVM_EXIT_DEBUG:
            d = x.debug.arch
            return Debug(d.exception, d.pc, d.dr6, d.dr7)
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            i = x.internal
            nd = min(i.ndata, 16)
            insn = None
            ef = x.emulation_failure
            if (i.suberror == abi.KVM_INTERNAL_ERROR_EMULATION and nd >= 1
                    and ef.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                insn = bytes(ef.insn_bytes)[:min(ef.insn_size, 15)]
            return InternalError(i.suberror, tuple(i.data[:nd]), insn)
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            return SystemEvent(x.system_event.type, x.system_event.data[0])
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            return FailEntry(x.fail_entry.hardware_entry_failure_reason, x.fail_entry.cpu)
        return Unknown(reason, x.hw.hardware_exit_reason if reason == abi.KVM_EXIT_UNKNOWN else 0)

    def complete_io(self, data: bytes) -> None:
        """Give the data for the last IoIn (``size*count`` bytes) or MmioRead (``size`` bytes); the next KVM_RUN
        delivers it to the guest (api.rst 5, KVM_EXIT_IO / KVM_EXIT_MMIO).

        :raises KvmError: if the last exit was not an IoIn/MmioRead; ValueError if ``len(data)`` is wrong.
        """
        if self._pending is None:
            raise KvmError("complete_io: the last exit was not an IoIn or MmioRead")
        off, n = self._pending
        if len(data) != n:
            raise ValueError(f"complete_io: exit wants {n} bytes, got {len(data)}")
        self._map[off:off + n] = data

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: when set, the next KVM_RUN returns EINTR at once (api.rst KVM_CAP_IMMEDIATE_EXIT)."""
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = 1 if value else 0

    # registers ------------------------------------------------------------------------------------------------
    def _get(self, request: int, typ):
        s = typ()
        ioctl(self.fd, request, s)
        return s

    def get_regs(self) -> kvm_regs:
        """KVM_GET_REGS."""
        return self._get(abi.KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        """KVM_SET_REGS."""
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        """KVM_GET_SREGS."""
        return self._get(abi.KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        """KVM_GET_FPU. Measured on kvm_pvm: ``mxcsr`` reads 0 and KVM_SET_FPU does not reach the guest (XSTATE_BV
        stays 0); ``get_xsave``/``set_xsave`` do (legacy area: fcw byte 0, mxcsr byte 24, XSTATE_BV byte 512)."""
        return self._get(abi.KVM_GET_FPU, kvm_fpu)

    def set_fpu(self, fpu: kvm_fpu) -> None:
        """KVM_SET_FPU."""
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: ``{index: value}``.

        :raises KvmError: naming the first MSR KVM could not read.
        """
        buf = abi.kvm_msrs_n(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        if n != len(indices):
            raise KvmError(f"KVM_GET_MSRS: MSR {indices[n]:#x} cannot be read (read {n} of {len(indices)})")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS.

        :raises KvmError: naming the first MSR KVM refused (the ones before it were set).
        """
        items = list(values.items())
        buf = abi.kvm_msrs_n(len(items))()
        buf.nmsrs = len(items)
        for i, (idx, val) in enumerate(items):
            buf.entries[i].index, buf.entries[i].data = idx, val
        n = ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if n != len(items):
            raise KvmError(f"KVM_SET_MSRS: MSR {items[n][0]:#x} = {items[n][1]:#x} refused (set {n} of {len(items)})")

    def get_vcpu_events(self) -> kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS."""
        return self._get(abi.KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def inject_exception(self, nr: int, error_code: int | None = None) -> None:
        """Inject exception vector ``nr`` (with ``error_code`` if given) for delivery on the next KVM_RUN.

        Uses KVM_SET_VCPU_EVENTS with exception.injected=1 and flags 0 (api.rst 4.32; environment.md, #BP).
        """
        ev = self.get_vcpu_events()
        ev.exception.injected = 1
        ev.exception.pending = 0
        ev.exception.nr = nr
        ev.exception.has_error_code = 0 if error_code is None else 1
        ev.exception.error_code = error_code or 0
        ev.exception_has_payload = 0
        ev.flags = 0
        self.set_vcpu_events(ev)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` KVM_GUESTDBG_* flags, ``debugreg`` DR0-DR3, -, -, DR6, DR7 (index 7)."""
        dbg = kvm_guest_debug(control=control)
        for i, v in enumerate((debugreg or [])[:8]):
            dbg.arch.debugreg[i] = v
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, dbg)

    def set_cpuid2(self, entries: list[kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2 (accepted but ignored by kvm_pvm: the guest sees host CPUID there)."""
        buf = abi.kvm_cpuid2_n(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        """KVM_GET_CPUID2: the CPUID leaves the vCPU has."""
        buf = abi.kvm_cpuid2_n(max_entries)()
        buf.nent = max_entries
        ioctl(self.fd, abi.KVM_GET_CPUID2, buf)
        return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_lapic(self) -> kvm_lapic_state:
        """KVM_GET_LAPIC (needs the in-kernel irqchip)."""
        return self._get(abi.KVM_GET_LAPIC, kvm_lapic_state)

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        ioctl(self.fd, abi.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE/UNINITIALIZED/INIT_RECEIVED/HALTED/SIPI_RECEIVED."""
        return self._get(abi.KVM_GET_MP_STATE, kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        ioctl(self.fd, abi.KVM_SET_MP_STATE, kvm_mp_state(state))

    def get_xsave(self) -> kvm_xsave:
        """KVM_GET_XSAVE (legacy 4 KiB area)."""
        return self._get(abi.KVM_GET_XSAVE, kvm_xsave)

    def set_xsave(self, xsave: kvm_xsave) -> None:
        """KVM_SET_XSAVE."""
        ioctl(self.fd, abi.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> kvm_xcrs:
        """KVM_GET_XCRS."""
        return self._get(abi.KVM_GET_XCRS, kvm_xcrs)

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> kvm_debugregs:
        """KVM_GET_DEBUGREGS."""
        return self._get(abi.KVM_GET_DEBUGREGS, kvm_debugregs)

    def set_debugregs(self, regs: kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, regs)

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI on this vCPU (in-kernel irqchip)."""
        ioctl(self.fd, abi.KVM_NMI)

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd (not while its thread is in KVM_RUN)."""
        if self.fd >= 0:
            del self.kvm_run
            self._map.close()
            os.close(self.fd)
            self.fd = -1

    # state save/restore (api.rst: KVM_GET/SET_TSC_KHZ, KVM_GET_XSAVE2, KVM_SET_XSAVE, KVM_GET_NESTED_STATE) ----------
    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency in kHz (needs KVM_CAP_GET_TSC_KHZ)."""
        return _named_ioctl(self.fd, KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: run the guest TSC at ``khz`` kHz (KVM scales it if KVM_CAP_TSC_CONTROL; it refuses a
        frequency it cannot provide with EINVAL)."""
        _named_ioctl(self.fd, KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", khz)

    def get_xsave2(self, size: int) -> bytes:
        """KVM_GET_XSAVE2: the XSAVE area of ``size`` bytes, ``size`` = KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM
        fd (larger than 4096 when dynamic features such as AMX are enabled)."""
        buf = (ctypes.c_uint8 * max(size, 4096))()
        _named_ioctl(self.fd, KVM_GET_XSAVE2, "KVM_GET_XSAVE2", buf)
        return bytes(buf)

    def set_xsave_area(self, data: bytes) -> None:
        """KVM_SET_XSAVE from raw bytes: 4096 bytes, or the KVM_CAP_XSAVE2 size when that is larger (api.rst
        KVM_SET_XSAVE: KVM copies as many bytes as the vCPU's XSAVE area needs)."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        _named_ioctl(self.fd, abi.KVM_SET_XSAVE, "KVM_SET_XSAVE", buf)

    def get_nested_state(self, max_size: int) -> bytes:
        """KVM_GET_NESTED_STATE: struct kvm_nested_state (128-byte header: flags u16, format u16, size u32, then
        the VMX/SVM header and data), trimmed to the size KVM reports. ``max_size`` = KVM_CAP_NESTED_STATE."""
        buf = (ctypes.c_uint8 * max(max_size, NESTED_STATE_HEADER_SIZE))()
        ctypes.c_uint32.from_buffer(buf, 4).value = len(buf)
        _named_ioctl(self.fd, KVM_GET_NESTED_STATE, "KVM_GET_NESTED_STATE", buf)
        return bytes(buf)[:min(ctypes.c_uint32.from_buffer(buf, 4).value, len(buf))]


def _named_ioctl(fd: int, request: int, name: str, arg=None) -> int:
    """``ioctl`` for requests abi.IOCTL_NAMES does not list: the KvmError names ``name``."""
    try:
        return ioctl(fd, request, arg)
    except KvmError as e:
        raise KvmError(f"{name}: {os.strerror(e.errno)}", e.errno) from None


# <linux/kvm.h> numbers used only by the state ioctls above.
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_NESTED_STATE = 157
KVM_CLOCK_TSC_STABLE, KVM_CLOCK_REALTIME, KVM_CLOCK_HOST_TSC = 2, 1 << 2, 1 << 3
NESTED_STATE_HEADER_SIZE = 128  # struct kvm_nested_state without data
KVM_SET_TSC_KHZ = abi._IO(abi.KVMIO, 0xA2)
KVM_GET_TSC_KHZ = abi._IO(abi.KVMIO, 0xA3)
KVM_GET_NESTED_STATE = abi._IOWR(abi.KVMIO, 0xBE, NESTED_STATE_HEADER_SIZE)
KVM_GET_XSAVE2 = abi._IOR(abi.KVMIO, 0xCF, kvm_xsave)

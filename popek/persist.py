"""Snapshot and restore of a whole Popek VM: vCPUs, KVM VM state, platform and virtio device state, guest RAM."""

# Order (Firecracker's, vmm/src/persist.rs): save with every vCPU parked and device DMA quiesced, memory file first
# and state file second (popek/snapshot.py explains why). Restore: validate the state file and the host CPU, map
# RAM MAP_PRIVATE from the memory file, build the platform without a kernel (popek.vm.Vm, ``memory=``), then
# VM state (irqchip, PIT, kvmclock), then each vCPU's state, then the devices (which may raise interrupt lines,
# so they come after the irqchip).

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from popek.kvm.system import Kvm, KvmError
from popek.memory import GuestMemory
from popek.snapshot import (Snapshot, SnapshotError, VmSummary, check_host, cpu_fingerprint, load_memory, read_state,
                            write_memory, write_state)
from popek.state import StateError, restore_vcpu, restore_vm, save_vcpu, save_vm
from popek.vm import DriveConfig, Vm, VmConfig, VmError, VmState, check_resources

#: File names inside a snapshot directory.
STATE_FILE = "state"
MEMORY_FILE = "memory"
#: Seconds ``save`` waits for a virtio device's in-flight requests to complete.
IDLE_TIMEOUT = 10.0
#: The platform devices a snapshot holds (``Vm`` attribute names); "pci" is bus 0 with every virtio transport.
DEVICES = ("serial", "i8042", "rtc", "pci_io", "pci")


def _config_record(cfg: VmConfig) -> dict:
    return {"kernel": os.fspath(cfg.kernel), "initrd": None if cfg.initrd is None else os.fspath(cfg.initrd),
            "memory": cfg.memory, "cpus": cfg.cpus, "extract_payload": cfg.extract_payload,
            "repair_syscall": cfg.repair_syscall, "rng": cfg.rng,
            "drives": [{"path": os.fspath(d.path), "readonly": d.readonly, "serial": d.serial} for d in cfg.drives]}


def _config_of(summary: VmSummary, source: str) -> VmConfig:
    """The VmConfig a snapshot was taken of. :raises SnapshotError: for a missing or mistyped field."""
    x = summary.extra
    try:
        cfg = VmConfig(kernel=Path(x["kernel"]), cmdline=summary.cmdline,
                       initrd=None if x["initrd"] is None else Path(x["initrd"]), memory=int(x["memory"]),
                       cpus=summary.vcpu_count, extract_payload=bool(x["extract_payload"]),
                       repair_syscall=x["repair_syscall"], rng=bool(x["rng"]),
                       drives=[DriveConfig(Path(d["path"]), bool(d["readonly"]), d["serial"]) for d in x["drives"]])
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{source}: config.extra does not describe a Popek VM ({type(e).__name__}: {e})") from None
    if int(x["cpus"]) != summary.vcpu_count:
        raise SnapshotError(f"{source}: config says {x['cpus']} vCPUs and {summary.vcpu_count} vCPU states")
    return cfg


def save(vm: Vm, state_path: str | os.PathLike, memory_path: str | os.PathLike) -> Snapshot:
    """Write a full snapshot of ``vm``: the memory file ``memory_path``, then the state file ``state_path`` (both
    atomically, popek/snapshot.py formats).

    The VM must be running or paused. A running VM is paused for the snapshot and resumed afterwards (also when
    the snapshot fails); a paused one stays paused. Virtio devices finish their in-flight requests first
    (``VirtioDevice.wait_idle``). The debug port has no state (it only forwards writes).
    :returns: the Snapshot written. :raises VmError: if the VM is created-but-not-started or stopped, or a virtio
        device stays busy for IDLE_TIMEOUT s; StateUnsupported naming a state ioctl KVM fails; SnapshotError for
        an unstorable device value; OSError if writing fails (earlier files are then unchanged).
    """
    if vm.state not in (VmState.RUNNING, VmState.PAUSED):
        raise VmError(f"cannot snapshot a VM that is {vm.state.value} (only a running or paused one)")
    was_running = vm.state is VmState.RUNNING
    if was_running:
        vm.pause()
    try:
        for dev in vm.board.devices if vm.board is not None else ():
            if not dev.device.wait_idle(IDLE_TIMEOUT):
                raise VmError(f"{dev.device.name}: requests still in flight after {IDLE_TIMEOUT:g} s; no snapshot")
        vm_state = save_vm(vm._vm)
        vcpus = [save_vcpu(v.fd) for v in vm.vcpus]
        devices = {name: getattr(vm, name).state() for name in DEVICES}
        info = write_memory(memory_path, vm.memory)
        snap = Snapshot(VmSummary([(r.gpa, r.size) for r in vm.memory.regions], len(vcpus), vm.config.cmdline,
                                  _config_record(vm.config)),
                        cpu_fingerprint(vm._kvm.supported_cpuid()), vm_state, vcpus, devices, info)
        write_state(state_path, snap)
        return snap
    finally:
        if was_running:
            vm.resume()


def snapshot(vm: Vm, directory: str | os.PathLike) -> Path:
    """``save(vm, directory/state, directory/memory)``; the directory is created if missing. :returns: it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save(vm, d / STATE_FILE, d / MEMORY_FILE)
    return d


def load(state_path: str | os.PathLike, memory_path: str | os.PathLike, *,
         on_output: Callable[[bytes], None] | None = None) -> Vm:
    """A new Vm in state CREATED holding the snapshot's guest: ``start()`` resumes it where it was saved.

    Same memory layout, vCPU count and devices (drive images reopened by path); no kernel is loaded. Checks the
    state file (magic, version, CRC, fields), this host's CPU (``check_host``), the memory file's id and regions,
    and the device set before any KVM object is made; anything failing after that closes the half-built VM, so
    a refused snapshot leaves no KVM file descriptor or mapping behind.
    :raises SnapshotError: for a corrupt, truncated, mismatched or incompatible snapshot, or state KVM or a
        device refuses; VmError if the VM cannot be built (e.g. a drive image is gone); KvmError if KVM is
        unusable; OSError if a file cannot be read.
    """
    source = os.fspath(state_path)
    snap = read_state(state_path)
    cfg = _config_of(snap.config, source)
    try:
        check_resources(cfg.memory, cfg.cpus)
    except VmError as e:
        raise SnapshotError(f"{source}: {e}") from None
    with GuestMemory.x86(cfg.memory) as m:  # memfds are backed lazily: cheap
        layout = [(r.gpa, r.size) for r in m.regions]
    if snap.config.memory_regions != layout:
        raise SnapshotError(f"{source}: memory regions {snap.config.memory_regions} are not Popek's layout for "
                            f"{cfg.memory >> 20} MiB ({layout})")
    if sorted(snap.devices) != sorted(DEVICES):
        raise SnapshotError(f"{source}: device states {sorted(snap.devices)}, expected {sorted(DEVICES)}")
    kvm = Kvm()
    try:
        check_host(snap, kvm.supported_cpuid())
    finally:
        kvm.close()
    mem = load_memory(memory_path, snap.memory)
    vm = Vm(cfg, on_output=on_output, memory=mem)  # closes mem if it fails
    try:
        restore_vm(vm._vm, snap.vm)
        for v, st in zip(vm.vcpus, snap.vcpus):
            restore_vcpu(v.fd, st)
            if vm.repair is not None:  # arm the SYSCALL repair before the guest runs: its user code may SYSCALL
                vm.repair.poll(v.fd)   # before the first exit, and an unrepaired SYSCALL is a SIGSEGV in the guest
        for name in DEVICES:
            try:
                getattr(vm, name).restore(snap.devices[name])
            except Exception as e:  # each device raises its own kind (ValueError, PciError, VirtioError, KeyError)
                raise SnapshotError(f"{source}: cannot restore device {name}: {type(e).__name__}: {e}") from None
    except (StateError, KvmError) as e:
        vm.close()
        raise SnapshotError(f"{source}: KVM refused the saved state: {e}") from None
    except BaseException:
        vm.close()
        raise
    return vm


def restore(directory: str | os.PathLike, *, on_output: Callable[[bytes], None] | None = None) -> Vm:
    """``load(directory/state, directory/memory, on_output=on_output)``."""
    d = Path(directory)
    return load(d / STATE_FILE, d / MEMORY_FILE, on_output=on_output)

"""Snapshot and restore of a whole Popek VM: vCPUs, KVM VM state, platform and virtio device state, guest RAM."""

# Order (Firecracker's, vmm/src/persist.rs): save with every vCPU parked and device DMA quiesced, memory file first
# and state file second (popek/snapshot.py explains why). Restore: validate the state file and the host CPU, map
# RAM MAP_PRIVATE from the memory file, build the platform without a kernel (popek.vm.Vm, ``memory=``), then
# VM state (irqchip, PIT, kvmclock), then each vCPU's state, then the devices (which may raise interrupt lines,
# so they come after the irqchip).

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from popek.kvm.system import Kvm, KvmError
from popek.memory import PAGE_SIZE, GuestMemory
from popek.snapshot import (MemoryInfo, Snapshot, SnapshotError, VmSummary, check_host, cpu_fingerprint,
                            dirty_bitmaps, load_memory, read_memory_info, read_state, write_diff_memory, write_memory,
                            write_state)
from popek.state import StateError, restore_vcpu, restore_vm, save_vcpu, save_vm
from popek.vm import BalloonConfig, DriveConfig, Vm, VmConfig, VmError, VmState, VsockConfig, check_resources

#: File names inside a snapshot directory.
STATE_FILE = "state"
MEMORY_FILE = "memory"
#: Seconds ``save`` waits for a virtio device's in-flight requests to complete.
IDLE_TIMEOUT = 10.0
#: The platform devices a snapshot holds (``Vm`` attribute names); "pci" is bus 0 with every virtio transport.
DEVICES = ("serial", "i8042", "rtc", "pci_io", "pci", "debugport")
#: ``VmSummary.extra`` key of a Diff snapshot: the absolute path its base memory file had when the diff was taken
#: (a hint for restore; the base is identified by its id, which ``load_memory`` checks).
BASE_MEMORY = "base_memory"


@dataclass
class SnapshotBase:
    """What the next Diff snapshot of a VM is on (``Vm.snapshot_base``): the memory file of the VM's last snapshot
    taken or loaded, ``info`` (its MemoryInfo, whose id the diff records as base id) and ``path``.

    Firecracker's semantics: a Diff holds the pages dirtied since the last snapshot, so after a Diff the next one
    is on that Diff; restoring it needs the chain merged into a Full memory file first (``merge_diff``, `popek
    snapshot merge`), which keeps the diff's id.
    """

    info: MemoryInfo
    path: str


def _config_record(cfg: VmConfig) -> dict:
    return {"kernel": os.fspath(cfg.kernel), "initrd": None if cfg.initrd is None else os.fspath(cfg.initrd),
            "memory": cfg.memory, "cpus": cfg.cpus, "extract_payload": cfg.extract_payload,
            "repair_syscall": cfg.repair_syscall, "rng": cfg.rng,
            "drives": [{"path": os.fspath(d.path), "readonly": d.readonly, "serial": d.serial} for d in cfg.drives],
            "balloon": None if cfg.balloon is None else asdict(cfg.balloon),
            "vsock": None if cfg.vsock is None else {"guest_cid": cfg.vsock.guest_cid,
                                                     "uds_path": os.fspath(cfg.vsock.uds_path)}}


def _config_of(summary: VmSummary, source: str) -> VmConfig:
    """The VmConfig a snapshot was taken of. :raises SnapshotError: for a missing or mistyped field."""
    x = summary.extra
    try:
        cfg = VmConfig(kernel=Path(x["kernel"]), cmdline=summary.cmdline,
                       initrd=None if x["initrd"] is None else Path(x["initrd"]), memory=int(x["memory"]),
                       cpus=summary.vcpu_count, extract_payload=bool(x["extract_payload"]),
                       repair_syscall=x["repair_syscall"], rng=bool(x["rng"]),
                       drives=[DriveConfig(Path(d["path"]), bool(d["readonly"]), d["serial"]) for d in x["drives"]],
                       balloon=BalloonConfig(**x["balloon"]) if x.get("balloon") else None,
                       vsock=VsockConfig(int(x["vsock"]["guest_cid"]), Path(x["vsock"]["uds_path"]))
                       if x.get("vsock") else None)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{source}: config.extra does not describe a Popek VM ({type(e).__name__}: {e})") from None
    if int(x["cpus"]) != summary.vcpu_count:
        raise SnapshotError(f"{source}: config says {x['cpus']} vCPUs and {summary.vcpu_count} vCPU states")
    return cfg


def save(vm: Vm, state_path: str | os.PathLike, memory_path: str | os.PathLike, *, diff: bool = False) -> Snapshot:
    """Write a snapshot of ``vm``: the memory file ``memory_path``, then the state file ``state_path`` (both
    atomically, popek/snapshot.py formats).

    Full (``diff`` False): every RAM page (zero pages as holes). Diff (Firecracker's snapshot_type "Diff"): only the
    pages written since the VM's last snapshot (``Vm.snapshot_base``) -- KVM_GET_DIRTY_LOG's guest writes ORed with
    the VMM's own (``GuestMemory.take_host_dirty``: device DMA, emulated stores) -- over a base named by id; the
    state file also records the base's path (``BASE_MEMORY``). With ``track_dirty_pages`` either resets the logs
    and becomes the base of the next Diff.

    The VM must be running or paused. A running VM is paused for the snapshot and resumed afterwards (also when
    the snapshot fails); a paused one stays paused. Virtio devices finish their in-flight requests first
    (``VirtioDevice.wait_idle``). A failed snapshot puts the dirty pages it took back into the host-write log, so
    the next Diff still holds them.
    :returns: the Snapshot written. :raises VmError: if the VM is created-but-not-started or stopped, a virtio
        device stays busy for IDLE_TIMEOUT s, or a Diff is asked of a VM without ``track_dirty_pages`` or without
        an earlier snapshot; StateUnsupported naming a state ioctl KVM fails; SnapshotError for an unstorable
        device value; OSError if writing fails (earlier files are then unchanged).
    """
    if vm.state not in (VmState.RUNNING, VmState.PAUSED):
        raise VmError(f"cannot snapshot a VM that is {vm.state.value} (only a running or paused one)")
    if diff and not vm.config.track_dirty_pages:
        raise VmError("a Diff snapshot needs a VM started with track_dirty_pages (popek start --track-dirty-pages)")
    if diff and vm.snapshot_base is None:
        raise VmError("a Diff snapshot holds the pages written since the VM's last snapshot, and this VM has none: "
                      "take a Full snapshot first")
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
        extra = _config_record(vm.config)
        # Take (and so reset) the dirty logs before writing: a page a device writes meanwhile is then in the next
        # Diff's log, whether or not this file caught it. If writing fails they go back (``_unwrite``).
        bitmaps = dirty_bitmaps(vm._vm, vm.memory, vm.memory.take_host_dirty()) if vm.config.track_dirty_pages \
            else None
        try:
            if diff:
                info = write_diff_memory(memory_path, vm.memory, bitmaps, vm.snapshot_base.info)
                extra[BASE_MEMORY] = os.path.abspath(vm.snapshot_base.path)
            else:
                info = write_memory(memory_path, vm.memory)
            snap = Snapshot(VmSummary([(r.gpa, r.size) for r in vm.memory.regions], len(vcpus), vm.config.cmdline,
                                      extra),
                            cpu_fingerprint(vm._kvm.supported_cpuid()), vm_state, vcpus, devices, info)
            write_state(state_path, snap)
        except BaseException:
            if bitmaps is not None:
                _unwrite(vm, bitmaps)
            raise
        if vm.config.track_dirty_pages:
            vm.snapshot_base = SnapshotBase(info, os.path.abspath(memory_path))
        return snap
    finally:
        if was_running:
            vm.resume()


def _unwrite(vm: Vm, bitmaps: list[bytes]) -> None:
    """Put the pages of ``bitmaps`` (taken from the dirty logs for a snapshot that failed) back into the
    host-write log, so the next Diff still holds them."""
    for r, bm in zip(vm.memory.regions, bitmaps):
        for page in range(r.size // PAGE_SIZE):
            if bm[page >> 3] >> (page & 7) & 1:
                vm.memory.mark_dirty(r.gpa + page * PAGE_SIZE, PAGE_SIZE)


def snapshot(vm: Vm, directory: str | os.PathLike, *, diff: bool = False) -> Path:
    """``save(vm, directory/state, directory/memory, diff=diff)``; the directory is created if missing.
    :returns: it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save(vm, d / STATE_FILE, d / MEMORY_FILE, diff=diff)
    return d


def base_memory_of(snap: Snapshot, memory_path: str | os.PathLike,
                   base_memory: str | os.PathLike | None = None) -> str | None:
    """The base memory file a restore of ``snap`` needs: None if ``memory_path`` is a Full memory file (also a
    merged Diff), else ``base_memory`` if given, else the path the Diff recorded (``BASE_MEMORY``).

    :raises SnapshotError: if the memory file is corrupt, or a Diff has no base given or recorded.
    """
    if read_memory_info(memory_path).kind == "full":
        return None
    base = base_memory if base_memory is not None else snap.config.extra.get(BASE_MEMORY)
    if not isinstance(base, (str, os.PathLike)):
        raise SnapshotError(f"{memory_path} is a Diff memory file and its state file names no base: give its base")
    return os.fspath(base)


def check_snapshot(state_path: str | os.PathLike, memory_path: str | os.PathLike,
                   base_memory: str | os.PathLike | None = None) -> tuple[Snapshot, VmConfig, str | None]:
    """Every check ``load`` makes before it builds anything: the state file (magic, version, CRC, fields), the VM
    configuration it records, this host's CPU (``check_host``), the device set, the memory file (trailer, id,
    regions) and, for a Diff, its base (``base_memory_of``; its trailer, id and regions). Opens and closes
    /dev/kvm; no VM is made. For `popek snapshot restore` to refuse a snapshot before it starts a VMM.

    :returns: (the Snapshot, its VmConfig, the base memory path or None).
    :raises SnapshotError: saying which file is wrong and why; OSError if a file cannot be read; KvmError if
        /dev/kvm is unusable.
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
    mem = read_memory_info(memory_path)
    if mem.id != snap.memory.id:
        raise SnapshotError(f"{memory_path} is memory {mem.id}; the state file belongs to memory {snap.memory.id} "
                            f"(the two files are from different snapshots)")
    if mem.regions != snap.memory.regions:
        raise SnapshotError(f"{memory_path} has regions {mem.regions}, the state file {snap.memory.regions}")
    base = base_memory_of(snap, memory_path, base_memory)
    if base is not None:
        b = read_memory_info(base)
        if b.kind != "full":
            raise SnapshotError(f"{base} is itself a diff; merge it onto its own base first (popek snapshot merge)")
        if b.id != mem.base_id:
            raise SnapshotError(f"{memory_path} is a diff on memory {mem.base_id}, but {base} is memory {b.id}")
    return snap, cfg, base


def load(state_path: str | os.PathLike, memory_path: str | os.PathLike, *,
         on_output: Callable[[bytes], None] | None = None, base_memory: str | os.PathLike | None = None,
         track_dirty_pages: bool = False, vsock_uds: str | os.PathLike | None = None) -> Vm:
    """A new Vm in state CREATED holding the snapshot's guest: ``start()`` resumes it where it was saved.
    ``vsock_uds`` puts the vsock device's Unix socket there instead of the saved VM's path (a clone must not
    collide with its origin; the guest CID stays; the guest's vsock connections are reset either way).

    Same memory layout, vCPU count and devices (drive images reopened by path); no kernel is loaded. A Diff memory
    file is applied over its base (``base_memory``, else the path the Diff recorded; ``base_memory_of``). Makes
    every check of ``check_snapshot`` before any KVM object is made; anything failing after that closes the
    half-built VM, so a refused snapshot leaves no KVM file descriptor or mapping behind. ``track_dirty_pages``
    (Firecracker's SnapshotLoadParams field; the saved VM's own setting does not carry over) logs dirty pages from
    the load on: the loaded snapshot is then the base of the VM's next Diff (``Vm.snapshot_base``).
    :raises SnapshotError: for a corrupt, truncated, mismatched or incompatible snapshot, or state KVM or a
        device refuses; VmError if the VM cannot be built (e.g. a drive image is gone); KvmError if KVM is
        unusable; OSError if a file cannot be read.
    """
    source = os.fspath(state_path)
    snap, cfg, base = check_snapshot(state_path, memory_path, base_memory)
    cfg.track_dirty_pages = track_dirty_pages
    if cfg.vsock is not None and vsock_uds is not None:
        cfg.vsock = VsockConfig(cfg.vsock.guest_cid, Path(vsock_uds))
    mem = load_memory(memory_path, snap.memory, base_path=base)
    vm = Vm(cfg, on_output=on_output, memory=mem)  # closes mem if it fails
    if cfg.track_dirty_pages:
        vm.snapshot_base = SnapshotBase(snap.memory, os.path.abspath(memory_path))
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


def restore(directory: str | os.PathLike, *, on_output: Callable[[bytes], None] | None = None,
            base: str | os.PathLike | None = None, track_dirty_pages: bool = False) -> Vm:
    """``load(directory/state, directory/memory, base_memory=base/memory, ...)``: ``base`` is the directory of a
    Diff's base snapshot (None: the base path the Diff recorded)."""
    d = Path(directory)
    return load(d / STATE_FILE, d / MEMORY_FILE, on_output=on_output, track_dirty_pages=track_dirty_pages,
                base_memory=None if base is None else Path(base) / MEMORY_FILE)

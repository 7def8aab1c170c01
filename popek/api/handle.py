"""The VM handle the API controller drives: a ``popek.runner.VM`` built from a ``VmSpec``, states in API terms."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from popek.api.model import VmSpec
from popek.vm import VmResult, VmState

#: ``popek.vm.VmState`` -> the state names of Firecracker's InstanceInfo (``popek.api.controller.HANDLE_STATES``).
API_STATES = {VmState.CREATED: "Not started", VmState.RUNNING: "Running", VmState.PAUSED: "Paused",
              VmState.STOPPED: "Stopped"}
#: How often ``VmHandle.wait`` looks whether the VM has ended (seconds).
POLL_S = 0.05


def vm_arguments(spec: VmSpec) -> dict:
    """Translate a ``VmSpec`` into ``popek.runner.VM`` keyword arguments.

    boot-source ``kernel_image_path``/``initrd_path`` -> ``kernel``/``initrd`` (made absolute, so a file named like
    an image kind is never taken for one); ``boot_args`` -> ``append``; machine-config ``vcpu_count`` -> ``cpus``,
    ``mem_size_mib`` -> ``memory`` in bytes (MiB << 20), ``track_dirty_pages`` as is. ``command`` is None: a guest
    command travels inside ``boot_args`` as ``popek.cmd=`` (``popek.guestcmd.command_arg``).

    Unlike Firecracker, where ``boot_args`` is the whole kernel command line, Popek appends it to the arguments the
    VMM always sets (``popek.guestcmd.build_cmdline``: the 8250 console, ``reboot=k``, ``panic=-1`` and, on an
    emulating KVM, the switches the emulator needs); Linux lets a later argument override an earlier one.

    Drives (in spec order: the root drive first, /dev/vda) -> ``drives``: ``path_on_host``, ``is_read_only``, and
    ``drive_id`` as the virtio-blk device ID (VIRTIO_BLK_T_GET_ID, as Firecracker); a root device adds
    ``root=/dev/vda`` (or ``root=PARTUUID=...``) and ``ro``/``rw`` before ``boot_args``, as Firecracker does.
    Network interfaces -> ``nets`` (``popek.net.iface.NetConfig``: ``host_dev_name`` is the tap the VMM creates,
    ``guest_mac``, and Popek's ``host_address``/``guest_address``; absent ones are chosen at build).
    Vsock -> ``vsock`` (``popek.vm.VsockConfig``: ``guest_cid``, ``uds_path``), or None: no vsock device.
    Balloon -> ``balloon`` (``popek.vm.BalloonConfig``, the same four fields), or None: no balloon device.

    :raises ValueError: without a boot source.
    """
    boot, machine = spec.boot_source, spec.machine_config
    if boot is None:
        raise ValueError("the VM spec has no boot source")
    return dict(command=None, kernel=os.path.abspath(boot.kernel_image_path),
                initrd=os.path.abspath(boot.initrd_path) if boot.initrd_path else None,
                memory=machine.mem_size_mib << 20, cpus=machine.vcpu_count, append=_root_args(spec),
                track_dirty_pages=machine.track_dirty_pages, drives=_drives(spec), nets=_nets(spec),
                vsock=_vsock(spec), balloon=_balloon(spec))


def _balloon(spec: VmSpec):
    from popek.vm import BalloonConfig

    b = spec.balloon
    return None if b is None else BalloonConfig(b.amount_mib, b.deflate_on_oom, b.stats_polling_interval_s,
                                                b.free_page_reporting)


def _vsock(spec: VmSpec):
    from popek.vm import VsockConfig

    return None if spec.vsock is None else VsockConfig(spec.vsock.guest_cid, Path(spec.vsock.uds_path))


def _root_args(spec: VmSpec) -> str:
    """``boot_args``, after ``root=... ro|rw`` for a root drive (Firecracker's rule: /dev/vda, or PARTUUID)."""
    append, root = spec.boot_source.boot_args or "", spec.root_drive
    if root is None:
        return append
    where = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
    return f"root={where} {'ro' if root.is_read_only else 'rw'} {append}".strip()


def _drives(spec: VmSpec) -> list:
    from popek.vm import DriveConfig

    return [DriveConfig(Path(d.path_on_host), readonly=d.is_read_only, serial=d.drive_id)
            for d in spec.drives.values()]


def _nets(spec: VmSpec) -> list:
    from popek.net.iface import NetConfig

    return [NetConfig(tap=n.host_dev_name, host=n.host_address, guest=n.guest_address, mac=n.guest_mac)
            for n in spec.network_interfaces.values()]


class VmHandle:
    """Adapts a ``popek.runner.VM`` to ``popek.api.controller.VmHandle``.

    ``state`` is "Not started" (built, not started), "Running", "Paused" or "Stopped" (``API_STATES``); a guest that
    ended by itself (its command exited, reset, panic) reads "Stopped" as soon as its vCPUs are gone. ``on_state``
    is called with the ``popek.vm.VmState`` value ("running", "paused", "stopped") after each change this handle
    makes or observes. Thread-safe (the API thread and the VMM's main loop both use it).

    A spec without a boot source builds nothing: the handle waits for ``snapshot_load`` (the controller makes it
    that way for PUT /snapshot/load), reading "Not started" until then.

    :param spec: what to build (see :func:`vm_arguments`).
    :param vm_class: the VM class (default ``popek.runner.VM``; tests pass a fake with its signature).
    :param on_output: console output callback, passed to the VM (called on a vCPU thread).
    :param vsock_uds: where a VM loaded from a snapshot puts its vsock socket (``popek.persist.load``'s
        ``vsock_uds``; the VMM passes its runtime directory's, so clones never share one); None: the saved path.
    :raises ValueError, NotImplementedError: see :func:`vm_arguments`; and whatever building the VM raises
        (``popek.vm.VmError``, ``popek.boot.linux.BootError``, ``popek.kvm.system.KvmError``).
    """

    def __init__(self, spec: VmSpec, *, vm_class: type | None = None,
                 on_output: Callable[[bytes], None] | None = None, on_state: Callable[[str], None] | None = None,
                 vsock_uds: str | os.PathLike | None = None):
        self._vsock_uds = vsock_uds
        if vm_class is None:
            from popek.runner import VM as vm_class
        self.vm = None if spec.boot_source is None else vm_class(**vm_arguments(spec), on_output=on_output)
        self._on_output = on_output
        self._loaded_paused = False  # loaded from a snapshot without resume_vm: built, not started, reads Paused
        self._on_state = on_state or (lambda state: None)
        self._lock = threading.RLock()
        self._reported: VmState | None = None
        self.result: VmResult | None = None

    @property
    def state(self) -> str:
        if self.vm is None:
            return API_STATES[VmState.CREATED]
        self.wait(0)
        return API_STATES[self._vm_state()]

    def _vm_state(self) -> VmState:
        if self._loaded_paused and self.vm.state is VmState.CREATED:
            return VmState.PAUSED
        return self.vm.state

    def _report(self) -> None:
        if self._vm_state() is not self._reported:
            self._reported = self._vm_state()
            self._on_state(self._reported.value)

    def wait(self, timeout: float | None = None) -> VmResult | None:
        """Wait up to ``timeout`` seconds (None: forever) for the VM to end; its ``VmResult``, or None if still up.

        Polls every 50 ms under the handle's lock, so only one thread ever collects the result (``Vm.wait`` joins
        the vCPU threads and totals the statistics once they are gone).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.result is None and self.vm is not None and self.vm.state is not VmState.CREATED:
                    self.result = self.vm.wait(0)
                if self.result is not None:
                    self._report()
                    return self.result
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                return None
            time.sleep(left)

    def start(self) -> None:
        with self._lock:
            self.vm.start()
            self._report()

    def pause(self) -> None:
        with self._lock:
            self.vm.pause()
            self._report()

    def resume(self) -> None:
        with self._lock:
            if self._vm_state() is VmState.PAUSED and self.vm.state is VmState.CREATED:
                self.vm.start()  # a snapshot loaded without resume_vm: its vCPUs run for the first time
            else:
                self.vm.resume()
            self._report()

    # ---- the balloon (popek.devices.virtio.balloon.Balloon; PAGES_PER_MIB 4 KiB pages per MiB) ----------------

    def _balloon(self):
        device = self.vm.balloon if self.vm is not None else None
        if device is None:
            raise RuntimeError("this VM has no balloon device")
        return device

    def balloon_config(self) -> dict | None:
        """The balloon device's Firecracker Balloon fields (current target), or None if the VM has none."""
        device = self.vm.balloon if self.vm is not None else None
        if device is None:
            return None
        from popek.devices.virtio.balloon import PAGES_PER_MIB

        return {"amount_mib": device.target_pages // PAGES_PER_MIB, "deflate_on_oom": device.deflate_on_oom,
                "stats_polling_interval_s": device.stats_interval_s,
                "free_page_reporting": device.free_page_reporting}

    def balloon_update(self, amount_mib: int) -> None:
        """Set the balloon's target to ``amount_mib`` MiB. :raises RuntimeError: without a balloon; ValueError for
        more than the guest's memory."""
        from popek.devices.virtio.balloon import PAGES_PER_MIB

        device = self._balloon()
        memory_mib = self.vm.config.memory >> 20
        if amount_mib > memory_mib:
            raise ValueError(f"a balloon of {amount_mib} MiB is larger than the guest's {memory_mib} MiB")
        device.set_target(amount_mib * PAGES_PER_MIB)

    def balloon_set_stats_interval(self, seconds: int) -> None:
        """Refresh the guest's memory statistics every ``seconds`` (0: stop), starting with one refresh now."""
        device = self._balloon()
        device.set_stats_interval(seconds)
        if seconds:
            device.request_stats()

    def balloon_stats(self) -> dict:
        """``Balloon.stats()``. :raises RuntimeError: without a balloon, or with statistics disabled (interval 0)."""
        device = self._balloon()
        if not device.stats_interval_s:
            raise RuntimeError("balloon statistics are not enabled (PATCH /balloon/statistics with a "
                               "stats_polling_interval_s above 0)")
        return device.stats()

    def send_ctrl_alt_del(self) -> None:
        """Refused: Popek's i8042 has no keyboard attached (and the microvm kernel has no keyboard driver), so there
        is nothing to press Ctrl+Alt+Del on. :raises NotImplementedError: always (the API answers 400)."""
        raise NotImplementedError("SendCtrlAltDel needs a PS/2 keyboard, and Popek's i8042 has none attached; "
                                  "stop the VMM instead (SIGTERM stops the VM and releases it)")

    def stop(self) -> None:
        """Stop the vCPUs (from any state) and release the VM's memory and KVM file descriptors. Idempotent."""
        with self._lock:
            if self.vm is None:
                return
            if self.vm.state is VmState.CREATED:
                self.vm.close()
                return
            if self.result is None:
                self.result = self.vm.stop()
            else:
                self.vm.close()
            self._report()

    def snapshot_create(self, *, snapshot_type: str, snapshot_path: str, mem_file_path: str) -> None:
        """Write a snapshot of the (paused) VM with ``popek.persist.save``: the memory file, then the state.
        snapshot_type "Full" or "Diff" (the pages written since the VM's last snapshot; needs track_dirty_pages).

        :raises ValueError: for another snapshot_type; and what ``save`` raises (VmError, StateUnsupported,
            SnapshotError, OSError).
        """
        if snapshot_type not in ("Full", "Diff"):
            raise ValueError(f"snapshot_type {snapshot_type!r} is neither Full nor Diff")
        from popek.persist import save

        with self._lock:
            save(self.vm, snapshot_path, mem_file_path, diff=snapshot_type == "Diff")

    def snapshot_load(self, *, snapshot_path: str, mem_file_path: str, resume_vm: bool,
                      track_dirty_pages: bool = False, base_mem_file_path: str | None = None) -> None:
        """Build the VM from a snapshot (``popek.persist.load``; a Diff memory file over ``base_mem_file_path``,
        else over the base it recorded; ``track_dirty_pages`` lets the next snapshot be a Diff on this one) and
        start it if ``resume_vm``, else leave it Paused (``resume`` then starts it). Only on a handle made from a
        spec without a boot source. A started guest with a vsock device gets its clock and entropy refreshed
        through its agent in the background, if one answers (``popek.warm.refresh_restored``).

        :raises RuntimeError: if this handle already has a VM; SnapshotError (a ValueError) for a bad snapshot;
            and what building the VM raises.
        """
        from popek.persist import load

        with self._lock:
            if self.vm is not None:
                raise RuntimeError("a snapshot loads only into a VMM that has no VM yet")
            self.vm = load(snapshot_path, mem_file_path, on_output=self._on_output, vsock_uds=self._vsock_uds,
                           base_memory=base_mem_file_path,
                           track_dirty_pages=track_dirty_pages)
            if resume_vm:
                self.vm.start()
                if self.vm.config.vsock is not None:  # clones must not share the snapshot's clock and CRNG state
                    from popek.warm import refresh_restored

                    threading.Thread(target=refresh_restored, args=([self.vm.config.vsock.uds_path],),
                                     name="popek-refresh", daemon=True).start()
            else:
                self._loaded_paused = True
            self._report()

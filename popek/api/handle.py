"""The VM handle the API controller drives: a ``popek.runner.VM`` built from a ``VmSpec``, states in API terms."""

from __future__ import annotations

import os
import threading
import time
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
    ``mem_size_mib`` -> ``memory`` in bytes (MiB << 20). ``command`` is None: a guest command travels inside
    ``boot_args`` as ``popek.cmd=`` (``popek.guestcmd.command_arg``).

    Unlike Firecracker, where ``boot_args`` is the whole kernel command line, Popek appends it to the arguments the
    VMM always sets (``popek.guestcmd.build_cmdline``: the 8250 console, ``reboot=k``, ``panic=-1`` and, on an
    emulating KVM, the switches the emulator needs); Linux lets a later argument override an earlier one.

    :raises ValueError: without a boot source.
    :raises NotImplementedError: for drives, network interfaces or vsock, which ``popek.vm.Vm`` cannot attach yet.
    """
    boot, machine = spec.boot_source, spec.machine_config
    if boot is None:
        raise ValueError("the VM spec has no boot source")
    missing = [what for what, present in (("drives", spec.drives), ("network interfaces", spec.network_interfaces),
                                          ("vsock", spec.vsock)) if present]
    if missing:
        raise NotImplementedError(f"{' and '.join(missing)}: not supported by Popek's VM yet")
    return dict(command=None, kernel=os.path.abspath(boot.kernel_image_path),
                initrd=os.path.abspath(boot.initrd_path) if boot.initrd_path else None,
                memory=machine.mem_size_mib << 20, cpus=machine.vcpu_count, append=boot.boot_args or "")


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
    :raises ValueError, NotImplementedError: see :func:`vm_arguments`; and whatever building the VM raises
        (``popek.vm.VmError``, ``popek.boot.linux.BootError``, ``popek.kvm.system.KvmError``).
    """

    def __init__(self, spec: VmSpec, *, vm_class: type | None = None,
                 on_output: Callable[[bytes], None] | None = None, on_state: Callable[[str], None] | None = None):
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
        """Write a Full snapshot of the (paused) VM with ``popek.persist.save``: the memory file, then the state.

        :raises NotImplementedError: for snapshot_type "Diff" (not wired yet); and what ``save`` raises
            (VmError, StateUnsupported, SnapshotError, OSError).
        """
        if snapshot_type != "Full":
            raise NotImplementedError(f"{snapshot_type} snapshots are not supported yet (only Full)")
        from popek.persist import save

        with self._lock:
            save(self.vm, snapshot_path, mem_file_path)

    def snapshot_load(self, *, snapshot_path: str, mem_file_path: str, resume_vm: bool) -> None:
        """Build the VM from a snapshot (``popek.persist.load``) and start it if ``resume_vm``, else leave it
        Paused (``resume`` then starts it). Only on a handle made from a spec without a boot source.

        :raises RuntimeError: if this handle already has a VM; SnapshotError (a ValueError) for a bad snapshot;
            and what building the VM raises.
        """
        from popek.persist import load

        with self._lock:
            if self.vm is not None:
                raise RuntimeError("a snapshot loads only into a VMM that has no VM yet")
            self.vm = load(snapshot_path, mem_file_path, on_output=self._on_output)
            if resume_vm:
                self.vm.start()
            else:
                self._loaded_paused = True
            self._report()

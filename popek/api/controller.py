"""The API's state machine: applies validated requests to the pre-boot ``VmSpec``, then drives the VM it starts."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import stat
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

from popek.api.model import (ApiError, Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive,
                             InstanceActionInfo, InstanceInfo, MachineConfiguration, NetworkInterface,
                             SnapshotCreateParams, SnapshotLoadParams, Vm, VmSpec, Vsock)

log = logging.getLogger(__name__)

NOT_STARTED = "Not started"
#: The states a started VM handle may report (Firecracker's InstanceInfo.state, plus Stopped: Popek keeps serving
#: the API after the guest has ended, where Firecracker's process exits).
HANDLE_STATES = ("Running", "Paused", "Stopped")
APP_NAME = "Popek"


class VmHandle(Protocol):
    """What ``vm_factory(spec)`` returns: the VM the controller drives after InstanceStart or PUT /snapshot/load.

    ``state`` is one of :data:`HANDLE_STATES`. A method that cannot do what is asked raises OSError, ValueError or
    RuntimeError (NotImplementedError for "not supported yet"); its message goes to the API client with a 400.
    """

    state: str

    def start(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def send_ctrl_alt_del(self) -> None: ...

    def stop(self) -> None: ...

    def snapshot_create(self, *, snapshot_type: str, snapshot_path: str, mem_file_path: str) -> None: ...

    def snapshot_load(self, *, snapshot_path: str, mem_file_path: str, resume_vm: bool, track_dirty_pages: bool,
                      base_mem_file_path: str | None) -> None: ...

    def balloon_config(self) -> dict | None: ...

    def balloon_update(self, amount_mib: int) -> None: ...

    def balloon_set_stats_interval(self, seconds: int) -> None: ...

    def balloon_stats(self) -> dict: ...


@functools.cache
def vmm_version() -> str:
    """Popek's version: the source tree's pyproject.toml ``version``, else the installed distribution's, else
    "unknown". (Read with a regular expression and only then importlib.metadata: tomllib and importlib.metadata
    cost every VMM process ~2.4 MiB of memory, benchmarks/density.py.)"""
    try:
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
        m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.MULTILINE | re.DOTALL)
        if m:
            return m.group(1)
    except OSError:
        pass
    import importlib.metadata

    try:
        return importlib.metadata.version("popek")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_host_file(where: str, path: str, *, block_ok: bool = False, writable: bool = False) -> None:
    """Refuse (400) a host path that does not exist, is not a regular file (or block device) or lacks access."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ApiError(400, f"{where}: cannot use {path!r}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode))):
        kind = "a regular file or block device" if block_ok else "a regular file"
        raise ApiError(400, f"{where}: {path!r} is not {kind}")
    if not os.access(path, os.R_OK | (os.W_OK if writable else 0)):
        raise ApiError(400, f"{where}: {path!r} is not {'readable and writable' if writable else 'readable'}")


class Controller:
    """Holds the ``VmSpec``, applies API requests to it and, on InstanceStart, builds and drives the VM.

    Thread-safe: every operation runs under one lock (requests are serialized, as Firecracker's API thread does).
    The state rules follow Firecracker: pre-boot resources (boot source, machine config, drives, network
    interfaces, vsock, InstanceStart, snapshot load) are refused after the VM started, post-boot operations (PATCH
    /vm, SendCtrlAltDel, snapshot create) before it; a snapshot loads only into a VMM with nothing configured.
    Refusals raise :class:`ApiError` (400).

    :param vm_factory: ``vm_factory(spec: VmSpec) -> VmHandle``; called with a copy of the spec on InstanceStart
        (then ``start()``), or with the default spec on a snapshot load (then ``snapshot_load(...)`` instead).
    :param instance_id: the ``id`` GET / reports (Firecracker's default is "anonymous-instance").
    :param flush_metrics: what FlushMetrics calls; None: there is no metrics sink and FlushMetrics does nothing (as
        Firecracker without PUT /metrics).
    """

    def __init__(self, vm_factory: Callable[[VmSpec], VmHandle], *, instance_id: str = "anonymous-instance",
                 flush_metrics: Callable[[], None] | None = None):
        self._factory = vm_factory
        self.instance_id = instance_id
        self._flush_metrics = flush_metrics
        self._spec = VmSpec()
        self._configured = False  # a boot resource was PUT: a snapshot can no longer be loaded
        self._vm: VmHandle | None = None
        self._shut_down = False
        self._lock = threading.RLock()

    @property
    def spec(self) -> VmSpec:
        """A copy of the current pre-boot configuration."""
        with self._lock:
            return copy.deepcopy(self._spec)

    @property
    def vm(self) -> VmHandle | None:
        """The VM handle once started (or loaded), else None."""
        return self._vm

    @property
    def state(self) -> str:
        """"Not started", or the handle's state ("Running", "Paused", "Stopped").

        :raises RuntimeError: if the handle reports a state outside :data:`HANDLE_STATES` (a handle bug).
        """
        with self._lock:
            if self._vm is None:
                return NOT_STARTED
            state = self._vm.state
            if state not in HANDLE_STATES:
                raise RuntimeError(f"the VM handle reports state {state!r}, not one of {', '.join(HANDLE_STATES)}")
            return state

    def instance_info(self) -> dict:
        """GET /: Firecracker's InstanceInfo (``id``, ``state``, ``vmm_version``, ``app_name``)."""
        return InstanceInfo(id=self.instance_id, state=self.state, vmm_version=vmm_version(),
                            app_name=APP_NAME).to_json()

    def vm_config(self) -> dict:
        """GET /vm/config: the configuration as Firecracker's FullVmConfiguration (see ``VmSpec.to_json``)."""
        with self._lock:
            return self._spec.to_json()

    def machine_config(self) -> dict:
        """GET /machine-config: the machine configuration (defaults 1 vCPU, 128 MiB until PUT)."""
        with self._lock:
            return self._spec.machine_config.to_json()

    @contextmanager
    def _pre_boot(self, what: str, *, configures: bool = True) -> Iterator[None]:
        with self._lock:
            if self._vm is not None:
                raise ApiError(400, f"{what}: the requested operation is not supported after starting the microVM")
            yield
            self._configured = self._configured or configures

    @contextmanager
    def _post_boot(self, what: str) -> Iterator[VmHandle]:
        with self._lock:
            if self._vm is None:
                raise ApiError(400, f"{what}: the requested operation is not supported before starting the microVM")
            if self.state == "Stopped":
                raise ApiError(400, f"{what}: the microVM has stopped")
            yield self._vm

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """Call into the factory or the handle; their refusals (OSError, ValueError, RuntimeError) become 400s."""
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("%s failed", what, exc_info=True)
            raise ApiError(400, f"{what}: {_one_line(e)}") from e

    def put_boot_source(self, boot: BootSource) -> None:
        """PUT /boot-source. :raises ApiError: 400 if started, or the kernel/initrd is not a readable file."""
        with self._pre_boot("PUT /boot-source"):
            _check_host_file("boot-source.kernel_image_path", boot.kernel_image_path)
            if boot.initrd_path is not None:
                _check_host_file("boot-source.initrd_path", boot.initrd_path)
            self._spec.boot_source = boot

    def put_machine_config(self, machine: MachineConfiguration) -> None:
        """PUT /machine-config (replaces it whole; omitted optional fields take their defaults, as in Firecracker)."""
        with self._pre_boot("PUT /machine-config"):
            self._spec.machine_config = machine

    def put_drive(self, drive_id: str, drive: Drive) -> None:
        """PUT /drives/{drive_id}: add or replace a drive.

        :raises ApiError: 400 if started, the path id differs from the body's, the backing file or block device is
            missing or lacks the access ``is_read_only`` implies, or a second root device is asked for.
        """
        with self._pre_boot(f"PUT /drives/{drive_id}"):
            if drive.drive_id != drive_id:
                raise ApiError(400, f"the drive_id in the path ({drive_id!r}) differs from the body's "
                                    f"({drive.drive_id!r})")
            _check_host_file(f"drive '{drive_id}'.path_on_host", drive.path_on_host, block_ok=True,
                             writable=not drive.is_read_only)
            self._spec.set_drive(drive)

    def put_network_interface(self, iface_id: str, iface: NetworkInterface) -> None:
        """PUT /network-interfaces/{iface_id}: add or replace an interface (its tap device is opened at start).

        :raises ApiError: 400 if started, the path id differs from the body's, or the tap/MAC is used by another.
        """
        with self._pre_boot(f"PUT /network-interfaces/{iface_id}"):
            if iface.iface_id != iface_id:
                raise ApiError(400, f"the iface_id in the path ({iface_id!r}) differs from the body's "
                                    f"({iface.iface_id!r})")
            self._spec.set_network_interface(iface)

    def put_vsock(self, vsock: Vsock) -> None:
        """PUT /vsock: set the vsock device (its socket is bound at start). :raises ApiError: 400 if started."""
        with self._pre_boot("PUT /vsock"):
            self._spec.vsock = vsock

    # ---- the balloon (Firecracker's /balloon resources; popek.devices.virtio.balloon) ----------------------------

    def _balloon_fits(self, what: str, amount_mib: int) -> None:
        memory = self._spec.machine_config.mem_size_mib
        if amount_mib > memory:
            raise ApiError(400, f"{what}: a balloon of {amount_mib} MiB is larger than the guest's {memory} MiB")

    def _no_balloon(self, what: str) -> ApiError:
        return ApiError(400, f"{what}: there is no balloon device (PUT /balloon before starting the microVM)")

    def put_balloon(self, balloon: Balloon) -> None:
        """PUT /balloon: add or replace the balloon device. :raises ApiError: 400 if started, or amount_mib is more
        than the machine configuration's memory."""
        with self._pre_boot("PUT /balloon"):
            self._balloon_fits("PUT /balloon", balloon.amount_mib)
            self._spec.balloon = balloon

    def balloon(self) -> dict:
        """GET /balloon: the balloon's configuration; once started, the device's (current target and interval).
        :raises ApiError: 400 if there is no balloon device."""
        with self._lock:
            config = self._spec.balloon.to_json() if self._spec.balloon else None
            if self._vm is not None:
                config = self._call("GET /balloon", self._vm.balloon_config)
            if config is None:
                raise self._no_balloon("GET /balloon")
            return Balloon.from_json(config, "balloon").to_json()

    def patch_balloon(self, update: BalloonUpdate) -> None:
        """PATCH /balloon: a new target size, before or after start (the guest then inflates or deflates).
        :raises ApiError: 400 without a balloon, for more than the guest's memory, or once the guest stopped."""
        self._patch_balloon("PATCH /balloon", "amount_mib", update.amount_mib)

    def patch_balloon_stats(self, update: BalloonStatsUpdate) -> None:
        """PATCH /balloon/statistics: a new statistics polling interval, before or after start (unlike Firecracker,
        statistics can also be turned on or off after start: Popek's device always has its statsq).
        :raises ApiError: 400 without a balloon, or once the guest stopped."""
        self._patch_balloon("PATCH /balloon/statistics", "stats_polling_interval_s",
                            update.stats_polling_interval_s)

    def _patch_balloon(self, what: str, key: str, value: int) -> None:
        with self._lock:
            if self._vm is None:
                if self._spec.balloon is None:
                    raise self._no_balloon(what)
                if key == "amount_mib":
                    self._balloon_fits(what, value)
                self._spec.balloon = dataclasses.replace(self._spec.balloon, **{key: value})
                return
        with self._post_boot(what) as handle:
            if key == "amount_mib":
                self._call(what, handle.balloon_update, value)
            else:
                self._call(what, handle.balloon_set_stats_interval, value)

    def balloon_stats(self) -> dict:
        """GET /balloon/statistics: the balloon's size and the guest's latest memory statistics (BalloonStats).
        :raises ApiError: 400 before start, without a balloon, or with statistics disabled (interval 0)."""
        with self._post_boot("GET /balloon/statistics") as handle:
            stats = self._call("GET /balloon/statistics", handle.balloon_stats)
            known = {f.name for f in dataclasses.fields(BalloonStats)}
            return BalloonStats.from_json({k: v for k, v in stats.items() if k in known}, "statistics").to_json()

    def action(self, action: InstanceActionInfo) -> None:
        """PUT /actions: InstanceStart, SendCtrlAltDel or FlushMetrics (any time)."""
        if action.action_type == "InstanceStart":
            self.start()
        elif action.action_type == "SendCtrlAltDel":
            with self._post_boot("SendCtrlAltDel") as vm:
                self._call("SendCtrlAltDel", vm.send_ctrl_alt_del)
        elif self._flush_metrics is not None:
            self._call("FlushMetrics", self._flush_metrics)

    def start(self) -> None:
        """InstanceStart: ``vm_factory(copy of spec)`` then ``handle.start()``.

        :raises ApiError: 400 if already started, no boot source was PUT, or building/starting the VM failed (the
            handle is stopped and discarded then; the VMM stays "Not started").
        """
        with self._pre_boot("InstanceStart", configures=False):
            if self._spec.boot_source is None:
                raise ApiError(400, "InstanceStart: cannot start the microVM without a boot source "
                                    "(PUT /boot-source first)")
            if self._spec.balloon is not None:
                self._balloon_fits("InstanceStart", self._spec.balloon.amount_mib)
            handle = self._call("InstanceStart", self._factory, copy.deepcopy(self._spec))
            self._launch(handle, "InstanceStart", handle.start)

    def _launch(self, handle: VmHandle, what: str, fn: Callable, **kwargs) -> None:
        try:
            self._call(what, fn, **kwargs)
        except BaseException:
            try:
                handle.stop()
            except Exception:
                log.warning("stopping the VM after a failed %s failed too", what, exc_info=True)
            raise
        self._vm = handle

    def patch_vm(self, vm: Vm) -> None:
        """PATCH /vm: pause or resume; asking for the state it is already in succeeds and does nothing.

        :raises ApiError: 400 before start, or once the guest has stopped.
        """
        with self._post_boot("PATCH /vm") as handle:
            if vm.state == "Paused" and handle.state == "Running":
                self._call("Pausing the microVM", handle.pause)
            elif vm.state == "Resumed" and handle.state == "Paused":
                self._call("Resuming the microVM", handle.resume)

    def snapshot_create(self, params: SnapshotCreateParams) -> None:
        """PUT /snapshot/create: ``handle.snapshot_create(snapshot_type=, snapshot_path=, mem_file_path=)``.

        :raises ApiError: 400 before start, unless Paused, for Diff without track_dirty_pages (machine-config, or
            SnapshotLoadParams of the loaded snapshot), or when the handle refuses (e.g. a Diff before any Full).
        """
        with self._post_boot("PUT /snapshot/create") as handle:
            if handle.state != "Paused":
                raise ApiError(400, 'PUT /snapshot/create: the microVM must be Paused first (PATCH /vm '
                                    '{"state": "Paused"})')
            if params.snapshot_type == "Diff" and not self._spec.machine_config.track_dirty_pages:
                raise ApiError(400, "PUT /snapshot/create: Diff snapshots need machine-config track_dirty_pages")
            self._call("PUT /snapshot/create", handle.snapshot_create, snapshot_type=params.snapshot_type,
                       snapshot_path=params.snapshot_path, mem_file_path=params.mem_file_path)

    def snapshot_load(self, params: SnapshotLoadParams) -> None:
        """PUT /snapshot/load: ``vm_factory(default spec)`` then ``handle.snapshot_load(...)`` instead of start.

        :raises ApiError: 400 if started, if any boot resource was configured (Firecracker loads only into a fresh
            VMM), or when the factory/handle refuses (e.g. "not supported yet").
        """
        with self._pre_boot("PUT /snapshot/load", configures=False):
            if self._configured:
                raise ApiError(400, "PUT /snapshot/load: a snapshot loads only into a fresh VMM, before any boot "
                                    "resource is configured")
            handle = self._call("PUT /snapshot/load", self._factory, copy.deepcopy(self._spec))
            self._launch(handle, "PUT /snapshot/load", handle.snapshot_load, snapshot_path=params.snapshot_path,
                         mem_file_path=params.memory_path, resume_vm=params.resume_vm,
                         track_dirty_pages=params.track_dirty_pages, base_mem_file_path=params.base_mem_file_path)
            if params.track_dirty_pages:  # what GET /machine-config and the Diff check of snapshot_create see
                self._spec.machine_config = dataclasses.replace(self._spec.machine_config, track_dirty_pages=True)

    def shutdown(self) -> None:
        """Stop the VM if one was started (the VMM is exiting). Calls ``handle.stop()`` at most once."""
        with self._lock:
            if self._vm is not None and not self._shut_down:
                self._shut_down = True
                self._vm.stop()

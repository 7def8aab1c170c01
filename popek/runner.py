"""The Python API users script against: ``popek.VM`` (a guest with a command) and ``popek.run`` (boot, run, return)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from popek.boot.linux import ELF_CMDLINE_MAX, BootError
from popek.guestcmd import build_cmdline
from popek.kvm.system import Kvm, detect_flavor
from popek.vm import (BalloonConfig, DriveConfig, NetConfig, Vm, VmConfig, VmError, VmResult, VmStats, VsockConfig,
                      check_resources)

#: The guest `popek run` boots when no kernel is named; README says why (measured boot times).
DEFAULT_KERNEL = "microvm"
IMAGE_KINDS = ("microvm", "debian")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"256M"``, ``"1G"``, ``"512MiB"`` or a byte count -> bytes. :raises ValueError: on anything else."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (examples: 256M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def resolve_guest(kernel: str | Path | None, initrd: str | Path | None, *, progress: bool = True):
    """(kernel path, initrd path or None, System.map path or None) for a kernel name or path.

    A name ("microvm", "debian", None for the default) selects a Popek guest image, built on first use.
    """
    if kernel is None or str(kernel) in IMAGE_KINDS:
        from popek.images.build import build_image

        image = build_image(str(kernel or DEFAULT_KERNEL), progress=progress)
        return image.kernel, Path(initrd) if initrd else image.initrd, image.system_map
    return Path(kernel), Path(initrd) if initrd else None, None


#: virtio-blk's device ID string is at most 20 bytes (VIRTIO 1.2 §5.2.6, VIRTIO_BLK_T_GET_ID).
DRIVE_SERIAL_MAX = 20
_DRIVE_KEYS = ("path", "readonly", "serial")


def parse_drive(text: str) -> DriveConfig:
    """The ``--drive`` syntax ``path=FILE[,readonly=on|off][,serial=ID]`` (comma-separated key=value, any order)
    -> ``DriveConfig``. Only the syntax is checked here; ``check_drive`` looks at the file.

    :raises ValueError: for an item without ``=``, an unknown or repeated key, no or an empty path, or a readonly
        value other than on/off.
    """
    fields = _key_values(text, "drive", _DRIVE_KEYS, "path=FILE[,readonly=on][,serial=ID]")
    if not fields.get("path"):
        raise ValueError(f"drive {text!r}: no path=FILE")
    readonly = fields.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise ValueError(f"drive {text!r}: readonly={readonly!r}, expected on or off")
    return DriveConfig(Path(fields["path"]), readonly=readonly == "on", serial=fields.get("serial"))


def _key_values(text: str, what: str, keys: tuple[str, ...], syntax: str) -> dict[str, str]:
    """``key=value,key=value`` -> a dict. :raises ValueError: for an item without ``=``, an unknown or repeated key."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{what} {text!r}: {item!r} is not key=value (syntax: {syntax})")
        if key not in keys:
            raise ValueError(f"{what} {text!r}: unknown key {key!r} (known: {', '.join(keys)})")
        if key in fields:
            raise ValueError(f"{what} {text!r}: {key} given twice")
        fields[key] = value
    return fields


_NET_KEYS = ("tap", "host", "guest", "mac")
NET_SYNTAX = "[tap=NAME][,host=ADDR/PREFIX][,guest=ADDR][,mac=MAC]"


def parse_net(text: str) -> NetConfig:
    """The ``--net`` syntax ``[tap=NAME][,host=ADDR/PREFIX][,guest=ADDR][,mac=MAC]`` (comma-separated key=value,
    any order; empty: every default) -> ``popek.vm.NetConfig``. The values are checked by
    ``popek.net.iface.resolve``.

    :raises ValueError: for an item without ``=``, an unknown or repeated key, or an empty value.
    """
    if not text:
        return NetConfig()
    fields = _key_values(text, "net", _NET_KEYS, NET_SYNTAX)
    if empty := [k for k, v in fields.items() if not v]:
        raise ValueError(f"net {text!r}: {empty[0]}= has no value")
    return NetConfig(**fields)


def resolve_nets(nets: Iterable[NetConfig | str]) -> list[NetConfig]:
    """``--net`` texts (``parse_net``) or ``NetConfig``s with every address and MAC decided
    (``popek.net.iface.resolve``). :raises VmError: for a bad value or no free subnet; ValueError for bad syntax."""
    nets = [parse_net(n) if isinstance(n, str) else n for n in nets]
    if not nets:
        return []
    from popek.devices.virtio.device import VirtioError
    from popek.net.iface import resolve

    try:
        return resolve(nets)
    except (ValueError, VirtioError) as e:
        raise VmError(f"net: {e}") from None


def check_drive(drive: DriveConfig) -> None:
    """Refuse a drive the VM could not attach: a serial that is not ASCII or longer than 20 bytes, or an image
    ``popek.devices.virtio.block.open_image`` cannot open as asked (missing, not a file or block device, read-only
    asked read-write).

    :raises popek.vm.VmError: naming the drive and why.
    """
    from popek.devices.virtio.block import open_image
    from popek.devices.virtio.device import VirtioError

    serial = drive.serial or ""
    if not serial.isascii() or len(serial) > DRIVE_SERIAL_MAX:
        raise VmError(f"drive {os.fspath(drive.path)}: serial {serial!r} must be ASCII, "
                      f"at most {DRIVE_SERIAL_MAX} characters")
    try:
        os.close(open_image(drive.path, drive.readonly, readonly_hint="readonly=on"))
    except VirtioError as e:
        raise VmError(f"drive: {e}") from None


def check_inputs(kernel: str | Path | None, initrd: str | Path | None, memory: int, cpus: int, cmdline: str,
                 drives: Iterable[DriveConfig] = ()) -> None:
    """Refuse what would fail later, before any slow work (an image build): bad memory/vCPU counts
    (``popek.vm.check_resources``), a command line longer than x86's COMMAND_LINE_SIZE - 1 (2047 bytes) for a Popek
    image (a kernel path is checked against its own setup header by ``load_linux``), an initrd that cannot be read
    or is larger than guest memory, drives ``check_drive`` refuses, and an unusable KVM device
    (``popek.kvm.system.Kvm``).

    :raises popek.vm.VmError, popek.boot.linux.BootError, popek.kvm.system.KvmError: saying what and why.
    """
    check_resources(memory, cpus)
    if (kernel is None or str(kernel) in IMAGE_KINDS) and len(cmdline.encode()) > ELF_CMDLINE_MAX:
        raise BootError(f"command line is {len(cmdline.encode())} bytes; Linux on x86 accepts at most "
                        f"{ELF_CMDLINE_MAX}")
    if initrd is not None:
        try:
            with open(initrd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise BootError(f"cannot read initrd {initrd}: {e.strerror or e}") from None
        if size > memory:
            raise BootError(f"initrd of {size / (1 << 20):.1f} MiB does not fit in {memory >> 20} MiB of guest memory")
    for drive in drives:
        check_drive(drive)
    Kvm().close()


class VM(Vm):
    """A guest ready to run one command (or an interactive shell).

    >>> vm = popek.VM(command=["uname", "-r"], memory="256M", cpus=1).start()
    >>> for chunk in vm.console: ...
    >>> vm.wait().exit_status

    :param kernel: "microvm" (default), "debian", or a path to a bzImage/vmlinux.
    :param command: argv (or shell text) the guest init runs; None for an interactive shell on the console.
    :param append: extra kernel command-line arguments.
    :param drives: virtio-blk disks (``DriveConfig`` or the ``--drive`` text, see ``parse_drive``); the first is
        /dev/vda in the guest.
    :param rng: give the guest a virtio-rng device (/dev/hwrng).
    :param nets: virtio-net interfaces, each on a new tap (``NetConfig`` or the ``--net`` text, see ``parse_net``;
        addresses and MAC decided by ``resolve_nets``, the guest's init configures them from ``popek.net=``);
        ``self.nets`` holds them resolved, with the tap names the kernel gave.
    :param track_dirty_pages: log dirty pages for Diff snapshots (``popek.vm.VmConfig.track_dirty_pages``).
    :param rootfs: boot from a root file system instead of the initramfs: "debian" (built on first use, booted as a
        private copy unless ``persist``) or an ext4 image PATH (used in place); it is /dev/vda, before ``drives``
        (``popek.rootfs.open_root_disk``). ``rootfs_size`` (bytes or "2G") picks the named image of that size.
    :raises ValueError: for bad drive syntax; VmError, BootError, KvmError as ``check_inputs`` says (and
        ``popek.rootfs.check_boot_inputs`` with ``rootfs``).
    :param vsock: the virtio-vsock device the guest agent is reached through (``exec``): True (default) puts its
        Unix socket in a private temporary directory removed on close; a path puts it there (guest CID 3); a
        ``VsockConfig`` as given; None or False: no vsock device.
    :param balloon: a virtio-balloon device (``popek.vm.BalloonConfig``; None: none); ``self.balloon`` is its model.
    """

    def __init__(self, command: list[str] | str | None = None, *, kernel: str | Path | None = None,
                 initrd: str | Path | None = None, memory: str | int = "256M", cpus: int = 1, append: str = "",
                 on_output: Callable[[bytes], None] | None = None, progress: bool = False,
                 extract_payload: bool = True, drives: Iterable[DriveConfig | str] = (), rng: bool = True,
                 track_dirty_pages: bool = False, nets: Iterable[NetConfig | str] = (),
                 rootfs: str | Path | None = None, persist: bool = False, rootfs_size: str | int | None = None,
                 vsock: bool | str | Path | VsockConfig | None = True, balloon: BalloonConfig | None = None):
        self.root_disk = None  # before anything that can fail: close() releases it
        self._vsock_dir: Path | None = None  # a private directory holding the vsock socket, removed on close
        memory = parse_size(memory)
        if rootfs is not None:
            from popek.rootfs import check_boot_inputs, root_append

            check_boot_inputs(rootfs, kernel, initrd)
            rootfs_size = None if rootfs_size is None else parse_size(rootfs_size)
            append = root_append(append)
        drives = [parse_drive(d) if isinstance(d, str) else d for d in drives]
        nets = resolve_nets(nets)
        if nets:
            from popek.net.iface import guest_args

            append = f"{guest_args(nets)} {append}".strip()
        flavor = detect_flavor()
        cmdline = build_cmdline(emulating=flavor.emulating_cpl0, command=command, append=append)
        check_inputs(kernel, initrd, memory, cpus, cmdline, drives)
        kpath, ipath, self.system_map = resolve_guest(kernel, initrd, progress=progress)
        if rootfs is not None:
            from popek.rootfs import open_root_disk

            self.root_disk = open_root_disk(rootfs, persist=persist, size=rootfs_size, progress=progress)
            ipath, drives = None, [self.root_disk.drive, *drives]
        try:
            from popek.agent import vsock_config

            vsock, self._vsock_dir = vsock_config(vsock)
            super().__init__(VmConfig(kernel=kpath, initrd=ipath, cmdline=cmdline, memory=memory, cpus=cpus,
                                      extract_payload=extract_payload, drives=drives, rng=rng,
                                      track_dirty_pages=track_dirty_pages, nets=nets, vsock=vsock,
                                      balloon=balloon),
                             on_output=on_output, flavor=flavor)
        except BaseException:
            if self.root_disk is not None:
                self.root_disk.close()
            self._remove_vsock_dir()
            raise
        self._agent_ready = False
        if nets:
            from popek.net.iface import TapNet

            self.nets = [d.device.net for d in self.board.devices if isinstance(d.device, TapNet)]
        else:
            self.nets = []

    def close(self) -> None:
        """Release the VM (``popek.vm.Vm.close``), then its root disk (a private copy is removed) and the private
        vsock directory."""
        super().close()
        if self.root_disk is not None:
            self.root_disk.close()
        self._remove_vsock_dir()

    def _remove_vsock_dir(self) -> None:
        if self._vsock_dir is not None:
            shutil.rmtree(self._vsock_dir, ignore_errors=True)
            self._vsock_dir = None

    def exec(self, argv: list[str], *, stdin=None, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float | None = None, ready_timeout: float = 300.0):
        """Run ``argv`` in the running guest through its agent (``popek.agent.AgentClient.run``) and return a
        ``popek.agent.ExecResult`` (stdout, stderr, exit_status, error). The first call waits up to
        ``ready_timeout`` seconds for the agent (the guest may still be booting); ``timeout`` bounds the command.

        :raises VmError: if the VM has no vsock device; popek.agent.AgentNotReady, AgentTimeout, AgentError.
        """
        from popek.agent import AgentClient

        if self.config.vsock is None:
            raise VmError("this VM has no vsock device (vsock=None), so its guest agent cannot be reached")
        client = AgentClient(self.config.vsock.uds_path)
        if not self._agent_ready:
            client.wait_ready(ready_timeout)
            self._agent_ready = True
        return client.run(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout)


@dataclass
class RunResult:
    """What ``popek.run`` returns: the command's console output, its exit status, how the VM ended, statistics."""

    output: str
    exit_status: int | None
    result: VmResult
    stats: VmStats
    console: str


def run(command: list[str] | str, *, timeout: float | None = None, **vm_options) -> RunResult:
    """Boot a guest, run ``command`` in it, and return its output and exit status.

    :param timeout: seconds to wait for the guest (None: no limit); on timeout the VM is stopped.
    :param vm_options: passed to ``VM`` (kernel, initrd, memory, cpus, append, ...).
    """
    with VM(command, **vm_options) as vm:
        vm.start()
        result = vm.wait(timeout) or vm.stop()
        return RunResult(output=vm.command_output.decode(errors="replace").replace("\r\n", "\n"),
                         exit_status=result.exit_status, result=result, stats=vm.stats,
                         console=vm.output.decode(errors="replace"))

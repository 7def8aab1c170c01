"""The Python API users script against: ``popek.VM`` (a guest with a command) and ``popek.run`` (boot, run, return)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from popek.boot.linux import ELF_CMDLINE_MAX, BootError
from popek.guestcmd import build_cmdline
from popek.kvm.system import Kvm, detect_flavor
from popek.vm import Vm, VmConfig, VmResult, VmStats, check_resources

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


def check_inputs(kernel: str | Path | None, initrd: str | Path | None, memory: int, cpus: int, cmdline: str) -> None:
    """Refuse what would fail later, before any slow work (an image build): bad memory/vCPU counts
    (``popek.vm.check_resources``), a command line longer than x86's COMMAND_LINE_SIZE - 1 (2047 bytes) for a Popek
    image (a kernel path is checked against its own setup header by ``load_linux``), an initrd that cannot be read
    or is larger than guest memory, and an unusable KVM device (``popek.kvm.system.Kvm``).

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
    Kvm().close()


class VM(Vm):
    """A guest ready to run one command (or an interactive shell).

    >>> vm = popek.VM(command=["uname", "-r"], memory="256M", cpus=1).start()
    >>> for chunk in vm.console: ...
    >>> vm.wait().exit_status

    :param kernel: "microvm" (default), "debian", or a path to a bzImage/vmlinux.
    :param command: argv (or shell text) the guest init runs; None for an interactive shell on the console.
    :param append: extra kernel command-line arguments.
    """

    def __init__(self, command: list[str] | str | None = None, *, kernel: str | Path | None = None,
                 initrd: str | Path | None = None, memory: str | int = "256M", cpus: int = 1, append: str = "",
                 on_output: Callable[[bytes], None] | None = None, progress: bool = False,
                 extract_payload: bool = True):
        memory = parse_size(memory)
        flavor = detect_flavor()
        cmdline = build_cmdline(emulating=flavor.emulating_cpl0, command=command, append=append)
        check_inputs(kernel, initrd, memory, cpus, cmdline)
        kpath, ipath, self.system_map = resolve_guest(kernel, initrd, progress=progress)
        super().__init__(VmConfig(kernel=kpath, initrd=ipath, cmdline=cmdline, memory=memory, cpus=cpus,
                                  extract_payload=extract_payload),
                         on_output=on_output, flavor=flavor)


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

"""The contract with the guest: the kernel command line Popek builds and how the guest init reports back."""

from __future__ import annotations

import base64
import re
import shlex

#: Always on: the 8250 console, reset through the i8042 (which ends the VM), and a quiet boot.
BASE_ARGS = ("console=ttyS0", "reboot=k", "panic=-1", "quiet")

#: Switches for an emulating KVM (environment.md "What the emulator cannot do"): hide the features whose
#: instructions the emulator fails on (clearcpuid takes 32*word+bit in Linux 6.1: 141 CX16, 151 POPCNT,
#: 154 XSAVE, 288 FSGSBASE, 308 SMAP, 515 PKU; and the SIMD crypto that Debian's kernel runs at boot, whose
#: SSE register moves such as ``movd xmm15, ecx`` the emulator fails on: 129 PCLMULQDQ, 137 SSSE3, 147 SSE4_1,
#: 148 SSE4_2, 153 AES), skip XSAVE, and cut boot work that costs minutes when every
#: kernel instruction is emulated (page zeroing on allocation, KASLR's relocation, TSC calibration, the
#: crypto self-tests). ``nopv`` turns off KVM's paravirtual guest features: measured here, the PV IPI hypercall
#: spun forever while bringing up a second vCPU (and the KVM PTP clock's hypercall spun in its init); with
#: ``nopv`` a 2-vCPU microvm guest reached init in 17 s, where 1 vCPU with PV on took 27 s.
EMULATING_KVM_ARGS = (
    "nopv",
    "noxsave",
    "clearcpuid=129,137,141,147,148,151,153,154,288,308,515",
    "init_on_alloc=0",
    "nokaslr",
    "tsc=reliable",
    "cryptomgr.notests",
    "no_timer_check",
)

#: Name of the command-line parameter the guest's /init reads its command from (base64 of the shell text).
CMD_PARAM = "popek.cmd"


def command_arg(command: list[str] | str) -> str:
    """``popek.cmd=<base64>`` for a command given as argv (shell-quoted) or as shell text."""
    text = command if isinstance(command, str) else shlex.join(command)
    return f"{CMD_PARAM}={base64.b64encode(text.encode()).decode()}"


def build_cmdline(*, emulating: bool, command: list[str] | str | None = None, append: str = "") -> str:
    """The full kernel command line.

    :param emulating: the KVM emulates guest CPL 0 (``popek.kvm.system.detect_flavor``): add the switches it needs.
    :param command: what the init runs (None: an interactive shell).
    :param append: the user's extra arguments, last so they can override ours.
    """
    args = list(BASE_ARGS)
    if emulating:
        args += EMULATING_KVM_ARGS
    if command:
        args.append(command_arg(command))
    if append:
        args.append(append)
    return " ".join(args)


#: The init's report for kernels without /dev/port: "ESC ] popek;PORT=VALUE BEL" on the console (an OSC sequence,
#: which terminals ignore), meaning the same byte write to the debug port (popek/images/init).
CONSOLE_PORT_WRITE = re.compile(rb"\x1b\]popek;(\d{1,5})=(\d{1,3})\x07")

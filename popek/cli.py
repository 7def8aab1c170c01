"""The `popek` command line: a thin layer that parses, calls the Python API and prints."""

from __future__ import annotations

import json
import signal
import sys
import time

import click

from popek.images.rootfs import ROOTFS_KINDS
from popek.runner import DEFAULT_KERNEL, IMAGE_KINDS, VM

PROCESS_START = time.monotonic()


def fail(message: str, code: int = 2):
    click.echo(f"popek: error: {message}", err=True)
    sys.exit(code)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from popek.boot.linux import BootError
    from popek.images.build import ImageError
    from popek.kvm.system import KvmError
    from popek.vm import VmError

    return (BootError, ImageError, KvmError, VmError, ValueError, OSError)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class PopekGroup(click.Group):
    """click's group, except that a usage error (unknown option, ``--cpus banana``) prints one ``popek: error:`` line
    and a pointer to ``--help`` (exit 2) instead of click's multi-line usage block, like every other refusal."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # `popek` or `popek image` alone: the help text, as click prints it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else "popek"
            fail(f"{e.format_message()} (see `{command} --help`)")
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.Abort:
            fail("aborted", 130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


#: ``--drive`` and ``--net`` of `popek run` and `popek start` (parsed by popek.runner.parse_drive / parse_net).
drive_option = click.option("--drive", "drives", multiple=True, metavar="path=FILE[,readonly=on][,serial=ID]",
                            help="attach a raw disk image as virtio-blk (repeatable; the first is /dev/vda)")
net_option = click.option("--net", "nets", multiple=True, is_flag=False, flag_value="",
                          metavar="[tap=NAME][,host=ADDR/PREFIX][,guest=ADDR][,mac=MAC]",
                          help="add virtio-net on a new tap, removed with the VM (repeatable; `--net` alone: tap "
                               "popek<N> on a free /30 of 172.30.0.0/16, host .1, guest .2; the guest configures "
                               "it, the first interface's host address is its default route)")


def rootfs_options(f):
    """`--rootfs debian|PATH [--persist] [--rootfs-size SIZE]` of `popek run` and `popek start` (popek.rootfs)."""
    f = click.option("--rootfs-size", default=None, metavar="SIZE",
                     help="with --rootfs debian: the image built with this size")(f)
    f = click.option("--persist", is_flag=True,
                     help="with --rootfs debian: boot the cached image itself, keeping writes")(f)
    return click.option("--rootfs", default=None, metavar="debian|PATH",
                        help="boot from a root file system as /dev/vda, no initramfs: Popek's Debian image (a "
                             "private copy unless --persist) or an ext4 image PATH (used in place: writes persist)")(f)


def check_rootfs_options(rootfs, persist, rootfs_size) -> None:
    """Refuse --persist or --rootfs-size without --rootfs (exit 2)."""
    if (persist or rootfs_size) and rootfs is None:
        fail("--persist and --rootfs-size go with --rootfs")


def jail_options(f):
    """`--jail [--uid N --gid N]`: run a detached VM's VMM in its jail (``popek.jail``)."""
    f = click.option("--gid", type=int, default=None, help="with --jail: the VMM's gid (default 65534)")(f)
    f = click.option("--uid", type=int, default=None, help="with --jail: the VMM's uid (default 65534)")(f)
    return click.option("--jail", is_flag=True, help="run the VMM in its own namespaces, chroot, unprivileged "
                        "uid/gid and seccomp filter (needs root)")(f)


@click.group(cls=PopekGroup)
@click.version_option(package_name="popek")
def main() -> None:
    """Popek: a virtual machine monitor on Linux KVM."""


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--kernel", default=None, metavar="microvm|debian|PATH",
              help=f"guest kernel: a Popek image name or a bzImage/vmlinux path [default: {DEFAULT_KERNEL}]")
@click.option("--initrd", default=None, metavar="PATH", help="initramfs (default: the image's)")
@click.option("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
@click.option("--memory", "-m", default="256M", show_default=True, help="guest RAM (e.g. 256M, 1G)")
@click.option("--cpus", "-c", default=1, show_default=True, type=int, help="number of vCPUs")
@click.option("--stats", is_flag=True, help="print time to init, exits by reason, emulated instructions, guest/VMM time")
@click.option("--stats-json", is_flag=True, help="print the statistics as one JSON line on stderr")
@click.option("--profile", is_flag=True, help="sample guest RIPs and print the hottest spots")
@click.option("--profile-interval", default=0.02, show_default=True, type=float, help="seconds between samples")
@click.option("--system-map", default=None, metavar="PATH", help="System.map to symbolize the profile")
@click.option("--no-extract", is_flag=True, help="boot a bzImage through its own decompressor")
@drive_option
@click.option("--no-rng", is_flag=True, help="no virtio-rng device (/dev/hwrng) in the guest")
@net_option
@rootfs_options
@click.option("--vsock", "vsock", default=None, metavar="PATH",
              help="add virtio-vsock with its Unix socket at PATH (Firecracker's hybrid vsock; the guest agent is on "
                   "port 52); detached VMs always get one in their runtime directory")
@click.option("--detach", "-d", is_flag=True, help="run in the background in its own VMM process (see `popek ps`)")
@click.option("--name", default=None, help="with --detach: the VM's name (default: generated)")
@jail_options
@click.option("--cold", is_flag=True, help="boot the guest, even if a warm template exists (popek.warm; also "
              "POPEK_NO_WARM=1)")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(kernel, initrd, append, memory, cpus, stats, stats_json, profile, profile_interval, system_map, no_extract,
        drives, no_rng, nets, rootfs, persist, rootfs_size, vsock, detach, name, jail, uid, gid, cold, command):
    """Boot a guest and run COMMAND in it (after `--`); with no COMMAND, an interactive shell.

    Exits with the guest command's exit status. With --detach, prints the VM's name and returns once it runs.
    """
    check_rootfs_options(rootfs, persist, rootfs_size)
    if jail and not detach:
        fail("--jail goes with --detach (the jailed VMM is a detached VM's own process)")
    if detach:
        if stats or stats_json or profile or no_extract or no_rng:
            fail("--detach does not take --stats, --profile, --no-extract or --no-rng yet")
        if vsock is not None:
            fail("--detach puts the VM's vsock socket in its runtime directory (`popek exec` finds it); no --vsock")
        click.echo(cli_vms.start_detached(name, list(command) or None, kernel=kernel, initrd=initrd, append=append,
                                          memory=memory, cpus=cpus, drives=drives, nets=nets, jail=jail,
                                          uid=uid, gid=gid, rootfs=rootfs, persist=persist,
                                          rootfs_size=rootfs_size))
        return
    from popek import warm

    if warm.cold_reason(command=command, kernel=kernel, initrd=initrd, drives=drives, nets=nets, rootfs=rootfs,
                        profile=profile, no_extract=no_extract, no_rng=no_rng, vsock=vsock, cold=cold) is None:
        _run_warm(warm, list(command), kernel, memory, cpus, append, stats, stats_json)
    from popek.console import Console
    from popek.profiler import Profiler, SystemMap

    out = sys.stdout.buffer
    try:
        vm = VM(list(command) or None, kernel=kernel, initrd=initrd, memory=memory, cpus=cpus, append=append,
                on_output=lambda data: (out.write(data), out.flush()), progress=True,
                extract_payload=not no_extract, drives=list(drives), rng=not no_rng, nets=list(nets),
                rootfs=rootfs, persist=persist, rootfs_size=rootfs_size, vsock=vsock)
    except _bad_input_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted before the VM started", 130)
    for n in vm.nets:
        click.echo(f"popek: tap {n.tap} {n.host} <-> guest {n.guest} ({n.mac})", err=True)
    smap_path = system_map or vm.system_map
    profiler = Profiler(vm.vcpus, profile_interval) if profile else None
    interactive = not command
    console = Console(sys.stdin.fileno(), out, on_input=vm.send_input, on_quit=vm.stop_async) if interactive else None
    result, interrupted = None, False
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the VM cleanly too, like Ctrl-C
    try:
        if console:
            console.start()
        vm.start()
        if profiler:
            profiler.start()
        # Wait in short slices: SIGINT may be delivered to a vCPU thread, and Python runs its handler (raising
        # KeyboardInterrupt here) only when the main thread next executes bytecode.
        while (result := vm.wait(0.2)) is None:
            pass
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean stop
        result, interrupted = vm.stop(), True
        click.echo("\npopek: interrupted; VM stopped", err=True)
    finally:
        if profiler:
            profiler.stop()
        if console:
            console.close()
        vm.close()
    if profiler:
        smap = SystemMap.load(smap_path) if smap_path else None
        _print_profile(profiler.report(smap))
    if stats or stats_json:
        _print_stats(dict(vm.stats.as_dict(), warm=False), as_json=stats_json)
    sys.exit(130 if interrupted else _exit_code(result, interactive))


def _run_warm(warm, command, kernel, memory, cpus, append, stats, stats_json) -> None:
    """`popek run -- COMMAND` from a warm template (popek.warm.run): the command's stdout and stderr stream to
    ours; exits with its status."""
    from popek.agent import AgentError

    def emit(stream):
        return lambda data: (stream.write(data), stream.flush())

    interrupted = []

    def on_signal(signum, frame):  # the first one reaches the command as SIGINT (AgentClient.exec), then we stop
        interrupted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        r = warm.run(command, kernel=kernel, memory=memory, cpus=cpus, append=append,
                     on_stdout=emit(sys.stdout.buffer), on_stderr=emit(sys.stderr.buffer),
                     on_console=emit(sys.stdout.buffer), note=lambda msg: click.echo(f"popek: {msg}", err=True))
    except _bad_input_errors() as e:
        fail(str(e))
    except warm.GuestEnded as e:
        sys.exit(_exit_code(e.result, False))
    except AgentError as e:
        fail(f"guest agent: {e}", 1)
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo("\npopek: interrupted; VM stopped", err=True)
        sys.exit(130)
    if stats or stats_json:
        _print_stats(dict(r.stats, warm=r.warm, warm_template_made=r.made, warm_key=r.key, warm_steps_s=r.timings),
                     as_json=stats_json)
    sys.exit(r.exit_status)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _exit_code(result, interactive: bool) -> int:
    if result is None:
        return 130
    if result.reason == "exit":
        return result.exit_status
    if result.reason == "stopped":
        return 130 if not interactive else 0
    if result.reason in ("reset", "shutdown", "system-event") and interactive:
        return 0
    what = {"panic": "", "error": "VMM error: "}.get(result.reason, f"the guest ended ({result.reason}) "
                                                                    "before the command reported an exit status")
    click.echo(f"popek: {what}{result.detail}", err=True)
    return 1


def _print_stats(d: dict, *, as_json: bool) -> None:
    d = dict(d, time_since_process_start_s=time.monotonic() - PROCESS_START)
    if as_json:
        click.echo(json.dumps(d), err=True)
        return
    from rich.console import Console as RichConsole
    from rich.table import Table

    t = Table(title="popek run statistics", show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    tti = d["time_to_init_s"]
    t.add_row("time to init", "not reached" if tti is None else f"{tti:.3f} s")
    t.add_row("wall time", f"{d['wall_s']:.3f} s")
    t.add_row("time in guest (KVM_RUN)", f"{d['time_in_guest_s']:.3f} s")
    t.add_row("time in VMM", f"{d['time_in_vmm_s']:.3f} s")
    for reason, n in sorted(d["exits"].items(), key=lambda kv: -kv[1]):
        t.add_row(f"exits: {reason}", str(n))
    for mnem, n in sorted(d["emulated_instructions"].items(), key=lambda kv: -kv[1]):
        t.add_row(f"emulated: {mnem}", str(n))
    t.add_row("syscalls repaired", str(d["syscalls_repaired"]))
    t.add_row("debug exits", str(d["debug_exits"]))
    if d.get("warm") is not None:
        t.add_row("warm start", "yes" if d["warm"] else "no" + (" (made the template)" if d.get("warm_template_made")
                                                               else ""))
        for step, s in d.get("warm_steps_s", {}).items():
            t.add_row(f"warm step: {step}", f"{s:.3f} s")
    RichConsole(stderr=True).print(t)


def _print_profile(rows) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    t = Table(title="guest profile (RIP samples)")
    t.add_column("where")
    t.add_column("samples", justify="right")
    t.add_column("share", justify="right")
    for r in rows:
        t.add_row(r.where, str(r.samples), f"{100 * r.share:.1f}%")
    RichConsole(stderr=True).print(t)


@main.group()
def image() -> None:
    """Build and list guest images (kernels + initramfs from Debian packages)."""


@image.command("build")
@click.option("--kernel", "kinds", multiple=True, type=click.Choice(IMAGE_KINDS), help="which image (repeatable)")
@click.option("--rootfs", "rootfs_kinds", multiple=True, type=click.Choice(ROOTFS_KINDS),
              help="a root file system image (ext4, for `popek run --rootfs`; needs root and debootstrap)")
@click.option("--rootfs-size", default=None, metavar="SIZE",
              help="with --rootfs: the image's size (default: its files + 10% + 256 MiB; sparse)")
@click.option("--force", is_flag=True, help="rebuild even if cached")
def image_build(kinds, rootfs_kinds, rootfs_size, force) -> None:
    """Build guest images into the cache (default: the default guest; with only --rootfs, just that)."""
    from popek.images.build import build_image
    from popek.images.rootfs import build_rootfs
    from popek.runner import parse_size

    try:
        if rootfs_size is not None and not rootfs_kinds:
            raise ValueError("--rootfs-size goes with --rootfs")
        size = None if rootfs_size is None else parse_size(rootfs_size)
        for kind in kinds or (() if rootfs_kinds else (DEFAULT_KERNEL,)):
            img = build_image(kind, progress=True, force=force)
            click.echo(f"{img.name}: kernel {img.kernel}  initrd {img.initrd}  ({img.version})")
        for kind in rootfs_kinds:
            root = build_rootfs(kind, size=size, progress=True, force=force)
            click.echo(f"{root.name}: rootfs {root.path}  ({root.suite}, {root.size >> 20} MiB, sparse)")
    except _bad_input_errors() as e:
        fail(str(e))


@image.command("list")
def image_list() -> None:
    """Show which guest images are cached."""
    from popek.images.build import find_image

    for kind in IMAGE_KINDS:
        img = find_image(kind)
        click.echo(f"{kind:8} " + (f"{img.version}  {img.kernel.parent}" if img else "not built"))
    from popek.images.rootfs import find_rootfs

    for kind in ROOTFS_KINDS:
        try:
            root = find_rootfs(kind)
        except _bad_input_errors() as e:
            click.echo(f"rootfs {kind:8} cannot be built here: {e}")
            continue
        click.echo(f"rootfs {kind} " + (f"{root.suite}  {root.path}" if root else "not built"))
    from popek.warm import list_templates

    for path in list_templates():
        click.echo(f"warm     {path.name}  {path}")


@image.command("forget-warm")
def image_forget_warm() -> None:
    """Remove every warm-start template (popek.warm; the next `popek run -- CMD` of each kind makes it again)."""
    from popek.warm import forget_all, warm_root

    click.echo(f"removed {forget_all()} warm template(s) from {warm_root()}")


@main.command()
def info() -> None:
    """Describe this host's KVM: API version, flavour (hardware or emulating), what Popek does about it."""
    from popek.kvm.system import Kvm, KvmError, detect_flavor

    try:
        kvm = Kvm()
    except KvmError as e:
        fail(str(e))
    f = detect_flavor()
    click.echo(f"/dev/kvm: API version {kvm.api_version}")
    click.echo(f"flavour: {f.name} ({f.reason})")
    if f.emulating_cpl0:
        click.echo("guest kernel code is emulated: Popek adds the kernel switches it needs, emulates what the KVM "
                   "cannot, and repairs SYSCALL from guest user mode")
    kvm.close()


from popek import cli_vms  # noqa: E402,F401  (registers the VM lifecycle commands: start, ps, stop, ...)
from popek import cli_balloon  # noqa: E402,F401  (registers `popek balloon`)
from popek import cli_exec  # noqa: E402,F401  (registers `popek exec`)

if __name__ == "__main__":
    # Run as `python -m popek.cli`, this file is __main__ and a second copy is imported as popek.cli, which is the
    # group cli_vms registered its commands on: run that one.
    from popek.cli import main as registered_main

    registered_main()

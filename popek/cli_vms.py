"""`popek` commands for many VMs on one host: start (a detached VMM per VM), ps, stop, kill, pause, console, logs, rm."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from popek.cli import _bad_input_errors, check_rootfs_options, drive_option, fail, jail_options, main, net_option, \
    rootfs_options
from popek.runtime import RuntimeDir, VmEntry, process_alive, validate_name

#: Seconds `popek start` waits for the new VMM's API to answer GET / with the VM running.
START_TIMEOUT = 60.0
#: Seconds `popek stop` waits for a clean stop before SIGKILL.
STOP_TIMEOUT = 30.0
#: A runtime directory without a readable vm.json is only taken for stale once it is this old (seconds): younger,
#: it may be a `RuntimeDir.create` in progress.
BROKEN_ENTRY_AGE = 10.0
#: vm.json state of a VM whose VMM ended after stopping it (popek.vmm.serve); any other state with a dead VMM is stale.
STOPPED = "stopped"


# ---- helpers ------------------------------------------------------------------------------------------------------

def _cgroup(name: str):
    """``popek.cgroups.VmCgroup`` handle for VM ``name`` (nothing created), or None if cgroups are not usable here."""
    from popek.cgroups import CgroupError, VmCgroup, detect

    try:
        return VmCgroup(name, detect())
    except CgroupError:
        return None


def _remove_vm(name: str) -> None:
    """Remove VM ``name``'s cgroup (SIGKILLing anything left in it), its private root disk copy
    (``popek.rootfs.remove_detached_copy``) and then its runtime directory."""
    from popek.rootfs import remove_detached_copy

    cg = _cgroup(name)
    if cg is not None and any(p.exists() for p in cg.paths):
        cg.remove(force=True)
    remove_detached_copy(name)
    RuntimeDir(name).remove()


def _is_stale(e: VmEntry) -> bool:
    """A VM whose VMM is gone (dead or recycled pid) without having recorded a clean stop, or a broken entry."""
    if e.alive or e.state == STOPPED:
        return False
    if e.problem is not None:  # no or unreadable vm.json: stale only once it cannot be a creation in progress
        try:
            return time.time() - e.path.stat().st_mtime > BROKEN_ENTRY_AGE
        except FileNotFoundError:
            return False
    return True


def _clean_stale(e: VmEntry) -> bool:
    """Remove a stale entry and its cgroup if it is still the same stale entry when re-read; True if removed."""
    again = RuntimeDir(e.name).read()
    if not _is_stale(again) or (again.pid, again.created) != (e.pid, e.created):
        return False
    _remove_vm(e.name)
    why = f"process {e.pid} is gone" if e.pid else e.problem
    click.echo(f"popek: removed stale VM {e.name!r} ({why}; it was {e.state or 'unknown'})", err=True)
    return True


def _entry(name: str) -> VmEntry:
    """VM ``name``'s entry, alive or cleanly stopped; a stale one is cleaned and reported. Exits 1 if there is none."""
    try:
        validate_name(name)
    except ValueError as e:
        fail(str(e))
    e = RuntimeDir(name).read()
    if e.problem == "no runtime directory":
        fail(f"there is no VM named {name!r}", 1)
    if _is_stale(e) and _clean_stale(e):
        fail(f"VM {name!r} is gone: its VMM ended without stopping the VM", 1)
    return e


def _live(name: str) -> VmEntry:
    e = _entry(name)
    if not e.alive:
        fail(f"VM {name!r} is not running (state {e.state})", 1)
    return e


def _pidfd(e: VmEntry) -> int | None:
    """A pidfd of ``e``'s VMM if that process (same pid and start time) still runs, else None."""
    try:
        fd = os.pidfd_open(e.pid)
    except (ProcessLookupError, TypeError, OSError):
        return None
    if not process_alive(e.pid, e.start_time):  # checked after opening: the fd now pins this very process
        os.close(fd)
        return None
    return fd


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def _exited(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the pidfd's process to end (a pidfd is readable once it has)."""
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def _api(e: VmEntry, method: str, path: str, body=None, *, timeout: float = 10.0, required: bool = True):
    """(status, json) of one request to ``e``'s API. If the socket cannot be reached: exit 1, or (not
    ``required``) return (None, None)."""
    from popek.api.client import ApiClient, ApiClientError

    try:
        with ApiClient(RuntimeDir(e.name).api_socket, timeout=timeout) as client:
            return client.request(method, path, body)
    except ApiClientError as err:
        if not required:
            return None, None
        fail(f"VM {e.name!r}: its API does not answer: {err}", 1)


def _read_result(name: str) -> dict | None:
    from popek.vmm import RESULT_JSON

    try:
        return json.loads((RuntimeDir(name).path / RESULT_JSON).read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""


# ---- popek start --------------------------------------------------------------------------------------------------


def _check_name_free(name: str) -> None:
    """Fail unless VM ``name`` is unused, reclaiming it from a stale entry (a dead or recycled VMM pid)."""
    old = RuntimeDir(name).read()
    if old.problem != "no runtime directory":
        if old.alive:
            fail(f"VM name {name!r} is in use by running VMM process {old.pid}")
        if not (_is_stale(old) and _clean_stale(old)):
            fail(f"VM name {name!r} is taken by an ended VM; `popek rm {name}` first")


def _spawn_vmm(name: str, jail: tuple[int, int] | None = None) -> subprocess.Popen:
    """Start ``python -m popek.vmm`` for VM ``name`` in a new session; it waits for its spec on stdin. With ``jail``
    (uid, gid) it starts in its jail (``popek.jail.spawn``: the Popen is the launcher's, ``vmm_pid`` the VMM's)."""
    if jail is not None:
        from popek.jail import JailError, spawn

        try:
            return spawn(name, RuntimeDir(name).base, *jail)
        except JailError as e:
            fail(f"cannot start VM {name!r}: {e}", 1)
    return subprocess.Popen([sys.executable, "-m", "popek.vmm", "--name", name, "--base", str(RuntimeDir(name).base),
                             "--spec-stdin"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, cwd="/")


def _adopt_vmm(child: subprocess.Popen, name: str, info: dict, spec: dict, layout, limits: dict) -> RuntimeDir:
    """Reserve ``name`` with a runtime directory owned by ``child``, move it into the VM's cgroup (``layout`` None:
    none) with ``limits``, then hand it ``spec`` — in that order, so all guest memory is charged to the cgroup."""
    from popek.cgroups import VmCgroup

    vmm_pid = getattr(child, "vmm_pid", child.pid)  # a jailed VMM is the launcher's child (popek.jail.spawn)
    rd = RuntimeDir.create(name, info, pid=vmm_pid)
    if layout is not None:
        cg = VmCgroup(name, layout)
        if any(p.exists() for p in cg.paths):  # left by a dead VM of this name: the name is ours now
            cg.remove(force=True)
        cg = VmCgroup.create(name, layout=layout, **limits)
        for pid in dict.fromkeys((child.pid, vmm_pid)):
            cg.add_pid(pid)
    child.stdin.write(json.dumps({"spec": spec}).encode())
    child.stdin.close()
    return rd


def start_detached(name: str | None, command: list[str] | str | None = None, *, kernel=None, initrd=None,
                   append: str = "", memory: str | int = "256M", cpus: int = 1, cpu_weight: int | None = None,
                   cpus_max: float | None = None, memory_max: str | int | None = None, pids_max: int | None = None,
                   timeout: float = START_TIMEOUT, track_dirty_pages: bool = False, drives=(), nets=(),
                   jail: bool = False, uid: int | None = None, gid: int | None = None, rootfs=None,
                   persist: bool = False, rootfs_size: str | int | None = None,
                   free_page_reporting: bool = False) -> str:
    """Start VM ``name`` in its own VMM process (``python -m popek.vmm``, a new session) and return its name.

    Order: check the inputs (``popek.runner.check_inputs``, cgroup limits), build or find the guest image, spawn the
    VMM (it waits on stdin), reserve the name with a runtime directory owned by the VMM's pid
    (``RuntimeDir.create``), create the VM's cgroup with the limits and move the VMM into it, send the spec
    (boot source: kernel, initrd, ``boot_args`` = ``popek.cmd=`` + ``append``; machine config) and wait until GET /
    on its API socket answers state Running. On any failure the VMM is killed and its runtime directory and cgroup
    removed. Without limits a host where cgroups are unusable runs the VM without one (with a warning).

    :param track_dirty_pages: machine-config ``track_dirty_pages`` (Diff snapshots; opt-in as in Firecracker).
    :param cpu_weight, cpus_max, memory_max, pids_max: ``popek.cgroups.VmCgroup.create``'s cpu_weight, cpu_max (in
        CPUs), memory_max (a size: bytes or "512M"), pids_max.
    :param drives, nets: ``--drive``/``--net`` texts or ``DriveConfig``/``NetConfig`` (``popek.runner.parse_drive``,
        ``parse_net``): the spec's drives (drive_id = the serial, or ``drive<N>``) and network interfaces (addresses
        and MAC decided here by ``popek.runner.resolve_nets`` and recorded in vm.json; the VMM creates the taps).
    :param jail, uid, gid: run the VMM in its jail (``popek.jail``) as uid/gid (default 65534); the jail's plan is
        checked here first (files the uid may not read or write, network interfaces: refused).
    :param rootfs, persist, rootfs_size: boot from a root file system (``popek.rootfs.detached_root``: "debian" as
        a private copy kept until ``popek rm``, unless ``persist``; or an ext4 PATH in place) as the root drive.
    :param free_page_reporting: the VM's balloon (every detached VM has one, ``popek.cli_balloon.detached_balloon``,
        for `popek balloon`) offers free page reporting.
    :raises SystemExit: via ``popek.cli.fail``, with a message saying what failed and why.
    """
    from popek.api.model import ApiError, BootSource, MachineConfiguration
    from popek.cli_balloon import detached_balloon
    from popek.cgroups import CgroupError, detect, limit_writes
    from popek.guestcmd import build_cmdline, command_arg
    from popek.kvm.system import detect_flavor
    from popek.runner import check_inputs, parse_drive, parse_size, resolve_guest, resolve_nets

    name = name or f"vm-{secrets.token_hex(3)}"
    if not jail and (uid is not None or gid is not None):
        fail("--uid and --gid go with --jail")
    limits = {}
    try:
        validate_name(name)
        mem = parse_size(memory)
        if mem % (1 << 20):
            raise ValueError(f"guest memory {memory!r} is not a whole number of MiB (the API's mem_size_mib)")
        limits = {k: v for k, v in dict(cpu_weight=cpu_weight, cpu_max=cpus_max, pids_max=pids_max,
                                        memory_max=None if memory_max is None else parse_size(memory_max)).items()
                  if v is not None}
        if rootfs is not None:
            from popek.rootfs import check_boot_inputs, root_append

            if jail:
                raise ValueError("--jail does not take --rootfs yet (the jailed VMM's uid cannot write the disk)")
            check_boot_inputs(rootfs, kernel, initrd)
            append = root_append(append)
            rootfs_size = None if rootfs_size is None else parse_size(rootfs_size)
        boot_args = " ".join(a for a in (command_arg(command) if command else "", append) if a)
        drives = [parse_drive(d) if isinstance(d, str) else d for d in drives]
        check_inputs(kernel, initrd, mem, cpus, build_cmdline(emulating=detect_flavor().emulating_cpl0,
                                                              command=command, append=append), drives)
        nets = resolve_nets(nets)
    except _bad_input_errors() as e:
        fail(str(e))
    try:
        layout = detect()
        limit_writes(layout, **limits)
    except ValueError as e:
        fail(str(e))
    except CgroupError as e:
        if limits:
            fail(f"cannot apply {', '.join(limits)}: {e}")
        click.echo(f"popek: warning: running VM {name!r} without a cgroup: {e}", err=True)
        layout = None
    _check_name_free(name)
    try:
        kpath, ipath, _ = resolve_guest(kernel, initrd, progress=True)
        if rootfs is not None:
            from popek.rootfs import detached_root, root_drive_spec

            ipath, (root, copy_from) = None, detached_root(rootfs, name, persist=persist, size=rootfs_size,
                                                                  progress=True)
    except _bad_input_errors() as e:
        fail(str(e))
    boot = {"kernel_image_path": os.path.abspath(kpath), "boot_args": boot_args or None,
            "initrd_path": os.path.abspath(ipath) if ipath else None}
    machine = {"vcpu_count": cpus, "mem_size_mib": mem >> 20, "track_dirty_pages": track_dirty_pages}
    try:
        BootSource.from_json({k: v for k, v in boot.items() if v is not None}, "boot-source")
        MachineConfiguration.from_json(machine, "machine-config")
        spec = {"boot-source": boot, "machine-config": machine, "drives": _drive_specs(drives),
                "network-interfaces": _net_specs(nets), "balloon": detached_balloon(free_page_reporting),
                "vsock": detached_vsock(name)}
        if rootfs is not None:
            spec["drives"].insert(0, root_drive_spec(root))
    except ApiError as e:
        fail(e.message)
    info = {"vcpus": cpus, "memory": mem, "kernel": boot["kernel_image_path"], "initrd": boot["initrd_path"],
            "command": command if command else None, "append": append, "limits": limits,
            "cgroup": layout is not None, "nets": [dataclasses.asdict(n) for n in nets]}
    if jail:
        info["jail"] = _check_jail(name, spec, uid, gid)

    if rootfs is not None and copy_from is not None:
        from popek.rootfs import copy_detached

        try:
            copy_detached(copy_from, name)
        except _bad_input_errors() as e:
            fail(str(e))
    child, rd = _spawn_vmm(name, (info["jail"]["uid"], info["jail"]["gid"]) if jail else None), None
    try:
        rd = _adopt_vmm(child, name, info, spec, layout, limits)
        _wait_started(name, child, timeout)
    except BaseException as e:
        child.kill()
        child.wait()
        detail = (_read_result(name) or {}).get("detail") if rd else None
        stderr = child.stderr.read().decode(errors="replace").strip()
        log = _tail(rd.path / "vmm.log") if rd else ""
        if rd is not None:
            _remove_vm(name)
        elif rootfs is not None:
            from popek.rootfs import remove_detached_copy

            remove_detached_copy(name)
        if isinstance(e, KeyboardInterrupt):
            fail("interrupted; the VM was not started", 130)
        if not isinstance(e, Exception):
            raise
        why = detail or str(e)
        fail(f"cannot start VM {name!r}: {why}" + (f"\n{stderr}" if stderr else "")
             + (f"\n{log}" if log and not detail else ""), 1)
    child.stderr.close()
    child.returncode = 0  # detached on purpose: keep Popen's destructor from warning about a running child
    return name


def detached_vsock(name: str) -> dict:
    """The Vsock object (Firecracker's PUT /vsock body) every detached VM gets: guest CID 3, its socket at
    ``<runtime dir>/vsock.sock`` (the guest agent, `popek exec`, is reached through it). :raises ApiError: if the
    model refuses the path (longer than a Unix socket address holds)."""
    from popek.agent import DEFAULT_GUEST_CID
    from popek.api.model import Vsock

    spec = {"guest_cid": DEFAULT_GUEST_CID, "uds_path": str(RuntimeDir(name).vsock_socket)}
    Vsock.from_json(spec, "vsock")
    return spec


def _drive_specs(drives) -> list[dict]:
    """Validated Firecracker Drive objects for ``DriveConfig``s: drive_id = the serial (the API gives the guest the
    drive_id as the virtio-blk device ID) or ``drive<N>``; none is the root device (the guest's root is its
    initramfs). :raises ApiError: for a serial that is not a valid drive_id."""
    from popek.api.model import Drive

    out = []
    for i, d in enumerate(drives):
        spec = {"drive_id": d.serial or f"drive{i}", "path_on_host": os.path.abspath(d.path),
                "is_root_device": False, "is_read_only": d.readonly}
        Drive.from_json(spec, f"drive {os.fspath(d.path)} (its serial is the API's drive_id)")
        out.append(spec)
    return out


def _net_specs(nets) -> list[dict]:
    """Validated Firecracker NetworkInterface objects (``eth<N>``), with Popek's address fields, for resolved
    ``NetConfig``s (``popek.runner.resolve_nets``). :raises ApiError: if the model refuses one."""
    from popek.api.model import NetworkInterface

    out = []
    for i, n in enumerate(nets):
        spec = {"iface_id": f"eth{i}", "host_dev_name": n.tap or "popek%d", "guest_mac": n.mac,
                "host_address": n.host, "guest_address": n.guest.split("/")[0]}
        NetworkInterface.from_json(spec, f"net {i}")
        out.append(spec)
    return out


def _check_jail(name: str, spec: dict, uid: int | None, gid: int | None) -> dict:
    """``{"uid", "gid"}`` of VM ``name``'s jail once ``popek.jail`` says this host can jail it as ``spec`` needs
    (``check_host``, ``make_plan``). :raises SystemExit: via ``fail``, with the jail's reason."""
    from popek.jail import JAIL_GID, JAIL_UID, JailError, check_host, make_plan
    from popek.vmm import spec_from_json

    ids = {"uid": JAIL_UID if uid is None else uid, "gid": JAIL_GID if gid is None else gid}
    try:
        check_host()
        make_plan(spec_from_json(spec), RuntimeDir(name).path, ids["uid"], ids["gid"])
    except JailError as e:
        fail(str(e))
    return ids


class _StartFailed(RuntimeError):
    pass


def _wait_started(name: str, child: subprocess.Popen, timeout: float) -> None:
    """Wait until the VMM's API answers GET / with the VM Running, Paused or Stopped, or the VMM exits 0 having
    recorded how the VM ended (a guest that finished at once, on hardware KVM). :raises _StartFailed: why not."""
    from popek.api.client import ApiClient, ApiClientError

    deadline = time.monotonic() + timeout
    sock = RuntimeDir(name).api_socket
    while time.monotonic() < deadline:
        if child.poll() is not None:
            if child.returncode == 0 and _read_result(name) is not None:
                return
            raise _StartFailed(f"the VMM exited with status {child.returncode} before the VM ran")
        if sock.exists():
            try:
                with ApiClient(sock, timeout=2.0) as client:
                    status, info = client.get("/")
                if status == 200 and info.get("state") in ("Running", "Paused", "Stopped"):
                    return
            except ApiClientError:
                pass
        time.sleep(0.1)
    raise _StartFailed(f"its VMM did not report the VM running on {sock} within {timeout:g} s; killed it")


@main.command()
@click.option("--name", "-n", default=None, help="the VM's name (default: vm-<random>)")
@click.option("--kernel", default=None, metavar="microvm|debian|PATH", help="guest kernel (as for `popek run`)")
@click.option("--initrd", default=None, metavar="PATH", help="initramfs (default: the image's)")
@click.option("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
@click.option("--memory", "-m", default="256M", show_default=True, help="guest RAM, whole MiB (e.g. 256M, 1G)")
@click.option("--cpus", "-c", default=1, show_default=True, type=int, help="number of vCPUs")
@click.option("--cpu-weight", type=int, default=None, help="cgroup CPU weight 1-10000 (default 100)")
@click.option("--cpus-max", type=float, default=None, help="cgroup CPU bandwidth limit in CPUs (e.g. 0.5)")
@click.option("--memory-max", default=None, help="cgroup memory limit of the VMM process (e.g. 512M)")
@click.option("--pids-max", type=int, default=None, help="cgroup limit on tasks (processes and threads)")
@click.option("--start-timeout", type=float, default=START_TIMEOUT, show_default=True,
              help="seconds to wait for the VMM to report the VM running")
@click.option("--track-dirty-pages", is_flag=True,
              help="log the pages the guest and devices write, for `popek snapshot create --diff`")
@click.option("--free-page-reporting", is_flag=True,
              help="the guest hands its free memory back to the host by itself (virtio-balloon page reporting)")
@drive_option
@net_option
@jail_options
@rootfs_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def start(name, kernel, initrd, append, memory, cpus, cpu_weight, cpus_max, memory_max, pids_max, start_timeout,
          track_dirty_pages, free_page_reporting, drives, nets, jail, uid, gid, rootfs, persist, rootfs_size,
          command):
    """Start a VM in the background running COMMAND (after `--`; none: a shell on its console); print its name.

    Each VM gets its own VMM process, runtime directory (vm.json, api.sock, console.sock, console.log) and cgroup.
    """
    check_rootfs_options(rootfs, persist, rootfs_size)
    click.echo(start_detached(name, list(command) or None, kernel=kernel, initrd=initrd, append=append,
                              memory=memory, cpus=cpus, cpu_weight=cpu_weight, cpus_max=cpus_max,
                              memory_max=memory_max, pids_max=pids_max, timeout=start_timeout,
                              track_dirty_pages=track_dirty_pages, drives=drives, nets=nets, jail=jail, uid=uid,
                              gid=gid, rootfs=rootfs, persist=persist, rootfs_size=rootfs_size,
                              free_page_reporting=free_page_reporting))


# ---- popek ps -----------------------------------------------------------------------------------------------------

def host_memory(pid: int) -> tuple[int, int] | None:
    """(USS, RSS) of process ``pid`` in bytes from /proc/<pid>/smaps_rollup (proc(5)): USS = Private_Clean +
    Private_Dirty (what ending the process frees), RSS = Rss. None if the process is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key] = int(parts[0])
    return (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) << 10, kb.get("Rss", 0) << 10


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (its threads included) in seconds, /proc/<pid>/stat fields 14-15 (proc(5))."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[14 - 3]) + int(fields[15 - 3])) / os.sysconf("SC_CLK_TCK")


def vm_status(e: VmEntry) -> dict:
    """One `popek ps` row: name, pid, state (with how it ended), vcpus, memory (bytes configured), uptime_s, cpu_s
    (cgroup CPU time, else the VMM process's), uss/rss (host memory of the VMM process, bytes; None once ended)."""
    cfg = e.config or {}
    result = _read_result(e.name) if e.state == STOPPED else None
    state = e.state or "unknown"
    if result and result.get("reason") != "stopped":  # how it ended, unless by `popek stop`
        how = result.get("reason")
        state = f"{state} (exit {result.get('exit_status')})" if how == "exit" else f"{state} ({how})"
    cpu = None
    cg = _cgroup(e.name)
    if cg is not None and all(p.exists() for p in cg.paths):
        from popek.cgroups import CgroupError
        try:
            cpu = cg.usage()["cpu_seconds"]
        except CgroupError:
            pass
    if cpu is None and e.alive:
        cpu = process_cpu_seconds(e.pid)
    mem = host_memory(e.pid) if e.alive else None
    ended = result.get("ended") if result else None
    uptime = ((ended or time.time()) - e.created) if e.created else None
    return {"name": e.name, "pid": e.pid if e.alive else None, "state": state, "vcpus": cfg.get("vcpus"),
            "memory": cfg.get("memory"), "uptime_s": uptime, "cpu_s": cpu,
            "uss": mem[0] if mem else None, "rss": mem[1] if mem else None}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{0 if n % (1 << shift) == 0 else 1}f}{unit}"
    return str(n)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of the rows (sizes in bytes, times in s)")
def ps(as_json):
    """List the VMs: state, vCPUs, memory, uptime, CPU used and host memory (USS/RSS of the VMM process).

    Stale entries (a VMM that died or whose pid was reused without stopping its VM) are removed, cgroup included.
    """
    rows = []
    for e in RuntimeDir.list():
        if _is_stale(e):
            _clean_stale(e)
            continue
        if e.problem is None:
            rows.append(vm_status(e))
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'NAME':20} {'PID':>7} {'STATE':18} {'VCPUS':>5} {'MEMORY':>7} {'UPTIME':>7} {'CPU':>8} "
               f"{'HOST MEM USS/RSS':>17}")
    for r in rows:
        cpu = "-" if r["cpu_s"] is None else f"{r['cpu_s']:.1f}s"
        host = "-" if r["rss"] is None else f"{_size(r['uss'])}/{_size(r['rss'])}"
        click.echo(f"{r['name']:20} {r['pid'] or '-':>7} {r['state']:18} {r['vcpus'] or '-':>5} "
                   f"{_size(r['memory']):>7} {_duration(r['uptime_s']):>7} {cpu:>8} {host:>17}")


# ---- lifecycle ----------------------------------------------------------------------------------------------------

@main.command()
@click.argument("name")
@click.option("--timeout", "-t", type=float, default=STOP_TIMEOUT, show_default=True,
              help="seconds to wait for a clean stop before SIGKILL")
def stop(name, timeout):
    """Stop VM NAME cleanly, SIGKILL its VMM if that takes longer than --timeout.

    First PUT /actions SendCtrlAltDel; if the VM accepts it, its guest gets up to half the timeout to end. Popek's
    guests have no keyboard, so the API refuses it, and the VMM gets SIGTERM at once: it stops the vCPUs, releases
    the VM, records "stopped" and exits. The entry (console log) stays until `popek rm`.
    """
    e = _entry(name)
    fd = _pidfd(e)
    if fd is None:
        click.echo(f"popek: VM {name!r} is already stopped", err=True)
        return
    try:
        deadline = time.monotonic() + timeout
        status, _ = _api(e, "PUT", "/actions", {"action_type": "SendCtrlAltDel"},
                         timeout=max(0.5, min(timeout / 4, 10.0)), required=False)
        if status == 204 and _exited(fd, timeout / 2):
            click.echo(name)
            return
        _signal(fd, signal.SIGTERM)
        if _exited(fd, deadline - time.monotonic()):
            click.echo(name)
            return
        _signal(fd, signal.SIGKILL)
        _exited(fd, 10.0)
    finally:
        os.close(fd)
    _remove_vm(name)
    fail(f"VM {name!r} did not stop within {timeout:g} s; killed its VMM and removed the VM", 1)


@main.command()
@click.argument("name")
def kill(name):
    """SIGKILL VM NAME's VMM process, then remove its runtime directory and cgroup."""
    e = _entry(name)
    fd = _pidfd(e)
    if fd is not None:
        try:
            _signal(fd, signal.SIGKILL)
            if not _exited(fd, 10.0):
                fail(f"VM {name!r}: its VMM process {e.pid} survived SIGKILL for 10 s", 1)
        finally:
            os.close(fd)
    _remove_vm(name)
    click.echo(name)


def _patch_state(name: str, wanted: str) -> None:
    e = _live(name)
    status, body = _api(e, "PATCH", "/vm", {"state": wanted})
    if status != 204:
        fail(f"VM {name!r}: {(body or {}).get('fault_message', f'HTTP {status}')}", 1)
    click.echo(name)


@main.command()
@click.argument("name")
def pause(name):
    """Pause VM NAME's vCPUs (PATCH /vm {"state": "Paused"})."""
    _patch_state(name, "Paused")


@main.command()
@click.argument("name")
def resume(name):
    """Resume VM NAME's vCPUs (PATCH /vm {"state": "Resumed"})."""
    _patch_state(name, "Resumed")


@main.command()
@click.argument("names", nargs=-1, required=True)
def rm(names):
    """Remove ended VMs: runtime directory (logs included) and cgroup. A running VM is refused."""
    for name in names:
        e = _entry(name)
        if e.alive:
            fail(f"VM {name!r} is running (VMM process {e.pid}); `popek stop {name}` or `popek kill {name}` first", 1)
        _remove_vm(name)
        click.echo(name)


@main.command()
def cleanup():
    """Remove every VM that is not running (ended or stale), with its runtime directory and cgroup."""
    for e in RuntimeDir.list():
        if not e.alive and (e.problem is None or _is_stale(e)):
            _remove_vm(e.name)
            click.echo(e.name)


# ---- console and logs ---------------------------------------------------------------------------------------------

@main.command()
@click.argument("name")
def console(name):
    """Attach the terminal to VM NAME's serial console (raw mode); Ctrl-A x detaches, leaving the VM running."""
    from popek.console import Console
    from popek.vmm import CONSOLE_SOCKET

    _live(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(RuntimeDir(name).path / CONSOLE_SOCKET))
    except OSError as err:
        fail(f"VM {name!r}: cannot attach to its console: {err}", 1)
    detached = []

    def detach():
        detached.append(True)
        sock.shutdown(socket.SHUT_RDWR)

    out = sys.stdout.buffer
    con = Console(sys.stdin.fileno(), out, on_input=sock.sendall, on_quit=detach)
    click.echo(f"popek: attached to {name} (Ctrl-A x detaches)", err=True)
    try:
        con.start()
        while data := sock.recv(65536):
            con.write(data)
    except KeyboardInterrupt:
        detached.append(True)
    except OSError:
        pass
    finally:
        con.close()
        sock.close()
    click.echo(f"\r\npopek: {'detached from' if detached else 'the VM ended:'} {name}", err=True)


@main.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="keep printing new output until the VM ends")
def logs(name, follow):
    """Print VM NAME's console output (kept after the VM ended, until `popek rm`; the VMM keeps the last 8-16 MiB:
    console.log and, once it filled, console.log.1)."""
    from popek.vmm import rotated_log

    e = _entry(name)
    path = RuntimeDir(name).console_log
    out = sys.stdout.buffer
    try:
        with contextlib.suppress(FileNotFoundError), open(rotated_log(path), "rb") as old:
            shutil.copyfileobj(old, out)
        f = open(path, "rb")
        try:
            while True:
                data = f.read(65536)
                if data:
                    out.write(data)
                    out.flush()
                    continue
                if follow and _rotated(f, path):  # the VMM moved the full log to .1: go on in the new one
                    f.close()
                    f = open(path, "rb")
                    continue
                if not follow or not process_alive(e.pid, e.start_time):
                    if follow and (data := f.read()):  # what the VMM wrote just before it ended
                        out.write(data)
                    break
                time.sleep(0.2)
        finally:
            f.close()
    except FileNotFoundError:
        fail(f"VM {name!r} has no console log ({path})", 1)
    except KeyboardInterrupt:
        pass
    out.flush()


def _rotated(f, path: Path) -> bool:
    """Whether ``path`` now names another file than the open log ``f`` (the VMM rotated it)."""
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


# ---- snapshots: popek/cli_snapshot.py ----------------------------------------------------------------------------

from popek import cli_snapshot  # noqa: E402,F401  (registers `popek snapshot create|restore|clone|merge`)

"""`popek snapshot` commands: create (Full or Diff), restore, clone (N VMs from one snapshot), merge a Diff."""

# Naming of a Diff's base: a Diff snapshot directory holds `state` and a Diff `memory` file whose trailer names its
# base memory file by id (popek/snapshot.py); the state file also records the base's absolute path at the time
# (popek.persist.BASE_MEMORY). `restore`, `clone` and `merge` use that recorded path unless `--base DIR0` names the
# base snapshot directory; either way the base's id must match. The base of a Diff is the VM's last snapshot, taken
# or restored from (Firecracker's semantics), so a Diff after a Diff is on a Diff: `popek snapshot merge` first
# turns the earlier one into a Full memory file (same id), in place.
#
# Every restore-like command checks the snapshot in this process first (popek.persist.check_snapshot: state file
# magic, version, CRC, fields, this host's CPU, memory file trailer and id, a Diff's base): a bad snapshot is one
# `popek: error:` line and exit status 2, and no VMM process, runtime directory or cgroup is made.

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from popek.cli import fail, main
from popek.cli_vms import START_TIMEOUT, _adopt_vmm, _api, _check_name_free, _live, _remove_vm, _StartFailed
from popek.runtime import RuntimeDir, validate_name

#: Seconds the snapshot commands give the VMM to write or load a snapshot (guest RAM goes through the page cache).
SNAPSHOT_TIMEOUT = 300.0
#: How often a restore looks whether the new VMM's API socket answers (seconds).
API_POLL_S = 0.01
#: Most VMs one `popek snapshot clone` starts.
MAX_CLONES = 1000


@main.group()
def snapshot():
    """Snapshot a running VM to a directory (files `state` and `memory`), or restore one as new VMs."""


@snapshot.command("create")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--diff", is_flag=True, help="only the pages written since the VM's last snapshot (taken or restored "
              "from); needs `popek start --track-dirty-pages` or `restore --track-dirty-pages`")
def snapshot_create(name, directory, diff):
    """Write a snapshot of VM NAME to DIRECTORY: PATCH /vm Paused, PUT /snapshot/create (DIRECTORY/state,
    DIRECTORY/memory; snapshot_type Full, or Diff with --diff), then PATCH /vm Resumed if the VM was running.
    Prints DIRECTORY. A Diff's state file records where its base is (see `popek snapshot restore --base`)."""
    e = _live(name)
    d = Path(directory).resolve()
    if (e.config or {}).get("jail"):  # its VMM sees only its own files (popek.jail)
        fail(f"VM {name!r} runs in a jail, whose VMM cannot write to {d}; snapshots of jailed VMs are not "
             f"supported yet", 1)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create snapshot directory {d}: {err.strerror}", 1)
    _, info = _api(e, "GET", "/")
    was_running = (info or {}).get("state") == "Running"
    if was_running:
        status, body = _api(e, "PATCH", "/vm", {"state": "Paused"})
        if status != 204:
            fail(f"VM {name!r}: cannot pause it: {(body or {}).get('fault_message', f'HTTP {status}')}", 1)
    try:
        status, body = _api(e, "PUT", "/snapshot/create", {"snapshot_type": "Diff" if diff else "Full",
                                                           "snapshot_path": str(d / "state"),
                                                           "mem_file_path": str(d / "memory")},
                            timeout=SNAPSHOT_TIMEOUT)
        if status != 204:
            fail(f"VM {name!r}: {(body or {}).get('fault_message', f'HTTP {status}')}", 1)
    finally:
        if was_running:
            _api(e, "PATCH", "/vm", {"state": "Resumed"}, required=False)
    click.echo(str(d))


@dataclass
class CheckedSnapshot:
    """A snapshot directory that passed ``popek.persist.check_snapshot``: its state and memory paths, the base
    memory path of a Diff (else None) and what vm.json records of it."""

    directory: Path
    state: Path
    memory: Path
    base: str | None
    info: dict


def check_directory(directory: str | os.PathLike, base: str | os.PathLike | None = None) -> CheckedSnapshot:
    """Check the snapshot in ``directory`` (and its Diff base: ``base``/memory, else the recorded path) as a
    restore would, in this process. :raises SystemExit: exit status 2 with one `popek: error:` line if not."""
    from popek.kvm.system import KvmError
    from popek.persist import MEMORY_FILE, STATE_FILE, check_snapshot
    from popek.snapshot import SnapshotError

    d = Path(directory).resolve()
    state, memory = d / STATE_FILE, d / MEMORY_FILE
    try:
        snap, cfg, base_path = check_snapshot(state, memory, None if base is None else Path(base) / MEMORY_FILE)
    except OSError as err:
        fail(f"cannot restore {d}: {err.filename}: {err.strerror}" if err.filename else f"cannot restore {d}: {err}")
    except (SnapshotError, KvmError) as err:
        fail(f"cannot restore {d}: {err}")
    info = {"vcpus": cfg.cpus, "memory": cfg.memory, "kernel": str(cfg.kernel),
            "initrd": None if cfg.initrd is None else str(cfg.initrd), "command": None, "append": "",
            "limits": {}, "snapshot": str(d)}
    return CheckedSnapshot(d, state, memory, base_path, info)


def _set_comm(name: bytes) -> None:
    """prctl(PR_SET_NAME): this thread's name in ps/top (comm, at most 15 bytes); argv stays the CLI's."""
    import ctypes

    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)


class ForkedVmm:
    """A VMM process forked from this one (``popek.vmm.main`` with ``--spec-stdin`` in a new session, cwd /), with
    the part of ``subprocess.Popen``'s interface the spawn path uses: ``pid``, ``stdin``/``stderr`` pipes,
    ``poll``, ``wait``, ``kill``, ``returncode``.

    A zygote: this process has imported the VMM already, so a clone costs a fork(2) instead of an interpreter
    start and ~0.2-0.4 s of imports, and the clones share those pages copy-on-write. Fork only while this process
    runs no other thread (the child would hold copies of their locks). The child keeps fds 0-2 only; its argv is
    this process's, its name (comm) "popek-vmm".
    """

    def __init__(self, name: str):
        import popek.vmm

        in_r, in_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the CLI
            code = 1
            try:
                os.setsid()
                os.chdir("/")
                _set_comm(b"popek-vmm")
                null = os.open(os.devnull, os.O_WRONLY)
                for fd, target in ((in_r, 0), (null, 1), (err_w, 2)):
                    os.dup2(fd, target)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                code = popek.vmm.main(["--name", name, "--base", str(RuntimeDir(name).base), "--spec-stdin"])
            except BaseException as e:  # noqa: BLE001 (report anything on the stderr pipe, then exit)
                with contextlib.suppress(Exception):
                    os.write(2, f"popek.vmm: {type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(code if isinstance(code, int) else 1)
        os.close(in_r)
        os.close(err_w)
        self.stdin, self.stderr = os.fdopen(in_w, "wb"), os.fdopen(err_r, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@dataclass
class _Restore:
    name: str
    child: ForkedVmm
    rd: RuntimeDir | None = None
    error: BaseException | None = None


def _spawn_restore(snap: CheckedSnapshot, name: str, layout) -> _Restore:
    """Fork a VMM for ``name`` and give it its runtime directory and cgroup (an empty spec: it waits for PUT
    /snapshot/load); a failure goes to the result's ``error``."""
    r = _Restore(name, ForkedVmm(name))
    try:
        r.rd = _adopt_vmm(r.child, name, {**snap.info, "cgroup": layout is not None}, {}, layout, {})
    except BaseException as err:
        r.error = err
    return r


def _load(snap: CheckedSnapshot, r: _Restore, deadline: float, track_dirty_pages: bool) -> None:
    """Wait for ``r``'s API, then PUT /snapshot/load with resume_vm; failures go to ``r.error``."""
    from popek.api.client import ApiClient, ApiClientError

    try:
        while True:
            if r.child.poll() is not None:
                raise _StartFailed(f"the VMM exited with status {r.child.returncode} before loading the snapshot")
            if time.monotonic() > deadline:
                raise _StartFailed("its VMM's API did not answer in time")
            if r.rd.api_socket.exists():
                try:
                    with ApiClient(r.rd.api_socket, timeout=2.0) as client:
                        if client.get("/")[0] == 200:
                            break
                except ApiClientError:
                    pass
            time.sleep(API_POLL_S)
        body = {"snapshot_path": str(snap.state),
                "mem_backend": {"backend_type": "File", "backend_path": str(snap.memory)},
                "resume_vm": True, "track_dirty_pages": track_dirty_pages}
        if snap.base is not None:
            body["base_mem_file_path"] = snap.base
        with ApiClient(r.rd.api_socket, timeout=SNAPSHOT_TIMEOUT) as client:
            status, reply = client.request("PUT", "/snapshot/load", body)
        if status != 204:
            raise _StartFailed((reply or {}).get("fault_message", f"HTTP {status}"))
    except BaseException as err:
        r.error = err


def _undo(r: _Restore) -> str:
    """Kill ``r``'s VMM and remove its runtime directory and cgroup; returns its stderr."""
    r.child.kill()
    r.child.wait()
    stderr = r.child.stderr.read().decode(errors="replace").strip()
    r.child.stderr.close()
    if r.rd is not None:
        _remove_vm(r.name)
    return stderr


def restore_many(snap: CheckedSnapshot, names: list[str], *, track_dirty_pages: bool = False,
                 timeout: float = START_TIMEOUT) -> list[str]:
    """Start one detached VMM per name (``popek.vmm``, forked from this process: ``ForkedVmm``; its own runtime
    directory and cgroup, as `popek start` makes them), all at once, and have each load the checked snapshot (PUT
    /snapshot/load, resume_vm): guest RAM is mapped MAP_PRIVATE from the same memory file, so the VMs share its
    pages until they write them.

    All or nothing: if any VM fails, every VM of this call is killed and removed, and the error names the one
    that failed and why. :returns: ``names``. :raises SystemExit: via ``fail`` (exit 1; 130 if interrupted).
    """
    from popek.cgroups import CgroupError, detect

    for name in names:
        _check_name_free(name)
    try:
        layout = detect()
    except CgroupError as err:
        click.echo(f"popek: warning: running {', '.join(names)} without a cgroup: {err}", err=True)
        layout = None
    started: list[_Restore] = []
    failed: _Restore | None = None
    try:
        for name in names:
            started.append(_spawn_restore(snap, name, layout))
            if started[-1].error is not None:
                break
        deadline = time.monotonic() + timeout
        threads = [threading.Thread(target=_load, args=(snap, r, deadline, track_dirty_pages), daemon=True)
                   for r in started if r.error is None]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = next((r for r in started if r.error is not None), None)
    except KeyboardInterrupt:
        for r in started:
            _undo(r)
        fail("interrupted; no VM was restored", 130)
    if failed is not None:
        stderr = ""
        for r in started:
            out = _undo(r)
            stderr = out if r is failed else stderr
        what = f"VM {failed.name!r}" + (f" (and the {len(started) - 1} others)" if len(started) > 1 else "")
        fail(f"cannot restore {snap.directory} as {what}: {failed.error}" + (f"\n{stderr}" if stderr else ""), 1)
    for r in started:
        r.child.stderr.close()  # the VMMs run on; once this process exits they are reparented (not waited for here)
    return names


def restore_detached(directory: str | os.PathLike, name: str | None = None, timeout: float = START_TIMEOUT, *,
                     base: str | os.PathLike | None = None, track_dirty_pages: bool = False) -> str:
    """Check the snapshot in ``directory`` (``check_directory``), then start it as VM ``name`` (default
    vm-<random>) in a new detached VMM (``restore_many``). :returns: the name. :raises SystemExit: via ``fail``."""
    snap = check_directory(directory, base)
    name = name or f"vm-{secrets.token_hex(3)}"
    try:
        validate_name(name)
    except ValueError as err:
        fail(str(err))
    return restore_many(snap, [name], track_dirty_pages=track_dirty_pages, timeout=timeout)[0]


_BASE_HELP = "a Diff's base snapshot directory (default: the base path the Diff recorded)"


@snapshot.command("restore")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--name", "-n", default=None, help="the new VM's name (default: vm-<random>)")
@click.option("--base", default=None, type=click.Path(file_okay=False, exists=True), metavar="DIR0", help=_BASE_HELP)
@click.option("--track-dirty-pages", is_flag=True, help="log dirty pages, so `snapshot create --diff` works on it")
def snapshot_restore(directory, name, base, track_dirty_pages):
    """Start a new VM from the snapshot in DIRECTORY (made by `popek snapshot create`) and print its name."""
    click.echo(restore_detached(directory, name, base=base, track_dirty_pages=track_dirty_pages))


@snapshot.command("clone")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--count", "-c", type=click.IntRange(1, MAX_CLONES), required=True, help="how many VMs to start")
@click.option("--name-prefix", "-p", default=None, help="the VMs are PREFIX-1 .. PREFIX-N (default: clone-<random>)")
@click.option("--base", default=None, type=click.Path(file_okay=False, exists=True), metavar="DIR0", help=_BASE_HELP)
@click.option("--start-timeout", type=float, default=START_TIMEOUT, show_default=True,
              help="seconds to wait for all of them to run")
def snapshot_clone(directory, count, name_prefix, base, start_timeout):
    """Start COUNT VMs from the snapshot in DIRECTORY, each its own VMM process, sharing the memory file's pages
    copy-on-write; print their names, one a line. All or nothing: if one fails, all are stopped and removed."""
    snap = check_directory(directory, base)
    prefix = name_prefix or f"clone-{secrets.token_hex(3)}"
    names = [f"{prefix}-{i}" for i in range(1, count + 1)]
    try:
        for n in names:
            validate_name(n)
    except ValueError as err:
        fail(str(err))
    for n in restore_many(snap, names, timeout=start_timeout):
        click.echo(n)


@snapshot.command("merge")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--base", default=None, type=click.Path(file_okay=False, exists=True), metavar="DIR0", help=_BASE_HELP)
def snapshot_merge(directory, base):
    """Apply the Diff snapshot in DIRECTORY onto its base, in place: DIRECTORY/memory becomes a Full memory file
    (with the Diff's id, so later Diffs on it stay valid) and restores without its base. Prints DIRECTORY."""
    from popek.snapshot import merge_diff

    snap = check_directory(directory, base)
    if snap.base is None:
        fail(f"{snap.memory} is already a Full memory file: nothing to merge")
    try:
        merge_diff(snap.base, snap.memory, snap.memory)
    except (ValueError, OSError) as err:
        fail(f"cannot merge {snap.directory}: {err}", 1)
    click.echo(str(snap.directory))

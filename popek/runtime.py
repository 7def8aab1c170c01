"""Per-VM runtime directories: vm.json (owner pid checked with its start time), API socket and console log paths."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VM_JSON = "vm.json"
API_SOCKET = "api.sock"
CONSOLE_LOG = "console.log"
#: The virtio-vsock device's Unix socket of a detached VM (the guest agent is reached through it, popek.agent).
VSOCK_SOCKET = "vsock.sock"


class RuntimeDirError(Exception):
    """A runtime directory cannot be created or used (name taken by a live VM, unsafe base directory, ...)."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid VM name: 1..64 of ``[A-Za-z0-9_.-]``, not ``.`` or ``..``.

    The name becomes a directory name here and in the cgroup trees (popek.cgroups), so nothing else is allowed.

    :raises ValueError: for any other name, saying which rule it breaks.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid VM name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . - (and not '.' or '..')")
    return name


def default_base() -> Path:
    """The directory holding every VM's runtime directory: ``$XDG_RUNTIME_DIR/popek`` if that variable is set
    (XDG Base Directory Specification), else ``/run/popek`` for root, else ``/tmp/popek-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "popek"
    uid = os.geteuid()
    return Path("/run/popek") if uid == 0 else Path(f"/tmp/popek-{uid}")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of ``pid`` from /proc/<pid>/stat fields 3 and 22 (proc(5)), or None if there is no such
    process. The command name (field 2) may hold spaces and parentheses, so fields are counted after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[22 - 3])


def pid_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22 ``starttime``, proc(5)),
    or None if no such process exists. Together with the pid it identifies one process: a recycled pid has a
    different start time."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def process_alive(pid: int | None, start_time: int | None) -> bool:
    """True if process ``pid`` exists, is not a zombie, and started at ``start_time`` (clock ticks since boot)."""
    if not isinstance(pid, int) or not isinstance(start_time, int) or pid <= 0:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == start_time


@dataclass(frozen=True)
class VmEntry:
    """One VM's runtime directory as read from disk.

    ``pid``/``start_time``/``state``/``created``/``config`` come from vm.json (None if it is missing or unreadable,
    then ``problem`` says why); ``alive`` is computed now from pid + start time, never read from the file.
    """

    name: str
    path: Path
    pid: int | None
    start_time: int | None
    state: str | None
    created: float | None
    config: dict | None
    alive: bool
    problem: str | None = None


def _read_entry(path: Path) -> VmEntry:
    try:
        data = json.loads((path / VM_JSON).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return VmEntry(path.name, path, None, None, None, None, None, False, f"no {VM_JSON} (creation did not finish)")
    except (OSError, ValueError) as e:
        return VmEntry(path.name, path, None, None, None, None, None, False, f"unreadable {VM_JSON}: {e}")
    pid, start = data.get("pid"), data.get("pid_start_time")
    return VmEntry(path.name, path, pid, start, data.get("state"), data.get("created"), data.get("config"),
                   process_alive(pid, start))


def _safe_base(base: Path) -> Path:
    """Create ``base`` (mode 0700) if needed and check it is a real directory owned by us (not a planted symlink)."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RuntimeDirError(f"runtime base {base} is not a directory owned by uid {os.geteuid()}; refusing to use it")
    return base


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """flock(2) on the base directory: creation, reclaiming and cleanup of entries never interleave."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


class RuntimeDir:
    """The runtime directory of one VM: ``<base>/<name>/`` holding ``vm.json``, ``api.sock`` and ``console.log``.

    vm.json is ``{"name", "pid", "pid_start_time", "state", "created" (Unix time, s), "config", "api_socket",
    "console_log"}``; it is always replaced atomically (written to a temporary file, fsynced, renamed), so a
    reader sees the old or the new file, never half of one. The owner is identified by pid *and* the pid's start
    time (/proc/<pid>/stat field 22), so an entry left by a dead VM whose pid was reused is still seen as stale.

    :param name: the VM name (see :func:`validate_name`).
    :param base: the directory holding all VMs' runtime directories; default :func:`default_base`.
    :raises ValueError: for an invalid name.
    """

    def __init__(self, name: str, base: Path | str | None = None):
        self.name = validate_name(name)
        self.base = Path(base) if base is not None else default_base()
        self.path = self.base / name

    @property
    def vm_json(self) -> Path:
        return self.path / VM_JSON

    @property
    def api_socket(self) -> Path:
        return self.path / API_SOCKET

    @property
    def console_log(self) -> Path:
        return self.path / CONSOLE_LOG

    @property
    def vsock_socket(self) -> Path:
        return self.path / VSOCK_SOCKET

    @classmethod
    def create(cls, name: str, info: dict[str, Any], *, pid: int | None = None, state: str = "starting",
               base: Path | str | None = None) -> RuntimeDir:
        """Create the runtime directory of VM ``name`` owned by process ``pid`` (default: this process).

        ``info`` is the VM's config summary (JSON-serializable), stored as ``config``. If the name's directory
        exists but its owner is not alive (dead pid, reused pid, missing or broken vm.json) it is reclaimed: its
        contents are deleted and it is created afresh.

        :raises RuntimeDirError: if a live VM already uses the name, ``pid`` does not exist, or the base is unsafe.
        :raises ValueError: for an invalid name; TypeError if ``info`` is not JSON-serializable.
        """
        rd = cls(name, base)
        pid = os.getpid() if pid is None else pid
        start = pid_start_time(pid)
        if start is None:
            raise RuntimeDirError(f"cannot create runtime dir for VM {name!r}: no process with pid {pid}")
        record = {"name": name, "pid": pid, "pid_start_time": start, "state": state, "created": time.time(),
                  "config": info, "api_socket": str(rd.api_socket), "console_log": str(rd.console_log)}
        json.dumps(record)  # fail on a non-serializable config before touching the disk
        base_dir = _safe_base(rd.base)
        with _locked(base_dir):
            try:
                rd.path.mkdir(mode=0o700)
            except FileExistsError:
                old = _read_entry(rd.path)
                if old.alive:
                    raise RuntimeDirError(f"VM name {name!r} is in use by running process {old.pid} "
                                          f"(state {old.state!r}, {rd.path})") from None
                _remove_tree(rd.path)
                rd.path.mkdir(mode=0o700)
            rd._write(record)
        return rd

    def read(self) -> VmEntry:
        """Read this VM's entry (``alive`` computed now). A missing directory gives an entry with ``problem`` set."""
        if not self.path.is_dir():
            return VmEntry(self.name, self.path, None, None, None, None, None, False, "no runtime directory")
        return _read_entry(self.path)

    def set_state(self, state: str) -> None:
        """Replace the ``state`` field of vm.json (atomically, like every write).

        :raises RuntimeDirError: if vm.json is missing or unreadable.
        """
        try:
            record = json.loads(self.vm_json.read_text())
        except (OSError, ValueError) as e:
            raise RuntimeDirError(f"cannot update state of VM {self.name!r}: {self.vm_json}: {e}") from e
        record["state"] = state
        self._write(record)

    def _write(self, record: dict) -> None:
        tmp = self.path / f".{VM_JSON}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record, indent=1).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.vm_json)
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove(self) -> None:
        """Delete this VM's runtime directory and everything in it. Removing a missing directory does nothing."""
        if not self.base.is_dir():
            return
        with _locked(self.base):
            _remove_tree(self.path)

    @classmethod
    def list(cls, base: Path | str | None = None) -> list[VmEntry]:
        """Every VM runtime directory under ``base`` (default :func:`default_base`), sorted by name, each with
        ``alive`` computed from its pid and pid start time. Temporary files and invalid names are skipped."""
        base = Path(base) if base is not None else default_base()
        if not base.is_dir():
            return []
        return [_read_entry(p) for p in sorted(base.iterdir())
                if NAME_RE.fullmatch(p.name) and p.name not in (".", "..") and p.is_dir() and not p.is_symlink()]

    @classmethod
    def cleanup_stale(cls, base: Path | str | None = None) -> list[str]:
        """Delete the runtime directory of every VM that is not alive; return their names (sorted)."""
        base = Path(base) if base is not None else default_base()
        if not base.is_dir():
            return []
        removed = []
        with _locked(base):
            for entry in cls.list(base):
                if not _read_entry(entry.path).alive:  # re-read under the lock
                    _remove_tree(entry.path)
                    removed.append(entry.name)
        return removed

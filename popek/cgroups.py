"""Per-VM cgroups (v2 or v1): which hierarchy serves cpu/memory/pids, a VM's limits, usage, and removal."""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from popek.runtime import NAME_RE, validate_name

#: Controllers every VM cgroup uses. On v1, cpu time is read from cpuacct, so it is needed when cpu is on v1.
CONTROLLERS = ("cpu", "memory", "pids")
#: v1 controller names that may appear in a cgroup mount's super options (cgroups(7), /proc/cgroups).
V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
                            "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"})
V2_PARENT = "popek.slice"
V1_PARENT = "popek"
#: CFS bandwidth period used for cpu_max (µs); the kernel's default (Documentation/scheduler/sched-bwc.rst).
CPU_PERIOD_US = 100_000
#: The smallest quota the kernel accepts (1 ms, sched-bwc.rst).
CPU_MIN_QUOTA_US = 1000


class CgroupError(Exception):
    """A cgroup cannot be found, created, configured, joined or removed; the message says which file and why."""


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem mount from /proc/self/mountinfo (proc(5)).

    ``version`` is 1 (fstype ``cgroup``) or 2 (``cgroup2``); ``controllers`` are a v1 mount's controllers from its
    super options (empty for v2: those come from ``cgroup.controllers``); ``root`` is the mounted subtree.
    """

    path: str
    version: int
    controllers: frozenset[str]
    root: str
    writable: bool


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012`` newline, ``\\134`` backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts in a /proc/<pid>/mountinfo text, in file order.

    Line format (proc(5)): ``id parent major:minor root mountpoint options [optional...] - fstype source
    superoptions``. Lines of other filesystems are skipped.

    :raises CgroupError: for a cgroup line that does not have that shape.
    """
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, *rest = right.split()
        if fstype not in ("cgroup", "cgroup2"):
            continue
        fields = left.split()
        if len(fields) < 6 or not rest:
            raise CgroupError(f"malformed mountinfo line: {line!r}")
        superopts = set(rest[-1].split(",")) if len(rest) >= 2 else set()
        mounts.append(CgroupMount(path=_unescape(fields[4]), version=2 if fstype == "cgroup2" else 1,
                                  controllers=frozenset(superopts & V1_CONTROLLERS) if fstype == "cgroup"
                                  else frozenset(), root=_unescape(fields[3]),
                                  writable="rw" in fields[5].split(",")))
    return mounts


def parse_proc_cgroups(text: str) -> dict[str, tuple[int, bool]]:
    """/proc/cgroups (cgroups(7)) as ``{controller: (hierarchy id, enabled)}``; hierarchy 0 means v2 or unmounted."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, hierarchy, _num, enabled = line.split()[:4]
        out[name] = (int(hierarchy), enabled == "1")
    return out


@dataclass(frozen=True)
class CgroupLayout:
    """Which hierarchy serves each controller: ``hierarchies[c] = (version, mount path)`` for c in
    :data:`CONTROLLERS` (plus ``cpuacct`` when cpu is on v1). ``v2_mount`` is the cgroup2 mount, if any."""

    v2_mount: str | None
    hierarchies: dict[str, tuple[int, str]]

    def directory(self, controller: str, name: str) -> Path:
        """Where VM ``name``'s cgroup for ``controller`` lives: ``<v2>/popek.slice/<name>`` or
        ``<v1 mount>/popek/<name>``."""
        version, mount = self.hierarchies[controller]
        return Path(mount) / (V2_PARENT if version == 2 else V1_PARENT) / name

    def parents(self) -> set[Path]:
        """The ``popek.slice``/``popek`` parent directories, one per hierarchy used."""
        return {Path(m) / (V2_PARENT if v == 2 else V1_PARENT) for v, m in self.hierarchies.values()}

    def directories(self, name: str) -> dict[str, Path]:
        """``{controller: directory}`` of VM ``name`` (controllers sharing a hierarchy share a directory)."""
        return {c: self.directory(c, name) for c in self.hierarchies}


def _v2_mount(mounts: list[CgroupMount]) -> CgroupMount | None:
    """The cgroup2 mount to use: the first that shows the whole hierarchy (root "/"), else the first at all."""
    v2 = [m for m in mounts if m.version == 2]
    return next((m for m in v2 if m.root == "/"), v2[0] if v2 else None)


def layout_from(mounts: list[CgroupMount], v2_controllers: str | set[str],
                kernel: dict[str, tuple[int, bool]] | None = None) -> CgroupLayout:
    """Decide the layout from parsed mounts and the cgroup2 root's ``cgroup.controllers`` (no file access).

    A controller is served by v2 if the cgroup2 mount lists it in ``v2_controllers`` (a controller bound to a v1
    hierarchy is never listed there: Documentation/admin-guide/cgroup-v2.rst "Mounting"), else by the v1 mount
    that has it. ``kernel`` (from :func:`parse_proc_cgroups`) only sharpens error messages.

    :raises CgroupError: if a needed controller is served by no hierarchy, or its mount is read-only.
    """
    listed = set(v2_controllers.split()) if isinstance(v2_controllers, str) else set(v2_controllers)
    v2 = _v2_mount(mounts)
    v1: dict[str, CgroupMount] = {}
    for m in mounts:
        for c in m.controllers if m.version == 1 else ():
            if c not in v1 or (v1[c].root != "/" and m.root == "/"):
                v1[c] = m
    hierarchies: dict[str, tuple[int, str]] = {}
    needed = list(CONTROLLERS)
    for c in needed:
        if v2 is not None and c in listed:
            mount, version = v2, 2
        elif c in v1:
            mount, version = v1[c], 1
        else:
            why = ("it is disabled in the kernel (cgroup_disable= on the command line?)"
                   if kernel and c in kernel and not kernel[c][1] else
                   "the kernel does not have it" if kernel is not None and c not in kernel else
                   "no cgroup v1 mount has it and the cgroup2 mount does not list it in cgroup.controllers")
            raise CgroupError(f"cgroup controller {c!r} is not available: {why}")
        if not mount.writable:
            raise CgroupError(f"cgroup controller {c!r} is on {mount.path}, which is mounted read-only")
        hierarchies[c] = (version, mount.path)
        if c == "cpu" and version == 1:
            needed.append("cpuacct")  # v1 cpu time lives in cpuacct.usage
    return CgroupLayout(v2.path if v2 else None, hierarchies)


def detect(mountinfo: str = "/proc/self/mountinfo", proc_cgroups: str = "/proc/cgroups") -> CgroupLayout:
    """Detect this host's cgroup layout (pure v2, hybrid or pure v1) from ``mountinfo``, ``proc_cgroups`` and the
    cgroup2 root's ``cgroup.controllers``, then check each hierarchy used is writable by this process.

    Controllers are enabled in v2 ``cgroup.subtree_control`` files when a cgroup is created, not here.

    :raises CgroupError: if cpu, memory or pids (or cpuacct with v1 cpu) is unavailable or not writable.
    """
    try:
        mounts = parse_mountinfo(Path(mountinfo).read_text())
        kernel = parse_proc_cgroups(Path(proc_cgroups).read_text()) if os.path.exists(proc_cgroups) else None
    except OSError as e:
        raise CgroupError(f"cannot read cgroup mounts: {e}") from e
    v2 = _v2_mount(mounts)
    listed = ""
    if v2 is not None:
        try:
            listed = Path(v2.path, "cgroup.controllers").read_text()
        except OSError as e:
            raise CgroupError(f"cannot read {v2.path}/cgroup.controllers: {e}") from e
    layout = layout_from(mounts, listed, kernel)
    for c, (version, mount) in layout.hierarchies.items():
        if not os.access(mount, os.W_OK):
            raise CgroupError(f"cgroup controller {c!r} is on {mount} (v{version}), which this process (uid "
                              f"{os.geteuid()}) cannot write; run as root or delegate a subtree")
    return layout


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror}") from e


def _write(path: Path, value: str) -> None:
    """One write(2) of ``value`` to a cgroup control file (the kernel parses each write as a whole)."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(f"writing {value!r} to {path} failed: {e.strerror}") from e


def _pids_in(directory: Path) -> set[int]:
    try:
        return {int(x) for x in (directory / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise CgroupError(f"cannot read {directory}/cgroup.procs: {e.strerror}") from e


def _rmdir(path: Path, *, wait: float = 0.0) -> bool:
    """rmdir a cgroup; True if it is gone. EBUSY (a dying task still counted) is retried for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}") from e


def _check_int(label: str, value: int, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{label} must be an integer {rng}, got {value!r}")


def limit_writes(layout: CgroupLayout, *, cpu_weight: int | None = None, cpu_max: float | None = None,
                 memory_max: int | None = None, pids_max: int | None = None) -> list[tuple[str, str, str]]:
    """Check the limits of :meth:`VmCgroup.create` and translate them for ``layout`` into the writes to make, in
    order, as ``[(controller, control file, value)]`` (None limits give no write). See :class:`VmCgroup` for units.

    :raises ValueError: for a limit outside its range, naming it.
    """
    v = {c: layout.hierarchies[c][0] for c in CONTROLLERS}
    out = []
    if cpu_weight is not None:
        _check_int("cpu_weight", cpu_weight, 1, 10000)
        out.append(("cpu", "cpu.weight", str(cpu_weight)) if v["cpu"] == 2 else
                   ("cpu", "cpu.shares", str(cpu_weight * 1024 // 100)))
    if cpu_max is not None:
        if isinstance(cpu_max, bool) or not isinstance(cpu_max, (int, float)) or not math.isfinite(cpu_max) or \
                round(cpu_max * CPU_PERIOD_US) < CPU_MIN_QUOTA_US:
            raise ValueError(f"cpu_max must be a number of CPUs >= {CPU_MIN_QUOTA_US / CPU_PERIOD_US}, "
                             f"got {cpu_max!r}")
        quota = round(cpu_max * CPU_PERIOD_US)
        out += [("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}")] if v["cpu"] == 2 else \
            [("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu", "cpu.cfs_quota_us", str(quota))]
    if memory_max is not None:
        _check_int("memory_max", memory_max, 4096)
        out.append(("memory", "memory.max" if v["memory"] == 2 else "memory.limit_in_bytes", str(memory_max)))
    if pids_max is not None:
        _check_int("pids_max", pids_max, 1)
        out.append(("pids", "pids.max", str(pids_max)))
    return out


class VmCgroup:
    """The cgroup(s) of one VM: ``popek.slice/<name>`` on v2, ``<controller mount>/popek/<name>`` on v1.

    Limits (each None = leave the kernel default, unlimited):

    - ``cpu_weight`` 1..10000 with v2 semantics (default 100; cgroup-v2.rst "cpu.weight"). On v1 it is written as
      ``cpu.shares = cpu_weight * 1024 // 100`` so the default weight 100 is the default 1024 shares and the ratios
      between VMs are the same (weight 1 → 10 shares, 10000 → 102400).
    - ``cpu_max`` in CPUs (0.5 = half of one CPU, 2 = two CPUs): quota = cpu_max × 100000 µs per 100000 µs
      period, v2 ``cpu.max = "<quota> 100000"``, v1 ``cpu.cfs_period_us``/``cpu.cfs_quota_us``
      (Documentation/scheduler/sched-bwc.rst). Must give a quota of at least 1000 µs (cpu_max >= 0.01).
    - ``memory_max`` bytes: v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the kernel rounds it down to whole
      pages. Swap is not limited by it.
    - ``pids_max``: number of tasks (processes and threads), ``pids.max`` on both.

    ``with VmCgroup.create(...) as cg:`` calls ``remove(force=True)`` on exit: everything left in a VM's cgroup
    when the VM is over belongs to it.
    """

    def __init__(self, name: str, layout: CgroupLayout):
        """A handle to VM ``name``'s cgroups under ``layout`` (nothing is created; see :meth:`create`)."""
        self.name = validate_name(name)
        self.layout = layout
        self.dirs = layout.directories(name)

    @property
    def paths(self) -> list[Path]:
        """The distinct cgroup directories of this VM (one per hierarchy)."""
        return sorted(set(self.dirs.values()))

    @classmethod
    def create(cls, name: str, *, cpu_weight: int | None = None, cpu_max: float | None = None,
               memory_max: int | None = None, pids_max: int | None = None,
               layout: CgroupLayout | None = None) -> VmCgroup:
        """Create VM ``name``'s cgroups (layout default: :func:`detect`) and set the given limits.

        On v2 the controllers are enabled with ``+cpu +memory +pids`` in ``cgroup.subtree_control`` of the root
        and of ``popek.slice`` where not already enabled (cgroup-v2.rst "Enabling and Disabling"). On failure,
        every directory made so far is removed again.

        :raises ValueError: for an invalid name or limit.
        :raises CgroupError: if the cgroup already exists (a live VM of that name, or a stale one: see
            :func:`cleanup_stale`) or a write fails.
        """
        validate_name(name)
        layout = layout or detect()
        writes = limit_writes(layout, cpu_weight=cpu_weight, cpu_max=cpu_max, memory_max=memory_max,
                              pids_max=pids_max)
        cg = cls(name, layout)
        made: list[Path] = []
        try:
            cg._make_dirs(made)
            for controller, filename, value in writes:
                _write(cg.dirs[controller] / filename, value)
        except BaseException:
            for path in made:  # only what this call made: an existing cgroup belongs to someone else
                _rmdir(path)
            for parent in cg.layout.parents():
                _rmdir(parent)
            raise
        return cg

    def _make_dirs(self, made: list[Path]) -> None:
        """mkdir each hierarchy's parent and VM directory, appending every VM directory made to ``made``."""
        v2 = sorted({c for c, (ver, _) in self.layout.hierarchies.items() if ver == 2} & set(CONTROLLERS))
        v2_parent = Path(self.layout.v2_mount or "/") / V2_PARENT
        if v2:
            self._enable(v2_parent.parent, v2)
        for path in self.paths:
            for _attempt in range(10):  # another VM's remove() may rmdir an empty parent between our two mkdirs
                try:
                    path.parent.mkdir(mode=0o755, exist_ok=True)
                    if path.parent == v2_parent and v2:
                        self._enable(path.parent, v2)
                    path.mkdir(mode=0o755)
                    made.append(path)
                    break
                except FileExistsError:
                    raise CgroupError(f"cgroup {path} already exists: a VM named {self.name!r} is running, or a "
                                      f"stale one was left (popek.cgroups.cleanup_stale removes those)") from None
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e
            else:
                raise CgroupError(f"cannot create cgroup {path}: its parent kept disappearing")

    @staticmethod
    def _enable(directory: Path, controllers: list[str]) -> None:
        have = set(_read(directory / "cgroup.subtree_control").split())
        missing = [c for c in controllers if c not in have]
        if missing:
            _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this VM's cgroup: its pid is written to ``cgroup.procs`` of
        every hierarchy (one on v2, one per controller mount on v1). Children it forks later stay inside.

        :raises CgroupError: if the process does not exist or a write is refused.
        """
        for path in self.paths:
            if not path.is_dir():
                raise CgroupError(f"cannot add pid {pid}: cgroup {path} does not exist (removed?)")
            _write(path / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """The pids (thread-group ids) in this VM's cgroup, over every hierarchy."""
        out: set[int] = set()
        for path in self.paths:
            out |= _pids_in(path)
        return out

    def usage(self) -> dict[str, float | int]:
        """Current usage: ``{"cpu_seconds": float, "memory_bytes": int, "pids": int}``.

        cpu_seconds: v2 ``cpu.stat`` ``usage_usec`` / 1e6, v1 ``cpuacct.usage`` (ns) / 1e9. memory_bytes: v2
        ``memory.current``, v1 ``memory.usage_in_bytes`` (memory charged to the cgroup; on v1 pages a process
        touched before it joined stay charged to its old cgroup). pids: ``pids.current`` (tasks, threads included).

        :raises CgroupError: if a file cannot be read (cgroup removed).
        """
        d, h = self.dirs, self.layout.hierarchies
        if h["cpu"][0] == 2:
            stat = dict(line.split() for line in _read(d["cpu"] / "cpu.stat").splitlines() if line.strip())
            cpu = int(stat["usage_usec"]) / 1e6
        else:
            cpu = int(_read(d["cpuacct"] / "cpuacct.usage")) / 1e9
        mem = _read(d["memory"] / ("memory.current" if h["memory"][0] == 2 else "memory.usage_in_bytes"))
        return {"cpu_seconds": cpu, "memory_bytes": int(mem), "pids": int(_read(d["pids"] / "pids.current"))}

    def remove(self, force: bool = False, timeout: float = 5.0) -> None:
        """Remove this VM's cgroup directories, and each ``popek``/``popek.slice`` parent left empty.

        Without ``force`` a cgroup that still holds processes is refused; with ``force`` they get SIGKILL
        (``cgroup.kill`` on v2 where the kernel has it, else each pid through a pidfd, checked to still be in the
        cgroup, so a recycled pid is never hit) and are waited for, up to ``timeout`` seconds. Removing a cgroup
        that is already gone does nothing.

        :raises CgroupError: if processes remain (no force), this process itself is inside, they survive
            ``timeout``, or an rmdir fails for another reason.
        """
        pids = self.pids()
        if pids:
            if os.getpid() in pids:
                raise CgroupError(f"cannot remove cgroup of VM {self.name!r}: this process ({os.getpid()}) is in it; "
                                  f"remove it from the parent process")
            if not force:
                raise CgroupError(f"cgroup of VM {self.name!r} still has processes {sorted(pids)}; stop the VM first "
                                  f"or use remove(force=True) to SIGKILL them")
            self._kill(timeout)
        for path in self.paths:
            if not _rmdir(path, wait=timeout):
                raise CgroupError(f"cannot remove cgroup {path}: still busy after {timeout} s")
        for parent in sorted({p.parent for p in self.paths}):
            _rmdir(parent)  # fails quietly while other VMs' cgroups are in it

    def _kill(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {sorted(pids)} of VM {self.name!r} survived SIGKILL for {timeout} s")
            for path in self.paths:
                if (path / "cgroup.kill").exists():
                    _write(path / "cgroup.kill", "1")
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                try:
                    if pid in self.pids():  # the pidfd is now the process that is in our cgroup
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)
            time.sleep(0.01)

    def __enter__(self) -> VmCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove(force=True)


def cleanup_stale(alive: Callable[[str], bool], *, layout: CgroupLayout | None = None,
                  force: bool = False) -> list[str]:
    """Remove the cgroup of every VM under the popek parents for which ``alive(name)`` is False; return the names
    removed (sorted). A dead VM's cgroup that still holds processes is left in place unless ``force`` (then they
    are killed, as in :meth:`VmCgroup.remove`).

    :raises CgroupError: if the layout cannot be detected or an rmdir fails.
    """
    layout = layout or detect()
    names: set[str] = set()
    for parent in layout.parents():
        if parent.is_dir():
            names |= {p.name for p in parent.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name) and p.name not in (".", "..")}
    removed = []
    for name in sorted(names):
        if alive(name):
            continue
        cg = VmCgroup(name, layout)
        if cg.pids() and not force:
            continue
        cg.remove(force=force)
        removed.append(name)
    return removed

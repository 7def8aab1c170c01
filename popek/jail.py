"""The jailer: one VMM process in new mount/PID/IPC/UTS/network namespaces, chrooted, unprivileged, under seccomp.

Modelled on Firecracker's jailer (docs/jailer.md): the VMM gets its own namespaces, a chroot holding only the files
of its VM, an unprivileged uid/gid, ``no_new_privs`` and a seccomp filter that kills the process on any system
call outside :data:`ALLOWED_SYSCALLS`. Differences, because the VMM is Python:

- the interpreter and its modules stay outside the chroot, so every module the VMM will need is imported first
  (:func:`preload`: all of Popek but :data:`NOT_IN_JAIL`, plus :data:`EXTRA_IMPORTS`); an import after the
  chroot fails with a message naming the module;
- files are bind-mounted (never copied or hard-linked: the image cache and the runtime directory are on different
  file systems) into a tmpfs mounted at ``<runtime dir>/root`` inside the jail's private mount namespace, each at
  its host path, so the VM spec needs no rewriting and every mount vanishes with the namespace;
- the runtime directory (vm.json, api.sock, console.sock, console.log, vsock.sock) is bind-mounted read-write at
  its host path: the CLI reaches the API and console sockets as for any VM;
- the PID namespace applies to children only, so util-linux ``unshare --fork`` is the launcher
  (:func:`launcher_argv`) and the VMM is the first process (pid 1) of the new namespace. It reports its host pid
  on stdout (:func:`spawn` reads it), and that pid is what vm.json, ``popek ps/stop/kill`` and the cgroup use.

Order inside the namespaces (:func:`enter`): check this is pid 1 of new namespaces (none of them the spawner's),
import the modules (:func:`preload`), build the root (tmpfs, binds, device nodes, a procfs of the new PID
namespace, the tmpfs remounted read-only), chroot, setgroups/setgid/setuid, ``PR_SET_NO_NEW_PRIVS``, then the
seccomp filter last.

Network: the jail's network namespace is empty (not even loopback up). A tap must be opened before the VMM enters
it, which the VM's build (after the chroot) cannot do, so a jailed VM with network interfaces is refused
(:class:`JailError`) rather than given a tap in an isolated namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import os
import select
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: uid/gid the jailed VMM runs as unless `--uid/--gid` say otherwise: "nobody"/"nogroup" on Debian.
JAIL_UID = 65534
JAIL_GID = 65534
#: The chroot's mount point, inside the VM's runtime directory (removed with it by `popek rm`).
ROOT_DIR = "root"
#: Namespaces the VMM gets (util-linux unshare(1) option names).
NAMESPACES = ("mount", "pid", "ipc", "uts", "net")
#: Host device nodes recreated in the jail (mknod, same major:minor), owned by the jail's uid/gid, with these modes.
DEVICE_NODES = {"/dev/kvm": 0o600, "/dev/net/tun": 0o600, "/dev/urandom": 0o666, "/dev/null": 0o666}
#: Read-only facts the VMM reads at run time (``popek.kvm.system.detect_flavor``), bound if the host has them.
HOST_FACTS = ("/sys/module/kvm_pvm",)
#: Package data files the VMM reads after the chroot (``popek.api.server.ApiServer``: the OpenAPI document),
#: bound read-only at their installed paths.
PACKAGE_DATA = (("popek.api", "openapi.json"),)
#: Cached functions (``functools.cache``) whose first call reads host files outside the jail (the source tree's
#: pyproject.toml, the installed distribution's metadata): :func:`preload` calls them before the chroot.
WARM_UP = (("popek.api.controller", "vmm_version"),)
#: Size cap of the jail's root tmpfs: it holds only directories, empty bind targets and device nodes.
ROOT_TMPFS = "mode=0755,size=1m,nr_inodes=4096"
#: Seconds :func:`spawn` waits for the jailed VMM to report its host pid.
SPAWN_TIMEOUT = 30.0

#: Modules of Popek a jailed VMM never needs, by name prefix, and why. :func:`jail_modules` is every other module
#: of the ``popek`` package; tests/unit/test_jail.py checks that every function-level import in those modules is
#: loaded by :func:`preload` or matched here.
NOT_IN_JAIL = {
    "popek.cli": "the command line (click; popek.cli_vms, cli_exec, ... too), the spawner's side",
    "popek.__main__": "the command line",
    "popek.images": "builds guest images; the CLI resolves the guest to host paths before the VMM starts",
    "popek.profiler": "`popek run --profile` only",
    "pyroute2": "tap set-up: network interfaces are refused in a jail (see the module docstring)",
    "rich": "terminal output of the CLI and benchmarks",
    "click": "the command line",
}
#: Standard library and third-party modules imported lazily on paths the VMM takes (zstandard: a zstd-compressed
#: bzImage, popek.boot.payload); :func:`preload` imports them too.
EXTRA_IMPORTS = (
    "zstandard", "encodings.idna", "encodings.ascii", "encodings.latin_1", "email.utils", "http.client", "json.decoder",
    "logging.handlers", "traceback", "linecache", "tokenize", "importlib.readers", "importlib.resources.readers",
)


#: System calls a jailed VMM may make, measured with ``strace -f`` of ``python -m popek.vmm`` running the microvm
#: guest through boot, console input and output, pause, resume, a full snapshot and stop (counted from the
#: console socket's bind on, i.e. after the point the filter is installed), 2026-12-01, Python 3.11, glibc 2.36.
#: The count is the number of calls in that run.
MEASURED_SYSCALLS = {
    "ioctl": 12995,  # KVM_RUN and the other KVM ioctls (not narrowed by request number: see SYSCALL_NOTES)
    "futex": 3674, "rt_sigprocmask": 1802, "rt_sigreturn": 918, "getpid": 776,
    "tgkill": 759,  # the vCPU kick signal (popek.vcpu.install_kick_signal)
    "mprotect": 280, "lseek": 187, "write": 177, "newfstatat": 92, "epoll_wait": 90, "read": 84, "close": 83,
    "epoll_ctl": 56, "openat": 56, "mmap": 45, "gettid": 39, "munmap": 35, "sendto": 34, "fsync": 20,
    "recvfrom": 19, "rseq": 18, "set_robust_list": 18, "exit": 18, "madvise": 17,
    "clone3": 16,  # answered ENOSYS by the filter: glibc then uses clone, allowed only with CLONE_THREAD
    "rename": 10, "getsockname": 9, "accept4": 9, "poll": 8, "shutdown": 8, "getrandom": 7, "rt_sigaction": 4,
    "eventfd2": 4, "epoll_create1": 3, "access": 3, "unlink": 3, "bind": 2, "chmod": 2, "listen": 2, "fcntl": 2,
    "getdents64": 2, "socket": 1, "pipe2": 1, "memfd_create": 1, "ftruncate": 1, "uname": 1, "exit_group": 1,
}
#: Allowed though the measured run did not make them, each for a path that run did not take.
UNMEASURED_SYSCALLS = {
    "clone": "thread creation when clone3 is refused (glibc's fallback); only with CLONE_THREAD",
    "brk": "malloc growing the heap (seen before the filter point only by chance)",
    "mremap": "realloc of large buffers",
    "clock_nanosleep": "time.sleep", "nanosleep": "time.sleep on older glibc",
    "select": "select.select", "pselect6": "select.select", "ppoll": "poll with a timeout on newer glibc",
    "epoll_pwait": "selectors on newer glibc", "sched_yield": "lock contention in glibc",
    "pread64": "virtio-blk reads", "pwrite64": "virtio-blk writes", "preadv": "virtio-blk", "pwritev": "virtio-blk",
    "preadv2": "virtio-blk", "pwritev2": "virtio-blk", "fdatasync": "virtio-blk flush", "fallocate": "snapshots",
    "readv": "virtio-net and vsock frames", "writev": "virtio-net and vsock frames",
    "connect": "vsock: guest-initiated connections to <uds>_<port>", "sendmsg": "vsock", "recvmsg": "vsock",
    "setsockopt": "sockets", "getsockopt": "sockets", "getpeername": "sockets",
    "dup": "os.dup", "dup3": "os.dup2", "fstat": "os.fstat", "statx": "os.stat on newer glibc", "lstat": "os.lstat",
    "sigaltstack": "Python's faulthandler/threads", "restart_syscall": "a sleep interrupted by a signal",
    "getuid": "os.getuid", "geteuid": "os.geteuid", "getgid": "os.getgid", "getegid": "os.getegid",
    "getcwd": "os.path.abspath", "readlink": "os.readlink", "sched_getaffinity": "os.cpu_count",
    "prlimit64": "resource limits read by the runtime", "sysinfo": "memory queries", "fchmod": "os.chmod on an fd",
    "kill": "a signal to itself (os.kill(os.getpid(), ...))",
}
#: Notes on the filter (what a reviewer should know).
SYSCALL_NOTES = (
    "Default action: SECCOMP_RET_KILL_PROCESS, with SECCOMP_FILTER_FLAG_LOG so the kernel logs the kill.",
    "execve, fork (clone without CLONE_THREAD), socket() of any family but AF_UNIX, ptrace, mount, chroot, setuid "
    "and every system call not listed kill the VMM.",
    "ioctl is allowed for any request: KVM, TUN and terminal ioctls all go through it; narrowing it by request "
    "number is left for later (Firecracker does, per fd type).",
)
CLONE_THREAD = 0x00010000
AF_UNIX = 1
#: Every system call name the filter allows (``clone`` with an argument check, see :func:`build_filter`).
ALLOWED_SYSCALLS = tuple(sorted((set(MEASURED_SYSCALLS) | set(UNMEASURED_SYSCALLS)) - {"clone3"}))

# <sys/mount.h> flags (mount(2)).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    """The VMM cannot be jailed as asked (a file the jail user cannot use, a network interface, not root, ...)."""


@dataclass(frozen=True)
class Bind:
    """One bind mount: host ``source`` at ``target`` (an absolute path inside the jail), read-only or not."""

    source: Path
    target: Path
    readonly: bool
    directory: bool


@dataclass(frozen=True)
class Node:
    """One character/block device node at ``path`` inside the jail: ``kind`` stat.S_IFCHR/S_IFBLK, ``rdev``
    (``os.makedev``), permission ``mode``; owned by the jail's uid/gid."""

    path: Path
    kind: int
    rdev: int
    mode: int


@dataclass(frozen=True)
class JailPlan:
    """What the jail of one VM holds: ``root`` (the host directory the jail's tmpfs is mounted on), the uid/gid the
    VMM runs as, the bind mounts (files of the VM, its runtime directory, :data:`HOST_FACTS`) and device nodes."""

    root: Path
    uid: int
    gid: int
    runtime_dir: Path
    binds: tuple[Bind, ...]
    nodes: tuple[Node, ...]

    def paths(self) -> list[Path]:
        """Every path inside the jail that the plan puts there (besides their parent directories and /proc)."""
        return sorted([b.target for b in self.binds] + [n.path for n in self.nodes])


def _may(st: os.stat_result, uid: int, gid: int, want: int) -> bool:
    """Whether uid/gid (no supplementary groups) have ``want`` (4 read, 2 write) on a file with ``st``."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid == gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def _file_bind(path: str, what: str, uid: int, gid: int, readonly: bool) -> Bind:
    p = Path(path)
    if not p.is_absolute():
        raise JailError(f"{what} {path!r} is not an absolute path")
    try:
        st = os.stat(p)
    except OSError as e:
        raise JailError(f"{what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise JailError(f"{what} {path} is a directory")
    if not _may(st, uid, gid, 4 if readonly else 6):
        need = "read" if readonly else "read and write"
        raise JailError(f"{what} {path}: the jail's uid {uid}/gid {gid} may not {need} it (mode "
                        f"{stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}); chown it or pass --uid/--gid")
    return Bind(p, p, readonly, False)


def device_nodes(kvm_device: str | None = None) -> tuple[Node, ...]:
    """The :data:`DEVICE_NODES` that exist on this host, with their host major:minor; ``/dev/kvm`` is replaced by
    ``kvm_device`` (default ``$POPEK_KVM_DEVICE``, as ``popek.kvm.system.Kvm`` opens it), at the same path.

    :raises JailError: if the KVM device does not exist or is not a character device.
    """
    kvm = kvm_device or os.environ.get("POPEK_KVM_DEVICE", "/dev/kvm")
    nodes = []
    for path, mode in DEVICE_NODES.items():
        host = kvm if path == "/dev/kvm" else path
        try:
            st = os.stat(host)
        except FileNotFoundError:
            if path == "/dev/kvm":
                raise JailError(f"no KVM device {host}") from None
            continue
        if not stat.S_ISCHR(st.st_mode):
            raise JailError(f"{host} is not a character device")
        if Path(host) not in [n.path for n in nodes]:  # POPEK_KVM_DEVICE may name one of the others
            nodes.append(Node(Path(host), stat.S_IFCHR, st.st_rdev, mode))
    return tuple(nodes)


def package_data() -> list[Path]:
    """The installed paths of :data:`PACKAGE_DATA` (``importlib.resources``).

    :raises JailError: for one that is not a plain file (a zipped install cannot be bound into the jail).
    """
    import importlib.resources

    out = []
    for package, name in PACKAGE_DATA:
        p = Path(str(importlib.resources.files(package).joinpath(name)))
        if not p.is_file():
            raise JailError(f"package data {package}/{name} is not a file on disk ({p}); install Popek unzipped")
        out.append(p)
    return out


def make_plan(spec, runtime_dir: Path, uid: int = JAIL_UID, gid: int = JAIL_GID, *,
              kvm_device: str | None = None, host_facts: tuple[str, ...] = HOST_FACTS) -> JailPlan:
    """The jail of the VM described by ``spec`` (a ``popek.api.model.VmSpec``) whose runtime directory is
    ``runtime_dir``: its kernel and initrd (read-only), drives (read-only unless ``is_read_only`` is false),
    the runtime directory (read-write), :data:`HOST_FACTS` that exist and :data:`PACKAGE_DATA` (read-only), and
    :func:`device_nodes`.

    :raises JailError: a file is missing, not absolute, a directory, or not readable (writable for a read-write
        drive) by ``uid``/``gid``; the spec has network interfaces; its vsock socket is outside the runtime
        directory; a uid/gid is negative.
    """
    if uid < 0 or gid < 0:
        raise JailError(f"uid {uid} / gid {gid}: must be >= 0")
    runtime_dir = Path(runtime_dir)
    binds = []
    boot = spec.boot_source
    if boot is not None:
        binds.append(_file_bind(boot.kernel_image_path, "kernel", uid, gid, True))
        if boot.initrd_path:
            binds.append(_file_bind(boot.initrd_path, "initrd", uid, gid, True))
    for d in spec.drives.values():
        binds.append(_file_bind(d.path_on_host, f"drive {d.drive_id}", uid, gid, d.is_read_only))
    if spec.network_interfaces:
        raise JailError("a jailed VM cannot have network interfaces yet: its tap would have to be opened before "
                        "the VMM enters its own network namespace")
    if spec.vsock is not None and Path(spec.vsock.uds_path).parent != runtime_dir:
        raise JailError(f"vsock socket {spec.vsock.uds_path}: a jailed VM's vsock socket must be in its runtime "
                        f"directory {runtime_dir}")
    binds.append(Bind(runtime_dir, runtime_dir, False, True))
    binds += [Bind(Path(f), Path(f), True, True) for f in host_facts if os.path.isdir(f)]
    binds += [Bind(p, p, True, False) for p in package_data()]
    targets = [b.target for b in binds]
    dup = {t for t in targets if targets.count(t) > 1}
    if dup:
        raise JailError(f"the jail would bind {sorted(map(str, dup))} twice")
    return JailPlan(runtime_dir / ROOT_DIR, uid, gid, runtime_dir, tuple(binds), device_nodes(kvm_device))


# ---- inside the namespaces -----------------------------------------------------------------------------------------

def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(None if source is None else os.fsencode(source), os.fsencode(str(target)),
                       None if fstype is None else fstype.encode(), ctypes.c_ulong(flags),
                       None if data is None else data.encode()),
           f"mount {source or ''} on {target}")


def _excluded(name: str) -> bool:
    return name.startswith("popek.cli") or any(name == p or name.startswith(p + ".") for p in NOT_IN_JAIL)


def jail_modules() -> list[str]:
    """Every module of the ``popek`` package but those :data:`NOT_IN_JAIL` (found on disk, nothing imported)."""
    import pkgutil

    import popek

    out, todo = ["popek"], [(popek.__path__, "popek.")]
    while todo:
        path, prefix = todo.pop()
        for m in pkgutil.iter_modules(path, prefix):
            if _excluded(m.name):
                continue
            out.append(m.name)
            if m.ispkg:
                todo.append(([os.path.join(m.module_finder.path, m.name.rpartition(".")[2])], m.name + "."))
    return sorted(out)


def preload() -> list[str]:
    """Import :func:`jail_modules`, :data:`EXTRA_IMPORTS` and libseccomp's bindings (which look the library up
    with ``ldconfig``, a subprocess), and call :data:`WARM_UP`; return the names of all modules loaded now.

    :raises ImportError: for a module that cannot be imported.
    """
    for name in (*jail_modules(), *EXTRA_IMPORTS):
        importlib.import_module(name)
    for module, function in WARM_UP:
        getattr(sys.modules[module], function)()
    import pyseccomp  # noqa: F401

    return sorted(sys.modules)


class _NoImportsAfterChroot:
    """A ``sys.meta_path`` finder that refuses every import of a module not loaded before the chroot, saying so
    (the module files are outside the jail; without this the error would be a bare ModuleNotFoundError)."""

    def find_spec(self, name, path=None, target=None):
        print(f"popek.jail: module {name} was not imported before the chroot (popek.jail.preload)",
              file=sys.stderr, flush=True)
        raise ModuleNotFoundError(f"{name}: imported after the chroot (popek.jail.preload)", name=name)


#: The namespaces :func:`enter` checks are new (names under /proc/<pid>/ns).
NS_LINKS = ("mnt", "pid", "ipc", "uts", "net")


def namespace_ids(pid: int | str = "self") -> dict[str, str]:
    """``{name: "mnt:[4026531841]"...}`` of process ``pid``'s :data:`NS_LINKS` (readlink of /proc/<pid>/ns/*)."""
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NS_LINKS}


def _in_new_namespaces(outside: dict[str, str] | None) -> None:
    """Refuse to touch mounts unless this process is pid 1 of a new PID namespace and, if the spawner said which
    namespaces it was in (``outside``, from :func:`namespace_ids`), in none of them. A process in a child PID
    namespace may not read the host init's /proc/1/ns, hence the spawner's word."""
    if os.getpid() != 1:
        raise JailError(f"not the first process of a new PID namespace (pid {os.getpid()}); start it with "
                        f"popek.jail.launcher_argv")
    ours = namespace_ids()
    same = sorted(ns for ns, ident in (outside or {}).items() if ours.get(ns) == ident)
    if same:
        raise JailError(f"still in the spawner's {', '.join(same)} namespace(s)")


def build_root(plan: JailPlan) -> None:
    """Mount the jail's root: a tmpfs on ``plan.root`` with the binds, device nodes and a procfs of this PID
    namespace, then remount the tmpfs read-only. Only in a private mount namespace (see :func:`enter`)."""
    root = plan.root
    root.mkdir(mode=0o755, exist_ok=True)
    _mount(None, Path("/"), None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID, ROOT_TMPFS)  # not nodev: the device nodes live on it

    def inside(p: Path) -> Path:
        q = root / p.relative_to("/")
        q.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return q

    for b in plan.binds:
        target = inside(b.target)
        if b.directory:
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            target.touch(mode=0o644, exist_ok=True)
        _mount(str(b.source), target, None, MS_BIND)
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if b.readonly else 0)
               | (MS_NODEV if b.directory else 0))
    for n in plan.nodes:
        target = inside(n.path)
        os.mknod(target, n.kind | n.mode, n.rdev)
        os.chown(target, plan.uid, plan.gid)
        os.chmod(target, n.mode)
    proc = inside(Path("/proc"))
    proc.mkdir(mode=0o555)
    _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("tmpfs", root, "tmpfs", MS_REMOUNT | MS_RDONLY | MS_NOSUID, ROOT_TMPFS)


def drop_privileges(uid: int, gid: int) -> None:
    """setgroups([]), setresgid, setresuid (every capability goes with uid 0), PR_SET_NO_NEW_PRIVS, and
    PR_SET_PDEATHSIG SIGKILL again (a credential change clears it; the launcher set it: ``--kill-child``).

    :raises JailError: if the process could regain uid 0 afterwards.
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise JailError("the jailed process could set uid 0 again")


def build_filter():
    """A ``pyseccomp.SyscallFilter`` (libseccomp) for the native architecture: :data:`ALLOWED_SYSCALLS` allowed
    (``clone`` only with CLONE_THREAD in its flags, so threads but no new processes; ``socket`` only for AF_UNIX),
    ``clone3`` answered ENOSYS
    (its flags are in memory a filter cannot read; glibc falls back to clone), everything else
    SECCOMP_RET_KILL_PROCESS, logged (SECCOMP_FILTER_FLAG_LOG). Not loaded (see :func:`load_filter`).

    :raises JailError: for a system call name this libseccomp does not know.
    """
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.KILL_PROCESS)
    f.set_attr(sc.Attr.CTL_LOG, 1)
    for name in ALLOWED_SYSCALLS:
        try:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        except Exception as e:  # noqa: BLE001 - libseccomp's error types differ between versions
            raise JailError(f"seccomp: system call {name!r} unknown to libseccomp: {e}") from None
        if nr < 0:
            raise JailError(f"seccomp: system call {name!r} unknown to libseccomp")
        if name == "clone":
            f.add_rule(sc.ALLOW, nr, sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        elif name == "socket":  # the API, console and vsock sockets; nothing else (no netlink, no IP)
            f.add_rule(sc.ALLOW, nr, sc.Arg(0, sc.EQ, AF_UNIX))
        else:
            f.add_rule(sc.ALLOW, nr)
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    return f


def load_filter() -> None:
    """Install :func:`build_filter`'s filter on this process (threads created later inherit it). Needs
    no_new_privs or CAP_SYS_ADMIN; libseccomp sets no_new_privs itself (SCMP_FLTATR_CTL_NNP)."""
    build_filter().load()


def enter(plan: JailPlan, outside: dict[str, str] | None = None) -> None:
    """Jail this process as ``plan`` says: see the module docstring for the order. Afterwards the process sees only
    the plan's files, runs as ``plan.uid``/``plan.gid`` without capabilities, and dies (SIGSYS) on a system call
    outside :data:`ALLOWED_SYSCALLS`.

    :param outside: the spawner's :func:`namespace_ids`; the jail refuses to build in any of them.
    :raises JailError: not in fresh namespaces, a mount or privilege change failed (nothing is mounted on the
        host: all mounts are in the jail's own mount namespace).
    """
    _in_new_namespaces(outside)
    preload()
    for path in (plan.runtime_dir, *plan.runtime_dir.iterdir()):  # the VMM writes vm.json, sockets, logs there
        if path.name != ROOT_DIR:
            os.chown(path, plan.uid, plan.gid)
    build_root(plan)
    os.chdir(plan.root)
    os.chroot(".")
    os.chdir("/")
    drop_privileges(plan.uid, plan.gid)
    sys.meta_path.insert(0, _NoImportsAfterChroot())
    load_filter()


# ---- outside: the launcher -----------------------------------------------------------------------------------------

def launcher_argv(name: str, base: Path | str, uid: int = JAIL_UID, gid: int = JAIL_GID) -> list[str]:
    """The command that starts a jailed VMM: util-linux ``unshare --fork --kill-child`` with a new namespace of
    each of :data:`NAMESPACES` (mount propagation private), running ``python -m popek.jail``, which becomes pid 1
    of the new PID namespace and is SIGKILLed if the launcher dies."""
    return ["unshare", "--fork", "--kill-child", *(f"--{ns}" for ns in NAMESPACES), "--propagation", "private",
            "--", sys.executable, "-m", "popek.jail", "--name", name, "--base", str(base), "--uid", str(uid),
            "--gid", str(gid), "--outside", ",".join(namespace_ids().values())]


def check_host() -> None:
    """:raises JailError: unless this process can build a jail here (root, util-linux unshare, libseccomp)."""
    if os.geteuid() != 0:
        raise JailError("--jail needs root (namespaces, chroot, device nodes and the uid change need it)")
    import shutil

    if shutil.which("unshare") is None:
        raise JailError("--jail needs util-linux's unshare(1) on PATH")
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise JailError(f"--jail needs libseccomp and its Python bindings (pyseccomp): {e}") from None


def spawn(name: str, base: Path | str, uid: int = JAIL_UID, gid: int = JAIL_GID,
          timeout: float = SPAWN_TIMEOUT) -> subprocess.Popen:
    """Start a jailed VMM for VM ``name`` (it then waits for its spec on stdin, as ``python -m popek.vmm
    --spec-stdin``). Returns the launcher's Popen with ``vmm_pid`` set: the VMM's host pid, read from its
    first line on stdout.

    :raises JailError: the launcher ended or said nothing within ``timeout`` s (its stderr is in the message);
        it is killed, and with it the VMM.
    """
    child = subprocess.Popen(launcher_argv(name, base, uid, gid), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True, cwd="/")
    line = b""
    try:
        ready, _, _ = select.select([child.stdout], [], [], timeout)
        if ready:
            line = child.stdout.readline()
        child.vmm_pid = int(line)
    except (ValueError, OSError):
        child.kill()
        child.wait()
        err = child.stderr.read().decode(errors="replace").strip()
        raise JailError(f"the jailed VMM did not start: {err or f'no pid within {timeout:g} s'}") from None
    finally:
        child.stdout.close()
    return child


def main(argv: list[str] | None = None) -> int:
    """``python -m popek.jail --name NAME --base DIR --uid UID --gid GID`` (run by :func:`launcher_argv`): report
    the host pid on stdout, then run ``popek.vmm.main`` with :func:`enter` as its prepare step."""
    p = argparse.ArgumentParser(prog="python -m popek.jail", description="Run one Popek VMM inside its jail.")
    p.add_argument("--name", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--uid", type=int, default=JAIL_UID)
    p.add_argument("--gid", type=int, default=JAIL_GID)
    p.add_argument("--outside", default="", help="the spawner's namespaces, comma-separated 'mnt:[ID]' links")
    args = p.parse_args(argv)
    outside = {link.partition(":")[0]: link for link in args.outside.split(",") if link}
    os.write(1, f"{os.readlink('/proc/self')}\n".encode())  # /proc is still the host's: the host pid
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    from popek import vmm

    def prepare(spec, rd) -> None:
        try:
            enter(make_plan(spec, rd.path, args.uid, args.gid), outside)
        except (JailError, OSError) as e:
            print(f"popek.jail: cannot jail the VMM of {args.name}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return vmm.main(["--name", args.name, "--base", args.base, "--spec-stdin"], prepare=prepare)


if __name__ == "__main__":
    sys.exit(main())

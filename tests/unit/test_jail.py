"""The jailer without KVM: the jail plan (which host files are bound, refusals), the modules loaded before the
chroot, the seccomp filter built from the documented list, and (as root) the jail itself entered in fresh
namespaces by a probe process: no host processes or files visible, unprivileged, a disallowed call kills it."""

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from popek import jail
from popek.api.model import BootSource, Drive, NetworkInterface, VmSpec, Vsock

needs_root_jail = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                     reason="entering a jail needs root and util-linux unshare")


def _file(path: Path, mode: int = 0o644, data: bytes = b"data") -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _spec(kernel: Path, initrd: Path | None = None, drives=(), nets=(), vsock=None) -> VmSpec:
    spec = VmSpec()
    spec.boot_source = BootSource(kernel_image_path=str(kernel), initrd_path=str(initrd) if initrd else None)
    for d in drives:
        spec.set_drive(d)
    for n in nets:
        spec.set_network_interface(n)
    spec.vsock = vsock
    return spec


def _drive(drive_id: str, path: Path, readonly: bool) -> Drive:
    return Drive(drive_id=drive_id, path_on_host=str(path), is_root_device=False, is_read_only=readonly)


# ---- the plan ------------------------------------------------------------------------------------------------------

def test_plan_binds_the_vms_files_at_their_host_paths_and_nothing_else(tmp_path):
    kernel, initrd = _file(tmp_path / "vmlinux"), _file(tmp_path / "initrd")
    ro, rw = _file(tmp_path / "ro.img"), _file(tmp_path / "rw.img", 0o666)
    _file(tmp_path / "System.map")  # a neighbour of the kernel: must not be in the jail
    rd = tmp_path / "run" / "vm1"
    rd.mkdir(parents=True)
    plan = jail.make_plan(_spec(kernel, initrd, [_drive("ro", ro, True), _drive("rw", rw, False)]), rd)
    binds = {b.target: b for b in plan.binds}
    assert binds[kernel].readonly and binds[initrd].readonly and binds[ro].readonly
    assert not binds[rw].readonly and not binds[rd].readonly and binds[rd].directory
    assert all(b.source == b.target for b in plan.binds)
    data = {p for p in binds if p not in (kernel, initrd, ro, rw, rd)}
    assert data == {*jail.package_data(), *(Path(f) for f in jail.HOST_FACTS if os.path.isdir(f))}
    assert tmp_path / "System.map" not in binds
    assert plan.root == rd / jail.ROOT_DIR and (plan.uid, plan.gid) == (jail.JAIL_UID, jail.JAIL_GID)
    nodes = {str(n.path): n for n in plan.nodes}
    assert "/dev/kvm" in nodes and nodes["/dev/kvm"].rdev == os.stat("/dev/kvm").st_rdev
    assert set(nodes) <= set(jail.DEVICE_NODES)


def test_plan_uses_the_kvm_device_the_vmm_will_open(tmp_path, monkeypatch):
    monkeypatch.setenv("POPEK_KVM_DEVICE", "/dev/zero")
    nodes = [str(n.path) for n in jail.make_plan(_spec(_file(tmp_path / "k")), tmp_path).nodes]
    assert "/dev/zero" in nodes and "/dev/kvm" not in nodes
    monkeypatch.setenv("POPEK_KVM_DEVICE", "/dev/null")  # the same node as one the jail always has: made once
    nodes = [str(n.path) for n in jail.make_plan(_spec(_file(tmp_path / "k")), tmp_path).nodes]
    assert nodes.count("/dev/null") == 1


@pytest.mark.parametrize("case", ["unreadable kernel", "read-only drive file for a writable drive", "missing initrd",
                                  "relative kernel", "network interface", "vsock outside the runtime dir"])
def test_plan_refuses_what_the_jailed_vmm_could_not_use(tmp_path, case):
    kernel = _file(tmp_path / "vmlinux")
    rd = tmp_path / "rd"
    rd.mkdir()
    spec = {
        "unreadable kernel": lambda: _spec(_file(tmp_path / "secret", 0o600)),
        "read-only drive file for a writable drive": lambda: _spec(kernel, drives=[_drive("d", _file(tmp_path / "d"),
                                                                                             False)]),
        "missing initrd": lambda: _spec(kernel, tmp_path / "nope"),
        "relative kernel": lambda: _spec(Path("vmlinux")),
        "network interface": lambda: _spec(kernel, nets=[NetworkInterface(iface_id="eth0",
                                                                          host_dev_name="popek%d")]),
        "vsock outside the runtime dir": lambda: _spec(kernel, vsock=Vsock(guest_cid=3,
                                                                           uds_path=str(tmp_path / "v.sock"))),
    }[case]()
    with pytest.raises(jail.JailError) as e:
        jail.make_plan(spec, rd)
    assert "\n" not in str(e.value)
    words = {"unreadable kernel": "may not read", "read-only drive file for a writable drive": "may not read and write",
             "missing initrd": "No such file", "relative kernel": "absolute", "network interface": "network",
             "vsock outside the runtime dir": "runtime directory"}[case]
    assert words in str(e.value)


def test_plan_accepts_a_vsock_socket_in_the_runtime_dir(tmp_path):
    plan = jail.make_plan(_spec(_file(tmp_path / "k"), vsock=Vsock(guest_cid=3, uds_path=str(tmp_path / "v.sock"))),
                          tmp_path)
    assert tmp_path in [b.target for b in plan.binds]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_plan_checks_access_as_the_given_uid(tmp_path):
    kernel = _file(tmp_path / "k", 0o600)
    os.chown(kernel, 4321, 4321)
    assert jail.make_plan(_spec(kernel), tmp_path, 4321, 4321).uid == 4321
    with pytest.raises(jail.JailError, match="uid 65534"):
        jail.make_plan(_spec(kernel), tmp_path)


# ---- what is imported before the chroot ----------------------------------------------------------------------------

def _lazy_imports(module_name: str) -> set[str]:
    """Modules imported inside functions of ``module_name`` (absolute imports)."""
    path = sys.modules[module_name].__file__
    tree = ast.parse(Path(path).read_text())
    out = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    out.add(node.module)
    return out


def test_every_lazy_import_of_the_jailed_modules_is_preloaded_or_declared_outside():
    """A module imported inside a function after the chroot would fail: each one must be loaded by preload()."""
    loaded = set(jail.preload())
    missing = {}
    for name in jail.jail_modules():
        for target in _lazy_imports(name):
            if target not in loaded and not jail._excluded(target):
                missing.setdefault(target, []).append(name)
    assert missing == {}, f"imported lazily but neither preloaded nor in NOT_IN_JAIL: {missing}"


def test_jail_modules_are_all_of_popek_but_the_cli_and_image_builders():
    mods = jail.jail_modules()
    assert {"popek.vmm", "popek.runner", "popek.api.server", "popek.persist", "popek.jail"} <= set(mods)
    assert not [m for m in mods if m.startswith(("popek.cli", "popek.images"))]


# ---- seccomp -------------------------------------------------------------------------------------------------------

def test_syscall_lists_are_documented_once_and_build_a_filter(tmp_path):
    assert not set(jail.MEASURED_SYSCALLS) & set(jail.UNMEASURED_SYSCALLS)
    assert "execve" not in jail.ALLOWED_SYSCALLS and "clone3" not in jail.ALLOWED_SYSCALLS
    f = jail.build_filter()
    with open(tmp_path / "filter.pfc", "w") as out:
        f.export_pfc(out)
    pfc = (tmp_path / "filter.pfc").read_text()
    for name in ("ioctl", "futex", "tgkill", "epoll_wait", "clone"):
        assert f"if ($syscall == {__import__('pyseccomp').resolve_syscall(0, name)})" in pfc, name
    assert "action KILL_PROCESS" in pfc


def _run_filtered(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from popek.jail import load_filter\nload_filter()\n" + code],
                          capture_output=True, text=True, timeout=60)


def test_a_disallowed_syscall_kills_the_filtered_process_with_sigsys_and_allowed_work_goes_on():
    killed = _run_filtered("import os\nprint('before', flush=True)\nos.execv('/bin/true', ['true'])")
    assert killed.returncode == -signal.SIGSYS and killed.stdout == "before\n"
    forked = _run_filtered("import os\nos.fork()\nprint('forked')")
    assert forked.returncode == -signal.SIGSYS and "forked" not in forked.stdout
    inet = _run_filtered("import socket\nsocket.socket(socket.AF_INET)\nprint('inet')")
    assert inet.returncode == -signal.SIGSYS and "inet" not in inet.stdout
    ok = _run_filtered(textwrap.dedent("""
        import os, threading, time
        t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()
        r, w = os.pipe(); os.write(w, b"x"); assert os.read(r, 1) == b"x"
        with open(os.devnull, "wb") as f: f.write(b"z")
        import socket; socket.socket(socket.AF_UNIX).close()
        print("alive")
    """))
    assert (ok.returncode, ok.stdout) == (0, "alive\n"), ok.stderr


# ---- the jail itself (root) ----------------------------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from popek import jail
    from popek.api.model import BootSource, VmSpec
    spec = VmSpec()
    spec.boot_source = BootSource(kernel_image_path=sys.argv[1])
    plan = jail.make_plan(spec, Path(sys.argv[2]))
    jail.enter(plan, dict(zip(jail.NS_LINKS, sys.argv[3].split(","))))
    out = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
           "procs": sorted(p for p in os.listdir("/proc") if p.isdigit()), "top": sorted(os.listdir("/"))}
    for name, path in (("host_file", sys.argv[4]), ("neighbour", sys.argv[5])):
        try:
            open(path).close()
            out[name] = "opened"
        except OSError as e:
            out[name] = e.strerror
    out["kernel"] = open(sys.argv[1], "rb").read()
    out["kernel"] = out["kernel"].decode()
    try:
        import popek.images.build
        out["late_import"] = "worked"
    except ImportError:
        out["late_import"] = "refused"
    print(json.dumps(out), flush=True)
    os.execv("/bin/true", ["true"])
""")


@needs_root_jail
def test_a_jailed_process_sees_only_its_files_and_processes_and_dies_on_execve(tmp_path):
    kernel = _file(tmp_path / "vmlinux", data=b"kernel bytes")
    neighbour = _file(tmp_path / "System.map")
    host_file = _file(tmp_path / "host.txt")
    rd = tmp_path / "rd"
    rd.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    outside = ",".join(jail.namespace_ids().values())
    p = subprocess.run(["unshare", "--fork", "--kill-child", *(f"--{ns}" for ns in jail.NAMESPACES),
                        "--propagation", "private", "--", sys.executable, str(tmp_path / "probe.py"), str(kernel),
                        str(rd), outside, str(host_file), str(neighbour)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGSYS, p.stderr  # unshare dies of the signal that killed its child
    out = json.loads(p.stdout)
    assert (out["uid"], out["gid"], out["pid"]) == (jail.JAIL_UID, jail.JAIL_GID, 1)
    assert out["procs"] == ["1"], "the jail's /proc shows host processes"
    assert out["host_file"] == out["neighbour"] == "No such file or directory"
    assert out["kernel"] == "kernel bytes"
    assert out["late_import"] == "refused"
    assert "module popek.images was not imported before the chroot" in p.stderr
    assert set(out["top"]) <= {"dev", "proc", "sys", "tmp", *Path(jail.package_data()[0]).parts[1:2]}
    # the mounts were in the jail's namespace only: the host sees an empty mount point, and rd is the jail uid's
    assert list((rd / jail.ROOT_DIR).iterdir()) == []
    assert str(rd) not in Path("/proc/self/mountinfo").read_text()
    assert os.stat(rd).st_uid == jail.JAIL_UID


@needs_root_jail
def test_enter_refuses_to_build_a_jail_in_the_callers_namespaces(tmp_path):
    (tmp_path / "rd").mkdir()
    code = ("from pathlib import Path; from popek import jail; from popek.api.model import BootSource, VmSpec\n"
            "s = VmSpec(); s.boot_source = BootSource(kernel_image_path='/dev/null')\n"
            f"jail.enter(jail.make_plan(s, Path({str(tmp_path / 'rd')!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not the first process of a new PID namespace" in p.stderr
    assert not (tmp_path / "rd" / jail.ROOT_DIR).exists()


def test_check_host_refuses_a_non_root_caller(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(jail.JailError, match="needs root"):
        jail.check_host()


def test_launcher_makes_the_vmm_pid_1_of_new_namespaces_killed_with_its_launcher():
    argv = jail.launcher_argv("vm1", "/run/popek", 1234, 5678)
    assert argv[:2] == ["unshare", "--fork"] and "--kill-child" in argv
    assert {f"--{ns}" for ns in ("mount", "pid", "ipc", "uts", "net")} <= set(argv)
    assert argv[argv.index("--uid") + 1] == "1234" and argv[argv.index("--gid") + 1] == "5678"
    assert argv[argv.index("--outside") + 1].split(",") == list(jail.namespace_ids().values())


def test_popek_run_refuses_jail_without_detach(tmp_path):
    from test_cli import assert_refused, popek_run

    assert_refused(popek_run(tmp_path, "--jail"), "--jail goes with --detach")

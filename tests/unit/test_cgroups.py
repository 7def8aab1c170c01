"""Per-VM cgroups: layout detection from mountinfo fixtures (v2, hybrid, v1), limit translation, and real cgroups."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from popek.cgroups import (CgroupError, CgroupLayout, VmCgroup, cleanup_stale, detect, layout_from, limit_writes,
                           parse_mountinfo, parse_proc_cgroups)

PURE_V2 = ("22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
           "26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
           "rw,nsdelegate,memory_recursiveprot\n")
PURE_V2_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc\n"

# This machine's shape: every v1 controller on its own mount, an empty cgroup2 at /sys/fs/cgroup/unified.
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUPS = """\
#subsys_name	hierarchy	num_cgroups	enabled
cpuset	3	1	1
cpu	1	1	1
cpuacct	2	1	1
memory	4	42	1
pids	8	1	1
hugetlb	0	1	1
"""

# systemd's classic hybrid: cpu and cpuacct co-mounted (a comma in the mount point), systemd's own cgroup2.
PURE_V1 = """\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
28 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
"""


def test_pure_v2_serves_cpu_memory_pids_from_the_unified_mount():
    layout = layout_from(parse_mountinfo(PURE_V2), PURE_V2_CONTROLLERS)
    assert layout.v2_mount == "/sys/fs/cgroup"
    assert layout.hierarchies == {c: (2, "/sys/fs/cgroup") for c in ("cpu", "memory", "pids")}
    assert layout.directories("vm1") == {c: Path("/sys/fs/cgroup/popek.slice/vm1") for c in ("cpu", "memory", "pids")}


def test_hybrid_with_empty_unified_mount_uses_each_v1_mount_and_cpuacct_for_cpu_time():
    layout = layout_from(parse_mountinfo(HYBRID), "hugetlb\n", parse_proc_cgroups(HYBRID_PROC_CGROUPS))
    assert layout.v2_mount == "/sys/fs/cgroup/unified"
    assert layout.hierarchies == {"cpu": (1, "/sys/fs/cgroup/cpu"), "cpuacct": (1, "/sys/fs/cgroup/cpuacct"),
                                  "memory": (1, "/sys/fs/cgroup/memory"), "pids": (1, "/sys/fs/cgroup/pids")}
    assert VmCgroup("vm1", layout).paths == [Path(f"/sys/fs/cgroup/{c}/popek/vm1")
                                             for c in ("cpu", "cpuacct", "memory", "pids")]


def test_pure_v1_with_comounted_cpu_cpuacct_shares_one_directory():
    layout = layout_from(parse_mountinfo(PURE_V1), "")
    assert layout.v2_mount is None
    assert layout.hierarchies["cpu"] == layout.hierarchies["cpuacct"] == (1, "/sys/fs/cgroup/cpu,cpuacct")
    assert VmCgroup("vm1", layout).paths == [Path("/sys/fs/cgroup/cpu,cpuacct/popek/vm1"),
                                             Path("/sys/fs/cgroup/memory/popek/vm1"),
                                             Path("/sys/fs/cgroup/pids/popek/vm1")]


def test_a_controller_listed_by_the_unified_mount_is_taken_from_v2_and_the_rest_from_v1():
    layout = layout_from(parse_mountinfo(HYBRID.replace("39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup "
                                                        "cgroup rw,pids\n", "")), "pids hugetlb")
    assert layout.hierarchies["pids"] == (2, "/sys/fs/cgroup/unified")
    assert layout.hierarchies["memory"] == (1, "/sys/fs/cgroup/memory")
    assert layout.directory("pids", "a") == Path("/sys/fs/cgroup/unified/popek.slice/a")


def test_missing_controller_is_an_error_naming_it():
    no_pids = PURE_V1.replace("pids", "freezer")
    with pytest.raises(CgroupError, match="'pids' is not available: no cgroup v1 mount"):
        layout_from(parse_mountinfo(no_pids), "")


def test_controller_disabled_in_the_kernel_is_reported_as_disabled():
    kernel = parse_proc_cgroups(HYBRID_PROC_CGROUPS.replace("memory	4	42	1", "memory	0	1	0"))
    with pytest.raises(CgroupError, match="'memory' is not available: it is disabled in the kernel"):
        layout_from(parse_mountinfo(HYBRID.replace("rw,memory", "rw,freezer")), "", kernel)


def test_v1_without_cpuacct_is_refused_because_cpu_time_cannot_be_read():
    text = HYBRID.replace("33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n", "")
    with pytest.raises(CgroupError, match="'cpuacct'"):
        layout_from(parse_mountinfo(text), "")


def test_read_only_cgroup_mount_is_refused():
    with pytest.raises(CgroupError, match="read-only"):
        layout_from(parse_mountinfo(PURE_V2.replace("/sys/fs/cgroup rw,", "/sys/fs/cgroup ro,")), PURE_V2_CONTROLLERS)


def test_mountinfo_octal_escapes_are_decoded_and_other_filesystems_skipped():
    mounts = parse_mountinfo("1 0 0:1 / /mnt/my\\040cg rw - cgroup2 none rw\n2 0 0:2 / /proc rw - proc proc rw\n")
    assert [(m.path, m.version) for m in mounts] == [("/mnt/my cg", 2)]


def test_detect_reads_mountinfo_and_the_unified_controllers_file(tmp_path):
    (tmp_path / "cgroup.controllers").write_text(PURE_V2_CONTROLLERS)
    mi = tmp_path / "mountinfo"
    mi.write_text(PURE_V2.replace("/sys/fs/cgroup", str(tmp_path)))
    layout = detect(str(mi), str(tmp_path / "absent"))
    assert layout.hierarchies["memory"] == (2, str(tmp_path))


def test_limits_translate_to_v2_control_files():
    layout = layout_from(parse_mountinfo(PURE_V2), PURE_V2_CONTROLLERS)
    assert limit_writes(layout, cpu_weight=250, cpu_max=0.5, memory_max=256 << 20, pids_max=64) == [
        ("cpu", "cpu.weight", "250"), ("cpu", "cpu.max", "50000 100000"),
        ("memory", "memory.max", str(256 << 20)), ("pids", "pids.max", "64")]


def test_limits_translate_to_v1_control_files_with_weight_mapped_to_shares():
    layout = layout_from(parse_mountinfo(PURE_V1), "")
    assert limit_writes(layout, cpu_weight=250, cpu_max=2, memory_max=256 << 20, pids_max=64) == [
        ("cpu", "cpu.shares", "2560"), ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "200000"),
        ("memory", "memory.limit_in_bytes", str(256 << 20)), ("pids", "pids.max", "64")]
    assert limit_writes(layout, cpu_weight=1) == [("cpu", "cpu.shares", "10")]
    assert limit_writes(layout, cpu_weight=100) == [("cpu", "cpu.shares", "1024")]
    assert limit_writes(layout) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"cpu_weight": 0}, "cpu_weight"), ({"cpu_weight": 10001}, "cpu_weight"), ({"cpu_weight": 1.5}, "cpu_weight"),
    ({"cpu_max": 0.001}, "cpu_max"), ({"cpu_max": float("nan")}, "cpu_max"), ({"cpu_max": -1}, "cpu_max"),
    ({"memory_max": 0}, "memory_max"), ({"pids_max": 0}, "pids_max"), ({"pids_max": True}, "pids_max")])
def test_out_of_range_limits_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        limit_writes(layout_from(parse_mountinfo(PURE_V2), PURE_V2_CONTROLLERS), **kwargs)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 65, "\u00e9"])
def test_invalid_vm_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid VM name"):
        VmCgroup(name, layout_from(parse_mountinfo(PURE_V2), PURE_V2_CONTROLLERS))


def test_v2_create_enables_controllers_in_root_and_slice_before_writing_limits(tmp_path, monkeypatch):
    """On a simulated cgroup2 tree (mkdir makes the control files the kernel would), v2 semantics are followed."""
    files = ("cgroup.subtree_control", "cgroup.procs", "cpu.weight", "cpu.max", "memory.max", "pids.max")
    real_mkdir = os.mkdir

    def cgroupfs_mkdir(path, mode=0o777):
        real_mkdir(path, mode)
        for f in files:
            Path(path, f).write_text("")

    (tmp_path / "cgroup.subtree_control").write_text("memory\n")  # memory already enabled at the root
    monkeypatch.setattr(os, "mkdir", cgroupfs_mkdir)
    layout = CgroupLayout(str(tmp_path), {c: (2, str(tmp_path)) for c in ("cpu", "memory", "pids")})
    cg = VmCgroup.create("vm1", cpu_weight=300, cpu_max=1.5, memory_max=1 << 30, pids_max=100, layout=layout)
    assert cg.paths == [tmp_path / "popek.slice/vm1"]
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +pids"
    assert (tmp_path / "popek.slice/cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    d = tmp_path / "popek.slice/vm1"
    assert [(d / f).read_text() for f in files[2:]] == ["300", "150000 100000", str(1 << 30), "100"]
    with pytest.raises(CgroupError, match="already exists"):
        VmCgroup.create("vm1", layout=layout)
    assert d.is_dir()


# ---- real cgroups on this host ------------------------------------------------------------------------------------

def _real_layout() -> CgroupLayout | None:
    if os.geteuid() != 0:
        return None
    try:
        return detect()
    except CgroupError:
        return None


REAL = _real_layout()
needs_cgroups = pytest.mark.skipif(REAL is None, reason="not root or no writable cgroup hierarchy for cpu/memory/pids")

CHILD = """\
import os, sys, time
sys.stdin.readline()                      # wait until the parent moved us into the cgroup
mode = sys.argv[1]
if mode == "work":
    b = bytearray(16 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    print("done", flush=True)
elif mode == "fork":
    try:
        pid = os.fork()
    except BlockingIOError:
        print("EAGAIN", flush=True)
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("forked", flush=True)
elif mode == "alloc":
    b = bytearray(96 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    print("survived", flush=True)
time.sleep(60)
"""


@pytest.fixture
def vm_name(request):
    """A unique VM name; afterwards its cgroup is force-removed, and so is the popek parent if empty."""
    name = f"popek-test-{uuid.uuid4().hex[:8]}"
    parents_before = {p for p in REAL.parents() if p.exists()}
    yield name
    VmCgroup(name, REAL).remove(force=True)
    for p in REAL.parents() - parents_before:
        assert not p.exists(), f"{p} was left behind"


@pytest.fixture
def spawn():
    """spawn(mode) -> Popen of CHILD waiting on stdin; every child is killed and reaped afterwards."""
    procs = []

    def start(mode):
        p = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def _go(proc) -> str:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _v(cg, controller) -> int:
    return cg.layout.hierarchies[controller][0]


@needs_cgroups
def test_real_cgroup_has_the_limits_in_its_control_files(vm_name):
    cg = VmCgroup.create(vm_name, cpu_weight=200, cpu_max=0.5, memory_max=64 << 20, pids_max=16, layout=REAL)
    read = lambda c, f: (cg.dirs[c] / f).read_text().strip()  # noqa: E731
    if _v(cg, "cpu") == 2:
        assert read("cpu", "cpu.weight") == "200" and read("cpu", "cpu.max") == "50000 100000"
    else:
        assert read("cpu", "cpu.shares") == "2048"
        assert (read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")) == ("50000", "100000")
    assert read("memory", "memory.max" if _v(cg, "memory") == 2 else "memory.limit_in_bytes") == str(64 << 20)
    assert read("pids", "pids.max") == "16"
    assert all(p.is_dir() and p.name == vm_name for p in cg.paths)


@needs_cgroups
def test_real_cgroup_accounts_a_child_and_forced_remove_kills_it_and_deletes_the_directories(vm_name, spawn):
    cg = VmCgroup.create(vm_name, cpu_weight=100, pids_max=16, layout=REAL)
    child = spawn("work")
    cg.add_pid(child.pid)
    assert _go(child) == "done"
    assert cg.pids() == {child.pid}
    assert f"/{vm_name}" in Path(f"/proc/{child.pid}/cgroup").read_text()
    use = cg.usage()
    assert use["cpu_seconds"] >= 0.25 and use["pids"] == 1 and use["memory_bytes"] >= 8 << 20
    with pytest.raises(CgroupError, match=r"still has processes \[%d\]" % child.pid):
        cg.remove()
    assert all(p.is_dir() for p in cg.paths)
    cg.remove(force=True)
    assert child.wait(5) == -9
    assert not any(p.exists() for p in cg.paths)
    cg.remove()  # idempotent


@needs_cgroups
def test_real_pids_max_makes_fork_fail_inside_the_cgroup(vm_name, spawn):
    cg = VmCgroup.create(vm_name, pids_max=1, layout=REAL)
    child = spawn("fork")
    cg.add_pid(child.pid)
    assert _go(child) == "EAGAIN"


@needs_cgroups
def test_real_memory_max_gets_a_child_over_the_limit_killed(vm_name, spawn):
    cg = VmCgroup.create(vm_name, memory_max=32 << 20, layout=REAL)
    child = spawn("alloc")
    cg.add_pid(child.pid)
    assert _go(child) == ""  # killed before printing "survived"
    assert child.wait(10) == -9


@needs_cgroups
def test_real_second_create_of_a_name_is_refused_and_leaves_the_first_intact(vm_name):
    first = VmCgroup.create(vm_name, pids_max=8, layout=REAL)
    with pytest.raises(CgroupError, match="already exists"):
        VmCgroup.create(vm_name, pids_max=9, layout=REAL)
    assert (first.dirs["pids"] / "pids.max").read_text().strip() == "8"


@needs_cgroups
def test_real_context_manager_removes_the_cgroup_and_its_processes(vm_name, spawn):
    child = spawn("sleep")
    with VmCgroup.create(vm_name, layout=REAL) as cg:
        cg.add_pid(child.pid)
        paths = cg.paths
    assert child.wait(5) == -9
    assert not any(p.exists() for p in paths)


@needs_cgroups
def test_real_add_pid_of_a_missing_process_is_a_clear_error(vm_name):
    cg = VmCgroup.create(vm_name, layout=REAL)
    with pytest.raises(CgroupError, match="cgroup.procs failed: No such process"):
        cg.add_pid(2 ** 22 + 1)


@needs_cgroups
def test_real_remove_refuses_when_the_calling_process_is_inside(vm_name, spawn, monkeypatch):
    cg = VmCgroup.create(vm_name, layout=REAL)
    child = spawn("sleep")
    cg.add_pid(child.pid)
    monkeypatch.setattr(os, "getpid", lambda: child.pid)  # stand in for "this process"
    with pytest.raises(CgroupError, match="this process"):
        cg.remove(force=True)
    monkeypatch.undo()
    assert child.poll() is None


@needs_cgroups
def test_real_cleanup_stale_removes_dead_vms_only(request):
    dead, live = (f"popek-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    parents_before = {p for p in REAL.parents() if p.exists()}
    request.addfinalizer(lambda: [VmCgroup(n, REAL).remove(force=True) for n in (dead, live)])
    VmCgroup.create(dead, layout=REAL)
    keep = VmCgroup.create(live, layout=REAL)
    removed = cleanup_stale(lambda name: name != dead, layout=REAL)
    assert dead in removed and live not in removed
    assert not any(p.exists() for p in VmCgroup(dead, REAL).paths)
    assert all(p.is_dir() for p in keep.paths)
    keep.remove()
    assert not any(p.exists() for p in REAL.parents() - parents_before)

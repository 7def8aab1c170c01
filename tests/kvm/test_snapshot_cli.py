"""`popek snapshot restore|clone|merge` on bad snapshots (truncated or corrupt state file, another format version,
another CPU, a missing, short or foreign memory file, a Diff without its base): one `popek: error:` line, exit
status 2, and nothing started (no VMM process, runtime directory or cgroup). The snapshot is of the counting test
guest; the CLI runs as a subprocess, several at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popek import persist
from popek.snapshot import read_state, write_state
from test_persist import _attach, _tiny_vm  # the counting guest in a Vm without a kernel

pytestmark = pytest.mark.kvm

POPEK = [sys.executable, "-c", "from popek.cli import main; main()"]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, guest_image):
    """A Full snapshot ``full`` and a Diff ``diff`` on it, of the counting guest."""
    root = tmp_path_factory.mktemp("snaps")
    vm = _tiny_vm(guest_image("counter"), track_dirty_pages=True)
    out = _attach(vm)
    vm.start()
    assert out.wait(3, 10)
    persist.snapshot(vm, root / "full")
    assert out.wait(len(out.values) + 2, 10)
    persist.snapshot(vm, root / "diff", diff=True)
    persist.snapshot(vm, root / "other")
    vm.stop()
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _damage(kind: str, snaps: Path, d: Path) -> tuple[list[str], str]:
    """Make a damaged copy of a snapshot in ``d``; returns (popek arguments, what the error line must say)."""
    if kind == "diff without base":
        d = _copy(snaps / "diff", d)
        base = read_state(d / "state")
        base.config.extra[persist.BASE_MEMORY] = str(d / "gone" / "memory")
        write_state(d / "state", base)
        return ["snapshot", "clone", str(d), "--count", "2", "--name-prefix", "t"], "No such file"
    d = _copy(snaps / "full", d)
    state, memory = d / "state", d / "memory"
    if kind == "truncated state":
        os.truncate(state, state.stat().st_size - 10)
        want = "truncated"
    elif kind == "flipped byte":
        _flip(state, state.stat().st_size // 2)
        want = "CRC-32 mismatch"
    elif kind == "format version":
        data = bytearray(state.read_bytes())
        data[8:12] = (7).to_bytes(4, "little")
        state.write_bytes(bytes(data))
        want = "format version 7"
    elif kind == "other cpu":
        snap = read_state(state)
        snap.cpu["vendor"], snap.cpu["features"]["0x1.0.ecx"] = "OtherVendor!", 0xFFFFFFFF
        write_state(state, snap)
        want = "another kind of CPU"
    elif kind == "missing memory":
        memory.unlink()
        want = "memory: No such file"
    elif kind == "short memory":
        os.truncate(memory, memory.stat().st_size - 4096 * 3)
        want = "truncated"
    elif kind == "memory of another snapshot":
        shutil.copy(snaps / "other" / "memory", memory)
        want = "different snapshots"
    else:
        raise AssertionError(kind)
    return ["snapshot", "restore", str(d), "--name", "t"], want


KINDS = ["truncated state", "flipped byte", "format version", "other cpu", "missing memory", "short memory",
         "memory of another snapshot", "diff without base"]


def test_bad_snapshots_are_refused_with_one_error_line_exit_2_and_nothing_started(snapshots, tmp_path):
    from popek.cgroups import CgroupError, VmCgroup, detect

    runs = {}
    for i, kind in enumerate(KINDS):
        args, want = _damage(kind, snapshots, tmp_path / f"s{i}")
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))
        runs[kind] = (subprocess.Popen([*POPEK, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True), want, run_dir)
    try:
        layout = detect()
    except CgroupError:
        layout = None
    for kind, (p, want, run_dir) in runs.items():
        out, err = p.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (kind, err)
        assert len(lines) == 1 and lines[0].startswith("popek: error: cannot restore ") and want in lines[0], \
            (kind, err)
        assert out == ""
        assert not (run_dir / "popek").exists() or not any((run_dir / "popek").iterdir()), kind  # no runtime dir
        if layout is not None:
            for name in ("t", "t-1", "t-2"):
                assert not any(path.exists() for path in VmCgroup(name, layout).paths), (kind, name)
        leftover = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert leftover == [], (kind, leftover)


def test_merge_refuses_a_full_snapshot_and_merges_a_diff_so_it_restores_alone(snapshots, tmp_path):
    d = _copy(snapshots / "diff", tmp_path / "diff")
    p = subprocess.run([*POPEK, "snapshot", "merge", str(_copy(snapshots / "full", tmp_path / "full"))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("popek: error:") and "already a Full" in p.stderr
    p = subprocess.run([*POPEK, "snapshot", "merge", str(d), "--base", str(snapshots / "full")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == str(d), p.stderr
    snap, _, base = persist.check_snapshot(d / "state", d / "memory", None)
    assert base is None  # now a Full memory file
    vm = persist.restore(d)
    try:
        out = _attach(vm)
        vm.start()
        assert out.wait(2, 10) and out.values[0] != 0xFFFFFFFF
    finally:
        vm.stop()


def test_api_snapshot_load_of_a_corrupt_snapshot_answers_400_and_leaves_the_vmm_fresh(snapshots, tmp_path):
    from popek.api.controller import Controller
    from popek.api.handle import VmHandle
    from popek.api.model import ApiError, SnapshotLoadParams

    d = _copy(snapshots / "full", tmp_path / "bad")
    _flip(d / "state", 100)
    c = Controller(VmHandle)
    params = SnapshotLoadParams(snapshot_path=str(d / "state"), mem_file_path=str(d / "memory"), resume_vm=True)
    with pytest.raises(ApiError) as e:
        c.snapshot_load(params)
    assert e.value.status == 400 and "CRC-32 mismatch" in e.value.message
    assert c.vm is None and c.state == "Not started"
    good = SnapshotLoadParams(snapshot_path=str(snapshots / "full" / "state"),
                              mem_file_path=str(snapshots / "full" / "memory"), resume_vm=True)
    c.snapshot_load(good)  # the refused load left the VMM able to take a good one
    try:
        assert c.state == "Running"
    finally:
        c.shutdown()


def test_clone_starts_n_vmm_processes_mapping_one_memory_file_and_refuses_taken_names(snapshots):
    import json
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="pk-"))  # short: the VMs' socket paths must fit sun_path
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))
    names = [f"pk-{i}" for i in (1, 2, 3)]

    def popek(*args):
        return subprocess.run([*POPEK, *args], env=env, capture_output=True, text=True, timeout=120)

    try:
        p = popek("snapshot", "clone", str(snapshots / "full"), "--count", "3", "--name-prefix", "pk")
        assert p.returncode == 0 and p.stdout.split() == names, p.stderr
        rows = {r["name"]: r for r in json.loads(popek("ps", "--json").stdout)}
        assert sorted(rows) == names and all(rows[n]["state"] == "running" for n in names), rows
        pids = {rows[n]["pid"] for n in names}
        assert len(pids) == 3 and os.getpid() not in pids
        memory = str(snapshots / "full" / "memory")
        for pid in pids:  # guest RAM is the snapshot's file mapped (privately: its pages are shared until written)
            assert memory in Path(f"/proc/{pid}/maps").read_text()
        again = popek("snapshot", "clone", str(snapshots / "full"), "--count", "1", "--name-prefix", "pk")
        assert again.returncode == 2 and "'pk-1' is in use" in again.stderr, again.stderr
        assert {r["name"] for r in json.loads(popek("ps", "--json").stdout)} == set(names)  # the first ones stay
    finally:
        for n in names:
            popek("kill", n)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_clone_whose_vmms_cannot_load_the_snapshot_stops_them_all_and_leaves_nothing(snapshots, tmp_path):
    import tempfile

    from popek.cgroups import CgroupError, VmCgroup, detect

    d = _copy(snapshots / "full", tmp_path / "nodrive")
    snap = read_state(d / "state")  # a valid state file whose VM had a disk that is gone now
    snap.config.extra["drives"] = [{"path": str(tmp_path / "gone.img"), "readonly": False, "serial": None}]
    write_state(d / "state", snap)
    run_dir = Path(tempfile.mkdtemp(prefix="pk-"))
    try:
        p = subprocess.run([*POPEK, "snapshot", "clone", str(d), "--count", "2", "--name-prefix", "pkf"],
                           env=dict(os.environ, XDG_RUNTIME_DIR=str(run_dir)), capture_output=True, text=True,
                           timeout=120, start_new_session=True)
        assert p.returncode == 1 and p.stderr.startswith("popek: error: cannot restore ") and "gone.img" in p.stderr
        assert "(and the 1 others)" in p.stderr, p.stderr
        assert not any((run_dir / "popek").iterdir())  # no runtime directory left
        try:
            layout = detect()
        except CgroupError:
            layout = None
        for name in ("pkf-1", "pkf-2"):
            assert layout is None or not any(path.exists() for path in VmCgroup(name, layout).paths)
        # the VMMs were forked from the CLI, so they would show its command line
        assert subprocess.run(["pgrep", "-f", str(d)], capture_output=True).stdout == b""
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

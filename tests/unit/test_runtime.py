"""Per-VM runtime directories: vm.json contents, live/stale detection by pid + start time, reclaiming, atomic writes."""

import json
import os
import shutil
import subprocess
import time

import pytest

from popek import runtime
from popek.runtime import RuntimeDir, RuntimeDirError, default_base, pid_start_time, process_alive


@pytest.fixture
def base(tmp_path):
    return tmp_path / "popek"


@pytest.fixture
def child():
    """A running `sleep` child; killed and reaped afterwards."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_create_writes_vm_json_naming_owner_pid_start_time_config_and_paths(base):
    rd = RuntimeDir.create("vm1", {"memory": 256 << 20, "vcpus": 1}, base=base)
    data = json.loads(rd.vm_json.read_text())
    assert data["name"] == "vm1" and data["pid"] == os.getpid() and data["state"] == "starting"
    assert data["pid_start_time"] == pid_start_time(os.getpid())
    assert data["config"] == {"memory": 256 << 20, "vcpus": 1}
    assert abs(data["created"] - time.time()) < 60
    assert (data["api_socket"], data["console_log"]) == (str(base / "vm1/api.sock"), str(base / "vm1/console.log"))
    assert oct(base.stat().st_mode & 0o777) == "0o700" and oct(rd.path.stat().st_mode & 0o777) == "0o700"


def test_list_reports_a_live_vm_as_alive(base, child):
    RuntimeDir.create("a", {}, base=base)
    RuntimeDir.create("b", {}, pid=child.pid, base=base)
    entries = RuntimeDir.list(base)
    assert [(e.name, e.pid, e.alive, e.problem) for e in entries] == [("a", os.getpid(), True, None),
                                                                       ("b", child.pid, True, None)]


def test_entry_of_a_dead_pid_is_stale_and_cleanup_removes_only_it(base, child):
    RuntimeDir.create("live", {}, base=base)
    RuntimeDir.create("dead", {}, pid=child.pid, base=base)
    child.kill()
    child.wait()
    assert {e.name: e.alive for e in RuntimeDir.list(base)} == {"dead": False, "live": True}
    assert RuntimeDir.cleanup_stale(base) == ["dead"]
    assert [e.name for e in RuntimeDir.list(base)] == ["live"]


def test_entry_whose_pid_was_recycled_is_not_alive(base):
    rd = RuntimeDir.create("vm", {}, base=base)
    data = json.loads(rd.vm_json.read_text())
    data["pid_start_time"] -= 1  # same pid, but it started at another time: another process now has this pid
    rd.vm_json.write_text(json.dumps(data))
    [entry] = RuntimeDir.list(base)
    assert entry.pid == os.getpid() and not entry.alive
    RuntimeDir.create("vm", {"new": True}, base=base)  # reclaimable
    assert RuntimeDir("vm", base).read().config == {"new": True}


def test_a_name_held_by_a_live_vm_is_refused(base, child):
    RuntimeDir.create("vm", {"first": True}, pid=child.pid, base=base)
    with pytest.raises(RuntimeDirError, match=rf"'vm' is in use by running process {child.pid}"):
        RuntimeDir.create("vm", {}, base=base)
    assert RuntimeDir("vm", base).read().config == {"first": True}


def test_a_stale_name_is_reclaimed_and_its_old_files_dropped(base, child):
    old = RuntimeDir.create("vm", {}, pid=child.pid, base=base)
    old.console_log.write_text("old output")
    child.kill()
    child.wait()
    new = RuntimeDir.create("vm", {}, base=base)
    assert new.read().pid == os.getpid() and new.read().alive
    assert not new.console_log.exists()


def test_create_for_a_pid_that_does_not_exist_is_refused(base):
    pid = _dead_pid()
    with pytest.raises(RuntimeDirError, match=f"no process with pid {pid}"):
        RuntimeDir.create("vm", {}, pid=pid, base=base)


def test_config_that_is_not_json_is_refused_before_anything_is_written(base):
    with pytest.raises(TypeError):
        RuntimeDir.create("vm", {"x": object()}, base=base)
    assert RuntimeDir.list(base) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "x" * 65, "vm\n", "\u00e9"])
def test_invalid_names_are_refused(base, name):
    with pytest.raises(ValueError, match="invalid VM name"):
        RuntimeDir.create(name, {}, base=base)


def test_longest_valid_name_is_accepted(base):
    assert RuntimeDir.create("a-Z_0." + "x" * 58, {}, base=base).read().alive


def _crash_at_rename(fn):
    """Run fn() in a forked child whose os.replace ends the process (as a crash would); return its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os.replace = lambda *a: os._exit(7)
            fn()
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_crash_between_temp_write_and_rename_leaves_the_previous_vm_json_whole(base):
    rd = RuntimeDir.create("vm", {"k": 1}, base=base)
    assert _crash_at_rename(lambda: rd.set_state("running")) == 7
    assert [p.name for p in rd.path.iterdir() if p.name.startswith(".vm.json.tmp")]  # the crash left its temp file
    [entry] = RuntimeDir.list(base)
    assert (entry.state, entry.config, entry.alive, entry.problem) == ("starting", {"k": 1}, True, None)
    rd.set_state("running")
    assert rd.read().state == "running"


def test_crash_during_first_create_leaves_an_incomplete_entry_that_is_stale(base):
    assert _crash_at_rename(lambda: RuntimeDir.create("vm", {}, base=base)) == 7
    [entry] = RuntimeDir.list(base)
    assert not entry.alive and entry.pid is None and "no vm.json" in entry.problem
    assert RuntimeDir.create("vm", {}, base=base).read().alive


def test_corrupt_vm_json_is_reported_stale_not_trusted(base):
    rd = RuntimeDir.create("vm", {}, base=base)
    rd.vm_json.write_text('{"pid": ' + str(os.getpid()))
    [entry] = RuntimeDir.list(base)
    assert not entry.alive and "unreadable vm.json" in entry.problem
    assert RuntimeDir.cleanup_stale(base) == ["vm"]


def test_remove_deletes_the_directory_and_is_idempotent(base):
    rd = RuntimeDir.create("vm", {}, base=base)
    rd.api_socket.write_text("")
    rd.remove()
    assert not rd.path.exists() and RuntimeDir.list(base) == []
    rd.remove()


def test_base_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeDirError, match="not a directory owned by"):
        RuntimeDir.create("vm", {}, base=tmp_path / "link")


def test_default_base_follows_xdg_runtime_dir_then_root_then_uid(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert str(default_base()) == "/run/user/1000/popek"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert str(default_base()) == "/run/popek"
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    assert str(default_base()) == "/tmp/popek-1234"


def test_pid_start_time_counts_fields_after_a_command_name_with_spaces_and_parens(tmp_path):
    exe = tmp_path / "a) b (c"
    shutil.copy(shutil.which("sleep"), exe)
    before = float(open("/proc/uptime").read().split()[0])
    p = subprocess.Popen([str(exe), "60"])
    try:
        assert ") b (" in open(f"/proc/{p.pid}/stat").read()
        start = pid_start_time(p.pid) / os.sysconf("SC_CLK_TCK")  # seconds after boot
        assert before - 1 <= start <= float(open("/proc/uptime").read().split()[0]) + 1
        assert process_alive(p.pid, pid_start_time(p.pid))
    finally:
        p.kill()
        p.wait()
    assert pid_start_time(p.pid) is None and not process_alive(p.pid, 0)


def test_a_zombie_is_not_alive(child):
    start = pid_start_time(child.pid)
    child.kill()
    deadline = time.monotonic() + 5
    while runtime._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pid_start_time(child.pid) == start and not process_alive(child.pid, start)

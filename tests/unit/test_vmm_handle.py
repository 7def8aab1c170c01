"""The API's VM handle over a fake VM class (spec translation, state mapping), and the VMM's pieces that need no KVM:
spec parsing, the console tee (log + socket clients), host-memory and CPU readings for `popek ps`."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner

from popek.api.client import ApiClient
from popek.api.controller import Controller
from popek.api.handle import VmHandle, vm_arguments
from popek.api.model import (ApiError, BootSource, Drive, InstanceActionInfo, MachineConfiguration,
                             NetworkInterface, Vm, VmSpec, Vsock)
from popek.cli import main as cli_main
from popek.cli_vms import host_memory, process_cpu_seconds
from popek.runtime import RuntimeDir
from popek.vm import VmResult, VmState
from popek.vmm import ConsoleHub, serve, spec_from_json


class FakeVM:
    """Stands in for popek.runner.VM: records its arguments and calls, follows VmState like the real one."""

    instances = []

    def __init__(self, command=None, *, kernel=None, initrd=None, memory="256M", cpus=1, append="", on_output=None,
                 **devices):
        self.kwargs = dict(command=command, kernel=kernel, initrd=initrd, memory=memory, cpus=cpus, append=append,
                           **devices)
        self.on_output = on_output
        self.state = VmState.CREATED
        self.calls = []
        self.ended = None  # a VmResult once the "guest" ends by itself
        self.closed = 0
        FakeVM.instances.append(self)

    def start(self):
        self.calls.append("start")
        self.state = VmState.RUNNING

    def pause(self):
        self.calls.append("pause")
        self.state = VmState.PAUSED

    def resume(self):
        self.calls.append("resume")
        self.state = VmState.RUNNING

    def wait(self, timeout=None):
        if self.ended is None:
            return None
        self.state = VmState.STOPPED
        return self.ended

    def stop(self):
        self.calls.append("stop")
        self.state = VmState.STOPPED
        self.close()
        return self.ended or VmResult("stopped", None, "stopped by the VMM")

    def close(self):
        self.closed += 1

    def send_input(self, data):
        self.calls.append(("input", data))


@pytest.fixture
def files(tmp_path):
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return kernel, initrd


def spec_of(kernel, initrd=None, boot_args=None, vcpus=2, mib=192):
    return VmSpec(boot_source=BootSource(kernel_image_path=str(kernel), initrd_path=initrd and str(initrd),
                                         boot_args=boot_args),
                  machine_config=MachineConfiguration(vcpu_count=vcpus, mem_size_mib=mib))


def handle(spec, **kw):
    return VmHandle(spec, vm_class=FakeVM, **kw)


# ---- spec translation ---------------------------------------------------------------------------------------------

def test_spec_becomes_vm_arguments_kernel_initrd_boot_args_as_append_cpus_and_memory_in_bytes(files):
    kernel, initrd = files
    h = handle(spec_of(kernel, initrd, boot_args="popek.cmd=dHJ1ZQ== loglevel=7", vcpus=2, mib=192))
    assert h.vm.kwargs == dict(command=None, kernel=str(kernel), initrd=str(initrd), memory=192 << 20, cpus=2,
                               append="popek.cmd=dHJ1ZQ== loglevel=7", track_dirty_pages=False, drives=[], nets=[],
                               vsock=None, balloon=None)


def test_relative_kernel_path_named_like_an_image_kind_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "microvm").write_bytes(b"k")
    args = vm_arguments(spec_of("microvm"))
    assert args["kernel"] == str(tmp_path / "microvm") and args["initrd"] is None


def test_spec_without_boot_args_appends_nothing(files):
    assert vm_arguments(spec_of(files[0]))["append"] == ""


def test_spec_without_boot_source_is_refused():
    with pytest.raises(ValueError, match="no boot source"):
        vm_arguments(VmSpec())


def test_drives_become_drive_configs_root_first_with_drive_id_as_serial_and_root_on_the_cmdline(files, tmp_path):
    spec = spec_of(files[0], boot_args="quiet")
    spec.set_drive(Drive(drive_id="data", path_on_host=str(tmp_path / "d.img"), is_root_device=False,
                         is_read_only=False))
    spec.set_drive(Drive(drive_id="root", path_on_host=str(files[1]), is_root_device=True, is_read_only=True))
    args = vm_arguments(spec)
    assert [(str(d.path), d.readonly, d.serial) for d in args["drives"]] == [
        (str(files[1]), True, "root"), (str(tmp_path / "d.img"), False, "data")]
    assert args["append"] == "root=/dev/vda ro quiet"
    spec.set_drive(Drive(drive_id="root", path_on_host=str(files[1]), is_root_device=True, is_read_only=False,
                         partuuid="0eaa91a0-01"))
    assert vm_arguments(spec)["append"] == "root=PARTUUID=0eaa91a0-01 rw quiet"


def test_network_interfaces_become_net_configs_with_their_tap_mac_and_addresses(files):
    from popek.net.iface import NetConfig

    spec = spec_of(files[0])
    spec.set_network_interface(NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="52:54:00:00:00:07",
                                                host_address="10.7.0.1/24", guest_address="10.7.0.9"))
    spec.set_network_interface(NetworkInterface(iface_id="eth1", host_dev_name="popek%d"))
    assert vm_arguments(spec)["nets"] == [NetConfig("tap0", "10.7.0.1/24", "10.7.0.9", "52:54:00:00:00:07"),
                                          NetConfig("popek%d")]


def test_vsock_becomes_a_vsock_config_with_its_cid_and_socket_path(files, tmp_path):
    from popek.vm import VsockConfig

    spec = spec_of(files[0])
    assert vm_arguments(spec)["vsock"] is None
    spec.vsock = Vsock(guest_cid=7, uds_path=str(tmp_path / "v.sock"))
    assert vm_arguments(spec)["vsock"] == VsockConfig(7, tmp_path / "v.sock")


def test_console_output_callback_reaches_the_vm(files):
    out = []
    h = handle(spec_of(files[0]), on_output=out.append)
    h.vm.on_output(b"hello")
    assert out == [b"hello"]


# ---- states ---------------------------------------------------------------------------------------------------------

def test_states_map_to_firecracker_names_and_each_change_is_reported_lowercase(files):
    seen = []
    h = handle(spec_of(files[0]), on_state=seen.append)
    assert h.state == "Not started"
    h.start()
    assert h.state == "Running"
    h.pause()
    assert h.state == "Paused"
    h.resume()
    assert h.state == "Running"
    h.stop()
    assert h.state == "Stopped"
    assert seen == ["running", "paused", "running", "stopped"]
    assert h.result.reason == "stopped"


def test_guest_that_ends_by_itself_reads_stopped_with_its_result(files):
    seen = []
    h = handle(spec_of(files[0]), on_state=seen.append)
    h.start()
    assert h.wait(0) is None
    h.vm.ended = VmResult("exit", 3)
    assert h.state == "Stopped"
    assert h.wait(0) == VmResult("exit", 3) and h.result == VmResult("exit", 3)
    assert seen == ["running", "stopped"]


def test_wait_with_timeout_returns_none_after_about_that_long_while_running(files):
    h = handle(spec_of(files[0]))
    h.start()
    t = time.monotonic()
    assert h.wait(0.2) is None
    assert 0.15 < time.monotonic() - t < 2


def test_wait_returns_once_the_guest_ends_on_another_thread(files):
    h = handle(spec_of(files[0]))
    h.start()
    threading.Timer(0.1, lambda: setattr(h.vm, "ended", VmResult("panic", None, "oops"))).start()
    assert h.wait(5).reason == "panic"


def test_stop_after_the_guest_ended_only_releases_the_vm(files):
    h = handle(spec_of(files[0]))
    h.start()
    h.vm.ended = VmResult("exit", 0)
    h.wait(0)
    h.stop()
    h.stop()
    assert "stop" not in h.vm.calls and h.vm.closed == 2 and h.result == VmResult("exit", 0)


def test_stop_before_start_releases_the_vm_without_starting_it(files):
    h = handle(spec_of(files[0]))
    h.stop()
    assert h.vm.calls == [] and h.vm.closed == 1


def test_ctrl_alt_del_and_unknown_snapshot_types_are_refused_saying_why(files):
    h = handle(spec_of(files[0]))
    with pytest.raises(NotImplementedError, match="keyboard"):
        h.send_ctrl_alt_del()
    with pytest.raises(ValueError, match="neither Full nor Diff"):
        h.snapshot_create(snapshot_type="Incremental", snapshot_path="s", mem_file_path="m")


def test_controller_drives_the_handle_start_pause_and_refuses_ctrl_alt_del_with_400(files):
    c = Controller(lambda spec: handle(spec))
    c.put_boot_source(BootSource(kernel_image_path=str(files[0])))
    c.start()
    assert c.state == "Running" and c.vm.vm.kwargs["memory"] == 128 << 20  # Firecracker's default machine config
    c.patch_vm(Vm(state="Paused"))
    assert c.state == "Paused"
    with pytest.raises(ApiError, match="SendCtrlAltDel.*keyboard") as e:
        c.action(InstanceActionInfo(action_type="SendCtrlAltDel"))
    assert e.value.status == 400
    c.shutdown()
    assert c.state == "Stopped"


# ---- VMM pieces ----------------------------------------------------------------------------------------------------

def test_spec_from_json_reads_a_full_vm_configuration(files):
    spec = spec_of(files[0], files[1], boot_args="quiet", vcpus=2, mib=64)
    assert spec_from_json(spec.to_json()).to_json() == spec.to_json()
    assert spec_from_json({}).boot_source is None


@pytest.mark.parametrize("doc, fragment", [
    ({"boot": {}}, "unknown keys \\['boot'\\]"),
    ({"machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}, "vcpu_count: 0 is out of range"),
    ({"boot-source": {"kernel_image_path": ""}}, "non-empty"),
    ([], "JSON object"),
])
def test_spec_from_json_refuses_bad_parts_naming_them(doc, fragment):
    with pytest.raises(ApiError, match=fragment):
        spec_from_json(doc)


@pytest.fixture
def hub(tmp_path):
    got = []
    h = ConsoleHub(tmp_path / "console.log", tmp_path / "console.sock", on_input=got.append)
    h.got = got
    yield h
    h.close()


def _client(hub):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(hub.socket_path))
    return c


def _recv_until(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.01)


def test_console_hub_appends_output_to_the_log_and_sends_it_to_every_client(hub, tmp_path):
    a, b = _client(hub), _client(hub)
    _wait_for(lambda: len(hub._clients) == 2)
    hub.output(b"Linux version")
    hub.output(b" 6.1\r\n")
    assert _recv_until(a, 15) == b"Linux version 6.1\r\n" and _recv_until(b, 15) == b"Linux version 6.1\r\n"
    assert (tmp_path / "console.log").read_bytes() == b"Linux version 6.1\r\n"
    assert oct(os.stat(hub.socket_path).st_mode & 0o777) == "0o600"


def test_console_hub_passes_client_bytes_to_the_guest_input(hub):
    c = _client(hub)
    c.sendall(b"uname -a\r")
    _wait_for(lambda: b"".join(hub.got) == b"uname -a\r")


def test_console_hub_forgets_a_client_that_disconnected_and_keeps_serving_others(hub):
    a, b = _client(hub), _client(hub)
    _wait_for(lambda: len(hub._clients) == 2)
    a.close()
    _wait_for(lambda: len(hub._clients) == 1)
    hub.output(b"still here")
    assert _recv_until(b, 10) == b"still here"


def test_console_hub_drops_a_client_that_falls_too_far_behind(hub, monkeypatch):
    monkeypatch.setattr("popek.vmm.MAX_CLIENT_BACKLOG", 1 << 16)
    slow = _client(hub)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _wait_for(lambda: len(hub._clients) == 1)
    for _ in range(200):  # 6.4 MB the client never reads
        hub.output(b"x" * 32768)
    _wait_for(lambda: not hub._clients)


def test_console_hub_close_flushes_disconnects_clients_and_removes_the_socket(hub, tmp_path):
    c = _client(hub)
    _wait_for(lambda: len(hub._clients) == 1)
    hub.output(b"reboot: Restarting system\r\n")
    hub.close()
    assert _recv_until(c, 1 << 20) == b"reboot: Restarting system\r\n"  # then EOF
    assert not hub.socket_path.exists() and (tmp_path / "console.log").exists()


def test_host_memory_of_this_process_has_uss_at_most_rss_and_grows_with_touched_memory():
    uss0, rss0 = host_memory(os.getpid())
    block = bytearray(64 << 20)  # zero-filled: every page written
    uss1, rss1 = host_memory(os.getpid())
    assert 0 < uss0 <= rss0 and uss1 - uss0 > 48 << 20 and uss1 <= rss1
    del block


def test_host_memory_and_cpu_of_a_missing_process_are_none():
    assert host_memory(0x7FFFFFFF) is None and process_cpu_seconds(0x7FFFFFFF) is None


def test_process_cpu_seconds_counts_this_process_busy_time():
    before = process_cpu_seconds(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    assert process_cpu_seconds(os.getpid()) - before >= 0.2


# ---- the VMM main loop with a fake VM (no KVM) ---------------------------------------------------------------------

@pytest.fixture
def signals_restored():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _fake_factory(spec, **kw):
    return VmHandle(spec, vm_class=FakeVM, **kw)


def _later(delay, fn):
    """Run fn on a timer thread; if it fails, SIGTERM this process so serve() returns instead of hanging."""
    def run():
        try:
            fn()
        except BaseException:
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    t = threading.Timer(delay, run)
    t.start()
    return t


def test_serve_runs_the_vm_of_the_spec_records_states_and_result_and_removes_its_sockets(tmp_path, files,
                                                                                        signals_restored):
    rd = RuntimeDir("vm1", tmp_path / "popek")
    seen = {}

    def probe():
        with ApiClient(rd.api_socket, timeout=5) as c:
            seen["info"] = c.get("/")[1]["state"]
            seen["json"] = rd.read().state
            seen["pause"] = c.patch("/vm", {"state": "Paused"})[0]
            seen["paused_json"] = rd.read().state
            c.patch("/vm", {"state": "Resumed"})
        FakeVM.instances[-1].on_output(b"guest says hi\r\n")
        FakeVM.instances[-1].ended = VmResult("exit", 7)

    timer = _later(0.3, probe)
    assert serve("vm1", spec_of(files[0]), rd, vm_factory=_fake_factory) == 0
    timer.join()
    assert seen == {"info": "Running", "json": "running", "pause": 204, "paused_json": "paused"}
    entry = rd.read()
    assert entry.pid == os.getpid() and entry.state == "stopped"
    result = json.loads((rd.path / "result.json").read_text())
    assert (result["reason"], result["exit_status"]) == ("exit", 7) and abs(result["ended"] - time.time()) < 60
    assert rd.console_log.read_bytes() == b"guest says hi\r\n"
    assert not rd.api_socket.exists() and not (rd.path / "console.sock").exists()


def test_serve_stops_the_vm_cleanly_on_sigterm(tmp_path, files, signals_restored):
    rd = RuntimeDir("vm2", tmp_path / "popek")
    _later(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert serve("vm2", spec_of(files[0]), rd, vm_factory=_fake_factory) == 0
    assert FakeVM.instances[-1].calls == ["start", "stop"] and FakeVM.instances[-1].closed == 1
    assert json.loads((rd.path / "result.json").read_text())["reason"] == "stopped"
    assert rd.read().state == "stopped"


def test_serve_with_a_spec_it_cannot_start_exits_1_with_the_reason_in_result_json(tmp_path, signals_restored):
    rd = RuntimeDir("vm3", tmp_path / "popek")
    spec = spec_of(tmp_path / "no-such-kernel")
    assert serve("vm3", spec, rd, vm_factory=_fake_factory) == 1
    result = json.loads((rd.path / "result.json").read_text())
    assert result["reason"] == "error" and "no-such-kernel" in result["detail"] and rd.read().state == "stopped"


def test_serve_without_a_boot_source_waits_in_state_created_for_instance_start(tmp_path, files, signals_restored):
    rd = RuntimeDir("vm4", tmp_path / "popek")
    seen = []

    def configure():
        seen.append(rd.read().state)
        with ApiClient(rd.api_socket, timeout=5) as c:
            c.put("/boot-source", {"kernel_image_path": str(files[0])})
            seen.append(c.put("/actions", {"action_type": "InstanceStart"})[0])
            seen.append(c.get("/")[1]["state"])
        FakeVM.instances[-1].ended = VmResult("reset", None)

    timer = _later(0.3, configure)
    assert serve("vm4", None, rd, vm_factory=_fake_factory) == 0
    timer.join()
    assert seen == ["created", 204, "Running"]


# ---- CLI bookkeeping of ended and stale VMs (no KVM) ---------------------------------------------------------------

@pytest.fixture
def runtime_base(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "popek"


def _dead_vm(name, state, base):
    p = subprocess.Popen(["sleep", "60"])
    rd = RuntimeDir.create(name, {"vcpus": 2, "memory": 64 << 20}, pid=p.pid, state=state, base=base)
    p.kill()
    p.wait()
    return rd


def test_ps_removes_a_vm_whose_vmm_died_without_stopping_it_and_lists_an_ended_one(runtime_base):
    _dead_vm("crashed", "running", runtime_base)
    ended = _dead_vm("ended", "stopped", runtime_base)
    (ended.path / "result.json").write_text(json.dumps({"reason": "panic", "exit_status": None, "ended": 0}))
    r = CliRunner().invoke(cli_main, ["ps", "--json"])
    assert r.exit_code == 0, r.output
    assert "removed stale VM 'crashed'" in r.stderr
    [row] = json.loads(r.stdout)
    assert (row["name"], row["state"], row["pid"], row["vcpus"]) == ("ended", "stopped (panic)", None, 2)
    assert sorted(p.name for p in runtime_base.iterdir()) == ["ended"]


def test_commands_on_a_stale_vm_clean_it_and_say_it_is_gone(runtime_base):
    _dead_vm("crashed", "paused", runtime_base)
    r = CliRunner().invoke(cli_main, ["logs", "crashed"])
    assert r.exit_code == 1 and "is gone" in r.stderr and not (runtime_base / "crashed").exists()


def test_rm_refuses_a_running_vm_and_removes_an_ended_one_with_its_log(runtime_base):
    live = subprocess.Popen(["sleep", "60"])
    try:
        RuntimeDir.create("live", {}, pid=live.pid, state="running", base=runtime_base)
        ended = _dead_vm("ended", "stopped", runtime_base)
        ended.console_log.write_bytes(b"bye\r\n")
        assert CliRunner().invoke(cli_main, ["logs", "ended"]).stdout_bytes == b"bye\r\n"
        r = CliRunner().invoke(cli_main, ["rm", "live"])
        assert r.exit_code == 1 and "is running" in r.stderr and (runtime_base / "live").exists()
        assert CliRunner().invoke(cli_main, ["rm", "ended"]).exit_code == 0 and not ended.path.exists()
    finally:
        live.kill()
        live.wait()


def test_start_refuses_the_name_of_an_ended_vm_until_it_is_removed(runtime_base):
    _dead_vm("ended", "stopped", runtime_base)
    r = CliRunner().invoke(cli_main, ["start", "--name", "ended", "--kernel", "/nonexistent", "--", "true"])
    assert r.exit_code == 2 and "taken by an ended VM" in r.stderr


def test_console_log_rotates_to_dot_1_at_its_limit_keeping_the_newest_output(tmp_path):
    h = ConsoleHub(tmp_path / "console.log", tmp_path / "console.sock", on_input=lambda data: None, max_log=100)
    try:
        for i in range(7):
            h.output(f"line {i:02d} ".encode() * 4)  # 32 bytes each
    finally:
        h.close()
    assert (tmp_path / "console.log.1").read_bytes() == b"".join(f"line {i:02d} ".encode() * 4 for i in (3, 4, 5))
    assert (tmp_path / "console.log").read_bytes() == b"line 06 " * 4


def test_logs_prints_the_rotated_log_before_the_current_one(runtime_base):
    ended = _dead_vm("ended", "stopped", runtime_base)
    ended.console_log.with_name("console.log.1").write_bytes(b"older\r\n")
    ended.console_log.write_bytes(b"newer\r\n")
    assert CliRunner().invoke(cli_main, ["logs", "ended"]).stdout_bytes == b"older\r\nnewer\r\n"

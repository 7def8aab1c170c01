"""The REST API on a real Unix socket server with a fake VM factory: endpoints, validation, state rules, HTTP edges."""

import json
import logging
import os
import shutil
import socket
import tempfile
import threading

import pytest

from popek.api.client import ApiClient
from popek.api.controller import Controller
from popek.api.model import ApiError, MachineConfiguration, SnapshotLoadParams
from popek.api.server import OPENAPI_FILE, ROUTES, ApiServer, ApiServerError, openapi_document


class FakeVm:
    """A VM handle that records what the controller asks of it."""

    def __init__(self, spec, *, snapshots=False, fail_start=None):
        self.spec = spec
        self.state = "Created"
        self.calls = []
        self.snapshots = snapshots
        self.fail_start = fail_start

    def start(self):
        self.calls.append("start")
        if self.fail_start:
            raise self.fail_start
        self.state = "Running"

    def pause(self):
        self.calls.append("pause")
        self.state = "Paused"

    def resume(self):
        self.calls.append("resume")
        self.state = "Running"

    def send_ctrl_alt_del(self):
        self.calls.append("ctrl_alt_del")

    def stop(self):
        self.calls.append("stop")
        self.state = "Stopped"

    def snapshot_create(self, **kw):
        if not self.snapshots:
            raise NotImplementedError("snapshots are not supported yet")
        self.calls.append(("snapshot_create", kw))

    def snapshot_load(self, **kw):
        if not self.snapshots:
            raise NotImplementedError("snapshots are not supported yet")
        self.calls.append(("snapshot_load", kw))
        self.state = "Running" if kw["resume_vm"] else "Paused"


class Factory:
    def __init__(self, **vm_kw):
        self.vms = []
        self.vm_kw = vm_kw
        self.error = None

    def __call__(self, spec):
        if self.error:
            raise self.error
        vm = FakeVm(spec, **self.vm_kw)
        self.vms.append(vm)
        return vm


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="popek-api-", dir="/tmp")  # short: sun_path holds 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def files(workdir):
    paths = {}
    for name in ("vmlinux", "initrd", "rootfs.ext4", "data.img"):
        paths[name] = os.path.join(workdir, name)
        with open(paths[name], "wb") as f:
            f.write(b"\0" * 512)
    return paths


class Api:
    def __init__(self, workdir, factory, **controller_kw):
        self.sock = os.path.join(workdir, "api.sock")
        self.factory = factory
        self.controller = Controller(factory, **controller_kw)
        self.server = ApiServer(self.sock, self.controller).start()
        self.client = ApiClient(self.sock, timeout=10)

    def __getattr__(self, name):  # get / put / patch / request
        return getattr(self.client, name)

    def error(self, status, method, path, body=None):
        """Send a request that must fail with ``status``; return its fault_message (checking the body's shape)."""
        got, answer = self.client.request(method, path, body)
        assert got == status, (got, answer)
        assert set(answer) == {"fault_message"} and isinstance(answer["fault_message"], str)
        assert "\n" not in answer["fault_message"] and "Traceback" not in answer["fault_message"]
        return answer["fault_message"]

    def close(self):
        self.client.close()
        self.server.close()


@pytest.fixture
def factory():
    return Factory()


@pytest.fixture
def api(workdir, factory):
    a = Api(workdir, factory)
    yield a
    a.close()


@pytest.fixture
def started(api, files):
    assert api.put("/boot-source", {"kernel_image_path": files["vmlinux"]}) == (204, None)
    assert api.put("/actions", {"action_type": "InstanceStart"}) == (204, None)
    return api


# --- GET / and the configuration endpoints ---------------------------------------------------------------------

def test_get_root_reports_firecracker_instance_info_not_started(api):
    status, info = api.get("/")
    assert status == 200
    assert info["state"] == "Not started" and info["id"] == "anonymous-instance" and info["app_name"] == "Popek"
    assert set(info) == {"id", "state", "vmm_version", "app_name"} and info["vmm_version"]


def test_instance_id_given_to_the_controller_is_reported(workdir, factory):
    a = Api(workdir, factory, instance_id="vm-7")
    try:
        assert a.get("/")[1]["id"] == "vm-7"
    finally:
        a.close()


def test_put_boot_source_is_204_and_appears_in_vm_config(api, files):
    body = {"kernel_image_path": files["vmlinux"], "initrd_path": files["initrd"], "boot_args": "console=ttyS0"}
    assert api.put("/boot-source", body) == (204, None)
    status, config = api.get("/vm/config")
    assert status == 200 and config["boot-source"] == body


def test_vm_config_has_firecracker_keys_and_defaults_before_any_put(api):
    status, config = api.get("/vm/config")
    assert status == 200
    assert config == {"boot-source": None, "drives": [], "network-interfaces": [], "vsock": None, "balloon": None,
                      "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                         "track_dirty_pages": False}}


def test_boot_source_naming_a_missing_kernel_is_refused(api, workdir):
    msg = api.error(400, "PUT", "/boot-source", {"kernel_image_path": os.path.join(workdir, "nope")})
    assert "kernel_image_path" in msg and "No such file" in msg


def test_boot_source_whose_kernel_is_a_directory_is_refused(api, workdir):
    assert "not a regular file" in api.error(400, "PUT", "/boot-source", {"kernel_image_path": workdir})


def test_machine_config_put_replaces_it_and_get_returns_it(api):
    assert api.get("/machine-config") == (200, {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                                "track_dirty_pages": False})
    assert api.put("/machine-config", {"vcpu_count": 4, "mem_size_mib": 512, "track_dirty_pages": True}) == (204, None)
    assert api.get("/machine-config") == (200, {"vcpu_count": 4, "mem_size_mib": 512, "smt": False,
                                                "track_dirty_pages": True})
    # PUT replaces the whole config: omitted optional fields go back to their defaults, as in Firecracker
    assert api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == (204, None)
    assert api.get("/machine-config")[1]["track_dirty_pages"] is False


def test_drive_put_is_listed_in_vm_config_with_cache_type_default(api, files):
    body = {"drive_id": "rootfs", "path_on_host": files["rootfs.ext4"], "is_root_device": True,
            "is_read_only": False, "partuuid": "0eaa91a0-01"}
    assert api.put("/drives/rootfs", body) == (204, None)
    assert api.get("/vm/config")[1]["drives"] == [{**body, "cache_type": "Unsafe"}]


def test_drive_put_again_with_same_id_updates_it(api, files):
    body = {"drive_id": "d1", "path_on_host": files["data.img"], "is_root_device": False, "is_read_only": False}
    assert api.put("/drives/d1", body)[0] == 204
    assert api.put("/drives/d1", {**body, "is_read_only": True, "cache_type": "Writeback"})[0] == 204
    drives = api.get("/vm/config")[1]["drives"]
    assert len(drives) == 1 and drives[0]["is_read_only"] is True and drives[0]["cache_type"] == "Writeback"


def test_drive_path_id_differing_from_body_id_is_refused(api, files):
    body = {"drive_id": "other", "path_on_host": files["data.img"], "is_root_device": False, "is_read_only": True}
    assert "differs" in api.error(400, "PUT", "/drives/data", body)


def test_drive_with_missing_backing_file_is_refused(api, workdir):
    body = {"drive_id": "d", "path_on_host": os.path.join(workdir, "absent.img"), "is_root_device": False,
            "is_read_only": True}
    assert "path_on_host" in api.error(400, "PUT", "/drives/d", body)


def test_only_one_root_drive_and_the_root_is_listed_first(api, files):
    data = {"drive_id": "data", "path_on_host": files["data.img"], "is_root_device": False, "is_read_only": True}
    root = {"drive_id": "root", "path_on_host": files["rootfs.ext4"], "is_root_device": True, "is_read_only": False}
    assert api.put("/drives/data", data)[0] == 204
    assert api.put("/drives/root", root)[0] == 204
    assert [d["drive_id"] for d in api.get("/vm/config")[1]["drives"]] == ["root", "data"]
    assert "already the root device" in api.error(400, "PUT", "/drives/data", {**data, "is_root_device": True})


def test_network_interface_put_and_duplicate_mac_or_tap_refused(api):
    eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}
    assert api.put("/network-interfaces/eth0", eth0) == (204, None)
    assert api.get("/vm/config")[1]["network-interfaces"] == [eth0]
    dup_mac = {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}
    assert "MAC" in api.error(400, "PUT", "/network-interfaces/eth1", dup_mac)
    assert "tap0" in api.error(400, "PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "tap0"})
    assert "differs" in api.error(400, "PUT", "/network-interfaces/eth9", {**eth0, "iface_id": "eth1"})


def test_vsock_put_appears_in_vm_config(api, workdir):
    body = {"guest_cid": 3, "uds_path": os.path.join(workdir, "v.sock")}
    assert api.put("/vsock", body) == (204, None)
    assert api.get("/vm/config")[1]["vsock"] == body


def test_vsock_uds_path_longer_than_sun_path_is_refused(api):
    assert "sun_path" in api.error(400, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/" + "x" * 110})


# --- malformed bodies -------------------------------------------------------------------------------------------

BAD_BODIES = [
    ("/boot-source", b"{not json", "not valid JSON"),
    ("/boot-source", b"\xff\xfe\x00garbage", "not valid JSON"),
    ("/boot-source", [1, 2], "expected a JSON object, got array"),
    ("/boot-source", "kernel", "expected a JSON object, got string"),
    ("/boot-source", {}, "'kernel_image_path' is required"),
    ("/boot-source", {"kernel_image_path": None}, "must not be null"),
    ("/boot-source", {"kernel_image_path": 5}, "expected string, got integer"),
    ("/boot-source", {"kernel_image_path": "/k", "cmdline": "x"}, 'unknown field "cmdline"'),
    ("/boot-source", {"kernel_image_path": "/a\u0000b"}, "NUL"),
    ("/boot-source", {"kernel_image_path": ""}, "non-empty"),
    ("/machine-config", {"vcpu_count": True, "mem_size_mib": 128}, "vcpu_count: expected integer, got boolean"),
    ("/machine-config", {"vcpu_count": 2.0, "mem_size_mib": 128}, "expected integer, got number"),
    ("/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, "expected integer, got string"),
    ("/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "out of range [1, 32]"),
    ("/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, "out of range [1, 32]"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 0}, "mem_size_mib: 0 is out of range"),
    ("/machine-config", {"vcpu_count": 1}, "'mem_size_mib' is required"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "smt": True}, "does not support SMT"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "smt": 0}, "expected boolean, got integer"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}, "unknown field"),
    ("/drives/d", {"drive_id": "d", "path_on_host": "/x", "is_root_device": False}, "'is_read_only' is required"),
    ("/drives/d", {"drive_id": "d", "path_on_host": "/x", "is_root_device": "no", "is_read_only": False},
     "is_root_device: expected boolean"),
    ("/drives/d", {"drive_id": "d", "path_on_host": "/x", "is_root_device": False, "is_read_only": False,
                   "cache_type": "None"}, "is not one of"),
    ("/drives/a-b", {"drive_id": "a-b", "path_on_host": "/x", "is_root_device": False, "is_read_only": False},
     "does not match"),
    ("/network-interfaces/e", {"iface_id": "e", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00"},
     "guest_mac"),
    ("/network-interfaces/e", {"iface_id": "e", "host_dev_name": "a-very-long-tap-name"}, "host_dev_name"),
    ("/network-interfaces/e", {"iface_id": "e"}, "'host_dev_name' is required"),
    ("/vsock", {"guest_cid": 2, "uds_path": "/tmp/v.sock"}, "out of range [3, 4294967294]"),
    ("/vsock", {"guest_cid": 1 << 32, "uds_path": "/tmp/v.sock"}, "out of range"),
    ("/vsock", {"guest_cid": 3}, "'uds_path' is required"),
    ("/actions", {"action_type": "Reboot"}, "is not one of"),
    ("/actions", {"action_type": "InstanceStart", "now": True}, "unknown field"),
    ("/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Half"}, "is not one of"),
    ("/snapshot/create", {"snapshot_path": "/s"}, "'mem_file_path' is required"),
    ("/snapshot/load", {"snapshot_path": "/s"}, "exactly one of"),
    ("/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend":
                        {"backend_type": "File", "backend_path": "/m"}}, "exactly one of"),
    ("/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}},
     "Uffd backend is not supported"),
    ("/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_path": "/m"}},
     "mem_backend: field 'backend_type' is required"),
    ("/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m", "resume_vm": 1}, "expected boolean"),
]


@pytest.mark.parametrize("path, body, fragment", BAD_BODIES, ids=[f"{p} {f}" for p, _, f in BAD_BODIES])
def test_malformed_put_body_is_400_naming_the_problem(api, path, body, fragment):
    assert fragment in api.error(400, "PUT", path, body if isinstance(body, bytes) else json.dumps(body).encode())


def test_patch_vm_with_unknown_state_is_400(started):
    assert "is not one of" in started.error(400, "PATCH", "/vm", {"state": "Stopped"})


def test_put_without_body_is_400(api):
    assert "needs a JSON body" in api.error(400, "PUT", "/boot-source")


def test_get_with_a_body_is_400(api):
    assert "takes no request body" in api.error(400, "GET", "/", b"{}")


def test_rejected_put_leaves_the_config_unchanged(api):
    api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    api.error(400, "PUT", "/machine-config", {"vcpu_count": 99, "mem_size_mib": 64})
    assert api.get("/machine-config")[1]["vcpu_count"] == 2


def test_model_rejects_bool_for_int_without_a_server():
    with pytest.raises(ApiError) as e:
        MachineConfiguration.from_json({"vcpu_count": 1, "mem_size_mib": False})
    assert e.value.status == 400 and "mem_size_mib" in e.value.message
    assert SnapshotLoadParams.from_json({"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                                         "backend_path": "/m"}}).memory_path == "/m"


# --- starting and the state rules -------------------------------------------------------------------------------

def test_instance_start_without_boot_source_is_refused(api, factory):
    assert "boot source" in api.error(400, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert factory.vms == [] and api.get("/")[1]["state"] == "Not started"


def test_instance_start_builds_the_vm_from_the_spec_and_starts_it(api, factory, files):
    api.put("/boot-source", {"kernel_image_path": files["vmlinux"], "boot_args": "quiet"})
    api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    api.put("/drives/root", {"drive_id": "root", "path_on_host": files["rootfs.ext4"], "is_root_device": True,
                             "is_read_only": True})
    assert api.put("/actions", {"action_type": "InstanceStart"}) == (204, None)
    [vm] = factory.vms
    assert vm.calls == ["start"]
    assert vm.spec.boot_source.boot_args == "quiet" and vm.spec.machine_config.vcpu_count == 2
    assert list(vm.spec.drives) == ["root"]
    assert api.get("/")[1]["state"] == "Running"


PRE_BOOT = [
    ("/boot-source", {"kernel_image_path": "/etc/hostname"}),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
    ("/drives/d", {"drive_id": "d", "path_on_host": "/etc/hostname", "is_root_device": False, "is_read_only": True}),
    ("/network-interfaces/e", {"iface_id": "e", "host_dev_name": "tap0"}),
    ("/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
    ("/actions", {"action_type": "InstanceStart"}),
    ("/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}),
]


@pytest.mark.parametrize("path, body", PRE_BOOT, ids=[p for p, _ in PRE_BOOT])
def test_pre_boot_request_after_start_is_refused(started, path, body):
    assert "not supported after starting the microVM" in started.error(400, "PUT", path, body)
    assert len(started.factory.vms) == 1


@pytest.mark.parametrize("method, path, body", [
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"}),
], ids=["pause", "ctrl-alt-del", "snapshot-create"])
def test_post_boot_request_before_start_is_refused(api, method, path, body):
    assert "not supported before starting the microVM" in api.error(400, method, path, body)


def test_patch_vm_pause_and_resume_reach_the_vm(started):
    vm = started.factory.vms[0]
    assert started.patch("/vm", {"state": "Paused"}) == (204, None)
    assert started.get("/")[1]["state"] == "Paused"
    assert started.patch("/vm", {"state": "Paused"}) == (204, None)  # already paused: nothing to do
    assert started.patch("/vm", {"state": "Resumed"}) == (204, None)
    assert vm.calls == ["start", "pause", "resume"] and started.get("/")[1]["state"] == "Running"


def test_send_ctrl_alt_del_reaches_the_vm(started):
    assert started.put("/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert started.factory.vms[0].calls[-1] == "ctrl_alt_del"


def test_requests_to_a_stopped_vm_are_refused(started):
    started.factory.vms[0].state = "Stopped"
    assert started.get("/")[1]["state"] == "Stopped"
    assert "has stopped" in started.error(400, "PATCH", "/vm", {"state": "Resumed"})


def test_flush_metrics_calls_the_sink_and_without_one_does_nothing(workdir, api):
    assert api.put("/actions", {"action_type": "FlushMetrics"}) == (204, None)
    api.close()
    flushed = []
    a = Api(workdir, Factory(), flush_metrics=lambda: flushed.append(1))
    try:
        assert a.put("/actions", {"action_type": "FlushMetrics"}) == (204, None) and flushed == [1]
    finally:
        a.close()


def test_factory_failure_is_400_and_the_vmm_stays_not_started(api, factory, files):
    api.put("/boot-source", {"kernel_image_path": files["vmlinux"]})
    factory.error = ValueError("256 MiB needed")
    assert "256 MiB needed" in api.error(400, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert api.get("/")[1]["state"] == "Not started"
    factory.error = None
    assert api.put("/actions", {"action_type": "InstanceStart"}) == (204, None)


def test_failed_vm_start_stops_the_handle_and_reports_its_message(api, files):
    api.factory.vm_kw["fail_start"] = OSError(12, "Cannot allocate memory")
    api.put("/boot-source", {"kernel_image_path": files["vmlinux"]})
    assert "Cannot allocate memory" in api.error(400, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert api.factory.vms[0].calls == ["start", "stop"] and api.get("/")[1]["state"] == "Not started"


def test_unexpected_exception_is_500_with_one_line_and_logged(api, files, caplog):
    api.factory.vm_kw["fail_start"] = KeyError("vcpu\nzero")
    api.put("/boot-source", {"kernel_image_path": files["vmlinux"]})
    with caplog.at_level(logging.ERROR, logger="popek.api.server"):
        msg = api.error(500, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert msg.startswith("internal error: KeyError")
    assert any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records)
    assert api.get("/")[0] == 200  # the server goes on serving


def test_controller_shutdown_stops_the_vm_once(started):
    started.controller.shutdown()
    started.controller.shutdown()
    assert started.factory.vms[0].calls == ["start", "stop"]


# --- snapshots --------------------------------------------------------------------------------------------------

def test_snapshot_create_needs_a_paused_vm(started):
    assert "must be Paused" in started.error(400, "PUT", "/snapshot/create", {"snapshot_path": "/s",
                                                                             "mem_file_path": "/m"})


def test_snapshot_create_not_supported_yet_is_400_with_that_message(started):
    started.patch("/vm", {"state": "Paused"})
    msg = started.error(400, "PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"})
    assert "snapshots are not supported yet" in msg


def test_diff_snapshot_needs_dirty_page_tracking(started):
    started.patch("/vm", {"state": "Paused"})
    body = {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}
    assert "track_dirty_pages" in started.error(400, "PUT", "/snapshot/create", body)


def test_snapshot_create_passes_its_parameters_to_the_vm(workdir, files):
    a = Api(workdir, Factory(snapshots=True))
    try:
        a.put("/boot-source", {"kernel_image_path": files["vmlinux"]})
        a.put("/actions", {"action_type": "InstanceStart"})
        a.patch("/vm", {"state": "Paused"})
        assert a.put("/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"}) == (204, None)
        assert a.factory.vms[0].calls[-1] == ("snapshot_create", {"snapshot_type": "Full", "snapshot_path": "/s",
                                                                  "mem_file_path": "/m"})
    finally:
        a.close()


def test_snapshot_load_not_supported_yet_is_400_and_the_vmm_stays_fresh(api):
    msg = api.error(400, "PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"})
    assert "snapshots are not supported yet" in msg
    assert api.get("/")[1]["state"] == "Not started"


def test_snapshot_load_after_configuring_a_resource_is_refused(api):
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    assert "fresh VMM" in api.error(400, "PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"})


@pytest.mark.parametrize("resume, state", [(False, "Paused"), (True, "Running")])
def test_snapshot_load_gives_the_memory_backend_path_and_resume_flag_to_the_vm(workdir, resume, state):
    a = Api(workdir, Factory(snapshots=True))
    try:
        body = {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/mem"},
                "resume_vm": resume}
        assert a.put("/snapshot/load", body) == (204, None)
        assert a.factory.vms[0].calls == [("snapshot_load", {"snapshot_path": "/s", "mem_file_path": "/mem",
                                                             "resume_vm": resume, "track_dirty_pages": False,
                                                             "base_mem_file_path": None})]
        assert a.get("/")[1]["state"] == state
    finally:
        a.close()


def test_snapshot_load_with_track_dirty_pages_and_a_base_passes_them_on_and_then_allows_a_diff(workdir):
    a = Api(workdir, Factory(snapshots=True))
    try:
        body = {"snapshot_path": "/s", "mem_file_path": "/diff", "base_mem_file_path": "/base",
                "track_dirty_pages": True}
        assert a.put("/snapshot/load", body) == (204, None)
        assert a.factory.vms[0].calls == [("snapshot_load", {"snapshot_path": "/s", "mem_file_path": "/diff",
                                                             "resume_vm": False, "track_dirty_pages": True,
                                                             "base_mem_file_path": "/base"})]
        assert a.get("/machine-config")[1]["track_dirty_pages"] is True
        create = {"snapshot_path": "/s2", "mem_file_path": "/m2", "snapshot_type": "Diff"}
        assert a.put("/snapshot/create", create) == (204, None)
        assert a.factory.vms[0].calls[-1] == ("snapshot_create", {"snapshot_type": "Diff", "snapshot_path": "/s2",
                                                                  "mem_file_path": "/m2"})
    finally:
        a.close()


# --- HTTP: routing, limits, connections -------------------------------------------------------------------------

def test_unknown_resource_is_404(api):
    assert "/hotplug" in api.error(404, "GET", "/hotplug")
    api.error(404, "PUT", "/drives/")


def test_wrong_method_is_405_with_allow_header(api):
    assert "allowed: GET, PUT" in api.error(405, "DELETE", "/machine-config")
    api.error(405, "POST", "/actions", {"action_type": "InstanceStart"})
    api.error(405, "BREW", "/vm/config")
    conn = api.client._conn
    conn.request("PATCH", "/boot-source", body=b"{}")
    response = conn.getresponse()
    response.read()
    assert response.status == 405 and response.getheader("Allow") == "PUT"


def test_body_over_64_kib_is_413_and_the_connection_stays_usable(api):
    assert "limit is 65536" in api.error(413, "PUT", "/boot-source", b" " * (64 * 1024 + 1))
    assert api.get("/")[0] == 200


def test_multi_mib_body_still_gets_its_413_answer(api):
    assert api.error(413, "PUT", "/boot-source", b" " * (3 << 20)).startswith("the request body is 3145728 bytes")
    assert api.get("/")[0] == 200


def test_body_of_exactly_64_kib_is_accepted(api, files):
    body = {"kernel_image_path": files["vmlinux"], "boot_args": ""}
    pad = 64 * 1024 - len(json.dumps(body).encode())
    data = json.dumps({**body, "boot_args": "x" * pad}).encode()
    assert len(data) == 64 * 1024
    assert api.request("PUT", "/boot-source", data) == (204, None)


def test_keep_alive_serves_several_requests_on_one_connection(api):
    api.get("/")
    sock = api.client._conn.sock
    for _ in range(5):
        assert api.get("/machine-config")[0] == 200
    assert api.client._conn.sock is sock


def _raw(sock_path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_malformed_http_gets_a_json_error_not_html(api):
    out = _raw(api.sock, b"GARBAGE\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and "fault_message" in json.loads(body)


def test_chunked_body_and_bad_content_length_are_400(api):
    out = _raw(api.sock, b"PUT /vm HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in out
    out = _raw(api.sock, b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"Content-Length" in out
    for bad in ("\u00b2".encode("latin-1"), b"9" * 5000):  # a Unicode digit, more digits than int() parses
        out = _raw(api.sock, b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: " + bad + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400"), out[:80]


def test_concurrent_clients_are_all_served(api, files):
    errors = []

    def worker(i):
        try:
            with ApiClient(api.sock, timeout=10) as c:
                body = {"drive_id": f"d{i}", "path_on_host": files["data.img"], "is_root_device": False,
                        "is_read_only": True}
                for _ in range(5):
                    assert c.put(f"/drives/d{i}", body) == (204, None)
                    assert c.get("/")[0] == 200
        except Exception as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(d["drive_id"] for d in api.get("/vm/config")[1]["drives"]) == [f"d{i}" for i in range(8)]


def test_close_removes_the_socket_file_and_ends_open_connections(workdir, factory):
    a = Api(workdir, factory)
    assert a.get("/")[0] == 200  # leaves a kept-alive connection open
    a.server.close()
    assert not os.path.exists(a.sock)
    with pytest.raises(OSError):
        a.get("/")


def test_start_refuses_a_socket_where_a_server_answers(api):
    with pytest.raises(ApiServerError, match="another server is answering"):
        ApiServer(api.sock, Controller(Factory())).start()
    assert api.get("/")[0] == 200


def test_start_replaces_a_stale_socket_file(workdir, factory):
    path = os.path.join(workdir, "api.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    a = Api(workdir, factory)
    try:
        assert a.get("/")[0] == 200
    finally:
        a.close()


def test_start_refuses_to_replace_a_file_that_is_not_a_socket(workdir):
    path = os.path.join(workdir, "api.sock")
    open(path, "w").close()
    with pytest.raises(ApiServerError, match="not a socket"):
        ApiServer(path, Controller(Factory())).start()
    assert os.path.isfile(path)


# --- the OpenAPI document ---------------------------------------------------------------------------------------

def test_openapi_document_lists_exactly_the_server_routes(api):
    status, doc = api.get("/openapi.json")
    assert status == 200
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(r.method, r.path) for r in ROUTES}
    for r in ROUTES:  # and each documented route is really served (no 404/405)
        body = b"{}" if r.body else None
        assert api.request(r.method, r.path.replace("{drive_id}", "d").replace("{iface_id}", "e"), body)[0] \
            not in (404, 405), r.path


def test_openapi_json_file_is_the_document_built_from_routes_and_models(api):
    assert json.loads(OPENAPI_FILE.read_text()) == openapi_document(), \
        'stale; regenerate: python -c "from popek.api.server import write_openapi_file; write_openapi_file()"'
    assert api.get("/openapi.json")[1] == openapi_document()


def test_openapi_document_is_valid_openapi_3():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(json.loads(OPENAPI_FILE.read_text()))


# --- property test: schemathesis against the served document ----------------------------------------------------

try:
    import schemathesis
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)
except ImportError:  # optional test dependency
    schemathesis = None

if schemathesis is not None:
    import requests
    import urllib3
    from hypothesis import HealthCheck, settings

    class _UnixConnection(urllib3.connection.HTTPConnection):
        def __init__(self, path, *args, **kwargs):
            super().__init__("localhost", *args, **kwargs)
            self._path = path

        def _new_conn(self):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(self._path)
            return s

    class _UnixPool(urllib3.HTTPConnectionPool):
        def __init__(self, path):
            super().__init__("localhost")
            self._path = path

        def _new_conn(self):
            return _UnixConnection(self._path)

    class _UnixAdapter(requests.adapters.HTTPAdapter):
        def __init__(self, path):
            super().__init__()
            self._pool = _UnixPool(path)

        def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
            return self._pool

    schema = schemathesis.openapi.from_dict(json.loads(OPENAPI_FILE.read_text()))

    @pytest.fixture(scope="module", params=["not started", "running"])
    def fuzzed(request):
        d = tempfile.mkdtemp(prefix="popek-st-", dir="/tmp")
        kernel = os.path.join(d, "vmlinux")
        open(kernel, "wb").close()
        a = Api(d, Factory(snapshots=True))
        if request.param == "running":
            a.put("/boot-source", {"kernel_image_path": kernel})
            a.put("/actions", {"action_type": "InstanceStart"})
        session = requests.Session()
        session.mount("http://popek/", _UnixAdapter(a.sock))
        yield session
        a.close()
        shutil.rmtree(d, ignore_errors=True)

    @schema.parametrize()
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def test_schemathesis_finds_no_server_error_and_responses_match_the_document(case, fuzzed):
        response = case.call(base_url="http://popek", session=fuzzed)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance,
                                                 negative_data_rejection])
else:
    @pytest.mark.skip(reason="schemathesis is not installed")
    def test_schemathesis_finds_no_server_error_and_responses_match_the_document():
        pass

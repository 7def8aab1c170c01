"""The balloon resources of the API (Firecracker's PUT/PATCH/GET /balloon and /balloon/statistics): validation,
pre- and post-boot rules, what reaches the VM handle, and the spec -> popek.vm.BalloonConfig translation."""

import pytest

from popek.api.handle import VmHandle, vm_arguments
from popek.api.model import Balloon, BootSource, VmSpec
from popek.vm import BalloonConfig
from test_api import Api, Factory, FakeVm, files, workdir  # noqa: F401  (fixtures)


class BalloonVm(FakeVm):
    """A fake handle with a balloon: records the calls, answers like popek.api.handle.VmHandle."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.config = None if spec.balloon is None else spec.balloon.to_json()
        self.stats_error = None

    def balloon_config(self):
        return self.config

    def balloon_update(self, amount_mib):
        self.calls.append(("balloon_update", amount_mib))
        self.config = {**self.config, "amount_mib": amount_mib}

    def balloon_set_stats_interval(self, seconds):
        self.calls.append(("balloon_set_stats_interval", seconds))

    def balloon_stats(self):
        if self.stats_error:
            raise self.stats_error
        return {"target_pages": 25600, "actual_pages": 256, "target_mib": 100, "actual_mib": 1,
                "free_memory": 1 << 27, "updates": 3, "age_s": 0.5}


class BalloonFactory(Factory):
    def __call__(self, spec):
        vm = BalloonVm(spec)
        self.vms.append(vm)
        return vm


@pytest.fixture
def api(workdir):  # noqa: F811
    a = Api(workdir, BalloonFactory())
    yield a
    a.close()


BALLOON = {"amount_mib": 0, "deflate_on_oom": True}


def boot(api, files):  # noqa: F811
    assert api.put("/boot-source", {"kernel_image_path": files["vmlinux"]}) == (204, None)
    assert api.put("/actions", {"action_type": "InstanceStart"}) == (204, None)
    return api.factory.vms[-1]


def test_put_balloon_before_boot_is_what_get_balloon_and_vm_config_show_with_defaults(api):
    assert api.put("/balloon", {"amount_mib": 64, "deflate_on_oom": False}) == (204, None)
    want = {"amount_mib": 64, "deflate_on_oom": False, "stats_polling_interval_s": 0, "free_page_reporting": False}
    assert api.get("/balloon") == (200, want)
    assert api.get("/vm/config")[1]["balloon"] == want


@pytest.mark.parametrize("body, says", [
    ({"amount_mib": 1}, "'deflate_on_oom' is required"),
    ({"amount_mib": -1, "deflate_on_oom": True}, "amount_mib"),
    ({"amount_mib": "64", "deflate_on_oom": True}, "expected integer"),
    ({"amount_mib": 1, "deflate_on_oom": 1}, "expected boolean"),
    ({**BALLOON, "stats_polling_interval_s": 1 << 16}, "stats_polling_interval_s"),
    ({**BALLOON, "free_page_hinting": True}, "unknown field"),
    ({"amount_mib": 129, "deflate_on_oom": True}, "larger than the guest's 128 MiB"),
])
def test_put_balloon_refuses_bad_bodies_saying_which_field(api, body, says):
    assert says in api.error(400, "PUT", "/balloon", body)
    assert "no balloon device" in api.error(400, "GET", "/balloon")


def test_patch_before_boot_changes_the_configured_balloon_and_needs_one(api):
    assert "no balloon device" in api.error(400, "PATCH", "/balloon", {"amount_mib": 1})
    assert "no balloon device" in api.error(400, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1})
    api.put("/balloon", BALLOON)
    assert api.patch("/balloon", {"amount_mib": 32}) == (204, None)
    assert api.patch("/balloon/statistics", {"stats_polling_interval_s": 5}) == (204, None)
    assert api.get("/balloon")[1] == {**BALLOON, "amount_mib": 32, "stats_polling_interval_s": 5,
                                      "free_page_reporting": False}
    assert "larger than the guest's" in api.error(400, "PATCH", "/balloon", {"amount_mib": 1000})
    assert "is required" in api.error(400, "PATCH", "/balloon", {})


def test_after_boot_patches_reach_the_vm_and_put_is_refused(api, files):  # noqa: F811
    api.put("/balloon", BALLOON)
    vm = boot(api, files)
    assert vm.spec.balloon == Balloon(amount_mib=0, deflate_on_oom=True)
    assert api.patch("/balloon", {"amount_mib": 100}) == (204, None)
    assert api.patch("/balloon/statistics", {"stats_polling_interval_s": 2}) == (204, None)
    assert vm.calls[1:] == [("balloon_update", 100), ("balloon_set_stats_interval", 2)]
    assert api.get("/balloon")[1]["amount_mib"] == 100  # the device's target, from the handle
    assert "not supported after starting" in api.error(400, "PUT", "/balloon", BALLOON)


def test_statistics_are_post_boot_firecracker_fields_only(api, files):  # noqa: F811
    api.put("/balloon", BALLOON)
    assert "before starting" in api.error(400, "GET", "/balloon/statistics")
    vm = boot(api, files)
    assert api.get("/balloon/statistics") == (200, {"target_pages": 25600, "actual_pages": 256, "target_mib": 100,
                                                    "actual_mib": 1, "free_memory": 1 << 27})
    vm.stats_error = RuntimeError("balloon statistics are not enabled")
    assert "not enabled" in api.error(400, "GET", "/balloon/statistics")


def test_instance_start_refuses_a_balloon_larger_than_the_memory_set_after_it(api, files):  # noqa: F811
    api.put("/balloon", {"amount_mib": 100, "deflate_on_oom": False})
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    api.put("/boot-source", {"kernel_image_path": files["vmlinux"]})
    assert "larger than the guest's 64 MiB" in api.error(400, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert api.factory.vms == []


def test_spec_balloon_becomes_a_balloon_config_of_the_vm(files):  # noqa: F811
    spec = VmSpec(boot_source=BootSource(kernel_image_path=files["vmlinux"]),
                  balloon=Balloon(amount_mib=8, deflate_on_oom=True, stats_polling_interval_s=3,
                                  free_page_reporting=True))
    assert vm_arguments(spec)["balloon"] == BalloonConfig(8, True, 3, True)
    assert vm_arguments(VmSpec(boot_source=spec.boot_source))["balloon"] is None


class _Device:
    target_pages, deflate_on_oom, stats_interval_s, free_page_reporting = 512, True, 0, False

    def __init__(self):
        self.targets = []

    def set_target(self, pages):
        self.targets.append(pages)


class _Vm:
    def __init__(self, device):
        self.balloon = device
        self.config = type("C", (), {"memory": 256 << 20})


def test_handle_converts_mib_to_pages_and_refuses_what_the_vm_cannot_do():
    h = VmHandle(VmSpec())
    with pytest.raises(RuntimeError, match="no balloon device"):
        h.balloon_update(1)
    assert h.balloon_config() is None
    h.vm = _Vm(_Device())
    h.balloon_update(3)
    assert h.vm.balloon.targets == [3 * 256]
    with pytest.raises(ValueError, match="larger than the guest's 256 MiB"):
        h.balloon_update(257)
    assert h.balloon_config() == {"amount_mib": 2, "deflate_on_oom": True, "stats_polling_interval_s": 0,
                                  "free_page_reporting": False}
    with pytest.raises(RuntimeError, match="not enabled"):
        h.balloon_stats()

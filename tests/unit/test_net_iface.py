"""A VM's network interfaces (popek.net.iface, popek.runner.parse_net): the --net syntax, address plans and free
/30s, the guest's popek.net= arguments, and taps that go away with the VM's close and with its process (kill -9).
The tap tests need root and /dev/net/tun and are skipped otherwise; they use names and 198.18.0.0/15 (RFC 2544
benchmarking) addresses of their own."""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from popek.devices.platform import add_virtio_devices
from popek.devices.virtio.device import VirtioError
from popek.net.iface import DEFAULT_POOL, NetConfig, TapNet, free_subnet, guest_args, open_net, resolve
from popek.runner import parse_net, resolve_nets
from popek.vm import DriveConfig, VmError
from test_cli import assert_refused, kernel, popek_run  # noqa: F401  (the `kernel` fixture)
from test_platform import board, image  # noqa: F401  (fixtures)

needs_tap = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="needs root and /dev/net/tun")
N = ipaddress.IPv4Network


# --- --net syntax -----------------------------------------------------------------------------------------


def test_parse_net_alone_is_all_defaults_and_keys_come_in_any_order():
    assert parse_net("") == NetConfig()
    assert parse_net("mac=52:54:00:00:00:01,host=10.0.0.1/24,tap=t0,guest=10.0.0.5") == \
        NetConfig("t0", "10.0.0.1/24", "10.0.0.5", "52:54:00:00:00:01")


@pytest.mark.parametrize("text, message", [
    ("tap", "is not key=value"), ("bridge=br0", "unknown key 'bridge'"), ("tap=a,tap=b", "tap given twice"),
    ("tap=", "tap= has no value"),
])
def test_parse_net_rejects_bad_syntax_naming_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        parse_net(text)


# --- address plans ----------------------------------------------------------------------------------------


def test_default_interfaces_get_distinct_free_30s_of_the_pool_host_1_guest_2_and_a_unicast_mac():
    nets = resolve_nets(["", ""])
    assert len({n.host for n in nets}) == 2
    for n in nets:
        host, guest = ipaddress.IPv4Interface(n.host), ipaddress.IPv4Interface(n.guest)
        assert host.network.prefixlen == 30 and host.network.subnet_of(DEFAULT_POOL)
        assert host.ip == host.network[1] and guest.ip == host.network[2] and guest.network == host.network
        assert int(n.mac[:2], 16) & 1 == 0
    assert not N(nets[0].host, strict=False).overlaps(N(nets[1].host, strict=False))


def test_free_subnet_skips_networks_in_use_and_fails_when_the_pool_is_full():
    pool = N("10.0.0.0/28")  # four /30s
    used = [N("10.0.0.0/30"), N("10.0.0.8/29")]
    assert free_subnet(pool=pool, used=used, rng=random.Random(1)) == N("10.0.0.4/30")
    with pytest.raises(VirtioError, match="every /30 of 10.0.0.0/28 is in use"):
        free_subnet([N("10.0.0.4/30")], pool=pool, used=used)


def test_free_subnet_avoids_this_hosts_own_addresses():
    # the host's loopback is 127.0.0.0/8: a pool inside it has nothing free
    with pytest.raises(VirtioError, match="in use"):
        free_subnet(pool=N("127.0.0.0/28"))


def test_given_host_address_defaults_the_guest_to_the_networks_first_other_address():
    [n] = resolve([NetConfig(host="10.5.0.1/24")])
    assert (n.host, n.guest) == ("10.5.0.1/24", "10.5.0.2/24")
    [n] = resolve([NetConfig(host="10.5.0.2/30", mac="02:00:00:00:00:09")])
    assert (n.guest, n.mac) == ("10.5.0.1/30", "02:00:00:00:00:09")


@pytest.mark.parametrize("cfg, message", [
    (NetConfig(host="10.0.0.1/31"), "no room for a guest address"),
    (NetConfig(host="10.0.0.0/24"), "network address"),
    (NetConfig(host="10.0.0.255/24"), "broadcast address"),
    (NetConfig(host="fd00::1/64"), "only IPv4"),
    (NetConfig(host="10.0.0.1"), "no room"),  # a /32
    (NetConfig(host="ten/24"), "not an address"),
    (NetConfig(host="10.0.0.1/24", guest="10.0.1.2"), "not in the host side's network"),
    (NetConfig(host="10.0.0.1/24", guest="10.0.0.1"), "is the host's address"),
    (NetConfig(guest="10.0.0.2"), "needs host="),
    (NetConfig(mac="01:00:5e:00:00:01"), "not a unicast address"),
    (NetConfig(mac="00:00:00:00:00:00"), "not a unicast address"),
    (NetConfig(mac="52:54:00"), "six hex octets"),
    (NetConfig(tap="x" * 16), "not a valid interface name"),
    (NetConfig(tap="a:b"), "not a valid interface name"),
])
def test_bad_interface_values_are_refused_saying_why(cfg, message):
    with pytest.raises(ValueError, match=message):
        resolve([cfg])


def test_two_interfaces_may_not_share_a_tap_mac_or_network():
    with pytest.raises(ValueError, match="tap 't0'"):
        resolve([NetConfig(tap="t0"), NetConfig(tap="t0")])
    with pytest.raises(ValueError, match="MAC 02:00:00:00:00:01"):
        resolve([NetConfig(mac="02:00:00:00:00:01"), NetConfig(mac="02:00:00:00:00:01")])
    with pytest.raises(ValueError, match="overlapping networks"):
        resolve([NetConfig(host="10.0.0.1/24"), NetConfig(host="10.0.0.129/25")])
    assert len(resolve([NetConfig(tap="p%d"), NetConfig(tap="p%d")])) == 2  # the kernel numbers each


def test_resolve_nets_turns_value_errors_into_one_line_vm_errors():
    with pytest.raises(VmError, match="^net: host=10.0.0.1/31"):
        resolve_nets(["host=10.0.0.1/31"])


def test_guest_args_name_each_interface_by_mac_and_give_the_first_one_the_default_route():
    nets = [NetConfig("t0", "10.0.0.1/30", "10.0.0.2/30", "02:00:00:00:00:01"),
            NetConfig(None, "10.9.0.1/24", "10.9.0.50/24", "02:00:00:00:00:02")]
    assert guest_args(nets) == ("popek.net=02:00:00:00:00:01,10.0.0.2/30,10.0.0.1 "
                                "popek.net=02:00:00:00:00:02,10.9.0.50/24")


def test_guest_init_configures_popek_net_interfaces_by_mac():
    init = (Path(__file__).parents[2] / "popek/images/init").read_text()
    assert "popek.net=*)" in init and 'ip addr add "$addr" dev "$dev"' in init
    assert 'ip route add default via "$gw"' in init


# --- taps (root + /dev/net/tun) ---------------------------------------------------------------------------


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def unique_name(prefix: str = "pkt") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@needs_tap
def test_open_net_makes_an_up_tap_with_the_host_address_and_close_removes_it():
    name = unique_name()
    net = open_net(NetConfig(name, "198.18.7.1/30", "198.18.7.2/30", "02:00:00:00:07:01"))
    try:
        assert isinstance(net, TapNet) and net.net.tap == name and net.mac == bytes.fromhex("020000000701")
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", name], capture_output=True, text=True).stdout
        assert "198.18.7.1/30" in out
        assert int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 1  # IFF_UP
    finally:
        net.close()
    assert not link_exists(name)
    net.close()  # idempotent


@needs_tap
def test_open_net_refuses_a_network_already_on_the_host_and_a_taken_name_leaving_nothing_behind():
    name = unique_name()
    first = open_net(NetConfig(name, "198.18.8.1/30", "198.18.8.2/30", "02:00:00:00:08:01"))
    try:
        other = unique_name()
        with pytest.raises(VirtioError, match=r"network 198.18.8.0/30 overlaps 198.18.8.0/30"):
            open_net(NetConfig(other, "198.18.8.1/30", "198.18.8.2/30", "02:00:00:00:08:02"))
        assert not link_exists(other)
        with pytest.raises(VirtioError, match=f"interface name '{name}' is already in use"):
            open_net(NetConfig(name, "198.18.9.1/30", "198.18.9.2/30", "02:00:00:00:08:03"))
        out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert "198.18.9.1" not in out
    finally:
        first.close()
    assert not link_exists(name)


@needs_tap
def test_the_tap_goes_away_when_its_process_is_killed_with_sigkill():
    name = unique_name()
    code = ("import sys\nfrom popek.net.iface import NetConfig, open_net\n"
            f"n = open_net(NetConfig({name!r}, '198.18.10.1/30', '198.18.10.2/30', '02:00:00:00:0a:01'))\n"
            "print(n.net.tap, flush=True)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == name
        assert link_exists(name)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while link_exists(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link_exists(name), "the tap outlived its process: it is persistent"
    finally:
        child.kill()
        child.wait()
        if link_exists(name):
            subprocess.run(["ip", "link", "del", name], check=False)


# --- `popek run --net` refusals: one error line, exit 2, no tap left (test_cli's harness) -------------------


@pytest.mark.parametrize("net, words", [
    ("tap=a/b", ["net:", "not a valid interface name"]),
    ("host=10.0.0.1/31", ["net:", "/31 has no room"]),
    ("bridge=br0", ["unknown key 'bridge'"]),
])
def test_bad_net_values_are_refused_before_the_image_build(tmp_path, net, words):
    assert_refused(popek_run(tmp_path, "--net", net), *words)


@needs_tap
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not usable here")
def test_a_tap_that_cannot_be_created_is_refused_before_the_guest_starts_leaving_no_tap(tmp_path, kernel):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, name = unique_name(), unique_name()
    assert_refused(popek_run(tmp_path / "a", "--kernel", str(kernel), "--net", f"tap={first},host=198.18.15.1/30",
                             "--net", "tap=lo"), "interface name 'lo' is already in use")
    assert_refused(popek_run(tmp_path / "b", "--kernel", str(kernel), "--net", f"tap={name},host=127.0.0.5/30"),
                   "network 127.0.0.4/30 overlaps 127.0.0.0/8")
    assert not link_exists(first) and not link_exists(name)  # the first run's first tap was made, then removed


@needs_tap
def test_board_adds_a_virtio_net_per_interface_after_the_drives_and_its_close_removes_the_taps(board, image):
    names = [unique_name(), unique_name()]
    nets = [NetConfig(names[0], "198.18.11.1/30", "198.18.11.2/30", "02:00:00:00:0b:01"),
            NetConfig(names[1], "198.18.12.1/30", "198.18.12.2/30", "02:00:00:00:0c:01")]
    add_virtio_devices(board, [DriveConfig(image)], rng=True, nets=nets)
    assert [d.device.name for d in board.devices] == ["virtio-blk", "virtio-net", "virtio-net", "virtio-rng"]
    assert [d.device.net.tap for d in board.devices[1:3]] == names and all(map(link_exists, names))
    board.close()
    assert not any(map(link_exists, names))


@needs_tap
def test_board_with_a_tap_that_cannot_be_created_keeps_nothing_of_the_interfaces_before_it(board):
    name = unique_name()
    with pytest.raises(VirtioError, match="interface name 'lo' is already in use"):
        add_virtio_devices(board, [], rng=False, nets=[
            NetConfig(name, "198.18.13.1/30", "198.18.13.2/30", "02:00:00:00:0d:01"),
            NetConfig("lo", "198.18.14.1/30", "198.18.14.2/30", "02:00:00:00:0e:01")])
    board.close()  # what Vm.close does after a failed build
    assert not link_exists(name)

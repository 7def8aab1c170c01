"""Tap devices (popek.net.tap) inside a throwaway network namespace: creation, link state, address, names,
offloads, removal on close, and frames both ways between a virtio-net device and the namespace's stack; MAC
helpers. The tap tests need root and /dev/net/tun and are skipped otherwise."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import uuid

import pytest

from popek.devices.virtio.device import VIRTIO_RING_F_EVENT_IDX
from popek.devices.virtio.net import RX_QUEUE, TX_QUEUE, VIRTIO_NET_HDR, Net
from popek.memory import GuestMemory
from popek.net.tap import Tap, TapError, format_mac, parse_mac, random_mac
from polling import wait_for
from test_virtqueue import FakeDriver

needs_tap = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="needs root and /dev/net/tun")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def netns():
    name = f"popek-test-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    yield name
    sh("ip", "netns", "del", name, check=False)
    assert name not in sh("ip", "netns", "list")


def links(netns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(sh("ip", "-n", netns, "-j", "addr", "show"))}


# --- MAC helpers (no privileges needed) -------------------------------------------------------------------


def test_random_mac_is_locally_administered_unicast_and_varies():
    macs = [random_mac() for _ in range(64)]
    assert all(len(m) == 6 and m[0] & 0x01 == 0 and m[0] & 0x02 for m in macs)
    assert len(set(macs)) == 64


def test_parse_and_format_mac_round_trip():
    assert parse_mac("52:54:00:AB:cd:0f") == bytes.fromhex("525400abcd0f")
    assert parse_mac("52-54-00-ab-cd-0f") == bytes.fromhex("525400abcd0f")
    assert parse_mac(b"\x02\x00\x00\x00\x00\x01") == b"\x02\x00\x00\x00\x00\x01"
    assert format_mac(bytes.fromhex("525400abcd0f")) == "52:54:00:ab:cd:0f"


@pytest.mark.parametrize("bad", ["52:54:00:ab:cd", "52:54:00:ab:cd:0f:11", "52:54:00:ab:cd:zz", "525400abcd0f",
                                 "52:54:00:ab:cd:123", b"\x00" * 5])
def test_parse_mac_rejects_malformed_addresses(bad):
    with pytest.raises(ValueError, match="MAC"):
        parse_mac(bad)


# --- tap lifecycle ----------------------------------------------------------------------------------------


@needs_tap
def test_create_makes_an_up_link_with_the_host_address_in_the_namespace(netns):
    with Tap.create(host_addr="172.16.0.1/30", netns=netns) as tap:
        assert tap.name.startswith("popek") and tap.index > 0
        link = links(netns)[tap.name]
        assert "UP" in link["flags"]
        assert {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"} == \
            {("172.16.0.1", 30)}
        assert link["address"] not in sh("ip", "-o", "link")  # nothing leaked into the test's own namespace
        assert os.get_blocking(tap.fd) is False


@needs_tap
def test_close_removes_the_link(netns):
    tap = Tap.create(netns=netns)
    name = tap.name
    assert name in links(netns)
    tap.close()
    assert name not in links(netns)
    tap.close()  # idempotent


@needs_tap
def test_tap_is_not_persistent_closing_the_fd_alone_removes_the_link(netns):
    tap = Tap.create(netns=netns)
    os.close(tap.fd)
    tap.fd = -1
    assert wait_for(lambda: tap.name not in links(netns))


@needs_tap
def test_auto_names_are_distinct_and_an_explicit_name_in_use_is_refused(netns):
    with Tap.create(netns=netns) as a, Tap.create(netns=netns) as b:
        assert a.name != b.name
        with pytest.raises(TapError, match="already in use"):
            Tap.create(name=a.name, netns=netns)
        with Tap.create(name="popek-eth", netns=netns) as c:
            assert c.name == "popek-eth" and "popek-eth" in links(netns)


@needs_tap
def test_offloads_are_accepted_and_tso_without_csum_is_refused(netns):
    with Tap.create(netns=netns) as tap:
        tap.offloads(csum=True, tso4=True, tso6=True)
        tap.offloads()
        with pytest.raises(ValueError, match="TSO"):
            tap.offloads(tso4=True)


@needs_tap
def test_bad_namespace_name_or_address_is_a_clear_error(netns):
    with pytest.raises(TapError, match="does not exist"):
        Tap.create(netns=netns + "-missing")
    with pytest.raises(ValueError):
        Tap.create(host_addr="172.16.0.300/30", netns=netns)
    with pytest.raises(ValueError, match="interface name"):
        Tap.create(name="x" * 16, netns=netns)
    assert not [n for n in links(netns) if n.startswith("popek")]


def test_missing_tun_device_is_reported(monkeypatch):
    real_open = os.open

    def fake_open(path, *a, **kw):
        if path == "/dev/net/tun":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(TapError, match="/dev/net/tun"):
        Tap.create()


def test_missing_privilege_is_reported(monkeypatch):
    real_open = os.open

    def fake_open(path, *a, **kw):
        if path == "/dev/net/tun":
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(TapError, match="CAP_NET_ADMIN"):
        Tap.create()


# --- frames through a real tap ----------------------------------------------------------------------------


def ipv4_udp(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame (UDP checksum 0, allowed in IPv4)."""
    total = 20 + 8 + len(data)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    s = sum(struct.unpack("!10H", ip))
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


@needs_tap
def test_virtio_net_frames_reach_the_namespace_stack_and_come_back_through_the_tap(netns):
    guest_mac = parse_mac("52:54:00:aa:bb:cc")
    with Tap.create(host_addr="172.16.0.1/30", netns=netns) as tap, GuestMemory([(0, 0x200000)]) as mem:
        tap_mac = parse_mac(links(netns)[tap.name]["address"])
        dev = Net(tap, mac=guest_mac, queue_size=16)
        rx = FakeDriver(mem, size=16, base=0x1000, heap=0x10000)
        tx = FakeDriver(mem, size=16, base=0x3000, heap=0x100000)
        assert dev.ack_features(dev.features & ~(1 << VIRTIO_RING_F_EVENT_IDX))
        dev.activate(mem, [rx.queue(), tx.queue()], lambda i: None)
        try:
            # guest -> host: a UDP datagram to a socket in the namespace
            receiver = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-c",
                 "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 "s.bind(('172.16.0.1', 7001)); s.settimeout(10); print('ready', flush=True); "
                 "print(s.recvfrom(100)[0].decode(), flush=True)"],
                stdout=subprocess.PIPE, text=True)
            assert receiver.stdout.readline().strip() == "ready"
            tx.add([VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0),
                    ipv4_udp(guest_mac, tap_mac, "172.16.0.2", "172.16.0.1", 5555, 7001, b"hello host")])
            tx.kick()
            dev.queue_notify(TX_QUEUE)
            out, _ = receiver.communicate(timeout=15)
            assert out.strip() == "hello host"

            # host -> guest: the stack sends to 172.16.0.2 (static neighbour), the frame lands in an RX buffer
            for _ in range(8):
                rx.add([], [12 + 1514])
            rx.kick()
            dev.queue_notify(RX_QUEUE)
            sh("ip", "-n", netns, "neigh", "replace", "172.16.0.2", "lladdr", format_mac(guest_mac), "dev",
               tap.name, "nud", "permanent")
            sh("ip", "netns", "exec", netns, sys.executable, "-c",
               "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
               ".sendto(b'hello guest', ('172.16.0.2', 7002))")
            got = []

            def udp_frame_arrived():
                for head, n in rx.used():
                    data = rx.written(head)[0][:n]
                    got.append(data)
                return any(d[12 + 12:12 + 14] == b"\x08\x00" and d[12 + 14 + 9] == 17 for d in got)

            assert wait_for(udp_frame_arrived)
            frame = next(d for d in got if d[24:26] == b"\x08\x00" and d[12 + 14 + 9] == 17)
            assert VIRTIO_NET_HDR.unpack(frame[:12])[6] == 1  # num_buffers
            assert frame[12:18] == guest_mac and frame[18:24] == tap_mac
            assert frame[12 + 14 + 28:] == b"hello guest"
        finally:
            dev.reset()

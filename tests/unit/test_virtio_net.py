"""virtio-net (VIRTIO 1.2 §5.1) over a SOCK_SEQPACKET socketpair backend: TX frames reach the backend exactly,
RX frames land in guest buffers with a valid header, frames wait for buffers, hostile chains set needs_reset,
configuration space, offload negotiation on a tap-like backend, reset and state/restore."""

from __future__ import annotations

import socket
import time

import pytest

from popek.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioError
from popek.devices.virtio.net import (RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET, VIRTIO_NET_CONFIG, VIRTIO_NET_F_CSUM,
                                      VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                                      VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
                                      VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR,
                                      VIRTIO_NET_S_LINK_UP, Net)
from popek.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from popek.memory import GuestMemory
from polling import wait_for
from test_virtqueue import FakeDriver

MAC = "52:54:00:12:34:56"
HDR = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)


def frame(n: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``n`` bytes: broadcast dst, our MAC as src, type 0x88B5 (local experimental)."""
    body = bytes((seed + i * 13) & 0xFF for i in range(max(n - 14, 0)))
    return b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + b"\x88\xb5" + body


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x200000)]) as m:
        yield m


class Nic:
    """A Net device on one end of a SOCK_SEQPACKET pair (``peer`` is the network), activated with FakeDriver
    RX and TX queues; records notifications and configuration changes."""

    def __init__(self, mem: GuestMemory, backend=None, event_idx: bool = False, features: int | None = None):
        self.peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.peer.settimeout(5)
        self.ours = ours
        self.dev = Net(backend if backend is not None else ours, mac=MAC, queue_size=16)
        self.rx = FakeDriver(mem, size=16, base=0x1000, event_idx=event_idx, heap=0x10000)
        self.tx = FakeDriver(mem, size=16, base=0x3000, event_idx=event_idx, heap=0x100000)
        self.notified: list[int] = []
        self.config_changes = 0
        feats = self.dev.features if features is None else features
        if not event_idx:
            feats &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
        assert self.dev.ack_features(feats)
        self.dev.activate(mem, [self.rx.queue(), self.tx.queue()], self.notified.append, self._changed)

    def _changed(self):
        self.config_changes += 1

    def send(self, *parts: bytes) -> int:
        head = self.tx.add(list(parts))
        self.tx.kick()
        self.dev.queue_notify(TX_QUEUE)
        return head

    def post_rx(self, *sizes: int) -> int:
        head = self.rx.add([], list(sizes), fill=0xEE)
        self.rx.kick()
        self.dev.queue_notify(RX_QUEUE)
        return head

    def close(self):
        self.dev.reset()
        self.peer.close()
        self.ours.close()


@pytest.fixture
def nic(mem):
    n = Nic(mem)
    yield n
    n.close()


# --- configuration and features ---------------------------------------------------------------------------


def test_config_space_holds_the_mac_link_up_status_and_one_queue_pair(mem):
    n = Nic(mem)
    try:
        assert n.dev.device_id == VIRTIO_ID_NET == 1
        mac, status, pairs = VIRTIO_NET_CONFIG.unpack(n.dev.config_read(0, VIRTIO_NET_CONFIG.size))
        assert mac == bytes.fromhex("525400123456")
        assert status == VIRTIO_NET_S_LINK_UP and pairs == 1
        assert n.dev.config_read(0, 6) == mac
    finally:
        n.close()


def test_socket_backend_offers_mac_and_status_but_no_offloads_or_mergeable_buffers():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        dev = Net(a)
        f = dev.features
        assert f >> VIRTIO_NET_F_MAC & 1 and f >> VIRTIO_NET_F_STATUS & 1 and f >> VIRTIO_F_VERSION_1 & 1
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_MRG_RXBUF):
            assert not f >> bit & 1, bit


def test_default_mac_is_random_locally_administered_unicast():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        macs = {Net(a).mac for _ in range(8)}
    assert len(macs) == 8
    assert all(m[0] & 0x03 == 0x02 for m in macs)


def test_bad_mac_queue_size_or_backend_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        with pytest.raises(VirtioError, match="MAC"):
            Net(a, mac="52:54:00:12:34")
        with pytest.raises(VirtioError, match="queue size"):
            Net(a, queue_size=100)
    with pytest.raises(VirtioError, match="file descriptor"):
        Net(object())


def test_set_link_down_clears_status_and_sends_a_config_change(nic):
    nic.dev.set_link(False)
    assert VIRTIO_NET_CONFIG.unpack(nic.dev.config_read(0, 10))[1] == 0
    assert nic.config_changes == 1
    nic.dev.set_link(True)
    assert VIRTIO_NET_CONFIG.unpack(nic.dev.config_read(0, 10))[1] == VIRTIO_NET_S_LINK_UP


class OffloadBackend:
    """A tap stand-in: a socket fd plus ``offloads()`` that records each TUNSETOFFLOAD request."""

    def __init__(self, sock, accept: bool = True):
        self.sock, self.accept, self.calls = sock, accept, []

    def fileno(self):
        return self.sock.fileno()

    def offloads(self, csum=False, tso4=False, tso6=False):
        if not self.accept and (csum or tso4 or tso6):
            raise OSError(22, "Invalid argument")
        self.calls.append((csum, tso4, tso6))


def test_tap_backend_offers_host_and_guest_offloads_and_applies_the_negotiated_ones(mem):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        be = OffloadBackend(a)
        dev = Net(be)
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_CSUM,
                    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6):
            assert dev.features >> bit & 1, bit
        assert be.calls[-1] == (False, False, False)  # probed, then left off until negotiated
        base = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
        assert not dev.ack_features(base | 1 << VIRTIO_NET_F_GUEST_TSO4)  # TSO4 needs GUEST_CSUM (§5.1.3.1)
        assert not dev.ack_features(base | 1 << VIRTIO_NET_F_HOST_TSO6)  # HOST_TSO6 needs CSUM
        assert dev.ack_features(base | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
        rx, tx = FakeDriver(mem, base=0x1000), FakeDriver(mem, base=0x3000)
        dev.activate(mem, [rx.queue(), tx.queue()], lambda i: None)
        assert be.calls[-1] == (True, True, False)
        dev.reset()
        assert be.calls[-1] == (False, False, False)


def test_tap_refusing_offloads_gets_no_guest_offload_features():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        dev = Net(OffloadBackend(a, accept=False))
        assert dev.features >> VIRTIO_NET_F_CSUM & 1  # the tap still completes what the guest sends
        assert not dev.features >> VIRTIO_NET_F_GUEST_CSUM & 1
        assert not dev.features >> VIRTIO_NET_F_GUEST_TSO4 & 1


# --- TX ---------------------------------------------------------------------------------------------------


def test_tx_writes_header_and_frame_to_the_backend_exactly_as_one_frame(nic):
    f = frame(1514, seed=3)
    head = nic.send(HDR, f[:100], f[100:])  # header and frame spread over three descriptors
    assert nic.peer.recv(70000) == HDR + f
    assert nic.dev.wait_idle(5)
    assert nic.tx.used() == [(head, 0)]
    assert TX_QUEUE in nic.notified
    assert nic.dev.stats["tx_packets"] == 1 and nic.dev.stats["tx_bytes"] == 1514


def test_tx_sends_frames_in_order_each_as_its_own_datagram(nic):
    frames = [frame(60 + 37 * i, seed=i) for i in range(5)]
    heads = []
    for f in frames:
        heads.append(nic.tx.add([HDR + f]))
    nic.tx.kick()
    nic.dev.queue_notify(TX_QUEUE)
    assert [nic.peer.recv(70000) for _ in frames] == [HDR + f for f in frames]
    assert nic.dev.wait_idle(5)
    assert nic.tx.used() == [(h, 0) for h in heads]


def test_tx_header_is_passed_through_unchanged(nic):
    hdr = VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 16, 0)  # NEEDS_CSUM with csum_start/offset
    nic.send(hdr + frame(200))
    assert nic.peer.recv(70000)[:12] == hdr


def test_tx_frame_the_backend_refuses_is_dropped_and_the_queue_goes_on(nic):
    nic.peer.close()  # the network went away: writes fail with ECONNREFUSED/EPIPE
    head = nic.send(HDR + frame(100))
    assert nic.dev.wait_idle(5)
    assert nic.tx.used() == [(head, 0)]
    assert nic.dev.stats["tx_dropped"] == 1 and not nic.dev.needs_reset


# --- RX ---------------------------------------------------------------------------------------------------


def rx_used(nic, n, timeout=5.0):
    """Used RX elements, waiting until at least ``n`` arrived (or the timeout)."""
    got = []
    wait_for(lambda: got.extend(nic.rx.used()) or len(got) >= n, timeout)
    return got


def test_rx_frame_lands_in_the_buffer_with_num_buffers_1_and_the_used_length_of_header_plus_frame(nic):
    head = nic.post_rx(12, 1526)  # Linux's layout without MRG_RXBUF: header, then the packet
    f = frame(1000, seed=9)
    nic.peer.send(VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0xBEEF) + f)  # the tap leaves num_buffers alone
    assert rx_used(nic, 1) == [(head, 12 + len(f))]
    hdr, data = nic.rx.written(head)
    assert VIRTIO_NET_HDR.unpack(hdr) == (0, 0, 0, 0, 0, 0, 1)
    assert data[:len(f)] == f and data[len(f):] == b"\xee" * (1526 - len(f))
    assert wait_for(lambda: RX_QUEUE in nic.notified)
    assert nic.dev.stats["rx_packets"] == 1 and nic.dev.stats["rx_bytes"] == len(f)


def test_rx_without_buffers_leaves_frames_waiting_until_buffers_are_added(nic):
    frames = [frame(64 + i, seed=i) for i in range(3)]
    for f in frames:
        nic.peer.send(HDR + f)
    time.sleep(0.1)
    assert nic.rx.used() == [] and nic.dev.stats["rx_dropped"] == 0
    heads = [nic.post_rx(12 + 1514)]
    got = rx_used(nic, 1)
    assert got == [(heads[0], 12 + len(frames[0]))]
    time.sleep(0.05)
    assert nic.rx.used() == []  # the other two still wait in the backend
    heads += [nic.post_rx(12 + 1514), nic.post_rx(12 + 1514)]
    got = rx_used(nic, 2)
    assert got == [(heads[1], 12 + len(frames[1])), (heads[2], 12 + len(frames[2]))]
    for h, f in zip(heads, frames):
        assert nic.rx.written(h)[0][12:12 + len(f)] == f


def test_rx_with_event_idx_asks_for_a_notification_when_it_runs_out_of_buffers(mem):
    n = Nic(mem, event_idx=True)
    try:
        n.peer.send(HDR + frame(80))
        n.peer.send(HDR + frame(81))
        h = n.post_rx(1600)
        assert rx_used(n, 1) == [(h, 12 + 80)]
        assert wait_for(lambda: n.rx.avail_event() == 1)  # avail_event: "notify me when you add buffer #2"
        h2 = n.post_rx(1600)
        assert rx_used(n, 1) == [(h2, 12 + 81)]
    finally:
        n.close()


def test_rx_frame_larger_than_the_buffer_is_dropped_and_the_buffer_serves_the_next_frame(nic):
    head = nic.post_rx(12 + 100)
    nic.peer.send(HDR + frame(500))
    assert wait_for(lambda: nic.dev.stats["rx_dropped"] == 1)
    assert nic.rx.used() == []
    nic.peer.send(HDR + frame(90, seed=5))
    assert rx_used(nic, 1) == [(head, 12 + 90)]
    assert nic.rx.written(head)[0][12:102] == frame(90, seed=5)


def test_rx_frame_shorter_than_the_header_is_dropped(nic):
    head = nic.post_rx(1600)
    nic.peer.send(b"short")
    assert wait_for(lambda: nic.dev.stats["rx_dropped"] == 1)
    nic.peer.send(HDR + frame(70))
    assert rx_used(nic, 1) == [(head, 82)]


def test_rx_many_frames_each_get_their_own_buffer_in_order(nic):
    frames = [frame(60 + i * 11, seed=i) for i in range(12)]
    heads = [nic.rx.add([], [1600]) for _ in frames]
    nic.rx.kick()
    nic.dev.queue_notify(RX_QUEUE)
    for f in frames:
        nic.peer.send(HDR + f)
    got = rx_used(nic, len(frames))
    assert got == [(h, 12 + len(f)) for h, f in zip(heads, frames)]
    assert all(nic.rx.written(h)[0][12:12 + len(f)] == f for h, f in zip(heads, frames))


# --- hostile chains ---------------------------------------------------------------------------------------


def test_tx_chain_shorter_than_the_header_sets_needs_reset(nic):
    nic.send(b"12345")
    assert nic.dev.wait_idle(5)
    assert nic.dev.needs_reset and "virtio_net_hdr" in nic.dev.reset_reason
    assert nic.config_changes == 1
    nic.peer.settimeout(0.05)
    with pytest.raises(TimeoutError):
        nic.peer.recv(100)


def test_tx_chain_with_a_device_writable_buffer_sets_needs_reset(nic):
    nic.tx.add([HDR + frame(60)], [16])
    nic.tx.kick()
    nic.dev.queue_notify(TX_QUEUE)
    assert nic.dev.wait_idle(5)
    assert nic.dev.needs_reset and "device-writable" in nic.dev.reset_reason


def test_rx_chain_too_small_for_the_header_sets_needs_reset(nic):
    nic.post_rx(8)
    nic.peer.send(HDR + frame(60))
    assert wait_for(lambda: nic.dev.needs_reset)
    assert "virtio_net_hdr" in nic.dev.reset_reason and RX_QUEUE in nic.dev.broken_queues
    assert nic.config_changes == 1


def test_rx_chain_with_readable_buffers_sets_needs_reset(nic):
    nic.rx.add([b"x" * 16], [1600])
    nic.rx.kick()
    nic.dev.queue_notify(RX_QUEUE)
    nic.peer.send(HDR + frame(60))
    assert wait_for(lambda: nic.dev.needs_reset)
    assert "device-readable" in nic.dev.reset_reason


def test_rx_descriptor_loop_sets_needs_reset_and_the_device_stays_usable_for_tx(nic):
    nic.rx.write_desc(nic.rx.desc, 0, 0x10000, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    nic.rx.write_desc(nic.rx.desc, 1, 0x10040, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
    nic.rx.place(0)
    nic.rx.kick()
    nic.dev.queue_notify(RX_QUEUE)
    nic.peer.send(HDR + frame(60))
    assert wait_for(lambda: nic.dev.needs_reset)
    assert "loops" in nic.dev.reset_reason
    nic.send(HDR + frame(77))
    assert nic.peer.recv(1000) == HDR + frame(77)


def test_rx_avail_index_far_ahead_sets_needs_reset(nic):
    nic.rx.mem.write_u16(nic.rx.avail + 2, 1000)
    nic.dev.queue_notify(RX_QUEUE)
    nic.peer.send(HDR + frame(60))
    assert wait_for(lambda: nic.dev.needs_reset)
    assert "queue size" in nic.dev.reset_reason


# --- reset and snapshots ----------------------------------------------------------------------------------


def test_reset_stops_rx_so_frames_stay_in_the_backend(nic):
    nic.dev.reset()
    nic.peer.send(HDR + frame(60))
    time.sleep(0.05)
    assert nic.ours.recv(100) == HDR + frame(60)
    assert not nic.dev.active


def test_state_and_restore_continue_rx_and_tx_where_they_were(mem):
    n = Nic(mem)
    try:
        h1 = n.post_rx(1600)
        n.post_rx(1600)
        n.peer.send(HDR + frame(61))
        assert rx_used(n, 1) == [(h1, 73)]
        n.send(HDR + frame(62))
        assert n.peer.recv(100) == HDR + frame(62)
        assert n.dev.wait_idle(5)
        s = n.dev.state()
        assert s["mac"] == "525400123456" and s["status"] == VIRTIO_NET_S_LINK_UP
        assert s["queues"][RX_QUEUE]["used_idx"] == 1 and s["queues"][TX_QUEUE]["last_avail_idx"] == 1
        n.dev.reset()
        dev2 = Net(n.ours, mac=MAC, queue_size=16)
        notified = []
        dev2.restore(s, mem, notified.append)
        n.dev = dev2
        n.peer.send(HDR + frame(63))
        got = rx_used(n, 1)
        assert got[0][1] == 75 and got[0][0] != h1
        with pytest.raises(VirtioError, match="MAC"):
            Net(n.ours, mac="52:54:00:00:00:01").restore(s, mem, notified.append)
    finally:
        n.close()


def test_state_counts_an_rx_buffer_taken_for_a_dropped_frame_as_still_available(nic):
    nic.post_rx(12 + 50)
    nic.peer.send(HDR + frame(500))  # too big: dropped, the buffer is held for the next frame
    assert wait_for(lambda: nic.dev.stats["rx_dropped"] == 1)
    assert nic.dev.state()["queues"][RX_QUEUE]["last_avail_idx"] == 0

"""virtio-vsock (VIRTIO 1.2 §5.10) with Firecracker's hybrid Unix-socket host side, driven as Linux's
virtio_transport drives it: host- and guest-initiated connections, data both ways under credit flow control,
shutdown and close, RST cases, many connections, the event queue, and random hostile packets."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.virtio import vsock as vs
from popek.devices.virtio.device import VirtioError
from popek.devices.virtio.vsock import (CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, EVENT_QUEUE, RX_QUEUE, TX_QUEUE,
                                        VIRTIO_ID_VSOCK, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_HDR,
                                        VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                                        VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST,
                                        VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV,
                                        VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST,
                                        Vsock)
from popek.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from popek.memory import GuestMemory
from polling import wait_for
from test_virtqueue import FakeDriver

CID = 3
HDR = VIRTIO_VSOCK_HDR.size
RX_BUF = 4096  # Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


class Packet:
    """A decoded virtio_vsock_hdr plus payload."""

    def __init__(self, raw: bytes):
        (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op, self.flags,
         self.buf_alloc, self.fwd_cnt) = VIRTIO_VSOCK_HDR.unpack(raw[:HDR])
        self.data = raw[HDR:HDR + self.len]

    def __repr__(self):
        return f"Packet(op={self.op}, {self.src_port}->{self.dst_port}, len={self.len}, flags={self.flags})"


class Guest:
    """Linux's virtio_transport side of the three queues: RX buffers of a 44-byte header descriptor plus a
    4096-byte payload descriptor (refilled as they are used, at the same addresses), TX packets as header +
    payload, 4-byte event buffers."""

    def __init__(self, dev: Vsock, mem: GuestMemory, rx_buffers: int = 16):
        self.dev, self.mem = dev, mem
        self.rxd = FakeDriver(mem, size=64, base=0x1000, heap=0x100000)
        self.txd = FakeDriver(mem, size=64, base=0x3000, heap=0x1000000)
        self.evd = FakeDriver(mem, size=8, base=0x5000, heap=0x80000)
        self.notified: list[int] = []
        self.config_changes = 0
        assert dev.ack_features(dev.features)
        dev.activate(mem, [self.rxd.queue(), self.txd.queue(), self.evd.queue()], self.notified.append,
                     self._changed)
        self.rx_bufs: dict[int, tuple[int, int]] = {}
        self.pending: list[Packet] = []
        self.refill = True
        self.spare: list[tuple[int, int]] = []  # re-post RX buffers as soon as they are used, as Linux's rx work does
        for _ in range(rx_buffers):
            self.post_rx(self.rxd.alloc(HDR), self.rxd.alloc(RX_BUF))
        self.kick_rx()

    def _changed(self):
        self.config_changes += 1

    def post_rx(self, hdr_gpa: int, buf_gpa: int) -> None:
        a, b = self.rxd.take(), self.rxd.take()
        self.rxd.write_desc(self.rxd.desc, a, hdr_gpa, HDR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, b)
        self.rxd.write_desc(self.rxd.desc, b, buf_gpa, RX_BUF, VIRTQ_DESC_F_WRITE)
        self.rx_bufs[a] = (hdr_gpa, buf_gpa)
        self.rxd.place(a)

    def kick_rx(self) -> None:
        self.rxd.kick()
        self.dev.queue_notify(RX_QUEUE)

    def send(self, src_port: int, dst_port: int, op: int, data: bytes = b"", flags: int = 0,
             buf_alloc: int = 256 * 1024, fwd_cnt: int = 0, src_cid: int = CID, dst_cid: int = VMADDR_CID_HOST,
             type_: int = VIRTIO_VSOCK_TYPE_STREAM, length: int | None = None) -> None:
        hdr = VIRTIO_VSOCK_HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data) if length is None else length,
                                    type_, op, flags, buf_alloc, fwd_cnt)
        self.txd.add([hdr, data] if data else [hdr])
        self.txd.kick()
        self.dev.queue_notify(TX_QUEUE)

    def poll(self) -> list[Packet]:
        """Packets the device has put in RX buffers since the last look; their buffers are re-posted."""
        got = []
        for head, n in self.rxd.used():
            hdr_gpa, buf_gpa = self.rx_bufs.pop(head)
            raw = self.mem.read(hdr_gpa, HDR) + self.mem.read(buf_gpa, RX_BUF)
            p = Packet(raw)
            assert n == HDR + p.len, (n, p)  # Linux drops packets whose used len disagrees
            assert (p.src_cid, p.dst_cid, p.type) == (VMADDR_CID_HOST, CID, VIRTIO_VSOCK_TYPE_STREAM)
            got.append(p)
            if self.refill:
                self.post_rx(hdr_gpa, buf_gpa)
            else:
                self.spare.append((hdr_gpa, buf_gpa))
        if got and self.refill:
            self.kick_rx()
        return got

    def recv(self, timeout: float = 5.0, op: int | None = None) -> Packet:
        """The next packet (of ``op`` if given; others are kept for later)."""
        end = time.monotonic() + timeout
        while True:
            self.pending += self.poll()
            for i, p in enumerate(self.pending):
                if op is None or p.op == op:
                    return self.pending.pop(i)
            if time.monotonic() > end:
                raise AssertionError(f"no packet with op {op}; have {self.pending}")
            time.sleep(0.002)

    def quiet(self, wait: float = 0.1) -> list[Packet]:
        time.sleep(wait)
        self.pending += self.poll()
        out, self.pending = self.pending, []
        return out

    def post_events(self, n: int = 2) -> list[int]:
        heads = [self.evd.add([], [4], fill=0xEE) for _ in range(n)]
        self.evd.kick()
        self.dev.queue_notify(EVENT_QUEUE)
        return heads


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x4000000)]) as m:
        yield m


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def dev(uds):
    d = Vsock(CID, uds, queue_size=64)
    yield d
    d.close()


@pytest.fixture
def guest(dev, mem):
    return Guest(dev, mem)


def host_connect(uds: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port)
    return s


def read_line(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        line += c
    return line


def open_from_host(guest: Guest, uds: str, port: int, buf_alloc: int = 256 * 1024):
    """Host connects, the guest (listening on ``port``) accepts; returns (host socket, device-side port)."""
    s = host_connect(uds, port)
    req = guest.recv(op=VIRTIO_VSOCK_OP_REQUEST)
    assert req.dst_port == port
    guest.send(port, req.src_port, VIRTIO_VSOCK_OP_RESPONSE, buf_alloc=buf_alloc)
    assert read_line(s) == b"OK %d\n" % req.src_port
    return s, req.src_port


# --- configuration ----------------------------------------------------------------------------------------


def test_config_holds_the_guest_cid_and_no_feature_bits_are_offered(dev):
    assert dev.device_id == VIRTIO_ID_VSOCK == 19
    assert struct.unpack("<Q", dev.config_read(0, 8))[0] == CID
    assert dev.features & 0xFF_FFFF == 0  # no device-specific bits (0-23): stream only, F_STREAM implied
    assert os.path.exists(dev.uds_path)


def test_bad_cid_or_an_existing_path_is_refused(uds, tmp_path):
    with pytest.raises(VirtioError, match="CID"):
        Vsock(2, uds)
    with pytest.raises(VirtioError, match="CID"):
        Vsock(0xFFFF_FFFF, uds)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(VirtioError, match="already exists"):
        Vsock(CID, tmp_path / "taken")
    with pytest.raises(VirtioError, match="too long"):
        Vsock(CID, tmp_path / ("x" * 120))


def test_close_removes_the_listening_socket(uds):
    d = Vsock(CID, uds)
    d.close()
    assert not os.path.exists(uds)
    d.close()


# --- host-initiated connections ---------------------------------------------------------------------------


def test_host_connect_sends_request_and_the_guest_response_gives_ok_with_the_local_port(guest, uds):
    s = host_connect(uds, 52)
    req = guest.recv()
    assert (req.op, req.dst_port, req.src_port, req.len) == (VIRTIO_VSOCK_OP_REQUEST, 52, 1024, 0)
    assert req.buf_alloc == CONN_BUF_SIZE and req.fwd_cnt == 0
    assert RX_QUEUE in guest.notified
    guest.send(52, 1024, VIRTIO_VSOCK_OP_RESPONSE)
    assert read_line(s) == b"OK 1024\n"
    s.close()


def test_host_to_guest_and_guest_to_host_data_round_trip(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    s.sendall(b"ping from host")
    p = guest.recv(op=VIRTIO_VSOCK_OP_RW)
    assert (p.src_port, p.dst_port, p.data) == (port, 52, b"ping from host")
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"pong from guest", fwd_cnt=p.len)
    assert s.recv(100) == b"pong from guest"
    s.close()


def test_bytes_sent_right_after_the_connect_line_reach_the_guest_after_the_response(guest, uds):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(uds)
    s.sendall(b"CONNECT 7\nearly bytes")
    req = guest.recv(op=VIRTIO_VSOCK_OP_REQUEST)
    assert not [p for p in guest.quiet(0.05) if p.op == VIRTIO_VSOCK_OP_RW]  # nothing before RESPONSE
    guest.send(7, req.src_port, VIRTIO_VSOCK_OP_RESPONSE)
    assert read_line(s) == b"OK %d\n" % req.src_port
    assert guest.recv(op=VIRTIO_VSOCK_OP_RW).data == b"early bytes"
    s.close()


def test_guest_rst_to_the_request_closes_the_host_socket_without_ok(guest, uds):
    s = host_connect(uds, 99)
    req = guest.recv(op=VIRTIO_VSOCK_OP_REQUEST)
    guest.send(99, req.src_port, VIRTIO_VSOCK_OP_RST)
    assert s.recv(100) == b""


def test_no_response_within_the_timeout_closes_the_host_socket_and_resets_the_guest(guest, uds, monkeypatch):
    monkeypatch.setattr(vs, "CONNECT_TIMEOUT", 0.2)
    s = host_connect(uds, 99)
    req = guest.recv(op=VIRTIO_VSOCK_OP_REQUEST)
    assert s.recv(100) == b""
    rst = guest.recv(op=VIRTIO_VSOCK_OP_RST)
    assert (rst.src_port, rst.dst_port) == (req.src_port, 99)


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 52\n", b"CONNECT 99999999999\n", b"CONNECT " + b"1" * 40])
def test_a_bad_connect_line_closes_the_host_socket_and_sends_nothing_to_the_guest(guest, uds, line):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(uds)
    s.sendall(line)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:  # bytes past what the device looked at were still unread when it closed
        assert len(line) > 32
    assert guest.quiet(0.05) == []


def test_host_client_that_never_sends_a_connect_line_is_dropped(guest, uds, monkeypatch):
    monkeypatch.setattr(vs, "CONNECT_TIMEOUT", 0.2)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(uds)
    assert s.recv(100) == b""


def test_many_host_connections_get_distinct_ports_and_keep_their_streams_apart(guest, uds):
    socks = {}
    for i in range(20):
        s, port = open_from_host(guest, uds, 1000 + i)
        socks[port] = (s, 1000 + i)
    assert sorted(socks) == list(range(1024, 1044))
    for port, (s, gport) in socks.items():
        s.sendall(b"to guest port %d" % gport)
    got = {}
    while len(got) < 20:
        p = guest.recv(op=VIRTIO_VSOCK_OP_RW)
        got[p.src_port] = (p.dst_port, p.data)
    for port, (s, gport) in socks.items():
        assert got[port] == (gport, b"to guest port %d" % gport)
        guest.send(gport, port, VIRTIO_VSOCK_OP_RW, b"reply %d" % port)
    for port, (s, gport) in socks.items():
        assert s.recv(100) == b"reply %d" % port
        s.close()


# --- guest-initiated connections --------------------------------------------------------------------------


def listen_at(path: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(5)
    return srv


def test_guest_request_connects_to_the_uds_port_listener_and_gets_a_response(guest, uds):
    srv = listen_at(f"{uds}_8000")
    guest.send(5000, 8000, VIRTIO_VSOCK_OP_REQUEST)
    conn, _ = srv.accept()
    resp = guest.recv()
    assert (resp.op, resp.src_port, resp.dst_port) == (VIRTIO_VSOCK_OP_RESPONSE, 8000, 5000)
    assert resp.buf_alloc == CONN_BUF_SIZE
    guest.send(5000, 8000, VIRTIO_VSOCK_OP_RW, b"hello host")
    conn.settimeout(5)
    assert conn.recv(100) == b"hello host"
    conn.sendall(b"hello guest")
    p = guest.recv(op=VIRTIO_VSOCK_OP_RW)
    assert (p.src_port, p.dst_port, p.data) == (8000, 5000, b"hello guest")
    conn.close()
    srv.close()


def test_guest_request_to_a_port_nobody_listens_on_gets_rst(guest, uds):
    guest.send(5001, 8001, VIRTIO_VSOCK_OP_REQUEST)
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 8001, 5001)


def test_packets_for_unknown_connections_get_rst_but_an_rst_gets_nothing(guest):
    guest.send(6000, 6001, VIRTIO_VSOCK_OP_RW, b"stray")
    rst = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 6001, 6000)
    guest.send(6000, 6001, VIRTIO_VSOCK_OP_RST)
    assert guest.quiet(0.05) == []


def test_packets_with_a_wrong_cid_are_dropped(guest):
    guest.send(6000, 6001, VIRTIO_VSOCK_OP_REQUEST, src_cid=CID + 1)
    guest.send(6000, 6001, VIRTIO_VSOCK_OP_REQUEST, dst_cid=7)
    assert guest.quiet(0.05) == []
    assert not guest.dev.needs_reset


def test_a_second_request_on_an_open_connection_resets_it(guest, uds):
    srv = listen_at(f"{uds}_8002")
    guest.send(5002, 8002, VIRTIO_VSOCK_OP_REQUEST)
    conn, _ = srv.accept()
    assert guest.recv().op == VIRTIO_VSOCK_OP_RESPONSE
    guest.send(5002, 8002, VIRTIO_VSOCK_OP_REQUEST)
    assert guest.recv().op == VIRTIO_VSOCK_OP_RST
    conn.settimeout(5)
    assert conn.recv(10) == b""
    srv.close()


# --- credit flow control ----------------------------------------------------------------------------------


def test_device_never_sends_more_than_the_guest_credit_and_resumes_on_credit_update(guest, uds):
    credit = 10000
    s, port = open_from_host(guest, uds, 52, buf_alloc=credit)
    payload = bytes(i * 7 & 0xFF for i in range(100_000))
    threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
    received = bytearray()
    fwd = rounds = 0
    while len(received) < len(payload):
        while len(received) - fwd < credit and len(received) < len(payload):
            received += guest.recv(op=VIRTIO_VSOCK_OP_RW).data
            assert len(received) - fwd <= credit  # in flight never exceeds buf_alloc - (tx_cnt - fwd_cnt)
        assert guest.quiet(0.05) == []  # out of credit: the device waits for the guest
        fwd = len(received)  # the guest application consumed it all and says so
        guest.send(52, port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=credit, fwd_cnt=fwd)
        rounds += 1
    assert bytes(received) == payload and rounds == -(-len(payload) // credit)
    s.close()


def test_guest_to_host_data_brings_credit_updates_with_the_forwarded_count(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    chunk = b"g" * 4096
    total = 0
    for _ in range(CREDIT_UPDATE_THRESHOLD // len(chunk) + 2):
        guest.send(52, port, VIRTIO_VSOCK_OP_RW, chunk)
        total += len(chunk)
    got = 0
    while got < total:
        chunk = s.recv(65536)
        assert chunk, f"EOF after {got} of {total} bytes"
        got += len(chunk)
    upd = guest.recv(op=VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    assert upd.buf_alloc == CONN_BUF_SIZE and CREDIT_UPDATE_THRESHOLD <= upd.fwd_cnt <= total
    s.close()


def test_a_slow_host_reader_gets_everything_the_guest_sent_within_its_credit(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    data = bytes(range(256)) * 16  # 4096
    sent = 0
    for _ in range(CONN_BUF_SIZE // len(data)):  # all the credit: more than the socket takes, the device buffers
        guest.send(52, port, VIRTIO_VSOCK_OP_RW, data)
        sent += len(data)
        assert guest.dev.wait_idle(5)
    got = bytearray()
    while len(got) < sent:
        got += s.recv(1 << 20)
    assert bytes(got) == data * (sent // len(data))
    assert not [p for p in guest.quiet(0.05) if p.op == VIRTIO_VSOCK_OP_RST]
    s.close()


def test_guest_overrunning_the_device_credit_gets_rst(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    s.setblocking(False)  # the host never reads: everything past the socket buffer piles up in the device
    chunk = b"x" * 4096
    for _ in range(CONN_BUF_SIZE // len(chunk) * 4):
        guest.send(52, port, VIRTIO_VSOCK_OP_RW, chunk)
        assert guest.dev.wait_idle(5)
        if any(p.op == VIRTIO_VSOCK_OP_RST for p in guest.quiet(0)):
            break
    else:
        raise AssertionError("no RST although the guest sent far beyond buf_alloc")
    s.close()


def test_credit_request_is_answered_with_a_credit_update(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"abc")
    assert s.recv(10) == b"abc"
    guest.send(52, port, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    upd = guest.recv(op=VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    assert (upd.src_port, upd.dst_port, upd.fwd_cnt, upd.buf_alloc) == (port, 52, 3, CONN_BUF_SIZE)
    s.close()


# --- shutdown and close -----------------------------------------------------------------------------------


def test_guest_shutdown_send_gives_the_host_eof_but_host_data_still_flows(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"last words")
    guest.send(52, port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert s.recv(100) == b"last words"
    assert s.recv(100) == b""
    s.sendall(b"still here")
    assert guest.recv(op=VIRTIO_VSOCK_OP_RW).data == b"still here"
    s.close()  # now both directions are done: the connection ends with RST
    shut = guest.recv(op=VIRTIO_VSOCK_OP_SHUTDOWN)
    assert shut.flags == VIRTIO_VSOCK_SHUTDOWN_SEND
    assert guest.recv(op=VIRTIO_VSOCK_OP_RST).src_port == port


def test_guest_close_flushes_then_closes_the_host_socket_and_answers_rst(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"bye")
    guest.send(52, port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    assert s.recv(100) == b"bye"
    assert s.recv(100) == b""
    rst = guest.recv(op=VIRTIO_VSOCK_OP_RST)
    assert (rst.src_port, rst.dst_port) == (port, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"late")  # the connection is gone now
    assert guest.recv(op=VIRTIO_VSOCK_OP_RST).src_port == port


def test_host_close_sends_shutdown_send_to_the_guest(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    s.sendall(b"tail")
    s.close()
    assert guest.recv(op=VIRTIO_VSOCK_OP_RW).data == b"tail"
    shut = guest.recv(op=VIRTIO_VSOCK_OP_SHUTDOWN)
    assert (shut.src_port, shut.flags) == (port, VIRTIO_VSOCK_SHUTDOWN_SEND)
    guest.send(52, port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)  # Linux closes its side in turn
    assert guest.recv(op=VIRTIO_VSOCK_OP_RST).src_port == port


def test_guest_shutdown_rcv_stops_host_data_reaching_the_guest(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_RCV)
    assert guest.dev.wait_idle(5)
    s.sendall(b"unwanted")
    assert [p for p in guest.quiet(0.1) if p.op == VIRTIO_VSOCK_OP_RW] == []
    guest.send(52, port, VIRTIO_VSOCK_OP_RW, b"guest may still send")
    assert s.recv(100) == b"guest may still send"
    s.close()


def test_guest_rst_closes_the_host_socket(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.send(52, port, VIRTIO_VSOCK_OP_RST)
    assert s.recv(100) == b""
    assert guest.quiet(0.05) == []


# --- RX buffers, events, reset, snapshots -----------------------------------------------------------------


def test_without_rx_buffers_host_data_waits_and_arrives_when_buffers_are_posted(dev, mem, uds):
    g = Guest(dev, mem, rx_buffers=1)
    g.refill = False
    s, port = open_from_host(g, uds, 52)  # the REQUEST took the only buffer
    for i in range(5):
        s.sendall(b"msg%d;" % i)
    assert g.quiet(0.1) == []
    g.post_rx(*g.spare.pop())
    g.kick_rx()
    data = g.recv(op=VIRTIO_VSOCK_OP_RW).data
    while len(data) < 25:  # one buffer at a time, as the guest hands them out
        assert g.quiet(0.02) == []
        g.post_rx(*g.spare.pop())
        g.kick_rx()
        data += g.recv(op=VIRTIO_VSOCK_OP_RW).data
    assert data == b"msg0;msg1;msg2;msg3;msg4;"
    s.close()


def test_transport_reset_closes_connections_and_sends_the_event(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    (h,) = guest.post_events(1)
    guest.dev.transport_reset()
    assert s.recv(100) == b""
    assert wait_for(lambda: guest.evd.used() == [(h, 4)])
    assert struct.unpack("<I", guest.evd.written(h)[0])[0] == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET


def test_event_waits_for_an_event_buffer(guest):
    guest.dev.transport_reset()
    time.sleep(0.05)
    (h,) = guest.post_events(1)
    assert wait_for(lambda: guest.evd.used() == [(h, 4)])


def test_restore_sends_transport_reset_and_the_device_serves_new_connections(guest, uds, mem, tmp_path):
    s, port = open_from_host(guest, uds, 52)
    (h,) = guest.post_events(1)
    assert guest.dev.wait_idle(5)
    state = guest.dev.state()
    assert state["guest_cid"] == CID and len(state["queues"]) == 3
    guest.dev.reset()
    assert s.recv(100) == b""  # connections do not survive
    uds2 = str(tmp_path / "v2.sock")
    dev2 = Vsock(CID, uds2, queue_size=64)
    try:
        notified = []
        dev2.restore(state, mem, notified.append)
        guest.dev = dev2
        assert wait_for(lambda: guest.evd.used() == [(h, 4)])
        s2, port2 = open_from_host(guest, uds2, 53)
        s2.sendall(b"after restore")
        assert guest.recv(op=VIRTIO_VSOCK_OP_RW).data == b"after restore"
        s2.close()
    finally:
        dev2.close()


def test_reset_closes_host_connections_and_stops_the_device(guest, uds):
    s, port = open_from_host(guest, uds, 52)
    guest.dev.reset()
    assert s.recv(100) == b""
    assert not guest.dev.active
    s2 = host_connect(uds, 53)  # the listener stays: the client waits in the backlog for the next activation
    s2.close()


# --- hostile drivers --------------------------------------------------------------------------------------


def test_tx_chain_shorter_than_the_header_sets_needs_reset(guest):
    guest.txd.add([b"\x01" * 20])
    guest.txd.kick()
    guest.dev.queue_notify(TX_QUEUE)
    assert wait_for(lambda: guest.dev.needs_reset)
    assert "virtio_vsock_hdr" in guest.dev.reset_reason and guest.config_changes == 1


def test_rx_chain_without_room_for_a_payload_sets_needs_reset(dev, mem):
    g = Guest(dev, mem, rx_buffers=0)
    g.rxd.add([], [HDR])
    g.kick_rx()
    g.send(6000, 6001, VIRTIO_VSOCK_OP_RW, b"stray")  # the RST needs an RX buffer
    assert wait_for(lambda: dev.needs_reset)
    assert RX_QUEUE in dev.broken_queues


def test_event_chain_too_small_sets_needs_reset(guest):
    guest.evd.add([], [2])
    guest.evd.kick()
    guest.dev.queue_notify(EVENT_QUEUE)
    guest.dev.transport_reset()
    assert wait_for(lambda: guest.dev.needs_reset)
    assert EVENT_QUEUE in guest.dev.broken_queues


OPS = st.sampled_from(list(range(0, 9)) + [0xFFFF])
PORTS = st.sampled_from([0, 52, 1024, 1025, 8000, 0xFFFF_FFFF]) | st.integers(0, 0xFFFF_FFFF)


def test_random_hostile_headers_never_crash_the_device(dev, mem, uds):
    g = Guest(dev, mem)
    srv = listen_at(f"{uds}_8000")
    srv.setblocking(False)
    host, _ = open_from_host(g, uds, 52)
    host.setblocking(False)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from([CID, CID + 1, 0, 2]), st.sampled_from([2, 2, CID, 0xFFFF_FFFF]),
                              PORTS, st.sampled_from([8000, 52, 1024]) | PORTS, OPS,
                              st.sampled_from([1, 1, 2, 0]), st.integers(0, 0xFFFF_FFFF),
                              st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF),
                              st.binary(max_size=64), st.none() | st.integers(0, 0xFFFF_FFFF)),
                    min_size=1, max_size=8))
    def run(packets):
        for src_cid, dst_cid, sport, dport, op, type_, flags, buf_alloc, fwd_cnt, data, length in packets:
            g.send(sport, dport, op, data, flags=flags, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt, src_cid=src_cid,
                   dst_cid=dst_cid, type_=type_, length=length)
        assert dev.wait_idle(5)
        g.poll()
        try:
            while host.recv(65536):  # keep the host side drained
                pass
        except OSError:
            pass
        try:
            while True:
                srv.accept()[0].close()
        except OSError:
            pass
        assert dev._loop.is_alive() and not dev.needs_reset

    run()
    s2, _ = open_from_host(g, uds, 77)  # still serving
    s2.close()
    srv.close()

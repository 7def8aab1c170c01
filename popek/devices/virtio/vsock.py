"""virtio-vsock (OASIS VIRTIO 1.2 §5.10) in the VMM, host side as Unix sockets in Firecracker's hybrid protocol."""

from __future__ import annotations

import collections
import logging
import os
import re
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from popek.devices.virtio.device import VirtioDevice, VirtioError
from popek.devices.virtio.queue import DescriptorChain, VirtqueueError
from popek.memory import GuestMemory

log = logging.getLogger(__name__)

#: §5.10.1 device ID.
VIRTIO_ID_VSOCK = 19
#: The host's CID (VMADDR_CID_HOST, <linux/vm_sockets.h>); guest CIDs start at 3.
VMADDR_CID_HOST = 2
#: §5.10.6 struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc,
#: fwd_cnt (44 bytes, little endian, packed).
VIRTIO_VSOCK_HDR = struct.Struct("<QQIIIHHIII")
#: §5.10.4 struct virtio_vsock_config: guest_cid.
VIRTIO_VSOCK_CONFIG = struct.Struct("<Q")
#: §5.10.6.4 struct virtio_vsock_event: id.
VIRTIO_VSOCK_EVENT = struct.Struct("<I")
VIRTIO_VSOCK_TYPE_STREAM = 1
# §5.10.6 op values.
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
# §5.10.6.6 SHUTDOWN flags: the sender will receive / send no more.
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
#: §5.10.6.4 event id.
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
#: Queue indices (§5.10.2).
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2

#: buf_alloc this device advertises per connection: bytes from the guest it buffers for a slow host socket.
CONN_BUF_SIZE = 256 * 1024
#: Forwarded-but-unreported bytes after which a CREDIT_UPDATE is sent to the guest.
CREDIT_UPDATE_THRESHOLD = 64 * 1024
#: Largest payload put in one RW packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_PAYLOAD = 64 * 1024
#: Seconds a host client has to send its CONNECT line, and the guest to answer a REQUEST (Firecracker: 2 s).
CONNECT_TIMEOUT = 2.0
#: Seconds to flush data to the host after the guest closed, before giving up (Linux VSOCK_CLOSE_TIMEOUT).
CLOSE_TIMEOUT = 8.0
#: First local port given to host-initiated connections.
EPHEMERAL_PORT_START = 1024
#: Control packets waiting for RX buffers after which the TX queue is left alone until they drain.
MAX_PENDING_CTRL = 1024
_CONNECT_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_CONNECT_LINE_MAX = 32
_U32 = 0xFFFF_FFFF


@dataclass(eq=False)
class _Conn:
    """One stream between a host Unix socket and a guest port; ports are (local = host side, peer = guest)."""

    local_port: int
    peer_port: int
    sock: socket.socket
    established: bool  # False: host-initiated, REQUEST sent, waiting for the guest's RESPONSE
    deadline: float | None = None
    to_host: bytearray = field(default_factory=bytearray)  # guest data not yet written to the host socket
    fwd_cnt: int = 0  # bytes of guest data written to the host socket (u32)
    last_fwd_cnt_sent: int = 0  # fwd_cnt as last told to the guest
    tx_cnt: int = 0  # bytes sent to the guest (u32)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    guest_shut: int = 0  # SHUTDOWN flags received from the guest
    host_eof: bool = False  # the host socket's read side ended; SHUTDOWN(SEND) queued to the guest
    host_shut_wr: bool = False  # we shut the host socket's write side after the guest's SHUTDOWN(SEND)
    credit_update_queued: bool = False
    events: int = 0  # selector mask currently registered

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_credit(self) -> int:
        """Bytes the guest can still take (§5.10.6.3: buf_alloc - (tx_cnt - fwd_cnt)), never negative."""
        return max(self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32), 0)


class Vsock(VirtioDevice):
    """A virtio socket device (§5.10, device ID 19) with the host side in Firecracker's hybrid vsock protocol.

    Only stream sockets (no feature bits: VIRTIO_VSOCK_F_STREAM is implied). The guest's CID is in the
    configuration space; the host is CID 2.

    Host-initiated: a host program connects to the Unix socket ``uds_path`` and writes ``CONNECT <port>\\n``; the
    device takes a local port (counting up from 1024), sends REQUEST to guest port ``<port>``, and on the guest's
    RESPONSE writes ``OK <local port>\\n`` to the host program; from then on the socket is the stream. A guest RST,
    no RESPONSE within CONNECT_TIMEOUT, or a bad CONNECT line closes the host socket.
    Guest-initiated: a REQUEST to host port P connects to the Unix socket ``<uds_path>_<P>``; RESPONSE if it
    accepts, RST if nothing listens there.

    Data (RW) flows both ways with §5.10.6.3 credit flow control: the device never sends more than the guest's
    buf_alloc - (tx_cnt - fwd_cnt); it advertises CONN_BUF_SIZE and buffers up to that much for a slow host
    socket, counts fwd_cnt as bytes written to it and sends CREDIT_UPDATE after CREDIT_UPDATE_THRESHOLD bytes (and
    when the guest sends CREDIT_REQUEST). A guest that overruns its credit gets RST. Shutdown: guest
    SHUTDOWN(SEND) shuts the host socket's write side once buffered data is written; SHUTDOWN(RCV) stops reading
    it; both (the guest closed) flush and close it, then RST (what Linux waits for). EOF from the host socket
    sends SHUTDOWN(SEND); when both directions are shut the connection ends with RST. Host socket errors and
    packets for unknown connections get RST; host sockets of a reset connection are closed.

    One thread (started at activation) serves the three queues and every socket with a selector; it reads
    a host socket only while the guest has credit and an RX buffer is available (``recvmsg_into`` straight into
    the buffer). A chain that breaks the framing (TX: fewer than 44 readable bytes; RX: no writable bytes past
    the 44-byte header, or readable buffers; event: fewer than 4 writable bytes) stops that queue with
    DEVICE_NEEDS_RESET; hostile header values never do. ``reset()`` closes all connections; ``restore()`` (connections cannot
    migrate) and ``transport_reset()`` close them and send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue.

    :param guest_cid: the guest's context ID, 3..0xFFFFFFFE.
    :param uds_path: path of the listening Unix socket; must not exist yet. ``close()`` removes it.
    :param queue_size: maximum size of each queue (a power of 2).
    :raises VirtioError: for a bad CID, an existing path, a path too long for a Unix socket, or bind failures.
    """

    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, guest_cid: int, uds_path: str | os.PathLike, queue_size: int = 256):
        if not 3 <= guest_cid <= 0xFFFF_FFFE:
            raise VirtioError(f"virtio-vsock: guest CID {guest_cid} is not in 3..0xFFFFFFFE (0-2 are reserved)")
        self.guest_cid, self.uds_path = guest_cid, os.fspath(uds_path)
        if len(os.fsencode(self.uds_path)) + 11 > 107:  # room for "_<u32 port>" in sun_path (108 bytes)
            raise VirtioError(f"virtio-vsock: socket path {self.uds_path!r} is too long for a Unix socket")
        if os.path.lexists(self.uds_path):
            raise VirtioError(f"virtio-vsock: {self.uds_path!r} already exists (a stale socket? remove it)")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                       | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(self.uds_path)
            self._listener.listen(128)
        except OSError as e:
            self._listener.close()
            raise VirtioError(f"virtio-vsock: cannot listen on {self.uds_path!r}: {e.strerror}") from e
        super().__init__(0, VIRTIO_VSOCK_CONFIG.pack(guest_cid), [queue_size] * 3)
        self._lock = threading.Lock()  # held by the loop while it handles events; state() takes it too
        self._lock_owner: int | None = None
        self._idle = threading.Condition()  # guards _kicks and _loop_busy
        self._kicks: set[int] = set()
        self._loop_busy = False
        self._loop: threading.Thread | None = None
        self._loop_stop = False
        self._wake = -1
        self._init_state()

    def _init_state(self) -> None:
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._handshakes: dict[socket.socket, float] = {}  # host clients yet to send CONNECT, with deadline
        self._readable: set[_Conn] = set()
        self._ctrl: collections.deque[tuple[int, int, int, int]] = collections.deque()  # local, peer, op, flags
        self._events: collections.deque[int] = collections.deque()
        self._rx_chain: DescriptorChain | None = None  # popped, not yet filled
        self._rx_starved = self._event_starved = False
        self._tx_pending = True
        self._next_port = EPHEMERAL_PORT_START
        self._used: set[int] = set()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues, notify: Callable[[int], None],
                 config_changed: Callable[[], None] | None = None) -> None:
        """As ``VirtioDevice.activate``; starts the device's socket/queue thread."""
        super().activate(mem, queues, notify, config_changed)
        self._init_state()
        self._loop_stop = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop = threading.Thread(target=self._run_loop, name=f"{self.name}-loop", daemon=True)
        self._loop.start()

    def queue_notify(self, index: int) -> None:
        """Available buffer notification for queue ``index``: wakes the device thread (ignored when inactive)."""
        with self._idle:
            if self._loop is None or not 0 <= index < 3:
                return
            self._kicks.add(index)
            os.eventfd_write(self._wake, 1)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the device thread has handled every queue notification; False on timeout (seconds)."""
        if self._lock_owner == threading.get_ident():
            return True  # called from state(): the loop is paused between two events
        with self._idle:
            return self._idle.wait_for(lambda: not (self._kicks and self._loop) and not self._loop_busy, timeout)

    def reset(self) -> None:
        """As ``VirtioDevice.reset``; stops the device thread and closes every host connection."""
        loop = self._loop
        if loop is not None:
            with self._idle:
                self._loop_stop = True
                os.eventfd_write(self._wake, 1)
            if loop is not threading.current_thread():
                loop.join()
            with self._idle:  # queue_notify writes the eventfd under this lock
                os.close(self._wake)
                self._loop, self._wake, self._kicks, self._loop_busy = None, -1, set(), False
                self._idle.notify_all()
        super().reset()

    def transport_reset(self) -> None:
        """Close every connection and send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.4): the guest then drops
        all its sockets and re-reads guest_cid. Does nothing when inactive."""
        with self._lock, self._idle:
            if self._loop is None:
                return
            self._drop_all()
            self._ctrl.clear()
            self._events.append(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            self._event_starved = False
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Reset the device, close the listening socket and remove ``uds_path``."""
        self.reset()
        if self._listener.fileno() >= 0:
            self._listener.close()
            try:
                os.unlink(self.uds_path)
            except FileNotFoundError:
                pass

    # --- snapshot -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """As ``VirtioDevice.state`` (taken with the device thread paused) plus guest_cid. Connections are not
        part of it: they cannot move with the VM. An RX buffer taken but not yet filled is recorded as still
        available."""
        self.wait_idle()
        with self._lock:
            self._lock_owner = threading.get_ident()
            try:
                s = super().state()
            finally:
                self._lock_owner = None
            if self._rx_chain is not None and s["queues"]:
                rx = s["queues"][RX_QUEUE]
                rx["last_avail_idx"] = (rx["last_avail_idx"] - 1) & 0xFFFF
            return {**s, "guest_cid": self.guest_cid}

    def restore(self, state: dict, *args, **kwargs) -> None:
        """As ``VirtioDevice.restore``, then ``transport_reset()``: the guest learns its connections are gone.

        The guest CID stays this device's (the guest re-reads it after the event).
        """
        super().restore(state, *args, **kwargs)
        self.transport_reset()

    # --- the device thread ----------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake, selectors.EVENT_READ, "wake")
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel = sel
        try:
            while True:
                with self._lock:
                    self._update_interest()
                    timeout = self._next_deadline()
                events = sel.select(None if timeout is None else max(timeout - time.monotonic(), 0))
                with self._lock:
                    with self._idle:  # drain the eventfd, then look: a later kick or stop writes it again
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        if self._loop_stop:
                            return
                        kicks, self._kicks, self._loop_busy = self._kicks, set(), True
                    try:
                        self._handle(events, kicks)
                    except Exception:  # a device bug must not kill the thread silently
                        log.exception("virtio-vsock: internal error in the device thread")
                    finally:
                        with self._idle:
                            self._loop_busy = False
                            self._idle.notify_all()
        finally:
            with self._lock:
                self._drop_all()
                for s in list(self._handshakes):
                    s.close()
                self._handshakes.clear()
            sel.close()

    def _handle(self, events, kicks: set[int]) -> None:
        if RX_QUEUE in kicks:
            self._rx_starved = False
        if TX_QUEUE in kicks:
            self._tx_pending = True
        if EVENT_QUEUE in kicks:
            self._event_starved = False
        for key, mask in events:
            what = key.data
            if what == "wake":
                continue  # drained by the loop
            if what == "listen":
                self._accept()
            elif isinstance(what, _Conn):
                if self._conns.get(what.key) is not what:
                    continue  # closed while handling an earlier event of this batch
                if mask & selectors.EVENT_WRITE:
                    self._flush(what)
                if mask & selectors.EVENT_READ and self._conns.get(what.key) is what:
                    self._readable.add(what)
            else:
                self._handshake(what)
        self._expire()
        for _ in range(8):  # TX makes control packets, RX drains them; stop when neither moves
            moved = self._process_tx() + self._process_rx()
            if not moved:
                break
        self._process_events()
        for index in sorted(self._used):
            try:
                if self.queues[index].needs_notification() and self._notify is not None:
                    self._notify(index)
            except Exception:
                log.exception("virtio-vsock: used buffer notification for queue %d failed", index)
        self._used.clear()

    def _want(self, conn: _Conn) -> int:
        mask = selectors.EVENT_WRITE if conn.to_host else 0
        if conn.established and not conn.host_eof and not conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV \
                and not self._rx_starved and conn.peer_credit() > 0 and conn not in self._readable \
                and RX_QUEUE not in self.broken_queues:
            mask |= selectors.EVENT_READ
        return mask

    def _update_interest(self) -> None:
        for conn in self._conns.values():
            want = self._want(conn)
            if want != conn.events:
                if not conn.events:
                    self._sel.register(conn.sock, want, conn)
                elif not want:
                    self._sel.unregister(conn.sock)
                else:
                    self._sel.modify(conn.sock, want, conn)
                conn.events = want

    def _next_deadline(self) -> float | None:
        deadlines = [d for d in self._handshakes.values()]
        deadlines += [c.deadline for c in self._conns.values() if c.deadline is not None]
        if self._readable and not self._rx_starved and RX_QUEUE not in self.broken_queues:
            return time.monotonic()  # more to read once the guest has buffers: come straight back
        return min(deadlines, default=None)

    def _expire(self) -> None:
        now = time.monotonic()
        for s, deadline in list(self._handshakes.items()):
            if deadline <= now:
                log.info("virtio-vsock: host client sent no CONNECT line within %.0f s; closed", CONNECT_TIMEOUT)
                self._drop_handshake(s)
        for conn in [c for c in self._conns.values() if c.deadline is not None and c.deadline <= now]:
            log.info("virtio-vsock: connection %d->%d timed out (%s)", conn.local_port, conn.peer_port,
                     "no RESPONSE from the guest" if not conn.established else "host did not take the data")
            self._close(conn, rst=True)

    # --- host side: accepting, CONNECT, reading and writing -------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("virtio-vsock: accept on %s failed: %s", self.uds_path, e)
                return
            s.setblocking(False)
            self._handshakes[s] = time.monotonic() + CONNECT_TIMEOUT
            self._sel.register(s, selectors.EVENT_READ, s)

    def _drop_handshake(self, s: socket.socket) -> None:
        self._sel.unregister(s)
        del self._handshakes[s]
        s.close()

    def _handshake(self, s: socket.socket) -> None:
        """Read the host client's ``CONNECT <port>\\n`` (peeking, so bytes after the line stay in the socket)."""
        try:
            data = s.recv(_CONNECT_LINE_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        end = data.find(b"\n")
        if end < 0 and data and len(data) < _CONNECT_LINE_MAX:
            return  # the line is not complete yet
        m = _CONNECT_LINE.fullmatch(data[:end + 1]) if end >= 0 else None
        if m is None or int(m[1]) > _U32:
            log.info("virtio-vsock: host client sent %r, not 'CONNECT <port>\\n'; closed", data[:end + 1 or None])
            try:
                s.recv(len(data))  # consumed, so the client sees EOF rather than ECONNRESET
            except OSError:
                pass
            self._drop_handshake(s)
            return
        s.recv(end + 1)
        self._sel.unregister(s)
        del self._handshakes[s]
        if RX_QUEUE in self.broken_queues or TX_QUEUE in self.broken_queues:
            s.close()
            return
        conn = _Conn(self._alloc_port(), int(m[1]), s, established=False,
                     deadline=time.monotonic() + CONNECT_TIMEOUT)
        self._conns[conn.key] = conn
        self._queue_ctrl(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_REQUEST)

    def _alloc_port(self) -> int:
        used = {c.local_port for c in self._conns.values()}
        while True:
            port, self._next_port = self._next_port, self._next_port + 1
            if self._next_port > _U32:
                self._next_port = EPHEMERAL_PORT_START
            if port not in used:
                return port

    def _send(self, conn: _Conn, send) -> int | None:
        """Bytes ``send()`` put on the host socket (0 if it would block), or None if the socket failed: the
        connection is then reset."""
        try:
            return send()
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            log.debug("virtio-vsock: host socket of %d->%d failed: %s", conn.local_port, conn.peer_port, e)
            self._close(conn, rst=True)
            return None

    def _flush(self, conn: _Conn) -> None:
        """Write buffered guest data to the host socket; finish a shutdown the guest asked for once it is out."""
        if conn.to_host:
            n = self._send(conn, lambda: conn.sock.send(conn.to_host, socket.MSG_NOSIGNAL))
            if n is None:
                return
            del conn.to_host[:n]
            self._forwarded(conn, n)
        self._after_guest_shutdown(conn)

    def _forwarded(self, conn: _Conn, n: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + n) & _U32
        if (conn.fwd_cnt - conn.last_fwd_cnt_sent) & _U32 >= CREDIT_UPDATE_THRESHOLD:
            self._credit_update(conn)

    def _credit_update(self, conn: _Conn) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._queue_ctrl(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def _after_guest_shutdown(self, conn: _Conn) -> None:
        if conn.to_host or conn.key not in self._conns:
            return
        if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND and not conn.host_shut_wr:
            conn.host_shut_wr = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.guest_shut == VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND \
                or conn.host_eof and conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            self._close(conn, rst=True)  # both directions done: RST ends it on the guest side (Linux waits for it)

    def _close(self, conn: _Conn, rst: bool) -> None:
        """Forget ``conn``, close its host socket and, if ``rst``, queue an RST to the guest."""
        if self._conns.pop(conn.key, None) is None:
            return
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        self._readable.discard(conn)
        conn.sock.close()
        if rst:
            self._queue_ctrl(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RST)

    def _drop_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn, rst=False)

    # --- TX: packets from the guest -------------------------------------------------------------------------

    def _process_tx(self) -> int:
        if not self._tx_pending or TX_QUEUE in self.broken_queues:
            return 0
        q, done = self.queues[TX_QUEUE], 0
        try:
            while len(self._ctrl) < MAX_PENDING_CTRL:
                chain = q.pop()
                if chain is None:
                    self._tx_pending = False
                    break
                self._packet(chain)
                q.add_used(chain.head, 0)
                self._used.add(TX_QUEUE)
                done += 1
        except VirtqueueError as e:
            self.fail(TX_QUEUE, str(e))
        return done

    def _packet(self, chain: DescriptorChain) -> None:
        hdr_size = VIRTIO_VSOCK_HDR.size
        if chain.read_len < hdr_size:
            raise VirtqueueError(f"virtio-vsock TX chain {chain.head} has {chain.read_len} readable bytes, less "
                                 f"than the {hdr_size}-byte virtio_vsock_hdr (§5.10.6)")
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = VIRTIO_VSOCK_HDR.unpack(chain.read(0, hdr_size))
        if src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST:
            log.debug("virtio-vsock: dropped a packet from CID %d to CID %d (guest is %d, host %d)", src_cid,
                      dst_cid, self.guest_cid, VMADDR_CID_HOST)
            return
        key = (dst_port, src_port)
        conn = self._conns.get(key)
        if type_ != VIRTIO_VSOCK_TYPE_STREAM or length > chain.read_len - hdr_size \
                or length and op != VIRTIO_VSOCK_OP_RW:
            log.debug("virtio-vsock: bad packet (type %d, op %d, len %d of %d bytes) for %d->%d; RST", type_, op,
                      length, chain.read_len - hdr_size, dst_port, src_port)
            self._reset(key, conn, op)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != VIRTIO_VSOCK_OP_RST:
                self._queue_ctrl(dst_port, src_port, VIRTIO_VSOCK_OP_RST)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VIRTIO_VSOCK_OP_RST:
            self._close(conn, rst=False)
        elif op == VIRTIO_VSOCK_OP_RESPONSE and not conn.established:
            conn.established, conn.deadline = True, None
            try:
                sent = conn.sock.send(b"OK %d\n" % conn.local_port, socket.MSG_NOSIGNAL)
            except OSError as e:
                sent = e
            if sent != len(b"OK %d\n" % conn.local_port):
                log.debug("virtio-vsock: could not tell the host client port %d is open (%s)", conn.local_port,
                          sent)
                self._close(conn, rst=True)
        elif not conn.established:  # only RESPONSE or RST may answer our REQUEST
            self._reset(key, conn, op)
        elif op == VIRTIO_VSOCK_OP_RW:
            self._guest_data(conn, chain, length)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.guest_shut |= flags & (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)
            if conn.guest_shut == VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND and conn.to_host:
                conn.deadline = time.monotonic() + CLOSE_TIMEOUT
            self._after_guest_shutdown(conn)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self._credit_update(conn)
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:  # REQUEST on an open connection, RESPONSE twice, unknown op
            self._reset(key, conn, op)

    def _reset(self, key: tuple[int, int], conn: _Conn | None, op: int) -> None:
        """Answer a bad packet with RST (never an RST with an RST), ending the connection it names."""
        if conn is not None:
            self._close(conn, rst=op != VIRTIO_VSOCK_OP_RST)
        elif op != VIRTIO_VSOCK_OP_RST:
            self._queue_ctrl(*key, VIRTIO_VSOCK_OP_RST)

    def _guest_connect(self, port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        path = f"{self.uds_path}_{port}"
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            log.debug("virtio-vsock: guest port %d -> host port %d: %s: %s; RST", peer_port, port, path, e)
            self._queue_ctrl(port, peer_port, VIRTIO_VSOCK_OP_RST)
            return
        conn = _Conn(port, peer_port, s, established=True, peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._conns[conn.key] = conn
        self._queue_ctrl(port, peer_port, VIRTIO_VSOCK_OP_RESPONSE)

    def _guest_data(self, conn: _Conn, chain: DescriptorChain, length: int) -> None:
        if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND or len(conn.to_host) + length > CONN_BUF_SIZE:
            log.debug("virtio-vsock: guest sent %d bytes on %d->%d after SHUTDOWN or beyond its credit; RST",
                      length, conn.local_port, conn.peer_port)
            self._close(conn, rst=True)
            return
        views = chain.readable_range(VIRTIO_VSOCK_HDR.size, VIRTIO_VSOCK_HDR.size + length)
        n = 0
        if not conn.to_host and length:
            n = self._send(conn, lambda: conn.sock.sendmsg(views, [], socket.MSG_NOSIGNAL))
            if n is None:
                return
        if n < length:
            conn.to_host += b"".join(views)[n:]
        self._forwarded(conn, n)

    # --- RX: packets to the guest ---------------------------------------------------------------------------

    def _queue_ctrl(self, local_port: int, peer_port: int, op: int, flags: int = 0) -> None:
        self._ctrl.append((local_port, peer_port, op, flags))

    def _rx_take(self) -> DescriptorChain | None:
        if self._rx_chain is None:
            chain = self.queues[RX_QUEUE].pop()
            if chain is None:
                self._rx_starved = True
                return None
            if chain.read_len or chain.write_len <= VIRTIO_VSOCK_HDR.size:
                raise VirtqueueError(f"virtio-vsock RX chain {chain.head} has {chain.read_len} readable and "
                                     f"{chain.write_len} writable bytes; it must be writable only, with room for "
                                     f"the {VIRTIO_VSOCK_HDR.size}-byte header and payload (§5.10.6)")
            self._rx_chain = chain
        return self._rx_chain

    def _rx_give(self, chain: DescriptorChain, local_port: int, peer_port: int, op: int, flags: int = 0,
                 length: int = 0) -> None:
        conn = self._conns.get((local_port, peer_port))
        buf_alloc, fwd_cnt = (CONN_BUF_SIZE, conn.fwd_cnt) if conn is not None else (0, 0)
        if conn is not None:
            conn.last_fwd_cnt_sent = fwd_cnt
            if op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                conn.credit_update_queued = False
        chain.write(0, VIRTIO_VSOCK_HDR.pack(VMADDR_CID_HOST, self.guest_cid, local_port, peer_port, length,
                                             VIRTIO_VSOCK_TYPE_STREAM, op, flags, buf_alloc, fwd_cnt))
        self._rx_chain = None
        self.queues[RX_QUEUE].add_used(chain.head, VIRTIO_VSOCK_HDR.size + length)
        self._used.add(RX_QUEUE)

    def _process_rx(self) -> int:
        if RX_QUEUE in self.broken_queues or self._rx_starved:
            return 0
        done = 0
        try:
            while self._ctrl:
                chain = self._rx_take()
                if chain is None:
                    return done
                local, peer, op, flags = self._ctrl.popleft()
                if op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and (local, peer) not in self._conns:
                    continue
                self._rx_give(chain, local, peer, op, flags)
                done += 1
            for conn in list(self._readable):  # one packet per readable connection per round
                chain = self._rx_take()
                if chain is None:
                    return done
                done += self._rx_data(conn, chain)
        except VirtqueueError as e:
            self.fail(RX_QUEUE, str(e))
        return done

    def _rx_data(self, conn: _Conn, chain: DescriptorChain) -> int:
        """Read one RW packet's worth from ``conn``'s host socket straight into ``chain``; 1 if a packet went."""
        hdr = VIRTIO_VSOCK_HDR.size
        room = min(chain.write_len - hdr, conn.peer_credit(), MAX_PKT_PAYLOAD)
        if conn.key not in self._conns or not conn.established or room <= 0 or conn.host_eof \
                or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV:
            self._readable.discard(conn)
            return 0
        try:
            n = conn.sock.recvmsg_into(chain.writable_range(hdr, hdr + room))[0]
        except (BlockingIOError, InterruptedError):
            self._readable.discard(conn)
            return 0
        except OSError as e:
            log.debug("virtio-vsock: host socket of %d->%d failed: %s", conn.local_port, conn.peer_port, e)
            self._close(conn, rst=True)
            return 0
        if n == 0:  # the host program closed (or shut down writing): tell the guest it will get no more
            conn.host_eof = True
            self._readable.discard(conn)
            self._rx_give(chain, conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_SHUTDOWN,
                          VIRTIO_VSOCK_SHUTDOWN_SEND)
            self._after_guest_shutdown(conn)
            return 1
        conn.tx_cnt = (conn.tx_cnt + n) & _U32
        self._rx_give(chain, conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RW, 0, n)
        if conn.peer_credit() == 0:
            self._readable.discard(conn)
        return 1

    # --- event queue ----------------------------------------------------------------------------------------

    def _process_events(self) -> None:
        if self._event_starved or EVENT_QUEUE in self.broken_queues:
            return
        q = self.queues[EVENT_QUEUE]
        try:
            while self._events:
                chain = q.pop()
                if chain is None:
                    self._event_starved = True
                    return
                if chain.write_len < VIRTIO_VSOCK_EVENT.size:
                    raise VirtqueueError(f"virtio-vsock event chain {chain.head} has {chain.write_len} writable "
                                         f"bytes, less than struct virtio_vsock_event (§5.10.6.4)")
                chain.write(0, VIRTIO_VSOCK_EVENT.pack(self._events.popleft()))
                q.add_used(chain.head, VIRTIO_VSOCK_EVENT.size)
                self._used.add(EVENT_QUEUE)
        except VirtqueueError as e:
            self.fail(EVENT_QUEUE, str(e))

"""virtio-net (OASIS VIRTIO 1.2 §5.1) over a tap-like backend: frames between the guest's queues and an fd."""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time
from typing import Callable

from popek.devices.virtio.device import VirtioDevice, VirtioError
from popek.devices.virtio.queue import DescriptorChain, VirtqueueError
from popek.memory import GuestMemory
from popek.net.tap import parse_mac, random_mac

log = logging.getLogger(__name__)

#: §5.1.1 device ID.
VIRTIO_ID_NET = 1
# §5.1.3 feature bits (bit numbers, as Linux's virtio_net.h).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
#: §5.1.4 status bits.
VIRTIO_NET_S_LINK_UP = 1
#: §5.1.4 struct virtio_net_config: mac, status, max_virtqueue_pairs (the fields this device offers).
VIRTIO_NET_CONFIG = struct.Struct("<6sHH")
#: §5.1.6 struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers.
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_SIZE = VIRTIO_NET_HDR.size  # 12
#: Queue indices (§5.1.2): receiveq1, transmitq1.
RX_QUEUE, TX_QUEUE = 0, 1
#: Frames taken from the backend per wakeup before the RX thread notifies the driver and polls again.
RX_BUDGET = 64
#: How long TX waits for a full backend (EAGAIN) to drain before dropping the frame (seconds).
TX_WAIT_MAX = 1.0

_IOV_MAX = os.sysconf("SC_IOV_MAX")


class Net(VirtioDevice):
    """A virtio network device (§5.1, device ID 1) with one RX/TX queue pair over ``backend``.

    ``backend`` is a ``popek.net.tap.Tap`` or any object with ``fileno()`` (or an int fd) on which one read
    returns one frame and one write sends one, each preceded by a 12-byte ``virtio_net_hdr_v1`` — e.g. one end
    of a ``socketpair(AF_UNIX, SOCK_SEQPACKET)``. The fd should be non-blocking.

    Offered: VIRTIO_NET_F_MAC and F_STATUS (link up) always. If the backend has ``offloads(csum, tso4, tso6)``
    (a tap): F_CSUM, F_HOST_TSO4/6 (the tap completes partial checksums and segments GSO frames the guest
    writes) and, if the tap accepts TUNSETOFFLOAD, F_GUEST_CSUM and F_GUEST_TSO4/6, enabled on the tap only as
    negotiated. F_MRG_RXBUF, F_CTRL_VQ and multiqueue are not offered, so num_buffers is always 1.

    TX (the base worker): the chain's readable bytes (header + frame) go to the backend with one ``os.writev``;
    the used length is 0. A full backend is waited on for up to TX_WAIT_MAX, then the frame is dropped, as are
    frames the backend refuses (counted in ``stats``). RX (its own thread): polls the backend only while the
    driver has RX buffers; a frame is ``os.readv``'d straight into the chain's writable views, num_buffers is
    set to 1 and the chain is returned with the frame's length. Frames longer than the buffer or shorter than
    the header are dropped and the buffer kept. With no buffer the thread stops reading (frames wait in the
    backend) until an RX notification. A chain that breaks the framing (TX: readable bytes shorter than the
    header or any writable buffer; RX: writable space shorter than the header or any readable buffer) stops the
    queue with DEVICE_NEEDS_RESET.

    :param backend: the frame backend; the device does not close it.
    :param mac: the guest's MAC (6 bytes or ``"52:54:00:.."``); default ``random_mac()``.
    :param queue_size: maximum size of each queue (a power of 2, 2..32768).
    :raises VirtioError: for a bad queue size, MAC, or a backend without a file descriptor.
    """

    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, backend, mac: bytes | str | None = None, queue_size: int = 256):
        if not 2 <= queue_size <= 32768 or queue_size & (queue_size - 1):
            raise VirtioError(f"virtio-net: queue size {queue_size} is not a power of 2 in 2..32768")
        try:
            self.mac = random_mac() if mac is None else parse_mac(mac)
        except ValueError as e:
            raise VirtioError(f"virtio-net: {e}") from None
        try:
            self.fd = backend if isinstance(backend, int) else backend.fileno()
        except (AttributeError, OSError) as e:
            raise VirtioError(f"virtio-net: backend {backend!r} has no usable file descriptor ({e})") from None
        self.backend = backend
        features = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        self._set_offloads = getattr(backend, "offloads", None)
        if self._set_offloads is not None:
            features |= 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6
            try:
                self._set_offloads(True, True, True)
                self._set_offloads(False, False, False)
                features |= 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 \
                    | 1 << VIRTIO_NET_F_GUEST_TSO6
            except Exception as e:  # the tap cannot hand partial-checksum/TSO frames to us: do not offer them
                log.info("virtio-net: backend refuses offloads (%s); guest offloads not offered", e)
        super().__init__(features, VIRTIO_NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1),
                         [queue_size, queue_size])
        self.stats = {"tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0,
                      "rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0}
        self._rx_lock = threading.Lock()  # held by the RX thread while it uses the RX queue
        self._rx_thread: threading.Thread | None = None
        self._rx_wake_lock = threading.Lock()
        self._rx_stop = False
        self._rx_wake = -1
        self._rx_chain: DescriptorChain | None = None  # popped but not yet filled (no frame was ready)

    # --- features and configuration -----------------------------------------------------------------------

    def ack_features(self, driver_features: int) -> bool:
        """As the base; also refuses the combinations §5.1.3.1 forbids: GUEST_TSO4/6 without GUEST_CSUM and
        HOST_TSO4/6 without CSUM."""
        f = driver_features
        if (f >> VIRTIO_NET_F_GUEST_TSO4 & 1 or f >> VIRTIO_NET_F_GUEST_TSO6 & 1) \
                and not f >> VIRTIO_NET_F_GUEST_CSUM & 1 \
                or (f >> VIRTIO_NET_F_HOST_TSO4 & 1 or f >> VIRTIO_NET_F_HOST_TSO6 & 1) \
                and not f >> VIRTIO_NET_F_CSUM & 1:
            self.acked_features = 0
            return False
        return super().ack_features(driver_features)

    def set_link(self, up: bool) -> None:
        """Set the config ``status`` LINK_UP bit and send a configuration change notification if active."""
        struct.pack_into("<H", self.config, 6, VIRTIO_NET_S_LINK_UP if up else 0)
        if self._config_changed is not None:
            self._config_changed()

    def _apply_offloads(self) -> None:
        if self._set_offloads is None:
            return
        f = self.acked_features
        try:
            self._set_offloads(bool(f >> VIRTIO_NET_F_GUEST_CSUM & 1), bool(f >> VIRTIO_NET_F_GUEST_TSO4 & 1),
                               bool(f >> VIRTIO_NET_F_GUEST_TSO6 & 1))
        except Exception as e:
            log.error("virtio-net: cannot set backend offloads for features %#x: %s", f, e)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues, notify: Callable[[int], None],
                 config_changed: Callable[[], None] | None = None) -> None:
        """As ``VirtioDevice.activate``; sets the backend's offloads to the negotiated ones and starts the RX
        thread."""
        super().activate(mem, queues, notify, config_changed)
        self._apply_offloads()
        self._rx_stop, self._rx_chain = False, None
        self._rx_wake = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # 1: look for buffers at once
        self._rx_thread = threading.Thread(target=self._rx_run, name=f"{self.name}-rx", daemon=True)
        self._rx_thread.start()

    def queue_notify(self, index: int) -> None:
        """RX notifications wake the RX thread (the driver added buffers); others go to the base worker."""
        if index == RX_QUEUE:
            with self._rx_wake_lock:  # reset closes the eventfd under this lock
                if self._rx_thread is not None:
                    os.eventfd_write(self._rx_wake, 1)
            return
        super().queue_notify(index)

    def reset(self) -> None:
        """As ``VirtioDevice.reset``; stops the RX thread first and turns the backend's offloads off."""
        thread = self._rx_thread
        if thread is not None:
            with self._rx_wake_lock:
                self._rx_stop = True
                os.eventfd_write(self._rx_wake, 1)
            if thread is not threading.current_thread():
                thread.join()
            with self._rx_wake_lock:
                os.close(self._rx_wake)
                self._rx_thread, self._rx_wake, self._rx_chain = None, -1, None
        super().reset()

    def on_reset(self) -> None:
        self._apply_offloads()  # acked_features is 0 now: offloads off

    # --- TX -------------------------------------------------------------------------------------------------

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        if chain.write_len:
            raise VirtqueueError(f"virtio-net TX chain {chain.head} has {chain.write_len} device-writable bytes "
                                 f"(§5.1.6.2: transmit buffers are device-readable)")
        if chain.read_len < VIRTIO_NET_HDR_SIZE:
            raise VirtqueueError(f"virtio-net TX chain {chain.head} has {chain.read_len} bytes, less than the "
                                 f"{VIRTIO_NET_HDR_SIZE}-byte virtio_net_hdr (§5.1.6)")
        views = chain.readable if len(chain.readable) <= _IOV_MAX else [b"".join(chain.readable)]
        deadline = None
        while True:
            try:
                os.writev(self.fd, views)
                self.stats["tx_packets"] += 1
                self.stats["tx_bytes"] += chain.read_len - VIRTIO_NET_HDR_SIZE
                return 0
            except BlockingIOError:
                deadline = deadline or time.monotonic() + TX_WAIT_MAX
                if time.monotonic() >= deadline or self._stop:
                    break
                p = select.poll()
                p.register(self.fd, select.POLLOUT)
                p.poll(50)
            except InterruptedError:
                continue
            except OSError as e:
                log.debug("virtio-net: backend refused a %d-byte frame: %s", chain.read_len, e)
                break
        self.stats["tx_dropped"] += 1
        return 0

    # --- RX -------------------------------------------------------------------------------------------------

    def _rx_run(self) -> None:
        poller = select.poll()
        poller.register(self._rx_wake, select.POLLIN)
        watching = starved = backend_gone = False
        while True:
            want = not (starved or backend_gone or RX_QUEUE in self.broken_queues)
            if want != watching:
                if want:
                    poller.register(self.fd, select.POLLIN)
                else:
                    poller.unregister(self.fd)
                watching = want
            events = dict(poller.poll())
            with self._rx_lock:
                with self._rx_wake_lock:  # read the eventfd, then look: a later notify or stop writes it again
                    if events.pop(self._rx_wake, 0):
                        os.eventfd_read(self._rx_wake)
                        starved = False
                    if self._rx_stop:
                        return
                rev = events.get(self.fd, 0)
                if rev & (select.POLLERR | select.POLLNVAL) or rev & select.POLLHUP and not rev & select.POLLIN:
                    log.warning("virtio-net: backend fd %d closed or failed (poll %#x); RX stopped", self.fd, rev)
                    backend_gone = True
                    continue
                if RX_QUEUE in self.broken_queues:
                    continue
                try:
                    starved, backend_gone = self._rx_pump(bool(rev & select.POLLHUP))
                except VirtqueueError as e:
                    self.fail(RX_QUEUE, str(e))
                except Exception as e:  # a device bug must not kill the thread silently
                    log.exception("virtio-net: internal error on the RX queue")
                    self.fail(RX_QUEUE, f"internal device error: {e!r}")
                try:
                    if self.queues[RX_QUEUE].needs_notification() and self._notify is not None:
                        self._notify(RX_QUEUE)
                except Exception:
                    log.exception("virtio-net: used buffer notification for the RX queue failed")

    def _rx_pump(self, hup: bool) -> tuple[bool, bool]:
        """Move up to RX_BUDGET frames into RX buffers; returns (no buffer left, backend gone)."""
        q, scratch = self.queues[RX_QUEUE], bytearray(1)
        for _ in range(RX_BUDGET):
            chain = self._rx_chain or q.pop()
            if chain is None:
                return True, False
            self._rx_chain = chain
            if chain.read_len:
                raise VirtqueueError(f"virtio-net RX chain {chain.head} has device-readable buffers (§5.1.6.3)")
            if chain.write_len < VIRTIO_NET_HDR_SIZE:
                raise VirtqueueError(f"virtio-net RX chain {chain.head} has {chain.write_len} writable bytes, "
                                     f"less than the {VIRTIO_NET_HDR_SIZE}-byte virtio_net_hdr (§5.1.6.3)")
            views = chain.writable[:_IOV_MAX - 1]
            room = sum(len(v) for v in views)
            try:
                n = os.readv(self.fd, [*views, scratch])  # scratch catches a frame longer than the buffer
            except (BlockingIOError, InterruptedError):
                return False, False
            except OSError as e:
                log.warning("virtio-net: reading the backend failed (%s); RX stopped", e)
                return False, True
            if n == 0 and hup:
                log.info("virtio-net: backend closed; RX stopped")
                return False, True
            if n > room or n < VIRTIO_NET_HDR_SIZE:
                log.debug("virtio-net: dropped a %s-byte frame (RX buffer %d bytes)", n if n <= room else ">", room)
                self.stats["rx_dropped"] += 1
                continue
            chain.write(10, b"\x01\x00")  # num_buffers = 1 (§5.1.6.4: no VIRTIO_NET_F_MRG_RXBUF)
            self._rx_chain = None
            q.add_used(chain.head, n)
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += n - VIRTIO_NET_HDR_SIZE
        return False, False

    # --- snapshot -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """As ``VirtioDevice.state`` plus the MAC and link status; an RX buffer taken but not yet filled is
        recorded as still available."""
        with self._rx_lock:
            s = super().state()
            if self._rx_chain is not None and s["queues"]:
                rx = s["queues"][RX_QUEUE]
                rx["last_avail_idx"] = (rx["last_avail_idx"] - 1) & 0xFFFF
            return {**s, "mac": self.mac.hex(), "status": struct.unpack_from("<H", self.config, 6)[0]}

    def restore(self, state: dict, *args, **kwargs) -> None:
        """As ``VirtioDevice.restore``; keeps this device's MAC, takes the link status, re-applies offloads.

        :raises VirtioError: if the state's MAC differs from this device's.
        """
        if state["mac"] != self.mac.hex():
            raise VirtioError(f"virtio-net: state is for MAC {state['mac']}, this device has {self.mac.hex()}")
        struct.pack_into("<H", self.config, 6, state["status"])
        super().restore(state, *args, **kwargs)
        self._apply_offloads()

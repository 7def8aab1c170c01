"""Transport-independent virtio device lifecycle: features, config space, activation, a queue worker, reset."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from popek.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from popek.memory import GuestMemory

log = logging.getLogger(__name__)

# Reserved feature bits (OASIS VIRTIO 1.2 §6), as bit numbers like Linux's virtio_config.h / virtio_ring.h.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

#: Device IDs (§5): the ones modelled here.
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5


class VirtioError(Exception):
    """A virtio device could not be set up or used as asked (bad backing file, bad activation, bad state)."""


class VirtioDevice:
    """Base of a virtio device model, driven by a transport (virtio-pci) that owns the registers.

    The transport: reads ``device_id``, ``features`` (offered, 64-bit) and ``queue_max_sizes``; passes the
    driver's choice to ``ack_features`` (FEATURES_OK only if it returns True); serves the device-specific
    configuration structure with ``config_read``/``config_write``; at DRIVER_OK builds one ``Virtqueue`` per queue
    (``event_idx``/``indirect_desc`` from ``acked_features``) and calls ``activate``; forwards each available
    buffer notification as ``queue_notify(index)``; calls ``reset()`` when the driver writes 0 to device status.

    Requests are handled by one worker thread per device, so ``queue_notify`` only wakes it and returns. The worker
    pops every chain of a kicked queue, hands it to ``handle_chain`` (the subclass), returns it with ``add_used``
    and calls ``notify(index)`` when the queue asks for a used buffer notification (§2.7.7). If the driver breaks
    the virtqueue rules (VirtqueueError), the device stops processing that queue, logs why, sets ``needs_reset``
    and ``reset_reason`` and calls ``config_changed()``: the transport then shows DEVICE_NEEDS_RESET and sends a
    configuration change notification (§2.1.2). The VMM goes on.

    :param features: device-specific feature bits offered (a mask); VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
        and VIRTIO_RING_F_INDIRECT_DESC are always added.
    :param config: the initial device-specific configuration structure (little endian bytes).
    :param queue_max_sizes: the largest queue size the device accepts for each of its queues.
    """

    device_id = 0
    name = "virtio"

    def __init__(self, features: int, config: bytes, queue_max_sizes: list[int]):
        self.features = features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX \
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
        self.config = bytearray(config)
        self.queue_max_sizes = list(queue_max_sizes)
        self.acked_features = 0
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue] = []
        self.needs_reset = False
        self.reset_reason: str | None = None
        self.broken_queues: set[int] = set()
        self._notify: Callable[[int], None] | None = None
        self._config_changed: Callable[[], None] | None = None
        self._cv = threading.Condition()
        self._pending: set[int] = set()
        self._busy = False
        self._stop = False
        self._worker: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True between ``activate`` and ``reset``."""
        return self._worker is not None

    # --- feature negotiation and configuration space (§2.2, §2.5) ------------------------------------------

    def ack_features(self, driver_features: int) -> bool:
        """Record the features the driver accepted; returns whether the device accepts them (FEATURES_OK, §3.1.1).

        Refused: bits the device did not offer, or no VIRTIO_F_VERSION_1 (this is a modern-only device, §6.1).
        """
        ok = not driver_features & ~self.features and bool(driver_features >> VIRTIO_F_VERSION_1 & 1)
        self.acked_features = driver_features if ok else 0
        return ok

    def queues_in_use(self) -> int:
        """How many queues, the first ones, the driver uses with the features it acked: the transport activates
        those (a device whose queues depend on features overrides it, e.g. virtio-balloon's statsq, §5.5.2).
        The base: all of them."""
        return len(self.queue_max_sizes)

    def config_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the configuration structure at ``offset``; bytes past its end read as 0."""
        data = bytes(self.config[offset:offset + size]) if offset >= 0 else b""
        return data.ljust(size, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration structure. The base has no writable fields: it is logged and
        dropped (subclasses with writable fields override this)."""
        log.debug("%s: driver wrote %s at read-only config offset %#x; ignored", self.name, data.hex(), offset)

    # --- activation, notifications, reset -----------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], notify: Callable[[int], None],
                 config_changed: Callable[[], None] | None = None) -> None:
        """Start the device (DRIVER_OK) on ``queues`` in ``mem``.

        :param notify: called as ``notify(queue_index)`` from the worker thread to send a used buffer
            notification (the transport raises the queue's MSI-X vector or INTx + ISR bit).
        :param config_changed: called when the configuration changes, including when ``needs_reset`` is set.
        :raises VirtioError: if already active, or the number (``queues_in_use``) or sizes of queues are not the
            device's.
        """
        if self.active:
            raise VirtioError(f"{self.name}: activate while already active (reset first)")
        if len(queues) != self.queues_in_use():
            raise VirtioError(f"{self.name}: has {self.queues_in_use()} queues, activated with {len(queues)}")
        for i, (q, limit) in enumerate(zip(queues, self.queue_max_sizes)):
            if q.size > limit:
                raise VirtioError(f"{self.name}: queue {i} size {q.size} exceeds its maximum {limit}")
        self.mem, self.queues, self._notify, self._config_changed = mem, list(queues), notify, config_changed
        self._stop, self._pending = False, set()
        self._worker = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
        self._worker.start()

    def queue_notify(self, index: int) -> None:
        """Available buffer notification for queue ``index`` (from the vCPU thread): wakes the worker.

        Ignored (logged) before activation, for an unknown queue, or for a queue stopped by an error.
        """
        with self._cv:
            if not self.active or not 0 <= index < len(self.queues):
                log.debug("%s: notify for queue %d ignored (inactive or no such queue)", self.name, index)
                return
            if index in self.broken_queues:
                return
            self._pending.add(index)
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every notified queue has been processed; returns False on timeout (seconds)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def reset(self) -> None:
        """Device reset (§2.4): stop the worker after its current request, forget queues, features and errors.

        After it returns the device no longer touches guest memory.
        """
        worker = self._worker
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        with self._cv:
            self._worker = None
            self._pending.clear()
            self._busy = False
        self.mem, self.queues, self._notify, self._config_changed = None, [], None, None
        self.acked_features = 0
        self.needs_reset, self.reset_reason, self.broken_queues = False, None, set()
        self.on_reset()

    def on_reset(self) -> None:
        """Subclass hook: return device-specific state to its initial values."""

    def fail(self, index: int, reason: str) -> None:
        """Stop processing queue ``index`` after a driver error and flag DEVICE_NEEDS_RESET with ``reason``."""
        log.error("%s: queue %d stopped, device needs reset: %s", self.name, index, reason)
        self.broken_queues.add(index)
        if not self.needs_reset:
            self.needs_reset, self.reset_reason = True, f"queue {index}: {reason}"
            if self._config_changed is not None:
                self._config_changed()

    # --- the worker -----------------------------------------------------------------------------------------

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """Process one request from queue ``index``; returns the bytes written into its writable buffers, or None
        to keep the chain (the device returns it later through ``release_held``, e.g. virtio-balloon's stats
        buffer, VIRTIO 1.2 §5.5.6.3).

        Subclasses implement it. Raise VirtqueueError for a request that breaks the device's framing rules (the
        queue then stops); host-side failures must be reported to the driver in the request itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement handle_chain")

    def release_held(self, index: int) -> list[tuple[int, int]]:
        """Subclass hook, called on the worker before it pops queue ``index``: ``(head, written_len)`` of chains
        kept earlier (``handle_chain`` returned None) to return to the driver now. The base keeps none."""
        return []

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                pending, self._pending, self._busy = sorted(self._pending), set(), True
            try:
                for index in pending:
                    if self._stop:
                        break
                    self._process(index)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _process(self, index: int) -> None:
        q = self.queues[index]
        try:
            for head, written in self.release_held(index):
                q.add_used(head, written)
            while not self._stop and index not in self.broken_queues:
                chain = q.pop()
                if chain is None:
                    break
                written = self.handle_chain(index, chain)
                if written is not None:
                    q.add_used(chain.head, written)
        except VirtqueueError as e:
            self.fail(index, str(e))
        except Exception as e:  # a device bug must not kill the worker silently
            log.exception("%s: internal error on queue %d", self.name, index)
            self.fail(index, f"internal device error: {e!r}")
        try:
            if q.needs_notification() and self._notify is not None:
                self._notify(index)
        except Exception:  # the transport's problem; keep the worker alive
            log.exception("%s: used buffer notification for queue %d failed", self.name, index)

    # --- snapshot -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The device's migratable state, taken between two requests (waits for the worker to be idle).

        Holds the acked features, error flags and each queue's ``Virtqueue.state()``; guest memory is not part
        of it. Subclasses add their own keys.
        """
        self.wait_idle()
        return {"device_id": self.device_id, "acked_features": self.acked_features,
                "needs_reset": self.needs_reset, "reset_reason": self.reset_reason,
                "broken_queues": sorted(self.broken_queues), "queues": [q.state() for q in self.queues]}

    def restore(self, state: dict, mem: GuestMemory | None = None, notify: Callable[[int], None] | None = None,
                config_changed: Callable[[], None] | None = None) -> None:
        """Load ``state()`` into this device (reset first); if it was active, rebuild its queues over ``mem``,
        activate with ``notify`` and process whatever the driver had made available.

        :raises VirtioError: for another device type, or an active state without ``mem`` and ``notify``.
        """
        if state["device_id"] != self.device_id:
            raise VirtioError(f"{self.name}: cannot restore state of device id {state['device_id']}")
        self.reset()
        self.acked_features = state["acked_features"]  # before activate: the features decide queues_in_use
        if state["queues"]:
            if mem is None or notify is None:
                self.acked_features = 0
                raise VirtioError(f"{self.name}: restoring an active device needs guest memory and notify")
            try:
                queues = [Virtqueue.from_state(mem, s) for s in state["queues"]]
                self.activate(mem, queues, notify, config_changed)
            except (VirtqueueError, VirtioError) as e:
                self.acked_features = 0
                raise VirtioError(f"{self.name}: bad queue state: {e}") from e
        self.needs_reset, self.reset_reason = state["needs_reset"], state["reset_reason"]
        self.broken_queues = set(state["broken_queues"])
        for index in range(len(self.queues)):  # buffers made available before the snapshot get served
            self.queue_notify(index)

"""virtio-balloon (OASIS VIRTIO 1.2 §5.5): inflate/deflate, statistics and free page reporting over guest RAM."""

from __future__ import annotations

import array
import logging
import struct
import sys
import threading
import time
from typing import Callable

from popek.devices.virtio.device import VIRTIO_ID_BALLOON, VirtioDevice, VirtioError
from popek.devices.virtio.queue import DescriptorChain, Virtqueue
from popek.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# §5.5.3 feature bits (bit numbers, as Linux's virtio_balloon.h).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

# §5.5.2 virtqueues, as numbered with every feature that adds one acked (free_page_vq needs
# VIRTIO_BALLOON_F_FREE_PAGE_HINT, which is not offered): Linux's virtio_find_vqs numbers only the queues that
# exist, so reporting_vq is the third queue with VIRTIO_BALLOON_F_STATS_VQ acked, and the second without it.
INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2
REPORTING_VQ = 3

#: §5.5.6: page frame numbers in inflateq/deflateq are of 4096-byte pages, whatever the guest's page size.
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT
#: Pages per MiB (the API's amount_mib).
PAGES_PER_MIB = (1 << 20) // BALLOON_PAGE_SIZE
#: §5.5.4 struct virtio_balloon_config: num_pages, actual (free_page_hint_cmd_id and poison_val are not offered).
VIRTIO_BALLOON_CONFIG = struct.Struct("<II")
#: §5.5.6.3 struct virtio_balloon_stat: le16 tag, le64 val, packed.
VIRTIO_BALLOON_STAT = struct.Struct("<HQ")
#: §5.5.6.3 statistic tags, by the names Firecracker's BalloonStats gives them.
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
              5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
              9: "hugetlb_failures"}
#: PFNs read per step of an inflate/deflate request (a hostile one may span all guest RAM).
PFN_CHUNK_BYTES = 64 << 10
#: A stats buffer longer than this is read only this far (far more than the tags defined).
MAX_STATS_BYTES = 64 * VIRTIO_BALLOON_STAT.size


class Balloon(VirtioDevice):
    """A virtio memory balloon (§5.5, device ID 5) that gives the pages the guest puts in it back to the host.

    Offered: VIRTIO_BALLOON_F_STATS_VQ always, F_DEFLATE_ON_OOM if ``deflate_on_oom``, F_PAGE_REPORTING if
    ``free_page_reporting``; not F_MUST_TELL_HOST (the guest may reuse deflated pages before telling, §5.5.6.1),
    not F_FREE_PAGE_HINT nor F_PAGE_POISON. Queues: inflateq, deflateq, then statsq and reporting_vq if the
    driver acked their features, numbered as the driver numbers them (only the queues that exist count, so a
    driver without statsq has reporting_vq as its queue 2; ``queues_in_use``). ``handle_chain`` and the methods
    here name queues by role (INFLATEQ, DEFLATEQ, STATSQ, REPORTING_VQ).

    - ``num_pages`` (config, device-owned) is the target size in 4 KiB pages (``set_target``, which sends a
      configuration change notification); ``actual`` is the driver's (``config_write``).
    - inflateq: each PFN (le32, §5.5.6) is checked against guest RAM; valid pages are handed to
      ``GuestMemory.release`` in runs of consecutive frames; invalid ones (a hostile or buggy driver) are counted
      in ``bad_pfns`` and skipped. A trailing partial PFN is ignored. deflateq: counted only (the pages come back
      when the guest touches them).
    - statsq (§5.5.6.3): the driver's buffer of (le16 tag, le64 val) entries is read and kept; ``request_stats``
      returns it to the driver, which refills it. With ``stats_interval_s`` > 0 that happens every so many seconds
      (a thread of the device). Unknown tags are ignored.
    - reporting_vq (§5.5.6.6): every buffer of a report is a range of free guest pages; its whole 4 KiB pages are
      released. Used length 0.

    :param target_pages: initial ``num_pages``. :param stats_interval_s: statistics polling period (0: none).
    :param queue_size: each queue's maximum size (Linux needs at least 32 for reporting_vq).
    :raises VirtioError: for a target outside 0..2^32-1 or a negative interval.
    """

    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, target_pages: int = 0, *, deflate_on_oom: bool = False, stats_interval_s: int = 0,
                 free_page_reporting: bool = False, queue_size: int = 256):
        features = 1 << VIRTIO_BALLOON_F_STATS_VQ
        features |= (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) if deflate_on_oom else 0
        features |= (1 << VIRTIO_BALLOON_F_PAGE_REPORTING) if free_page_reporting else 0
        queues = 4 if free_page_reporting else 3
        super().__init__(features, VIRTIO_BALLOON_CONFIG.pack(0, 0), [queue_size] * queues)
        self.deflate_on_oom, self.free_page_reporting = deflate_on_oom, free_page_reporting
        self._lock = threading.Condition()
        self._stats: dict[str, int] = {}
        self._stats_at: float | None = None  # time.monotonic() of the last statistics buffer
        self._stats_updates = 0
        self._stats_head: int | None = None  # the driver's stats buffer, held until the next request
        self._stats_wanted = False
        self._interval = 0
        self._poller: threading.Thread | None = None
        self._poller_stop = False
        self.counters = {"inflated_pages": 0, "deflated_pages": 0, "reported_pages": 0, "bad_pfns": 0}
        self.set_target(target_pages)
        self.set_stats_interval(stats_interval_s)

    # --- configuration (§5.5.4) -------------------------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        """num_pages: how many 4 KiB pages the host wants in the balloon."""
        return VIRTIO_BALLOON_CONFIG.unpack(self.config)[0]

    @property
    def actual_pages(self) -> int:
        """actual: how many 4 KiB pages the driver says the balloon holds."""
        return VIRTIO_BALLOON_CONFIG.unpack(self.config)[1]

    def set_target(self, pages: int) -> None:
        """Set num_pages to ``pages`` (4 KiB pages) and, if the driver is running, send a configuration change
        notification (§5.5.6.1: the driver then inflates or deflates towards it).

        :raises VirtioError: if ``pages`` is not in 0..2^32-1.
        """
        if not 0 <= pages <= 0xFFFF_FFFF:
            raise VirtioError(f"{self.name}: target of {pages} pages is not a le32 (0..{0xFFFF_FFFF})")
        struct.pack_into("<I", self.config, 0, pages)
        changed = self._config_changed
        if self.active and changed is not None:
            changed()

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver may write ``actual`` (bytes 4-7); writes to num_pages are dropped (the device owns it)."""
        for i, b in enumerate(data):
            if 4 <= offset + i < VIRTIO_BALLOON_CONFIG.size:
                self.config[offset + i] = b
            else:
                log.debug("%s: driver write at config offset %#x ignored", self.name, offset + i)

    # --- statistics (§5.5.6.3) --------------------------------------------------------------------------------

    @property
    def stats_interval_s(self) -> int:
        return self._interval

    def set_stats_interval(self, seconds: int) -> None:
        """Ask the driver for fresh statistics every ``seconds`` (0: never; the last ones are kept).

        :raises VirtioError: for a negative interval.
        """
        if seconds < 0:
            raise VirtioError(f"{self.name}: statistics interval {seconds} s is negative")
        with self._lock:
            self._interval = seconds
            self._lock.notify_all()

    def request_stats(self) -> bool:
        """Return the held statistics buffer to the driver so it sends fresh values; False if none is held (the
        driver has not sent one yet, or a request is still being answered)."""
        with self._lock:
            if self._stats_head is None or not self.active:
                return False
            self._stats_wanted = True
        self.queue_notify(self._index(STATSQ))
        return True

    def wait_stats(self, after: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until more than ``after`` statistics buffers have arrived (see
        ``stats()['updates']``); returns whether they did."""
        with self._lock:
            return self._lock.wait_for(lambda: self._stats_updates > after, timeout)

    def stats(self) -> dict:
        """Firecracker's BalloonStats: target_pages/actual_pages/target_mib/actual_mib and each statistic the
        driver sent (swap_in, ..., bytes for the memory ones, as the driver reports them), plus ``updates`` (how
        many buffers arrived) and ``age_s`` (seconds since the last, None before the first)."""
        target, actual = self.target_pages, self.actual_pages
        with self._lock:
            age = None if self._stats_at is None else time.monotonic() - self._stats_at
            return {"target_pages": target, "actual_pages": actual, "target_mib": target // PAGES_PER_MIB,
                    "actual_mib": actual // PAGES_PER_MIB, **self._stats, "updates": self._stats_updates,
                    "age_s": age}

    def _stats_arrived(self, chain: DescriptorChain) -> int | None:
        data = chain.read(0, min(chain.read_len, MAX_STATS_BYTES))
        values = {}
        for off in range(0, len(data) - VIRTIO_BALLOON_STAT.size + 1, VIRTIO_BALLOON_STAT.size):
            tag, val = VIRTIO_BALLOON_STAT.unpack_from(data, off)
            if tag in STAT_NAMES:
                values[STAT_NAMES[tag]] = val
        with self._lock:
            self._stats.update(values)
            self._stats_at = time.monotonic()
            self._stats_updates += 1
            keep = self._stats_head is None
            if keep:
                self._stats_head = chain.head
            self._lock.notify_all()
        if not keep:  # a second buffer while one is held: take its values, give it straight back
            log.debug("%s: a second stats buffer (%d) while %d is held; returned", self.name, chain.head,
                      self._stats_head)
            return 0
        return None

    def release_held(self, index: int) -> list[tuple[int, int]]:
        with self._lock:
            if index != self._index(STATSQ) or not self._stats_wanted or self._stats_head is None:
                return []
            head, self._stats_head, self._stats_wanted = self._stats_head, None, False
        return [(head, 0)]

    def _poll(self) -> None:
        while True:
            with self._lock:
                interval = self._interval
                self._lock.wait_for(lambda: self._poller_stop or self._interval != interval,
                                    interval if interval > 0 else None)
                if self._poller_stop:
                    return
                if self._interval != interval:
                    continue
            self.request_stats()

    # --- queue layout (§5.5.2) --------------------------------------------------------------------------------

    def _roles(self) -> list[int]:
        acked = self.acked_features
        return [INFLATEQ, DEFLATEQ] + [STATSQ] * (acked >> VIRTIO_BALLOON_F_STATS_VQ & 1) \
            + [REPORTING_VQ] * (acked >> VIRTIO_BALLOON_F_PAGE_REPORTING & 1)

    def queues_in_use(self) -> int:
        """inflateq and deflateq, plus statsq and reporting_vq if their features were acked."""
        return len(self._roles())

    def _index(self, role: int) -> int | None:
        roles = self._roles()
        return roles.index(role) if role in roles else None

    # --- requests ---------------------------------------------------------------------------------------------

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        roles = self._roles()
        index = roles[index] if index < len(roles) else index
        if index == STATSQ:
            return self._stats_arrived(chain)
        if index == REPORTING_VQ:
            self._report(chain)
            return 0
        if chain.write_len:
            log.debug("%s: %d device-writable bytes in %s request ignored", self.name, chain.write_len,
                      "inflate" if index == INFLATEQ else "deflate")
        for pfns in self._pfns(chain):
            pages = {p << VIRTIO_BALLOON_PFN_SHIFT for p in pfns}
            valid = sorted(gpa for gpa in pages if self.mem.contains(gpa, BALLOON_PAGE_SIZE))
            self.counters["bad_pfns"] += len(pages) - len(valid)
            if index == INFLATEQ:
                self.counters["inflated_pages"] += len(valid)
                for gpa, size in _runs(valid):
                    self._release(gpa, size)
            else:
                self.counters["deflated_pages"] += len(valid)
        return 0

    def _pfns(self, chain: DescriptorChain):
        usable = chain.read_len - chain.read_len % 4
        if usable != chain.read_len:
            log.debug("%s: request %d has a trailing partial PFN; ignored", self.name, chain.head)
        for off in range(0, usable, PFN_CHUNK_BYTES):
            words = array.array("I", chain.read(off, min(PFN_CHUNK_BYTES, usable - off)))
            if sys.byteorder != "little":
                words.byteswap()
            yield words

    def _report(self, chain: DescriptorChain) -> None:
        for gpa, length, _ in chain.segments:  # the queue has checked every buffer is inside guest RAM
            start = -(-gpa // PAGE_SIZE) * PAGE_SIZE
            end = (gpa + length) // PAGE_SIZE * PAGE_SIZE
            if end > start:
                self.counters["reported_pages"] += (end - start) // PAGE_SIZE
                self._release(start, end - start)

    def _release(self, gpa: int, size: int) -> None:
        for r in self.mem.regions:  # a run of valid pages may cross from one region into an adjacent one
            lo, hi = max(gpa, r.gpa), min(gpa + size, r.end)
            if lo >= hi:
                continue
            try:
                self.mem.release(lo, hi - lo)
            except (GuestMemoryError, OSError) as e:  # guest RAM stays as it was; the guest loses nothing
                log.warning("%s: cannot release %#x+%#x: %s", self.name, lo, hi - lo, e)

    # --- lifecycle --------------------------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], notify: Callable[[int], None],
                 config_changed: Callable[[], None] | None = None) -> None:
        """``VirtioDevice.activate``, then start the statistics poller thread and look at every queue once: Linux's
        driver makes its first stats buffer available and notifies during probe, before DRIVER_OK (virtballoon_probe
        runs init_vqs before virtio_device_ready), when the transport has no device to pass the notification to."""
        super().activate(mem, queues, notify, config_changed)
        with self._lock:
            self._poller_stop = False
        self._poller = threading.Thread(target=self._poll, name=f"{self.name}-stats", daemon=True)
        self._poller.start()
        for index in range(len(queues)):
            self.queue_notify(index)

    def on_reset(self) -> None:
        """Stop the poller, forget the held stats buffer; ``actual`` goes to 0 (a reset driver starts with an
        empty balloon), the target stays."""
        poller = self._poller
        with self._lock:
            self._poller_stop = True
            self._stats_head, self._stats_wanted = None, False
            self._lock.notify_all()
        if poller is not None and poller is not threading.current_thread():
            poller.join()
        self._poller = None
        struct.pack_into("<I", self.config, 4, 0)

    def state(self) -> dict:
        """``VirtioDevice.state()`` plus the configuration, the held stats buffer, statistics and counters."""
        d = super().state()
        with self._lock:
            d["balloon"] = {"config": bytes(self.config), "stats": dict(self._stats), "stats_head": self._stats_head,
                            "stats_wanted": self._stats_wanted, "stats_interval_s": self._interval,
                            "counters": dict(self.counters)}
        return d

    def restore(self, state: dict, mem: GuestMemory | None = None, notify: Callable[[int], None] | None = None,
                config_changed: Callable[[], None] | None = None) -> None:
        """Load ``state()``. :raises VirtioError: for another device type, or features this device does not offer
        (a balloon configured differently: deflate_on_oom, free page reporting)."""
        if state.get("device_id") == self.device_id and state["acked_features"] & ~self.features:
            raise VirtioError(f"{self.name}: the saved driver features {state['acked_features']:#x} include bits "
                              f"this device does not offer ({self.features:#x}); configure the balloon as it was")
        super().restore(state, mem, notify, config_changed)
        b = state["balloon"]
        with self._lock:
            self.config[:] = b["config"]
            self._stats = dict(b["stats"])
            self._stats_head, self._stats_wanted = b["stats_head"], b["stats_wanted"]
            self._interval = b["stats_interval_s"]
            self.counters = dict(b["counters"])
            self._lock.notify_all()
        if self._stats_wanted:
            self.queue_notify(self._index(STATSQ))


def _runs(gpas: list[int]):
    """(gpa, size) of each run of consecutive pages in the ascending list ``gpas``."""
    start = prev = None
    for gpa in gpas:
        if prev is not None and gpa == prev + BALLOON_PAGE_SIZE:
            prev = gpa
            continue
        if start is not None:
            yield start, prev + BALLOON_PAGE_SIZE - start
        start = prev = gpa
    if start is not None:
        yield start, prev + BALLOON_PAGE_SIZE - start

"""virtio-rng, the entropy device (OASIS VIRTIO 1.2 §5.4): fills the driver's buffers from the host's getrandom."""

from __future__ import annotations

import logging
import os

from popek.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from popek.devices.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

#: Largest single os.getrandom call (bytes); bigger buffers are filled in pieces.
GETRANDOM_CHUNK = 1 << 20


class Rng(VirtioDevice):
    """A virtio entropy device (§5.4, device ID 4): one request queue, no features, no configuration.

    Every device-writable buffer of a request is filled completely from ``os.getrandom`` (the host's CSPRNG)
    and the used length is the number of bytes written. Device-readable buffers, which the driver must not
    send (§5.4.6.1), are ignored.

    :param queue_size: the request queue's maximum size (a power of 2).
    """

    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"

    def __init__(self, queue_size: int = 256):
        super().__init__(0, b"", [queue_size])

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        if chain.read_len:
            log.debug("virtio-rng: ignoring %d device-readable bytes in request %d", chain.read_len, chain.head)
        for view in chain.writable:
            pos = 0
            while pos < len(view):
                data = os.getrandom(min(len(view) - pos, GETRANDOM_CHUNK))
                view[pos:pos + len(data)] = data
                pos += len(data)
        return chain.write_len

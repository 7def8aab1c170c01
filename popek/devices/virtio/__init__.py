"""Virtio device models (OASIS VIRTIO 1.2): split virtqueues, the device base class, virtio-blk and virtio-rng."""

"""virtio-rng (VIRTIO 1.2 §5.4): every writable buffer filled from getrandom, used length, no config; and the
VirtioDevice base through it: feature negotiation, activation checks, errors flagging DEVICE_NEEDS_RESET."""

from __future__ import annotations

import pytest

from popek.devices.virtio import rng
from popek.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, VIRTIO_RING_F_EVENT_IDX, VirtioError
from popek.devices.virtio.rng import Rng
from popek.memory import GuestMemory
from test_virtqueue import FakeDriver


@pytest.fixture
def setup():
    with GuestMemory([(0, 0x100000)]) as mem:
        dev = Rng()
        driver = FakeDriver(mem, heap=0x10000)
        assert dev.ack_features(1 << VIRTIO_F_VERSION_1)
        notes = []
        dev.activate(mem, [driver.queue()], notes.append)
        yield dev, driver, notes
        dev.reset()


def run(dev, driver, readable=(), writable=()):
    head = driver.add(list(readable), list(writable), fill=0)
    driver.kick()
    dev.queue_notify(0)
    assert dev.wait_idle(5)
    return head, driver.used()


def test_rng_is_device_4_with_only_transport_features_and_no_config():
    dev = Rng()
    assert dev.device_id == VIRTIO_ID_RNG == 4
    assert dev.features & 0xFFFFFF == 0  # no device-specific bits (§5.4.3)
    assert dev.features >> VIRTIO_F_VERSION_1 & 1 and dev.features >> VIRTIO_RING_F_EVENT_IDX & 1
    assert dev.config_read(0, 4) == bytes(4)


def test_every_writable_buffer_is_filled_and_used_len_counts_them(setup, monkeypatch):
    dev, driver, notes = setup
    calls = []

    def fake_getrandom(n, flags=0):
        calls.append(n)
        return bytes([len(calls)]) * n
    monkeypatch.setattr(rng.os, "getrandom", fake_getrandom)
    head, used = run(dev, driver, writable=[16, 4096])
    assert used == [(head, 4112)]
    assert driver.written(head) == [b"\x01" * 16, b"\x02" * 4096]
    assert notes == [0]


def test_short_getrandom_results_are_topped_up(setup, monkeypatch):
    dev, driver, _ = setup
    monkeypatch.setattr(rng.os, "getrandom", lambda n, flags=0: b"\xab" * min(n, 7))
    head, used = run(dev, driver, writable=[30])
    assert used == [(head, 30)] and driver.written(head) == [b"\xab" * 30]


def test_real_entropy_differs_between_buffers(setup):
    dev, driver, _ = setup
    head, used = run(dev, driver, writable=[64, 64])
    a, b = driver.written(head)
    assert used == [(head, 128)] and a != b and a != bytes(64)


def test_readable_buffers_are_ignored_and_left_alone(setup):
    dev, driver, _ = setup
    head, used = run(dev, driver, readable=[b"keep me"], writable=[8])
    assert used == [(head, 8)]
    assert driver.mem.read(driver.buffers[head][0][0], 7) == b"keep me"


def test_chain_breaking_rules_flags_needs_reset(setup):
    dev, driver, _ = setup
    driver.write_desc(driver.desc, 0, 0x20000, 8, 2 | 1, 0)  # WRITE|NEXT looping on itself
    driver.place(0)
    driver.kick()
    dev.queue_notify(0)
    assert dev.wait_idle(5)
    assert dev.needs_reset and "loops" in dev.reset_reason


def test_feature_negotiation_refuses_unoffered_bits_and_drivers_without_version_1():
    dev = Rng()
    assert not dev.ack_features(1 << VIRTIO_F_VERSION_1 | 1 << 5)  # bit 5 was not offered
    assert not dev.ack_features(1 << VIRTIO_RING_F_EVENT_IDX)  # a legacy driver
    assert dev.acked_features == 0
    assert dev.ack_features(dev.features) and dev.acked_features == dev.features


def test_activate_checks_the_number_and_sizes_of_queues():
    with GuestMemory([(0, 0x100000)]) as mem:
        dev = Rng(queue_size=8)
        with pytest.raises(VirtioError, match="has 1 queues, activated with 2"):
            dev.activate(mem, [FakeDriver(mem).queue(), FakeDriver(mem, base=0x4000).queue()], print)
        with pytest.raises(VirtioError, match="size 16 exceeds its maximum 8"):
            dev.activate(mem, [FakeDriver(mem, size=16).queue()], print)
        assert not dev.active


def test_config_writes_to_a_device_without_writable_config_change_nothing():
    dev = Rng()
    dev.config_write(0, b"\xff\xff")
    assert dev.config_read(0, 2) == bytes(2)


def test_unexpected_error_in_a_device_flags_needs_reset_and_the_worker_survives(setup, monkeypatch):
    dev, driver, _ = setup

    def broken(n, flags=0):
        raise RuntimeError("boom")
    monkeypatch.setattr(rng.os, "getrandom", broken)
    run(dev, driver, writable=[8])
    assert dev.needs_reset and "internal device error" in dev.reset_reason
    assert dev._worker.is_alive()

"""Test options: `slow` tests (real Linux boots) run only with --run-slow; `kvm` tests skip where /dev/kvm is missing."""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the slow end-to-end tests that boot Linux")


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="boots a real kernel; run with --run-slow")
    skip_kvm = pytest.mark.skip(reason="/dev/kvm is not usable here")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if ("kvm" in item.keywords or "slow" in item.keywords) and not _kvm_usable():
            item.add_marker(skip_kvm)

"""Test helper: poll a condition until it holds or a timeout passes (device threads work asynchronously)."""

import time


def wait_for(pred, timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Call ``pred()`` every ``interval`` seconds until it is true or ``timeout`` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()

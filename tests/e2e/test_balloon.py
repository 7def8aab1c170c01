"""End to end, memory overcommit with virtio-balloon in a Linux guest: a detached 256 MiB VM touches TOUCH_MIB MiB
and frees it; `popek balloon` inflates the balloon and the VMM's host memory (`popek ps --json` USS) drops by most
of it; the guest's statistics come back; deflating empties the balloon. A second VM with free page reporting gives
its freed memory back by itself. Both boot at once (minutes here): run with ``--run-slow``."""

import json
import time

import pytest

from test_many_vms import BOOT_TIMEOUT, host  # noqa: F401  (host: the fixture)

pytestmark = pytest.mark.slow

MIB = 1 << 20
#: How much the guest touches. Each new page costs the emulated guest kernel a 4 KiB ``rep stosb`` (measured
#: ~0.6 MiB per second of CPU here), so far less than the 150 MiB a hardware KVM would touch in a blink.
TOUCH_MIB = 24
#: The guest's awk builds a TOUCH_MIB MiB string (user mode writes every page, so the host backs each one), exits
#: (the pages go back to the guest's free lists) and says so.
FILL = (f"echo balloon-e2e-touching; awk 'BEGIN {{ x = sprintf(\"%\" {TOUCH_MIB} * 1048576 \"s\", \"\"); "
        "print length(x) }' && echo balloon-e2e-freed; sleep 3600")
#: The balloon asked for: nearly all the guest's free memory (~235 MiB after boot), so it holds most of the pages
#: the guest touched.
INFLATE_MIB = 220
#: Seconds the guest gets to fill or empty its balloon (its kernel runs emulated here).
INFLATE_TIMEOUT = 300
#: Seconds a guest gets to boot and touch TOUCH_MIB MiB (the emulated kernel zeroes every new page).
FILL_TIMEOUT = BOOT_TIMEOUT + 600


def uss(host, name):  # noqa: F811
    return host.ps()[name]["uss"]


def balloon_stats(host, name):  # noqa: F811
    return json.loads(host.run("balloon", name, "--stats", "--json").stdout)


def wait_for(what, probe, timeout):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(2)


def test_inflating_gives_touched_guest_memory_back_to_the_host_and_page_reporting_does_it_alone(host):  # noqa: F811
    vm, rep = host.name("balloon"), host.name("report")
    host.start(vm, "--", "sh", "-c", FILL)
    host.start(rep, "--free-page-reporting", "--", "sh", "-c", FILL)
    host.wait_log(vm, "balloon-e2e-touching", FILL_TIMEOUT)
    before = uss(host, vm)
    host.wait_log(vm, "balloon-e2e-freed", FILL_TIMEOUT)
    touched = uss(host, vm)
    growth = touched - before  # `before` is read a moment late (the log is polled), so some of it is missed
    assert growth > 0.5 * TOUCH_MIB * MIB  # the guest's writes are backed on the host, in the memfd

    p = host.run("balloon", vm, f"{INFLATE_MIB}M", "--wait", str(INFLATE_TIMEOUT), timeout=INFLATE_TIMEOUT + 30)
    assert f"the guest's is at {INFLATE_MIB} MiB" in p.stdout
    inflated = uss(host, vm)
    assert touched - inflated > 0.5 * growth, (before, touched, inflated)  # measured: two thirds of it

    stats = balloon_stats(host, vm)
    assert stats["target_mib"] == stats["actual_mib"] == INFLATE_MIB
    assert stats["total_memory"] <= 256 * MIB and 0 < stats["free_memory"] < stats["total_memory"]
    assert json.loads(host.run("balloon", vm, "--json").stdout) == {
        "amount_mib": INFLATE_MIB, "deflate_on_oom": True, "stats_polling_interval_s": 5,
        "free_page_reporting": False}

    host.run("balloon", vm, "0", "--wait", str(INFLATE_TIMEOUT), timeout=INFLATE_TIMEOUT + 30)
    free_inflated = stats["free_memory"]
    refreshed = wait_for("the guest's statistics show the deflated memory free again",
                         lambda: (s := balloon_stats(host, vm))["free_memory"] > free_inflated + 100 * MIB and s,
                         60)
    assert refreshed["actual_mib"] == 0
    bad = host.run("balloon", vm, "300M", check=False)
    assert bad.returncode == 1 and "larger than the guest's 256 MiB" in bad.stderr

    host.wait_log(rep, "balloon-e2e-freed", FILL_TIMEOUT)
    wait_for("the reporting guest's freed memory left the host's books",
             lambda: uss(host, rep) < touched - 0.5 * growth, 120)
    assert host.run("balloon", rep, "--json").stdout.count('"free_page_reporting": true') == 1

    host.run("stop", vm)
    host.run("stop", rep)
    host.run("rm", vm, rep)
    assert host.leftovers() == []

"""End-to-end fixtures: every test fails if it leaves a Popek VMM process, runtime dir, socket, cgroup, tap or
network namespace behind (see leftovers.py for what counts and how it is told apart from other runs' things)."""

import shutil

import pytest

from leftovers import BASE, OWN_BASE, Snapshot, kill, leftovers, remove_cgroups


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail the test if it leaves any of this run's VMM processes, runtime dirs, sockets, cgroups, taps or network
    namespaces behind (after its own fixtures have cleaned up)."""
    before = Snapshot.take()
    yield
    found, procs, cgroups = leftovers(before, Snapshot.take())
    if not found:
        return
    kill(procs)
    remove_cgroups(cgroups)
    for line in found:
        if line.startswith("runtime dir "):
            shutil.rmtree(line.split(" ", 2)[2], ignore_errors=True)
    pytest.fail("the test left behind:\n  " + "\n  ".join(found), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    if OWN_BASE:
        shutil.rmtree(BASE, ignore_errors=True)

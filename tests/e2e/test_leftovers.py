"""The e2e leftovers check (leftovers.py, used by conftest.py's autouse fixture) finds what this run left behind
and nothing of other runs. No guest is booted: processes, directories, sockets and cgroups are made by hand."""

import os
import secrets
import socket
import subprocess

import pytest

from leftovers import BASE, Snapshot, kill, leftovers, remove_cgroups
from popek.cgroups import CgroupError, VmCgroup, detect


@pytest.fixture
def made():
    """Undo list: (processes, cgroups, paths) the test makes, removed even when an assertion fails."""
    procs, groups, paths = [], [], []
    yield procs, groups, paths
    for p in procs:
        p.kill()
        p.wait()
    for cg in groups:
        cg.remove(force=True)
    for path in paths:
        subprocess.run(["rm", "-rf", str(path)], check=True)


def test_a_process_carrying_this_runs_token_is_a_leftover_and_one_without_it_is_not(made):
    before = Snapshot.take()
    ours = subprocess.Popen(["sleep", "60"])  # inherits os.environ, token included
    foreign = subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"]})
    made[0].extend([ours, foreign])
    found, procs, _ = leftovers(before, Snapshot.take())
    assert [pid for pid, _ in procs] == [ours.pid]
    assert found == [f"process {ours.pid}: sleep 60"]
    kill(procs)
    assert ours.wait(5) == -9 and foreign.poll() is None


def test_a_runtime_dir_and_a_socket_in_the_private_base_are_leftovers(made):
    before = Snapshot.take()
    vm = BASE / "popek" / f"popek-leak-{secrets.token_hex(3)}"
    vm.mkdir(parents=True)
    made[2].append(vm)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(vm / "api.sock"))
    found, _, _ = leftovers(before, Snapshot.take())
    assert found == [f"runtime dir {vm}", f"socket {vm / 'api.sock'}"]
    assert leftovers(Snapshot.take(), Snapshot.take())[0] == []  # nothing new: nothing reported


def test_a_new_cgroup_is_a_leftover_only_when_this_run_owns_it(made):
    try:
        layout = detect()
    except CgroupError as e:
        pytest.skip(f"no usable cgroups here: {e}")
    before = Snapshot.take()
    mine, other = (f"popek-leak-{secrets.token_hex(3)}-{r}" for r in ("mine", "other"))
    (BASE / "popek" / mine).mkdir(parents=True)  # a VM of this run whose cgroup outlived its VMM
    made[2].append(BASE / "popek" / mine)
    for name in (mine, other):  # `other`: an empty cgroup of a VM this run knows nothing of
        made[1].append(VmCgroup.create(name, layout=layout))
    found, _, groups = leftovers(before, Snapshot.take())
    assert {g.name for g in groups} == {mine}
    assert [f for f in found if "cgroup" in f] == [f"cgroup {g}" for g in groups]
    remove_cgroups(groups)
    assert not any(p.exists() for p in VmCgroup(mine, layout).paths)

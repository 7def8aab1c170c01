"""`popek balloon` refusals: bad sizes and options get one `popek: error:` line and exit 2 before any VM is asked;
an unknown VM exits 1; a detached VM's default balloon is valid API input."""

import os
import subprocess
import sys

import pytest

from popek.api.model import Balloon
from popek.cli_balloon import detached_balloon


def popek(tmp_path, *args):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))  # a private runtime base: no VM is found there
    return subprocess.run([sys.executable, "-m", "popek.cli", "balloon", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("args, words", [
    (["vm1", "1.5G"], "cannot read '1.5G' as a size"),
    (["vm1", "100K"], "not a whole number of MiB"),
    (["vm1", "-5M"], "No such option"),
    (["vm1", "10M", "--wait", "-1"], "not negative"),
    (["vm1", "--wait", "5"], "--wait goes with a SIZE"),
])
def test_bad_balloon_input_is_one_error_line_and_exit_2(tmp_path, args, words):
    p = popek(tmp_path, *args)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("popek: error:") and p.stderr.count("\n") == 1 and words in p.stderr, p.stderr


def test_balloon_of_an_unknown_vm_exits_1_naming_it(tmp_path):
    p = popek(tmp_path, "nosuchvm", "64M")
    assert p.returncode == 1 and p.stderr == "popek: error: there is no VM named 'nosuchvm'\n"


def test_detached_vms_get_an_empty_deflate_on_oom_balloon_with_statistics():
    for reporting in (False, True):
        b = Balloon.from_json(detached_balloon(reporting), "balloon")
        assert b.amount_mib == 0 and b.deflate_on_oom and b.stats_polling_interval_s > 0
        assert b.free_page_reporting is reporting

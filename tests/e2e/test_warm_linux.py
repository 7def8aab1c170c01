"""End to end, warm start of `popek run -- CMD` (popek.warm) with the microvm guest: the first run makes the template
and runs the command in that same VM; later runs start from it (known from ``--stats-json``'s "warm"), print the
same, exit with the same status, see the host's clock and fresh /dev/urandom bytes; a corrupt template is discarded
and the run boots cold. Templates go to a private POPEK_WARM_DIR. Two boots of ~20-40 s: run with ``--run-slow``.
Prints the cold and warm run times."""

from __future__ import annotations

import json
import time

import pytest

from test_virtio import popek_run

pytestmark = pytest.mark.slow

SCRIPT = "echo hi; date +%s; head -c16 /dev/urandom | od -An -tx1; exit 5"


def _stats(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def _timed_run(*args: str):
    t0 = time.time()
    r = popek_run("--stats-json", *args, "--", "sh", "-c", SCRIPT)
    return r, t0, time.time()


def _lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.replace("\r\n", "\n").splitlines() if line.strip()]


def test_warm_runs_start_from_the_template_with_the_hosts_clock_fresh_entropy_and_a_corrupt_one_boots_cold(
        tmp_path, monkeypatch):
    store = tmp_path / "warm"
    monkeypatch.setenv("POPEK_WARM_DIR", str(store))
    monkeypatch.delenv("POPEK_NO_WARM", raising=False)

    first, t0, t1 = _timed_run()
    assert first.returncode == 5, first.stderr
    assert _lines(first.stdout)[0] == "hi", first.stdout
    s = _stats(first.stderr)
    assert s["warm"] is False and s["warm_template_made"] is True, s
    templates = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert [p.name for p in templates] == [s["warm_key"]]
    cold_s = t1 - t0

    time.sleep(8)  # so a guest clock that was not refreshed would be the template's, seconds behind the host's
    warm_runs = []
    for _ in range(2):
        r, t0, t1 = _timed_run()
        assert r.returncode == 5, r.stderr
        s = _stats(r.stderr)
        assert s["warm"] is True and s["warm_key"] == templates[0].name, s
        hi, date, random_bytes = _lines(r.stdout)
        assert hi == "hi"
        assert t0 - 2 <= int(date) <= t1 + 2, (t0, date, t1)
        warm_runs.append((random_bytes, t1 - t0, s["warm_steps_s"]))
    assert warm_runs[0][0] != warm_runs[1][0], "two warm runs read the same /dev/urandom bytes"

    state = templates[0] / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    r, _, _ = _timed_run()
    assert r.returncode == 5, r.stderr
    assert "cannot be used" in r.stderr and "booting cold" in r.stderr, r.stderr
    assert _lines(r.stdout)[0] == "hi"
    s = _stats(r.stderr)
    assert s["warm"] is False and s["warm_template_made"] is True, s
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [templates[0].name]
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]
    print(f"\ncold run (making the template) {cold_s:.2f} s; warm runs {[round(w[1], 2) for w in warm_runs]} s; "
          f"warm steps {warm_runs[-1][2]}")

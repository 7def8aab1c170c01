"""`popek balloon`: set a running VM's balloon target and show its statistics (the VMM's /balloon resources)."""

from __future__ import annotations

import json
import time

import click

from popek import cli_vms  # while `python -m popek.cli` imports it, cli_vms is not complete yet: use it late
from popek.cli import fail, main

#: How often a detached VM's guest refreshes its memory statistics (seconds): each refresh is a little guest
#: kernel work, which an emulating KVM runs slowly.
DETACHED_STATS_INTERVAL_S = 5
#: How often `popek balloon --wait` looks at the guest's progress (seconds).
WAIT_POLL_S = 0.5
#: The statistics that are byte counts (the rest are event counts), as `popek balloon --stats` prints them.
BYTE_STATS = ("free_memory", "available_memory", "total_memory", "disk_caches", "swap_in", "swap_out")


def detached_balloon(free_page_reporting: bool = False) -> dict:
    """The balloon every detached VM gets (Firecracker's Balloon JSON): empty at start (amount_mib 0), with
    deflate_on_oom (the guest takes pages back rather than OOM-kill a process), statistics every
    DETACHED_STATS_INTERVAL_S seconds, and free page reporting if asked."""
    return {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": DETACHED_STATS_INTERVAL_S,
            "free_page_reporting": free_page_reporting}


def _request(name: str, method: str, path: str, body=None):
    status, answer = cli_vms._api(cli_vms._live(name), method, path, body)
    if status not in (200, 204):
        fail(f"VM {name!r}: {(answer or {}).get('fault_message', f'HTTP {status}')}", 1)
    return answer


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _amount_mib(size: str) -> int:
    from popek.runner import parse_size

    try:
        n = parse_size(size)
    except ValueError as e:
        fail(str(e))
    if n % (1 << 20):
        fail(f"balloon size {size!r} is not a whole number of MiB (the API's amount_mib)")
    return n >> 20


def _wait_actual(name: str, target_mib: int, timeout: float) -> dict:
    """Poll the statistics until the guest's ``actual`` equals the target; exit 1 when ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _request(name, "GET", "/balloon/statistics")
        if stats["actual_pages"] == stats["target_pages"] and stats["target_mib"] == target_mib:
            return stats
        if time.monotonic() >= deadline:
            fail(f"VM {name!r}: the guest's balloon is at {stats['actual_mib']} MiB, not the {target_mib} MiB asked, "
                 f"after {timeout:g} s (it goes on trying)", 1)
        time.sleep(WAIT_POLL_S)


def _print_stats(stats: dict) -> None:
    click.echo(f"balloon: target {stats['target_mib']} MiB ({stats['target_pages']} pages), "
               f"actual {stats['actual_mib']} MiB ({stats['actual_pages']} pages)")
    for key in BYTE_STATS:
        if key in stats:
            click.echo(f"{key}: {_mib(stats[key])}")
    for key in ("major_faults", "minor_faults", "hugetlb_allocations", "hugetlb_failures"):
        if key in stats:
            click.echo(f"{key}: {stats[key]}")


@main.command()
@click.argument("name")
@click.argument("size", required=False)
@click.option("--stats", is_flag=True, help="show the balloon's size and the guest's memory statistics")
@click.option("--wait", type=float, default=0.0, metavar="SECONDS",
              help="after setting SIZE, wait up to SECONDS for the guest to reach it")
@click.option("--json", "as_json", is_flag=True, help="print JSON (GET /balloon, or the statistics with --stats)")
def balloon(name, size, stats, wait, as_json):
    """Set VM NAME's balloon to SIZE (e.g. 100M; 0 empties it): the guest hands that much of its memory back to
    the host (virtio-balloon). Without SIZE: show the balloon's configuration.

    The target is set at once; the guest fills the balloon at its own pace (--wait waits for it). With
    deflate_on_oom (every detached VM's default) the guest takes pages back before it would run out of memory.
    """
    if wait < 0:
        fail(f"--wait {wait:g}: a number of seconds is not negative")
    if size is not None:
        amount = _amount_mib(size)
        _request(name, "PATCH", "/balloon", {"amount_mib": amount})
        result = _wait_actual(name, amount, wait) if wait else None
        if not stats and not as_json:
            reached = f", the guest's is at {result['actual_mib']} MiB" if result else ""
            click.echo(f"{name}: balloon target {amount} MiB{reached}")
    elif wait:
        fail("--wait goes with a SIZE to wait for")
    if stats:
        answer = _request(name, "GET", "/balloon/statistics")
        click.echo(json.dumps(answer)) if as_json else _print_stats(answer)
    elif size is None or as_json:
        answer = _request(name, "GET", "/balloon")
        if as_json:
            click.echo(json.dumps(answer))
        else:
            for key, value in answer.items():
                click.echo(f"{key}: {value}")

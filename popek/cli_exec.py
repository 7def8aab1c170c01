"""`popek exec NAME -- CMD...`: run a command in a detached VM through its guest agent (popek.agent)."""

from __future__ import annotations

import sys

import click

from popek.cli import fail, main

#: Seconds `popek exec` waits for the guest agent to answer (the guest may still be booting).
READY_TIMEOUT = 120.0


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--interactive", "-i", is_flag=True, help="forward this process's stdin to the command")
@click.option("--env", "-e", "env", multiple=True, metavar="KEY=VALUE", help="add to the command's environment")
@click.option("--workdir", "-w", default=None, metavar="DIR", help="the command's working directory in the guest")
@click.option("--timeout", "-t", type=float, default=READY_TIMEOUT, show_default=True,
              help="seconds to wait for the guest agent to answer")
def exec(name, command, interactive, env, workdir, timeout):  # noqa: A001 (the command's name)
    """Run COMMAND (after `--`) in the running VM NAME; its stdout and stderr stream to ours and `popek exec`
    exits with its exit status (128 + N if signal N ended it; 127 if it could not be started).

    Ctrl-C sends SIGINT to the command; a second one gives up (the guest agent then kills the command).
    """
    from popek.agent import AgentClient, AgentError, AgentNotReady
    from popek.cli_vms import _live
    from popek.runtime import RuntimeDir

    environment = {}
    for item in env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(f"--env {item!r} is not KEY=VALUE")
        environment[key] = value
    if _live(name).state == "paused":  # _live exits 1 for no such VM or one that is not running
        fail(f"VM {name!r} is paused; `popek resume {name}` first", 1)
    uds = RuntimeDir(name).vsock_socket
    if not uds.exists():
        fail(f"VM {name!r} has no vsock socket ({uds}); it was started without a vsock device", 1)
    client = AgentClient(uds)
    try:
        client.wait_ready(timeout)
    except AgentNotReady as e:
        fail(f"VM {name!r}: {e}")
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def write(stream):
        def emit(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return emit

    try:
        status = client.exec(list(command), stdin=sys.stdin.buffer if interactive else None,
                             on_stdout=write(out), on_stderr=write(err),
                             on_error=lambda msg: click.echo(f"popek: guest agent: {msg}", err=True),
                             env=environment, cwd=workdir)
    except KeyboardInterrupt:
        fail("interrupted; the command was killed", 130)
    except (AgentError, OSError, ValueError) as e:
        fail(f"VM {name!r}: {e}", 1)
    sys.exit(status)

"""Popek: a virtual machine monitor on Linux KVM, scriptable from Python.

``popek.run(["uname", "-a"])`` boots the default guest, runs the command and returns its output and exit status;
``popek.VM`` gives the running guest (console stream, pause/resume, stop).
"""

__all__ = ["VM", "run", "RunResult"]


def __getattr__(name):
    if name in __all__:
        from popek import runner

        return getattr(runner, name)
    raise AttributeError(name)

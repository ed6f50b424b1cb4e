"""An optional per-task sandbox with bubblewrap (``bwrap``).

A sandboxed task sees the host's file system read-only, a private ``/tmp``,
its own working directory writable, fresh ``/proc`` and ``/dev``, its own
pid, IPC and host-name namespaces, and no network unless it asks for it.
The runner prefixes the task's argv with :func:`sandbox_argv`; everything
else (the task group, limits, output) is unchanged, because ``bwrap`` itself
is the task's main process and joins the task group before it executes.
"""

from __future__ import annotations

import shutil

#: Debian / Ubuntu / Fedora package that provides ``bwrap``.
PACKAGE = "bubblewrap"


def find_bwrap(path: str | None) -> str | None:
    """The ``bwrap`` program on ``path`` (a PATH string; None: this process's), or None."""
    return shutil.which("bwrap", path=path)


def missing_message() -> str:
    """What to tell a user whose task asks for a sandbox on a machine without bwrap."""
    return (
        f"the task asks for a sandbox but bubblewrap (bwrap) is not installed on this client: "
        f"install the {PACKAGE!r} package, or run the task without sandbox=True"
    )


def sandbox_argv(argv: tuple[str, ...], *, bwrap: str, cwd: str, network: bool) -> tuple[str, ...]:
    """``argv`` run inside bubblewrap with ``cwd`` as its writable working directory (pure)."""
    prefix = [
        bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        # After the private /tmp, so a working directory under /tmp stays visible.
        "--bind",
        cwd,
        cwd,
        "--chdir",
        cwd,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
    ]
    if not network:
        prefix.append("--unshare-net")
    return (*prefix, "--", *argv)

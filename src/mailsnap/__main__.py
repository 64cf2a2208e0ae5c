"""``python -m mailsnap`` and the ``mailsnap`` console script.

``mailsnap --version`` alone is answered here, before typer and the commands are imported
(start-up time is part of every measured run); everything else goes to the typer app.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from mailsnap import __version__


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        # The line the --version option prints (mailsnap.cli.app._version).
        print(f"mailsnap {__version__}")
        return
    from mailsnap.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    exit_without_teardown(code)


def exit_without_teardown(code: object) -> None:
    """Exit with ``code`` once the run is over, without Python's own teardown.

    After the last atexit handler, the interpreter frees every module, class and object one
    by one; with pydantic's validators, typer and sh loaded that took 0.15 s of the 1.8 s of
    a 20,000-message night (strace: no system call in that gap), paid on every run. By now
    the run is done: files are closed by their ``with`` blocks, the report and metrics are
    written. What the normal exit would still do is done here first: the atexit handlers
    (logging's flush), then stdout and stderr flushed. Anything unusual takes the normal
    path: a non-daemon thread still running (the normal exit waits for it), an exit code
    that is not a number (Python prints it), a stream that cannot be flushed (Python
    reports that, e.g. a closed pipe), or a profiler or tracer watching (``python -m
    cProfile``, coverage: they write their results after the program ends)."""
    if code is None:
        code = 0
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if not isinstance(code, int) or threading.active_count() > 1 or watched:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main()

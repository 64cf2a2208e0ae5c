"""``python -m mailsnap`` and the ``mailsnap`` console script.

``mailsnap --version`` alone is answered here, before typer and the commands are imported
(start-up time is part of every measured run); everything else goes to the typer app.
"""

from __future__ import annotations

import sys

from mailsnap import __version__


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        # The line the --version option prints (mailsnap.cli.app._version).
        print(f"mailsnap {__version__}")
        return
    from mailsnap.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()

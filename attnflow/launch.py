"""The ``attnflow`` console entry point: answers ``--version`` at once, and imports the command line (and with
it torch, timm and the rest) only for the commands that need them."""
from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from .version import __version__

        print(f"attnflow {__version__}")
        return
    from .cli import main as run

    run()
